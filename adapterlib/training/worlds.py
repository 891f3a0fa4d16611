"""The one seam between the generic path and the Shapes world.

A run's `data` is a manifest path (any grounded data set in the manifest format) or "shapes" (the
embedded default: a generated Shapes set). What the generic path needs from a world goes through here:
- `training_manifest`: the manifest to train on (a Shapes set is written once under the runs root);
- `sample_records`: the layouts a run samples (and measures) at each checkpoint (its held-out layouts, or
  the first records of the run's manifest);
- `heldout_records` / `ground_truth_images`: the shipped held-out layouts (version 1, or version 2:
  stratified by object count and overlap, for `buckets.bucket_report`) and their renders;
- `load_detector` / `measure`: the detector that scores grounding ("color": the Shapes colour detector,
  the default; or a local zero-shot detection model folder: OWL-ViT, OWLv2, GroundingDINO) and its
  per-object table and summary.
The Shapes world is imported here, inside these functions, and nowhere on the generic path.
"""
from __future__ import annotations

from pathlib import Path

from adapterlib.data.manifest import Record
from adapterlib.model.detectors import (GROUNDING_DINO_TYPES, Detector, ZeroShotDetector, check_detector_folder,
                                        score_grounding)
from adapterlib.paths import repo_path

SHAPES = "shapes"


def shapes_world(data: str):
    """The Shapes world (`shapes.World`: training options, held-out version) a run's `data` names, else None."""
    from adapterlib.shapes import WORLDS
    return WORLDS.get(data)


def is_shapes(data: str) -> bool:
    return shapes_world(data) is not None


def heldout_version(data: str) -> int:
    """The held-out set (1 or 2) that judges a run on the Shapes world `data`."""
    return shapes_world(data).heldout


def training_manifest(data: str, n_train: int, root: Path, started_with: str | Path | None = None) -> Path:
    """The manifest of `data`: a path as given, or for a Shapes world a set of `n_train` images drawn with the
    world's training options, written (once) to `root/_datasets/<world>-<n_train>-<options tag>/`.
    `started_with`: on resume, the manifest the run started with (its data report). If the world's training options
    have changed since (another tag), the run keeps that set while it exists, so it resumes on the data it started
    with; if it is gone, that is an error (a regenerated set would be other data)."""
    world = shapes_world(data)
    if world is None:
        return repo_path(data)
    from adapterlib.shapes import options_tag, write_dataset
    folder = Path(root) / "_datasets" / f"{data}-{n_train}-{options_tag(world.training)}"
    if started_with is not None and Path(started_with).parent.name != folder.name:
        if Path(started_with).is_file():
            return Path(started_with)
        raise FileNotFoundError(
            f"data {data!r}: the run started on {started_with}, a set drawn with other options than the world's "
            f"training options now ({folder.name}); that set is gone, so the run cannot resume on the data it "
            "started with. Restore that folder, or start a new run_name")
    if not (folder / "data.jsonl").is_file():
        write_dataset(folder, n_train, seed=0, options=world.training)
    return folder / "data.jsonl"


def sample_records(data: str, records: list[Record], n: int, heldout: str = "") -> list[Record]:
    """What a run samples (and measures: `checkpoint_grounding`) at each checkpoint, layout i with seed i: the
    first n layouts of its `heldout` field when set (v1, v2, crowds, a manifest or a COCO-MIG file), else of its Shapes
    world's held-out set, else the first n of its (verified) training records (their boxes, drawn on the samples,
    show the grounding)."""
    if n <= 0:
        return []
    if heldout:
        from adapterlib.data.mig import read_layouts
        from adapterlib.training.evalspec import HELDOUT_SETS
        if heldout in HELDOUT_SETS:
            return heldout_records(n, HELDOUT_SETS[heldout])
        return read_layouts(repo_path(heldout), n)[0]
    return heldout_records(n, heldout_version(data)) if is_shapes(data) else list(records[:n])


def heldout_records(n: int | None = None, version: int = 1) -> list[Record]:
    """The shipped held-out Shapes layouts (the first n if given): version 1 (200 layouts of the default
    world) or 2 (220 layouts, 20 in each bucket of object count 1-6 and overlap; the first 11 hold one of
    each bucket)."""
    from adapterlib.shapes import heldout_records as shipped
    return shipped(n, version)


def renders_phrases(phrases: list[str]) -> bool:
    """Whether the Shapes world can render these phrases: each names a palette colour and a shape."""
    from adapterlib.shapes.world import color_of, shape_of
    return all(color_of(p) and shape_of(p) for p in phrases)


def ground_truth_images(records: list[Record]):
    """The renders (N, H, W, 3) uint8 of Shapes records, from their seeds (each in its seed's world)."""
    from adapterlib.shapes import heldout_images
    return heldout_images(records)


def load_detector(spec: str | Path | Detector = "color", device: str | None = None) -> Detector:
    """A detector: "color" or "" (the Shapes colour detector), a folder with a local OWL-ViT / OWLv2 model
    (`detectors.ZeroShotDetector`, on `device`) or GroundingDINO model (`grounding_dino.GroundingDinoDetector`,
    with the COCO-MIG protocol's thresholds), chosen by its config.json's model_type before anything loads, or a
    Detector, returned as it is."""
    if isinstance(spec, Detector):
        return spec
    if str(spec) in ("color", ""):
        from adapterlib.shapes.detector import ColorDetector
        detector = ColorDetector()
        detector.spec = "color"
        return detector
    if check_detector_folder(Path(spec)) in GROUNDING_DINO_TYPES:    # a bad folder: its clear error, nothing loaded
        from adapterlib.model.grounding_dino import GroundingDinoDetector
        return GroundingDinoDetector(spec, device=device)
    return ZeroShotDetector(spec, device=device)


def visible_masks(images, records: list[Record], n: int):
    """Each object's visible pixels in Shapes images, (B, n, H, W) bool: `shapes.detector.visible_masks`."""
    from adapterlib.shapes.detector import visible_masks as shapes_visible_masks
    return shapes_visible_masks(images, records, n)


def hidden_in_part(visible, records: list[Record]):
    """Which objects of Shapes images are hidden in part, (B, n) bool, from their visible pixels:
    `shapes.detector.hidden_in_part`."""
    from adapterlib.shapes.detector import hidden_in_part as shapes_hidden_in_part
    return shapes_hidden_in_part(visible, records)


def check_region_records(records: list[Record], region: str) -> None:
    """Stop before any step when a record cannot give the box loss's `region`: a phrase naming no palette colour
    (visible, exclusive, layered) or no shape (layered); the ValueError names the record and the object."""
    from adapterlib.shapes.detector import palette_indices, shape_indices
    palette_indices(records)
    if region == "layered":
        shape_indices(records)


def measure(images, records: list[Record], detector: str | Path | Detector = "color"):
    """Grounding of `images` against the requested boxes of `records` by `detector` (a spec for
    `load_detector`): (per-object table, summary)."""
    return score_grounding(images, records, load_detector(detector))
