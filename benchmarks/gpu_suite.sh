#!/usr/bin/env bash
# The GPU host's suite, run from the repository root: installs the carried wheels (.whl, see
# ../shared/gpu-host/README.md), runs every test marked `gpu` under tests/ and the kernel tests (tests/kernels) on
# the GPU, then benchmarks/kv_transfer.py.
# Logs and results go to $OUT (default .out/): env.txt, pytest_gpu.log, pytest_kernels.log, kv_transfer.{log,json,md}.
#   bash benchmarks/gpu_suite.sh [extra pytest arguments]      (KV_TRANSFER_ARGS=--profile: profile a transfer too)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

{ nvidia-smi; nvidia-smi topo -m; python3 - <<'PY'
import torch
from mixquant_serve.transfer import nccl_lib
lib = nccl_lib.load()
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
print("nccl", lib.version(), "from", lib.path)
PY
} >"$OUT/env.txt" 2>&1
tail -n 3 "$OUT/env.txt"

python3 -m pytest -m gpu tests --continue-on-collection-errors -p no:cacheprovider -o timeout=300 "$@" 2>&1 \
  | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
# the kernel tests carry no `gpu` mark (on CPU they run in Triton's interpreter): here they run on the GPU, bf16 too
python3 -m pytest tests/kernels -p no:cacheprovider -o timeout=300 2>&1 | tee "$OUT/pytest_kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || tests_rc=1

python3 benchmarks/kv_transfer.py --out "$OUT" ${KV_TRANSFER_ARGS:-} 2>&1 | tee "$OUT/kv_transfer.log"
bench_rc=${PIPESTATUS[0]}

echo "pytest exit $tests_rc, kv_transfer exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
