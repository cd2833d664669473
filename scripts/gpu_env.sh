# Sourced by the GPU-lease scripts from the repository root: install the carried wheels (.gpu/*.whl:
# the machine has torch, not diffusers) into $SITE (default .gpu/site, inside the repository copy),
# and write what the machine is to the file named by $1.
SITE=${SITE:-.gpu/site}
if ls .gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/*.whl || exit 1
  case $SITE in /*) ;; *) SITE=$PWD/$SITE ;; esac   # PYTHONPATH must not depend on a later cd
  export PYTHONPATH=$SITE:$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; nproc
  python3 -c "import torch, diffusers, transformers, sklearn
print(torch.__version__, diffusers.__version__, transformers.__version__, sklearn.__version__)"
} 2>&1 | tee "$1"
