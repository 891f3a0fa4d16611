"""The losses and schedules of a training step, in one place: the learning-rate schedule (`lr_factor`), the
timestep density (`draw_timesteps`), and the per-object box loss (`box_loss`) with its region (`visible_region`, and
the box's edge: `edge_ring`).
The step that uses them is `step.step_loss`."""
from __future__ import annotations

import math

import torch

from adapterlib.model.adapter import Grounding, region_mask
from adapterlib.options import TIMESTEPS
from adapterlib.training import worlds
from adapterlib.training.batches import Batch
from adapterlib.training.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` as a share of cfg.lr: a linear warm-up, then constant or a cosine down to 0."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    done = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.5 * (1.0 + math.cos(math.pi * done))


def draw_timesteps(rule: str, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps (int64) in [0, T), larger noisier: "uniform"; "cubic", t = floor((1 - u^3) T) with u
    uniform, which puts 79% of the steps in the noisier half (T2I-Adapter's schedule: the layout is decided at high
    noise); "logit-normal", t = floor(sigmoid(z) T) with z standard normal (SD3's density, diffusers'
    compute_density_for_timestep_sampling "logit_normal", mean 0, std 1: most steps at middling noise)."""
    T = num_train_timesteps
    if rule == "uniform":
        return torch.randint(0, T, (n,), generator=generator)
    if rule == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))         # diffusers' draw, without its import cost
        return (u * T).long().clamp(0, T - 1)
    if rule == "cubic":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return ((1 - u ** 3) * T).long().clamp(0, T - 1)
    raise ValueError(f"timesteps = {rule!r}: choose one of {TIMESTEPS}")


def box_loss(pred: torch.Tensor, target: torch.Tensor, grounding: Grounding,
             objects: torch.Tensor | None = None, region: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the batch's objects of the squared error inside each object's box (on the prediction's grid, a
    cell counting when it overlaps the box): a small object weighs as much as a large one, where the image's MSE
    weighs it by its pixel count. `objects`: the count to divide by (default: this batch's objects). `region`
    (B, h * w, N) bool: each object's cells instead of its box's (`visible_region`)."""
    err = (pred - target).square().mean(dim=1).flatten(1)                     # (B, h * w)
    inside = (region_mask(grounding.boxes, *pred.shape[-2:]) if region is None else region).float()  # (B, h * w, N)
    per_box = (err[:, :, None] * inside).sum(1) / inside.sum(1).clamp(min=1)  # (B, N)
    present = grounding.present.float()
    return (per_box * present).sum() / (present.sum() if objects is None else objects).clamp(min=1)


def edge_ring(boxes: torch.Tensor, grid: tuple[int, int], ring: int) -> torch.Tensor:
    """(B, h * w, N) bool: for each box, the cells within `ring` cells outside it that lie outside every box of the
    sample: its edge, where an object drawn larger than its box spills over (the box loss's `box_loss_ring`)."""
    h, w = grid
    grow = torch.tensor([-ring / w, -ring / h, ring / w, ring / h], device=boxes.device)
    outside = ~region_mask(boxes, h, w).any(-1, keepdim=True)                 # (B, h * w, 1) no box covers the cell
    return region_mask(boxes.float() + grow, h, w) & outside


def visible_region(batch: Batch, grounding: Grounding, grid: tuple[int, int],
                   region: str = "visible") -> torch.Tensor:
    """The box loss's region of each object, (B, h * w, N) bool, from the training images, on a pixel base (the
    prediction's grid is the image's). `box_loss_region visible`: its own pixels, those of its phrase's colour
    (`worlds.visible_masks`); `exclusive`: its box less the pixels other objects show (its own pixels and the
    background inside its box); `layered`: its own pixels if it is hidden in part (some of its whole shape shows
    another object, `worlds.hidden_in_part`), else exclusive. Either way an object hidden in part is not judged
    on the object in front of it."""
    if batch.pixels is None or tuple(batch.pixels.shape[1:3]) != tuple(grid):
        raise ValueError(f"box_loss_region {region!r} needs a pixel base whose prediction grid is the image's "
                         f"(here {tuple(grid)}); with a latent base use box_loss_region = 'box'")
    masks = worlds.visible_masks(batch.pixels.numpy(), batch.records, grounding.boxes.shape[1])    # (B, N, H, W)
    device = grounding.boxes.device
    own = torch.from_numpy(masks).flatten(2).transpose(1, 2).to(device)                  # (B, h * w, N)
    if region == "visible":
        return own
    background = ~own.any(-1, keepdim=True)                                                 # (B, h * w, 1)
    exclusive = own | (region_mask(grounding.boxes, *grid) & background)
    if region == "exclusive":
        return exclusive
    hidden = torch.from_numpy(worlds.hidden_in_part(masks, batch.records)).to(device)   # (B, N)
    return torch.where(hidden[:, None, :], own, exclusive)
