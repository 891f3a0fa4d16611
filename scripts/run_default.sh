#!/usr/bin/env bash
# The main job on the embedded default (README command 1, through `make run`), headless:
# trains the spatial adapter on the Shapes world through papermill (the `shapes` preset, nothing else
# given), then measures it on the held-out layouts next to ground truth and the base alone.
# Progress lines reach this terminal at least every 30 s. Runs go to $ADAPTERLIB_RUNS, else runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME="default-$(date +%Y%m%d-%H%M%S)"
RUN="${ADAPTERLIB_RUNS:-runs}/$RUN_NAME"
mkdir -p "$RUN" figures

.venv/bin/papermill notebooks/02_train.ipynb "$RUN/02_train.ipynb" -p run_name "$RUN_NAME"
.venv/bin/python -m adapterlib evaluate "$RUN_NAME" | tee "$RUN/evaluate.txt"
cp "$(ls "$RUN"/samples/*.png | tail -n 1)" "figures/default_run_samples.png"

echo "run folder: $(cd "$RUN" && pwd)   (config.json, train.log, metrics.csv, checkpoints/, samples/, evaluate.txt)"
echo "figures:    $(pwd)/figures"
