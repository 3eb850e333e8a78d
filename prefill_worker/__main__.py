"""`python -m prefill_worker`: a prefill worker (NVFP4 by default) that pushes KV to decode workers."""

from prefill_worker.args import main

main()
