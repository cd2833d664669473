#!/usr/bin/env bash
# Issue 28 on a GPU lease: seconds per SD3-medium / FLUX.1-dev transformer call with random weights (bf16) at
# 1024 / 512 px and batched at 512 px, TFLOP/s, peak memory, and the estimated seconds of one segmentation
# (benchmarks/gpu_mmdit.py). About 2-3 minutes; tables under $OUT (issue28_mmdit.md / .json).
#
#   run(command="bash scripts/gpu_issue28.sh", carry=[".gpu"], timeout_s=300)   # on the lease
#   SMOKE=1 bash scripts/gpu_issue28.sh                                         # this CPU, tiny configs
set -u
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  FLAGS="--smoke --reps 1"
else
  PY=python3
  FLAGS=""
  source scripts/gpu_env.sh "$OUT/env.txt"
fi
timeout 280 "$PY" benchmarks/gpu_mmdit.py --out "$OUT" $FLAGS ${ARGS:-}
RC=$?
echo "gpu_issue28.sh: rc $RC"
exit $RC
