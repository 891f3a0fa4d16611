"""Notebook 01's checks: they pass on a fresh adapter and name what to fix when something is wrong."""
from __future__ import annotations

import pytest
import torch

from adapterlib.evaluation import checks

from adapterlib import shapes
from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.model.precision import precision_policy
from adapterlib.shapes.tiny_base import tiny_unet_config


@pytest.fixture
def adapter(fresh_adapter):
    return fresh_adapter


def failing(summary):
    return summary[summary.result == "FAIL"].check.tolist()


def test_run_all_passes_on_a_fresh_adapter(base, adapter, records):
    summary = checks.run_all(base, adapter, records, "cpu", "bf16")
    assert list(summary.check) == ["dtype", "identity at init", "gradient at step 0", "mixed-precision step"]
    assert failing(summary) == [], summary.to_string()
    checks.raise_on_failure(summary)


def test_run_all_passes_on_a_tiny_sd_architecture(tiny_sd_folder, records):
    base = load_base(tiny_sd_folder)
    adapter = build_adapter(base, attention="self", norm="rmsnorm")
    try:
        assert failing(checks.run_all(base, adapter, records, "cpu", "no")) == []
    finally:
        adapter.detach()


def test_a_nonzero_gate_fails_identity_and_says_so(base, adapter, records):
    with torch.no_grad():
        adapter.layers[0].gate_attn.fill_(0.1)
    summary = checks.run_all(base, adapter, records, "cpu", "bf16")
    assert "identity at init" in failing(summary)
    assert "dtype" not in failing(summary)
    with pytest.raises(AssertionError, match=r"identity at init: max \|diff\| = .* != 0: a gate was not initialised"):
        checks.raise_on_failure(summary)


def test_an_fp16_trainable_parameter_fails_dtype_and_says_so(base, adapter, records):
    adapter.layers[2].q.weight.data = adapter.layers[2].q.weight.data.half()
    summary = checks.run_all(base, adapter, records, "cpu", "bf16")
    assert "dtype" in failing(summary)
    with pytest.raises(AssertionError, match=r"dtype: trainable parameter layers\.2\.q\.weight is torch\.float16: "
                                             r"keep adapter weights fp32 \(master weights\)"):
        checks.raise_on_failure(summary)


def test_a_base_not_in_the_compute_dtype_fails_dtype(base, adapter):
    passed, message = checks.check_dtypes(base, adapter, torch.bfloat16)   # the base is fp32
    assert not passed and "not the compute dtype torch.bfloat16" in message


def test_precision_policy():
    assert precision_policy("cpu", "fp16") == (torch.float32, None, False)
    assert precision_policy("cuda", "no") == (torch.float32, None, False)
    assert precision_policy("cuda:0", "bf16") == (torch.bfloat16, torch.bfloat16, False)
    assert precision_policy("cuda", "fp16") == (torch.float16, torch.float16, True)
    with pytest.raises(ValueError, match="mixed_precision 'fp8'"):
        precision_policy("cuda", "fp8")


def test_adapter_size_table_counts_what_build_adapter_builds(base):
    # counting on the meta device gives the parameter count of the real adapter
    table = checks.adapter_size_table(tiny_unet_config(), text_dim=base.text_encoder.config.hidden_size)
    adapter = build_adapter(base, attention="self")
    try:
        real = sum(p.numel() for p in adapter.trainable_parameters().values())
    finally:
        adapter.detach()
    assert table.set_index("model").params["adapterlib (self + FF)"] == real
    assert table.model.iloc[-1] == "diffusers GLIGEN (fuser + position_net)" and table.params.iloc[-1] > 0


# ----------------------------------------------------------------------------------------------
# what notebook 01 builds and checks with: the adapter a run trains, captions that fit the base

def test_architecture_options_cover_every_architecture_field():
    from adapterlib.options import ARCHITECTURE
    from adapterlib.training.config import ARCHITECTURE_FIELDS, RESUME_FIXED
    assert ARCHITECTURE_FIELDS == tuple(ARCHITECTURE) and set(ARCHITECTURE) <= set(RESUME_FIXED)
    assert set(checks.CHECK_FIELDS) >= set(ARCHITECTURE_FIELDS)


@pytest.mark.parametrize("given, expected", [
    (dict(adapter_attention="cross", adapter_norm="rmsnorm", adapter_feedforward=False, adapter_depth="learned",
          max_objects=6), dict(attention="cross", norm="rmsnorm", feedforward=False, depth="learned", max_objects=6)),
    (dict(adapter_subcell=True, adapter_depth="smaller-front", adapter_ff_mult=2),      # the masked attention's own
     dict(attention="masked", subcell=True, depth="smaller-front", ff_mult=2))])
def test_the_adapter_built_from_a_config_is_the_one_its_run_trains(tmp_path, monkeypatch, base, given, expected):
    """A run with every architecture field off its default saves an adapter whose config (what a checkpoint loads
    by) is the one `build_adapter(base, **architecture_options(cfg))` builds: notebook 01 checks that adapter."""
    from adapterlib.model.adapter import architecture_options
    from adapterlib.training.checkpoint import adapter_config
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    cfg = make_config("smoke", run_name="arch", steps=1, save_every=1, n_samples=0, n_train=16, batch_size=2, **given)
    run = train(cfg, progress=False)
    built = build_adapter(base, **architecture_options(cfg))
    try:
        assert adapter_config(run / "final" / "adapter.safetensors") == built.config
        assert {k: built.config.get(k) for k in expected} == expected
    finally:
        built.detach()


def test_check_records_fit_the_data_and_the_base(tmp_path, base, tiny_sd_folder):
    from adapterlib.data.manifest import GroundedObject, Record, write_manifest
    # a Shapes world on a Shapes base: that world's held-out layouts, no more objects than the adapter takes
    records, source = checks.check_records("shapes-v2", base, n=4, max_objects=2)
    assert records and all(len(r.objects) <= 2 for r in records) and "held-out layouts of shapes-v2" in source
    assert records == [r for r in shapes.heldout_records(None, 2) if len(r.objects) <= 2][:4]
    # a manifest: its first records, on any base (no images needed)
    own = [Record("a kayak on a lake", (GroundedObject("a kayak", (0.2, 0.5, 0.8, 0.7)),)),
           Record("a lamp beside a bed", (GroundedObject("a lamp", (0.0, 0.1, 0.3, 0.6)),
                                          GroundedObject("a bed", (0.3, 0.4, 1.0, 1.0))))]
    manifest = write_manifest(tmp_path / "data.jsonl", own)
    assert checks.check_records(str(manifest), base)[0] == own
    sd = load_base(tiny_sd_folder)
    assert checks.check_records(str(manifest), sd, max_objects=1)[0] == own[:1]
    # a Shapes world on a latent (SD) base: neutral layouts, no Shapes caption
    records, source = checks.check_records("shapes-v2", sd)
    assert records == list(checks.NEUTRAL_RECORDS) and "neutral" in source
    assert checks.check_records("", sd)[0] == records                    # no data (the sd15 preset's)
    assert checks.check_records("", base)[0] == records
    summary = checks.run_all(sd, build_adapter(sd), records, "cpu", "no")
    assert failing(summary) == [], summary.to_string()
