"""The synthetic "Shapes" world: coloured circles, squares and triangles.

Every image is a pure function of an integer seed and the world's options
(`WorldOptions`), so a data set is just a range of seeds and the ground-truth
boxes are exact (the tight bounding box of each object's full pixels).
Shapes are hard-edged, on a white background, in six well separated colours
with at most one object per colour per image -- which is what lets
`detector.py` find each requested object by colour alone.

The default options are the original world: 1 to 3 objects of side 1/4 to 1/2
of the image, one pixel of background between any two boxes. A harder world
lets boxes overlap (`overlap`), holds up to six objects (one per colour) and
draws sizes from a wider range (`side`).

Depth rule, learnable from the layout alone: where objects overlap, the object
whose requested box has the smaller area is in front (larger objects are
painted first); of two equal areas, the one listed later (later in the
caption) is in front. A requested box is always the object's full box, not
its visible part, so an object hidden in part can fail the detector even in
ground truth: that is the ceiling of its layout.

Seeds: training sets use seeds < HELDOUT_SEED0; the held-out layouts (v1,
default options) use seeds from HELDOUT_SEED0 up and ship as `heldout.jsonl`;
the held-out layouts v2 (HELDOUT_V2_OPTIONS, stratified by object count and
overlap) use seeds from HELDOUT_V2_SEED0 up and ship as `heldout_v2.jsonl`; the
held-out crowds (version 3, CROWDS_OPTIONS: boxes placed at random, so overlaps
of any depth and boxes inside boxes) use seeds from CROWDS_SEED0 up and ship as
`heldout_crowds.jsonl`. A held-out seed is rendered in its set's options, any
other with the default options (`options_for_seed`).

`WORLDS` names the worlds a run (or a base) trains on: for each, the options its
training layouts are drawn with and the held-out set that judges it (v2 trains on
crowded layouts, V2_TRAINING_OPTIONS, and is judged on held-out v2).
"""

from __future__ import annotations

import hashlib
import re

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from adapterlib.data.buckets import bucket_of
from adapterlib.data.manifest import GroundedObject, Record, png_bytes, read_manifest, write_manifest
from adapterlib.files import out_of_space

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


def _first_word_in(phrase: str, words) -> str | None:
    """The first word of `phrase` (lower-cased) that is one of `words`, else None."""
    return next((w for w in re.findall(r"[a-z]+", phrase.lower()) if w in words), None)


def color_of(phrase: str) -> str | None:
    """The palette colour named in a phrase ("a red circle" -> "red"), else None."""
    return _first_word_in(phrase, COLORS)


def shape_of(phrase: str) -> str | None:
    """The shape named in a phrase ("a red circle" -> "circle"), else None."""
    return _first_word_in(phrase, SHAPES)


def shape_masks(boxes: np.ndarray, shapes: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """Each object's whole shape, hidden parts included, (N, K, H, W) bool, from pixel boxes (N, K, 4) and
    SHAPES indices (N, K), -1 where there is no object (the renderer's own masks)."""
    return _masks(boxes, np.maximum(shapes, 0), (shapes >= 0).astype(np.int64), resolution)


HELDOUT_SEED0 = 10_000_000
HELDOUT_PATH = Path(__file__).parent / "heldout.jsonl"

_PLACEMENT_TRIES = 100
_GAP = 1  # px of background kept between boxes that do not overlap, so their blobs never touch
_MIN_SHARED = 2  # px, in each direction, that an overlapping box shares with the box it overlaps
_MAX_IOU = 0.5  # at most this IoU between two boxes, so no object hides behind one of its own size
MIN_SIDE_PX = 4  # the smallest object side in pixels (a side-4 triangle has 8 px, a detectable blob)


PLACEMENTS = ("ruled", "random", "mixed")


@dataclass(frozen=True)
class WorldOptions:
    """How layouts are drawn; the defaults are the original world.

    max_objects / min_objects: objects drawn per image (uniformly; at most len(COLORS), one per
    colour); an object that finds no place after 100 tries is dropped, so a crowded layout can have
    fewer than min_objects. overlap: the probability that an object after the first is placed
    overlapping an earlier one (sharing at least 2 px each way, IoU <= 1/2); otherwise it keeps a
    pixel of background to every earlier box. side: the range of object sides, as fractions of the
    image side (rounded to pixels, at least MIN_SIDE_PX). placement: "ruled" (the above: apart, or over one
    earlier box at IoU <= 1/2) or "random" (each box anywhere, uniformly: overlaps of any depth, one box inside
    another, boxes against the border; `overlap` is then unused): the held-out crowds; or "mixed" (even seeds
    random, odd seeds ruled: half of a training set each way)."""
    max_objects: int = 3
    min_objects: int = 1
    overlap: float = 0.0
    side: tuple[float, float] = (0.25, 0.5)
    placement: str = "ruled"

    def __post_init__(self):
        for name in ("max_objects", "min_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= len(COLORS):
                raise ValueError(f"WorldOptions.{name} = {value!r}: must be an int in [1, {len(COLORS)}] "
                                 "(one object per colour)")
        if self.min_objects > self.max_objects:
            raise ValueError(f"WorldOptions.min_objects = {self.min_objects} is above max_objects = "
                             f"{self.max_objects}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"WorldOptions.overlap = {self.overlap!r}: must be a probability in [0, 1]")
        side = tuple(self.side)
        if len(side) != 2 or not all(isinstance(v, (int, float)) for v in side) or not 0.0 < side[0] <= side[1] <= 1.0:
            raise ValueError(f"WorldOptions.side = {self.side!r}: must be (lo, hi) with 0 < lo <= hi <= 1, "
                             "fractions of the image side")
        object.__setattr__(self, "side", (float(side[0]), float(side[1])))  # hashable, compares equal
        if self.placement not in PLACEMENTS:
            raise ValueError(f"WorldOptions.placement = {self.placement!r}: must be one of {PLACEMENTS}")

    def sides_px(self, resolution: int) -> tuple[int, int]:
        """The object side range (lo, hi) in pixels at `resolution`."""
        lo, hi = round(self.side[0] * resolution), round(self.side[1] * resolution)
        if lo < MIN_SIDE_PX:
            raise ValueError(f"WorldOptions.side = {self.side!r} gives {lo} px sides at resolution {resolution}: "
                             f"the smallest side is {MIN_SIDE_PX} px")
        return lo, hi


def world_options(max_objects: int | None = None, options: WorldOptions | None = None) -> WorldOptions:
    """The options of a call that takes either the old `max_objects` or `options` (neither: defaults)."""
    if options is not None:
        if max_objects is not None:
            raise ValueError("give max_objects inside options (WorldOptions(max_objects=...)), not both")
        if not isinstance(options, WorldOptions):
            raise TypeError(f"options must be a WorldOptions, not {type(options).__name__}")
        return options
    return WorldOptions() if max_objects is None else WorldOptions(max_objects=max_objects)


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


def sample_layout(seed: int, max_objects: int | None = None, resolution: int = RESOLUTION,
                  options: WorldOptions | None = None) -> Layout:
    """The layout of one image, deterministic in (seed, options, resolution); `max_objects` alone is
    WorldOptions(max_objects=max_objects)."""
    opts = world_options(max_objects, options)
    m = opts.max_objects
    rng = np.random.default_rng(seed)
    # Draw all randomness up front in a few array calls: per-call overhead,
    # not arithmetic, dominates when rendering 100k layouts. New draws go after
    # the original ones, so the default options give the original layouts.
    n = int(rng.integers(opts.min_objects, m + 1))
    colors = rng.permutation(len(COLORS))[:n]
    shape_ids = rng.integers(len(SHAPES), size=m)
    lo, hi = opts.sides_px(resolution)
    sides = rng.integers(lo, hi + 1, size=m)
    u = rng.random((m, _PLACEMENT_TRIES, 2))                 # (M, T, 2) candidate positions in [0, 1)
    overlapping = rng.random(m) < opts.overlap               # (M,) placed to overlap an earlier box
    names = list(COLORS)

    objects: list[ShapeObject] = []
    for j, c in enumerate(colors):
        side = int(sides[j])
        xy = (u[j] * (resolution - side + 1)).astype(np.int64)  # (T, 2) top-left corners
        if opts.placement == "random" or (opts.placement == "mixed" and seed % 2 == 0):   # anywhere: the first candidate
            xy = xy[:1]
            ok = np.ones(1, dtype=bool)
        else:
            ok = _placeable(xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side, [o.box for o in objects],
                            overlap=bool(overlapping[j]) and bool(objects))
        if not ok.any():
            continue  # a failed placement drops this object: fewer objects, same seed
        x0, y0 = (int(v) for v in xy[ok.argmax()])  # first accepted candidate
        objects.append(ShapeObject(names[int(c)], SHAPES[int(shape_ids[j])], (x0, y0, x0 + side, y0 + side)))
    return Layout(seed=int(seed), resolution=resolution, objects=tuple(objects))


def _placeable(x0, y0, x1, y1, boxes: list[tuple[int, int, int, int]], overlap: bool) -> np.ndarray:
    """Which candidate boxes (arrays (T,)) may join `boxes`: apart from all of them, or (overlap) sharing
    at least _MIN_SHARED px each way with one of them and IoU <= _MAX_IOU with every one."""
    ok = np.ones(x0.shape, dtype=bool)                                   # (T,)
    if not overlap:
        for box in boxes:
            ok &= ~_too_close(x0, y0, x1, y1, box)
        return ok
    shares = np.zeros(x0.shape, dtype=bool)                              # (T,)
    for bx0, by0, bx1, by1 in boxes:
        iw = np.minimum(x1, bx1) - np.maximum(x0, bx0)                   # (T,) shared width, < 0 when apart
        ih = np.minimum(y1, by1) - np.maximum(y0, by0)
        shares |= (iw >= _MIN_SHARED) & (ih >= _MIN_SHARED)
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)
        union = (x1 - x0) * (y1 - y0) + (bx1 - bx0) * (by1 - by0) - inter
        ok &= inter <= _MAX_IOU * union
    return ok & shares


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


def _paint(masks: np.ndarray, color_ids: np.ndarray, tight: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) uint8 from masks (N, K, H, W), colour ids (N, K) and tight boxes (N, K, 4),
    by the depth rule: larger boxes are painted first; of equal areas, the earlier object first."""
    n, k = color_ids.shape
    area = (tight[..., 2] - tight[..., 0]) * (tight[..., 3] - tight[..., 1])              # (N, K)
    order = np.lexsort((np.broadcast_to(np.arange(k), (n, k)), -area), axis=-1)       # (N, K) paint order
    layer = np.argsort(order, axis=-1).astype(np.uint8) + 1                            # (N, K) 1 = painted first
    # The front object at a pixel is the covering one painted last (0: none covers it).
    front = np.where(masks, layer[..., None, None], np.uint8(0)).max(axis=1)          # (N, H, W)
    by_layer = np.concatenate([np.zeros((n, 1), np.int64), np.take_along_axis(color_ids, order, -1)], -1)
    index = np.take_along_axis(by_layer, front.reshape(n, -1).astype(np.int64), -1)   # (N, H*W) palette index
    return np.take(_PALETTE, index.reshape(front.shape), axis=0)                      # (N, H, W, 3)


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
    tight = _tight_boxes(masks)  # each object's full box, whatever covers it
    return _paint(masks, packed[2], tight), tight


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


def render_batch(seeds: Sequence[int], max_objects: int | None = None,
                 options: WorldOptions | None = None) -> tuple[np.ndarray, list[Record]]:
    """Images (N, H, W, 3) uint8 and records (no image path) for many seeds, in memory (`max_objects`
    alone is WorldOptions(max_objects=max_objects))."""
    opts = world_options(max_objects, options)
    seeds = [int(s) for s in seeds]
    images = np.empty((len(seeds), RESOLUTION, RESOLUTION, 3), dtype=np.uint8)  # (N, H, W, 3)
    records: list[Record] = []
    for start in range(0, len(seeds), _CHUNK):
        layouts = [sample_layout(s, options=opts) for s in seeds[start:start + _CHUNK]]
        chunk, tight = _render_many(layouts)
        images[start:start + len(layouts)] = chunk
        records.extend(_record(l, t, None, None) for l, t in zip(layouts, tight))
    return images, records


def write_dataset(folder: str | Path, n: int, seed: int = 0, max_objects: int | None = None,
                  options: WorldOptions | None = None) -> Path:
    """Write images/<seed:07d>.png and data.jsonl for seeds seed..seed+n-1; returns the manifest."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, records = render_batch(range(seed, seed + n), max_objects, options)
    out = []
    with out_of_space("the generated Shapes set's images", folder / "images"):   # data.jsonl last: redone if cut
        for image, record in zip(images, records):
            name = f"images/{record.seed:07d}.png"
            (folder / name).write_bytes(png_bytes(image))
            out.append(Record(record.caption, record.objects, image=name, id=record.id, seed=record.seed))
    return write_manifest(folder / "data.jsonl", out)


# --- held-out evaluation layouts ---------------------------------------------

HELDOUT_V2_SEED0 = 20_000_000
HELDOUT_V2_PATH = Path(__file__).parent / "heldout_v2.jsonl"
# The world of held-out v2: up to six objects, each after the first placed over an earlier one with
# probability 0.3, sides 6 to 16 px (3/16 to 1/2 of the image; the default world: 8 to 16 px).
HELDOUT_V2_OPTIONS = WorldOptions(max_objects=6, overlap=0.3, side=(0.1875, 0.5))
HELDOUT_V2_PER_BUCKET = 20
# (objects, overlap) of every v2 bucket: one object cannot overlap, so 11 buckets.
HELDOUT_V2_BUCKETS = tuple((k, o) for k in range(1, 7) for o in (False, True) if k > 1 or not o)


# How the v2 world's *training* layouts are drawn: the same rendering and depth rule, but crowded -- 2 to 6
# objects, each after the first placed over an earlier one with probability 0.6 -- so that overlaps and many
# objects, which held-out v2 weighs as much as the easy buckets, are not rare in training (docs/notes/harder-world.md).
V2_TRAINING_OPTIONS = WorldOptions(max_objects=6, min_objects=2, overlap=0.6, side=(0.1875, 0.5))


# The crowds' training layouts: 2 to 6 objects, half placed as the held-out crowds are (even seeds), half as the v2
# world's training layouts (odd seeds), so the apart and the bounded overlaps of held-out v2 stay in training.
CROWDS_TRAINING_OPTIONS = WorldOptions(max_objects=6, min_objects=2, overlap=0.6, side=(0.1875, 0.5), placement="mixed")


@dataclass(frozen=True)
class World:
    """A named Shapes world: how its training layouts are drawn and which held-out set (1 or 2) judges it."""
    training: WorldOptions
    heldout: int


# The Shapes worlds a run's `data` (and a base's `PretrainConfig.world`) may name.
WORLDS = {
    "shapes": World(WorldOptions(), heldout=1),              # the first world: 1-3 objects, apart
    "shapes-v2": World(V2_TRAINING_OPTIONS, heldout=2),      # up to 6 objects, overlapping, smaller in front
    "shapes-crowds": World(CROWDS_TRAINING_OPTIONS, heldout=3),  # half v2's layouts, half anywhere: any depth
}


def options_tag(options: WorldOptions) -> str:
    """8 hex digits that change whenever the options do (names a generated set, so a changed world never
    reuses a set written under other options). The default placement is left out of the text hashed, so the
    tags of sets written before `placement` existed stand."""
    text = repr(options) if options.placement != "ruled" else repr(options).replace(", placement='ruled'", "")
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def options_for_seed(seed: int) -> WorldOptions:
    """The world a held-out seed is rendered in: CROWDS_OPTIONS from CROWDS_SEED0 up, HELDOUT_V2_OPTIONS from
    HELDOUT_V2_SEED0 up, else the default."""
    return CROWDS_OPTIONS if seed >= CROWDS_SEED0 else HELDOUT_V2_OPTIONS if seed >= HELDOUT_V2_SEED0 else WorldOptions()


def write_heldout(n: int = 200, path: str | Path = HELDOUT_PATH) -> Path:
    """(Re)generate the shipped held-out file: seeds HELDOUT_SEED0.., ids heldout-000.."""
    layouts = [sample_layout(HELDOUT_SEED0 + i) for i in range(n)]
    _, tight = _render_many(layouts)
    records = [_record(l, t, None, f"heldout-{i:03d}") for i, (l, t) in enumerate(zip(layouts, tight))]
    return write_manifest(path, records)


def write_heldout_v2(per_bucket: int = HELDOUT_V2_PER_BUCKET, path: str | Path = HELDOUT_V2_PATH) -> Path:
    """(Re)generate the shipped held-out v2 file: the first `per_bucket` layouts of each bucket (object
    count, whether two requested boxes intersect) among seeds HELDOUT_V2_SEED0, +1, ... drawn with
    HELDOUT_V2_OPTIONS. Records interleave the buckets (the first 11 records hold one of each), with ids
    like "v2-3obj-overlap-0007" / "v2-3obj-apart-0007"."""
    found: dict[tuple[int, bool], list[Record]] = {b: [] for b in HELDOUT_V2_BUCKETS}
    open_counts = {k for k, _ in HELDOUT_V2_BUCKETS}  # object counts with a bucket still to fill
    seed = HELDOUT_V2_SEED0
    while open_counts:
        # The bucket needs the rendered (tight) boxes; render only the layouts of an open count.
        layouts = [layout for layout in (sample_layout(s, options=HELDOUT_V2_OPTIONS) for s in range(seed, seed + _CHUNK))
                   if len(layout.objects) in open_counts]
        tight = _render_many(layouts)[1] if layouts else []
        for layout, boxes in zip(layouts, tight):
            r = _record(layout, boxes, None, None)
            bucket = found[bucket_of(r)]
            if len(bucket) < per_bucket:
                bucket.append(r)
        open_counts = {k for (k, _), v in found.items() if len(v) < per_bucket}
        seed += _CHUNK
    out = [Record(r.caption, r.objects, id=f"v2-{k}obj-{'overlap' if o else 'apart'}-{i:04d}", seed=r.seed)
           for i in range(per_bucket) for (k, o) in HELDOUT_V2_BUCKETS for r in [found[k, o][i]]]
    return write_manifest(path, out)


# The held-out crowds: boxes placed uniformly at random (any overlap depth, one box inside another, boxes against
# the border), 1 to 6 objects of sides 6 to 16 px; 40 layouts of each object count, seeds from CROWDS_SEED0 up.
CROWDS_SEED0 = 30_000_000
CROWDS_PATH = Path(__file__).parent / "heldout_crowds.jsonl"
CROWDS_OPTIONS = WorldOptions(max_objects=6, side=(0.1875, 0.5), placement="random")
CROWDS_PER_COUNT = 40


def write_crowds(per_count: int = CROWDS_PER_COUNT, path: str | Path = CROWDS_PATH) -> Path:
    """(Re)generate the shipped held-out crowds (version 3): the first `per_count` layouts of each object count
    1-6 among seeds CROWDS_SEED0, +1, ... drawn with CROWDS_OPTIONS (random placement: how deep the overlaps
    go is left to chance, `data.buckets.depth_of` sorts them). Records interleave the counts (the first 6 hold
    one of each), ids like "crowd-4obj-0007"."""
    found: dict[int, list[Layout]] = {k: [] for k in range(1, CROWDS_OPTIONS.max_objects + 1)}
    seed = CROWDS_SEED0
    while any(len(v) < per_count for v in found.values()):
        layout = sample_layout(seed, options=CROWDS_OPTIONS)
        if len(found[len(layout.objects)]) < per_count:
            found[len(layout.objects)].append(layout)
        seed += 1
    layouts = [found[k][i] for i in range(per_count) for k in sorted(found)]
    _, tight = _render_many(layouts)
    records = [_record(l, t, None, f"crowd-{len(l.objects)}obj-{i // len(found):04d}")
               for i, (l, t) in enumerate(zip(layouts, tight))]
    return write_manifest(path, records)


HELDOUT_PATHS = {1: HELDOUT_PATH, 2: HELDOUT_V2_PATH, 3: CROWDS_PATH}


MIG_SHAPES_PATH = Path(__file__).parent / "mig_shapes.json"


def write_mig_shapes(path: str | Path = MIG_SHAPES_PATH) -> Path:
    """(Re)generate the shipped COCO-MIG layout file in the Shapes vocabulary: the held-out v2 layouts of 2 to 6
    objects (200: 40 per level L2-L6, half of each with overlapping boxes), in MIG-Bench's format, each layout's
    image_id its Shapes seed (so its ground truth is rendered: the ceiling)."""
    from adapterlib.data.mig import write_mig
    return write_mig(path, [r for r in heldout_records(version=2) if len(r.objects) >= 2])


def heldout_records(n: int | None = None, version: int = 1) -> list[Record]:
    """The shipped held-out records (first n if given): version 1 (heldout.jsonl, the default world), 2
    (heldout_v2.jsonl, stratified by object count and overlap) or 3 (heldout_crowds.jsonl, the random crowds)."""
    if version not in HELDOUT_PATHS:
        raise ValueError(f"version={version!r}: the held-out layouts are version 1, 2 or 3 (the crowds)")
    records = read_manifest(HELDOUT_PATHS[version], require_image=False)
    return records if n is None else records[:n]


def heldout_images(records: Sequence[Record], max_objects: int | None = None,
                   options: WorldOptions | None = None) -> np.ndarray:
    """Ground-truth renders (N, H, W, 3) uint8 of records, from their seeds, in the world of the options
    given, else each seed's own (`options_for_seed`: v1 and v2 held-out records may be mixed)."""
    if any(r.seed is None for r in records):
        raise ValueError("heldout_images needs records with a seed")
    given = None if options is None and max_objects is None else world_options(max_objects, options)
    worlds = [given or options_for_seed(r.seed) for r in records]
    images = np.empty((len(records), RESOLUTION, RESOLUTION, 3), dtype=np.uint8)  # (N, H, W, 3)
    for world in set(worlds):
        index = [i for i, w in enumerate(worlds) if w == world]
        images[index], rendered = render_batch([records[i].seed for i in index], options=world)
        # Guard against the shipped file and the sampler drifting apart.
        for i, g in zip(index, rendered):
            if records[i].objects != g.objects:
                raise ValueError(f"record {records[i].id!r} does not match the layout of seed {records[i].seed}; "
                                 "regenerate with write_heldout() / write_heldout_v2() / write_crowds()")
    return images
