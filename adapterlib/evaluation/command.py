"""The `evaluate` command's paths (`python -m adapterlib evaluate`, its flags in `adapterlib.__main__`): the
ceiling or the base alone on layouts (`--reference`), a run's checkpoint beside both, a diffusers GLIGEN folder
(`--gligen`), and every checkpoint of a run (`--checkpoint all`). Each prints its table, then as the LAST line of stdout
one JSON object (`print_json`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapterlib.evaluation import evaluate
from adapterlib.files import dumps
from adapterlib.paths import SHIPPED_BASES


def evaluate_command(args: argparse.Namespace) -> int:
    from adapterlib.evaluation.report import breakdowns
    from adapterlib.training.worlds import load_detector

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a positive number of layouts")
    if args.gligen is not None:
        return _evaluate_gligen(args)
    if args.run is not None:
        return _evaluate_run(args)
    if args.reference is None:
        print("adapterlib evaluate: error: give a run folder, --reference ground-truth or --reference base",
              file=sys.stderr)
        return 2
    if args.reference == "base":
        _check_real_base_is_measured(args, "--reference base")
    layouts = _layouts(args)
    if args.reference == "ground-truth" and not layouts.has_ground_truth:
        raise ValueError(f"--reference ground-truth: {layouts.source} has layouts without an image or a Shapes seed, "
                         "so there is no ground truth to measure")
    detector = load_detector(evaluate.detector_spec(args.detector), args.device)
    measure = dict(detector=detector, segmenter=_segmenter(args))
    ceiling = truth = None
    if layouts.has_ground_truth:
        ceiling, truth = evaluate.evaluate(layouts, reference="ground-truth", **measure)
    if args.reference == "ground-truth":
        name, extra, (table, summary) = "ground truth", {}, (ceiling, truth)
    else:
        name, extra = f"base ({args.base})", {"base": args.base, "steps": args.sampling_steps, "guidance": args.guidance}
        base = evaluate.load_base_for(args.base, args.device)
        print(f"sampling {len(layouts)} images from {base.path} on {base.device} "
              f"({args.sampling_steps} steps, guidance {args.guidance})", file=sys.stderr, flush=True)
        table, summary = evaluate.evaluate(layouts, reference="base", base=base, steps=args.sampling_steps,
                                           guidance=args.guidance, **measure)
    print(f"on {layouts.title}")
    print(evaluate.format_summary({name: summary}))
    fields, buckets = breakdowns(layouts, table, ceiling=ceiling, measured=name,
                                 buckets_title="the ceiling is the ground truth's", buckets_measured=name,
                                 base=evaluate.load_base_for(args.base, args.device),
                                 protocol_rows={**({} if truth is None or args.reference == "ground-truth"
                                                   else {"ground truth": truth}), name: summary}, sam=bool(args.sam))
    print_json({**summary, "reference": args.reference, "layouts": layouts.source,
                 "detector": evaluate.detector_spec(args.detector), **extra, **fields, "buckets": buckets})
    return 0


def _segmenter(args: argparse.Namespace):
    """The SAM segmenter of --sam (checked and loaded before any sampling), else None."""
    if getattr(args, "sam", None) is None:
        return None
    from adapterlib.model.segment import BoxSegmenter
    return BoxSegmenter(args.sam, device=args.device)


def _evaluate_run(args: argparse.Namespace) -> int:
    from adapterlib.evaluation.report import breakdowns
    from adapterlib.training.checkpoint import load_checkpoint
    from adapterlib.training.worlds import load_detector
    from adapterlib.runs import resolve_run

    run_dir = resolve_run(args.run)
    if args.checkpoint == "all":
        return _evaluate_all_checkpoints(args, run_dir)
    layouts = _layouts(args, run_dir)
    spec = evaluate.run_detector(run_dir, args.detector)
    detector = load_detector(spec, args.device)
    evaluate.check_measurable(detector, layouts)                 # before anything is sampled
    segmenter = _segmenter(args)
    ckpt = load_checkpoint(run_dir, args.checkpoint, device=args.device)
    print(f"sampling {len(layouts)} layouts ({layouts.source}): base alone (or its cached samples), then "
          f"{ckpt.name} (scale {args.scale}, tau {args.tau}, guidance {args.guidance}, grounding guidance "
          f"{args.grounding_guidance})", file=sys.stderr, flush=True)
    sampling = dict(steps=args.sampling_steps, guidance=args.guidance)
    measure = dict(detector=detector, segmenter=segmenter)
    ceiling, truth = (evaluate.evaluate(layouts, reference="ground-truth", **measure) if layouts.has_ground_truth
                      else (None, None))
    base_table, base_alone = evaluate.evaluate(layouts, reference="base", base=ckpt.base, **measure, **sampling)
    table, adapter = evaluate.evaluate(layouts, reference="adapter", base=ckpt.base, adapter=ckpt.adapter,
                                       scale=args.scale, tau=args.tau, grounding_guidance=args.grounding_guidance,
                                       **measure, **sampling)
    print(f"{run_dir.name} on {layouts.title}, by {detector.name}")
    rows = {**({"ground truth": truth} if truth is not None else {}), "base alone (scale 0)": base_alone,
            f"adapter step {ckpt.step}": adapter}
    print(evaluate.format_summary(rows))
    fields, buckets = breakdowns(layouts, table, ceiling=ceiling, base_table=base_table,
                                 buckets_title="ratio = adapter / ceiling", base=ckpt.base, protocol_rows=rows,
                                 sam=bool(args.sam))
    print_json({**adapter, "run": str(run_dir), "step": ckpt.step, "scale": args.scale, "tau": args.tau,
                 "guidance": args.guidance, "grounding_guidance": args.grounding_guidance,
                 "layouts": layouts.source, "held_out": layouts.held_out, "detector": spec, **fields,
                 "base_success_rate": base_alone["success_rate"],
                 "ground_truth_success_rate": truth["success_rate"] if truth is not None else None,
                 "ground_truth_o_miou": truth["o_miou"] if truth is not None else None,
                 "buckets": buckets})
    return 0


def _check_real_base_is_measured(args: argparse.Namespace, what: str) -> None:
    """A base other than the shipped shapes-tiny is measured on layouts and by a detector the user names: the defaults
    (the 32-px Shapes held-out layouts, the colour detector) measure nothing meaningful there. Before anything loads.
    (`--layouts v2 --detector color` given on purpose is allowed.)"""
    missing = [flag for flag, value in (("--layouts", args.layouts), ("--detector", args.detector)) if value is None]
    if args.base not in SHIPPED_BASES and missing:
        raise ValueError(f"{what} on --base {args.base} (not a shipped Shapes base: {', '.join(SHIPPED_BASES)}) "
                         f"needs {' and '.join(missing)}: "
                         "the defaults, the 32-px Shapes held-out layouts and the colour detector, measure nothing "
                         "meaningful on a real base. Give --layouts MANIFEST (e.g. an imported COCO val: "
                         "`python -m adapterlib import coco ... --out DIR`, DIR/data.jsonl) and --detector DIR (a local "
                         "OWL-ViT / OWLv2 folder); docs/guide/real-data.md")


def _evaluate_gligen(args: argparse.Namespace) -> int:
    """A diffusers GLIGEN folder's fusers and position net on --base, measured like a run's adapter."""
    from adapterlib.model.adapter import build_adapter
    from adapterlib.evaluation.report import breakdowns
    from adapterlib.training.worlds import load_detector
    from adapterlib.model.gligen import load_gligen_weights, read_gligen_folder

    if args.run is not None:
        raise ValueError("give a run or --gligen DIR, not both")
    _check_real_base_is_measured(args, "--gligen")
    read_gligen_folder(args.gligen)                      # a bad folder is an error before the base loads
    layouts = _layouts(args)
    detector = load_detector(args.detector or "", args.device)          # shapes-tiny: the colour detector unless given
    evaluate.check_measurable(detector, layouts)                        # before anything is sampled
    base = evaluate.load_base_for(args.base, args.device)
    adapter = load_gligen_weights(build_adapter(base, attention="gligen"), args.gligen)
    print(f"sampling {len(layouts)} layouts: base alone, then GLIGEN {args.gligen} (scale {args.scale}, tau {args.tau}, "
          f"guidance {args.guidance}, grounding guidance {args.grounding_guidance})", file=sys.stderr, flush=True)
    sampling = dict(steps=args.sampling_steps, guidance=args.guidance)
    ceiling, truth = evaluate.evaluate(layouts, reference="ground-truth", detector=detector)
    base_table, base_alone = evaluate.evaluate(layouts, reference="base", base=base, detector=detector, **sampling)
    table, measured = evaluate.evaluate(layouts, reference="adapter", base=base, adapter=adapter, detector=detector,
                                        scale=args.scale, tau=args.tau, grounding_guidance=args.grounding_guidance,
                                        **sampling)
    print(evaluate.format_summary({"ground truth": truth, "base alone (scale 0)": base_alone, "GLIGEN": measured}))
    fields, buckets = breakdowns(layouts, table, ceiling=ceiling, base_table=base_table, measured="GLIGEN",
                                 buckets_title="ratio = GLIGEN / ceiling")
    print_json({**measured, **fields, "gligen": str(args.gligen), "base": args.base, "scale": args.scale, "tau": args.tau,
                 "guidance": args.guidance, "grounding_guidance": args.grounding_guidance,
                 "layouts": layouts.source, "detector": args.detector or "color",
                 "base_success_rate": base_alone["success_rate"], "ground_truth_success_rate": truth["success_rate"],
                 "buckets": buckets})
    return 0


def print_json(result: dict) -> None:
    """The last line of stdout: strict JSON (NaN, when no object is measurable, becomes null)."""
    print(dumps(result), flush=True)


def _evaluate_all_checkpoints(args: argparse.Namespace, run_dir: Path) -> int:
    """The checkpoint test of every checkpoint (probe.grounding_vs_step; cached tests are reused):
    the run's first N layouts (--limit, default 10; `evaluate.run_layouts`, or --layouts), the same for every
    checkpoint, measured by the run's detector (or --detector)."""
    from adapterlib.evaluation.checkpoint_test import grounding_vs_step

    n = args.limit or 10
    print(f"checkpoint tests of {run_dir.name}: {n} layouts per checkpoint", file=sys.stderr, flush=True)
    table = grounding_vs_step(run_dir, n, device=args.device, layouts=args.layouts, detector=args.detector,
                              steps=args.sampling_steps, guidance=args.guidance, scale=args.scale, tau=args.tau,
                              grounding_guidance=args.grounding_guidance)
    print(table.attrs["title"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print_json({"run": str(run_dir), "n_layouts": n, "title": table.attrs["title"],
                 "rows": table.drop(columns="cached").to_dict("records")})
    return 0


def _layouts(args: argparse.Namespace, run_dir: Path | None = None) -> evaluate.Layouts:
    """The layouts asked for (a held-out set or a manifest), else the run's (`evaluate.run_layouts`), else the
    default preset's held-out set (`evaluate.default_layouts`: v2); one seed each (see the module docstring)."""
    if args.layouts is not None:
        return evaluate.named_layouts(args.layouts, args.limit)
    return evaluate.run_layouts(run_dir, args.limit) if run_dir is not None else evaluate.default_layouts(args.limit)
