"""Training, checkpoints and resume on tiny CPU runs (a few steps each)."""
import json
import os
import signal

import nbformat
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from adapterlib.__main__ import main
from adapterlib.checkpoint import latest_checkpoint, list_checkpoints, load_adapter
from adapterlib.config import TrainConfig, make_config
from adapterlib.paths import REPO_ROOT
from adapterlib.train import resume_config, train

TINY = dict(steps=6, batch_size=2, n_train=16, save_every=4, log_every=1, n_samples=0, warmup=2)


def tiny(name, **kw):
    return make_config("shapes", run_name=name, **{**TINY, **kw})


def weights(run_dir):
    return load_file(str(run_dir / "final" / "adapter.safetensors"))


def test_resume_matches_uninterrupted_run(tmp_path):
    whole = train(tiny("whole"), runs_dir=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):              # stop between checkpoints (save_every=4)
        train(tiny("split"), runs_dir=tmp_path, progress=False, stop_at_step=3)
    split = train(resume_config(tmp_path / "split"), resume=True, runs_dir=tmp_path, progress=False)
    a, b = weights(whole), weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different adapter weights"
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "gate" in k)   # it trained
    metrics = pd.read_csv(split / "metrics.csv")
    assert metrics.step.tolist() == list(range(1, 7)), "metrics.csv has duplicated or missing steps"
    assert pd.read_csv(whole / "metrics.csv").loss.tolist() == metrics.loss.tolist()


def test_interrupt_writes_a_checkpoint(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny("stopped"), runs_dir=tmp_path, progress=False, stop_at_step=3)
    assert latest_checkpoint(tmp_path / "stopped")[0] == 3
    assert not list((tmp_path / "stopped" / "checkpoints").glob("*.tmp"))


def test_sigterm_writes_a_checkpoint(tmp_path):
    def send_sigterm(run_dir):                          # called after logging step 2
        if pd.read_csv(run_dir / "metrics.csv").step.max() == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(tiny("termed"), runs_dir=tmp_path, progress=False, on_log=send_sigterm)
    assert [s for s, _ in list_checkpoints(tmp_path / "termed")] == [2]


def test_resume_refuses_an_architecture_change_naming_the_field(tmp_path):
    train(tiny("arch", steps=4), runs_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="adapter_attention"):
        resume_config(tmp_path / "arch", adapter_attention="self")
    changed = TrainConfig(**{**json.loads((tmp_path / "arch" / "config.json").read_text()), "adapter_norm": "rmsnorm"})
    with pytest.raises(ValueError, match="adapter_norm"):
        train(changed, resume=True, runs_dir=tmp_path, progress=False)


def test_resume_can_extend_steps(tmp_path):
    train(tiny("extend", steps=4), runs_dir=tmp_path, progress=False)
    train(resume_config(tmp_path / "extend", steps=6), resume=True, runs_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path / "extend")[0] == 6


def test_an_existing_run_is_not_overwritten(tmp_path):
    train(tiny("once", steps=2), runs_dir=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny("once", steps=2), runs_dir=tmp_path, progress=False)


def test_wrong_parameter_type_is_an_error_not_a_cast():
    with pytest.raises(TypeError, match="steps"):
        make_config("shapes", steps="100")
    with pytest.raises(TypeError, match="lr"):
        make_config("shapes", lr="1e-3")
    assert make_config("shapes", lr=1).lr == 1                 # papermill's `-p lr 1` is an int: fine
    with pytest.raises(ValueError, match="unknown config field"):
        make_config("shapes", learning_rate=1e-3)


def test_sd15_preset_keeps_the_seed_plan_values():
    cfg = make_config("sd15")
    assert (cfg.batch_size, cfg.lr, cfg.phrase_dropout, cfg.scale_min, cfg.scale_max, cfg.save_every, cfg.steps) == \
        (2, 1e-4, 0.1, 0.5, 1.0, 2000, 25_000)


@pytest.mark.parametrize("notebook", ["02_train.ipynb", "03_resume.ipynb"])
def test_notebook_parameters_are_config_fields(notebook):
    nb = nbformat.read(REPO_ROOT / "notebooks" / notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one papermill parameters cell"
    names = [line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line.split("#")[0]]
    assert names and set(names) <= set(TrainConfig.__dataclass_fields__), set(names) - set(TrainConfig.__dataclass_fields__)


def test_checkpoint_loads_back_into_an_adapter_and_the_cli_evaluates_it(tmp_path, capsys):
    run = train(tiny("evaluated", steps=4), runs_dir=tmp_path, progress=False)
    from adapterlib.base import load_base
    adapter = load_adapter(latest_checkpoint(run)[1], load_base())
    saved = load_file(str(run / "final" / "adapter.safetensors"))
    assert all(torch.equal(p.detach(), saved[n]) for n, p in adapter.trainable_parameters().items())
    assert main(["evaluate", str(run), "--limit", "2", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["n_images"] == 2 and result["ground_truth_success_rate"] == 1.0
