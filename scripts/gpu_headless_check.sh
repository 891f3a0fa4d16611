#!/usr/bin/env bash
# One GPU call that checks the headless path on CUDA and measures it (results in $OUT/results.tgz):
#   1. notebook 01's checks (dtypes, identity at init, gradient at step 0, mixed-precision step) on CUDA, bf16 and fp16;
#   2. `python -m adapterlib train` of the default `shapes` preset on CUDA through AdaptedUNet's forward (timed),
#      then `--resume` with more steps, then `evaluate` on the 200 held-out layouts;
#   3. `python -m adapterlib bench` at SD 1.5 size: every adapter variant, diffusers' GLIGEN (the peer) and the
#      frozen-UNet floor in one process, eager; then the default variant, the peer and the floor torch.compile'd.
# On the device: carry .whl (diffusers); SMALL=1 makes every part tiny (a CPU rehearsal, no compile).
OUT=${OUT:-/tmp/gpu-check-out}
source "$(dirname "$0")/gpu_common.sh"
STEPS=${SMALL:+20}; STEPS=${STEPS:-1500}

echo "== 1. checks on $DEV" | tee "$R/checks.txt"
for mp in bf16 fp16; do
  timeout 120 $PY - "$DEV" "$mp" <<'PYEOF' 2>&1 | tee -a "$R/checks.txt"
import sys
from adapterlib.evaluation import checks
from adapterlib import shapes
from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.model.precision import precision_policy
device, mp = sys.argv[1], sys.argv[2]
policy = precision_policy(device, mp)
base = load_base("shapes-tiny", device, dtype=policy.compute_dtype)
adapter = build_adapter(base)
print(mp, policy)
print(checks.run_all(base, adapter, shapes.heldout_records(4), device, mp).to_string())
PYEOF
done

echo "== 2. train the shapes preset on $DEV ($STEPS steps), resume, evaluate" | tee "$R/train.txt"
start=$SECONDS
timeout 300 $PY -m adapterlib train --run_name gpu-default --device "$DEV" --steps "$STEPS" --progress-every 10 2>&1 | tee -a "$R/train.txt"
echo "train wall_s $((SECONDS - start)) (data set written, base loaded, $STEPS steps, checkpoints with samples)" | tee -a "$R/train.txt"
timeout 120 $PY -m adapterlib train --resume gpu-default --steps $((STEPS + 100)) --progress-every 10 2>&1 | tee -a "$R/train.txt"
timeout 200 $PY -m adapterlib evaluate gpu-default --device "$DEV" ${SMALL:+--limit 4 --steps 2} 2>&1 | tee "$R/evaluate.txt"
$PY -m adapterlib status gpu-default 2>&1 | tee "$R/status.txt"
cp "$ADAPTERLIB_RUNS/gpu-default/metrics.csv" "$ADAPTERLIB_RUNS/gpu-default/train.log" "$ADAPTERLIB_RUNS/gpu-default/config.json" "$R/" 2>/dev/null
rm -rf "$ADAPTERLIB_RUNS/_datasets" "$ADAPTERLIB_RUNS/_cache"

echo "== 3. bench: ours vs diffusers' GLIGEN vs the frozen-UNet floor (SD 1.5 size, batch 16)"
BENCH="-m adapterlib bench --device $DEV --size sd15 --batch 16 --rounds 3 ${SMALL:+--size tiny --batch 2 --rounds 1 --steps-per-round 1}"
timeout 240 $PY $BENCH 2>&1 | tee "$R/bench.txt"
if [ -z "${SMALL:-}" ]; then timeout 420 $PY $BENCH --variants masked+ff --compile 2>&1 | tee "$R/bench_compile.txt"; fi
