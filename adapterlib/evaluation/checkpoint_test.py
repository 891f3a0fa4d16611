"""The checkpoint test (the training plan's checkpoint test script): fixed samples, gate statistics and the
grounding summary of one checkpoint, and grounding success against step over all of a run's checkpoints.

Layouts and seeds are fixed: the run's (`evaluate.run_layouts`: its `heldout` manifest when it names one,
else held-out layout i with seed i for a Shapes run, else the first records of its own manifest, marked
"(training records: not held out)"), so two checkpoints are compared on the same layouts and the same
starting noise. The detector is the run's `detector` field unless one is given ("color": the Shapes colour
detector; a folder: a zero-shot OWL-ViT / OWLv2 model); a detector that can measure none of the layouts'
phrases is an error before any sampling. Each test is saved under the run,
`runs/<run>/checkpoint_test/step_XXXXXXX/` (grid.png: the samples with the requested boxes drawn;
results.json: the numbers), and is reused when asked again with the same settings (layouts, detector,
sampling).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from adapterlib.training import worlds
from adapterlib.training.checkpoint import load_adapter, load_run_base
from adapterlib.model.detectors import Detector
from adapterlib.evaluation.evaluate import check_detector, check_measurable, images_for, run_detector, run_layouts
from adapterlib.analysis.figures import boxed_grid
from adapterlib.analysis.gates import gate_stats
from adapterlib.files import write_json
from adapterlib.runs import list_checkpoints, resolve_checkpoint, resolve_run
from adapterlib.model.sample import Sampling, generate

GATE_KEYS = ("gate_mean", "gate_max", "gate_raw_max")


def probe_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoint_test" / f"step_{step:07d}"


def cached_result(run_dir: Path, step: int, settings: dict) -> dict | None:
    """A saved test of this step with exactly these settings, else None."""
    path = probe_dir(run_dir, step) / "results.json"
    if not path.is_file() or not (path.parent / "grid.png").is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def checkpoint_test_setup(run_dir: Path, n: int, layouts: str | Path | None = None, detector: str | Path | None = None):
    """(layouts, detector spec) of a checkpoint test, checked before any sampling: the run's layouts (or
    `layouts`: v1, v2, crowds or a manifest path), at least n of them; the run's detector (or `detector`), able to
    measure some of their objects. The detector is loaded later, only when something is measured."""
    from adapterlib.evaluation.evaluate import named_layouts
    spec = run_detector(run_dir, detector)
    check_detector(spec, field="detector")
    chosen = named_layouts(layouts, n) if layouts not in (None, "") else run_layouts(run_dir, n)
    if len(chosen) < n:
        raise ValueError(f"n={n}: {run_dir.name} has only {len(chosen)} layouts ({chosen.source})")
    if spec == "color":                     # cheap, before any model loads; a zero-shot detector measures any phrase
        check_measurable(worlds.load_detector(spec), chosen)
    return chosen, spec


def _settings(n: int, layouts, spec: str, sampling: Sampling) -> dict:
    return dict(n=n, layouts=layouts.source, detector=spec, **sampling.key())


def probe_checkpoint(run_dir: str | Path, which: str | int = "latest", n: int = 10, *, base=None,
                     device: str | None = None, force: bool = False, layouts: str | Path | None = None,
                     detector: str | Path | Detector | None = None, **sampling) -> dict:
    """Test one checkpoint (`latest`, `final`, a step, or 0: the base alone): n samples at the run's first n
    layouts (`evaluate.run_layouts`; or `layouts`: v1, v2, crowds or a manifest path), their grid with the requested
    boxes, the gate statistics and the grounding summary by `detector` (None or "": the run's `detector`
    field; "color"; a zero-shot detector folder; or a loaded Detector). Writes grid.png and results.json
    under checkpoint_test/step_XXXXXXX/ and returns the results. Sampling settings (steps, guidance, scale,
    tau, grounding_guidance: `options.GROUNDING_GUIDANCE`) as keywords; a cached test is reused only for the same
    layouts, detector and settings."""
    run_dir = resolve_run(run_dir)
    # step 0 has no checkpoint: the zero-init adapter is the identity, so it is the base alone
    step, path = (0, None) if str(which) == "0" else resolve_checkpoint(run_dir, which)
    sampling = Sampling.of(**sampling)
    loaded = detector if isinstance(detector, Detector) else None
    chosen, spec = checkpoint_test_setup(run_dir, n, layouts, getattr(loaded, "spec", loaded.name) if loaded else detector)
    settings = _settings(n, chosen, spec, sampling)
    if not force and (saved := cached_result(run_dir, step, settings)) is not None:
        return saved
    loaded = loaded or worlds.load_detector(spec, device)        # a bad detector folder: before sampling
    records, seeds = chosen.records, chosen.seeds
    base = base if base is not None else load_run_base(run_dir, device)
    if path is None:
        images = images_for(chosen, reference="base", base=base, **sampling.key())
        gates = dict.fromkeys(GATE_KEYS, 0.0)
    else:
        adapter = load_adapter(path, base)
        try:
            images = generate(base, records, seeds, adapter=adapter, sampling=sampling)
            gates = gate_stats(adapter)
        finally:
            adapter.detach()                   # leave the (possibly shared) base as it was
    table, summary = worlds.measure(images, records, loaded)

    out = probe_dir(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    boxed_grid(images, records, ncols=min(n, 5)).save(out / "grid.png")
    per_image = table.groupby("record").success.mean() if len(table) else pd.Series(dtype=float)
    checkpoint = "none (step 0: zero-init adapter = the base alone)" if path is None else str(path.relative_to(run_dir))
    results = dict(run=run_dir.name, step=step, checkpoint=checkpoint, settings=settings,
                   seeds=seeds, layouts=[r.id for r in records], layouts_source=chosen.source,
                   held_out=chosen.held_out, detector=spec, grounding=summary,
                   gates={k: gates[k] for k in GATE_KEYS},
                   gates_per_layer={k: v for k, v in gates.items() if k not in GATE_KEYS},
                   success_per_image=[float(per_image.get(i, math.nan)) for i in range(n)],
                   grid=str((out / "grid.png").relative_to(run_dir)))
    write_json(out / "results.json", results)      # strict JSON, atomically: a reader never sees half a file
    return json.loads((out / "results.json").read_text())


def grounding_vs_step(run_dir: str | Path, n: int = 10, *, base=None, device: str | None = None,
                      force: bool = False, step0: bool = True, layouts: str | Path | None = None,
                      detector: str | Path | None = None, **sampling) -> pd.DataFrame:
    """The checkpoint test of every complete checkpoint (cached ones are read back, not redone):
    one row per step with the grounding summary and the gate statistics. With `step0`, a first row
    at step 0: the zero-init adapter, i.e. the base alone (where a run starts from). Layouts and
    detector as `probe_checkpoint` (None: the run's); the table's `attrs["title"]` names both."""
    run_dir = resolve_run(run_dir)
    chosen, spec = checkpoint_test_setup(run_dir, n, layouts, detector)
    wanted = _settings(n, chosen, spec, Sampling.of(**sampling))
    rows, loaded = [], None
    for step in [0] * step0 + [s for s, _ in list_checkpoints(run_dir)]:
        result = None if force else cached_result(run_dir, step, wanted)
        cached = result is not None
        if result is None:
            base = base if base is not None else load_run_base(run_dir, device)     # loaded once, when needed
            loaded = loaded or worlds.load_detector(spec, device)                  # the same: once
            result = probe_checkpoint(run_dir, step, n, base=base, force=force, layouts=layouts, detector=loaded,
                                      **sampling)
        rows.append(dict(step=step, **{k: result["grounding"].get(k) for k in ("success_rate", "miou", "o_miou",
                                                                                 "color_presence", "n_objects")},
                         **result["gates"], cached=cached))      # (a test saved before O-mIoU: None there)
    columns = ["step", "success_rate", "miou", "o_miou", "color_presence", "n_objects", *GATE_KEYS, "cached"]
    table = pd.DataFrame(rows, columns=columns)
    table.attrs["title"] = checkpoint_test_title(run_dir, chosen, spec)
    return table


def checkpoint_test_title(run_dir: Path, layouts, spec: str) -> str:
    """The title of a checkpoint-test table: the run, the layouts (marked when not held out), the detector."""
    detector = "the colour detector" if spec == "color" else f"detector {Path(spec).name}"
    return f"{Path(run_dir).name}: grounding on {layouts.title}, by {detector}"


def show_result(results: dict, run_dir: str | Path) -> str:
    """One line: step, grounding and gates of a checkpoint test."""
    g, gates = results["grounding"], results["gates"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    source = results.get("layouts_source", "")
    return (f"{Path(run_dir).name} step {results['step']}{f' on {source}' if source else ''}: success "
            f"{fmt(g['success_rate'])}, mIoU {fmt(g['miou'])}, O-mIoU {fmt(g.get('o_miou'))} "
            f"over {g['n_objects']} objects in {g['n_images']} samples; gate mean {gates['gate_mean']:.3f}, "
            f"max {gates['gate_max']:.3f}, raw max {gates['gate_raw_max']:.3f}")
