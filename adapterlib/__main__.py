"""Headless entry point.

    python -m adapterlib evaluate --reference ground-truth     # the ceiling: rendered layouts
    python -m adapterlib evaluate --reference base             # the base alone (no adapter)
    python -m adapterlib evaluate --reference base --base SD_DIR --layouts MANIFEST --detector OWL_DIR --limit 20
    python -m adapterlib evaluate runs/<run> [--checkpoint latest|final|STEP] [--scale 1.0] [--tau 1.0]
    python -m adapterlib evaluate runs/<run> --checkpoint all [--detector DIR]   # grounding vs step (checkpoint tests)
    python -m adapterlib evaluate runs/<run> --layouts data.jsonl --detector /path/to/owlv2   # real images
    (a run's own layouts and detector: its `heldout` and `detector` fields; docs/guide/real-data.md)
    python -m adapterlib status <run> [--json]                  # where a run stands
    python -m adapterlib train [--preset P] [--FIELD VALUE ...]   # train a new run (fields of TrainConfig)
    python -m adapterlib train --resume <run> [--steps N ...]     # continue a run (only free fields may change)
    accelerate launch --num_processes 8 -m adapterlib train ...   # on 8 GPUs: batch_size is the global batch
    python -m adapterlib import coco --instances FILE --images DIR [--captions FILE] [--map FILE] --out DIR
    python -m adapterlib import odvg --jsonl FILE --images DIR --out DIR   # -> DIR/data.jsonl (a manifest)
    python -m adapterlib evaluate --gligen GLIGEN_DIR --base SD_DIR --layouts M --detector D  # a diffusers GLIGEN folder
    python -m adapterlib export <run> [--checkpoint STEP] --out DIR [--measure N]   # weights, config, model card
    python -m adapterlib bench [--size tiny|sd15|sdxl|sd3|flux] [--device auto] [--batch 16] [--rounds 5] [--compile] [--blocks all,decoder]  # samples/s

A run is a name under the runs root ($ADAPTERLIB_RUNS, default runs/) or a path.

For a run, the table shows ground truth, the base alone and the adapter side by side on the same
layouts and seeds; the JSON line is the adapter's (with the checkpoint's step).

`evaluate` prints a short table, then, as the LAST line of stdout, one JSON object
({"success_rate", "miou", "ap50", "color_presence", "n_objects", "n_images", "reference", "detector", ...})
for scripts.
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

from adapterlib.evaluation import evaluate
from adapterlib.evaluation.command import evaluate_command, print_json
from adapterlib.training.config import BENCH_SIZES, FIELDS, PRESETS, RESUME_FREE, TrainConfig
from adapterlib.data.manifest import ManifestError
from adapterlib.paths import SHIPPED_BASES
from adapterlib.files import OutOfSpace, dumps, is_out_of_space, out_of_space
from adapterlib.options import GROUNDING_GUIDANCE
from adapterlib.training.lock import RunLocked


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _user_paths(args)
        return args.command(args)
    except (FileNotFoundError, FileExistsError, ManifestError, ValueError, TypeError, RunLocked) as e:
        print(f"adapterlib {args.command_name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:                  # a full disk: one line naming what was being written, no traceback
        if not is_out_of_space(e):
            raise
        print(f"adapterlib {args.command_name}: error: "
              f"{e if isinstance(e, OutOfSpace) else f'out of disk space: {e}'}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapterlib", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    ev = commands.add_parser("evaluate", help="grounding summary on the held-out layouts (or a manifest)",
                             description="Grounding success rate, mIoU and colour presence on the shipped "
                                         "held-out layouts; the last line of stdout is a JSON object.")
    ev.set_defaults(command=evaluate_command, command_name="evaluate")
    ev.add_argument("run", nargs="?", help="a run name or folder: evaluate its adapter (latest checkpoint by default)")
    ev.add_argument("--checkpoint", default="latest", help="latest | final | a step number | all (every checkpoint: "
                                                           "grounding vs step, cached under checkpoint_test/; with "
                                                           "--detector and --layouts too)")
    ev.add_argument("--scale", type=float, default=1.0, help="injection scale over all gates (with a run)")
    ev.add_argument("--tau", type=float, default=1.0,
                    help="scheduled sampling: grounding on for the first tau of the steps (with a run)")
    ev.add_argument("--reference", choices=["ground-truth", "base"],
                    help="ground-truth: the rendered layouts (the ceiling); base: the base model alone")
    ev.add_argument("--base", default="shapes-tiny",
                    help="'shapes-tiny' (the shipped default), 'shapes-dit' (the shipped tiny MM-DiT), 'shapes-flux' "
                         "(the shipped tiny FLUX) or a diffusers-style Stable Diffusion / SD3 / FLUX.1 folder")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N layouts (default: all)")
    ev.add_argument("--sampling-steps", type=int, default=25, metavar="N", help="DDIM sampling steps (default 25)")
    ev.add_argument("--steps", type=int, dest="sampling_steps", action=_Renamed, metavar="N",
                    note="--steps is --sampling-steps", help="the earlier name of --sampling-steps")
    ev.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    ev.add_argument("--grounding-guidance", choices=[*GROUNDING_GUIDANCE, "on"], default="base", action=_Renamed,
                    renamed={"on": "base"}, note="--grounding-guidance on is --grounding-guidance base",
                    help="what guidance's unconditional branch is (with a run or --gligen): base (default): the base "
                         "alone, so guidance strengthens the grounding with the caption; null: the adapter on null "
                         "objects (diffusers' StableDiffusionGLIGENPipeline); off: the same grounding, only the "
                         "caption is guided. on: the earlier name of base")
    ev.add_argument("--layouts", "--manifest", dest="layouts", default=None, metavar="v1|v2|crowds|MANIFEST",
                    help="the layouts: v1 (the 200 shipped held-out layouts), v2 (220 held-out layouts by object count "
                         "1-6 x overlap), crowds (240 held-out layouts placed at random: overlaps of any depth), a manifest (JSON Lines) path, or a COCO-MIG layout file (MIG-Bench's JSON, "
                         "measured also the MIG way: L2-L6, ISR, mIoU, image success; the Shapes one ships as "
                         "adapterlib/shapes/mig_shapes.json); default: a run's own layouts (its `heldout` "
                         "field; else the held-out set of its Shapes world: v2 for shapes-v2, v1 for shapes; else its "
                         "first training records, marked 'not held out'); with no run, v2 (the default preset's "
                         "held-out set, that of the default run and the README's ceiling)")
    ev.add_argument("--detector", default=None,
                    help="'color' (the Shapes colour detector) or a folder with a local OWL-ViT / OWLv2 or "
                         "GroundingDINO model (transformers format); default: a run's `detector` field, else 'color'")
    ev.add_argument("--sam", default=None, metavar="DIR",
                    help="a local SAM folder (transformers format): the COCO-MIG colour check reads the SAM mask "
                         "prompted with each layout box, as the benchmark does (default: the box's pixels)")
    ev.add_argument("--device", default=None, help="torch device for sampling (default: cuda if available, else cpu)")
    ev.add_argument("--gligen", default=None, metavar="DIR",
                    help="evaluate a diffusers GLIGEN folder (its fusers and position net) on --base, e.g. the released "
                         "GLIGEN on SD 1.4: --gligen gligen-1-4-generation-text-box --base stable-diffusion-v1-4 "
                         "--layouts MANIFEST --detector DIR (on a --base other than shapes-tiny both are required)")

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
                    help="continue this run from its latest checkpoint; only " + ", ".join(RESUME_FREE) + " may change")
    tr.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                    help="seconds between progress lines on stderr (default 30)")
    _field_flags(tr)
    ca = commands.add_parser("cache", help="encode a data set once (VAE latents, captions, phrases) for training",
                             description="Build (or check and complete) the encoding cache a training run with the "
                                         "same fields would use: VAE latent moments, caption and phrase embeddings, "
                                         "the empty caption, in safetensors shards under RUNS/_cache/. Training "
                                         "builds it on first use too; this command does it ahead, with a progress "
                                         "bar, and --verify re-checks every shard's SHA-256.")
    ca.set_defaults(command=_cache, command_name="cache")
    ca.add_argument("--preset", default=None, choices=list(PRESETS), help="the preset the fields start from")
    ca.add_argument("--base", dest="field_base_model", default=None, metavar="FOLDER",
                    help="the base model (same as --base_model)")
    ca.add_argument("--verify", action="store_true", help="check every shard's checksum; rebuild the damaged ones")
    _field_flags(ca, only=("base_model", "data", "n_train", "device", "mixed_precision", "crop", "max_objects",
                           "on_bad_record"))
    _import_parser(commands)
    _bench_parser(commands)
    _export_parser(commands)
    return parser


def _export_parser(commands) -> None:
    ex = commands.add_parser("export", help="a run's adapter as a self-describing folder (weights, config, model "
                                            "card; a gligen run also as diffusers' GLIGEN pipeline folder)",
                             description="Writes OUT/adapter.safetensors, OUT/adapter_config.json, OUT/README.md (a "
                                         "model card) and, for a gligen run on a latent base, OUT/diffusers/ (loads "
                                         "with StableDiffusionGLIGENPipeline.from_pretrained). adapterlib/interop/export.py")
    ex.set_defaults(command=_export, command_name="export")
    ex.add_argument("run", help="a run name or folder")
    ex.add_argument("--checkpoint", default="latest", help="latest | final | a step number")
    ex.add_argument("--out", required=True, type=Path, help="the folder to write (new, or empty)")
    ex.add_argument("--measure", type=int, default=0, metavar="N",
                    help="measure the grounding on the first N layouts now and write it into the card, as "
                         "`evaluate RUN --limit N` does: the run's own layouts (its `heldout` field, ...) by its own "
                         "detector (its `detector` field, else 'color'), unless --layouts / --detector say otherwise")
    ex.add_argument("--layouts", default=None, metavar="v1|v2|crowds|MANIFEST",
                    help="with --measure: these layouts instead of the run's own (as evaluate's --layouts)")
    ex.add_argument("--detector", default=None,
                    help="with --measure: 'color' or a local OWL-ViT / OWLv2 folder instead of the run's detector")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--device", default="auto",
                    help="torch device for loading (and --measure): auto (cuda if available, else cpu; the default), "
                         "cpu, cuda or cuda:N")


def _export(args: argparse.Namespace) -> int:
    from adapterlib.interop.export import export

    if (args.layouts is not None or args.detector is not None) and args.measure <= 0:
        raise ValueError("--layouts / --detector choose what --measure N measures: give --measure N too")
    with out_of_space("the export folder", args.out):
        written = export(args.run, args.out, checkpoint=args.checkpoint, measure=args.measure, device=args.device,
                         overwrite=args.overwrite, layouts=args.layouts, detector=args.detector)
    print_json(written)
    return 0


def _field_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """A `--FIELD VALUE` flag (also `--FIELD-NAME`) for each TrainConfig field (or those in `only`)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset" or (only is not None and f.name not in only):
            continue
        kind = hints[f.name]
        parser.add_argument(f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []),
                            dest=f"field_{f.name}", default=None, metavar=kind.__name__.upper(),
                            type=_parse_bool if kind is bool else kind,
                            help=(_preset_defaults(f.name) + (_RELATIVE if f"field_{f.name}" in _PATH_FLAGS else "")
                                  ).replace("%", "%%"))


def _preset_defaults(name: str) -> str:
    """A field flag's help: its value in each user preset, presets with the same value named together, e.g.
    "default: the preset's: shapes 'layered'; sd15, sdxl 'box'" ("" where shapes has a value: none, give one)."""
    from adapterlib.training.config import USER_PRESETS, preset_value

    groups: dict[str, list[str]] = {}
    for preset in USER_PRESETS:
        value = preset_value(preset, name)
        shown = "'' (none: give one)" if value == "" and preset_value("shapes", name) != "" else repr(value)
        groups.setdefault(shown, []).append(preset)
    return "default: the preset's: " + "; ".join(f"{', '.join(presets)} {shown}" for shown, presets in groups.items())


def _given_fields(args: argparse.Namespace) -> dict:
    return {name: getattr(args, f"field_{name}") for name in FIELDS
            if getattr(args, f"field_{name}", None) is not None}


# The flags that take a path (or a name: shapes-tiny, shapes-v2, v1, v2, color) and those that take a run (a name
# under the runs root, or a path when it has a separator)
_PATH_FLAGS = ("layouts", "detector", "base", "gligen", "field_base_model", "field_data", "field_heldout",
               "field_detector", "field_init_from")
_RUN_FLAGS = ("run", "resume", "field_run_name")
_RELATIVE = "; a relative path is the working directory's (else the repository root's, where only it has one)"


def _user_paths(args: argparse.Namespace) -> None:
    """Relative paths on the command line are the working directory's (`paths.user_path`; one that exists only
    under the repository root is found there), made absolute here, so that `import coco --out data/coco` and
    `train --data data/coco/data.jsonl` run from the same directory meet, and a run's config names the file."""
    from adapterlib.paths import user_path

    for dest in (*_PATH_FLAGS, *_RUN_FLAGS):
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        path_like = "/" in value or "\\" in value or value.startswith(("~", "."))
        if dest in _RUN_FLAGS:
            if path_like:                                       # a plain name is a run under the runs root
                setattr(args, dest, str(user_path(value)))
            continue
        if not path_like and "." not in value:                  # a name, unless the working directory has it
            if not (Path.cwd() / value).exists() or _named(dest, value):
                continue
        setattr(args, dest, str(user_path(value)))


def _named(dest: str, value: str) -> bool:
    """`value` is one of the names the flag takes (never a path, even where a folder of that name exists)."""
    if value in ("color", *SHIPPED_BASES) or value in evaluate.HELDOUT_SETS:
        return True
    if dest == "field_data":
        from adapterlib.training.worlds import is_shapes
        return is_shapes(value)
    return False


def _import_parser(commands) -> None:
    from adapterlib.options import MAX_OBJECTS

    im = commands.add_parser("import", help="import COCO or ODVG into a manifest (OUT/data.jsonl)",
                             description="Write OUT/data.jsonl in the manifest format from a COCO or ODVG data set "
                                         "(image paths relative to OUT; nothing is copied). Prints a summary table "
                                         "and, as the last line, a JSON object.")
    kinds = im.add_subparsers(required=True, metavar="FORMAT")

    def common(p):
        p.add_argument("--images", type=Path, required=True, help="the folder the source's file names are in")
        p.add_argument("--out", type=Path, required=True,
                       help="the folder to write data.jsonl to (a relative path is the working directory's, where "
                            "`train --data OUT/data.jsonl` run from the same directory reads it)")
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

    def kind(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = kinds.add_parser(name, help=help, description=description)
        p.set_defaults(command=_import, command_name=f"import {name}")
        common(p)
        return p

    coco = kind("coco", "COCO instances (+ captions) JSON",
                "COCO instances -> manifest: phrases are category names, boxes xywh pixels -> normalised xyxy; "
                "crowd, degenerate and outside boxes dropped (counted), partial ones clipped.")
    coco.add_argument("--instances", type=Path, required=True, help="instances_*.json")
    coco.add_argument("--captions", type=Path, default=None, help="captions_*.json (default: empty captions)")
    coco.add_argument("--caption-mode", choices=["first", "all"], default="first",
                      help="first: one record per image with its first caption (default); all: one record per "
                           "(image, caption) pair")
    coco.add_argument("--map", type=Path, default=None, metavar="FILE",
                      help='a JSON object {"category name": "phrase"} renaming categories (an unknown name is an error)')
    coco.add_argument("--keep-crowd", action="store_true", help="keep crowd boxes (iscrowd=1; default: dropped)")
    odvg = kind("odvg", "ODVG JSON Lines (grounding or detection records)",
                "ODVG -> manifest: a grounding line gives its caption and a phrase per region box; a detection "
                "line an empty caption and its categories. Boxes are pixel xyxy.")
    odvg.add_argument("--jsonl", type=Path, required=True, help="the ODVG file, one JSON record a line")


def _import(args: argparse.Namespace) -> int:
    from adapterlib.data import importers

    shared = dict(max_objects=args.max_objects, drop_empty=args.drop_empty, skip_bad=args.skip_bad,
                  check_sizes=args.check_sizes, overwrite=args.overwrite)
    if args.command_name == "import coco":
        summary = importers.import_coco(args.instances, args.images, args.out, captions=args.captions,
                                        caption_mode=args.caption_mode, name_map=args.map,
                                        keep_crowd=args.keep_crowd, **shared)
    else:
        summary = importers.import_odvg(args.jsonl, args.images, args.out, **shared)
    importers.report(summary, print_json)
    return 0


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: give true or false")


def _train(args: argparse.Namespace) -> int:
    from adapterlib.training.config import make_config
    from adapterlib.training.train import resume_config, train

    fields = _given_fields(args)
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


def _cache(args: argparse.Namespace) -> int:
    import json

    from adapterlib.training import worlds
    from adapterlib.model.base import load_base
    from adapterlib.training.config import make_config
    from adapterlib.training.cache import build_cache
    from adapterlib.model.precision import precision_policy, resolve_device
    from adapterlib.runs import runs_root

    cfg = make_config(args.preset or "", **_given_fields(args))
    device = resolve_device(cfg.device)
    compute_dtype = precision_policy(device, cfg.mixed_precision)[0]
    base = load_base(cfg.base_model, device=device, dtype=compute_dtype)
    manifest = worlds.training_manifest(cfg.data, cfg.n_train, runs_root())
    folder = build_cache(base, manifest, runs_root(), crop=cfg.crop, dtype=str(compute_dtype).removeprefix("torch."),
                         max_objects=cfg.max_objects, on_bad_record=cfg.on_bad_record, verify=args.verify)
    meta = json.loads((folder / "meta.json").read_text())
    size = sum(s["bytes"] for s in meta["shards"])
    print(f"cache {folder}: {meta['records']} records, {meta['images']} images ({meta['latent']}), "
          f"{meta['captions']} captions, {meta['phrases']} phrases, {len(meta['shards'])} files, {size / 2**20:.1f} MiB")
    print_json(dict(folder=str(folder), records=meta["records"], images=meta["images"], captions=meta["captions"],
                     phrases=meta["phrases"], bytes=size, skipped=len(meta["skipped"])))
    return 0


def _status(args: argparse.Namespace) -> int:
    from adapterlib.notebook.monitor import format_status, run_status
    from adapterlib.runs import resolve_run

    status = run_status(resolve_run(args.run), stalled_after_s=args.stalled_after)
    print(format_status(status))
    if args.json:
        print(dumps(status), flush=True)
    return 0


class _Renamed(argparse.Action):
    """An earlier spelling that still works: an option's earlier name (`renamed` None), or earlier values of an option
    (`renamed`: earlier value -> today's). Stored as today's, with a one-line note on stderr when used."""

    def __init__(self, option_strings, dest, *, note: str, renamed: dict | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.note, self.renamed = note, renamed

    def __call__(self, parser, namespace, values, option_string=None):
        if self.renamed is None or values in self.renamed:
            print(f"adapterlib {parser.prog.split()[-1]}: {self.note}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, (self.renamed or {}).get(values, values))


def _bench_parser(commands) -> None:
    be = commands.add_parser("bench", help="training-step throughput: ours, diffusers' GLIGEN, the frozen network",
                             description="Times a full adapter training step (forward, backward, AdamW) for every "
                                         "adapter variant, diffusers' GLIGEN on the same base (UNet sizes) and the "
                                         "frozen UNet or MM-DiT alone, in one process, interleaved rounds "
                                         "(adapterlib/evaluation/bench.py). Prints a table and, as the last line, a "
                                         "JSON object.")
    be.set_defaults(command=_bench, command_name="bench")
    be.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    be.add_argument("--size", choices=tuple(BENCH_SIZES), default="tiny",
                    help="tiny: the shipped base, 32x32 pixels; sd15: a random-weight SD 1.5-size UNet, 64x64 latents; "
                         "sdxl: a random-weight SDXL-size UNet, 128x128 latents (about 10 GB in fp32 and as much "
                         "again for the peer: a GPU); sd3: a random-weight SD3-medium MM-DiT, 128x128 16-channel "
                         "latents, 77 + 256 context tokens (about 8 GB in fp32; no GLIGEN peer: GLIGEN is a UNet's); "
                         "flux: a random-weight FLUX.1-dev transformer, 128x128 16-channel latents packed 2x2, 512 T5 "
                         "tokens (48 GB in fp32: on the CPU 1 double + 2 single of its 19 + 38 blocks at 32x32 "
                         "unless --depth / --side say otherwise; no GLIGEN peer)")
    be.add_argument("--batch", type=int, default=16, help="samples a step (default 16)")
    be.add_argument("--objects", type=int, default=None,
                    help="grounding slots a sample (default: tiny 3, all present; sd15, sdxl, sd3 and flux 30, ~30%% "
                         "present)")
    be.add_argument("--rounds", type=int, default=5, help="interleaved rounds; a row's number is the median (default 5)")
    be.add_argument("--steps-per-round", type=int, default=10, metavar="N",
                    help="timed training steps of each row in a round (default 10)")
    be.add_argument("--steps", type=int, dest="steps_per_round", action=_Renamed, metavar="N",
                    note="--steps is --steps-per-round", help="the earlier name of --steps-per-round")
    be.add_argument("--warmup", type=int, default=2, help="untimed steps of each row first (default 2)")
    be.add_argument("--variants", default=None, metavar="LIST",
                    help="our variants, e.g. masked+ff,self (default: masked, self, cross, with and without FF, and "
                         "gligen, a UNet's only; masked+ff, the config's default, is always measured)")
    be.add_argument("--blocks", default=None, metavar="LIST",
                    help="block choices of our rows, e.g. all,decoder,low,migc on a UNet, all,first-half,middle,"
                         "last-half on sd3, also double,single on flux (every variant at each; a list of blocks "
                         "joined by +: mid_block+up_blocks.1). Default: the preset's for the size (tiny: shapes, "
                         "sd15: sd15, sdxl: sdxl, sd3: sd3, flux: flux), always measured; it is the JSON's ours_*")
    be.add_argument("--ff-mult", default=None, metavar="LIST",
                    help="feed-forward widths of our rows with FF, e.g. 4,2 (each at every block choice). Default: "
                         "the preset's adapter_ff_mult for the size, always measured")
    be.add_argument("--side", type=int, default=None, metavar="N",
                    help="sd15 / sdxl / sd3 / flux: the latents' side instead of the base's own (64 / 128 / 128 / "
                         "128); e.g. sdxl --side 64 (512 px) where a 1024-px step does not fit in memory, sd3 --side "
                         "32 (256 px) on a CPU (flux on a CPU: 32 unless given)")
    be.add_argument("--depth", type=int, default=None, metavar="N",
                    help="sd3: N joint blocks instead of SD3-medium's 24; flux: N double- and 2N single-stream blocks "
                         "instead of FLUX.1-dev's 19 + 38 (on a CPU: 1 unless given). Every other setting the real "
                         "network's; the output says so above the table")
    be.add_argument("--compile", action="store_true",
                    help="also every row torch.compile'd (n/a with the reason when it fails)")
    be.add_argument("--train-step", action="store_true",
                    help="also the training loop's per-step work with the text encoder (size tiny)")


def _bench(args: argparse.Namespace) -> int:
    from adapterlib.evaluation.bench import VARIANTS, format_table, parse_blocks, parse_ff_mults, parse_variants, run_bench

    result = run_bench(args.size, device=args.device, batch=args.batch, objects=args.objects, rounds=args.rounds,
                       steps_per_round=args.steps_per_round, warmup=args.warmup, compile=args.compile,
                       variants=VARIANTS if args.variants is None else parse_variants(args.variants),
                       blocks=None if args.blocks is None else parse_blocks(args.blocks),
                       ff_mults=None if args.ff_mult is None else parse_ff_mults(args.ff_mult),
                       with_train_step=args.train_step, side=args.side, depth=args.depth)
    print(f"{result['size']} (latents {result['side']}x{result['side']}) on {result['device_name']} ({result['threads']} threads), torch {result['torch']}, "
          f"batch {result['batch']}, {result['objects']} slots ({result['objects_present']} objects in the batch), "
          f"median of {result['rounds']} rounds x {result['steps_per_round']} steps")
    for note in (result["size_note"], result["peer_note"]):
        if note:
            print(note)
    print(format_table(result))
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
