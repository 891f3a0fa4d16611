"""The Shapes colour detector: did the object land in the requested box?

A miniature of GLIGEN's YOLO-AP evaluation for the Shapes world. Because every Shapes colour appears
at most once per image, a "detector" only has to find the largest blob of the phrase's colour: each
pixel takes the nearest palette colour (if close enough, and closer than the background), blobs are
4-connected components, and a requested object counts as a success when the found box overlaps the
requested box with IoU >= 0.5.

Images are uint8 RGB numpy arrays, (N, H, W, 3) or a list of (H, W, 3).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from ..data import Record, box_iou
from .world import BACKGROUND, COLORS, color_of

COLOR_TOLERANCE = 90  # max RGB euclidean distance from a palette colour
MIN_BLOB_PIXELS = 4   # smaller blobs are speckle, not an object

Box = tuple[float, float, float, float]

_NAMES = list(COLORS)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (C, 3)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)          # (3,)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Palette index (H, W) int of each pixel of an (H, W, 3) image; -1 = background."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]                     # (H, W, 3)
    dist = np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1)           # (H, W, C)
    to_background = np.linalg.norm(rgb - _BACKGROUND, axis=-1)             # (H, W)
    nearest = dist.argmin(axis=-1)                                         # (H, W)
    d = np.take_along_axis(dist, nearest[..., None], axis=-1)[..., 0]      # (H, W)
    return np.where((d < COLOR_TOLERANCE) & (d < to_background), nearest, -1)


def _largest_blob(labels: np.ndarray, color: str) -> tuple[Box | None, int]:
    """Normalised box and size of the largest 4-connected blob of `color` in a label map."""
    mask = labels == _NAMES.index(color)                                   # (H, W)
    components, n = ndimage.label(mask)  # default structure is 4-connectivity
    if n == 0:
        return None, 0
    sizes = np.bincount(components.ravel())[1:]                            # (n,) pixels per blob
    biggest = int(sizes.argmax())
    size = int(sizes[biggest])
    if size < MIN_BLOB_PIXELS:
        return None, 0
    ys, xs = np.nonzero(components == biggest + 1)
    h, w = labels.shape
    # Same convention as records: exclusive x1/y1, divided by width/height.
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h), size


def detect(image: np.ndarray, color: str) -> tuple[Box | None, int]:
    """Box (normalised, x1/y1 exclusive) and pixel count of the largest blob of a colour.

    Returns (None, 0) when there is no blob of at least MIN_BLOB_PIXELS.
    """
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {_NAMES}")
    return _largest_blob(classify_pixels(image), color)


def evaluate_grounding(
    images: np.ndarray | Sequence[np.ndarray],
    records: Sequence[Record],
    iou_threshold: float = 0.5,
) -> tuple[pd.DataFrame, dict]:
    """Per-object grounding results and a summary over the measurable objects.

    One row per requested object. Objects whose phrase names no palette colour
    cannot be measured: they get measurable=False, NaN metrics, and are left
    out of the summary (with a warning).
    Summary: success_rate, miou, color_presence (means over measurable objects),
    n_objects (measurable), n_images.
    """
    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    rows = []
    for i, (image, record) in enumerate(zip(images, records)):
        labels = classify_pixels(image)
        for phrase, box in ((o.phrase, o.box) for o in record.objects):
            color = color_of(phrase)
            row = {"record": i, "id": record.id, "phrase": phrase, "color": color,
                   "box": tuple(box), "found_box": None, "measurable": color is not None}
            if color is None:
                row.update(iou=np.nan, found=False, success=False, color_present=False)
            else:
                found_box, _ = _largest_blob(labels, color)
                iou = box_iou(box, found_box) if found_box is not None else 0.0
                # Presence is the same test as "found": the largest blob of the colour.
                row.update(found_box=found_box, iou=iou, found=found_box is not None,
                           success=iou >= iou_threshold, color_present=found_box is not None)
            rows.append(row)

    columns = ["record", "id", "phrase", "color", "box", "found_box", "iou",
               "found", "success", "color_present", "measurable"]
    table = pd.DataFrame(rows, columns=columns)
    skipped = int((~table["measurable"]).sum()) if len(table) else 0
    if skipped:
        warnings.warn(f"{skipped} object(s) name no palette colour and were not measured")

    measured = table[table["measurable"]] if len(table) else table
    n = len(measured)
    nan = float("nan")
    summary = {
        "success_rate": float(measured["success"].mean()) if n else nan,
        "miou": float(measured["iou"].mean()) if n else nan,
        "color_presence": float(measured["color_present"].mean()) if n else nan,
        "n_objects": int(n),
        "n_images": int(len(records)),
    }
    return table, summary


