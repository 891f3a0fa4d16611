"""What a run is measured on and by, as its config names them (`heldout`, `detector`), checked before any
work: the config checks both when it is made (adapterlib/training/config.py), the evaluation uses them
(adapterlib/evaluation/evaluate.py: `run_layouts`, `run_detector`). Light on purpose (no torch, no model): the config
imports it.
"""
from __future__ import annotations

from pathlib import Path

from adapterlib.data.mig import read_layouts
from adapterlib.paths import repo_path

HELDOUT_SETS = {"v1": 1, "heldout": 1, "v2": 2, "heldout-v2": 2, "crowds": 3, "heldout-crowds": 3}  # shipped held-out sets
NOT_HELD_OUT = "(training records: not held out)"


def check_heldout(spec: str, field: str = "heldout") -> None:
    """A clear error, before any work, for a held-out spec that is not v1, v2, crowds, a readable manifest or a COCO-MIG
    layout file (the ManifestError of a bad record names the file and the record)."""
    if not spec or str(spec) in HELDOUT_SETS:
        return
    path = repo_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{field} = {spec!r}: {path} is not a file; give a held-out manifest (JSON Lines, "
                                f"e.g. from `python -m adapterlib import coco ... --out DIR`: DIR/data.jsonl), "
                                f"v1, v2 or crowds, or \"\" for the run's default")
    if not read_layouts(path)[0]:
        raise ValueError(f"{field} = {spec!r}: {path} has no records")


def detector_spec(spec: str | Path | None) -> str:
    """"color" for the colour detector ("" / None / "color"), else the detector folder's full path."""
    return "color" if spec in (None, "", "color") else str(repo_path(spec))


def check_detector(spec: str, field: str = "detector") -> None:
    """A clear error, before any work, for a detector that is neither "" / "color" nor a complete zero-shot
    detector folder (`detectors.check_detector_folder`: which files are missing)."""
    from adapterlib.model.detectors import check_detector_folder

    if detector_spec(spec) != "color":
        check_detector_folder(Path(detector_spec(spec)), field=field)
