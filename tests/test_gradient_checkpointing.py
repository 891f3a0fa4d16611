"""Gradient checkpointing (`gradient_checkpointing`): the network's activations are recomputed in the backward pass with
the adapter's hooks inside (each segment puts back the injection its forward saw), so a run trains the same adapter
as without it, saves fewer activations, reaches the run from the command line and may change on resume."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from adapterlib.__main__ import main

from helpers import max_diff

FIELDS = ["--steps", "4", "--batch_size", "8", "--n_train", "32", "--save_every", "2", "--log_every", "1",
          "--n_samples", "0", "--warmup", "1"]
CHECKPOINTING_TOLERANCE = 1e-6     # the recompute is the same arithmetic: measured 0.0 on this CPU


def _final(run):
    return load_file(str(run / "final" / "adapter.safetensors"))


def test_checkpointed_run_trains_what_the_plain_run_does_and_may_change_on_resume(runs):
    assert main(["train", "--run_name", "plain", *FIELDS]) == 0
    assert main(["train", "--run_name", "ckpt", *FIELDS, "--gradient_checkpointing", "true"]) == 0
    assert json.loads((runs / "ckpt" / "config.json").read_text())["gradient_checkpointing"] is True
    plain, ckpt = _final(runs / "plain"), _final(runs / "ckpt")
    assert max(v.abs().max().item() for k, v in ckpt.items() if "gate" in k) > 0.01     # it trained
    assert max_diff(plain, ckpt) < CHECKPOINTING_TOLERANCE
    assert "(gradient checkpointing: only what enters each block)" in (runs / "ckpt" / "train.log").read_text()
    assert "gradient checkpointing" not in (runs / "plain" / "train.log").read_text()
    # free on resume: turned off for the last steps, the run still matches
    assert main(["train", "--resume", "ckpt", "--steps", "6", "--gradient_checkpointing", "false"]) == 0
    assert main(["train", "--resume", "plain", "--steps", "6"]) == 0
    assert max_diff(_final(runs / "plain"), _final(runs / "ckpt")) < CHECKPOINTING_TOLERANCE


def test_the_recompute_sees_the_injection_and_saves_fewer_activations():
    """Without putting the injection back, the recompute would run the blocks without the adapter: the gated layers
    would get no gradient. With it, every trainable parameter gets the plain backward's gradient."""
    from adapterlib.model.adapter import AdaptedUNet, build_adapter
    from adapterlib.model.hooks import set_gradient_checkpointing
    from adapterlib.model.base import load_base
    from adapterlib.model.adapter import Grounding
    from adapterlib.shapes import heldout_records
    from adapterlib.training.memory import SavedBytes

    torch.manual_seed(0)
    base = load_base("shapes-tiny", device="cpu")
    adapter = build_adapter(base, adapted_blocks="all")
    with torch.no_grad():
        for name, p in adapter.trainable_parameters().items():
            if "gate" in name:
                p.fill_(0.5)                              # open gates: every layer acts
    model = AdaptedUNet(base.net, adapter)
    noisy, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    records = heldout_records(6, version=2)[4:6]                  # 3 objects each
    context = torch.randn(2, 8, base.net.config.cross_attention_dim)
    phrases = torch.randn(sum(len(r.objects) for r in records), base.phrase_dim)
    grounding = Grounding.from_records(records, phrases)
    grads, saved = [], []
    for enabled in (False, True):
        set_gradient_checkpointing(base.net, adapter, enabled)
        adapter.zero_grad(set_to_none=True)
        with SavedBytes(model) as watch:
            loss = model(noisy, t, context, grounding, 1.0).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter.trainable_parameters().items()})
        saved.append(watch.bytes)
    set_gradient_checkpointing(base.net, adapter, False)
    moved = [{n for n, g in run.items() if g.abs().sum() > 0} for run in grads]
    assert moved[0] == moved[1] and len(moved[1]) > 0.9 * len(grads[0]), set(grads[0]) - moved[1]
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < CHECKPOINTING_TOLERANCE
    assert saved[1] < 0.5 * saved[0], saved                 # measured: a fraction of the plain forward's
    assert adapter.injection is None                          # nothing left behind after the backward
