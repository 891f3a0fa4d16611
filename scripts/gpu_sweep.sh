#!/usr/bin/env bash
# One GPU call that compares adapter recipes on the harder world: every variant trains in its own process, side by
# side on the one GPU, in fp32 (so that its numbers stand for a CPU run of the same recipe), saving a checkpoint
# every SAVE steps until STEPS or the training deadline; then the checkpoints at every EVAL_EVERY steps and each
# variant's last one are judged on held-out v2 (per bucket), variants side by side again. On a launch-bound tiny
# base one process leaves the GPU mostly idle, so side-by-side processes cost little each.
#   OUT=<dir> bash scripts/gpu_sweep.sh              # on the device: carry .whl (diffusers)
#   SMALL=1 OUT=/tmp/rehearsal bash scripts/gpu_sweep.sh   # a CPU rehearsal: every part tiny
# VARIANTS: one variant a line, "name --flag value ..." (`python -m adapterlib train` flags; default below);
# STEPS (6000), SAVE (500), EVAL_EVERY (1000), TRAIN_S (seconds of training, 300), TOTAL (seconds in all, 540).
# Results: $OUT/results.tgz (per variant train_*.txt, metrics.csv, config.json; evaluate_<name>_<step>.txt).
OUT=${OUT:-/tmp/gpu-sweep-out}
source "$(dirname "$0")/gpu_common.sh"
STEPS=${STEPS:-6000}; SAVE=${SAVE:-500}; EVAL_EVERY=${EVAL_EVERY:-1000}; TRAIN_S=${TRAIN_S:-300}; TOTAL=${TOTAL:-540}
VARIANTS=${VARIANTS:-"default
smaller-front --adapter_depth smaller-front
learned-depth --adapter_depth learned
scale-1 --scale_min 1.0
self-attention --adapter_attention self
batch-32 --batch_size 32
seed-1 --seed 1"}
COMMON=(--device "$DEV" --mixed_precision no --steps "$STEPS" --save_every "$SAVE" --progress-every 30)
EVAL_ARGS=(--layouts v2 --device "$DEV")
if [ -n "${SMALL:-}" ]; then COMMON+=(--n_train 64 --n_samples 2); EVAL_ARGS+=(--limit 12 --steps 2); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1. the data set and its encoding cache, once for every variant" | tee "$R/sweep.txt"
$PY -m adapterlib cache --device "$DEV" --mixed_precision no $([ -n "${SMALL:-}" ] && echo --n_train 64) 2>&1 | tail -n 3 | tee -a "$R/sweep.txt"

echo "== 2. training, side by side, for at most ${TRAIN_S} s" | tee -a "$R/sweep.txt"
names=()
while read -r name flags; do
  [ -z "$name" ] && continue
  names+=("$name")
  # shellcheck disable=SC2086
  timeout "$TRAIN_S" $PY -m adapterlib train --run_name "$name" "${COMMON[@]}" $flags > "$R/train_$name.txt" 2>&1 &
done <<< "$VARIANTS"
wait
for name in "${names[@]}"; do
  cp "$R/runs/$name/metrics.csv" "$R/metrics_$name.csv" 2>/dev/null
  echo "$name: last checkpoint $(ls "$R/runs/$name/checkpoints" 2>/dev/null | tail -n 1)" | tee -a "$R/sweep.txt"
done

echo "== 3. held-out v2 at every ${EVAL_EVERY} steps and the last checkpoint, until ${TOTAL} s" | tee -a "$R/sweep.txt"
judge() {  # name: its checkpoints, newest first (so the longest training is judged even when time runs short)
  local ck steps=() last
  last=$(ls "$R/runs/$1/checkpoints" 2>/dev/null | tail -n 1)
  for ck in $(ls -r "$R/runs/$1/checkpoints" 2>/dev/null); do
    local s=$((10#${ck#step_}))
    if [ "$ck" = "$last" ] || [ $((s % EVAL_EVERY)) -eq 0 ]; then steps+=("$s"); fi
  done
  for s in "${steps[@]}"; do
    local left=$((TOTAL - SECONDS))
    [ $left -lt 15 ] && { echo "$1 step $s: skipped, ${left} s left" >> "$R/sweep.txt"; continue; }
    timeout "$left" $PY -m adapterlib evaluate "$1" --checkpoint "$s" "${EVAL_ARGS[@]}" > "$R/evaluate_${1}_$s.txt" 2>&1
  done
}
for name in "${names[@]}"; do judge "$name" & done
wait
echo "total wall_s $SECONDS" | tee -a "$R/sweep.txt"
