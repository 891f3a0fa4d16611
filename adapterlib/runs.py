"""Run folders: where they live, how a run is named, and what a run writes while it trains.

A run is named the same way everywhere (notebooks 02-05, the command line, the API): a plain name is
a folder under the runs root, anything with a path separator ("runs/x", "/data/x", "~/x") is a path. The
runs root is `$ADAPTERLIB_RUNS` when set, else `runs/` of the repository (of the working directory
in a non-editable install).

While a run trains it appends to `train.log` (human-readable, `tail -f`) and `metrics.csv` (one row
per logging interval, read with `read_metrics`, also while it is being written).
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from adapterlib.files import atomic_write
from adapterlib.paths import project_root, repo_path

RUNS_ENV = "ADAPTERLIB_RUNS"


def runs_root() -> Path:
    """The folder run names resolve in: $ADAPTERLIB_RUNS, else runs/ of the repository (in a non-editable
    install, which has no repository: runs/ of the working directory)."""
    root = os.environ.get(RUNS_ENV)
    return repo_path(root) if root else project_root() / "runs"


def run_dir(name_or_path: str | Path) -> Path:
    """The folder of a run: a plain name is a folder under the runs root; a path (absolute, or with a
    separator, e.g. "runs/x" or "../runs/x") is resolved against the repository root."""
    text = str(name_or_path).strip()
    if not text:
        raise ValueError("empty run name: give a run name (a folder under the runs root) or a path")
    if os.sep in text or "/" in text or text.startswith("~"):
        return repo_path(text)
    return runs_root() / text


def resolve_run(name_or_path: str | Path | None = None) -> Path:
    """An existing run folder (it has config.json); None or "" picks the run with the newest checkpoint."""
    if name_or_path in (None, ""):
        return find_latest_run()
    path = run_dir(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"run {str(name_or_path)!r}: {path} is not a run folder (no config.json); "
                                f"run names resolve under {runs_root()} (${RUNS_ENV})")
    return path


def find_latest_run(root: Path | None = None, *, finished_first: bool = False) -> Path:
    """The run under `root` (default: the runs root) whose newest complete checkpoint is the most recent.

    `finished_first` (what the analysis notebooks use for run_name ""): a finished run (final/info.json
    at its planned steps) wins over any unfinished one; among finished runs the one trained the most
    steps, the newest of equally long ones. So a short test run trained after the default run is not
    taken for it; unfinished runs count only when no run is finished."""
    root = Path(root or runs_root())
    runs = [run for run in root.iterdir() if run.is_dir()] if root.is_dir() else []
    candidates = [(_finished_rank(run) if finished_first else (), path.stat().st_mtime, run)
                  for run in runs for _, path in list_checkpoints(run)[-1:]]
    if not candidates:
        raise FileNotFoundError(f"no run under {root} has a complete checkpoint (train one with "
                                "notebooks/02_train.ipynb or `python -m adapterlib train`)")
    return max(candidates)[-1]


def _finished_rank(run: Path) -> tuple[bool, int]:
    """(finished, final step) of a run: (False, 0) while it is not finished."""
    info = run / "final" / "info.json"
    if not (info.is_file() and (run / "final" / "adapter.safetensors").is_file()):
        return False, 0
    step = json.loads(info.read_text())["step"]
    planned = effective_config(run).get("steps") if (run / "config.json").is_file() else None
    return (planned is None or step >= planned), step


def read_config(run: Path) -> dict:
    """A run's saved config.json (its original values: resumes log their changes to train.log)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.json)")
    return json.loads(path.read_text())


DATA_REPORT = "data_report.json"    # what the training data pass found: records kept, skipped, first reasons
CHANGES = "resume changes: "        # the train.log line that records a resume's changes (JSON follows)


def effective_config(run: Path) -> dict:
    """The config a run trains with now: its config.json (the original values) with the changes of
    every resume applied in order (as train.log records them)."""
    config = read_config(run)
    log = Path(run) / "train.log"
    for line in (log.read_text().splitlines() if log.is_file() else []):
        if CHANGES in line:
            config.update(json.loads(line.split(CHANGES, 1)[1]))
    return config


# ---------------------------------------------------------------------------------------------
# checkpoint folders: runs/<run>/checkpoints/step_0002000/ (what is inside: checkpoint.py)

CHECKPOINT_FILES = ("adapter.safetensors", "state.pt", "config.json")


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (every file present, not a .tmp leftover), oldest first."""
    found = []
    for d in (Path(run) / "checkpoints").glob("step_*"):
        if d.suffix != ".tmp" and all((d / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(d.name.split("_")[1]), d))
    return sorted(found)


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def resolve_checkpoint(run: Path, which: str | int = "latest") -> tuple[int, Path]:
    """`latest`, `final` or a step number -> (step, checkpoint folder)."""
    run = Path(run)
    if which == "final" and (run / "final" / "adapter.safetensors").is_file():
        return json.loads((run / "final" / "info.json").read_text())["step"], run / "final"
    found = dict(list_checkpoints(run))
    if not found:
        raise FileNotFoundError(f"run {run}: no complete checkpoint under {run / 'checkpoints'}")
    step = max(found) if str(which) in ("latest", "final") else int(which)
    if step not in found:
        raise FileNotFoundError(f"run {run}: no checkpoint at step {step}; there are {sorted(found)}")
    return step, found[step]


# ---------------------------------------------------------------------------------------------
# what a run writes: train.log and metrics.csv

METRIC_COLUMNS = ["step", "loss", "loss_avg", "lr", "grad_norm", "gate_mean", "gate_max", "gate_raw_max",
                  "samples_per_s", "wall_s", "skipped", "peak_mem_gib"]     # peak: CUDA's allocated, or the CPU's RSS
# at a checkpoint (`checkpoint_grounding`): its samples measured by the run's detector; empty on other rows
GROUNDING_COLUMNS = ["grounding_success", "grounding_miou", "grounding_o_miou"]


class RunLog:
    """train.log (appended, timestamped) and metrics.csv (one row per logging interval) of a run, and the same rows
    and the checkpoint sample grids to each tracker named (`trackers`: tensorboard, wandb; `open_tracker`).
    On resume at `resume_step`, rows logged after that step are dropped: they are redone, never doubled."""

    def __init__(self, run: Path, gate_columns: list[str], resume_step: int | None, trackers: Sequence[str] = (),
                 config: dict | None = None):
        self.log_path, self.csv_path = Path(run) / "train.log", Path(run) / "metrics.csv"
        self.columns = METRIC_COLUMNS + gate_columns + GROUNDING_COLUMNS
        rows = []
        if resume_step is not None and self.csv_path.exists():
            with self.csv_path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write_rows(rows)
        self.trackers = [open_tracker(name, Path(run), resume_step, config or {}) for name in trackers]

    def _write_rows(self, rows):
        """Rewrite metrics.csv through a temporary file: a kill here never loses the logged history."""
        def write(tmp):
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.csv_path, write)

    def text(self, line: str) -> None:
        with self.log_path.open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def row(self, row: dict) -> None:
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        self.text(" ".join(f"{k}={_fmt(row[k])}" for k in METRIC_COLUMNS + GROUNDING_COLUMNS if k in row))
        scalars = {k: v for k, v in row.items()                 # NaN (nothing measured): left out
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        for tracker in self.trackers:
            tracker.scalars(scalars, row["step"])

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (a checkpoint's sample grid) to every tracker."""
        for tracker in self.trackers:
            tracker.image(tag, image, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_tracker(name: str, run: Path, resume_step: int | None, config: dict):
    """A tracker by name: "tensorboard" (RUN/tensorboard/; on resume, events after the resumed step are purged like
    the csv rows) or "wandb" (a wandb run under RUN/wandb/, named after the run, grouped by it: a resume starts a
    new wandb run in the group from the resumed step, as wandb does not take back logged steps). A clear error when
    the package is missing."""
    if name == "tensorboard":
        return TensorBoardTracker(run / "tensorboard", resume_step)
    if name == "wandb":
        return WandbTracker(run, resume_step, config)
    raise ValueError(f"unknown tracker {name!r}")


class TensorBoardTracker:
    def __init__(self, folder: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("report_to tensorboard needs the tensorboard package: pip install tensorboard") from e
        self.board = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.board.add_scalar(k, v, step)
        self.board.flush()

    def image(self, tag: str, image, step: int) -> None:
        import numpy as np
        self.board.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.board.flush()

    def close(self) -> None:
        self.board.close()


class WandbTracker:
    def __init__(self, run: Path, resume_step: int | None, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("report_to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline "
                              "logs without an account; `wandb sync RUN/wandb/offline-run-*` uploads later)") from e
        self.wandb = wandb
        name = run.name if resume_step is None else f"{run.name} (resumed at step {resume_step})"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "adapterlib"), dir=str(run), name=name,
                              group=run.name, config=config, reinit="create_new")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image.convert("RGB"))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _fmt(v):
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def read_metrics(run: str | Path) -> pd.DataFrame:
    """metrics.csv of a run, also while it is being written (a half-written last line is dropped)."""
    path = Path(run) / "metrics.csv"
    if not path.exists():
        return pd.DataFrame()
    text = path.read_text()
    if not text.endswith("\n"):               # the writer is mid-line: keep the complete rows only
        text = text[:text.rfind("\n") + 1]
    if not text.strip():
        return pd.DataFrame()
    frame = pd.read_csv(io.StringIO(text), on_bad_lines="skip")
    if "step" not in frame:
        return pd.DataFrame()
    return frame.dropna(subset=["step"]).astype({"step": int})
