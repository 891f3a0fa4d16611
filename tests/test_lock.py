"""One run, one writer: a second training process on a run that is being trained refuses before it writes.

The lock is `flock` on RUN/.writer.lock (adapterlib/training/lock.py): released by the holder's death, never taken by readers.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from adapterlib.__main__ import main
from adapterlib.training.config import make_config
from adapterlib.training.lock import LOCK_FILE, RunLock, RunLocked, holder
from adapterlib.training.train import resume_config, train

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=4, batch_size=2, n_train=16, save_every=2, log_every=1, n_samples=0, warmup=1)


def _env(root) -> dict:
    return {**os.environ, "ADAPTERLIB_RUNS": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(root, *args) -> list[str]:
    return [sys.executable, "-m", "adapterlib", "train", *args]


def _snapshot(folder: Path) -> dict:
    """Every file's bytes and mtime under the run folder."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_writer_changes_no_byte_of_the_run(runs):
    run = train(make_config("smoke", run_name="held", **TINY), progress=False)
    with RunLock(run):                                       # this process plays the one training it
        before = _snapshot(run)                              # (the holder's own note written)
        for args in (["--resume", "held", "--steps", "8"], ["--preset", "smoke", "--run_name", "held"]):
            done = subprocess.run(_cli(runs, *args), cwd=REPO_ROOT, env=_env(runs), capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode != 0, done.stdout[-2000:]
            assert "is being trained by another process" in done.stderr, done.stderr[-2000:]
            assert f"pid {os.getpid()}" in done.stderr and "choose another run_name" in done.stderr
            assert _snapshot(run) == before, f"{args}: the refused process wrote into the run folder"
        with pytest.raises(RunLocked, match="held"):           # in-process (a second notebook kernel) alike
            train(resume_config("held", steps=8), resume=True, progress=False)
    assert _snapshot(run) == before


def test_two_trains_started_together_one_trains_the_other_refuses(runs):
    args = ["--preset", "smoke", "--run_name", "twice", "--steps", "8", "--save_every", "4", "--log_every", "1",
            "--n_samples", "0"]
    procs = [subprocess.Popen(_cli(runs, *args), cwd=REPO_ROOT, env=_env(runs), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, [o[1][-1500:] for o in outs]
    refused = next(o for p, o in zip(procs, outs) if p.returncode != 0)
    assert "is being trained by another process" in refused[1]
    assert pd.read_csv(runs / "twice" / "metrics.csv").step.tolist() == list(range(1, 9))   # each step once
    assert holder(runs / "twice")["pid"] == next(p.pid for p in procs if p.returncode == 0)


def test_a_dead_holder_leaves_a_note_not_a_block(runs):
    """SIGKILL of the holder: the OS releases the lock; the file it leaves behind does not stop the resume
    (tests/test_faults.py kills at random moments and checks the resumed run is bitwise the uninterrupted one)."""
    args = ["--preset", "smoke", "--run_name", "killed", "--steps", "200", "--save_every", "2", "--log_every", "1",
            "--n_samples", "0"]
    proc = subprocess.Popen(_cli(runs, *args), cwd=REPO_ROOT, env=_env(runs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((runs / "killed" / "checkpoints").glob("step_0000002")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert holder(runs / "killed")["pid"] == proc.pid                     # the note is still there
    done = train(resume_config("killed", steps=4), resume=True, progress=False)
    assert (done / "final" / "adapter.safetensors").is_file()
    assert holder(done)["pid"] == os.getpid()


def test_status_reads_a_locked_run(runs, capsys):
    run = train(make_config("smoke", run_name="watched", **TINY), progress=False)
    with RunLock(run):
        assert main(["status", "watched"]) == 0
    out = capsys.readouterr().out
    assert "step        4 / 4" in out and f"pid {os.getpid()}" in out


def test_a_file_system_that_cannot_lock_is_said_once_and_the_run_goes_on(runs, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = train(make_config("smoke", run_name="nfs", **TINY), progress=False)
    log = (run / "train.log").read_text()
    assert log.count("cannot lock files") == 1 and "finished: 4 steps" in log
