#!/usr/bin/env bash
# The main job on the embedded default (README command 1, through `make run`), headless:
# trains the spatial adapter on the Shapes world through papermill, then measures it on the held-out
# layouts next to ground truth and the base alone.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME="default-$(date +%Y%m%d-%H%M%S)"
RUN=runs/$RUN_NAME
mkdir -p "$RUN" figures

# the `shapes` preset's values (the notebook's own defaults are a CI-sized smoke run)
.venv/bin/papermill notebooks/02_train.ipynb "$RUN/02_train.ipynb" \
    -p preset shapes -p run_name "$RUN_NAME" -p steps 1500 -p batch_size 16 -p n_train 20000 \
    -p save_every 250 -p log_every 25 -p n_samples 8
.venv/bin/python -m adapterlib evaluate "$RUN" | tee "$RUN/evaluate.txt"
cp "$(ls "$RUN"/samples/*.png | tail -n 1)" "figures/default_run_samples.png"

echo "run folder: $(pwd)/$RUN   (train.log, metrics.csv, checkpoints/, samples/, evaluate.txt)"
echo "figures:    $(pwd)/figures"
