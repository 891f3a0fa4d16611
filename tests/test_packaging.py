"""The package as a user installs it: a wheel built from the repository, in a fresh venv, not editable.

`make` installs adapterlib editable (`pip install -e .`), which hides what a wheel leaves out (a subpackage,
the held-out layouts, the shipped tiny base) and every path found relative to the repository. Here:

1. a wheel is built from a copy of the working tree (`pip wheel --no-deps --no-build-isolation`: offline,
   with the setuptools of this venv); it must hold every file of the package (every .py and every data file
   under adapterlib/);
2. it is installed (`pip install --no-deps`, not editable) into a fresh venv that sees this venv's
   dependencies (torch, diffusers, ...) through a .pth file pointing at a folder of links to this venv's
   site-packages, minus adapterlib's own entries (the editable install's .pth, its finder and dist-info), so
   nothing is downloaded and the repository's adapterlib cannot leak in;
3. from a folder outside the repository, with the repository on no path: `python -m adapterlib evaluate
   --reference ground-truth` (the held-out layouts) and the smoke training (the shipped base, a Shapes set,
   a run folder under the working directory's runs/), then `evaluate` on that run by name.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "adapterlib"
# what a copy of the working tree for the build leaves out (large, or not part of a source tree)
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                              ".pytest_cache", ".ipynb_checkpoints", "figures", "docs")


def _package_files(root: Path) -> set[str]:
    """Every file of the package in a source tree, as a wheel names it (adapterlib/...)."""
    return {p.relative_to(root).as_posix() for p in (root / PACKAGE).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts
            and p.suffix != ".pyc"}


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    start = time.monotonic()
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    print(f"{time.monotonic() - start:6.1f} s  {' '.join(map(str, cmd))[:160]}")
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}\n" \
                                 f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree (a stale build/ of the checkout cannot mask a gap)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=SKIP)
    # offline with this venv's setuptools; without one, pip fetches the build backend (needs the index)
    import importlib.util
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", tmp / "dist", source], cwd=tmp)
    built = sorted((tmp / "dist").glob(f"{PACKAGE}-*.whl"))
    assert len(built) == 1, f"expected one wheel, found {built}"
    return built[0]


def test_wheel_holds_every_package_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _package_files(REPO)
    for needed in ("adapterlib/shapes/__init__.py", "adapterlib/shapes/heldout.jsonl",
                   "adapterlib/shapes/heldout_v2.jsonl", "adapterlib/models/shapes-tiny/unet/config.json"):
        assert needed in expected, f"{needed} is not in the repository: update this test"
    missing = sorted(expected - names)
    assert not missing, (f"the wheel leaves out {len(missing)} file(s) of the package: {missing[:20]} "
                         "(pyproject.toml: [tool.setuptools.packages.find] / [tool.setuptools.package-data])")


def _dependency_links(folder: Path) -> Path:
    """A folder of links to this venv's site-packages entries, except adapterlib's own and the .pth files
    (the editable install's finder, coverage, setuptools' distutils hack)."""
    folder.mkdir()
    seen = set()
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key])
        for entry in sorted(site.iterdir()) if site.is_dir() else []:
            name = entry.name
            if (name in seen or name.endswith(".pth") or name.lower().startswith((PACKAGE, f"__editable__.{PACKAGE}",
                                                                                  f"__editable___{PACKAGE}"))
                    or name == "__pycache__"):
                continue
            seen.add(name)
            (folder / name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable); its python."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    # this venv's pip installs into the fresh one (`pip --python`, pip >= 22.3); an older pip: the fresh venv's own
    # pip's version from its metadata: importing pip here would switch setuptools' distutils hack off for the rest
    # of the pytest process, and a later torch.compile (inductor imports setuptools) would then fail
    from importlib.metadata import version
    own_pip = tuple(int(p) for p in version("pip").split(".")[:2]) < (22, 3)
    _run([sys.executable, "-m", "venv", *([] if own_pip else ["--without-pip"]), venv])
    python = venv / "bin" / "python"
    installer = [python, "-m", "pip"] if own_pip else [sys.executable, "-m", "pip", "--python", python]
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=_clean_env()).stdout.strip())
    (site / "_adapterlib_test_dependencies.pth").write_text(f"{_dependency_links(tmp / 'deps')}\n")
    _run([*installer, "install", "--no-deps", "--no-index", "-q", wheel], env=_clean_env())
    return python


def _clean_env() -> dict:
    """The environment without anything that puts the repository (or a runs root) on a path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "ADAPTERLIB_RUNS",
                        "ADAPTERLIB_DEFAULT_PRESET", "PYTHONSAFEPATH")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return env


def test_installed_wheel_runs_outside_the_repository(fresh_venv, tmp_path):
    work = tmp_path / "work"                        # a user's folder: no repository, no notebooks
    work.mkdir()
    env = _clean_env()

    def adapterlib(*args, timeout=300):
        return _run([fresh_venv, "-m", "adapterlib", *args], cwd=work, env=env, timeout=timeout)

    probe = ("import json, sys, adapterlib, adapterlib.paths as p, adapterlib.runs as r, adapterlib.evaluation.evaluate as e\n"
             "print(json.dumps([adapterlib.__file__, sys.path, p.IN_REPOSITORY, str(r.runs_root()),\n"
             "                  len(e.heldout_layouts(None, 1)), len(e.heldout_layouts(None, 2))]))")
    module, path, in_repository, runs_root, *heldout = json.loads(_run([fresh_venv, "-c", probe], cwd=work, env=env).stdout)
    site = Path(module).resolve().parents[1]
    assert Path(module).resolve().is_relative_to(fresh_venv.parents[1].resolve()), \
        f"adapterlib imported from {module}, not from the fresh venv {fresh_venv.parents[1]}"
    assert not any(Path(p).resolve() == REPO for p in path if p), f"the repository is on sys.path: {path}"
    assert not in_repository and Path(runs_root) == work / "runs", (in_repository, runs_root)
    assert heldout == [200, 220], f"held-out layouts v1, v2: {heldout}"

    # the ceiling on the shipped held-out layouts (package data)
    out = adapterlib("evaluate", "--reference", "ground-truth", "--limit", "20").stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n_images"] == 20 and summary["success_rate"] > 0.9, summary

    # the smoke training on the shipped base, into runs/ of the working directory, then its evaluation by name
    adapterlib("train", "--preset", "smoke", "--run_name", "w", "--steps", "4", "--save_every", "4",
               "--n_train", "16", "--n_samples", "0")
    run = work / "runs" / "w"
    assert (run / "config.json").is_file() and (run / "final" / "adapter.safetensors").is_file(), \
        sorted(p.name for p in run.iterdir()) if run.is_dir() else f"no run folder {run}"
    out = adapterlib("evaluate", "w", "--limit", "2", "--steps", "4").stdout
    assert json.loads(out.strip().splitlines()[-1])["n_images"] == 2
    assert not (site / "runs").exists() and not (site / "figures").exists(), "something was written into site-packages"
