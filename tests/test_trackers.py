"""Trackers (`report_to`): metrics.csv's rows and the checkpoint sample grids go to TensorBoard and/or Weights &
Biases (offline here: WANDB_MODE=offline), from the command line; an unknown tracker is an error before any work."""
from __future__ import annotations

import json

import pytest

from adapterlib.__main__ import main
from adapterlib.training.config import make_config, trackers

FIELDS = ["--steps", "4", "--batch_size", "4", "--n_train", "16", "--save_every", "2", "--log_every", "1",
          "--n_samples", "2", "--warmup", "1"]


def test_report_to_names_the_trackers_and_refuses_unknown_ones():
    assert trackers(make_config("shapes")) == []
    assert trackers(make_config("shapes", report_to="wandb", tensorboard=True)) == ["tensorboard", "wandb"]
    assert trackers(make_config("shapes", report_to="tensorboard, wandb")) == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="'mlflow' is not a tracker; give none, or a comma list of tensorboard, wandb"):
        make_config("shapes", report_to="mlflow")


def test_wandb_offline_gets_the_rows_the_samples_and_the_config(runs, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["train", "--run_name", "tracked", *FIELDS, "--report_to", "tensorboard,wandb"]) == 0
    run = runs / "tracked"
    assert json.loads((run / "config.json").read_text())["report_to"] == "tensorboard,wandb"
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    data = next(offline[0].glob("run-*.wandb")).read_bytes()
    columns = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("loss", "lr", "grounding_success", columns[-4]):      # the metrics row's columns, a gate's too
        assert column.encode() in data, column
    assert b"tracked" in data and b"gate_lr_scale" in data               # the run's name and its config
    images = list(offline[0].glob("files/media/images/samples_*.png"))
    assert len(images) == 2                                              # the grids of checkpoints 2 and 4
    assert (run / "tensorboard").is_dir()                                # both trackers at once
    # a resume reports to a new wandb run of the same group, from the resumed step
    assert main(["train", "--resume", "tracked", "--steps", "6"]) == 0
    assert len(sorted((run / "wandb").glob("offline-run-*"))) == 2
