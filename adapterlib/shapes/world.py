"""The synthetic "Shapes" world: coloured circles, squares and triangles.

Every image is a pure function of an integer seed, so a data set is just a
range of seeds and the ground-truth boxes are exact (the tight bounding box
of the rendered pixels). Shapes are hard-edged, on a white background, in
six well separated colours with at most one object per colour per image --
which is what lets `detector.py` find each requested object by colour alone.

Training seeds are < HELDOUT_SEED0; the held-out evaluation layouts use
seeds from HELDOUT_SEED0 up and ship as `heldout.jsonl` next to this file.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import GroundedObject, Record, png_bytes, read_manifest, write_manifest

RESOLUTION = 32
BACKGROUND = (255, 255, 255)
COLORS = {
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 210, 20),
    "magenta": (210, 40, 210),
    "cyan": (30, 200, 220),
}
SHAPES = ("circle", "square", "triangle")


def color_of(phrase: str) -> str | None:
    """The palette colour named in a phrase ("a red circle" -> "red"), else None."""
    for word in re.findall(r"[a-z]+", phrase.lower()):
        if word in COLORS:
            return word
    return None

HELDOUT_SEED0 = 10_000_000
HELDOUT_PATH = Path(__file__).parent / "heldout.jsonl"

_PLACEMENT_TRIES = 100
_GAP = 1  # px of background kept between boxes, so blobs never touch


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    box: tuple[int, int, int, int]  # pixels, x0, y0, x1, y1; x1/y1 exclusive

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Layout:
    seed: int
    resolution: int
    objects: tuple[ShapeObject, ...]


def sample_layout(seed: int, max_objects: int = 3, resolution: int = RESOLUTION) -> Layout:
    """The layout of one image, deterministic in (seed, max_objects, resolution)."""
    rng = np.random.default_rng(seed)
    # Draw all randomness up front in a few array calls: per-call overhead,
    # not arithmetic, dominates when rendering 100k layouts.
    n = int(rng.integers(1, max_objects + 1))
    colors = rng.permutation(len(COLORS))[:n]
    shape_ids = rng.integers(len(SHAPES), size=max_objects)
    lo, hi = round(8 * resolution / 32), round(16 * resolution / 32)
    sides = rng.integers(lo, hi + 1, size=max_objects)
    u = rng.random((max_objects, _PLACEMENT_TRIES, 2))       # (M, T, 2) candidate positions in [0, 1)
    names = list(COLORS)

    objects: list[ShapeObject] = []
    for j, c in enumerate(colors):
        side = int(sides[j])
        xy = (u[j] * (resolution - side + 1)).astype(np.int64)  # (T, 2) top-left corners
        ok = np.ones(_PLACEMENT_TRIES, dtype=bool)               # (T,)
        for o in objects:
            ok &= ~_too_close(xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side, o.box)
        if not ok.any():
            continue  # a failed placement drops this object: fewer objects, same seed
        x0, y0 = (int(v) for v in xy[ok.argmax()])  # first accepted candidate
        objects.append(ShapeObject(names[int(c)], SHAPES[int(shape_ids[j])], (x0, y0, x0 + side, y0 + side)))
    return Layout(seed=int(seed), resolution=resolution, objects=tuple(objects))


def _too_close(x0, y0, x1, y1, box: tuple[int, int, int, int]):
    """Whether box(es) (x0, y0, x1, y1) come within _GAP px of `box` (works on arrays)."""
    return (x0 < box[2] + _GAP) & (box[0] < x1 + _GAP) & (y0 < box[3] + _GAP) & (box[1] < y1 + _GAP)


# --- rendering -------------------------------------------------------------
# Layouts are packed into arrays so one vectorised code path serves both
# `render` and `render_batch` (they must agree byte for byte).

_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.uint8)  # (7, 3); 0 = background


def _pack(layouts: Sequence[Layout]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes (N, K, 4) int, shape ids (N, K) int, colour ids (N, K) int (0 = no object)."""
    k = max(1, max(len(l.objects) for l in layouts))
    boxes = np.zeros((len(layouts), k, 4), dtype=np.int64)   # (N, K, 4)
    shape_ids = np.zeros((len(layouts), k), dtype=np.int64)  # (N, K)
    color_ids = np.zeros((len(layouts), k), dtype=np.int64)  # (N, K)
    names = list(COLORS)
    for i, layout in enumerate(layouts):
        for j, o in enumerate(layout.objects):
            boxes[i, j] = o.box
            shape_ids[i, j] = SHAPES.index(o.shape)
            color_ids[i, j] = names.index(o.color) + 1
    return boxes, shape_ids, color_ids


def _masks(boxes: np.ndarray, shape_ids: np.ndarray, color_ids: np.ndarray, resolution: int) -> np.ndarray:
    """Pixel masks (N, K, H, W) bool of each object, tested at pixel centres.

    Coordinates are doubled so pixel centres (x + 0.5) are integers and the
    circle/triangle tests are exact integer arithmetic (no float edge cases).
    """
    grid = 2 * np.arange(resolution, dtype=np.int32) + 1      # (R,) doubled pixel centres
    px = grid[None, None, None, :]                             # (1, 1, 1, W)
    py = grid[None, None, :, None]                             # (1, 1, H, 1)
    # int32 halves the memory traffic of the (N, K, H, W) intermediates.
    x0, y0, x1, y1 = (boxes[..., i, None, None].astype(np.int32) * 2 for i in range(4))  # each (N, K, 1, 1)
    side = x1 - x0                                             # doubled side, boxes are square

    inside = (px > x0) & (px < x1) & (py > y0) & (py < y1)     # (N, K, H, W) the square
    dx, dy = px - (x0 + x1) // 2, py - (y0 + y1) // 2          # offsets from the doubled centre
    disk = dx * dx + dy * dy <= side * side // 4               # inscribed disk, doubled radius side / 2
    # Apex at top centre, base on the bottom edge: |dx| <= (py - y0) / 2 at this slope.
    tri = 2 * np.abs(dx) <= (py - y0)

    s = shape_ids[..., None, None]                             # (N, K, 1, 1)
    shape_mask = np.where(s == 0, disk, tri) | (s == 1)        # square: the box itself
    return inside & shape_mask & (color_ids[..., None, None] > 0)


def _paint(masks: np.ndarray, color_ids: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) uint8 from masks (N, K, H, W) and colour ids (N, K)."""
    # Boxes never overlap, so max over K picks the one object covering a pixel (or 0).
    ids = color_ids.astype(np.uint8)[..., None, None]          # (N, K, 1, 1)
    index = np.where(masks, ids, np.uint8(0)).max(axis=1)     # (N, H, W) palette index
    return np.take(_PALETTE, index, axis=0)                   # (N, H, W, 3)


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight pixel boxes (N, K, 4) of masks (N, K, H, W); x1/y1 exclusive."""
    cols = masks.any(axis=2)                                  # (N, K, W)
    rows = masks.any(axis=3)                                  # (N, K, H)
    w, h = cols.shape[-1], rows.shape[-1]
    x0 = cols.argmax(-1)
    x1 = w - cols[..., ::-1].argmax(-1)
    y0 = rows.argmax(-1)
    y1 = h - rows[..., ::-1].argmax(-1)
    return np.stack([x0, y0, x1, y1], axis=-1)


def _render_many(layouts: Sequence[Layout]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and tight pixel boxes (N, K, 4)."""
    resolutions = {l.resolution for l in layouts}
    if len(resolutions) != 1:
        raise ValueError(f"layouts mix resolutions {sorted(resolutions)}")
    packed = _pack(layouts)
    masks = _masks(*packed, resolution=resolutions.pop())
    return _paint(masks, packed[2]), _tight_boxes(masks)


def render(layout: Layout) -> np.ndarray:
    """The image (H, W, 3) uint8 of a layout: hard-edged shapes on BACKGROUND."""
    return _render_many([layout])[0][0]


def _caption(objects: Sequence[ShapeObject]) -> str:
    parts = [f"a {o.phrase}" for o in objects]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _record(layout: Layout, tight: np.ndarray, image: str | None, id: str | None) -> Record:
    """Record from a layout and its tight pixel boxes (K, 4)."""
    r = layout.resolution
    objects = tuple(
        GroundedObject(o.phrase, (float(b[0]) / r, float(b[1]) / r, float(b[2]) / r, float(b[3]) / r))
        for o, b in zip(layout.objects, tight)
    )
    return Record(caption=_caption(layout.objects), objects=objects, image=image,
                  id=id if id is not None else f"shapes-{layout.seed}", seed=layout.seed)


def to_record(layout: Layout, image: str | None = None) -> Record:
    """The grounded record of a layout; boxes are the tight boxes of the rendered pixels."""
    _, tight = _render_many([layout])
    return _record(layout, tight[0], image, None)


# Chunking bounds the memory of the (N, K, H, W) mask tensors.
_CHUNK = 2048


def render_batch(seeds: Sequence[int], max_objects: int = 3) -> tuple[np.ndarray, list[Record]]:
    """Images (N, H, W, 3) uint8 and records (no image path) for many seeds, in memory."""
    seeds = [int(s) for s in seeds]
    images = np.empty((len(seeds), RESOLUTION, RESOLUTION, 3), dtype=np.uint8)  # (N, H, W, 3)
    records: list[Record] = []
    for start in range(0, len(seeds), _CHUNK):
        layouts = [sample_layout(s, max_objects) for s in seeds[start:start + _CHUNK]]
        chunk, tight = _render_many(layouts)
        images[start:start + len(layouts)] = chunk
        records.extend(_record(l, t, None, None) for l, t in zip(layouts, tight))
    return images, records


def write_dataset(folder: str | Path, n: int, seed: int = 0, max_objects: int = 3) -> Path:
    """Write images/<seed:07d>.png and data.jsonl for seeds seed..seed+n-1; returns the manifest."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, records = render_batch(range(seed, seed + n), max_objects)
    out = []
    for image, record in zip(images, records):
        name = f"images/{record.seed:07d}.png"
        (folder / name).write_bytes(png_bytes(image))
        out.append(Record(record.caption, record.objects, image=name, id=record.id, seed=record.seed))
    return write_manifest(folder / "data.jsonl", out)


# --- held-out evaluation layouts ---------------------------------------------

def write_heldout(n: int = 200, path: str | Path = HELDOUT_PATH) -> Path:
    """(Re)generate the shipped held-out file: seeds HELDOUT_SEED0.., ids heldout-000.."""
    layouts = [sample_layout(HELDOUT_SEED0 + i) for i in range(n)]
    _, tight = _render_many(layouts)
    records = [_record(l, t, None, f"heldout-{i:03d}") for i, (l, t) in enumerate(zip(layouts, tight))]
    return write_manifest(path, records)


def heldout_records(n: int | None = None) -> list[Record]:
    """The shipped held-out records (first n if given)."""
    records = read_manifest(HELDOUT_PATH, require_image=False)
    return records if n is None else records[:n]


def heldout_images(records: Sequence[Record], max_objects: int = 3) -> np.ndarray:
    """Ground-truth renders (N, H, W, 3) uint8 of records, from their seeds."""
    if any(r.seed is None for r in records):
        raise ValueError("heldout_images needs records with a seed")
    images, rendered = render_batch([r.seed for r in records], max_objects)
    # Guard against the shipped file and the sampler drifting apart.
    for r, g in zip(records, rendered):
        if r.objects != g.objects:
            raise ValueError(f"record {r.id!r} does not match the layout of seed {r.seed}; "
                             "regenerate with write_heldout()")
    return images
