"""Headless entry point.

    python -m adapterlib evaluate --reference ground-truth     # the ceiling: rendered layouts
    python -m adapterlib evaluate --reference base             # the base alone (no adapter)
    python -m adapterlib evaluate --reference base --base /path/to/stable-diffusion --limit 20
    python -m adapterlib evaluate runs/<run> [--checkpoint latest|final|STEP] [--scale 1.0] [--tau 1.0]
    python -m adapterlib evaluate runs/<run> --checkpoint all   # grounding vs step (checkpoint tests)
    python -m adapterlib status runs/<run> [--json]             # where a run stands

For a run, the table shows ground truth, the base alone and the adapter side by side on the same
layouts and seeds; the JSON line is the adapter's (with the checkpoint's step).

`evaluate` prints a short table, then, as the LAST line of stdout, one JSON object
({"success_rate", "miou", "color_presence", "n_objects", "n_images", "reference", ...}) for scripts.
Progress and warnings go to stderr.

Seeds: held-out layout i is always sampled with seed i (its index in heldout.jsonl), everywhere in
the project, so the base and every adapter are compared on the same starting noise. For a user
manifest the seed is the record's "seed" field, or its index when it has none.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import evaluate, shapes
from .data import ManifestError, Record, read_manifest, resolve_image


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (FileNotFoundError, ManifestError, ValueError) as e:
        print(f"adapterlib {args.command_name}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapterlib", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    ev = commands.add_parser("evaluate", help="grounding summary on the held-out layouts (or a manifest)",
                             description="Grounding success rate, mIoU and colour presence on the shipped "
                                         "held-out layouts; the last line of stdout is a JSON object.")
    ev.set_defaults(command=_evaluate, command_name="evaluate")
    ev.add_argument("run", nargs="?", help="a run folder: evaluate its adapter (latest checkpoint by default)")
    ev.add_argument("--checkpoint", default="latest", help="latest | final | a step number | all (every checkpoint: grounding vs step, cached under checkpoint_test/)")
    ev.add_argument("--scale", type=float, default=1.0, help="injection scale over all gates (with a run)")
    ev.add_argument("--tau", type=float, default=1.0,
                    help="scheduled sampling: grounding on for the first tau of the steps (with a run)")
    ev.add_argument("--reference", choices=["ground-truth", "base"],
                    help="ground-truth: the rendered layouts (the ceiling); base: the base model alone")
    ev.add_argument("--base", default="shapes-tiny",
                    help="'shapes-tiny' (the shipped default) or a diffusers-style Stable Diffusion folder")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N layouts (default: all)")
    ev.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    ev.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    ev.add_argument("--manifest", type=Path, default=None,
                    help="evaluate on the layouts of this manifest (JSON Lines) instead of the held-out set")
    ev.add_argument("--device", default=None, help="torch device for sampling (default: cuda if available, else cpu)")

    st = commands.add_parser("status", help="where a run stands: step, loss, gates, speed, ETA, warnings",
                             description="Status of a run folder, while it trains or after (the seed plan's "
                                         "monitor_training.sh). With --json the last line is a JSON object.")
    st.set_defaults(command=_status, command_name="status")
    st.add_argument("run", help="a run folder, e.g. runs/<run_name>")
    st.add_argument("--json", action="store_true", help="also print the status as one JSON object on the last line")
    st.add_argument("--stalled-after", type=float, default=600.0, metavar="SECONDS",
                    help="call the run stalled when metrics.csv has not changed for this long (default 600)")
    return parser


def _status(args: argparse.Namespace) -> int:
    from .monitor import format_status, run_status
    from .paths import repo_path

    status = run_status(repo_path(args.run), stalled_after_s=args.stalled_after)
    print(format_status(status))
    if args.json:
        print(json.dumps(status), flush=True)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.run is not None:
        return _evaluate_run(args)
    if args.reference is None:
        print("adapterlib evaluate: error: give a run folder, --reference ground-truth or --reference base",
              file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a positive number of layouts")

    records, seeds = _layouts(args.manifest, args.limit)
    if args.reference == "ground-truth":
        name, extra = "ground truth", {}
        images = _ground_truth_images(records, args.manifest)
    else:
        name, extra = f"base ({args.base})", {"base": args.base, "steps": args.steps, "guidance": args.guidance}
        images = _sample_base(args, records, seeds)

    _, summary = evaluate.evaluate_grounding(images, records)
    print(evaluate.format_summary({name: summary}))
    layouts = "heldout" if args.manifest is None else str(args.manifest)
    result = {**summary, "reference": args.reference, "layouts": layouts, **extra}
    # strict JSON: NaN (no measurable object) becomes null
    result = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    print(json.dumps(result), flush=True)
    return 0


def _evaluate_run(args: argparse.Namespace) -> int:
    import torch

    from . import sample
    from .base import load_base
    from .checkpoint import load_adapter, resolve_checkpoint
    from .paths import repo_path

    run_dir = repo_path(args.run)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    if args.checkpoint == "all":
        return _evaluate_all_checkpoints(args, run_dir)
    step, path = resolve_checkpoint(run_dir, args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base(config["base_model"] if config["base_model"] == "shapes-tiny" else repo_path(config["base_model"]),
                     device=device)
    adapter = load_adapter(path, base)
    records, seeds = _layouts(args.manifest, args.limit)
    print(f"sampling {len(records)} layouts: base alone, then {run_dir.name} step {step} "
          f"(scale {args.scale}, tau {args.tau})", file=sys.stderr, flush=True)
    kw = dict(steps=args.steps, guidance=args.guidance)
    rows = {"ground truth": evaluate.evaluate_grounding(_ground_truth_images(records, args.manifest), records)[1],
            "base alone (scale 0)": evaluate.evaluate_grounding(sample.generate(base, records, seeds, **kw), records)[1]}
    images = sample.generate(base, records, seeds, adapter=adapter, scale=args.scale, tau=args.tau, **kw)
    rows[f"adapter step {step}"] = evaluate.evaluate_grounding(images, records)[1]
    print(evaluate.format_summary(rows))
    result = {**rows[f"adapter step {step}"], "run": str(run_dir), "step": step, "scale": args.scale, "tau": args.tau,
              "base_success_rate": rows["base alone (scale 0)"]["success_rate"],
              "ground_truth_success_rate": rows["ground truth"]["success_rate"]}
    print(json.dumps(result), flush=True)
    return 0


def _evaluate_all_checkpoints(args: argparse.Namespace, run_dir: Path) -> int:
    """The checkpoint test of every checkpoint (probe.grounding_vs_step; cached tests are reused):
    held-out layouts 0..N-1 (--limit, default 10) with seeds 0..N-1."""
    from .probe import grounding_vs_step

    if args.manifest is not None:
        raise ValueError("--checkpoint all tests the held-out layouts; --manifest is not supported with it")
    n = args.limit or 10
    print(f"checkpoint tests of {run_dir.name}: {n} held-out layouts per checkpoint", file=sys.stderr, flush=True)
    table = grounding_vs_step(run_dir, n, device=args.device, steps=args.steps, guidance=args.guidance,
                              scale=args.scale, tau=args.tau)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in table.drop(columns="cached").to_dict("records")]
    print(json.dumps({"run": str(run_dir), "n_layouts": n, "rows": rows}), flush=True)
    return 0


def _layouts(manifest: Path | None, limit: int | None) -> tuple[list[Record], list[int]]:
    """The records to evaluate and one sampling seed each (see the module docstring)."""
    if manifest is None:
        records = shapes.heldout_records(limit)
        return records, list(range(len(records)))
    records = read_manifest(manifest, require_image=False)[:limit]
    if not records:
        raise ValueError(f"{manifest}: no records")
    return records, [r.seed if r.seed is not None else i for i, r in enumerate(records)]


def _ground_truth_images(records: list[Record], manifest: Path | None) -> list[np.ndarray] | np.ndarray:
    """Held-out layouts are rendered from their seeds. A manifest record's image file is its ground
    truth; a record without an image is rendered from its Shapes seed."""
    if manifest is None:
        return shapes.heldout_images(records)
    from PIL import Image

    images = []
    for i, r in enumerate(records):
        if r.image is not None:
            images.append(np.asarray(Image.open(resolve_image(manifest, r)).convert("RGB")))
        elif r.seed is not None:
            images.append(shapes.heldout_images([r])[0])
        else:
            raise ValueError(f"{manifest} record {i} (id {r.id!r}): no image and no seed, "
                             "so there is no ground truth to measure")
    return images


def _sample_base(args: argparse.Namespace, records: list[Record], seeds: list[int]) -> np.ndarray:
    import torch  # only the base reference needs torch and diffusers

    from . import sample
    from .base import load_base

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base(args.base, device=device)
    print(f"sampling {len(records)} images from {base.path} on {device} "
          f"({args.steps} steps, guidance {args.guidance})", file=sys.stderr, flush=True)
    return sample.generate(base, records, seeds, steps=args.steps, guidance=args.guidance)


if __name__ == "__main__":
    sys.exit(main())
