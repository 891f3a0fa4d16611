"""The Shapes colour detector: did the object land in the requested box?

A miniature of GLIGEN's YOLO-AP evaluation for the Shapes world. Because every Shapes colour appears
at most once per image, a "detector" only has to find the largest blob of the phrase's colour: each
pixel takes the nearest palette colour (if close enough, and closer than the background), blobs are
4-connected components, and a requested object counts as a success when the found box overlaps the
requested box with IoU >= 0.5. `ColorDetector` is this detector behind the `adapterlib.model.detectors`
interface, so its table and summary come from the scoring shared with every detector.

Images are uint8 RGB numpy arrays, (N, H, W, 3) or a list of (H, W, 3).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from adapterlib.data.manifest import Record
from adapterlib.model.detectors import Box, Detection, Detector, score_grounding
from .world import BACKGROUND, COLORS, SHAPES, color_of, shape_masks, shape_of

COLOR_TOLERANCE = 90  # max RGB euclidean distance from a palette colour
MIN_BLOB_PIXELS = 4   # smaller blobs are speckle, not an object

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


class ColorDetector(Detector):
    """The colour detector behind the `Detector` interface: a phrase is looked for by its palette
    colour (phrases naming none cannot be measured); the score is the blob's share of the image's
    pixels (speckle and fragments are small)."""

    name = "color"
    reports_color = True

    def detect(self, image: np.ndarray, phrases: list[str]) -> list[Detection]:
        labels = classify_pixels(image)
        detections = []
        for phrase in phrases:
            color = color_of(phrase)
            box, size = _largest_blob(labels, color) if color is not None else (None, 0)
            detections.append((box, size / labels.size))
        return detections

    def measurable(self, phrase: str) -> bool:
        return color_of(phrase) is not None

    def color_of(self, phrase: str) -> str | None:
        return color_of(phrase)


def evaluate_grounding(
    images: np.ndarray | Sequence[np.ndarray],
    records: Sequence[Record],
    iou_threshold: float = 0.5,
) -> tuple[pd.DataFrame, dict]:
    """Per-object grounding results and a summary over the measurable objects, by the colour detector
    (`detectors.score_grounding`). Objects whose phrase names no palette colour cannot be measured:
    they get measurable=False, NaN metrics, and are left out of the summary (with a warning).
    Summary: success_rate, miou, ap50, color_presence, n_objects (measurable), n_images.
    """
    return score_grounding(images, records, ColorDetector(), iou_threshold)


def _named(records: Sequence[Record], lookup, names: Sequence[str], what: str, why: str) -> list[list[int]]:
    """Each object's index in `names` of what its phrase names (`lookup`), per record; ValueError naming the
    record and the object when the phrase names none."""
    out = []
    for record in records:
        indices = []
        for k, obj in enumerate(record.objects):
            found = lookup(obj.phrase)
            if found is None:
                which = record.id or record.image or f"seed {record.seed}"
                raise ValueError(f"record {which}, object {k}: phrase {obj.phrase!r} names no {what} "
                                 f"({', '.join(names)}), so {why} (box_loss_region visible / exclusive / layered "
                                 "are for Shapes data; use box)")
            indices.append(list(names).index(found))
        out.append(indices)
    return out


def palette_indices(records: Sequence[Record]) -> list[list[int]]:
    """Each object's palette index (its phrase's colour), per record; raises ValueError naming the record and the
    object when a phrase names no palette colour (its pixels cannot be found by colour)."""
    return _named(records, color_of, _NAMES, "palette colour", "its pixels cannot be found by colour")


def shape_indices(records: Sequence[Record]) -> list[list[int]]:
    """Each object's SHAPES index, per record; ValueError naming the record and the object when a phrase names
    no shape (its whole shape cannot be drawn)."""
    return _named(records, shape_of, SHAPES, "shape", "its whole shape cannot be drawn")


def visible_masks(images: np.ndarray, records: Sequence[Record], n: int) -> np.ndarray:
    """Each object's visible pixels, (B, n, H, W) bool, from its images (B, H, W, 3) uint8: the pixels of its
    phrase's palette colour (colours are unique within a Shapes image). Slots past a record's objects are empty.
    Raises ValueError naming the record and the object when a phrase names no palette colour."""
    images = np.asarray(images)
    out = np.zeros((len(records), n, *images.shape[1:3]), dtype=bool)
    for b, (image, indices) in enumerate(zip(images, palette_indices(records))):
        labels = classify_pixels(image)
        for k, index in enumerate(indices):
            out[b, k] = labels == index
    return out


# Pixels of another object inside an object's drawn shape that make it "hidden in part": two, not one, so that a
# shape drawn from its tight box (a pixel off at an edge) does not call a neighbour that merely touches it hiding
HIDDEN_MIN_PIXELS = 2


def hidden_in_part(visible: np.ndarray, records: Sequence[Record]) -> np.ndarray:
    """Which objects are hidden in part, (B, n) bool, from their visible pixels (B, n, H, W) (`visible_masks`): an
    object is when at least HIDDEN_MIN_PIXELS pixels of its whole shape (drawn from its phrase's shape in its box,
    `world.shape_masks`) show another object. ValueError naming the record and the object when a phrase names no
    shape."""
    b, n, h, w = visible.shape
    boxes, shapes = np.zeros((b, n, 4), np.int64), np.full((b, n), -1, np.int64)
    for i, (record, indices) in enumerate(zip(records, shape_indices(records))):
        for k, (obj, index) in enumerate(zip(record.objects, indices)):
            boxes[i, k] = [round(v * w) for v in obj.box]
            shapes[i, k] = index
    others = visible.any(1, keepdims=True) & ~visible                                   # (B, n, H, W)
    return (shape_masks(boxes, shapes, w) & others).sum((2, 3)) >= HIDDEN_MIN_PIXELS
