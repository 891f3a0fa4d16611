"""Notebook 01's checks: they pass on a fresh adapter and name what to fix when something is wrong."""
from __future__ import annotations

import pytest
import torch

from adapterlib import checks, shapes
from adapterlib.adapter import build_adapter
from adapterlib.base import load_base
from adapterlib.precision import precision_policy
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
