"""Grounding measured while training (`checkpoint_grounding`): each checkpoint's samples, measured by the run's
detector, land on the checkpoint's row of metrics.csv (and train.log, status, the live plot); the numbers are those
of the same samples measured afterwards; the field reaches the run from the command line; a detector that can measure
none of the phrases turns it off with one line."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from adapterlib.__main__ import main
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.runs import GROUNDING_COLUMNS, read_metrics

TINY = ["--steps", "4", "--batch_size", "2", "--n_train", "16", "--save_every", "2", "--log_every", "3",
        "--n_samples", "3", "--warmup", "1"]


def test_each_checkpoint_row_holds_the_grounding_of_its_samples(runs, capsys):
    from adapterlib.training.checkpoint import load_run_base
    from adapterlib.model.sample import generate
    from adapterlib.notebook.monitor import run_status
    from adapterlib.training import worlds
    from adapterlib.training.checkpoint import load_adapter
    from adapterlib.runs import resolve_checkpoint

    assert main(["train", "--run_name", "g", *TINY]) == 0
    run = runs / "g"
    metrics = read_metrics(run)
    # a row at every log step (3) and at every checkpoint (2, 4), whatever log_every says
    assert metrics.step.tolist() == [2, 3, 4] and set(GROUNDING_COLUMNS) <= set(metrics.columns)
    measured = metrics.set_index("step")
    assert measured.loc[3, GROUNDING_COLUMNS].isna().all()                       # not a checkpoint: empty
    log = (run / "train.log").read_text()
    assert "grounding at step 2 on the 3 checkpoint samples by color" in log and "measured in" in log
    # the same samples measured afterwards: the numbers on the checkpoint's row
    base, records = load_run_base(run), worlds.heldout_records(3, version=2)
    for step in (2, 4):
        adapter = load_adapter(resolve_checkpoint(run, step)[1], base)
        images = generate(base, records, [0, 1, 2], adapter=adapter, batch_size=32)
        adapter.detach()
        summary = worlds.measure(images, records, "color")[1]
        assert measured.loc[step, "grounding_success"] == pytest.approx(summary["success_rate"])
        assert measured.loc[step, "grounding_miou"] == pytest.approx(summary["miou"])
        o_miou = measured.loc[step, "grounding_o_miou"]
        assert (math.isnan(o_miou) and summary["o_miou"] is None) or o_miou == pytest.approx(summary["o_miou"])
    status = run_status(run)
    assert status["grounding"]["step"] == 4
    assert status["grounding"]["success_rate"] == pytest.approx(measured.loc[4, "grounding_success"])
    assert main(["status", "g"]) == 0 and "grounding   success" in capsys.readouterr().out
    from adapterlib.analysis.figures import plot_progress
    labels = [line.get_label() for line in plot_progress(metrics).axes[1].lines]
    assert "grounding success" in labels and "grounding mIoU" in labels


def test_checkpoint_grounding_false_from_the_command_line_measures_nothing(runs):
    assert main(["train", "--run_name", "off", *TINY, "--checkpoint_grounding", "false"]) == 0
    run = runs / "off"
    assert json.loads((run / "config.json").read_text())["checkpoint_grounding"] is False
    assert read_metrics(run)[GROUNDING_COLUMNS].isna().all().all()
    assert "grounding at step" not in (run / "train.log").read_text()
    assert (run / "samples" / "step_0000004.png").is_file()                    # the samples are still drawn


def test_a_detector_that_can_measure_none_of_the_phrases_turns_it_off_with_one_line(tmp_path):
    from adapterlib.training.saver import Saver
    lines = []
    training = SimpleNamespace(cfg=SimpleNamespace(checkpoint_grounding=True, detector=""), device="cpu",
                               eval_records=[Record("a dog", (GroundedObject("dog", (0.1, 0.1, 0.5, 0.5)),))])
    saver = Saver(training, tmp_path, SimpleNamespace(text=lines.append), None)
    assert saver.measure(np.zeros((1, 32, 32, 3), np.uint8), 10) == {}
    assert saver.measuring is False and len(lines) == 1
    assert "checkpoint grounding off: the color detector can measure none" in lines[0] and "'dog'" in lines[0]


def test_status_shows_a_checkpoint_grounding_without_overlaps_or_objects():
    from adapterlib.notebook.monitor import _grounding_line
    line = _grounding_line(dict(step=4, success_rate=0.5, miou=0.25, o_miou=None))       # strict JSON's NaN
    assert line.startswith("success 0.500   mIoU 0.250   O-mIoU -") and "step 4" in line
    assert "O-mIoU -" in _grounding_line(dict(step=4, success_rate=0.5, miou=0.25, o_miou=float("nan")))
    assert _grounding_line(None).startswith("- (not measured")
