"""Grounding per bucket of layouts: how many objects a layout requests and whether any two of its
requested boxes intersect ("overlap"). A mean over all layouts hides where grounding fails: crowded
and overlapping layouts are the hard part, and even the ground truth (the ceiling) can fail there, as
an object hidden in part by another is found smaller than its requested (full) box.

A bucket is computed from a record's boxes alone, so it works on any manifest. The per-object tables
are those of `datasets.measure` (one row per requested object: `record`, the index of its record;
`success`; `iou`; `measurable`)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from adapterlib.data.manifest import Record

# Columns of a bucket report; the measured thing's are success_rate / miou, its ratio to the ceiling is
# ratio (success_rate / ceiling_success_rate).
REPORT_COLUMNS = ["objects", "overlap", "n_layouts", "n_objects", "success_rate", "miou", "ceiling_success_rate",
                  "ceiling_miou", "base_success_rate", "base_miou", "ratio"]
_TABLE_COLUMNS = ("record", "success", "iou")


def boxes_intersect(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two (x0, y0, x1, y1) boxes share an area (touching edges do not)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def bucket_of(record: Record) -> tuple[int, bool]:
    """(objects, overlap): the record's object count and whether any two of its requested boxes intersect."""
    boxes = [o.box for o in record.objects]
    overlap = any(boxes_intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    return len(boxes), overlap


def _per_bucket(buckets: list[tuple[int, bool]], table: pd.DataFrame, name: str) -> pd.DataFrame:
    """n_objects, success_rate, miou per (objects, overlap) of one per-object table (its measurable rows),
    given the bucket of each record."""
    missing = [c for c in _TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the {name} table lacks column(s) {missing}: give a per-object table of datasets.measure")
    rows = table[table["measurable"].astype(bool)] if "measurable" in table.columns else table
    index = rows["record"].to_numpy(int)
    bad = index[(index < 0) | (index >= len(buckets))]
    if len(bad):
        raise ValueError(f"the {name} table names record {int(bad[0])} but there are {len(buckets)} records: "
                         "give the records the table was measured on")
    frame = pd.DataFrame({"objects": [buckets[i][0] for i in index], "overlap": [buckets[i][1] for i in index],
                          "success": rows["success"].to_numpy(float), "iou": rows["iou"].to_numpy(float)})
    grouped = frame.groupby(["objects", "overlap"])
    return pd.DataFrame({"n_objects": grouped.size(), "success_rate": grouped["success"].mean(),
                         "miou": grouped["iou"].mean()})


def bucket_report(records: Sequence[Record], measured: pd.DataFrame, *, ceiling: pd.DataFrame,
                  base: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per bucket (objects, overlap), in that order: n_layouts, and n_objects / success_rate / miou of the
    `measured` per-object table (the adapter, or whatever is evaluated), success_rate / miou of the
    `ceiling` (the ground truth) and of the `base` alone (NaN when not given), and ratio = success_rate /
    ceiling_success_rate (NaN where the ceiling is 0). Every table is measured on `records`, in order."""
    if not len(records):
        return pd.DataFrame(columns=REPORT_COLUMNS)
    buckets = [bucket_of(r) for r in records]
    layouts = pd.DataFrame(buckets, columns=["objects", "overlap"])
    report = layouts.groupby(["objects", "overlap"]).size().rename("n_layouts").to_frame()
    report = report.join(_per_bucket(buckets, measured, "measured"))
    report = report.join(_per_bucket(buckets, ceiling, "ceiling")[["success_rate", "miou"]].add_prefix("ceiling_"))
    if base is not None:
        report = report.join(_per_bucket(buckets, base, "base")[["success_rate", "miou"]].add_prefix("base_"))
    report = report.reset_index().reindex(columns=REPORT_COLUMNS)
    report["n_objects"] = report["n_objects"].fillna(0).astype(int)
    report["ratio"] = report["success_rate"] / report["ceiling_success_rate"].where(report["ceiling_success_rate"] > 0)
    return report


def bucket_rows(report: pd.DataFrame) -> list[dict]:
    """The report as JSON-ready dicts (plain ints, bools and floats; NaN stays NaN), one per bucket."""
    rows = []
    for row in report.to_dict("records"):
        rows.append({k: (int(v) if k in ("objects", "n_layouts", "n_objects") else
                         bool(v) if k == "overlap" else float(v)) for k, v in row.items()})
    return rows


def format_buckets(report: pd.DataFrame, measured: str = "adapter") -> str:
    """The report as an aligned text table: objects, overlap, layouts, measured objects, then success
    (and mIoU) of the ceiling, the base and `measured`, and the ratio to the ceiling."""
    columns = {"objects": "objects", "overlap": "overlap", "n_layouts": "layouts", "n_objects": "n_objects",
               "ceiling_success_rate": "ceiling", "base_success_rate": "base", "success_rate": measured,
               "ratio": "ratio", "ceiling_miou": "ceiling mIoU", "base_miou": "base mIoU", "miou": f"{measured} mIoU"}
    shown = report[list(columns)].rename(columns=columns)
    if report["base_success_rate"].isna().all():
        shown = shown.drop(columns=["base", "base mIoU"])
    shown["overlap"] = shown["overlap"].map({True: "yes", False: "no"})
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")
