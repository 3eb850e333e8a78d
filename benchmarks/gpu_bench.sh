#!/usr/bin/env bash
# The single-GPU speed benchmarks in one command, run from the repository root on a GPU host:
# installs the carried wheels (.whl, see ../shared/gpu-host/README.md), builds the random Qwen3-8B-shaped
# checkpoint once, then runs prefill_speed.py, decode_speed.py and serve_speed.py in turn, each under a time
# limit (SIGTERM: a script stops measuring and writes what it has), going on past a failure.
#   bash benchmarks/gpu_bench.sh [prefill] [decode] [serve] [decode-gemv]   (default: the first three)
# decode-gemv: decode at batch 1 and 64 (1k; batch 1 at 32k) with kernels/gemv.py on (MIXQUANT_KERNEL_CONFIGS), no
# HF, into $OUT/gemv: beside `decode`, whether the small-batch GEMV should be on by default.
# Output in $OUT (default .out/): env.txt, build.log, {prefill,decode,serve}_speed.{log,json,md,png},
# serve_launch.log, and RESULTS.md: a copy of benchmarks/RESULTS.md with the new tables appended (copy it back,
# or append a saved run locally with `python benchmarks/X_speed.py --render X_speed.json --record`).
# Environment: BUDGET_S (all of it, default 530), MODEL_DIR (default /tmp/mixquant-bench-qwen3-8b; kept when
# KEEP_MODEL=1), MODEL_ARGS (its shape, to the build and every script: --layers N, or --tiny for a CPU dry run),
# BENCH_ARGS (to every script, e.g. "--engine-arg attention_backend=triton"), PREFILL_ARGS, DECODE_ARGS, SERVE_ARGS
# (to one script each; later flags win), PREFILL_S, DECODE_S, SERVE_S (each one's cap in s), PYTHON (python3).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.out}
MODEL_DIR=${MODEL_DIR:-/tmp/mixquant-bench-qwen3-8b}
BUDGET_S=${BUDGET_S:-530}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
"$PYTHON" -c "import msgspec, zmq, fastapi, uvicorn, pydantic, httpx" 2>/dev/null \
  || echo "gpu_bench: msgspec/pyzmq/fastapi/uvicorn/pydantic/httpx missing: carry the wheels (.whl, see" \
          "../shared/gpu-host/fetch-wheels.sh); the engine needs msgspec, serve_speed all of them"
MIXQUANT_COMMIT=${MIXQUANT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export MIXQUANT_COMMIT
deadline=$((SECONDS + BUDGET_S))
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=(prefill decode serve)

{ nvidia-smi; "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } \
  >"$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"
[ -f "$OUT/RESULTS.md" ] || cp benchmarks/RESULTS.md "$OUT/RESULTS.md"

# run NAME CAP_S COMMAND...: under min(CAP_S, what is left of the budget), tee'd to $OUT/NAME.log
declare -A rc
run() {
  local name=$1 cap=$2 left=$((deadline - SECONDS)); shift 2
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 10 ]; then echo "== $name: skipped, the time budget is spent"; rc[$name]=skipped; return; fi
  echo "== $name (limit ${limit} s): $*"
  timeout -s TERM -k 45 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc[$name]=${PIPESTATUS[0]}
  echo "== $name exit ${rc[$name]} after $((SECONDS + BUDGET_S - deadline)) s of the budget"
}

# shellcheck disable=SC2206  # MODEL_ARGS and the *_ARGS are word-split on purpose
common=(--model-dir "$MODEL_DIR" ${MODEL_ARGS:-} --out "$OUT" --record --results "$OUT/RESULTS.md")
# shellcheck disable=SC2086
run build 150 "$PYTHON" benchmarks/_gpu_common.py --model-dir "$MODEL_DIR" ${MODEL_ARGS:-}
# shellcheck disable=SC2086
for which in "${selected[@]}"; do
  case $which in
    prefill) run prefill_speed "${PREFILL_S:-150}" "$PYTHON" benchmarks/prefill_speed.py "${common[@]}" \
               --precisions bf16,fp8,nvfp4 --lengths 2048,8192,32768 --repeats 3 ${BENCH_ARGS:-} ${PREFILL_ARGS:-} ;;
    decode)  run decode_speed "${DECODE_S:-240}" "$PYTHON" benchmarks/decode_speed.py "${common[@]}" \
               --steps 24 --repeats 2 --hf-cells 1x1024,64x1024,1x8192 --hf-budget-s 100 \
               ${BENCH_ARGS:-} ${DECODE_ARGS:-} ;;
    decode-gemv) MIXQUANT_KERNEL_CONFIGS='{"gemv": {"max_rows": 1}}' run decode_speed_gemv "${DECODE_S:-240}" \
               "$PYTHON" benchmarks/decode_speed.py "${common[@]}" --out "$OUT/gemv" --steps 24 --repeats 2 \
               --batches 1,64 --contexts 1024 --long-context 32768 --no-hf ${BENCH_ARGS:-} ${DECODE_ARGS:-} ;;
    serve)   run serve_speed "${SERVE_S:-200}" "$PYTHON" benchmarks/serve_speed.py "${common[@]}" \
               --concurrency 1,16,64 --prompt-len 2048 --output-len 256 --prefill-precision nvfp4 \
               ${BENCH_ARGS:-} ${SERVE_ARGS:-} ;;
    *) echo "unknown benchmark $which (prefill, decode, serve, decode-gemv)"; rc[$which]=2 ;;
  esac
done
[ "${KEEP_MODEL:-0}" = 1 ] || rm -rf "$MODEL_DIR" "$MODEL_DIR.partial"

summary=""
status=0
for name in "${!rc[@]}"; do
  summary+="$name=${rc[$name]} "
  [ "${rc[$name]}" = 0 ] || status=1
done
echo "gpu_bench: $summary(total $((SECONDS + BUDGET_S - deadline)) s)" | tee -a "$OUT/summary.txt"
exit $status
