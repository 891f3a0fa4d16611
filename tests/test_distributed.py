"""Training on 2 CPU processes (gloo), started the way a user starts it: `accelerate launch --multi_gpu
--num_processes 2 -m adapterlib train ... --device cpu` (`--multi_gpu` is Accelerate's torchrun launcher;
its `--cpu` flag starts ONE process unless MPI is set up), and from a notebook (`train.launch`).

The claim: the 2-process run is the 1-process run with the same global batch, up to float summation
order. Measured max abs difference of the final adapters (6 steps, global batch 4, this file's settings;
`pytest -s -k match_one` prints it): 5.96e-08 (weights up to 1.0); the tolerance is 1e-5. The file takes
about 75 s on 2 CPU cores (OMP_NUM_THREADS=1), most of it the five 2-process launches' imports.
"""
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from adapterlib.training import distributed
from adapterlib.training.checkpoint import verify_checkpoint
from adapterlib.training.config import make_config
from adapterlib.paths import REPO_ROOT
from adapterlib.runs import list_checkpoints, read_metrics
from adapterlib.training.train import resume_config, train
from helpers import (TIMEOUT_S, TOLERANCE, accelerate_train, free_port, launch_command, max_diff, photo_manifest,
                     train_env)

pytestmark = pytest.mark.slow

SETTINGS = dict(batch_size=4, n_train=32, save_every=2, log_every=1, n_samples=0, device="cpu")


def _flags(settings: dict) -> list[str]:
    return [f for k, v in settings.items() for f in (f"--{k}", str(v))]


def test_two_processes_match_one_and_resume(runs):
    one = train(make_config("smoke", run_name="one", steps=6, **SETTINGS), progress=False)
    from accelerate.state import PartialState
    assert PartialState._shared_state == {}, "one process must not set up Accelerate"

    first = accelerate_train(runs, ["--preset", "smoke", "--run_name", "two", "--steps", "4", *_flags(SETTINGS)])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = accelerate_train(runs, ["--resume", "two", "--steps", "6"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = runs / "two"
    log = (two / "train.log").read_text()
    assert "global batch 4 = 2 processes x 2" in log and "resumed at step 4 of 6" in log
    assert log.count("started at step 0") == 1, "only rank 0 writes train.log"

    assert [s for s, _ in list_checkpoints(two)] == [2, 4, 6]
    for _, path in list_checkpoints(two):
        assert verify_checkpoint(path) is None
    metrics = pd.read_csv(two / "metrics.csv")
    assert metrics.step.tolist() == list(range(1, 7)), "metrics.csv: one row per step, written once"
    reference = pd.read_csv(one / "metrics.csv")
    assert (metrics.loss - reference.loss).abs().max() < 1e-5      # the global batch's loss, not a half's

    a, b = load_file(str(one / "final" / "adapter.safetensors")), load_file(str(two / "final" / "adapter.safetensors"))
    assert any("gate" in k and b[k].abs().max() > 0 for k in b)    # it trained
    diff = max_diff(a, b)
    print(f"1 vs 2 processes, final adapters: max abs diff {diff:.3g}")      # pytest -s shows it
    assert diff < TOLERANCE
    step4 = [load_file(str(dict(list_checkpoints(r))[4] / "adapter.safetensors")) for r in (one, two)]
    assert max_diff(*step4) < TOLERANCE

    # a 2-process checkpoint resumed by one process: allowed, and said
    train(resume_config("two", steps=7), resume=True, progress=False)
    assert "written by 2 process(es), this run has 1" in (two / "train.log").read_text()
    assert pd.read_csv(two / "metrics.csv").step.tolist() == list(range(1, 8))


def test_a_two_process_job_is_one_writer_and_stops_whole_when_the_run_is_held(runs):
    """Rank 0 takes the run's lock for the job (rank 1 never competes for it); when another process holds it,
    both ranks stop at once with the message, before any write."""
    from adapterlib.training.lock import RunLock, holder
    run = train(make_config("smoke", run_name="shared", steps=2, **SETTINGS), progress=False)
    with RunLock(run):
        refused = accelerate_train(runs, ["--resume", "shared", "--steps", "4"])
    assert refused.returncode != 0
    assert "is being trained by another process" in refused.stderr, refused.stderr[-3000:]
    assert read_metrics(run).step.max() == 2
    done = accelerate_train(runs, ["--resume", "shared", "--steps", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metrics(run).step.tolist() == [1, 2, 3, 4]
    assert holder(run)["pid"] != os.getpid() and "--resume shared" in holder(run)["command"]


def test_sigterm_to_one_process_stops_both_after_a_step_and_rank_0_saves(runs, tmp_path):
    import psutil

    run = runs / "termed"
    with open(tmp_path / "out.txt", "w") as out:
        launcher = subprocess.Popen(launch_command(["--preset", "smoke", "--run_name", "termed", "--steps", "500",
                                                     *_flags({**SETTINGS, "save_every": 1000})]),
                                    cwd=REPO_ROOT, env=train_env(runs), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(read_metrics(run)) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.2)
        rank1 = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1")
        rank1.terminate()                                   # SIGTERM to rank 1 only
        launcher.wait(timeout=TIMEOUT_S)                    # no deadlock: both processes stop
    finally:                                                # on a failure: stop what this test started
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
    steps = pd.read_csv(run / "metrics.csv").step.tolist()
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < 500
    assert [s for s, _ in list_checkpoints(run)] == [steps[-1]], "rank 0 saves the step both processes finished"
    assert verify_checkpoint(list_checkpoints(run)[0][1]) is None
    assert f"interrupted at step {steps[-1]}" in (run / "train.log").read_text()


def test_notebook_launcher_trains_on_two_processes(runs):
    code = ("from adapterlib.training.config import make_config\nfrom adapterlib.training.train import launch\n"
            f"cfg = make_config('smoke', run_name='nb', steps=2, **{SETTINGS!r})\n"
            f"print('run folder:', launch(cfg, num_processes=2, use_port='{free_port()}'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=train_env(runs), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {runs / 'nb'}" in done.stdout
    assert "global batch 4 = 2 processes x 2" in (runs / "nb" / "train.log").read_text()
    assert verify_checkpoint(dict(list_checkpoints(runs / "nb"))[2]) is None


def test_batch_not_divisible_by_processes_is_an_error_before_any_work(runs, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"batch_size = 5 is the global batch and must be divisible by the number "
                                         r"of processes \(2\)"):
        train(make_config("smoke", run_name="odd", batch_size=5), progress=False)
    assert not (runs / "odd").exists()
    with pytest.raises(ValueError, match="divisible"):
        from adapterlib.training.train import launch
        launch(make_config("smoke", run_name="odd", batch_size=5), num_processes=2)


def test_one_process_shard_is_the_identity():
    shard = distributed.Shard(torch.device("cpu"), batch=4)
    x = torch.arange(4)
    assert shard.take(x) is x and shard.part([]) is None and shard.mean(x) is x
    halves = [distributed.Shard(torch.device("cpu"), rank=r, world=2, batch=4).take(x).tolist() for r in (0, 1)]
    assert halves == [[0, 1], [2, 3]]


def test_phrase_dropout_of_batch_parts_is_the_whole_batch_draw():
    from adapterlib.model.adapter import BatchPart, Grounding
    from adapterlib.data.manifest import GroundedObject, Record

    records = [Record("c", [GroundedObject(f"p{i}{j}", [0.1, 0.1, 0.5, 0.5]) for j in range(n)]) for i, n in
               enumerate([1, 3, 0, 2])]
    embed = lambda rs: torch.arange(sum(len(r.objects) for r in rs) * 8, dtype=torch.float32).reshape(-1, 8)
    whole = Grounding.from_records(records, embed(records), phrase_dropout=0.5, generator=torch.Generator().manual_seed(3))
    for start in (0, 2):
        rows = records[start:start + 2]
        part = Grounding.from_records(rows, embed(rows), phrase_dropout=0.5, generator=torch.Generator().manual_seed(3),
                                      part=BatchPart(start=start, size=4, objects=3))
        n = part.present.shape[1]
        assert torch.equal(part.keep_text, whole.keep_text[start:start + 2, :n])
        assert torch.equal(part.present, whole.present[start:start + 2, :n])


@pytest.mark.parametrize("preset, folder", [("sdxl", "tiny_sdxl_folder"), ("sd3", "tiny_sd3_folder"),
                                            ("flux", "tiny_flux_folder")])
def test_two_processes_on_a_latent_base_train_what_one_does(tmp_path, monkeypatch, request, preset, folder):
    """`accelerate launch` with 2 CPU processes on a tiny SDXL (pooled embeddings and time_ids: its added
    conditioning), a tiny SD3 (pooled projections, flow-matching sigmas) and a tiny FLUX (packed latents, the
    guidance input, the resolution-dependent shift): each rank takes its rows of the global batch with everything a
    row carries, so the job trains what one process does."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(runs))
    settings = dict(base_model=str(request.getfixturevalue(folder)), data=str(photo_manifest(tmp_path / "d")),
                    steps=3, batch_size=4, save_every=3, log_every=1, n_samples=0, device="cpu", mixed_precision="no",
                    lr=1e-3)
    one = train(make_config(preset, run_name="one", **settings), progress=False)
    done = accelerate_train(runs, ["--preset", preset, "--run_name", "two",
                                   *[f for k, v in settings.items() for f in (f"--{k}", str(v))]])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 4 = 2 processes x 2" in (runs / "two" / "train.log").read_text()
    a, b = (load_file(str(r / "final" / "adapter.safetensors")) for r in (one, runs / "two"))
    assert max(b[k].abs().max().item() for k in b if "gate" in k) > 0          # it trained
    assert max_diff(a, b) < TOLERANCE
