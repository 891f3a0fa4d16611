"""The evaluation core: layouts (records with one seed each), the images to measure (the ground truth,
the base alone, or the base with an adapter), and their grounding summary, side by side.

Held-out layout i is always sampled with seed i, everywhere in the project, so the base and every
adapter are compared on the same starting noise. A manifest record uses its "seed" field, or its
index when it has none. The detector that scores an image is `detector` (`worlds.load_detector`:
"color", the Shapes colour detector, by default; or a local zero-shot detection model folder):
success = the found box overlaps the requested one with IoU >= 0.5, AP@0.5 over the set.
Sampling settings are `sample.Sampling`'s, given as keyword arguments (steps, guidance, scale, tau,
grounding_guidance).

What a run is judged on (`run_layouts`) and by what (`run_detector`) come from its config: `heldout` (a
manifest path, v1, v2 or crowds; "" = the held-out set of its Shapes world, or for a run on a manifest its own first
training records, which every title then marks "(training records: not held out)") and `detector` ("" = the
colour detector). The base alone is sampled once per base, layouts, seeds and settings and kept on disk
(`basecache`), so a second evaluation does not sample it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adapterlib.training import worlds
from adapterlib.data.manifest import Record, resolve_image
from adapterlib.data.mig import PROTOCOL as MIG, read_layouts
from adapterlib.model.detectors import Detector
from adapterlib.training.evalspec import HELDOUT_SETS, NOT_HELD_OUT, check_detector, check_heldout, detector_spec  # noqa: F401 (API)
from adapterlib.paths import repo_path

SUMMARY_KEYS = ("success_rate", "miou", "o_miou", "ap50", "color_presence", "n_objects", "n_images")
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
    version: int = 1              # which shipped held-out set (manifest None): 1, 2 (by object count x overlap), 3 (crowds)
    held_out: bool = True         # False: the run's own training records (its `source` says so)
    protocol: str | None = None   # "coco-mig": a MIG layout file, measured also the MIG way (`protocols`)

    def __post_init__(self):
        if len(self.records) != len(self.seeds):
            raise ValueError(f"{len(self.records)} records but {len(self.seeds)} seeds: give one seed per record")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: slice) -> "Layouts":
        """`layouts[:4]`: the first four layouts, with their seeds."""
        if not isinstance(index, slice):
            raise TypeError("index Layouts with a slice (layouts[:4]); read single items from .records/.seeds")
        return Layouts(self.records[index], self.seeds[index], self.manifest, self.version, self.held_out,
                       self.protocol)

    @property
    def has_ground_truth(self) -> bool:
        """Whether every layout has a ground truth to measure (an image, or a Shapes seed to render): the
        ceiling. A COCO-MIG file has none (its layouts come without images)."""
        return self.manifest is None or all(r.image is not None or r.seed is not None for r in self.records)

    @property
    def source(self) -> str:
        """Where the layouts come from, as every table's title names them: a manifest path (with
        "(training records: not held out)" when it is the run's training data), heldout, heldout-v2 or
        heldout-crowds."""
        if self.manifest is not None:
            return str(self.manifest) + ("" if self.held_out else f" {NOT_HELD_OUT}")
        return {1: "heldout", 2: "heldout-v2", 3: "heldout-crowds"}[self.version]

    @property
    def title(self) -> str:
        """One line for the top of a table: how many layouts, from where."""
        return f"{len(self)} layouts of {self.source}"

    def ground_truth_images(self) -> list[np.ndarray] | np.ndarray:
        """Held-out layouts are rendered from their seeds. A manifest record's image file is its
        ground truth; a record without an image is rendered from its Shapes seed."""
        if self.manifest is None:
            return worlds.ground_truth_images(self.records)
        from PIL import Image
        images = []
        for i, r in enumerate(self.records):
            if r.image is not None:
                images.append(np.asarray(Image.open(resolve_image(self.manifest, r)).convert("RGB")))
            elif r.seed is not None:
                images.append(worlds.ground_truth_images([r])[0])
            else:
                raise ValueError(f"{self.manifest} record {i} (id {r.id!r}): no image and no seed, "
                                 "so there is no ground truth to measure")
        return images


def heldout_layouts(n: int | None = None, version: int = 1) -> Layouts:
    """The shipped held-out layouts (the first n if given): version 1 (200 layouts of the default world), 2
    (220, stratified by object count 1-6 and overlap; the first 11 hold one of each bucket) or 3 (the random
    crowds: 240, 40 of each object count 1-6, the first 6 one of each); layout i is sampled with seed i."""
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of layouts (or None for all)")
    records = worlds.heldout_records(n, version)
    return Layouts(records, list(range(len(records))), version=version)


def default_layouts(n: int | None = None) -> Layouts:
    """The layouts when neither a run nor layouts are given (`evaluate --reference ...`, `--gligen` on shapes-tiny):
    the held-out set of the default preset's world (shapes-v2: held-out v2, the set the README's ceiling and the
    default run are measured on)."""
    from adapterlib.training.config import default_preset, preset_value
    return heldout_layouts(n, worlds.heldout_version(preset_value(default_preset(), "data")))


def manifest_layouts(path: str | Path, n: int | None = None) -> Layouts:
    """The layouts of a manifest (JSON Lines) or of a COCO-MIG layout file (`data.mig`: its protocol is then
    "coco-mig"), the first n if given. Images are optional; a record's seed is its "seed" field (a MIG layout in
    the Shapes vocabulary: its image_id, rendered for the ceiling), or its index."""
    path = Path(path)
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of layouts (or None for all)")
    records, protocol = read_layouts(path, n, renderable=worlds.renders_phrases)
    if not records:
        raise ValueError(f"{path}: no records")
    return Layouts(records, [r.seed if r.seed is not None else i for i, r in enumerate(records)], path,
                   protocol=protocol)


def named_layouts(spec: str | Path, n: int | None = None) -> Layouts:
    """Layouts by name: v1 / v2 / crowds (also heldout / heldout-v2 / heldout-crowds: the shipped held-out sets) or a
    manifest path."""
    if str(spec) in HELDOUT_SETS:
        return heldout_layouts(n, HELDOUT_SETS[str(spec)])
    return manifest_layouts(repo_path(spec), n)


def run_layouts(run: str | Path, n: int | None = None) -> Layouts:
    """The layouts a run is judged on: its `heldout` field (a manifest, v1, v2 or crowds) when set; else
    the held-out layouts of its Shapes world (v1, v2 or crowds); else the first n records of the run's own manifest
    (its boxes, captions and images), marked as not held out (`Layouts.source`)."""
    from adapterlib.runs import effective_config, resolve_run
    config = effective_config(resolve_run(run))
    data, heldout = config["data"], config.get("heldout", "")       # a run saved before `heldout`: ""
    if heldout:
        layouts = named_layouts(heldout, n)
        if layouts.manifest is not None and not worlds.is_shapes(data) and _same_file(layouts.manifest, data):
            layouts = Layouts(layouts.records, layouts.seeds, layouts.manifest, held_out=False)
        return layouts
    if worlds.is_shapes(data):
        return heldout_layouts(n, worlds.heldout_version(data))
    layouts = manifest_layouts(repo_path(data), n)
    return Layouts(layouts.records, layouts.seeds, layouts.manifest, held_out=False)


def _same_file(a: Path, b: str) -> bool:
    try:
        return Path(a).resolve() == repo_path(b).resolve()
    except OSError:
        return False


def run_detector(run: str | Path | None = None, detector: str | Path | None = None) -> str:
    """The detector spec that measures a run: `detector` when given (not None or ""), else the run's
    `detector` field, else "color" (the Shapes colour detector); a folder comes back as its full path."""
    spec = str(detector) if detector not in (None, "") else ""
    if not spec and run is not None:
        from adapterlib.runs import effective_config, resolve_run
        spec = effective_config(resolve_run(run)).get("detector", "")
    return detector_spec(spec)


def check_measurable(detector: Detector, layouts: Layouts) -> None:
    """Stop, before any sampling, when `detector` can measure none of the objects of `layouts` (the
    colour detector on phrases that name no colour): the result would be an empty table."""
    phrases = [o.phrase for r in layouts.records for o in r.objects]
    if phrases and not any(detector.measurable(p) for p in phrases):
        raise ValueError(
            f"the {detector.name} detector can measure none of the {len(phrases)} objects of {layouts.title} "
            f"(e.g. {phrases[0]!r}: it finds an object by a colour word in its phrase), so every grounding number "
            "would be empty. Give a zero-shot detector folder (OWL-ViT / OWLv2): --detector DIR (evaluate), "
            "-p detector DIR (notebooks 04, 05), detector=DIR (probe_checkpoint, grounding_vs_step), or the "
            "run's `detector` field (free on resume); docs/guide/real-data.md")


def images_for(layouts: Layouts, *, reference: str = "adapter", base=None, adapter=None, cache: bool = True,
               **sampling):
    """The images that `evaluate` measures: the ground truth, or samples of the base alone, or of the
    base with the adapter (sampling settings: steps, guidance, scale, tau). The base alone's samples are
    kept on disk and reused (`basecache.base_images`; `cache=False`: always sampled)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: expected one of {list(REFERENCES)}")
    if reference == "ground-truth":
        return layouts.ground_truth_images()
    if reference == "adapter" and adapter is None:
        raise ValueError("reference='adapter' needs adapter= (e.g. load_checkpoint(run).adapter), "
                         "or use reference='base' for the base alone")
    if reference == "adapter" and (base is None or isinstance(base, (str, Path))):
        raise ValueError("reference='adapter' needs the BaseModel the adapter is attached to as base=")
    from adapterlib.model.sample import generate
    base = load_base_for(base)
    if reference == "base":
        from adapterlib.evaluation.basecache import base_images
        return base_images(base, layouts.records, layouts.seeds, cache=cache, **sampling)
    return generate(base, layouts.records, layouts.seeds, adapter=adapter, **sampling)


def evaluate(layouts: Layouts, *, reference: str = "adapter", base=None, adapter=None,
             detector: str | Path | Detector = "color", segmenter=None, **sampling) -> tuple[pd.DataFrame, dict]:
    """Grounding of one thing (the ground truth, the base alone, or an adapter) on `layouts`: the
    per-object table and the summary. `base` is a loaded BaseModel, or for reference='base' also a
    name or folder (None: the shipped shapes-tiny). At scale 0 the adapter never runs, so its images
    are exactly the base's. `detector`: a Detector or a spec for `worlds.load_detector` (loaded
    first, so a bad folder is an error before any sampling; one that can measure none of the objects is an
    error too, `check_measurable`). Layouts of a COCO-MIG file are measured also the MIG way: the summary's
    "levels" (`protocols.measure_mig`; `segmenter`, a SAM `BoxSegmenter`, gives the colour check's region)."""
    detector = worlds.load_detector(detector)
    check_measurable(detector, layouts)
    images = images_for(layouts, reference=reference, base=base, adapter=adapter, **sampling)
    table, summary = worlds.measure(images, layouts.records, detector)
    if layouts.protocol == MIG:
        from adapterlib.evaluation.protocols import measure_mig
        summary["levels"] = measure_mig(images, layouts.records, detector, segmenter)[1]
    return table, summary


COMPARE_COLUMNS = ["name", "reference", "scale", "tau", *SUMMARY_KEYS]


class SampleSet:
    """The images of one set of layouts, each kind sampled once and reused: the ground truth, the base alone
    (through the on-disk cache, `basecache`), and an adapter at a (scale, tau, grounding guidance). An adapter
    at scale 0 (or tau 0) is the base alone by construction, so it is the base's images. `measure` scores
    the first n of them with the detector, also once. What a notebook that shows and measures the same
    images several times (05) holds: `images(...)` and `measure(...)` take the same arguments.

        book = SampleSet(layouts, base, detector="color", steps=25)
        grid = [book.images(adapter, scale=s) for s in (0, 0.5, 1)]       # sampled here
        table, summary = book.measure(adapter, scale=1)                   # measured, not sampled again
    """

    def __init__(self, layouts: Layouts, base, *, detector: str | Path | Detector = "color", **sampling):
        from adapterlib.model.sample import Sampling
        self.layouts, self.base = layouts, base
        self.detector = worlds.load_detector(detector)
        check_measurable(self.detector, layouts)
        self.sampling = Sampling.of(**sampling)
        self._images, self._measured = {}, {}
        self.sampled = 0                       # images sampled so far (the base alone's cached ones not counted)

    def _key(self, what, **settings):
        """What `what`'s images are keyed on: "ground-truth", "base", or the adapter with its settings (as
        `Sampling` reads them: an earlier spelling of grounding_guidance is the same key)."""
        if isinstance(what, str):
            if what not in ("ground-truth", "base"):
                raise ValueError(f"{what!r}: give 'ground-truth', 'base' or an adapter")
            return what
        s = self._sampling(**settings)
        if s.scale == 0 or s.tau == 0:
            return "base"
        return (id(what), float(s.scale), float(s.tau), s.grounding_guidance)

    def _sampling(self, *, scale: float = 1.0, tau: float = 1.0, grounding_guidance: str = "base"):
        from adapterlib.model.sample import Sampling
        return Sampling.of(self.sampling, scale=scale, tau=tau, grounding_guidance=grounding_guidance)

    def images(self, what="base", *, scale: float = 1.0, tau: float = 1.0, grounding_guidance: str = "base",
               n: int | None = None):
        """The images (first n) of `what`: "ground-truth", "base", or an adapter attached to the base, sampled
        at (scale, tau, grounding_guidance: `options.GROUNDING_GUIDANCE`) the first time they are asked for."""
        settings = dict(scale=scale, tau=tau, grounding_guidance=grounding_guidance)
        key = self._key(what, **settings)
        if key not in self._images:
            if key == "ground-truth":
                images = self.layouts.ground_truth_images()
            elif key == "base":
                images = images_for(self.layouts, reference="base", base=self.base, **self.sampling.key())
            else:
                from adapterlib.model.sample import generate
                images = generate(self.base, self.layouts.records, self.layouts.seeds, adapter=what,
                                  sampling=self._sampling(**settings))
                self.sampled += len(images)
            self._images[key] = (images, what)          # `what` kept: its id stays the adapter's while cached
        return self._images[key][0][:n]

    def measure(self, what="base", *, n: int | None = None, **settings) -> tuple[pd.DataFrame, dict]:
        """(per-object table, summary) of the first n images of `what` (`images`' arguments)."""
        key = (self._key(what, **settings), n)
        if key not in self._measured:
            images = self.images(what, n=n, **settings)
            self._measured[key] = worlds.measure(images, self.layouts.records[:n], self.detector)
        return self._measured[key]

    def compare(self, adapter, *, scales=(0.0, 0.5, 1.0, 1.5), taus=(1.0,), n: int | None = None,
                progress: bool = False, grounding_guidance: str = "base") -> pd.DataFrame:
        """`compare`'s table on the first n layouts: ground truth, base alone, the adapter at each tau and scale."""
        nan = float("nan")
        rows = [dict(name="ground truth", reference="ground-truth", scale=nan, tau=nan,
                     **self.measure("ground-truth", n=n)[1]),
                dict(name="base alone", reference="base", scale=nan, tau=nan, **self.measure("base", n=n)[1])]
        for tau in [float(t) for t in taus]:
            for scale in [float(s) for s in scales]:
                if progress:
                    print(f"adapter at scale {scale:g}, tau {tau:g}", flush=True)
                rows.append(dict(name=f"adapter scale {scale:g} tau {tau:g}", reference="adapter", scale=scale,
                                 tau=tau, **self.measure(adapter, n=n, scale=scale, tau=tau,
                                                         grounding_guidance=grounding_guidance)[1]))
        return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def compare(layouts: Layouts, base, adapter, *, scales=(0.0, 0.5, 1.0, 1.5), taus=(1.0,), progress: bool = False,
            detector: str | Path | Detector = "color", **sampling) -> pd.DataFrame:
    """One row per thing measured, in this order: the ground truth, the base alone, then the adapter at
    each tau and each scale (a success-vs-scale curve per tau). The base and ground-truth rows have
    NaN scale and tau. An adapter at scale 0 is the base alone (same images): that row reuses the
    base's numbers rather than sampling again. `detector` (loaded once) measures every row.
    Sampling settings (steps, guidance, grounding_guidance) as keywords (`SampleSet`)."""
    grounding_guidance = sampling.pop("grounding_guidance", "base")
    sampling.pop("scale", None), sampling.pop("tau", None)             # each row's own
    book = SampleSet(layouts, base, detector=detector, **sampling)
    return book.compare(adapter, scales=scales, taus=taus, progress=progress, grounding_guidance=grounding_guidance)


def load_base_for(base, device: str | None = None):
    """A BaseModel from a BaseModel, a name/folder for load_base, or None (the shipped default)."""
    if base is not None and not isinstance(base, (str, Path)):
        return base
    from adapterlib.model.base import load_base
    from adapterlib.model.precision import resolve_device
    return load_base(base or "shapes-tiny", device=resolve_device(device))
