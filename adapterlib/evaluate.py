"""Measuring grounding: did the object land in the requested box?

A miniature of GLIGEN's YOLO-AP evaluation for the Shapes world. Because
every Shapes colour appears at most once per image, a "detector" only has to
find the largest blob of the phrase's colour: each pixel takes the nearest
palette colour (if close enough, and closer than the background), blobs are
4-connected components, and a requested object counts as a success when the
found box overlaps the requested box with IoU >= 0.5.

Images are uint8 RGB numpy arrays, (N, H, W, 3) or a list of (H, W, 3);
convert generated float tensors in [0, 1] with (x * 255).round() first.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from .data import Record
from .shapes import BACKGROUND, COLORS

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


def color_of(phrase: str) -> str | None:
    """The palette colour named in a phrase ("a red circle" -> "red"), else None."""
    for word in re.findall(r"[a-z]+", phrase.lower()):
        if word in COLORS:
            return word
    return None


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


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


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


SUMMARY_KEYS = ("success_rate", "miou", "color_presence", "n_objects", "n_images")


def format_summary(rows: dict[str, dict]) -> str:
    """Named summaries as an aligned text table, one row each (e.g. ground truth / base / adapter)."""
    keys = [k for k in SUMMARY_KEYS if any(k in s for s in rows.values())]
    header = ["", *keys]
    body = [[name, *(_fmt(s.get(k)) for k in keys)] for name, s in rows.items()]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = []
    for r in [header, *body]:
        # Left-align the name column, right-align the numbers.
        cells = [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{value:.3f}"


# ----------------------------------------------------------------------------------------------
# The evaluation API: layouts (records + one seed each), then the ground truth, the base alone or an
# adapter on them. torch and the sampler are imported inside the functions that sample, so that
# ground-truth evaluation stays free of torch.

REFERENCES = ("adapter", "base", "ground-truth")


@dataclass(frozen=True)
class Layouts:
    """Records to generate, with one sampling seed each.

    Held-out layout i is always sampled with seed i, everywhere in the project, so the base and
    every adapter are compared on the same starting noise. A manifest record uses its "seed"
    field, or its index when it has none. `manifest` (None for the held-out set) is where the
    ground-truth images of manifest records live."""
    records: list[Record]
    seeds: list[int]
    manifest: Path | None = None

    def __post_init__(self):
        if len(self.records) != len(self.seeds):
            raise ValueError(f"{len(self.records)} records but {len(self.seeds)} seeds: give one seed per record")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: slice) -> "Layouts":
        """`layouts[:4]`: the first four layouts, with their seeds."""
        if not isinstance(index, slice):
            raise TypeError("index Layouts with a slice (layouts[:4]); read single items from .records/.seeds")
        return Layouts(self.records[index], self.seeds[index], self.manifest)

    @property
    def source(self) -> str:
        return "heldout" if self.manifest is None else str(self.manifest)

    def ground_truth_images(self) -> list[np.ndarray] | np.ndarray:
        """Held-out layouts are rendered from their seeds. A manifest record's image file is its
        ground truth; a record without an image is rendered from its Shapes seed."""
        from .shapes import heldout_images
        if self.manifest is None:
            return heldout_images(self.records)
        from PIL import Image

        from .data import resolve_image
        images = []
        for i, r in enumerate(self.records):
            if r.image is not None:
                images.append(np.asarray(Image.open(resolve_image(self.manifest, r)).convert("RGB")))
            elif r.seed is not None:
                images.append(heldout_images([r])[0])
            else:
                raise ValueError(f"{self.manifest} record {i} (id {r.id!r}): no image and no seed, "
                                 "so there is no ground truth to measure")
        return images


def heldout_layouts(n: int | None = None) -> Layouts:
    """The shipped held-out layouts (the first n if given); layout i is sampled with seed i."""
    from .shapes import heldout_records
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of layouts (or None for all)")
    records = heldout_records(n)
    return Layouts(records, list(range(len(records))))


def manifest_layouts(path: str | Path, n: int | None = None) -> Layouts:
    """The layouts of a manifest (JSON Lines, the foundation's format; the first n if given).
    Images are optional; a record's seed is its "seed" field, or its index."""
    from .data import read_manifest
    path = Path(path)
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of layouts (or None for all)")
    records = read_manifest(path, require_image=False)[:n]
    if not records:
        raise ValueError(f"{path}: no records")
    return Layouts(records, [r.seed if r.seed is not None else i for i, r in enumerate(records)], path)


def images_for(layouts: Layouts, *, reference: str = "adapter", base=None, adapter=None, scale: float = 1.0,
               tau: float = 1.0, steps: int = 25, guidance: float = 3.0):
    """The images that `evaluate` measures: the ground truth, or samples of the base alone, or of the
    base with the adapter at `scale` (grounded for the first `tau` of the steps)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: expected one of {list(REFERENCES)}")
    if reference == "ground-truth":
        return layouts.ground_truth_images()
    if reference == "adapter" and adapter is None:
        raise ValueError("reference='adapter' needs adapter= (e.g. load_checkpoint(run).adapter), "
                         "or use reference='base' for the base alone")
    if reference == "adapter" and (base is None or isinstance(base, (str, Path))):
        raise ValueError("reference='adapter' needs the BaseModel the adapter is attached to as base=")
    from . import sample
    base = load_base_for(base)
    return sample.generate(base, layouts.records, layouts.seeds, adapter=adapter if reference == "adapter" else None,
                           scale=scale, tau=tau, steps=steps, guidance=guidance)


def evaluate(layouts: Layouts, *, reference: str = "adapter", base=None, adapter=None, scale: float = 1.0,
             tau: float = 1.0, steps: int = 25, guidance: float = 3.0) -> tuple[pd.DataFrame, dict]:
    """Grounding of one object (the ground truth, the base alone, or an adapter) on `layouts`:
    the per-object table and the summary of `evaluate_grounding`.

    `base` is a loaded BaseModel, or for reference='base' also a name or folder for `load_base`
    (None: the shipped shapes-tiny). At scale 0 the adapter is never called, so its images are
    exactly the base's."""
    images = images_for(layouts, reference=reference, base=base, adapter=adapter, scale=scale, tau=tau,
                        steps=steps, guidance=guidance)
    return evaluate_grounding(images, layouts.records)


COMPARE_COLUMNS = ["name", "reference", "scale", "tau", *SUMMARY_KEYS]


def compare(layouts: Layouts, base, adapter, *, scales=(0.0, 0.5, 1.0, 1.5), taus=(1.0,), steps: int = 25,
            guidance: float = 3.0, progress: bool = False) -> pd.DataFrame:
    """One row per object, in this order: the ground truth, the base alone, then the adapter at each
    tau and each scale (the numbers of a success-vs-scale curve per tau). The base and ground-truth
    rows have NaN scale and tau. An adapter at scale 0 is the base alone (same images), so that
    row reuses the base's numbers rather than sampling again."""
    scales, taus = [float(s) for s in scales], [float(t) for t in taus]
    kw = dict(steps=steps, guidance=guidance)
    nan = float("nan")
    rows = [dict(name="ground truth", reference="ground-truth", scale=nan, tau=nan,
                 **evaluate(layouts, reference="ground-truth")[1])]
    base_summary = evaluate(layouts, reference="base", base=base, **kw)[1]
    rows.append(dict(name="base alone", reference="base", scale=nan, tau=nan, **base_summary))
    for tau in taus:
        for scale in scales:
            if progress:
                print(f"adapter at scale {scale:g}, tau {tau:g}", flush=True)
            summary = base_summary if scale == 0 else evaluate(
                layouts, reference="adapter", base=base, adapter=adapter, scale=scale, tau=tau, **kw)[1]
            rows.append(dict(name=f"adapter scale {scale:g} tau {tau:g}", reference="adapter", scale=scale,
                             tau=tau, **summary))
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


@dataclass
class Checkpoint:
    """An adapter loaded from a run's checkpoint, attached to the run's base."""
    base: object          # BaseModel
    adapter: object       # SpatialAdapter, attached to base.unet
    run_dir: Path
    step: int
    path: Path

    @property
    def name(self) -> str:
        return f"{self.run_dir.name} step {self.step}"


def load_checkpoint(run: str | Path | None = None, which: str | int = "latest", *, base=None,
                    device: str | None = None) -> Checkpoint:
    """The adapter of `run` (a run folder; None: the latest run) at `which` (latest | final | a step),
    on the run's base model. Pass `base` (a BaseModel already loaded for the same base) to attach a
    second checkpoint to the same model: only the adapter that is injecting acts."""
    import json

    from .checkpoint import load_adapter, resolve_checkpoint
    from .train import find_latest_run, resolve_run

    run_dir = find_latest_run() if run in (None, "") else resolve_run(run)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    step, path = resolve_checkpoint(run_dir, str(which))
    if base is None:
        base = load_base_for(config["base_model"], device)
    return Checkpoint(base, load_adapter(path, base), run_dir, step, path)


def parse_checkpoint_spec(spec: str, run_dir: Path) -> tuple[Path, str]:
    """`"500"`, `"latest"`, `"final"` -> that checkpoint of `run_dir`; `"runs/other"` -> its latest;
    `"runs/other:500"` -> that step of another run."""
    from .train import resolve_run
    spec = str(spec).strip()
    if spec.isdigit() or spec in ("latest", "final"):
        return Path(run_dir), spec
    run, _, which = spec.partition(":")
    return resolve_run(run), which or "latest"


def load_base_for(base, device: str | None = None):
    """A BaseModel from a BaseModel, a name/folder for load_base, or None (the shipped default)."""
    if base is not None and not isinstance(base, (str, Path)):
        return base
    import torch

    from .base import load_base
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_base(base or "shapes-tiny", device=device)
