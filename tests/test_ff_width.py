"""The gated feed-forward's width (`adapter_ff_mult`, a multiple of the block's width; GLIGEN's is 4): it reaches the
adapter from the command line, is saved with checkpoints (a checkpoint written before the field reads as 4), is fixed
on resume, and the bench measures each width side by side."""
import json

import pytest
import torch

from adapterlib.evaluation import bench
from adapterlib.__main__ import main
from adapterlib.model.adapter import build_adapter
from adapterlib.training.checkpoint import load_adapter, load_checkpoint, save_adapter
from adapterlib.training.config import ARCHITECTURE_FIELDS, RESUME_FIXED, TrainConfig
from adapterlib.training.train import resume_config


def ff_widths(adapter) -> set[int]:
    """The hidden width of every gated feed-forward, as a multiple of its block's width."""
    return {layer.ff[1].out_features // layer.ff[1].in_features for layer in adapter.layers}


def test_the_width_builds_the_layers_and_round_trips_through_an_adapter_file(base, tmp_path):
    adapter = build_adapter(base, ff_mult=2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    assert ff_widths(adapter) == {2} and adapter.config["ff_mult"] == 2
    save_adapter(adapter, tmp_path / "a.safetensors")
    adapter.detach()
    loaded = load_adapter(tmp_path / "a.safetensors", base)
    try:
        assert ff_widths(loaded) == {2} and loaded.config == adapter.config
        assert all(torch.equal(p, dict(adapter.named_parameters())[n]) for n, p in loaded.named_parameters())
    finally:
        loaded.detach()
    four = build_adapter(base)
    four.detach()
    assert ff_widths(four) == {4} and "ff_mult" not in four.config   # as a checkpoint written before the field
    with pytest.raises(ValueError, match="adapter_ff_mult = 0"):
        build_adapter(base, ff_mult=0)


def test_the_command_lines_width_reaches_the_run_and_resume_refuses_a_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    assert "adapter_ff_mult" in RESUME_FIXED and "adapter_ff_mult" in ARCHITECTURE_FIELDS
    assert main(["train", "--preset", "smoke", "--run_name", "ff", "--steps", "2", "--save_every", "2",
                 "--n_samples", "0", "--adapter_ff_mult", "2"]) == 0
    run = tmp_path / "ff"
    assert json.loads((run / "config.json").read_text())["adapter_ff_mult"] == 2
    ckpt = load_checkpoint("ff")
    try:
        assert ff_widths(ckpt.adapter) == {2}
    finally:
        ckpt.adapter.detach()
    with pytest.raises(ValueError, match=r"adapter_ff_mult \(saved 2, asked 4\)"):
        resume_config("ff", adapter_ff_mult=4)
    saved = json.loads((run / "config.json").read_text())
    del saved["adapter_ff_mult"]                       # a run saved before the field existed ...
    (run / "config.json").write_text(json.dumps(saved))
    assert resume_config("ff").adapter_ff_mult == TrainConfig.adapter_ff_mult == 4     # ... resumes with 4


def test_bench_measures_each_width_in_one_run_and_refuses_bad_ones():
    result = bench.run_bench("tiny", device="cpu", batch=1, rounds=1, steps_per_round=1, warmup=0,
                             variants=[("masked", True), ("masked", False)], blocks=["decoder"], ff_mults=[4, 2])
    rows = {r["name"]: r for r in result["rows"]}
    assert result["ours_ff_mult"] == bench.DEFAULT_FF_MULT["tiny"]
    assert {"ours masked+cells+FF [decoder]", "ours masked+cells+FFx2 [decoder]", "ours masked+cells [decoder]"} <= set(rows)
    assert sum(n.startswith("ours masked+cells [decoder]") for n in rows) == 1       # no feed-forward: one row, no width
    assert (rows["ours masked+cells+FF [decoder]"]["ff_mult"], rows["ours masked+cells+FFx2 [decoder]"]["ff_mult"]) == (4, 2)
    params = [rows[n]["trainable_params"] for n in ("ours masked+cells [decoder]", "ours masked+cells+FFx2 [decoder]",
                                                    "ours masked+cells+FF [decoder]")]
    assert params == sorted(set(params))
    assert bench.parse_ff_mults("4, 2,4") == (4, 2)
    for bad in ("0", "two", ""):
        with pytest.raises(ValueError, match="ff-mult"):
            bench.parse_ff_mults(bad)
