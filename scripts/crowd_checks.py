"""Two checks behind docs/notes/crowds.md, on a trained run (its final adapter), with the colour detector:

    python scripts/crowd_checks.py edges RUN [--layouts v2]   # per visible object: found box against requested, px
    python scripts/crowd_checks.py sampler RUN                 # the crowds of 4-6 objects under sampler settings

`edges`: for every requested object nothing is in front of (the Shapes depth rule), the found box's edges minus the
requested box's in pixels (negative x0/y0, positive x1/y1: drawn too large), the width error, the centre's shift and
the mIoU, by object side; the objects hidden in part alone. `sampler`: success, mIoU, O-mIoU and the success of the
objects with 1/3 to 2/3 of their box hidden, sampled by default (25 DDIM steps, guidance 3, tau 1, scale 1) and with
one setting changed at a time: whether the failures are the adapter's or the sampler's.
"""
import argparse
import json

import numpy as np

from adapterlib.data.buckets import _factor_groups, object_factors
from adapterlib.evaluation import evaluate as ev
from adapterlib.training import worlds
from adapterlib.training.checkpoint import load_checkpoint

DEFAULT = dict(steps=25, guidance=3.0, scale=1.0, tau=1.0)
SETTINGS = {"default": {}, "grounding guidance null": {"grounding_guidance": "null"}, "guidance 5": {"guidance": 5.0},
            "guidance 1.5": {"guidance": 1.5}, "50 steps": {"steps": 50}, "tau 0.5": {"tau": 0.5},
            "scale 1.5": {"scale": 1.5}}


def edges(run: str, layouts_name: str, limit: int | None) -> None:
    layouts = ev.named_layouts(layouts_name, limit)
    ck = load_checkpoint(run, "final")
    side = 32                                                         # the Shapes world's image side, px
    factors = object_factors(layouts.records)
    for name, images in (("ground truth", layouts.ground_truth_images()),
                         ("adapter", ev.images_for(layouts, base=ck.base, adapter=ck.adapter, **DEFAULT))):
        table, summary = worlds.measure(images, layouts.records, "color")
        t = table.reset_index(drop=True).join(factors[["hidden"]])
        free = t[(t["hidden"] == 0) & t["found_box"].notna() & t["measurable"].astype(bool)]
        req, got = np.array(free["box"].tolist()) * side, np.array(free["found_box"].tolist()) * side
        d = got - req                                                # (n, 4) px: x0, y0, x1, y1
        width = (got[:, 2] - got[:, 0]) - (req[:, 2] - req[:, 0])
        shift = np.hypot((d[:, 0] + d[:, 2]) / 2, (d[:, 1] + d[:, 3]) / 2)
        print(f"{name}: success {summary['success_rate']:.3f}, mIoU {summary['miou']:.3f}, O-mIoU {summary['o_miou']:.3f}")
        print(f"  {len(free)} objects with nothing in front: mIoU {free['iou'].mean():.3f}; edges (x0, y0, x1, y1) "
              f"{np.round(d.mean(0), 2).tolist()} px, mean |edge| {np.abs(d).mean():.2f} px, width {width.mean():+.2f} px, "
              f"centre shift {shift.mean():.2f} px")
        length = req[:, 2] - req[:, 0]
        for lo, hi in ((0, 8), (8, 11), (11, side + 1)):
            m = (length >= lo) & (length < hi)
            if m.any():
                print(f"    side {lo}-{hi - 1} px: {m.sum()} objects, mIoU {free['iou'].to_numpy()[m].mean():.3f}, "
                      f"width {width[m].mean():+.2f} px, centre shift {shift[m].mean():.2f} px")
        hidden = t[t["hidden"] > 0]
        print(f"  {len(hidden)} objects hidden in part: success {hidden['success'].mean():.3f}, mIoU {hidden['iou'].mean():.3f}")


def sampler(run: str, limit: int | None) -> None:
    crowds = ev.named_layouts("crowds")
    keep = [i for i, r in enumerate(crowds.records) if len(r.objects) >= 4][:limit]
    layouts = ev.Layouts([crowds.records[i] for i in keep], [crowds.seeds[i] for i in keep], version=3)
    ck = load_checkpoint(run, "final")
    half = _factor_groups(object_factors(layouts.records))["hidden"].to_numpy() == "1/3 - 2/3"
    for name, change in SETTINGS.items():
        images = ev.images_for(layouts, base=ck.base, adapter=ck.adapter, **{**DEFAULT, **change})
        table, summary = worlds.measure(images, layouts.records, "color")
        print(json.dumps({"setting": name, "success": round(summary["success_rate"], 3),
                          "miou": round(summary["miou"], 3), "o_miou": round(summary["o_miou"], 3),
                          "half_hidden_success": round(float(table["success"].to_numpy(float)[half].mean()), 3)}),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("edges", "sampler"))
    parser.add_argument("run")
    parser.add_argument("--layouts", default="v2", help="edges: v1 | v2 | crowds (default v2)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N layouts (default: all)")
    args = parser.parse_args()
    edges(args.run, args.layouts, args.limit) if args.check == "edges" else sampler(args.run, args.limit)


if __name__ == "__main__":
    main()
