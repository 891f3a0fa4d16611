"""Headless entry point.

    python -m adapterlib evaluate --reference ground-truth     # the ceiling: rendered layouts
    python -m adapterlib evaluate --reference base             # the base alone (no adapter)
    python -m adapterlib evaluate --reference base --base /path/to/stable-diffusion --limit 20
    python -m adapterlib evaluate runs/<run> [--checkpoint latest|final|STEP] [--scale 1.0] [--tau 1.0]
    python -m adapterlib evaluate runs/<run> --checkpoint all   # grounding vs step (checkpoint tests)
    python -m adapterlib status <run> [--json]                  # where a run stands
    python -m adapterlib train [--preset P] [--FIELD VALUE ...]   # train a new run (fields of TrainConfig)
    python -m adapterlib train --resume <run> [--steps N ...]     # continue a run (only free fields may change)
    python -m adapterlib import coco --instances FILE --images DIR [--captions FILE] [--map FILE] --out DIR
    python -m adapterlib import odvg --jsonl FILE --images DIR --out DIR   # -> DIR/data.jsonl (a manifest)
    python -m adapterlib bench [--size tiny|sd15] [--device auto] [--batch 16] [--rounds 5] [--compile]  # samples/s

A run is a name under the runs root ($ADAPTERLIB_RUNS, default runs/) or a path.

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
import dataclasses
import sys
import typing
from pathlib import Path

from . import evaluate
from .config import FIELDS, PRESETS, TrainConfig
from .data import ManifestError
from .jsonio import dumps


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (FileNotFoundError, FileExistsError, ManifestError, ValueError, TypeError) as e:
        print(f"adapterlib {args.command_name}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapterlib", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    ev = commands.add_parser("evaluate", help="grounding summary on the held-out layouts (or a manifest)",
                             description="Grounding success rate, mIoU and colour presence on the shipped "
                                         "held-out layouts; the last line of stdout is a JSON object.")
    ev.set_defaults(command=_evaluate, command_name="evaluate")
    ev.add_argument("run", nargs="?", help="a run name or folder: evaluate its adapter (latest checkpoint by default)")
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
                             description="Status of a run folder, while it trains or after (the training plan's "
                                         "monitor_training.sh). With --json the last line is a JSON object.")
    st.set_defaults(command=_status, command_name="status")
    st.add_argument("run", help="a run name (under the runs root) or a run folder")
    st.add_argument("--json", action="store_true", help="also print the status as one JSON object on the last line")
    st.add_argument("--stalled-after", type=float, default=600.0, metavar="SECONDS",
                    help="call the run stalled when metrics.csv has not changed for this long (default 600)")

    tr = commands.add_parser("train", help="train a spatial adapter headless (a new run, or --resume one)",
                             description="Train a new run from a preset and field values, or resume one. Every "
                                         "field of TrainConfig is a flag; the run folder is the same as the "
                                         "notebooks'. Progress lines go to stderr at least every 30 s.")
    tr.set_defaults(command=_train, command_name="train")
    tr.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="the preset the fields start from (default: shapes)")
    tr.add_argument("--resume", metavar="RUN", default=None,
                    help="continue this run from its latest checkpoint; only steps, save_every, log_every, "
                         "n_samples, device, mixed_precision, keep_last and max_nonfinite_steps may change")
    tr.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                    help="seconds between progress lines on stderr (default 30)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        kind = hints[f.name]
        tr.add_argument(f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []),
                        dest=f"field_{f.name}", default=None, metavar=kind.__name__.upper(),
                        type=_parse_bool if kind is bool else kind, help=f"default: the preset's ({f.default!r} in shapes)")
    _import_parser(commands)
    _bench_parser(commands)
    return parser


def _import_parser(commands) -> None:
    from .data import MAX_OBJECTS

    im = commands.add_parser("import", help="import COCO or ODVG into a manifest (OUT/data.jsonl)",
                             description="Write OUT/data.jsonl in the manifest format from a COCO or ODVG data set "
                                         "(image paths relative to OUT; nothing is copied). Prints a summary table "
                                         "and, as the last line, a JSON object.")
    kinds = im.add_subparsers(required=True, metavar="FORMAT")

    def common(p):
        p.add_argument("--images", type=Path, required=True, help="the folder the source's file names are in")
        p.add_argument("--out", type=Path, required=True, help="the folder to write data.jsonl to")
        p.add_argument("--max-objects", type=int, default=MAX_OBJECTS, metavar="N",
                       help=f"the object limit (TrainConfig.max_objects; default {MAX_OBJECTS}): beyond it the "
                            f"largest boxes are kept")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip a malformed source record (counted) instead of stopping with an error")
        p.add_argument("--drop-empty", action="store_true",
                       help="leave out images with no kept object (default: keep them, with no objects)")
        p.add_argument("--no-check-sizes", dest="check_sizes", action="store_false",
                       help="do not compare each image's size (its header) with the record's width and height")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/data.jsonl")

    coco = kinds.add_parser("coco", help="COCO instances (+ captions) JSON",
                            description="COCO instances -> manifest: phrases are category names, boxes xywh "
                                        "pixels -> normalised xyxy; crowd, degenerate and outside boxes dropped "
                                        "(counted), partial ones clipped.")
    coco.set_defaults(command=_import, command_name="import coco")
    coco.add_argument("--instances", type=Path, required=True, help="instances_*.json")
    coco.add_argument("--captions", type=Path, default=None, help="captions_*.json (default: empty captions)")
    coco.add_argument("--caption-mode", choices=["first", "all"], default="first",
                      help="first: one record per image with its first caption (default); all: one record per "
                           "(image, caption) pair")
    coco.add_argument("--map", type=Path, default=None, metavar="FILE",
                      help='a JSON object {"category name": "phrase"} renaming categories (an unknown name is an error)')
    coco.add_argument("--keep-crowd", action="store_true", help="keep crowd boxes (iscrowd=1; default: dropped)")
    common(coco)

    odvg = kinds.add_parser("odvg", help="ODVG JSON Lines (grounding or detection records)",
                            description="ODVG -> manifest: a grounding line gives its caption and a phrase per "
                                        "region box; a detection line an empty caption and its categories. "
                                        "Boxes are pixel xyxy.")
    odvg.set_defaults(command=_import, command_name="import odvg")
    odvg.add_argument("--jsonl", type=Path, required=True, help="the ODVG file, one JSON record a line")
    common(odvg)


def _import(args: argparse.Namespace) -> int:
    from . import importers

    shared = dict(max_objects=args.max_objects, drop_empty=args.drop_empty, skip_bad=args.skip_bad,
                  check_sizes=args.check_sizes, overwrite=args.overwrite)
    if args.command_name == "import coco":
        summary = importers.import_coco(args.instances, args.images, args.out, captions=args.captions,
                                        caption_mode=args.caption_mode, name_map=args.map,
                                        keep_crowd=args.keep_crowd, **shared)
    else:
        summary = importers.import_odvg(args.jsonl, args.images, args.out, **shared)
    importers.report(summary, _print_json)
    return 0


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: give true or false")


def _train(args: argparse.Namespace) -> int:
    from .config import make_config
    from .train import resume_config, train

    fields = {name: getattr(args, f"field_{name}") for name in FIELDS if name != "preset"}
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.resume is not None:
        if args.preset is not None:
            raise ValueError("--preset with --resume: a resumed run keeps its preset")
        if "run_name" in fields:
            raise ValueError("--run_name with --resume: give the run to resume as --resume RUN")
        cfg = resume_config(args.resume, **fields)
    else:
        cfg = make_config(args.preset or "", **fields)
    run = train(cfg, resume=args.resume is not None, progress=False, progress_every_s=args.progress_every)
    print(f"run folder: {run}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .monitor import format_status, run_status
    from .runs import resolve_run

    status = run_status(resolve_run(args.run), stalled_after_s=args.stalled_after)
    print(format_status(status))
    if args.json:
        print(dumps(status), flush=True)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a positive number of layouts")
    if args.run is not None:
        return _evaluate_run(args)
    if args.reference is None:
        print("adapterlib evaluate: error: give a run folder, --reference ground-truth or --reference base",
              file=sys.stderr)
        return 2
    layouts = _layouts(args)
    if args.reference == "ground-truth":
        name, extra = "ground truth", {}
        _, summary = evaluate.evaluate(layouts, reference="ground-truth")
    else:
        name, extra = f"base ({args.base})", {"base": args.base, "steps": args.steps, "guidance": args.guidance}
        base = evaluate.load_base_for(args.base, args.device)
        print(f"sampling {len(layouts)} images from {base.path} on {base.device} "
              f"({args.steps} steps, guidance {args.guidance})", file=sys.stderr, flush=True)
        _, summary = evaluate.evaluate(layouts, reference="base", base=base, steps=args.steps, guidance=args.guidance)
    print(evaluate.format_summary({name: summary}))
    _print_json({**summary, "reference": args.reference, "layouts": layouts.source, **extra})
    return 0


def _evaluate_run(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .runs import resolve_run

    run_dir = resolve_run(args.run)
    if args.checkpoint == "all":
        return _evaluate_all_checkpoints(args, run_dir)
    ckpt = load_checkpoint(run_dir, args.checkpoint, device=args.device)
    layouts = _layouts(args)
    print(f"sampling {len(layouts)} layouts: base alone, then {ckpt.name} (scale {args.scale}, tau {args.tau})",
          file=sys.stderr, flush=True)
    table = evaluate.compare(layouts, ckpt.base, ckpt.adapter, scales=[args.scale], taus=[args.tau],
                             steps=args.steps, guidance=args.guidance)
    rows = {"ground truth": 0, "base alone (scale 0)": 1, f"adapter step {ckpt.step}": 2}
    rows = {name: table.iloc[i][list(evaluate.SUMMARY_KEYS)].to_dict() for name, i in rows.items()}
    print(evaluate.format_summary(rows))
    _print_json({**rows[f"adapter step {ckpt.step}"], "run": str(run_dir), "step": ckpt.step, "scale": args.scale,
                 "tau": args.tau, "base_success_rate": rows["base alone (scale 0)"]["success_rate"],
                 "ground_truth_success_rate": rows["ground truth"]["success_rate"]})
    return 0


def _print_json(result: dict) -> None:
    """The last line of stdout: strict JSON (NaN, when no object is measurable, becomes null)."""
    print(dumps(result), flush=True)


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
    _print_json({"run": str(run_dir), "n_layouts": n, "rows": table.drop(columns="cached").to_dict("records")})
    return 0


def _layouts(args: argparse.Namespace) -> evaluate.Layouts:
    """The held-out layouts, or a manifest's, with one seed each (see the module docstring)."""
    if args.manifest is None:
        return evaluate.heldout_layouts(args.limit)
    return evaluate.manifest_layouts(args.manifest, args.limit)


def _bench_parser(commands) -> None:
    from .bench import SIZES

    be = commands.add_parser("bench", help="training-step throughput: ours, diffusers' GLIGEN, the frozen UNet",
                             description="Times a full adapter training step (forward, backward, AdamW) for every "
                                         "adapter variant, diffusers' GLIGEN on the same base and the frozen UNet "
                                         "alone, in one process, interleaved rounds (adapterlib/bench.py). Prints "
                                         "a table and, as the last line, a JSON object.")
    be.set_defaults(command=_bench, command_name="bench")
    be.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    be.add_argument("--size", choices=SIZES, default="tiny",
                    help="tiny: the shipped base, 32x32 pixels; sd15: a random-weight SD 1.5-size UNet, 64x64 latents")
    be.add_argument("--batch", type=int, default=16, help="samples a step (default 16)")
    be.add_argument("--objects", type=int, default=None,
                    help="grounding slots a sample (default: tiny 3, all present; sd15 30, ~30%% present)")
    be.add_argument("--rounds", type=int, default=5, help="interleaved rounds; a row's number is the median (default 5)")
    be.add_argument("--steps", type=int, default=10, help="steps of each row in a round (default 10)")
    be.add_argument("--warmup", type=int, default=2, help="untimed steps of each row first (default 2)")
    be.add_argument("--variants", default=None, metavar="LIST",
                    help="our variants, e.g. masked+ff,self (default: masked, self, cross, with and without FF; "
                         "masked+ff, the config's default, is always measured)")
    be.add_argument("--compile", action="store_true",
                    help="also every row torch.compile'd (n/a with the reason when it fails)")
    be.add_argument("--train-step", action="store_true",
                    help="also the training loop's per-step work with the text encoder (size tiny)")


def _bench(args: argparse.Namespace) -> int:
    from .bench import VARIANTS, format_table, parse_variants, run_bench

    result = run_bench(args.size, device=args.device, batch=args.batch, objects=args.objects, rounds=args.rounds,
                       steps_per_round=args.steps, warmup=args.warmup, compile=args.compile,
                       variants=VARIANTS if args.variants is None else parse_variants(args.variants),
                       with_train_step=args.train_step)
    print(f"{result['size']} on {result['device_name']} ({result['threads']} threads), torch {result['torch']}, "
          f"batch {result['batch']}, {result['objects']} slots ({result['objects_present']} objects in the batch), "
          f"median of {result['rounds']} rounds x {result['steps_per_round']} steps")
    print(format_table(result))
    _print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
