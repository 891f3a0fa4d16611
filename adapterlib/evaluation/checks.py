"""The checks behind notebooks/01_dtype_zero_init_check.ipynb: run them before any training.

What must hold for a freshly built adapter on a frozen base:
- dtypes: every trainable parameter is fp32 (the master weights), every frozen base weight is in
  the compute dtype of the precision policy, and nothing outside the adapter requires grad;
- identity at init: with every gate at exactly 0 the adapted UNet's output *is* the base's output;
- gradient at step 0: only the gates receive gradient (everything behind a zero gate is multiplied
  by tanh(0) = 0);
- one forward + backward under the policy's autocast is finite.

`run_all` gathers them into a PASS/FAIL table; `raise_on_failure` turns a FAIL into an error that
says what to fix. `adapter.trainable_parameters()` is the only source of which parameters train.
The notebook takes only the config fields the checks use (`CHECK_FIELDS`), builds the adapter as training
does (`adapter.architecture_options`) and runs the checks on captions and boxes that fit the base
(`check_records`).
"""
from __future__ import annotations

import re

import pandas as pd
import torch
import torch.nn.functional as F

from adapterlib.training import worlds
from adapterlib.model.adapter import AdaptedUNet, SpatialAdapter
from adapterlib.options import ATTENTIONS
from adapterlib.training.config import ARCHITECTURE_FIELDS
from adapterlib.data.manifest import GroundedObject, Record, read_manifest
from adapterlib.options import MAX_OBJECTS
from adapterlib.paths import repo_path
from adapterlib.model.precision import autocast, autocast_for, precision_policy
from adapterlib.model.sample import ground


# ----------------------------------------------------------------------------------------------
# 0. what the checks take: the config fields they use, captions and boxes that fit the base

# notebook 01's parameters (with `preset`): the base and the adapter's architecture (what a run builds), the data
# (whose captions the checks use) and where and in which precision it runs
CHECK_FIELDS = (*ARCHITECTURE_FIELDS, "data", "device", "mixed_precision")

# the checks' captions and boxes on a base that is not a Shapes base when the data names no manifest
NEUTRAL_RECORDS = (
    Record("a dog on a sofa", (GroundedObject("a dog", (0.1, 0.35, 0.5, 0.9)),)),
    Record("a cup and a book on a table", (GroundedObject("a cup", (0.15, 0.3, 0.4, 0.6)),
                                            GroundedObject("a book", (0.5, 0.4, 0.9, 0.7)))),
    Record("two people walking past a tree", (GroundedObject("a person", (0.05, 0.2, 0.3, 0.95)),
                                              GroundedObject("a person", (0.35, 0.25, 0.6, 0.95)),
                                              GroundedObject("a tree", (0.55, 0.0, 1.0, 0.8)))),
    Record("a red car in front of a house", (GroundedObject("a red car", (0.1, 0.55, 0.7, 0.95)),
                                             GroundedObject("a house", (0.2, 0.05, 0.95, 0.7)))),
)


def check_records(data: str, base, n: int = 4, max_objects: int = MAX_OBJECTS) -> tuple[list[Record], str]:
    """(records, where they come from): the captions and boxes the checks run on, at most `max_objects` objects
    each. A manifest (`data` a path): its first n records (images not needed); a Shapes world on a pixel base (a
    Shapes base): the world's first n held-out layouts; no data (the sd15 preset's "") or a Shapes world on a
    latent base (Stable Diffusion): NEUTRAL_RECORDS, so an SD base is never checked with Shapes captions."""
    fits = lambda records: [r for r in records if len(r.objects) <= max_objects][:n]
    if data.strip() and not worlds.is_shapes(data):
        path = repo_path(data)
        records = fits(read_manifest(path, require_image=False, on_bad_record="skip", max_objects=max_objects))
        return records, f"the first {len(records)} records of {path}"
    if data.strip() and base.vae is None:
        version = worlds.heldout_version(data)
        records = fits(worlds.heldout_records(None, version))
        return records, f"the first {len(records)} held-out layouts of {data} (version {version})"
    why = "no data given" if not data.strip() else f"data {data!r} is the Shapes world, the base is not a Shapes base"
    records = fits(NEUTRAL_RECORDS)
    return records, (f"{len(records)} neutral layouts ({why}; training needs your manifest: give -p data "
                     "PATH/data.jsonl to check with its captions)")


# ----------------------------------------------------------------------------------------------
# 1. dtypes

def _group(name: str) -> str:
    """Parameter name with layer indices folded ("layers.3.q.weight" -> "layers.*.q.weight")."""
    return re.sub(r"\.\d+\.", ".*.", name)


def dtype_table(base, adapter: SpatialAdapter) -> pd.DataFrame:
    """One row per (module, parameter group, dtype, trainable): the frozen base's parts summarised
    as a whole, the adapter's parameters grouped by name across its layers."""
    trainable = {id(p) for p in adapter.trainable_parameters().values()}
    rows = []
    for module_name, module in base.parts().items():
        for p in module.parameters():
            rows.append(dict(module=f"base.{module_name}", parameter="(all)", dtype=str(p.dtype),
                             trainable=p.requires_grad, tensors=1, numel=p.numel()))
    for name, p in adapter.named_parameters():
        rows.append(dict(module="adapter", parameter=_group(name), dtype=str(p.dtype),
                         trainable=id(p) in trainable and p.requires_grad, tensors=1, numel=p.numel()))
    table = pd.DataFrame(rows)
    keys = ["module", "parameter", "dtype", "trainable"]
    return table.groupby(keys, sort=False, as_index=False)[["tensors", "numel"]].sum()


def _dtype_problems(base, adapter: SpatialAdapter, compute_dtype: torch.dtype) -> list[tuple[str, str]]:
    """(what is wrong, what to do) for every dtype / requires-grad violation."""
    problems = []
    for name, p in adapter.trainable_parameters().items():
        if p.dtype != torch.float32:
            problems.append((f"trainable parameter {name} is {p.dtype}",
                             "keep adapter weights fp32 (master weights), cast only the frozen base"))
        if not p.requires_grad:
            problems.append((f"trainable parameter {name} does not require grad",
                             "adapter.trainable_parameters() must list only parameters that train"))
    for module_name, module in base.parts().items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                problems.append((f"frozen base.{module_name}.{name} requires grad",
                                 "freeze the base (base.freeze()); only adapter parameters train"))
                break
            upcast = module_name == "vae" and base.vae_upcast and p.dtype == torch.float32   # SDXL's VAE under fp16
            if p.dtype != compute_dtype and not upcast:
                problems.append((f"frozen base.{module_name}.{name} is {p.dtype}, not the compute dtype {compute_dtype}",
                                 "load the base with dtype=precision_policy(...).compute_dtype"))
                break
    return problems


def check_dtypes(base, adapter: SpatialAdapter, compute_dtype: torch.dtype) -> tuple[bool, str]:
    """(passed, message): every trainable parameter fp32 and requiring grad; the base frozen in compute_dtype."""
    problems = _dtype_problems(base, adapter, compute_dtype)
    if problems:
        return False, "; ".join(f"{what}: {fix}" for what, fix in problems)
    n = len(adapter.trainable_parameters())
    return True, f"{n} trainable tensors fp32; frozen base in {compute_dtype}"


# ----------------------------------------------------------------------------------------------
# 2-4. identity, gradient, mixed precision: one random UNet batch for the records

def _unet_batch(base, records, generator: torch.Generator):
    """Random latents and timesteps, the records' captions (and SDXL's or SD3's added conditioning, else None); the
    training target for them (`base.noised`: DDPM's, or flow matching's velocity)."""
    B, (channels, side) = len(records), base.latent_shape
    x0 = torch.randn(B, channels, side, side, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, base.scheduler.config.num_train_timesteps, (B,), generator=generator)
    noisy, target, t = base.noised(x0, noise, t)
    with torch.no_grad():
        context, pooled = base.encode_text([r.caption for r in records])     # (B, L, D); SDXL, SD3: (B, P)
    to = lambda x: x.to(base.device)
    return to(noisy).to(base.net.dtype), to(t), context, to(target), base.added_cond(pooled)


def identity_at_init(base, adapter: SpatialAdapter, records, seed: int = 0) -> float:
    """max |adapted - base| of the UNet output on random latents and timesteps, with the records'
    captions and boxes. Exactly 0.0 for a fresh adapter (every gate is 0)."""
    latents, t, context, _, added = _unet_batch(base, records, torch.Generator().manual_seed(seed))
    grounding = ground(base, records, max_objects=adapter.max_objects)
    model = AdaptedUNet(base.net, adapter)
    with torch.no_grad(), autocast_for(base):
        plain = base.predict(latents, t, context, added)
        adapted = model(latents, t, context, grounding, added=added)
    return (adapted.float() - plain.float()).abs().max().item()


def _adapter_loss(base, adapter: SpatialAdapter, records, seed: int = 0) -> torch.Tensor:
    """The training loss of one adapted forward (random x0: a check of the mechanics, not learning)."""
    latents, t, context, target, added = _unet_batch(base, records, torch.Generator().manual_seed(seed))
    pred = AdaptedUNet(base.net, adapter)(latents, t, context, ground(base, records, max_objects=adapter.max_objects),
                                           added=added)
    return F.mse_loss(pred.float(), target.float())


def _clear_grads(adapter: SpatialAdapter) -> None:
    for p in adapter.trainable_parameters().values():
        p.grad = None


def gradient_at_step0(base, adapter: SpatialAdapter, records) -> pd.DataFrame:
    """One forward + backward; a row per trainable tensor: name, is_gate, grad_norm, nonzero.
    With all gates at 0, only the gates may be nonzero. Gradients are cleared afterwards."""
    _clear_grads(adapter)
    with autocast_for(base):
        loss = _adapter_loss(base, adapter, records)
    loss.backward()
    gates = adapter.gate_parameters()
    rows = []
    for name, p in adapter.trainable_parameters().items():
        norm = 0.0 if p.grad is None else p.grad.float().norm().item()
        rows.append(dict(name=name, is_gate=name in gates, grad_norm=norm, nonzero=norm != 0.0))
    _clear_grads(adapter)
    return pd.DataFrame(rows)


def mixed_precision_step_is_finite(base, adapter: SpatialAdapter, records, device, mixed_precision: str
                                   ) -> tuple[bool, float]:
    """(finite, loss): one forward + backward under the policy's autocast (with a loss scaler for
    fp16); finite means the loss and every trainable gradient, unscaled, are finite."""
    policy = precision_policy(device, mixed_precision)
    params = list(adapter.trainable_parameters().values())
    _clear_grads(adapter)
    with autocast(device, policy.autocast_dtype):
        loss = _adapter_loss(base, adapter, records)
    if policy.needs_grad_scaler:
        scaler = torch.amp.GradScaler(torch.device(device).type)
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(params, lr=0.0))     # unscale only; nothing steps
    else:
        loss.backward()
    finite = bool(torch.isfinite(loss)) and all(p.grad is None or bool(torch.isfinite(p.grad).all())
                                                 for p in params)
    _clear_grads(adapter)
    return finite, loss.item()


# ----------------------------------------------------------------------------------------------
# 5. the summary

def run_all(base, adapter: SpatialAdapter, records, device, mixed_precision: str) -> pd.DataFrame:
    """PASS/FAIL per check: check, result, value (what was measured), fix (what to do if it fails).
    A check that raises is a FAIL with the error as its value."""
    policy = precision_policy(device, mixed_precision)
    rows = []

    def record(check, run, fix):
        try:
            passed, value, fix = run(fix)
        except Exception as e:                                  # a crash is a failed check, not a crash
            passed, value = False, f"raised {type(e).__name__}: {e}"
            fix = "the check could not run; fix any FAIL above it first (often the cause), else the error"
        rows.append(dict(check=check, result="PASS" if passed else "FAIL", value=value, fix=fix))

    def dtypes(fix):
        problems = _dtype_problems(base, adapter, policy.compute_dtype)
        if problems:
            return False, problems[0][0], problems[0][1]
        return True, check_dtypes(base, adapter, policy.compute_dtype)[1], fix

    def identity(fix):
        diff = identity_at_init(base, adapter, records)
        return diff == 0.0, "max |diff| = 0.0" if diff == 0.0 else f"max |diff| = {diff:.3g} != 0", fix

    def gradient(fix):
        table = gradient_at_step0(base, adapter, records)
        leaking = table[table.nonzero & ~table.is_gate].name.tolist()
        dead = table[~table.nonzero & table.is_gate].name.tolist()
        value = f"{int(table.nonzero.sum())} of {len(table)} tensors nonzero, {int(table.is_gate.sum())} gates"
        if leaking:
            return False, f"{value}; {leaking[0]} gets gradient", \
                "something bypasses a gate: a gate is not zero, or a layer adds its output ungated"
        if dead:
            return False, f"{value}; gate {dead[0]} gets none", \
                "a gated layer is not in the forward pass: attach the adapter to this UNet"
        return True, value, fix

    def mixed(fix):
        finite, loss = mixed_precision_step_is_finite(base, adapter, records, device, mixed_precision)
        mode = "fp32" if policy.autocast_dtype is None else f"autocast {policy.autocast_dtype}"
        return finite, f"loss {loss:.4g} ({mode})", fix

    record("dtype", dtypes, "keep adapter weights fp32 (master weights), cast only the frozen base")
    record("identity at init", identity, "a gate was not initialised to zero")
    record("gradient at step 0", gradient, "only the gates may get gradient while every gate is zero")
    record("mixed-precision step", mixed,
           "a non-finite loss or gradient: use bf16, or fp16 with a GradScaler, and fp32 adapter weights")
    return pd.DataFrame(rows)


def raise_on_failure(summary: pd.DataFrame) -> None:
    """AssertionError naming each failing check, what was found and what to fix."""
    failed = summary[summary.result != "PASS"]
    if len(failed):
        lines = [f"{r.check}: {r.value}: {r.fix}" for r in failed.itertuples()]
        raise AssertionError(f"{len(failed)} check(s) failed:\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Adapter size on a real architecture, counted on the meta device (no memory, no weights)

SD15_UNET_CONFIG = dict(cross_attention_dim=768, attention_head_dim=8)   # the rest: diffusers' defaults = SD 1.5
SD15_TEXT_DIM = 768                                                       # CLIP ViT-L/14 hidden size


def _count(params) -> int:
    return sum(p.numel() for p in params)


def adapter_size_table(unet_config: dict = SD15_UNET_CONFIG, text_dim: int = SD15_TEXT_DIM) -> pd.DataFrame:
    """Parameters of our adapter per attention variant (with and without the gated feed-forward)
    next to diffusers' GLIGEN (fuser in every transformer block + position_net) on one UNet config."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        gligen = UNet2DConditionModel(**unet_config, attention_type="gated")
        rows = [dict(model=f"adapterlib ({attention}{' + FF' if ff else ''})",
                     params=_count(SpatialAdapter(unet, text_dim, attention=attention, feedforward=ff).parameters()))
                for attention in ATTENTIONS for ff in (True, False)]
    fuser = _count(p for n, p in gligen.named_parameters() if ".fuser." in n)
    position_net = _count(gligen.position_net.parameters())
    rows.append(dict(model="diffusers GLIGEN (fuser + position_net)", params=fuser + position_net))
    table = pd.DataFrame(rows)
    table["millions"] = (table.params / 1e6).round(2)
    table["of the UNet"] = (table.params / _count(unet.parameters())).map("{:.1%}".format)
    return table
