"""Grounding per bucket of layouts: how many objects a layout requests and whether any two of its
requested boxes intersect ("overlap"); also by how deep the deepest overlap goes (`depth_of`), and per requested
object by what may hide it (`object_factors`: how much of its box is under boxes in front, its size, the image
border). A mean over all layouts hides where grounding fails: crowded
and overlapping layouts are the hard part, and even the ground truth (the ceiling) can fail there, as
an object hidden in part by another is found smaller than its requested (full) box.

A bucket is computed from a record's boxes alone, so it works on any manifest. The per-object tables
are those of `datasets.measure` (one row per requested object, in the record's object order: `record`, the
index of its record; `success`; `iou`; `measurable`; `box`, the requested box; `found_box`, the detection).

O-mIoU (OverLayBench's overlap IoU) measures grounding where it is hardest, on the overlap regions only: for
each pair of requested boxes that intersect, the IoU of their intersection with the intersection of the two
found boxes (0 when either object is not found or the found boxes do not intersect); averaged over the pairs of
an image, then over the images that have such a pair (`overlap_ious`, `o_miou`)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from adapterlib.data.manifest import Record

# Columns of a bucket report; the measured thing's are success_rate / miou, its ratio to the ceiling is
# ratio (success_rate / ceiling_success_rate).
REPORT_COLUMNS = ["objects", "overlap", "n_layouts", "n_objects", "success_rate", "miou", "ceiling_success_rate",
                  "ceiling_miou", "base_success_rate", "base_miou", "ratio", "o_miou", "ceiling_o_miou", "base_o_miou"]
PAIR_COLUMNS = ["record", "first", "second", "o_iou"]
_TABLE_COLUMNS = ("record", "success", "iou")


def boxes_intersect(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two (x0, y0, x1, y1) boxes share an area (touching edges do not)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def bucket_of(record: Record) -> tuple[int, bool]:
    """(objects, overlap): the record's object count and whether any two of its requested boxes intersect."""
    boxes = [o.box for o in record.objects]
    overlap = any(boxes_intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    return len(boxes), overlap


def overlap_box(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float] | None:
    """The intersection of two (x0, y0, x1, y1) boxes, or None when they share no area."""
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])) if boxes_intersect(a, b) else None


def overlap_pairs(record: Record) -> list[tuple[int, int]]:
    """The (i, j), i < j, of the record's objects whose requested boxes intersect."""
    boxes = [o.box for o in record.objects]
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes_intersect(boxes[i], boxes[j])]


def overlap_ious(records: Sequence[Record], table: pd.DataFrame) -> pd.DataFrame:
    """One row per overlapping pair of requested boxes whose two objects were measured (PAIR_COLUMNS: the record,
    the pair's object indices, and o_iou: the IoU of the requested boxes' intersection with the found boxes'
    intersection; 0 when either object was not found or the found boxes do not intersect)."""
    from adapterlib.data.manifest import box_iou
    missing = [c for c in ("record", "box", "found_box", "measurable") if c not in table.columns]
    if missing:
        raise ValueError(f"the table lacks column(s) {missing}: give a per-object table of datasets.measure")
    rows = []
    for index, group in table.groupby("record", sort=True):
        record = records[int(index)]
        if len(group) != len(record.objects):
            raise ValueError(f"the table has {len(group)} rows for record {int(index)} but it has "
                             f"{len(record.objects)} objects: give the records the table was measured on")
        found = group["found_box"].tolist()
        measurable = group["measurable"].astype(bool).tolist()
        for i, j in overlap_pairs(record):
            if not (measurable[i] and measurable[j]):
                continue
            requested = overlap_box(record.objects[i].box, record.objects[j].box)
            both = overlap_box(found[i], found[j]) if found[i] is not None and found[j] is not None else None
            rows.append({"record": int(index), "first": i, "second": j,
                         "o_iou": box_iou(requested, both) if both is not None else 0.0})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def o_miou(pairs: pd.DataFrame) -> float:
    """O-mIoU of an `overlap_ious` table: the mean over images of their pairs' mean o_iou (OverLayBench's
    averaging); NaN when no image has an overlapping pair."""
    return float(pairs.groupby("record")["o_iou"].mean().mean()) if len(pairs) else float("nan")


def _per_key(keys: list[tuple], names: list[str], table: pd.DataFrame, name: str) -> pd.DataFrame:
    """n_objects, success_rate, miou per key (columns `names`) of one per-object table (its measurable rows), given
    the key of each record."""
    missing = [c for c in _TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the {name} table lacks column(s) {missing}: give a per-object table of datasets.measure")
    rows = table[table["measurable"].astype(bool)] if "measurable" in table.columns else table
    index = rows["record"].to_numpy(int)
    bad = index[(index < 0) | (index >= len(keys))]
    if len(bad):
        raise ValueError(f"the {name} table names record {int(bad[0])} but there are {len(keys)} records: "
                         "give the records the table was measured on")
    frame = pd.DataFrame({**{n: [keys[i][k] for i in index] for k, n in enumerate(names)},
                          "success": rows["success"].to_numpy(float), "iou": rows["iou"].to_numpy(float)})
    grouped = frame.groupby(names)
    return pd.DataFrame({"n_objects": grouped.size(), "success_rate": grouped["success"].mean(),
                         "miou": grouped["iou"].mean()})


def _key_report(records: Sequence[Record], keys: list[tuple], names: list[str], measured: pd.DataFrame,
                ceiling: pd.DataFrame | None, base: pd.DataFrame | None) -> pd.DataFrame:
    """The body of `bucket_report` for any key of a layout (`keys[i]` of record i, columns `names`)."""
    layouts = pd.DataFrame(keys, columns=names)
    report = layouts.groupby(names).size().rename("n_layouts").to_frame()
    report = report.join(_per_key(keys, names, measured, "measured"))
    for prefix, table in (("ceiling_", ceiling), ("base_", base)):
        if table is not None:
            report = report.join(_per_key(keys, names, table, prefix[:-1])[["success_rate", "miou"]].add_prefix(prefix))
    for prefix, table in (("", measured), ("ceiling_", ceiling), ("base_", base)):
        pairs = overlap_ious(records, table) if table is not None and {"box", "found_box"} <= set(table.columns) \
            else ()
        if len(pairs):
            pairs["key"] = [keys[r] for r in pairs["record"]]
            o = pd.Series({k: o_miou(p) for k, p in pairs.groupby("key")}, dtype=float, name=f"{prefix}o_miou")
            report = report.join(o.rename_axis(names) if len(names) > 1 else
                                 o.set_axis(pd.Index([k[0] for k in o.index], name=names[0])))
    report = report.reset_index().reindex(columns=[*names, *REPORT_COLUMNS[2:]])
    report["n_objects"] = report["n_objects"].fillna(0).astype(int)
    report["ratio"] = report["success_rate"] / report["ceiling_success_rate"].where(report["ceiling_success_rate"] > 0)
    return report


def bucket_report(records: Sequence[Record], measured: pd.DataFrame, *, ceiling: pd.DataFrame | None,
                  base: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per bucket (objects, overlap), in that order: n_layouts, and n_objects / success_rate / miou of the
    `measured` per-object table (the adapter, or whatever is evaluated), success_rate / miou of the
    `ceiling` (the ground truth; None where the layouts have no ground truth to measure) and of the `base` alone
    (NaN when not given), ratio = success_rate /
    ceiling_success_rate (NaN where the ceiling is 0), and the O-mIoU of each (`o_miou`, `ceiling_o_miou`,
    `base_o_miou`: NaN in a bucket without overlaps, or for a table without boxes). Every table is measured on
    `records`, in order."""
    if not len(records):
        return pd.DataFrame(columns=REPORT_COLUMNS)
    return _key_report(records, [bucket_of(r) for r in records], ["objects", "overlap"], measured, ceiling, base)


# ---------------------------------------------------------------------------------------------
# How deep the overlaps go, and which objects are lost

DEPTHS = ("apart", "shallow", "deep", "inside")


def depth_of(record: Record) -> str:
    """How deep a layout's deepest overlap goes, as the share of the smaller box of a pair that the other covers:
    "apart" (no two requested boxes intersect), "shallow" (at most 1/3), "deep" (more, short of all), "inside"
    (one box wholly inside another)."""
    box_area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
    boxes = [o.box for o in record.objects]
    cover = 0.0
    for i, j in overlap_pairs(record):
        a, b = boxes[i], boxes[j]
        cover = max(cover, box_area(overlap_box(a, b)) / min(box_area(a), box_area(b)))
    return DEPTHS[0] if cover == 0 else "shallow" if cover <= 1 / 3 else "inside" if cover >= 1 - 1e-9 else "deep"


def depth_report(records: Sequence[Record], measured: pd.DataFrame, *, ceiling: pd.DataFrame | None,
                 base: pd.DataFrame | None = None) -> pd.DataFrame:
    """`bucket_report`'s columns per overlap depth (`depth_of`: apart / shallow / deep / inside, those present) in
    place of (objects, overlap)."""
    if not len(records):
        return pd.DataFrame(columns=["depth", *REPORT_COLUMNS[2:]])
    report = _key_report(records, [(depth_of(r),) for r in records], ["depth"], measured, ceiling, base)
    return report.sort_values("depth", key=lambda d: d.map(DEPTHS.index), ignore_index=True)


# The factors `object_factors` gives each requested object, and the groups `factor_report` splits them into.
FACTOR_GROUPS = {"hidden": ("none", "< 1/3", "1/3 - 2/3", ">= 2/3"), "side": ("< 1/4", "1/4 - 3/8", ">= 3/8"),
                 "border": ("no", "yes"), "in front of": ("none", "1", "2+")}


def object_factors(records: Sequence[Record]) -> pd.DataFrame:
    """One row per requested object (record, object, in order) with what may make it hard to ground: `hidden`, the
    share of its requested box under the boxes in front of it (the Shapes depth rule: the smaller box in front, of
    equal ones the later; measured on a 128-px grid), `side` (the box's longer side, a fraction of the image side),
    `border` (the box touches the image's edge) and `in_front` (how many boxes it covers in part)."""
    import numpy as np
    grid = (np.arange(128) + 0.5) / 128
    rows = []
    for index, record in enumerate(records):
        boxes = [o.box for o in record.objects]
        area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        masks = [(grid[None, :] >= b[0]) & (grid[None, :] < b[2]) & (grid[:, None] >= b[1]) & (grid[:, None] < b[3])
                 for b in boxes]
        front = lambda i, j: area[j] < area[i] or (area[j] == area[i] and j > i)    # j drawn over i
        for i, box in enumerate(boxes):
            over = [j for j in range(len(boxes)) if j != i and boxes_intersect(box, boxes[j])]
            cover = np.zeros_like(masks[i])
            for j in over:
                if front(i, j):
                    cover |= masks[j]
            hidden = float((cover & masks[i]).sum() / max(masks[i].sum(), 1))
            rows.append({"record": index, "object": i, "hidden": hidden,
                         "side": float(max(box[2] - box[0], box[3] - box[1])),
                         "border": bool(min(box[0], box[1]) <= 1e-6 or max(box[2], box[3]) >= 1 - 1e-6),
                         "in_front": sum(1 for j in over if front(j, i))})
    return pd.DataFrame(rows, columns=["record", "object", "hidden", "side", "border", "in_front"])


def _factor_groups(factors: pd.DataFrame) -> dict[str, pd.Series]:
    """Each factor's group of every object (FACTOR_GROUPS' labels)."""
    cut = lambda v, edges, labels: pd.Series(pd.cut(v, edges, labels=labels, right=False).astype(str), index=v.index)
    return {"hidden": factors["hidden"].map(lambda h: "none" if h == 0 else "< 1/3" if h < 1 / 3 else
                                            "1/3 - 2/3" if h < 2 / 3 else ">= 2/3"),
            "side": cut(factors["side"], [0, 0.25, 0.375, 2], list(FACTOR_GROUPS["side"])),
            "border": factors["border"].map({False: "no", True: "yes"}),
            "in front of": factors["in_front"].map(lambda n: "none" if n == 0 else "1" if n == 1 else "2+")}


def factor_report(records: Sequence[Record], measured: pd.DataFrame, *, ceiling: pd.DataFrame | None = None,
                  base: pd.DataFrame | None = None) -> pd.DataFrame:
    """Which objects are lost: success and mIoU of the measured objects per group of each factor of
    `object_factors` (factor, group, n_objects, then success_rate / miou of `measured`, the `ceiling` and the
    `base` where given, and ratio = success_rate / ceiling_success_rate)."""
    factors = object_factors(records)
    groups = _factor_groups(factors)
    out = []
    for prefix, table in (("", measured), ("ceiling_", ceiling), ("base_", base)):
        if table is None:
            continue
        if len(table) != len(factors):
            raise ValueError(f"the {prefix[:-1] or 'measured'} table has {len(table)} rows for {len(factors)} "
                             "requested objects: give the records the table was measured on")
        kept = table["measurable"].astype(bool).to_numpy() if "measurable" in table.columns else None
        for factor, group in groups.items():
            frame = pd.DataFrame({"group": group.to_numpy(), "success": table["success"].to_numpy(float),
                                  "iou": table["iou"].to_numpy(float)})
            frame = frame[kept] if kept is not None else frame
            for name, part in frame.groupby("group"):
                out.append({"factor": factor, "group": name, "who": prefix, "n_objects": len(part),
                            "success_rate": part["success"].mean(), "miou": part["iou"].mean()})
    long = pd.DataFrame(out)
    wide = long[long["who"] == ""].drop(columns="who").set_index(["factor", "group"])
    for prefix in ("ceiling_", "base_"):
        part = long[long["who"] == prefix]
        if len(part):
            wide = wide.join(part.set_index(["factor", "group"])[["success_rate", "miou"]].add_prefix(prefix))
    wide = wide.reindex(columns=["n_objects", "success_rate", "miou", "ceiling_success_rate", "ceiling_miou",
                                 "base_success_rate", "base_miou"])
    wide["ratio"] = wide["success_rate"] / wide["ceiling_success_rate"].where(wide["ceiling_success_rate"] > 0)
    order = [(f, g) for f, labels in FACTOR_GROUPS.items() for g in labels if (f, g) in wide.index]
    return wide.loc[order].reset_index()


def format_factors(report: pd.DataFrame, measured: str = "adapter") -> str:
    """The factor report as an aligned text table (the ceiling's and the base's columns where given)."""
    names = {"factor": "factor", "group": "group", "n_objects": "objects", "ceiling_success_rate": "ceiling",
             "base_success_rate": "base", "success_rate": measured, "ratio": "ratio", "ceiling_miou": "ceiling mIoU",
             "base_miou": "base mIoU", "miou": f"{measured} mIoU"}
    shown = report[list(names)].dropna(axis=1, how="all").rename(columns=names)
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")


def bucket_rows(report: pd.DataFrame) -> list[dict]:
    """The report (by bucket, depth or factor) as JSON-ready dicts (plain ints, bools, strings and floats; NaN
    stays NaN), one per row."""
    rows = []
    for row in report.to_dict("records"):
        rows.append({k: (int(v) if k in ("objects", "n_layouts", "n_objects") else bool(v) if k == "overlap" else
                         str(v) if k in ("depth", "factor", "group") else float(v)) for k, v in row.items()})
    return rows


def format_buckets(report: pd.DataFrame, measured: str = "adapter") -> str:
    """The report as an aligned text table: objects, overlap (a `depth_report`: depth), layouts, measured objects,
    then success (and mIoU, then O-mIoU where any bucket overlaps) of the ceiling, the base and `measured`, and the
    ratio to the ceiling."""
    keys = {"depth": "depth"} if "depth" in report.columns else {"objects": "objects", "overlap": "overlap"}
    columns = {**keys, "n_layouts": "layouts", "n_objects": "n_objects",
               "ceiling_success_rate": "ceiling", "base_success_rate": "base", "success_rate": measured,
               "ratio": "ratio", "ceiling_miou": "ceiling mIoU", "base_miou": "base mIoU", "miou": f"{measured} mIoU",
               "ceiling_o_miou": "ceiling O-mIoU", "base_o_miou": "base O-mIoU", "o_miou": f"{measured} O-mIoU"}
    shown = report[list(columns)].rename(columns=columns)
    for name, column in (("base", "base_success_rate"), ("ceiling", "ceiling_success_rate")):
        if report[column].isna().all():
            shown = shown.drop(columns=[name, f"{name} mIoU", f"{name} O-mIoU", *(["ratio"] if name == "ceiling" else [])])
    if report[["o_miou", "ceiling_o_miou", "base_o_miou"]].isna().all().all():         # no overlapping layouts, or no boxes
        shown = shown.drop(columns=[c for c in shown.columns if c.endswith("O-mIoU")])
    if "overlap" in shown.columns:
        shown["overlap"] = shown["overlap"].map({True: "yes", False: "no"})
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")


# ---------------------------------------------------------------------------------------------
# OverLayBench's OverLayScore and a split of any layouts by it

OVERLAY_SPLITS = ("no overlap", "simple", "regular", "complex")
SPLIT_COLUMNS = ["split", "n_layouts", "score_min", "score_max", "n_objects", "success_rate", "miou", "o_miou",
                 "ceiling_success_rate", "ceiling_miou", "ceiling_o_miou", "base_success_rate", "base_miou",
                 "base_o_miou"]


def overlay_score(record: Record, similarity) -> float:
    """OverLayBench's OverLayScore of a layout: the sum over pairs of its requested boxes of their IoU times the
    similarity of their phrases (`similarity[i][j]`: e.g. the cosine of the base's phrase embeddings, which can be
    negative for a small text encoder). 0 for a layout whose boxes do not overlap."""
    from adapterlib.data.manifest import box_iou
    boxes = [o.box for o in record.objects]
    return float(sum(box_iou(boxes[i], boxes[j]) * float(similarity[i][j]) for i, j in overlap_pairs(record)))


def overlay_splits(records: Sequence[Record], scores: Sequence[float]) -> list[str]:
    """Each layout's split: "no overlap" (no two requested boxes intersect), else simple / regular / complex at the
    tertiles of the scores of these layouts' overlapping ones (OverLayBench balances its three splits by
    OverLayScore; its thresholds are not published with its code, so any set of layouts is split at its own)."""
    import numpy as np
    overlapping = [bool(overlap_pairs(r)) for r in records]
    positive = np.asarray([s for s, o in zip(scores, overlapping) if o], dtype=float)
    if not len(positive):
        return [OVERLAY_SPLITS[0]] * len(scores)
    low, high = np.quantile(positive, [1 / 3, 2 / 3])
    return [OVERLAY_SPLITS[0] if not o else "simple" if s <= low else "regular" if s <= high else "complex"
            for s, o in zip(scores, overlapping)]


def split_report(records: Sequence[Record], scores: Sequence[float], measured: pd.DataFrame, *,
                 ceiling: pd.DataFrame | None = None, base: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per OverLayScore split (`overlay_splits`; the splits present, in order): the layouts, their score range, and
    success / mIoU / O-mIoU of `measured`, the `ceiling` and the `base` (NaN where not given). Per-object tables of
    `records`, in order."""
    splits = overlay_splits(records, scores)
    rows = []
    for name in [s for s in OVERLAY_SPLITS if s in splits]:
        index = [i for i, s in enumerate(splits) if s == name]
        row = {"split": name, "n_layouts": len(index), "score_min": min(scores[i] for i in index),
               "score_max": max(scores[i] for i in index)}
        for prefix, table in (("", measured), ("ceiling_", ceiling), ("base_", base)):
            if table is None:
                continue
            part = table[table["record"].isin(index)]
            kept = part[part["measurable"].astype(bool)] if "measurable" in part.columns else part
            if not prefix:
                row["n_objects"] = int(len(kept))
            row[f"{prefix}success_rate"] = float(kept["success"].mean()) if len(kept) else float("nan")
            row[f"{prefix}miou"] = float(kept["iou"].mean()) if len(kept) else float("nan")
            if {"box", "found_box"} <= set(part.columns):
                subset = [records[i] for i in index]
                renumbered = part.assign(record=part["record"].map({r: k for k, r in enumerate(index)}))
                row[f"{prefix}o_miou"] = o_miou(overlap_ious(subset, renumbered))
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=SPLIT_COLUMNS)


def format_splits(report: pd.DataFrame, measured: str = "adapter") -> str:
    """The split report as an aligned text table (the base's and the ceiling's columns where given)."""
    names = {"split": "split", "n_layouts": "layouts", "score_min": "score min", "score_max": "score max",
             "ceiling_success_rate": "ceiling", "base_success_rate": "base", "success_rate": measured,
             "ceiling_miou": "ceiling mIoU", "base_miou": "base mIoU", "miou": f"{measured} mIoU",
             "ceiling_o_miou": "ceiling O-mIoU", "base_o_miou": "base O-mIoU", "o_miou": f"{measured} O-mIoU"}
    shown = report[list(names)].dropna(axis=1, how="all").rename(columns=names)
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")
