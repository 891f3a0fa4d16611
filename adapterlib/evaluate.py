"""The evaluation core: layouts (records with one seed each), the images to measure (the ground truth,
the base alone, or the base with an adapter), and their grounding summary, side by side.

Held-out layout i is always sampled with seed i, everywhere in the project, so the base and every
adapter are compared on the same starting noise. A manifest record uses its "seed" field, or its
index when it has none. The detector that scores an image is `detector` (`datasets.load_detector`:
"color", the Shapes colour detector, by default; or a local zero-shot detection model folder):
success = the found box overlaps the requested one with IoU >= 0.5, AP@0.5 over the set.
Sampling settings are `sample.Sampling`'s, given as keyword arguments (steps, guidance, scale, tau).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import datasets
from .data import Record, read_manifest, resolve_image
from .detectors import Detector
from .paths import repo_path

SUMMARY_KEYS = ("success_rate", "miou", "ap50", "color_presence", "n_objects", "n_images")
REFERENCES = ("adapter", "base", "ground-truth")


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


@dataclass(frozen=True)
class Layouts:
    """Records to generate, with one sampling seed each. `manifest` (None for the held-out set) is
    where the ground-truth images of manifest records live."""
    records: list[Record]
    seeds: list[int]
    manifest: Path | None = None
    version: int = 1              # which shipped held-out set (manifest None): 1, or 2 (by object count x overlap)

    def __post_init__(self):
        if len(self.records) != len(self.seeds):
            raise ValueError(f"{len(self.records)} records but {len(self.seeds)} seeds: give one seed per record")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: slice) -> "Layouts":
        """`layouts[:4]`: the first four layouts, with their seeds."""
        if not isinstance(index, slice):
            raise TypeError("index Layouts with a slice (layouts[:4]); read single items from .records/.seeds")
        return Layouts(self.records[index], self.seeds[index], self.manifest, self.version)

    @property
    def source(self) -> str:
        if self.manifest is not None:
            return str(self.manifest)
        return "heldout" if self.version == 1 else f"heldout-v{self.version}"

    def ground_truth_images(self) -> list[np.ndarray] | np.ndarray:
        """Held-out layouts are rendered from their seeds. A manifest record's image file is its
        ground truth; a record without an image is rendered from its Shapes seed."""
        if self.manifest is None:
            return datasets.ground_truth_images(self.records)
        from PIL import Image
        images = []
        for i, r in enumerate(self.records):
            if r.image is not None:
                images.append(np.asarray(Image.open(resolve_image(self.manifest, r)).convert("RGB")))
            elif r.seed is not None:
                images.append(datasets.ground_truth_images([r])[0])
            else:
                raise ValueError(f"{self.manifest} record {i} (id {r.id!r}): no image and no seed, "
                                 "so there is no ground truth to measure")
        return images


def heldout_layouts(n: int | None = None, version: int = 1) -> Layouts:
    """The shipped held-out layouts (the first n if given): version 1 (200 layouts of the default world) or 2
    (220, stratified by object count 1-6 and overlap; the first 11 hold one of each bucket); layout i is
    sampled with seed i."""
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of layouts (or None for all)")
    records = datasets.heldout_records(n, version)
    return Layouts(records, list(range(len(records))), version=version)


def manifest_layouts(path: str | Path, n: int | None = None) -> Layouts:
    """The layouts of a manifest (JSON Lines; the first n if given). Images are optional; a record's
    seed is its "seed" field, or its index."""
    path = Path(path)
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of layouts (or None for all)")
    records = read_manifest(path, require_image=False)[:n]
    if not records:
        raise ValueError(f"{path}: no records")
    return Layouts(records, [r.seed if r.seed is not None else i for i, r in enumerate(records)], path)


def run_layouts(run: str | Path, n: int | None = None) -> Layouts:
    """The layouts a run is judged on: the held-out layouts of its Shapes world (v1 or v2), else the
    first n records of the run's own manifest (its boxes, its captions, its images as ground truth)."""
    from .runs import effective_config, resolve_run
    data = effective_config(resolve_run(run))["data"]
    if datasets.is_shapes(data):
        return heldout_layouts(n, datasets.heldout_version(data))
    return manifest_layouts(repo_path(data), n)


def images_for(layouts: Layouts, *, reference: str = "adapter", base=None, adapter=None, **sampling):
    """The images that `evaluate` measures: the ground truth, or samples of the base alone, or of the
    base with the adapter (sampling settings: steps, guidance, scale, tau)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: expected one of {list(REFERENCES)}")
    if reference == "ground-truth":
        return layouts.ground_truth_images()
    if reference == "adapter" and adapter is None:
        raise ValueError("reference='adapter' needs adapter= (e.g. load_checkpoint(run).adapter), "
                         "or use reference='base' for the base alone")
    if reference == "adapter" and (base is None or isinstance(base, (str, Path))):
        raise ValueError("reference='adapter' needs the BaseModel the adapter is attached to as base=")
    from .sample import generate
    base = load_base_for(base)
    return generate(base, layouts.records, layouts.seeds, adapter=adapter if reference == "adapter" else None,
                    **sampling)


def evaluate(layouts: Layouts, *, reference: str = "adapter", base=None, adapter=None,
             detector: str | Path | Detector = "color", **sampling) -> tuple[pd.DataFrame, dict]:
    """Grounding of one thing (the ground truth, the base alone, or an adapter) on `layouts`: the
    per-object table and the summary. `base` is a loaded BaseModel, or for reference='base' also a
    name or folder (None: the shipped shapes-tiny). At scale 0 the adapter never runs, so its images
    are exactly the base's. `detector`: a Detector or a spec for `datasets.load_detector` (loaded
    first, so a bad folder is an error before any sampling)."""
    detector = datasets.load_detector(detector)
    images = images_for(layouts, reference=reference, base=base, adapter=adapter, **sampling)
    return datasets.measure(images, layouts.records, detector)


COMPARE_COLUMNS = ["name", "reference", "scale", "tau", *SUMMARY_KEYS]


def compare(layouts: Layouts, base, adapter, *, scales=(0.0, 0.5, 1.0, 1.5), taus=(1.0,), progress: bool = False,
            detector: str | Path | Detector = "color", **sampling) -> pd.DataFrame:
    """One row per thing measured, in this order: the ground truth, the base alone, then the adapter at
    each tau and each scale (a success-vs-scale curve per tau). The base and ground-truth rows have
    NaN scale and tau. An adapter at scale 0 is the base alone (same images): that row reuses the
    base's numbers rather than sampling again. `detector` (loaded once) measures every row."""
    scales, taus = [float(s) for s in scales], [float(t) for t in taus]
    detector = datasets.load_detector(detector)
    nan = float("nan")
    rows = [dict(name="ground truth", reference="ground-truth", scale=nan, tau=nan,
                 **evaluate(layouts, reference="ground-truth", detector=detector)[1])]
    base_summary = evaluate(layouts, reference="base", base=base, detector=detector, **sampling)[1]
    rows.append(dict(name="base alone", reference="base", scale=nan, tau=nan, **base_summary))
    for tau in taus:
        for scale in scales:
            if progress:
                print(f"adapter at scale {scale:g}, tau {tau:g}", flush=True)
            summary = base_summary if scale == 0 else evaluate(
                layouts, reference="adapter", base=base, adapter=adapter, detector=detector,
                **{**sampling, "scale": scale, "tau": tau})[1]
            rows.append(dict(name=f"adapter scale {scale:g} tau {tau:g}", reference="adapter", scale=scale,
                             tau=tau, **summary))
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def load_base_for(base, device: str | None = None):
    """A BaseModel from a BaseModel, a name/folder for load_base, or None (the shipped default)."""
    if base is not None and not isinstance(base, (str, Path)):
        return base
    from .base import load_base
    from .precision import resolve_device
    return load_base(base or "shapes-tiny", device=resolve_device(device))
