"""Published grounding protocols, measured as their code measures them, so a number here stands beside a paper's.

COCO-MIG (MIGC; `LeyRio/MIG_Bench`, `eval_mig.py`), on the layouts of a MIG layout file (`data/mig.py`):
- each instance is looked for by its noun ("dog" of "red dog"; a detector that finds objects by colour, the Shapes
  colour detector, by the whole label), and is **placed** when the best IoU of any box the detector returns for it
  (`Detector.detect_all`: GroundingDINO's boxes above its thresholds) with the layout box is >= 0.5;
- a placed instance's **colour is right** when at least 20% of its region lies in the colour's HSV range
  (OpenCV's convention: hue 0-180, saturation and value 0-255; the benchmark's seven ranges, with ranges for the
  Shapes palette's magenta and cyan added here, ours). The region is the SAM mask prompted with the layout box
  when a SAM folder is given (`model/segment.py`), as the benchmark does; else the layout box's pixels (looser:
  background pixels count against the colour), and every title says which;
- an instance **succeeds** when placed with the right colour. Per level (L2-L6, the instance count) and over the
  whole file: ISR (instance success rate), mIoU (each instance's best IoU, counted as eval_mig.py counts it: 0 when
  nothing is found, and 0 for a placed instance of the wrong colour; an unplaced instance keeps its IoU below 0.5),
  image success (every instance of the layout succeeds). "average" is over all instances (ISR, mIoU) and all
  layouts (image success), as eval_mig.py averages.

OverLayBench (`mlpc-ucsd/OverLayBench`): OverLayScore, the sum over overlapping box pairs of their IoU times the
similarity of their phrases, here the cosine of the base's own phrase embeddings (`overlay_scores`: the vector the
adapter is given for each phrase); layouts split simple / regular / complex by it (`buckets.overlay_splits`), and
O-mIoU, the IoU on the overlap regions (`buckets.overlap_ious`), reported everywhere grounding is.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from adapterlib.data.manifest import Record, box_iou
from adapterlib.data.mig import level, split_label
from adapterlib.model.detectors import Detector

IOU_THRESHOLD = 0.5
MIN_COLOR_SHARE = 0.2
# (lower, upper) HSV bounds per colour, OpenCV's convention, as eval_mig.py gives them; red wraps around hue 0
HSV_RANGES = {
    "red": [((0, 43, 35), (6, 255, 255)), ((156, 43, 35), (180, 255, 255))],
    "blue": [((78, 43, 35), (124, 255, 255))],
    "green": [((35, 43, 35), (77, 255, 255))],
    "yellow": [((20, 43, 35), (34, 255, 255))],
    "black": [((0, 0, 0), (180, 255, 35))],
    "white": [((0, 0, 221), (180, 43, 255))],
    "brown": [((6, 43, 35), (25, 255, 255))],
    # ours, for the Shapes palette's two colours COCO-MIG does not use
    "magenta": [((125, 43, 35), (155, 255, 255))],
    "cyan": [((78, 43, 35), (99, 255, 255))],
}
TABLE_COLUMNS = ["record", "id", "level", "phrase", "color", "query", "box", "found_box", "iou", "placed",
                 "color_share", "color_right", "success", "miou"]
LEVEL_KEYS = ("isr", "miou", "image_success", "n_instances", "n_images")


def hsv(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image in HSV as OpenCV's COLOR_RGB2HSV gives it for 8-bit images: hue in degrees
    halved (0-180), saturation and value 0-255, rounded."""
    rgb = np.asarray(image, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    s = np.where(v > 0, 255.0 * delta / np.where(v > 0, v, 1.0), 0.0)
    d = np.where(delta > 0, delta, 1.0)
    h = np.where(v == r, 60.0 * (g - b) / d, np.where(v == g, 120.0 + 60.0 * (b - r) / d, 240.0 + 60.0 * (r - g) / d))
    h = np.where(delta > 0, np.mod(h, 360.0), 0.0)
    return np.stack([np.round(h / 2.0) % 180, np.round(s), v], axis=-1).astype(np.uint8)


def in_color_range(image: np.ndarray, color: str) -> np.ndarray:
    """(H, W) bool: the pixels of `image` inside `color`'s HSV range (HSV_RANGES)."""
    if color not in HSV_RANGES:
        raise ValueError(f"colour {color!r} has no HSV range: COCO-MIG checks {', '.join(HSV_RANGES)}")
    pixels = hsv(image).astype(np.int16)
    inside = np.zeros(pixels.shape[:2], bool)
    for lower, upper in HSV_RANGES[color]:
        inside |= np.all((pixels >= np.array(lower)) & (pixels <= np.array(upper)), axis=-1)
    return inside


def box_mask(shape: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """(H, W) bool: the pixels whose centres lie inside a normalised (x0, y0, x1, y1) box."""
    h, w = shape
    xs, ys = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
    return ((ys[:, None] >= box[1]) & (ys[:, None] < box[3])) & ((xs[None, :] >= box[0]) & (xs[None, :] < box[2]))


def color_share(image: np.ndarray, region: np.ndarray, color: str) -> float:
    """The share of `region`'s pixels inside `color`'s HSV range (0 for an empty region)."""
    n = int(region.sum())
    return float((in_color_range(image, color) & region).sum() / n) if n else 0.0


def measure_mig(images, records: Sequence[Record], detector: Detector, segmenter=None
                ) -> tuple[pd.DataFrame, dict]:
    """COCO-MIG on `images` of `records`: the per-instance table (TABLE_COLUMNS) and the levels
    (`mig_levels`). `segmenter`: a `segment.BoxSegmenter` (SAM) for the colour region, else the box's pixels."""
    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    by_color = detector.reports_color
    rows = []
    for i, (image, record) in enumerate(zip(images, records)):
        image = np.asarray(image)
        found = []
        for o in record.objects:
            color, noun = split_label(o.phrase)
            if color not in HSV_RANGES:
                raise ValueError(f"record {i} (id {record.id!r}) label {o.phrase!r}: colour {color!r} has no HSV "
                                 f"range; COCO-MIG's colours are {', '.join(HSV_RANGES)}")
            query = o.phrase if by_color else noun
            boxes = [box for box, _ in detector.detect_all(image, query)]
            ious = [box_iou(o.box, box) for box in boxes]
            best = int(np.argmax(ious)) if ious else -1
            found.append((color, query, boxes[best] if ious else None, float(ious[best]) if ious else 0.0))
        placed = [k for k, (*_, iou) in enumerate(found) if iou >= IOU_THRESHOLD]
        regions = dict(zip(placed, _regions(image, [record.objects[k].box for k in placed], segmenter)))
        for k, (o, (color, query, box, iou)) in enumerate(zip(record.objects, found)):
            share = color_share(image, regions[k], color) if k in regions else None
            right = None if share is None else share >= MIN_COLOR_SHARE
            rows.append({"record": i, "id": record.id, "level": level(record), "phrase": o.phrase, "color": color,
                         "query": query, "box": tuple(o.box), "found_box": box, "iou": iou, "placed": k in regions,
                         "color_share": share, "color_right": right, "success": bool(right),
                         "miou": iou if right is not False else 0.0})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table, mig_levels(table)


def _regions(image: np.ndarray, boxes: list, segmenter) -> list[np.ndarray]:
    """The colour check's region of each placed instance: SAM's masks prompted with the layout boxes (the image
    encoded once when the segmenter takes several boxes), else each box's pixels."""
    if not boxes:
        return []
    if segmenter is None:
        return [box_mask(image.shape[:2], box) for box in boxes]
    if hasattr(segmenter, "masks"):
        return list(segmenter.masks(image, boxes))
    return [segmenter.mask(image, box) for box in boxes]


def overlay_scores(records: Sequence[Record], base) -> list[float]:
    """OverLayScore of each layout (`buckets.overlay_score`), the phrase similarity the cosine of `base`'s phrase
    embeddings (`BaseModel.encode_phrases`: CLIP's pooled output; SD3's two, SDXL's second)."""
    import torch
    from adapterlib.data.buckets import overlay_score
    phrases = sorted({o.phrase for r in records for o in r.objects})
    if not phrases:
        return [0.0] * len(records)
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(base.encode_phrases(phrases).float(), dim=-1).cpu().numpy()
    index = {p: k for k, p in enumerate(phrases)}
    scores = []
    for r in records:
        v = vectors[[index[o.phrase] for o in r.objects]]
        scores.append(overlay_score(r, v @ v.T))
    return scores


def mig_levels(table: pd.DataFrame) -> dict[str, dict]:
    """{"L2": {isr, miou, image_success, n_instances, n_images}, ..., "average": {...}} of a `measure_mig`
    table: the levels present, in order of instance count, then the average over everything."""
    def summary(rows: pd.DataFrame) -> dict:
        images = rows.groupby("record")["success"].all()
        return {"isr": float(rows["success"].mean()), "miou": float(rows["miou"].mean()),
                "image_success": float(images.mean()), "n_instances": int(len(rows)), "n_images": int(len(images))}
    if not len(table):
        return {}
    levels = sorted(table["level"].unique(), key=lambda name: int(name[1:]))
    return {**{name: summary(table[table["level"] == name]) for name in levels}, "average": summary(table)}


def format_levels(rows: dict[str, dict]) -> str:
    """Named level summaries (e.g. ground truth / base / adapter) as one aligned table: a row per level, ISR,
    mIoU and image success of each."""
    names = list(rows)
    levels = list(dict.fromkeys(level for r in rows.values() for level in r))
    header = ["level", "layouts", *[f"{n} {k}" for n in names for k in ("ISR", "mIoU", "image")]]
    body = []
    for name in levels:
        first = next((r[name] for r in rows.values() if name in r), {})
        cells = [name, str(first.get("n_images", "-"))]
        for n in names:
            s = rows[n].get(name)
            cells += [f"{s[k]:.3f}" if s else "-" for k in ("isr", "miou", "image_success")]
        body.append(cells)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])])
                     for r in [header, *body])
