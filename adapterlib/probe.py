"""The checkpoint test (the seed plan's `test_checkpoint.sh`): fixed samples, gate statistics and the
grounding summary of one checkpoint, and grounding success against step over all of a run's checkpoints.

Layouts and seeds are fixed: held-out layout i with seed i (as everywhere in the project), so two
checkpoints are compared on the same layouts and the same starting noise. Each test is saved under
the run, `runs/<run>/checkpoint_test/step_XXXXXXX/` (grid.png: the samples with the requested boxes
drawn; results.json: the numbers), and is reused when asked again with the same settings.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from . import shapes
from .checkpoint import list_checkpoints, load_adapter, resolve_checkpoint
from .evaluate import evaluate_grounding
from .paths import repo_path

GATE_KEYS = ("gate_mean", "gate_max", "gate_raw_max")


def probe_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoint_test" / f"step_{step:07d}"


def load_run_base(run_dir: Path, device: str | None = None):
    """The base model a run was trained on (from its config.json)."""
    import torch

    from .base import load_base
    config = json.loads((Path(run_dir) / "config.json").read_text())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_base(config["base_model"], device=device)


def cached_result(run_dir: Path, step: int, settings: dict) -> dict | None:
    """A saved test of this step with exactly these settings, else None."""
    path = probe_dir(run_dir, step) / "results.json"
    if not path.is_file() or not (path.parent / "grid.png").is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def probe_checkpoint(run_dir: str | Path, which: str | int = "latest", n: int = 10, *, base=None,
                     steps: int = 25, guidance: float = 3.0, scale: float = 1.0, tau: float = 1.0,
                     device: str | None = None, force: bool = False) -> dict:
    """Test one checkpoint (`latest`, `final`, a step, or 0: the base alone): n samples at held-out layouts 0..n-1 with
    seeds 0..n-1, their grid with the requested boxes, the gate statistics and the grounding summary.
    Writes grid.png and results.json under checkpoint_test/step_XXXXXXX/ and returns the results."""
    from .sample import boxed_grid, generate
    from .train import gate_stats

    run_dir = repo_path(run_dir)
    # step 0 has no checkpoint: the zero-init adapter is the identity, so it is the base alone
    step, path = (0, None) if str(which) == "0" else resolve_checkpoint(run_dir, which)
    settings = dict(n=n, steps=steps, guidance=guidance, scale=scale, tau=tau)
    if not force and (saved := cached_result(run_dir, step, settings)) is not None:
        return saved
    records = shapes.heldout_records(n)
    if len(records) < n:
        raise ValueError(f"n={n}: there are only {len(records)} held-out layouts")
    seeds = list(range(n))
    base = base if base is not None else load_run_base(run_dir, device)
    if path is None:
        images = generate(base, records, seeds, steps=steps, guidance=guidance)
        gates = dict.fromkeys(GATE_KEYS, 0.0)
    else:
        adapter = load_adapter(path, base)
        try:
            images = generate(base, records, seeds, adapter=adapter, scale=scale, tau=tau, steps=steps,
                              guidance=guidance)
            gates = gate_stats(adapter)
        finally:
            adapter.detach()                   # leave the (possibly shared) base as it was
    table, summary = evaluate_grounding(images, records)

    out = probe_dir(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    boxed_grid(images, records, ncols=min(n, 5)).save(out / "grid.png")
    per_image = table.groupby("record").success.mean() if len(table) else pd.Series(dtype=float)
    checkpoint = "none (step 0: zero-init adapter = the base alone)" if path is None else str(path.relative_to(run_dir))
    results = dict(run=run_dir.name, step=step, checkpoint=checkpoint, settings=settings,
                   seeds=seeds, layouts=[r.id for r in records], grounding=summary,
                   gates={k: gates[k] for k in GATE_KEYS},
                   gates_per_layer={k: v for k, v in gates.items() if k not in GATE_KEYS},
                   success_per_image=[float(per_image.get(i, math.nan)) for i in range(n)],
                   grid=str((out / "grid.png").relative_to(run_dir)))
    results = _strict_json(results)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")      # a reader never sees half a file
    return results


def grounding_vs_step(run_dir: str | Path, n: int = 10, *, base=None, device: str | None = None,
                      force: bool = False, step0: bool = True, **settings) -> pd.DataFrame:
    """The checkpoint test of every complete checkpoint (cached ones are read back, not redone):
    one row per step with the grounding summary and the gate statistics. With `step0`, a first row
    at step 0: the zero-init adapter, i.e. the base alone (where a run starts from)."""
    run_dir = repo_path(run_dir)
    rows = []
    for step in [0] * step0 + [s for s, _ in list_checkpoints(run_dir)]:
        wanted = dict(n=n, steps=settings.get("steps", 25), guidance=settings.get("guidance", 3.0),
                      scale=settings.get("scale", 1.0), tau=settings.get("tau", 1.0))
        result = None if force else cached_result(run_dir, step, wanted)
        cached = result is not None
        if result is None:
            base = base if base is not None else load_run_base(run_dir, device)     # loaded once, when needed
            result = probe_checkpoint(run_dir, step, n, base=base, force=force, **settings)
        rows.append(dict(step=step, **{k: result["grounding"][k] for k in ("success_rate", "miou", "color_presence",
                                                                             "n_objects")},
                         **result["gates"], cached=cached))
    columns = ["step", "success_rate", "miou", "color_presence", "n_objects", *GATE_KEYS, "cached"]
    return pd.DataFrame(rows, columns=columns)


def show_result(results: dict, run_dir: str | Path) -> str:
    """One line: step, grounding and gates of a checkpoint test."""
    g, gates = results["grounding"], results["gates"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    return (f"{Path(run_dir).name} step {results['step']}: success {fmt(g['success_rate'])}, mIoU {fmt(g['miou'])} "
            f"over {g['n_objects']} objects in {g['n_images']} samples; gate mean {gates['gate_mean']:.3f}, "
            f"max {gates['gate_max']:.3f}, raw max {gates['gate_raw_max']:.3f}")


def _strict_json(value):
    """NaN -> None, tuples -> lists, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
