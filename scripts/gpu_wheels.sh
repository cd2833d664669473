#!/usr/bin/env bash
# Fill .gpu/ (ignored by git, carried to the device machine) with wheels of the packages the GPU machine
# lacks, at the versions of this checkout's venv; scripts/gpu_env.sh installs them there (--no-deps).
# The machine has torch and transformers; the device tool carries at most 64 MiB, so only what is missing:
#   bash scripts/gpu_wheels.sh                  # the default list below
#   PKGS="diffusers kornia" bash scripts/gpu_wheels.sh     (kornia_rs, a binary wheel, only serves kornia.io: not needed)
# Run `cat $OUT/missing.txt` of a first lease call (scripts/gpu_issue25.sh writes it) to trim the list.
set -eu
PIP=${PIP:-.venv/bin/pip}
PKGS=${PKGS:-diffusers kornia imgviz papermill nbclient accelerate}  # pure-python wheels only (any python 3)
mkdir -p .gpu
for p in $PKGS; do
  v=$($PIP show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "$p is not installed in the venv; skipped"; continue; }
  $PIP download -q --no-deps --only-binary :all: -d .gpu "$p==$v"
done
du -sh .gpu; ls .gpu
