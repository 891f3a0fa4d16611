"""Reliability: checkpoints that cannot run code, survive damage and full disks, retention, a run
that stops on repeated non-finite losses, config values and base folders refused before any work."""
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapterlib.training import checkpoint
from adapterlib.__main__ import main
from adapterlib.model.base import load_base
from adapterlib.training.config import make_config
from adapterlib.runs import list_checkpoints, read_metrics
from adapterlib.training.train import NonFiniteLoss, resume_config, train


def small(name, **kw):
    return make_config("smoke", run_name=name, **{**dict(steps=6, batch_size=2, n_train=16, save_every=2,
                                                         log_every=1, n_samples=0, warmup=2), **kw})


class RunsCode:
    """A pickle payload: unpickling it runs os.system (what a crafted state.pt would do)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_state_that_would_run_code_is_refused_and_nothing_runs(runs, tmp_path):
    run = train(small("crafted", steps=2), progress=False)
    (step, path), = list_checkpoints(run)
    marker = tmp_path / "ran"
    torch.save({"optimizer": RunsCode(marker)}, path / "state.pt")
    sums = {n: checkpoint.sha256(path / n) for n in ("adapter.safetensors", "state.pt", "config.json")}
    (path / "checksums.json").write_text(json.dumps(sums))          # its checksums match: only loading can refuse it
    with pytest.raises(checkpoint.CheckpointError, match="could run code"):
        train(resume_config("crafted", steps=4), resume=True, progress=False)
    assert not marker.exists(), "the crafted pickle ran"
    torch.load(path / "state.pt", weights_only=False)              # the payload is real: a full pickle load runs it
    assert marker.exists()


def test_checkpoint_state_loads_as_plain_data(runs):
    run = train(small("plain", steps=2), progress=False)
    state = torch.load(list_checkpoints(run)[-1][1] / "state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["rng"]) == {"train", "torch", "python", "numpy"}


def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(runs):
    run = train(small("rot", steps=4), progress=False)
    latest = list_checkpoints(run)[-1][1]
    data = bytearray((latest / "adapter.safetensors").read_bytes())
    data[-5] ^= 0xFF                                                # one flipped byte: bit rot
    (latest / "adapter.safetensors").write_bytes(bytes(data))
    assert "does not match its checksum" in checkpoint.verify_checkpoint(latest)
    train(resume_config("rot", steps=6), resume=True, progress=False)
    log = (run / "train.log").read_text()
    assert "step_0000004 is invalid" in log and "resumed at step 2 of 6" in log
    assert list_checkpoints(run)[-1][0] == 6 and checkpoint.verify_checkpoint(list_checkpoints(run)[-1][1]) is None
    metrics = read_metrics(run)
    assert metrics.step.tolist() == [1, 2, 3, 4, 5, 6]               # steps 3-4 redone, each once


def test_resume_matches_the_uninterrupted_run_after_skipping_a_damaged_checkpoint(runs):
    whole = train(small("whole2", steps=6), progress=False)
    train(small("damaged", steps=4), progress=False)
    (list_checkpoints(runs / "damaged")[-1][1] / "state.pt").write_bytes(b"garbage")
    train(resume_config("damaged", steps=6), resume=True, progress=False)
    a, b = load_file(str(whole / "final" / "adapter.safetensors")), load_file(str(runs / "damaged" / "final" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_keeps_the_newest_checkpoints(runs):
    run = train(small("keep", steps=8, keep_last=2), progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [6, 8]
    assert "checkpoint step 2 deleted (keep_last 2)" in (run / "train.log").read_text()


def test_keep_last_never_deletes_the_newest_valid_checkpoint(runs):
    run = train(small("keepvalid", steps=4), progress=False)
    newest = list_checkpoints(run)[-1][1]
    (newest / "config.json").write_text("{}")                       # the newest is now invalid
    assert checkpoint.prune_checkpoints(run, 1) == []               # step 2 is the newest valid one: kept
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_checkpoint_resumes(runs, monkeypatch):
    real_save = torch.save
    def full_disk(obj, path, *a, **k):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    from adapterlib.files import OutOfSpace                         # a full disk: its own clear stop
    with pytest.raises(OutOfSpace, match=r"out of disk space writing the checkpoint of step 4 .* step 2 is intact"):
        train(small("full", steps=6), progress=False)
    run = runs / "full"
    assert [s for s, _ in list_checkpoints(run)] == [2] and not list((run / "checkpoints").glob("*.tmp"))
    assert checkpoint.verify_checkpoint(list_checkpoints(run)[0][1]) is None
    monkeypatch.setattr(torch, "save", real_save)                  # space freed
    train(resume_config("full"), resume=True, progress=False)
    assert list_checkpoints(run)[-1][0] == 6


def test_repeated_non_finite_losses_stop_the_run_naming_the_step(runs, monkeypatch):
    from adapterlib.model.adapter import AdaptedUNet
    original = AdaptedUNet.forward
    calls = []
    def overflowing(self, *args, **kw):
        out = original(self, *args, **kw)
        calls.append(1)
        return out * float("nan") if torch.is_grad_enabled() and len(calls) > 2 else out
    monkeypatch.setattr(AdaptedUNet, "forward", overflowing)
    with pytest.raises(NonFiniteLoss, match=r"3 non-finite losses in a row, the last at step 5.*mixed_precision.*lr"):
        train(small("nan", steps=8, max_nonfinite_steps=3), progress=False)
    run = runs / "nan"
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert checkpoint.verify_checkpoint(list_checkpoints(run)[0][1]) is None
    assert "stopped: 3 non-finite losses in a row" in (run / "train.log").read_text()


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "lr = 0.0 must be > 0"), ("lr", -1e-4, "must be > 0"), ("warmup", -1, "warmup = -1 must be >= 0"),
    ("grad_clip", 0.0, "grad_clip = 0.0 must be > 0"), ("gate_lr_scale", 0.0, "must be > 0"),
    ("weight_decay", -0.1, "must be >= 0"), ("scale_min", -0.5, "scale_min"), ("scale_max", 0.0, "never learn"),
    ("max_objects", 31, "max_objects = 31"), ("on_bad_record", "ignore", "choose one of"),
    ("keep_last", -1, "must be >= 0"), ("max_nonfinite_steps", 0, "must be >= 1"), ("n_train", 0, "must be >= 1"),
    ("phrase_dropout", 1.5, "must be in [0, 1]"), ("device", "gpu", "choose auto, cpu, cuda"),
])
def test_config_values_out_of_range_are_errors_before_any_work(field, value, message, runs, capsys):
    kw = {field: value, **({"scale_min": 0.0} if field == "scale_max" else {})}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config("smoke", **kw)
    flag = str(value).lower() if isinstance(value, bool) else str(value)
    assert main(["train", "--preset", "smoke", "--run_name", "bad", f"--{field}", flag,
                 *(["--scale_min", "0"] if field == "scale_max" else [])]) == 2
    assert not (runs / "bad").exists()


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer", "scheduler", "vae"])
def test_a_base_folder_missing_a_part_is_a_clear_error(part, tiny_sd_folder, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd_folder, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(FileNotFoundError, match=f"{part}/"):
        load_base(broken)


def test_a_base_the_adapter_cannot_attach_to_is_a_clear_error(tiny_sd_folder, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(tiny_sd_folder, flat)
    config = json.loads((flat / "unet" / "config.json").read_text())
    config.update(down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                  mid_block_type=None)
    (flat / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="nothing to attach to"):
        load_base(flat)


def _manifest_with_a_bad_image(folder):
    from adapterlib.shapes import write_dataset
    manifest = write_dataset(folder, 12)
    lines = manifest.read_text().splitlines()
    bad = json.loads(lines[4])
    (folder / bad["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")     # line 5: a corrupt PNG
    return manifest, bad["id"]


def test_a_corrupt_image_stops_a_run_before_training_naming_line_and_id(runs, tmp_path):
    manifest, rid = _manifest_with_a_bad_image(tmp_path / "data")
    with pytest.raises(Exception, match=rf"line 5 \(id '{rid}'\): image .* does not decode"):
        train(small("corrupt", data=str(manifest)), progress=False)
    assert not (runs / "corrupt" / "metrics.csv").exists() or read_metrics(runs / "corrupt").empty
    assert list_checkpoints(runs / "corrupt") == []


def test_skip_policy_trains_without_the_bad_record_and_says_so(runs, tmp_path, capsys):
    manifest, rid = _manifest_with_a_bad_image(tmp_path / "data")
    run = train(small("skipping", data=str(manifest), on_bad_record="skip", steps=2), progress=False)
    report = json.loads((run / "data_report.json").read_text())
    assert (report["records"], report["skipped"]) == (11, 1) and rid in report["first_reasons"][0]
    assert "1 bad record(s) skipped" in (run / "train.log").read_text()
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["skipped_records"] == 1 and any("bad training record" in w for w in status["warnings"])


def test_a_kill_while_resume_rewrites_metrics_never_loses_the_history(runs, monkeypatch):
    """RunLog rewrites metrics.csv on resume; a crash in the middle leaves the old file whole."""
    import csv

    from adapterlib.runs import RunLog
    run = train(small("history", steps=4), progress=False)
    before = (run / "metrics.csv").read_text()
    def crash(self, rows):
        raise KeyboardInterrupt("killed mid-rewrite")
    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(KeyboardInterrupt):
        RunLog(run, [], resume_step=2)
    assert (run / "metrics.csv").read_text() == before


def test_a_manifest_writer_killed_midway_leaves_no_manifest(tmp_path, monkeypatch):
    from adapterlib.data.manifest import GroundedObject, Record, write_manifest
    def records():
        yield Record("a red circle", (GroundedObject("red circle", (0.1, 0.1, 0.5, 0.5)),), image="a.png")
        raise KeyboardInterrupt("killed mid-write")
    with pytest.raises(KeyboardInterrupt):
        write_manifest(tmp_path / "data.jsonl", records())
    assert not (tmp_path / "data.jsonl").exists()        # a manifest that exists is complete


def test_final_is_written_as_a_whole(runs):
    run = train(small("final", steps=2), progress=False)
    train(resume_config("final", steps=4), resume=True, progress=False)
    assert json.loads((run / "final" / "info.json").read_text())["step"] == 4
    assert not (run / "final.tmp").exists() and not list(run.glob("*.tmp"))


# --- the sync-free step (the GPU path: the fused AdamW skips a non-finite step on the device, the counts are
# read at log intervals), run here on the CPU

@pytest.fixture
def sync_free(monkeypatch):
    import adapterlib.training.train as train_module
    monkeypatch.setattr(train_module, "SYNC_FREE_DEVICES", ("cuda", "cpu"))


def _nan_at(monkeypatch, steps):
    """AdaptedUNet's training forwards at these 1-based steps give NaN."""
    from adapterlib.model.adapter import AdaptedUNet
    original = AdaptedUNet.forward
    calls = []
    def forward(self, *args, **kw):
        out = original(self, *args, **kw)
        if torch.is_grad_enabled():
            calls.append(1)
            return out * float("nan") if len(calls) in steps else out
        return out
    monkeypatch.setattr(AdaptedUNet, "forward", forward)
    return calls


def test_sync_free_step_skips_a_non_finite_step_like_the_host_check(runs, monkeypatch, sync_free):
    calls = _nan_at(monkeypatch, {3})
    train(small("free", steps=6, log_every=3), progress=False)
    monkeypatch.setattr("adapterlib.training.train.SYNC_FREE_DEVICES", ("cuda",))
    calls.clear()
    train(small("host", steps=6, log_every=3), progress=False)
    free, host = (load_file(str(runs / n / "final" / "adapter.safetensors")) for n in ("free", "host"))
    for k in free:                               # fused vs for-each AdamW: the same update up to rounding
        torch.testing.assert_close(free[k], host[k], atol=1e-6, rtol=0)
    assert "1 non-finite loss(es), steps skipped (1 so far)" in (runs / "free" / "train.log").read_text()
    assert read_metrics(runs / "free").skipped.iloc[-1] == 1 == read_metrics(runs / "host").skipped.iloc[-1]
    assert not read_metrics(runs / "free").loss_avg.isna().any()


def test_sync_free_step_stops_on_repeated_non_finite_losses(runs, monkeypatch, sync_free):
    _nan_at(monkeypatch, {3, 4, 5, 6, 7, 8})
    with pytest.raises(NonFiniteLoss, match=r"3 non-finite losses in a row.*mixed_precision.*lr"):
        train(small("nanfree", steps=8, max_nonfinite_steps=3, log_every=1), progress=False)
    run = runs / "nanfree"
    # step 4 (skipped, weights as after step 2) was still saved: a sync-free step learns of NaN only at reads
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert all(checkpoint.verify_checkpoint(path) is None for _, path in list_checkpoints(run))
    two, four = (load_file(str(path / "adapter.safetensors")) for _, path in list_checkpoints(run))
    assert all(torch.equal(two[k], four[k]) for k in two)


def test_out_of_memory_says_what_to_lower_and_keeps_the_checkpoint(runs, monkeypatch):
    from adapterlib.model.adapter import AdaptedUNet
    from adapterlib.training.train import OutOfMemory
    original = AdaptedUNet.forward
    calls = []
    def forward(self, *args, **kw):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kw)
    monkeypatch.setattr(AdaptedUNet, "forward", forward)
    with pytest.raises(OutOfMemory, match=r"out of cpu memory at step 3 \(batch 2 per process.*lower batch_size"):
        train(small("oom", steps=6), progress=False)
    run = runs / "oom"
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert "stopped: out of cpu memory" in (run / "train.log").read_text()


def test_tensorboard_gets_the_metrics_and_the_sample_grids_and_resume_purges_redone_steps(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(small("board", steps=5, n_samples=2, tensorboard=True), progress=False)   # step 5: saved after the loop
    train(resume_config("board", steps=6), resume=True, progress=False)
    events = EventAccumulator(str(runs / "board" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    csv = read_metrics(runs / "board")
    assert [round(e.value, 5) for e in loss] == [round(v, 5) for v in csv.loss]
    assert "gate_mean" in events.Tags()["scalars"]
    assert [e.step for e in events.Images("samples")] == [2, 4, 5, 6]
    assert len(list((runs / "board" / "tensorboard").iterdir())) == 2      # one event file a process (train + resume)
