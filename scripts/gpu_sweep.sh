#!/usr/bin/env bash
# One lease of the GPU machine (device tool): issue 13's readout sweep on validation scenes, then the
# chosen setting alone on the test scenes (training.readout_sweep), in one call.
#
#   bash scripts/gpu_sweep.sh                      # BUDGET=520 s, N=150 validation scenes, 12 at a time
#   DEVICE=cpu N=1 WORKERS=2 EXTRA="--grid modulation_strength=[5.0] --test-n 1" bash scripts/gpu_sweep.sh
#
# Needs the carried folder .gpu/ with the diffusers wheel (the machine has torch, not diffusers) and,
# for a second model, SNAPSHOT=.gpu/NAME.safetensors (a keep_snapshot file; unpacked on v2's VAE).
#
# Settings (environment variables; defaults in brackets), run from the repository root:
#   OUT     where the files that come back are written [$OUT of the device tool, else runs/gpu_out]
#   RUNS    the runs folder, relative to the repository root or absolute [runs]; the sweep goes in
#           $RUNS/sweep and an unpacked snapshot in $RUNS/NAME
#   BUDGET  seconds the whole script may take [520: a 600 s device call less the start and a margin]
#   SNAPSHOT, N, WORKERS, DEVICE, EXTRA: see the examples above
set -u
T0=$(date +%s)
OUT=${OUT:-runs/gpu_out}
BUDGET=${BUDGET:-520}
SNAPSHOT=${SNAPSHOT:-.gpu/b_step_001400.safetensors}
RUNS=${RUNS:-runs}
R=$RUNS/sweep
mkdir -p "$OUT" "$R"
source scripts/gpu_env.sh "$OUT/env.txt"
MODELS=(--model v2=reference)
if [ -f "$SNAPSHOT" ]; then
  name=$(basename "$SNAPSHOT" .safetensors)
  python3 -c "from training.train import unpack_snapshot as u; u('$SNAPSHOT', 'emerdiff/assets/weights', '$RUNS/$name')" || exit 1
  MODELS+=(--model "$name=$RUNS/$name")
fi
LEFT=$(( BUDGET - ($(date +%s) - T0) - 15 ))
python3 -m training.readout_sweep "${MODELS[@]}" --out "$R" --n "${N:-150}" --workers "${WORKERS:-12}" \
  --device "${DEVICE:-cuda}" --budget "$LEFT" ${EXTRA:-} 2>&1 | tee "$OUT/sweep.log"
cp "$R/sweep.md" "$R/sweep.json" "$OUT/" 2>/dev/null
# every run's results (the scenes and per-image records stay behind, except the test runs' records)
tar czf "$OUT/runs.tgz" -C "$R" --exclude='*/data' --exclude='validation/*/evaluate/per_image' . 2>/dev/null
ls -la "$OUT"
echo "total $(( $(date +%s) - T0 )) s"
