#!/usr/bin/env bash
# One GPU call for issue 25 (speed at real size); results in $OUT/results.tgz:
#   1. `bench` at SD 1.5 size, batch 16, eager: the frozen-UNet floor, diffusers' GLIGEN (the peer), ours masked+FF
#      and self+FF at each block choice (all, decoder, low, migc) and feed-forward width (4x, 2x), in one process;
#   2. an SD 1.5-architecture folder with random weights (built from configs) and a manifest of >= 1,000 generated
#      512-px images (scripts/gpu_sd15_folder.py);
#   3. the encoding cache built ahead, timed (images/s);
#   4. the real loop at real size: `train --preset sd15` on that folder, cache on, bf16, at batch 16 (beside the
#      bench) and at the preset's batch 2, BLOCKS as the preset's unless set: samples/s from metrics.csv past the
#      first LOOP_SKIP steps, peak CUDA memory, the plan's 25,000 steps x batch 2 projected in minutes;
#   4b. the memory ladder, each micro-batch's CUDA peak with and without gradient checkpointing (scripts/memory_ladder.py);
#   5. `bench --compile` with what time is left: masked+FF at all and decoder, the peer and the floor, eager and compiled.
#   OUT=<dir> bash scripts/gpu_speed_check.sh                  # on the device (carry .whl when diffusers is not there)
#   SMALL=1 OUT=/tmp/rehearsal bash scripts/gpu_speed_check.sh  # a CPU rehearsal: every part tiny, no compile
# TOTAL: seconds the whole script may take (default 540): each part gets what is left, or is skipped, so the results
# always come back. IMAGES (1000), LOOP_STEPS (batch 16: 200; batch 2: 300), BLOCKS (default: the sd15 preset's).
OUT=${OUT:-/tmp/gpu-speed-out}
source "$(dirname "$0")/gpu_common.sh"
TOTAL=${TOTAL:-540}; IMAGES=${IMAGES:-1000}; LOOP16=${LOOP16:-200}; LOOP2=${LOOP2:-300}; LOOP_SKIP=${LOOP_SKIP:-50}
BLOCKS=${BLOCKS:-$($PY -c "from adapterlib.training.config import preset_value; print(preset_value('sd15', 'adapter_blocks'))")}
BENCH=(-m adapterlib bench --device "$DEV" --size sd15 --batch 16 --rounds 3 --steps-per-round 5)
FOLDER_ARGS=(--out "$R/real" --images "$IMAGES")
if [ -n "${SMALL:-}" ]; then
  BENCH=(-m adapterlib bench --device "$DEV" --size tiny --batch 2 --rounds 1 --steps-per-round 1 --warmup 1)
  IMAGES=${IMAGES_SMALL:-16}; FOLDER_ARGS=(--out "$R/real" --images "$IMAGES" --small); LOOP16=4; LOOP2=4; LOOP_SKIP=1
fi
left() { echo $((TOTAL - SECONDS)); }

echo "== 1. bench, SD 1.5 size, batch 16, eager: floor, peer, ours at each block choice" | tee "$R/speed.txt"
timeout $(($(left) / 3)) $PY "${BENCH[@]}" --variants masked+ff,self+ff --blocks all,decoder,low,migc --ff-mult 4,2 2>&1 | tee "$R/bench.txt"

echo "== 2. SD 1.5-architecture folder (random weights) and $IMAGES generated images" | tee -a "$R/speed.txt"
timeout $(($(left) / 3)) $PY scripts/gpu_sd15_folder.py "${FOLDER_ARGS[@]}" 2>&1 | tee -a "$R/speed.txt"
SD=$R/real/sd15; DATA=$R/real/data/data.jsonl

echo "== 3. the encoding cache, built ahead and timed" | tee -a "$R/speed.txt"
start=$SECONDS
timeout $(($(left) / 3)) $PY -m adapterlib cache --preset sd15 --base_model "$SD" --data "$DATA" --device "$DEV" 2>&1 \
  | tail -n 2 | tee -a "$R/speed.txt"
echo "cache wall_s $((SECONDS - start)) for $IMAGES images (base loaded, images checked, encoded, written)" | tee -a "$R/speed.txt"

loop() {  # name batch steps: the real loop, then its steady samples/s, peak memory and the plan projected
  local s=$(($(left) / 2))
  [ "$s" -lt 30 ] && { echo "$1: skipped, $(left) s left" | tee -a "$R/speed.txt"; return; }
  timeout "$s" $PY - "$1" "$2" "$3" "$SD" "$DATA" "$DEV" "$BLOCKS" "$LOOP_SKIP" <<'PYEOF' 2>&1 | tee "$R/loop_$1.txt" | tail -n 3
import json, sys, time
import pandas as pd, torch
from adapterlib.training.config import make_config
from adapterlib.training.train import train
from adapterlib.evaluation.bench import projected_minutes
name, batch, steps, base, data, device, blocks, skip = sys.argv[1:]
batch, steps, skip = int(batch), int(steps), int(skip)
cfg = make_config("sd15", run_name=name, base_model=base, data=data, device=device, batch_size=batch, steps=steps,
                  save_every=steps, log_every=max(1, min(10, steps // 4)), n_samples=2, adapter_blocks=blocks)
t0 = time.perf_counter()
run = train(cfg, progress=False, progress_every_s=20)
wall = time.perf_counter() - t0
m = pd.read_csv(run / "metrics.csv")
steady = m[m.step >= min(skip, int(m.step.max()) - 1)]
a, b = steady.iloc[0], steady.iloc[-1]
speed = (b.step - a.step) * batch / (b.wall_s - a.wall_s) if b.step > a.step else float("nan")
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps(dict(run=name, batch=batch, steps=steps, blocks=blocks, attention=cfg.adapter_attention,
                      loop_samples_per_s=speed, steady_from_step=int(a.step), peak_mib=peak, wall_s=wall,
                      plan_minutes_at_this_rate=projected_minutes(speed))))
PYEOF
  cp "$ADAPTERLIB_RUNS/$1/metrics.csv" "$R/metrics_$1.csv" 2>/dev/null; cp "$ADAPTERLIB_RUNS/$1/train.log" "$R/train_$1.log" 2>/dev/null
}
echo "== 4. the real loop: train --preset sd15 (blocks $BLOCKS), cache on, bf16" | tee -a "$R/speed.txt"
loop sd15-b16 16 "$LOOP16"
loop sd15-b2 2 "$LOOP2"
rm -rf "$R/real" "$ADAPTERLIB_RUNS/_cache"

if [ -z "${SMALL:-}" ] && [ "$(left)" -gt 150 ]; then
  echo "== 4b. the memory ladder measured (scripts/memory_ladder.py --cuda; $(left) s left)" | tee -a "$R/speed.txt"
  timeout $(($(left) / 2)) $PY scripts/memory_ladder.py --cuda --json "$R/ladder.json" 2>&1 | tee "$R/ladder.txt"
fi

if [ -z "${SMALL:-}" ] && [ "$(left)" -gt 120 ]; then
  echo "== 5. bench --compile ($(left) s left)" | tee -a "$R/speed.txt"
  timeout $(($(left) - 15)) $PY "${BENCH[@]}" --variants masked+ff --blocks all,decoder --compile 2>&1 | tee "$R/bench_compile.txt"
else
  echo "== 5. bench --compile: skipped ($(left) s left${SMALL:+, SMALL})" | tee -a "$R/speed.txt"
fi
echo "total wall_s $SECONDS" | tee -a "$R/speed.txt"
