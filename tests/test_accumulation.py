"""Gradient accumulation (`gradient_accumulation_steps`): `batch_size` stays the global batch, split into micro-batches
whose gradients sum into one optimizer step, so a run trains what one large batch does (within float tolerance) with
a micro-batch's activations; the value reaches the run from the command line, a batch that does not split is an
error before any work, the field is fixed on resume, and under Accelerate each process's share accumulates."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from adapterlib.__main__ import main
from adapterlib.training.config import make_config

from helpers import TOLERANCE, accelerate_train, max_diff

# the shapes preset's whole recipe (box loss over the layered regions, cosine decay, gates at their own rate,
# clipping) on 6 steps of batch 16
FIELDS = ["--steps", "6", "--batch_size", "16", "--n_train", "64", "--save_every", "3", "--log_every", "1",
          "--n_samples", "0", "--warmup", "2"]
ACCUMULATION_TOLERANCE = 1e-6     # measured: 7.5e-9 after 6 steps (summation order of the micro-batches' means)


def _final(run):
    return load_file(str(run / "final" / "adapter.safetensors"))


def test_four_micro_batches_train_what_one_batch_does(runs):
    assert main(["train", "--run_name", "one", *FIELDS]) == 0
    assert main(["train", "--run_name", "four", *FIELDS, "--gradient_accumulation_steps", "4"]) == 0
    assert json.loads((runs / "four" / "config.json").read_text())["gradient_accumulation_steps"] == 4
    one, four = _final(runs / "one"), _final(runs / "four")
    assert max(v.abs().max().item() for k, v in four.items() if "gate" in k) > 0.01     # it trained
    assert max_diff(one, four) < ACCUMULATION_TOLERANCE
    # the same steps, the same schedule: the logged learning rates and losses match row for row
    rows = [(runs / name / "metrics.csv").read_text().splitlines() for name in ("one", "four")]
    lr = [[line.split(",")[3] for line in r[1:]] for r in rows]
    assert lr[0] == lr[1]


def test_a_batch_that_does_not_split_is_an_error_before_any_work_and_the_field_is_fixed_on_resume(runs, capsys):
    assert main(["train", "--run_name", "odd", *FIELDS, "--gradient_accumulation_steps", "3"]) == 2
    assert "batch_size = 16 does not split into gradient_accumulation_steps = 3" in capsys.readouterr().err
    assert not (runs / "odd").exists()
    with pytest.raises(ValueError, match="must be >= 1"):
        make_config("shapes", gradient_accumulation_steps=0)
    assert main(["train", "--run_name", "r", *FIELDS, "--gradient_accumulation_steps", "2", "--steps", "3"]) == 0
    assert main(["train", "--resume", "r", "--gradient_accumulation_steps", "4"]) == 2
    assert "cannot change gradient_accumulation_steps (saved 2, asked 4)" in capsys.readouterr().err


def test_two_processes_each_accumulating_their_share_train_what_one_process_does(runs):
    settings = dict(steps=3, batch_size=8, n_train=32, save_every=3, log_every=1, n_samples=0, warmup=1,
                    device="cpu", mixed_precision="no")
    from adapterlib.training.train import train
    one = train(make_config("shapes", run_name="one", **settings), progress=False)
    done = accelerate_train(runs, ["--preset", "shapes", "--run_name", "two", "--gradient_accumulation_steps", "2",
                                   *[f for k, v in settings.items() for f in (f"--{k}", str(v))]])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 8 = 2 processes x 4" in (runs / "two" / "train.log").read_text()
    assert max_diff(_final(one), _final(runs / "two")) < TOLERANCE
