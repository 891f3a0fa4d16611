# Sourced by the GPU check scripts (scripts/gpu_*_check.sh), after they set OUT's default: results go to $R
# ($OUT/r), packed into $OUT/results.tgz on exit (run folders without weights, data sets or caches: the device
# returns a few files only); runs under $R/runs; $PY, $DEV (cuda when there is one) and $R/env.txt (GPU, versions).
set -uo pipefail
R=$OUT/r; mkdir -p "$R"
trap 'tar czf "$OUT/results.tgz" --exclude=checkpoints --exclude=final --exclude=_datasets --exclude=_cache -C "$OUT" r' EXIT
export ADAPTERLIB_RUNS=$R/runs PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } | tee "$R/env.txt"
