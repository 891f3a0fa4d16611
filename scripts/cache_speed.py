"""Training samples/s with and without the encoding cache, interleaved in one process.

    python scripts/cache_speed.py                    # the shapes default (batch 16) and a tiny SD folder
    python scripts/cache_speed.py --rounds 3 --steps 60

Each round trains a fresh run of --steps steps with cache=True, then one with cache=False (num_workers 0
and 2), same config otherwise; the number is the median over rounds of each run's median logged
samples/s (the first logging window, which holds the warm-up, is left out; checkpoints are not timed).
The cache is built in the first round and reused after, as it is by every later run."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cache-speed-"))
    os.environ["ADAPTERLIB_RUNS"] = str(tmp / "runs")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import build_tiny_sd_folder                # the tests' tiny SD-architecture folder
    from adapterlib.training.config import make_config
    from adapterlib.shapes import write_dataset
    from adapterlib.training.train import train

    manifest = write_dataset(tmp / "shapes", 512, seed=0)
    cases = {"shapes-tiny (pixel space, 32 px)": "shapes-tiny",
             "tiny SD (VAE, 16 px, latents 8x8)": str(build_tiny_sd_folder(tmp / "tiny-sd"))}
    variants = {"cache": dict(cache=True), "images, 0 workers": dict(cache=False, num_workers=0),
                "images, 2 workers": dict(cache=False, num_workers=2)}
    rows = []
    for name, base in cases.items():
        speed = {v: [] for v in variants}
        for r in range(args.rounds):
            for k, (v, fields) in enumerate(variants.items()):
                cfg = make_config("shapes", run_name=f"{len(rows)}-{k}-{r}",
                                  base_model=base, data=str(manifest), steps=args.steps, log_every=10,
                                  save_every=10 * args.steps, n_samples=0, **fields)
                folder = train(cfg, progress=False, progress_every_s=1e9)
                m = pd.read_csv(folder / "metrics.csv")
                speed[v].append(float(m.samples_per_s.iloc[1:].median()))
        for v in variants:
            rows.append(dict(base=name, inputs=v, samples_per_s=round(statistics.median(speed[v]), 1)))
    table = pd.DataFrame(rows)
    for name in cases:
        ref = table[(table.base == name) & (table.inputs == "images, 0 workers")].samples_per_s.item()
        table.loc[table.base == name, "x images"] = (table[table.base == name].samples_per_s / ref).round(2)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
