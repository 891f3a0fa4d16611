#!/usr/bin/env bash
# One GPU call for the harder world (issue: overlaps): retrain the tiny Shapes base on both worlds, then train the
# default adapter recipe on it and judge it on held-out v2, with the shipped base as the control when time allows.
# Results (the new base folder, its measurements, the adapter runs' logs and evaluations) in $OUT/results.tgz.
#   OUT=<dir> bash scripts/gpu_base_check.sh                      # on the device: carry .whl (diffusers)
#   SMALL=1 OUT=/tmp/rehearsal bash scripts/gpu_base_check.sh     # a CPU rehearsal: every part tiny
# BUDGET: seconds of base training (default 270); ASTEPS: adapter steps (default 2400, the default run's); TOTAL:
# seconds the whole script may take (default 540): each later part gets what is left, or is skipped, so that the
# results always come back (the base alone is also packed as $OUT/base.tgz as soon as it exists).
OUT=${OUT:-/tmp/gpu-base-out}
source "$(dirname "$0")/gpu_common.sh"
BUDGET=${BUDGET:-270}; ASTEPS=${ASTEPS:-2400}; TOTAL=${TOTAL:-540}
BASE_ARGS=(--budget-s "$BUDGET" --world mix); EVAL_ARGS=(--layouts v2 --device "$DEV")
if [ -n "${SMALL:-}" ]; then BASE_ARGS+=(--batch-size 8 --n-images 300 --eval-limit 8); EVAL_ARGS+=(--limit 12 --steps 2); ASTEPS=10; fi
ADAPTER_ARGS=(--device "$DEV" --steps "$ASTEPS" --progress-every 20)
if [ -n "${SMALL:-}" ]; then ADAPTER_ARGS+=(--n_train 64 --save_every 5 --n_samples 2); fi

echo "== 1. the base on the mix (first world + crowded v2), ${BUDGET} s of training" | tee "$R/base.txt"
start=$SECONDS
OUT=$R timeout $((TOTAL - 20)) $PY scripts/gpu_train_base.py "${BASE_ARGS[@]}" 2>&1 | tee -a "$R/base.txt"
echo "base wall_s $((SECONDS - start))" | tee -a "$R/base.txt"
[ -d "$R/shapes-tiny/unet" ] && tar czf "$OUT/base.tgz" -C "$R" shapes-tiny base.txt $(cd "$R" && ls base_eval.json base_samples*.png 2>/dev/null)

adapter() {  # name base: train the default recipe on that base, judge it on held-out v2
  local start=$SECONDS left=$((TOTAL - SECONDS))
  if [ $left -lt 90 ]; then echo "$1: skipped, ${left} s left" | tee "$R/evaluate_$1.txt"; return; fi
  timeout $((left * 2 / 3)) $PY -m adapterlib train --run_name "$1" --base_model "$2" "${ADAPTER_ARGS[@]}" 2>&1 | tee "$R/train_$1.txt"
  timeout $((TOTAL - SECONDS)) $PY -m adapterlib evaluate "$1" "${EVAL_ARGS[@]}" 2>&1 | tee "$R/evaluate_$1.txt"
  echo "$1 wall_s $((SECONDS - start))" | tee -a "$R/evaluate_$1.txt"
}
[ -f "$R/shapes-tiny/unet/config.json" ] && adapter on-mix-base "$R/shapes-tiny"
adapter on-shipped-base shapes-tiny
echo "total wall_s $SECONDS"
