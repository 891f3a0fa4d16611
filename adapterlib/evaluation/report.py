"""What `python -m adapterlib evaluate` prints below its summary table, and the JSON fields of it.

Every evaluate path (a reference, a run's adapter, a GLIGEN folder) prints the same breakdowns in the same order
(`breakdowns`): by bucket (objects x overlap), by overlap depth and which objects are lost (`depth_report`), by
OverLayScore (`overlay_report`), and, for a COCO-MIG layout file, by level (`protocol_report`). Each returns what it
printed as JSON rows, for the last line of stdout.
"""
from __future__ import annotations

from pathlib import Path

from adapterlib.data import buckets
from adapterlib.evaluation.evaluate import Layouts
from adapterlib.evaluation.protocols import format_levels, overlay_scores


def breakdowns(layouts: Layouts, table, *, ceiling=None, base_table=None, measured: str = "adapter",
               buckets_title: str, buckets_measured: str = "adapter", base=None,
               protocol_rows: dict[str, dict] | None = None, sam: bool = False) -> tuple[dict, list[dict]]:
    """Print the breakdowns of the measured per-object `table` (beside the ground truth's `ceiling` and the base's
    `base_table`, where given), in order: by bucket (`buckets_title`: the heading's words in parentheses after
    "objects x overlap; "; `buckets_measured`: the measured column's name there), by overlap depth and lost objects
    (the ceiling left out when `table` is the ceiling itself), by OverLayScore (with `base`, whose text encoder scores
    the phrases), by COCO-MIG level (with `protocol_rows`, the named summaries of the level table; `sam`: the colour
    was checked on SAM masks). `measured` names the measured column of the other tables.

    Returns the JSON's fields of them, in the order printed ("depths", "factors", "overlay_splits", the protocol's),
    and the bucket rows (the JSON's "buckets", its last key)."""
    report = buckets.bucket_report(layouts.records, table, ceiling=ceiling, base=base_table)
    print(f"\nby bucket (objects x overlap; {buckets_title}):\n"
          f"{buckets.format_buckets(report, measured=buckets_measured)}")
    fields = depth_report(layouts, table, ceiling=None if table is ceiling else ceiling, base_table=base_table,
                          measured=measured)
    if base is not None:
        fields["overlay_splits"] = overlay_report(layouts, base, table, ceiling=ceiling, base_table=base_table,
                                                  measured=measured)
    if protocol_rows is not None:
        fields.update(protocol_report(layouts, protocol_rows, sam=sam))
    return fields, buckets.bucket_rows(report)


def overlay_report(layouts: Layouts, base, table, *, ceiling=None, base_table=None,
                   measured: str = "adapter") -> list[dict]:
    """Print the layouts' OverLayBench split (OverLayScore from `base`'s phrase embeddings; `protocols`) with
    success, mIoU and O-mIoU of each row; return it as JSON rows ([] when no layout has overlapping boxes)."""
    if not any(buckets.overlap_pairs(r) for r in layouts.records):
        return []
    scores = overlay_scores(layouts.records, base)
    report = buckets.split_report(layouts.records, scores, table, ceiling=ceiling, base=base_table)
    print(f"\nby OverLayScore (OverLayBench's; phrase similarity from {Path(str(base.path)).name}'s text encoder; "
          f"overlapping layouts split at their own tertiles):\n{buckets.format_splits(report, measured=measured)}")
    return [{k: (v if isinstance(v, str) else None if v != v else int(v) if k in ("n_layouts", "n_objects")
                 else float(v)) for k, v in row.items()} for row in report.to_dict("records")]


def depth_report(layouts: Layouts, table, *, ceiling=None, base_table=None, measured: str = "adapter") -> dict:
    """Print where the overlaps bite: by the depth of each layout's deepest overlap, and which objects are lost (by
    how much of the box is hidden, size, border, how many it covers); return both as JSON rows under "depths" and
    "factors" (nothing when no layout has overlapping boxes)."""
    if not any(buckets.overlap_pairs(r) for r in layouts.records):
        return {}
    depths = buckets.depth_report(layouts.records, table, ceiling=ceiling, base=base_table)
    print(f"\nby overlap depth (the deepest overlap's share of the smaller box: shallow <= 1/3, deep, inside = 1):\n"
          f"{buckets.format_buckets(depths, measured=measured)}")
    factors = buckets.factor_report(layouts.records, table, ceiling=ceiling, base=base_table)
    print(f"\nwhich objects are lost (hidden: share of the requested box under boxes in front; side: of the image; "
          f"border: the box touches the edge; in front of: boxes it covers in part):\n"
          f"{buckets.format_factors(factors, measured=measured)}")
    return {"depths": buckets.bucket_rows(depths), "factors": buckets.bucket_rows(factors)}


def protocol_report(layouts: Layouts, rows: dict[str, dict], *, sam: bool) -> dict:
    """For the layouts of a COCO-MIG file: print the L2-L6 table of `rows` (name -> summary with its "levels"; `sam`:
    the colour was checked on SAM masks, else on the box's pixels) and return the JSON's protocol fields (the
    measured row's levels are already the summary's "levels" at the top level; the ground truth's and the base's
    beside them). Nothing for other layouts."""
    if layouts.protocol is None:
        return {}
    region = "SAM masks" if sam else "the box's pixels (no --sam)"
    print(f"\n{layouts.protocol} on {layouts.title}, by level (instances), colour checked on {region}:")
    print(format_levels({name: summary["levels"] for name, summary in rows.items()}))
    out = {"protocol": layouts.protocol, "color_region": "sam" if sam else "box"}
    for name, summary in rows.items():
        key = "ground_truth_levels" if name == "ground truth" else "base_levels" if name.startswith("base") else None
        if key is not None:
            out[key] = summary["levels"]
    return out
