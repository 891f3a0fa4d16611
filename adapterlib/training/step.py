"""One optimisation step of the training loop: what it works on (`Training`, built by `train.make_training`), its
inputs drawn from the run's random stream (`step_inputs`), the loss (`micro_loss`, `step_loss`), the backward of
several micro-batches (`accumulated_backward`) and the update behind the guard against a non-finite loss (`update`,
counting on the device with `NonFiniteCount`). `train._loop` calls them each step; `bench` times the same calls.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapterlib.training import batches as inputs
from adapterlib.training import distributed
from adapterlib.model.adapter import Grounding, region_mask
from adapterlib.training.config import TrainConfig
from adapterlib.training.losses import box_loss, draw_timesteps, edge_ring, visible_region


@dataclass
class Training:
    """Everything a step needs: the frozen base and the adapter as one module, the optimiser, the data."""
    cfg: TrainConfig
    shard: distributed.Shard
    base: object
    adapter: object
    model: torch.nn.Module                  # AdaptedUNet (DDP-wrapped with several processes, compiled if asked)
    params: dict                            # the adapter's trainable parameters, by name
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    compute_dtype: torch.dtype
    amp_dtype: torch.dtype | None
    sync_free: bool                         # CUDA: no host sync per step (train.SYNC_FREE_DEVICES)
    slots: int | None                       # grounding slots per batch (compiled runs: max_objects)
    source: object                          # inputs.training_source: cached encodings or images
    eval_records: list                      # drawn at each checkpoint

    @property
    def device(self) -> torch.device:
        return self.shard.device


@dataclass
class StepInputs:
    """Everything a step's forward takes, for this process's rows of the global batch, drawn in one fixed order."""
    noisy: torch.Tensor
    target: torch.Tensor
    net_t: torch.Tensor
    context: torch.Tensor
    grounding: Grounding
    scale: torch.Tensor
    added: dict | None                      # SDXL's / SD3's added conditioning
    region: torch.Tensor | None             # the box loss's regions (box_loss_region other than "box")
    objects: torch.Tensor | None            # the box loss's divisor: the global batch's objects / processes


def step_inputs(training: Training, batch: inputs.Batch, gen: torch.Generator) -> StepInputs:
    """The inputs of one step. The random numbers of the whole global batch are drawn in a fixed order from `gen`
    (several processes: each keeps its rows), so micro-batches and processes split the same draws."""
    cfg, shard, device, base = training.cfg, training.shard, training.device, training.base
    # --- inputs: captions (caption dropout), grounding (phrase dropout), latents, noise, timesteps, scales
    drop = shard.take(torch.rand(cfg.batch_size, generator=gen)) < cfg.caption_dropout
    context, phrase_embeddings, added = inputs.text_inputs(base, batch, drop, device, training.compute_dtype, training.amp_dtype)
    grounding = Grounding.from_records(batch.records, phrase_embeddings, max_objects=cfg.max_objects,
                                       phrase_dropout=cfg.phrase_dropout, generator=gen,
                                       part=shard.part(batch.records), pad_to=training.slots)
    latents = inputs.sample_latents(base, batch, gen, device, training.compute_dtype, training.amp_dtype,
                                       draw=lambda shape: shard.take(torch.randn((cfg.batch_size, *shape[1:]), generator=gen)))
    noise = shard.take(torch.randn((cfg.batch_size, *latents.shape[1:]), generator=gen)).to(device)
    t = shard.take(draw_timesteps(cfg.timesteps, cfg.batch_size, base.scheduler.config.num_train_timesteps, gen)).to(device)
    scale = shard.take(cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(cfg.batch_size, generator=gen)).to(device)
    noisy, target, net_t = base.noised(latents, noise, t)       # DDPM's target, or flow matching's velocity (SD3)
    region = objects = None
    if cfg.box_loss_weight > 0:
        # several processes: each adds its objects' errors over the global batch's object count, times the
        # process count (DDP averages the gradients), so together they make the global batch's loss; micro-batches
        # the same, summed
        objects = shard.sum(grounding.present.sum().float()) / shard.world
        region = (visible_region(batch, grounding, latents.shape[-2:], cfg.box_loss_region)
                  if cfg.box_loss_region != "box" else None)
        if cfg.box_loss_ring > 0:                                # and the background just outside each box
            grid = tuple(latents.shape[-2:])
            inside = region if region is not None else region_mask(grounding.boxes, *grid)
            region = inside | edge_ring(grounding.boxes, grid, cfg.box_loss_ring)
    return StepInputs(noisy, target, net_t, context, grounding, scale, added, region, objects)


def micro_loss(training: Training, x: StepInputs, rows: slice | None = None, share: float = 1.0) -> torch.Tensor:
    """The loss of `rows` of the step's inputs (None: all of them) through the one module: the image MSE (times
    `share`, the rows' part of the batch, so that micro-batches sum to the batch's mean) plus the box loss (its
    divisor is the whole batch's object count already)."""
    cfg = training.cfg
    take = (lambda v: v) if rows is None else (lambda v: None if v is None else v[rows])
    grounding = x.grounding if rows is None else x.grounding.rows(rows)
    added = x.added if rows is None or not x.added else {k: take(v) for k, v in x.added.items()}
    target = take(x.target)
    with torch.autocast(training.device.type, training.amp_dtype, enabled=training.amp_dtype is not None):
        pred = training.model(take(x.noisy).to(training.compute_dtype), take(x.net_t), take(x.context), grounding,
                              take(x.scale), added)                    # added: SDXL's, SD3's
    loss = F.mse_loss(pred.float(), target)
    if rows is not None:
        loss = loss * share
    if cfg.box_loss_weight > 0:
        loss = loss + cfg.box_loss_weight * box_loss(pred.float(), target, grounding, x.objects, take(x.region))
    return loss


def step_loss(training: Training, batch: inputs.Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's loss and the global batch's (every process decides alike on it): `step_inputs`, then the
    forward of all its rows (`micro_loss`)."""
    loss = micro_loss(training, step_inputs(training, batch, gen))
    return loss, training.shard.mean(loss.detach())


def accumulated_backward(training: Training, batch: inputs.Batch, gen: torch.Generator,
                         first=nullcontext()) -> torch.Tensor:
    """`gradient_accumulation_steps` micro-batches of this process's rows, each forward and backward in turn (the
    activations of one at a time), their gradients summed into the one step's; DDP averages over the processes at
    the last one only. Returns the global batch's loss, as `step_loss` does; `update(training, None, ...)` steps."""
    k = training.cfg.gradient_accumulation_steps
    x = step_inputs(training, batch, gen)
    n = len(x.noisy)
    size = n // k
    total = torch.zeros((), device=training.device)
    for i in range(k):
        last = i == k - 1
        sync = nullcontext() if last or not hasattr(training.model, "no_sync") else training.model.no_sync()
        with sync:
            with first if i == 0 else nullcontext():          # (the memory estimate watches the first forward)
                loss = micro_loss(training, x, slice(i * size, (i + 1) * size), size / n)
            if torch.isfinite(loss) or training.sync_free:            # a non-finite one: the step is skipped
                training.scaler.scale(loss).backward()
        total = total + loss.detach()
    return training.shard.mean(total)


def update(training: Training, loss: torch.Tensor, batch_loss: torch.Tensor, counted: "NonFiniteCount | None"):
    """Backward, clip, the optimiser and schedule steps, behind the one guard against a non-finite loss. Returns the
    gradient norm (None: the step was skipped on the host) and whether the loss was finite (on the device).

    The guard: where the host reads the loss at no cost (the CPU), a non-finite loss skips backward and the
    optimiser step, and the schedule moves on. Where reading it would make every step wait for the device (CUDA:
    `sync_free`), the check stays on the device: the update runs, and the fused AdamW skips its own parameter
    update when its `found_inf` tensor is 1 -- the flag torch's loss scaler hands it under fp16; without a scaler
    we set it ourselves for this one step, then remove it. `counted` counts the skips, read at log intervals."""
    good = torch.isfinite(batch_loss)
    if not training.sync_free and not good:
        training.sched.step()
        return None, good
    if loss is not None:                     # None: `accumulated_backward` did the backward passes
        training.scaler.scale(loss).backward()
    training.scaler.unscale_(training.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(training.params.values()), training.cfg.grad_clip)
    if training.sync_free:
        if not training.scaler.is_enabled():
            training.opt.found_inf = (~good).float()
        counted.add(~good)
    training.scaler.step(training.opt)
    training.opt.__dict__.pop("found_inf", None)
    training.scaler.update()
    training.sched.step()
    return grad_norm, good


class NonFiniteCount:
    """Non-finite losses counted on the device, so a step never waits for the host: the total, those since the
    last read, and the longest run in a row since the last read (a run still going carries over)."""

    def __init__(self, device):
        zero = lambda: torch.zeros((), dtype=torch.int64, device=device)
        self.total, self.new, self.run, self.longest = zero(), zero(), zero(), zero()

    def add(self, bad: torch.Tensor) -> None:
        bad = bad.long()
        self.total += bad
        self.new += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def read(self) -> tuple[int, int, int]:
        total, new, longest = (int(v) for v in torch.stack([self.total, self.new, self.longest]).tolist())
        self.new.zero_()
        self.longest.copy_(self.run)
        return total, new, longest
