#!/usr/bin/env bash
# One lease of the GPU machine (device tool), in one call: train reference-model candidates on the
# flat world, keep float16 snapshots for a learning curve evaluated on the CPU afterwards, then the
# SD-size benchmark rows. Everything the session needs comes back through $OUT (8 files at most).
#
#   bash scripts/gpu_session.sh            # from the repository root
#
# Settings (environment variables; defaults in brackets):
#   OUT     where the files that come back are written [$OUT of the device tool, else runs/gpu_out]
#   RUNS    the runs folder, relative to the repository root or absolute [runs]; runs a and b go in it
#   BUDGET  seconds the whole script may take [570: a 600 s device call less a margin]
#   POOL, DEVICE, INIT, LRS, BENCH, BATCH, WARMUP, EVAL_EVERY: see below
#
# Needs the carried folder .gpu/ with the diffusers wheel (the machine has torch and transformers,
# not diffusers) and a photo for the benchmark (.gpu/voc.jpg).
set -u
T0=$(date +%s)
OUT=${OUT:-runs/gpu_out}
BUDGET=${BUDGET:-570}
POOL=${POOL:-60000}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu BUDGET=150 POOL=300: a smoke run on a CPU
INIT=${INIT:-}           # INIT=emerdiff/assets/weights: continue the shipped model instead of from scratch
LRS=(${LRS:-5e-4 1e-3})  # learning rates of runs a and b
BENCH=${BENCH:-1}        # BENCH=0: all the time to training
R=${RUNS:-runs}
mkdir -p "$R" "$OUT"
source scripts/gpu_env.sh "$R/env.txt"
left() { echo $((T0 + BUDGET - $(date +%s))); }
python3 -c "import training.train, diffusers.models" || exit 1

COMMON="--stage unet --preset small --world flat --vae-from emerdiff/assets/weights --caption-dropout 0.5
  --batch ${BATCH:-256} --latent-pool $POOL --pool-workers 14 --amp --device $DEVICE --warmup ${WARMUP:-500}
  --ckpt-every 2000 --eval-fn training.train:keep_snapshot --eval-every ${EVAL_EVERY:-1500}
  --no-progress --threads 4 ${INIT:+--init-from $INIT}"
# the latent pool once (same seed, world and VAE: identical for every run), then shared
python3 -m training.train $COMMON --out "$R/a" --pool-only || exit 1
mkdir -p "$R/b/unet" && ln -f "$R/a/unet/latent_pool.pt" "$R/b/unet/latent_pool.pt"

TRAIN=$(( $(left) - (BENCH ? 115 : 35) ))   # leave time for final writes, packing (and the benchmark)
echo "training budget per run: $TRAIN s (two runs side by side on the one GPU)"
python3 -m training.train $COMMON --out "$R/a" --lr ${LRS[0]} --time-budget $((TRAIN - 25)) >"$R/a.log" 2>&1 &
python3 -m training.train $COMMON --out "$R/b" --lr ${LRS[1]} --time-budget $((TRAIN - 25)) >"$R/b.log" 2>&1 &
END=$(( $(date +%s) + TRAIN + 30 ))
while [ -n "$(jobs -r)" ] && [ "$(date +%s)" -lt "$END" ]; do
  sleep 20
  for r in a b; do echo "$r: $(tail -c 300 $R/$r/unet/log.jsonl 2>/dev/null | tail -n 1)"; done
done
kill $(jobs -p) 2>/dev/null
wait
for r in a b; do tail -n 3 "$R/$r.log"; done

# three snapshots a run: about 1/3, 2/3 and the last
for r in a b; do
  snaps=($(ls "$R/$r/snapshots/"*.safetensors 2>/dev/null | sort))
  n=${#snaps[@]}
  [ "$n" -eq 0 ] && continue
  for i in $(printf '%s\n' $(( (n - 1) / 3 )) $(( 2 * (n - 1) / 3 )) $(( n - 1 )) | sort -un); do
    cp "${snaps[$i]}" "$OUT/${r}_$(basename "${snaps[$i]}")"
  done
done
pack() { tar czf "$OUT/logs.tgz" -C "$R" env.txt a.log b.log a/unet/log.jsonl b/unet/log.jsonl \
  a/args_unet.json b/args_unet.json $(cd "$R" && ls bench.md 2>/dev/null) 2>/dev/null; }
pack
ls -la "$OUT"

if ! grep -qs planned_steps "$R/a/unet/log.jsonl" "$R/b/unet/log.jsonl"; then
  echo "no run got past its timed steps: no benchmark, so the lease is left for a fixed rerun"; exit 1
fi
B=$(( $(left) - 5 ))
if [ "$BENCH" = 1 ] && [ "$B" -gt 40 ] && [ "$DEVICE" = cuda ]; then
  echo "benchmark: $B s"
  timeout "$B" python3 benchmarks/bench_segment.py --model sd15-random --device cuda --dtype bf16,fp16 \
    --resolution 512 --k 25 --max-batch 16,51 --loop shared --image .gpu/voc.jpg --markdown "$R/bench.md" \
    --note "$(head -n 1 $R/env.txt)"
  cat "$R/bench.md" 2>/dev/null
  pack
fi
echo "total $(( $(date +%s) - T0 )) s"
