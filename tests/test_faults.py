"""Fault test: a training run SIGKILLed at random moments and resumed ends exactly like an uninterrupted one.

The protocol (all on CPU, through the command line a user runs, each run a subprocess):

1. The reference: `python -m adapterlib train --preset smoke --steps 12 --save_every 3 --log_every 1`
   uninterrupted, in its own runs root. It runs in the background while steps 2-3 go on (its timing
   does not matter: on CPU the result is bitwise deterministic).
2. The faulted run, same command, in another runs root, is SIGKILLed (`os.kill(pid, SIGKILL)`: no
   handler runs, nothing is saved) KILLS times, and after each kill `train --resume NAME` is started
   again. Where each kill lands is chosen up front by a seeded `random.Random` (the choices are the
   same on every run of the test; where a kill actually lands depends on the machine's timing, and
   is printed and checked):
   - kill 1 always comes before the first checkpoint (0-0.5 s after config.json is written, while
     the model and data load, or just after step 1 or 2 is logged), so the first resume finds no
     checkpoint and starts again from step 0;
   - "checkpoint" kills pick one of the checkpoints still to come, wait until the step before it is
     logged, then poll checkpoints/ for its new `step_XXXXXXX.tmp` folder (the checkpoint being
     written) and kill as soon as it appears, so that the kill lands mid-write; if it does not
     appear within CKPT_WAIT_S, they kill anyway and say so;
   - "step" kills wait until a random step (after the resume point) is logged to metrics.csv, then
     a random fraction of a step more, so they land anywhere in a step, a log write or a checkpoint.
   Kills of a resumed process wait for its start line in train.log (the resume has read its
   checkpoint and rewritten metrics.csv), so no kill is wasted in the Python/torch import.
3. A last `--resume` runs to the end.
With SEED = 8 the kills land (on the machines tried) while loading, mid-write of step_0000003.tmp
(so the resume after it starts from 0 again, over a leftover .tmp), in step 10 after checkpoint 9,
in step 11, and mid-write of step_0000012.tmp. Seven processes each pay the Python/torch import:
about 45 s in all on a shared 2-core CPU.

Checked: final/adapter.safetensors is bitwise equal to the reference's; metrics.csv has steps
1..12 once each, in order, with the reference's losses (as text, so exactly); no `*.tmp` folder is
left; train.log has one start line per launch that got that far, each resume naming the checkpoint
it resumed from (or saying it started again from step 0); at least one kill came before the first
checkpoint and at least one left a half-written `.tmp` checkpoint behind (it landed mid-write).

`pytest tests/test_faults.py -s` prints each kill: when (seconds after its launch), and where it
landed (phase, step, latest complete checkpoint).
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = "faulted"
STEPS, SAVE_EVERY = 12, 3
KILLS = 5
SEED = 8                        # the kill plan: while loading, mid-write of checkpoints 3 and 12, around 9 and 10
CKPT_WAIT_S = 5.0               # a "checkpoint" kill waits this long (after the step before) for its .tmp folder
LAUNCH_TIMEOUT_S = 120.0        # a launch that shows no progress for this long has hung: fail
POLL_S = 0.002
START = re.compile(r"resumed at step (\d+) of \d+|has no (?:complete|valid) checkpoint: starting again from step 0|"
                   r"started at step 0 of \d+")


def _env(root: Path) -> dict:
    return {**os.environ, "ADAPTERLIB_RUNS": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(root: Path, args: list[str], name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adapterlib", "train", *args]
    with (root / f"{name}.out").open("w") as out:      # the child keeps its own copy of the handle
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(root), stdout=out, stderr=subprocess.STDOUT)


def _fresh_args(name: str) -> list[str]:
    return ["--preset", "smoke", "--run_name", name, "--steps", str(STEPS), "--save_every", str(SAVE_EVERY),
            "--log_every", "1", "--n_samples", "0", "--progress-every", "0"]


def _output(root: Path, name: str) -> str:
    path = root / f"{name}.out"
    return path.read_text()[-4000:] if path.exists() else ""


def _steps_logged(run: Path) -> list[int]:
    """The steps of metrics.csv's complete rows (also while it is being written)."""
    try:
        text = (run / "metrics.csv").read_text()
    except FileNotFoundError:
        return []
    lines = text[:text.rfind("\n") + 1].splitlines()
    if not lines:
        return []
    col = lines[0].split(",").index("step")
    return [int(line.split(",")[col]) for line in lines[1:] if line.strip()]


def _start_lines(run: Path) -> list[str]:
    """The start line of each launch that got past loading (train.log), as "start", "restart" or "resumed N"."""
    try:
        text = (run / "train.log").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        m = START.search(line)
        if m:
            out.append(f"resumed {m.group(1)}" if m.group(1) else "restart" if "starting again" in line else "start")
    return out


def _checkpoints(run: Path) -> list[int]:
    """Steps of the checkpoint folders under their real names: a checkpoint is renamed from its .tmp
    folder only once it is complete, so each of these must be valid (train.log says if one is not)."""
    return sorted(int(d.name.split("_")[1]) for d in (run / "checkpoints").glob("step_*") if d.suffix != ".tmp")


def _tmps(run: Path) -> dict[str, tuple[int, int]]:
    """The `*.tmp` checkpoint folders, each with (inode, ctime) to tell a new one from a leftover."""
    out = {}
    for d in (run / "checkpoints").glob("*.tmp"):
        try:
            st = d.stat()
        except FileNotFoundError:             # renamed while we looked
            continue
        out[d.name] = (st.st_ino, st.st_ctime_ns)
    return out


def _plan(rng: random.Random) -> list[dict]:
    """The kill plan, drawn up front: kill 1 before the first checkpoint, then checkpoint and step kills
    in a seeded order, each with a seeded position (`fraction` of what is left of the run) and delay."""
    modes = ["checkpoint", "checkpoint", "step", "step"][:KILLS - 1]
    rng.shuffle(modes)
    step = rng.randint(0, 2)              # 0: while the model and data load; 1, 2: after that step is logged
    plan = [dict(mode="early", step=step, delay=rng.uniform(0.0, 0.5) if step == 0 else rng.uniform(0.0, 0.05))]
    for mode in modes:
        plan.append(dict(mode=mode, fraction=rng.random(), delay=rng.uniform(0.0, 0.15)))
    return plan


def _config_written(run: Path) -> bool:
    try:
        json.loads((run / "config.json").read_text())
        return True
    except (FileNotFoundError, ValueError):
        return False


def _await_kill_point(kill: dict, proc, run: Path, resumed_from: int, starts_before: int, tmps_before: dict,
                      root: Path, name: str) -> str | None:
    """Wait for the moment `kill` names in this launch; returns what it waited for (None: the process
    finished first, which fails the test unless it exited 0)."""
    def wait(condition, timeout=LAUNCH_TIMEOUT_S, fail=True):
        deadline = time.monotonic() + timeout
        while not condition():
            if proc.poll() is not None:
                assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{_output(root, name)}"
                return None
            if time.monotonic() > deadline:
                assert not fail, f"{name}: nothing happened for {timeout} s:\n{_output(root, name)}"
                return False
            time.sleep(POLL_S)
        return True

    if kill["mode"] == "early":                 # a fresh start, killed before its first checkpoint
        if kill["step"] == 0:
            done, what = wait(lambda: _config_written(run)), f"{kill['delay']:.3f} s after config.json was written"
        else:
            done = wait(lambda: kill["step"] in _steps_logged(run))
            what = f"{kill['delay']:.3f} s after step {kill['step']} was logged"
        time.sleep(kill["delay"])
        return what if done else None
    # a resumed launch: first its start line (it has read its checkpoint and rewritten metrics.csv)
    if not wait(lambda: len(_start_lines(run)) > starts_before):
        return None
    if kill["mode"] == "step":                  # a random step after the resume point (<= STEPS - 1)
        target = resumed_from + 1 + int(kill["fraction"] * (STEPS - 2 - resumed_from))
        done = wait(lambda: target in _steps_logged(run))
        time.sleep(kill["delay"])
        return f"{kill['delay']:.3f} s after step {target} was logged" if done else None
    # "checkpoint": one of the checkpoints still to come, killed while its .tmp folder is being written
    due = list(range(resumed_from + SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    target = due[int(kill["fraction"] * len(due))]
    tmp = f"step_{target:07d}.tmp"
    if target - 1 > resumed_from and not wait(lambda: target - 1 in _steps_logged(run)):
        return None
    before = tmps_before.get(tmp)              # a leftover of an earlier kill, or None
    seen = wait(lambda: _tmps(run).get(tmp, before) != before or target in _checkpoints(run),
                timeout=CKPT_WAIT_S, fail=False)
    if seen is None:
        return None
    if seen and target in _checkpoints(run):
        return f"{tmp} missed: killed just after checkpoint {target} was complete"
    return f"as {tmp} appeared" if seen else f"{tmp} not seen within {CKPT_WAIT_S} s: killed anyway"


def _phase(run: Path, tmps_before: dict, starts_before: int, resumed_from: int) -> tuple[str, bool]:
    """Where a kill landed, read from the run folder; and whether it left a new half-written checkpoint."""
    new_tmp = [n for n, key in _tmps(run).items() if tmps_before.get(n) != key]
    ckpts, steps = _checkpoints(run), _steps_logged(run)
    latest = ckpts[-1] if ckpts else None
    if new_tmp:
        return f"during the checkpoint write of {new_tmp[0]} (latest complete checkpoint {latest})", True
    if len(_start_lines(run)) == starts_before:
        return f"while loading, before training started (latest complete checkpoint {latest})", False
    last = steps[-1] if steps else 0
    if last == resumed_from:
        return f"in step {last + 1}, the first of this launch (latest complete checkpoint {latest})", False
    if last % SAVE_EVERY == 0 and latest != last:
        return f"after logging step {last}, before its checkpoint (latest complete checkpoint {latest})", False
    if last == STEPS:
        return f"after step {last}, writing the final adapter (latest complete checkpoint {latest})", False
    return f"in step {last + 1} (step {last} logged, latest complete checkpoint {latest})", False


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path):
    t0 = time.monotonic()
    ref_root, root = tmp_path / "reference", tmp_path / "faulted"
    ref_root.mkdir()
    root.mkdir()
    reference = _launch(ref_root, _fresh_args("reference"), "reference")       # in the background
    run = root / RUN
    rng = random.Random(SEED)
    plan = _plan(rng)
    kills, proc = [], None
    try:
        for i, kill in enumerate(plan):
            fresh = i == 0
            resumed_from = 0 if fresh else (_checkpoints(run) or [0])[-1]
            if resumed_from >= STEPS:
                print(f"kill {i + 1}: the run is at its last checkpoint already; no more kills")
                break
            expected_start = "start" if fresh else f"resumed {resumed_from}" if resumed_from else "restart"
            starts_before, tmps_before = len(_start_lines(run)), _tmps(run)
            name = f"launch{i}"
            proc = _launch(root, _fresh_args(RUN) if fresh else ["--resume", RUN], name)
            t_launch = time.monotonic()
            what = _await_kill_point(kill, proc, run, resumed_from, starts_before, tmps_before, root, name)
            if what is None or proc.poll() is not None:
                assert proc.wait() == 0, f"{name} failed (rc {proc.returncode}):\n{_output(root, name)}"
                print(f"kill {i + 1} ({kill['mode']}): {name} finished before the kill; no more kills")
                break
            t_kill = time.monotonic() - t_launch
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            phase, mid_write = _phase(run, tmps_before, starts_before, resumed_from)
            kills.append(dict(mode=kill["mode"], phase=phase, mid_write=mid_write, expected_start=expected_start,
                              checkpoint=(_checkpoints(run) or [None])[-1],
                              wrote_start=len(_start_lines(run)) > starts_before))
            print(f"kill {i + 1} ({kill['mode']}, {'fresh start' if fresh else f'resume from {resumed_from}'}): "
                  f"{t_kill:.2f} s after launch, {what}; landed {phase}")
        # --- resume to the end
        name = "final-resume"
        resumed_from = (_checkpoints(run) or [0])[-1]
        final_start = f"resumed {resumed_from}" if resumed_from else "restart"
        killed_holder = json.loads((run / ".writer.lock").read_text())["pid"]     # the lock file a kill left behind
        proc = _launch(root, ["--resume", RUN], name)
        assert proc.wait(timeout=LAUNCH_TIMEOUT_S) == 0, f"the last resume failed:\n{_output(root, name)}"
        assert killed_holder != proc.pid and json.loads((run / ".writer.lock").read_text())["pid"] == proc.pid, \
            "a dead holder's lock file must be a note, not a block"
        assert reference.wait(timeout=LAUNCH_TIMEOUT_S) == 0, \
            f"the reference run failed:\n{_output(ref_root, 'reference')}"
    finally:
        for p in (reference, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    print(f"fault test: {len(kills)} kills, {time.monotonic() - t0:.1f} s in all")
    ref = ref_root / "reference"

    # --- the same weights, bit for bit
    a = load_file(str(ref / "final" / "adapter.safetensors"))
    b = load_file(str(run / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"the killed-and-resumed run ended with different adapter weights: {different[:5]}"

    # --- metrics.csv: every step once, in order, the same losses
    def rows(folder):
        with (folder / "metrics.csv").open() as f:
            return list(csv.DictReader(f))
    ref_rows, run_rows = rows(ref), rows(run)
    assert [int(r["step"]) for r in run_rows] == list(range(1, STEPS + 1)), \
        f"metrics.csv steps: {[r['step'] for r in run_rows]}"
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows], "losses differ from the reference"

    # --- no half-written checkpoint left
    assert not list(run.rglob("*.tmp")), f"leftover: {list(run.rglob('*.tmp'))}"

    # --- train.log: a start line per launch that got that far, each resume naming its checkpoint; and
    # no checkpoint under a real name was ever found invalid (a kill must not leave a half-written one)
    invalid = [line for line in (run / "train.log").read_text().splitlines() if "is invalid" in line]
    assert not invalid, f"a kill left an invalid checkpoint: {invalid}"
    expected = [k["expected_start"] for k in kills if k["wrote_start"]] + [final_start]
    assert _start_lines(run) == expected, f"train.log start lines {_start_lines(run)}, expected {expected}"
    assert all(k["wrote_start"] for k in kills[1:]), "a resumed launch was killed before its start line"

    # --- the protocol did what it promises
    assert len(kills) == KILLS, "the run finished before every kill was made"
    assert kills[0]["checkpoint"] is None, f"kill 1 came after the first checkpoint: {kills[0]['phase']}"
    assert any(k["mid_write"] for k in kills), \
        "no kill landed during a checkpoint write: " + "; ".join(k["phase"] for k in kills)
