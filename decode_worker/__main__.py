"""`python -m decode_worker`: a decode worker (BF16 by default) that takes prefilled KV from prefill workers."""

from decode_worker.args import main

main()
