"""Where things live, independent of the working directory.

papermill runs a notebook in the caller's working directory and nbval in `notebooks/`, so a
notebook parameter like "../runs/base-retrain" would land in different places. Every relative path
a notebook or the command line takes is resolved against the project root instead:

- in a checkout of the repository (also an editable install, `pip install -e .`, which `make` uses):
  the repository root, wherever the command runs;
- in a non-editable install (`pip install adapterlib-*.whl`: the package sits in site-packages, there
  is no repository): the current working directory, read at each call. So `runs/` (the runs root), a
  manifest "data/x.jsonl" or a base "models/sd15" are the working directory's, as for any command.

What the package itself reads at run time (the held-out layouts, the shipped tiny base) lives inside
the package and is found from `__file__`, installed or not.

On the command line (`python -m adapterlib ...`) a relative path is the working directory's, as for any command:
`import coco --out data/coco` writes ./data/coco, and `train --data data/coco/data.jsonl` run from the same place
reads it. `user_path` turns such a path into an absolute one at the command line, before the library sees it
(so a run's config.json names the file it trained on, whatever the directory a later command runs in); a path
that exists only under the repository root (e.g. `data/x.jsonl` of the checkout, given from elsewhere) is
still found there, as the fallback.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _is_repository(root: Path) -> bool:
    """The package sits in a checkout of the repository (not in site-packages)."""
    return (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir()


IN_REPOSITORY = _is_repository(PACKAGE_DIR.parent)
# the repository root; in a non-editable install, the working directory when adapterlib was imported
# (code that resolves paths calls project_root(), which follows later changes of directory)
REPO_ROOT = PACKAGE_DIR.parent if IN_REPOSITORY else Path.cwd()
FIGURES = REPO_ROOT / "figures"   # the figures the notebooks write (run folders: runs.runs_root())
# the shipped bases by name: the tiny UNet (the default), the tiny MM-DiT (an SD3 transformer in pixel space) and the
# tiny FLUX (a FLUX transformer in pixel space)
MODELS = PACKAGE_DIR / "models"
SHIPPED_BASES = {"shapes-tiny": MODELS / "shapes-tiny", "shapes-dit": MODELS / "shapes-dit",
                 "shapes-flux": MODELS / "shapes-flux"}


def project_root() -> Path:
    """What relative paths are relative to: the repository root, or (non-editable install) the working directory."""
    return REPO_ROOT if IN_REPOSITORY else Path.cwd()


def repo_path(path: str | Path) -> Path:
    """An absolute path: `path` itself if absolute (or ~), else relative to the project root (the
    repository root; the working directory in a non-editable install). In the repository, one leading
    "../", as written from inside `notebooks/` ("../runs/x"), means the same as "runs/x"."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    if IN_REPOSITORY and path.parts[:1] == ("..",):          # notebooks sit one level below the root
        path = Path(*path.parts[1:])
    return (project_root() / path).resolve()


def user_path(path: str | Path) -> Path:
    """A path given on the command line, absolute: as it is if absolute (or ~); else the working directory's
    when it exists there; else the project root's (`repo_path`) when it exists only there; else the working
    directory's (a path still to be made, or a missing one, which the error then names as the user meant it)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    here = (Path.cwd() / path).resolve()
    if here.exists():
        return here
    there = repo_path(path)
    return there if there.exists() else here
