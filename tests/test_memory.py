"""Memory, before and during a run (adapterlib/training/memory.py): the estimate written before the first step
(frozen base, the adapter's 16 bytes a parameter, the activations autograd keeps for one sample, measured, times the
micro-batch), the peak in metrics.csv and `status`, and the out-of-memory stop naming what would fit."""
from __future__ import annotations

import re

import pytest
import torch

from adapterlib.__main__ import main
from adapterlib.runs import read_metrics
from adapterlib.training.memory import SavedBytes

FIELDS = ["--steps", "2", "--batch_size", "16", "--n_train", "32", "--save_every", "2", "--log_every", "1",
          "--n_samples", "0"]


def test_saved_bytes_counts_what_autograd_keeps_for_the_backward_and_leaves_the_weights_out():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    for rows in (1, 3):        # the Linear keeps its input (rows x 8 floats), the ReLU its output (rows x 16)
        x = torch.randn(rows, 8)
        with SavedBytes(model) as watch:
            y = model(x)
        assert watch.bytes == rows * (8 + 16) * 4 and watch.done
        assert torch.equal(y, model(x))                         # the tensors pass through as they are
        y.sum().backward()                                      # and the backward still has them


def _estimate(run) -> dict:
    log = (run / "train.log").read_text().splitlines()
    before = next(i for i, l in enumerate(log) if "memory before the first step" in l)
    after = next(i for i, l in enumerate(log) if "memory estimated" in l)
    first_step = next(i for i, l in enumerate(log) if l.split(" ", 2)[2].startswith("step="))
    assert before < after < first_step            # the parameters before the first step, the whole after it
    line = log[after]
    mib = [float(v.replace(",", "")) for v in re.findall(r"([\d,.]+) MiB", line)]
    return dict(line=line, base=mib[0], adapter=mib[1], per_sample=mib[2], activations=mib[3],
                micro=int(re.search(r"x micro-batch (\d+)", line).group(1)),
                total=float(re.search(r"about ([\d.]+) GiB", line).group(1)),
                peak=float(re.search(r"peak so far ([\d.]+) GiB", line).group(1)))


def test_a_run_states_its_memory_before_the_first_step_and_logs_its_peak(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    assert main(["train", "--run_name", "whole", *FIELDS]) == 0
    assert main(["train", "--run_name", "quarter", *FIELDS, "--gradient_accumulation_steps", "4"]) == 0
    whole, quarter = _estimate(tmp_path / "whole"), _estimate(tmp_path / "quarter")
    assert (whole["micro"], quarter["micro"]) == (16, 4)
    assert whole["per_sample"] == pytest.approx(quarter["per_sample"], rel=0.05) and whole["per_sample"] > 0
    assert whole["peak"] > 0.1
    assert whole["activations"] == pytest.approx(16 * whole["per_sample"], rel=1e-2)   # (printed to 0.1 MiB)
    assert quarter["activations"] == pytest.approx(4 * quarter["per_sample"], rel=1e-2)
    params = int(re.search(r"adapter ([\d,]+) parameters", whole["line"]).group(1).replace(",", ""))
    assert f"{params} trainable parameters" in (tmp_path / "whole" / "train.log").read_text()   # the run's own count
    assert whole["adapter"] == pytest.approx(params * 16 / 2 ** 20, abs=0.05)
    assert whole["total"] > quarter["total"]
    metrics = read_metrics(tmp_path / "whole")
    assert (metrics.peak_mem_gib > 0.1).all()                         # the process's resident peak on the CPU
    assert main(["status", "whole"]) == 0
    assert re.search(r"memory      peak \d+\.\d\d GiB", capsys.readouterr().out)
