"""Where things live, independent of the working directory.

papermill runs a notebook in the caller's working directory and nbval in `notebooks/`, so a
notebook parameter like "../runs/base-retrain" would land in different places. Every relative path
a notebook or the command line takes is resolved against the repository root instead.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURES = REPO_ROOT / "figures"   # the figures the notebooks write (run folders: runs.runs_root())


def repo_path(path: str | Path) -> Path:
    """An absolute path: `path` itself if absolute (or ~), else relative to the repository root.
    One leading "../", as written from inside `notebooks/` ("../runs/x"), means the same as "runs/x"."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    if path.parts[:1] == ("..",):          # notebooks sit one level below the root
        path = Path(*path.parts[1:])
    return (REPO_ROOT / path).resolve()
