"""The spatial adapter: identity at init, what trains, attach/detach, scale, phrase dropout, masking."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adapterlib.evaluation import checks

from adapterlib import shapes
from adapterlib.options import ATTENTIONS
from adapterlib.model.adapter import AdaptedUNet, GatedLayer, build_adapter, fourier_embed, region_mask
from adapterlib.model.base import load_base
from adapterlib.training.config import TrainConfig
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.model.precision import precision_policy
from adapterlib.model.sample import ground

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter(fresh_adapter):
    return fresh_adapter


def unet_inputs(base, records, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = base.unet.config
    latents = torch.randn(len(records), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (len(records),), generator=g)
    return latents, t, base.encode_captions([r.caption for r in records])


@torch.no_grad()
def unet_out(base, latents, t, context, adapter=None, grounding=None, scale=1.0):
    if adapter is None:
        return base.unet(latents, t, encoder_hidden_states=context).sample
    return AdaptedUNet(base.unet, adapter)(latents, t, context, grounding, scale)


def open_gates(adapter, value=0.5):
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(value)


@pytest.mark.parametrize("which", ["tiny default", "SD architecture"])
def test_adapter_is_identity_at_init(which, base, records, tiny_sd_folder):
    base = base if which == "tiny default" else load_base(tiny_sd_folder)
    adapter = build_adapter(base)
    try:
        assert checks.identity_at_init(base, adapter, records) == 0.0
        open_gates(adapter)   # the check sees the adapter: with open gates the output moves
        assert checks.identity_at_init(base, adapter, records) > 1e-4
    finally:
        adapter.detach()


def test_a_training_step_through_the_module_changes_only_the_adapter(base, adapter, records):
    """One optimizer step on the loss of AdaptedUNet's forward, with every parameter the module holds
    that requires grad: the base's weights stay bitwise equal, every adapter tensor that got gradient
    changed, and what requires grad in the module is exactly `trainable_parameters()`."""
    model = AdaptedUNet(base.unet, adapter)
    open_gates(adapter)                                       # so everything behind the gates gets gradient
    in_module = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_module == {id(p) for p in adapter.trainable_parameters().values()}
    frozen_before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    adapter_before = {n: p.detach().clone() for n, p in adapter.trainable_parameters().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e3)   # no step rounds away
    latents, t, context = unet_inputs(base, records)
    pred = model(latents, t, context, ground(base, records))
    pred.pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in base.unet.named_parameters())
    moved = [n for n, p in adapter.trainable_parameters().items() if not torch.equal(p, adapter_before[n])]
    with_grad = [n for n, p in adapter.trainable_parameters().items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and moved == with_grad


def test_an_adapter_attached_to_another_unet_is_refused(base, adapter, tiny_sd_folder):
    other = load_base("shapes-tiny")                          # a second copy of the same base
    with pytest.raises(ValueError, match="attached to another UNet"):
        AdaptedUNet(other.unet, adapter)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_trainable_parameters_are_fp32_under_every_policy(mixed_precision):
    policy = precision_policy("cuda", mixed_precision)    # the GPU policy; its casts also run on CPU
    base = load_base("shapes-tiny", dtype=policy.compute_dtype)
    adapter = build_adapter(base)
    try:
        assert base.unet.dtype == base.text_encoder.dtype == policy.compute_dtype
        assert {p.dtype for p in adapter.trainable_parameters().values()} == {torch.float32}
        assert checks.check_dtypes(base, adapter, policy.compute_dtype)[0]
    finally:
        adapter.detach()
    assert precision_policy("cpu", mixed_precision) == (torch.float32, None, False)
    assert policy.needs_grad_scaler == (mixed_precision == "fp16")


def test_only_gates_get_gradient_at_step0(base, adapter, records):
    grads = checks.gradient_at_step0(base, adapter, records)
    assert (grads.nonzero == grads.is_gate).all(), grads[grads.nonzero != grads.is_gate]
    assert grads.is_gate.sum() == 2 * len(adapter.layers)       # gate_attn and gate_ff in every layer
    assert all(p.grad is None for p in adapter.parameters())    # the check leaves no gradient behind


def test_attach_then_detach_gives_back_the_base_exactly(base, records):
    latents, t, context = unet_inputs(base, records)
    before = unet_out(base, latents, t, context)
    weights = {n: p.detach().clone() for n, p in base.unet.state_dict().items()}
    params = [id(p) for p in base.unet.parameters()]

    adapter = build_adapter(base)
    open_gates(adapter)
    grounded = unet_out(base, latents, t, context, adapter, ground(base, records))
    assert not torch.equal(grounded, before)                     # it was really attached
    adapter.detach()

    assert [id(p) for p in base.unet.parameters()] == params     # no copies, no replaced modules
    assert all(torch.equal(p, weights[n]) for n, p in base.unet.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.unet.modules())
    assert torch.equal(unet_out(base, latents, t, context), before)
    # a detached adapter is never silently inert: its forward attaches it again, and it acts
    try:
        assert torch.equal(unet_out(base, latents, t, context, adapter, ground(base, records)), grounded)
    finally:
        adapter.detach()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.unet.modules())


def test_scale_zero_equals_the_base(base, adapter, records):
    latents, t, context = unet_inputs(base, records)
    open_gates(adapter)
    grounding = ground(base, records)
    plain = unet_out(base, latents, t, context)
    assert torch.equal(unet_out(base, latents, t, context, adapter, grounding, scale=0.0), plain)
    assert not torch.equal(unet_out(base, latents, t, context, adapter, grounding, scale=1.0), plain)


def test_phrase_dropout_uses_the_null_embedding(base, adapter, records):
    with torch.no_grad():
        adapter.tokenizer.null_text.normal_()         # zero at init: make it distinguishable
        # what a null phrase gives: the MLP of [null phrase; Fourier(box)]
        g = ground(base, records)
        null = adapter.tokenizer.null_text.expand(*g.phrases.shape)
        box = fourier_embed(g.boxes, adapter.tokenizer.freqs)
        null_tokens = adapter.tokenizer.mlp(torch.cat([null, box], dim=-1))
        dropped = adapter.tokenizer(ground(base, records, phrase_dropout=1.0))
        kept = adapter.tokenizer(ground(base, records, phrase_dropout=0.0))
    real = g.present                                            # padding slots are null either way
    assert torch.equal(dropped[real], null_tokens[real])
    assert not torch.isclose(kept[real], null_tokens[real]).all(dim=-1).any()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_layernorm_and_rmsnorm_are_identity_at_init(norm, base, records):
    adapter = build_adapter(base, norm=norm)
    try:
        expected = torch.nn.LayerNorm if norm == "layernorm" else torch.nn.RMSNorm
        assert all(isinstance(layer.norm, expected) for layer in adapter.layers)
        assert checks.identity_at_init(base, adapter, records) == 0.0
    finally:
        adapter.detach()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_all_attention_variants_are_identity_at_init(attention, base, records):
    adapter = build_adapter(base, attention=attention)
    try:
        assert checks.identity_at_init(base, adapter, records) == 0.0
    finally:
        adapter.detach()


def test_masked_attention_ignores_objects_outside_a_token():
    # region mask: a box over the left half of a 4x4 grid marks exactly the tokens of columns 0 and 1
    mask = region_mask(torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), 4, 4)        # (1, 16, 1)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:, :2] = True
    assert torch.equal(mask[0, :, 0].reshape(4, 4), expected)
    # a masked layer with an open gate: tokens outside the box do not see the object at all
    torch.manual_seed(0)
    layer = GatedLayer(dim=8, token_dim=6, heads=2, attention="masked", norm="layernorm", feedforward=False)
    with torch.no_grad():
        layer.gate_attn.fill_(1.0)
    x, present, scale = torch.randn(1, 16, 8), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, 1)
    with torch.no_grad():
        a = layer(x, torch.randn(1, 1, 6), present, mask, scale).reshape(4, 4, 8)
        b = layer(x, torch.randn(1, 1, 6), present, mask, scale).reshape(4, 4, 8)
    assert torch.equal(a[:, 2:], b[:, 2:])          # right half: outside the box, the object is invisible
    assert not torch.equal(a[:, :2], b[:, :2])      # left half: it sees the object


def test_notebook_parameters_are_known():
    nb = json.loads((REPO / "notebooks" / "01_dtype_zero_init_check.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = {t.id for node in ast.parse("".join(cell["source"])).body for t in node.targets}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names and names <= fields, f"not TrainConfig fields: {sorted(names - fields)}"


def test_a_record_without_objects_is_accepted(base, adapter):
    # the manifest allows "objects": []: such a record grounds on null tokens only
    empty = [Record(caption="a red circle", objects=()),
             Record(caption="a blue square", objects=(GroundedObject("blue square", (0.1, 0.1, 0.4, 0.4)),))]
    assert checks.identity_at_init(base, adapter, empty) == 0.0


def test_smaller_front_keeps_only_the_smallest_box_covering_a_token():
    from adapterlib.model.adapter import front_only, region_mask
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.25, 0.25]]])  # big, quarter, tiny
    present = torch.tensor([[True, True, False]])                   # the tiny box is padding
    region = region_mask(boxes, 4, 4)                               # (1, 16, 3)
    front = front_only(region, boxes, present)
    grid = lambda n: front[0, :, n].reshape(4, 4)
    assert grid(1)[2:, 2:].all() and not grid(1)[:2].any()          # the quarter box wins where it is
    assert not grid(0)[2:, 2:].any() and grid(0)[:2].all()          # the big box keeps the rest
    assert not grid(2).any()                                        # padding never attends
    assert torch.equal(front.sum(-1), torch.ones(1, 16, dtype=torch.long))   # one box a token


@pytest.mark.parametrize("depth", ["smaller-front", "learned"])
def test_depth_adapter_is_the_identity_at_init_and_round_trips_a_checkpoint(base, records, tmp_path, depth):
    from adapterlib.model.adapter import AdaptedUNet, build_adapter
    from adapterlib.training.checkpoint import load_adapter, save_checkpoint
    from adapterlib.model.sample import ground
    adapter = build_adapter(base, depth=depth)
    try:
        g = ground(base, records)
        noisy = torch.randn(len(records), 3, 32, 32)
        t, context = torch.tensor([500] * len(records)), base.encode_captions([r.caption for r in records])
        with torch.no_grad():
            plain = base.unet(noisy, t, encoder_hidden_states=context).sample
            adapted = AdaptedUNet(base.unet, adapter)(noisy, t, context, g, 1.0)
        assert torch.equal(plain, adapted)
        path = save_checkpoint(tmp_path, 1, adapter, dict(step=1), {})
    finally:
        adapter.detach()
    loaded = load_adapter(path, base)
    try:
        assert loaded.config["depth"] == depth and all(l.depth == depth for l in loaded.layers)
    finally:
        loaded.detach()


def test_learned_depth_starts_as_no_preference_and_its_bias_prefers_the_smaller_box():
    from adapterlib.model.adapter import GatedLayer, region_mask
    torch.manual_seed(0)
    plain = GatedLayer(16, 8, 2, "masked", "layernorm", False)
    learned = GatedLayer(16, 8, 2, "masked", "layernorm", False, depth="learned")
    learned.load_state_dict(plain.state_dict(), strict=False)
    for layer in (plain, learned):
        torch.nn.init.constant_(layer.gate_attn, 1.0)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]]])    # a big box and a small one inside it
    present, scale = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, 1)
    x, tokens = torch.randn(1, 16, 16), torch.randn(1, 2, 8)
    region = region_mask(boxes, 4, 4)
    args = (x, tokens, present, region, scale, boxes)
    assert learned.depth_bias.shape == (2,) and not learned.depth_bias.any()
    assert torch.allclose(plain(*args), learned(*args), atol=1e-6)          # zero bias: the same layer
    # a large bias: a token inside both boxes takes the small box's value, as if only it covered the token
    with torch.no_grad():
        learned.depth_bias.fill_(50.0)
    only_small = region.clone()
    only_small[0, :, 0] &= ~region[0, :, 1]
    assert torch.allclose(learned(*args), learned(x, tokens, present, only_small, scale, boxes), atol=1e-5)
    assert not torch.allclose(learned(*args), plain(*args), atol=1e-3)


def test_learned_depth_learns_with_the_gates_and_needs_cross_attention(base):
    from adapterlib.model.adapter import build_adapter
    adapter = build_adapter(base, depth="learned")
    try:
        fast = adapter.fast_parameters()
        assert set(adapter.gate_parameters()) < set(fast)
        assert {n for n in fast if n.endswith("depth_bias")} == {f"layers.{i}.depth_bias" for i in range(len(adapter.layers))}
    finally:
        adapter.detach()
    with pytest.raises(ValueError, match="adapter_depth = 'learned' weighs each token's covering boxes"):
        build_adapter(base, attention="self", depth="learned")
    from adapterlib.training.config import TrainConfig       # the same rule, before any work: the config's check
    with pytest.raises(ValueError, match="adapter_depth = 'learned' weighs each token's covering boxes"):
        TrainConfig(adapter_attention="self", adapter_depth="learned")
    TrainConfig(adapter_attention="cross", adapter_depth="learned")

