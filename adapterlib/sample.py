"""Seeded sampling: DDIM with classifier-free guidance, with or without a spatial adapter.

Each image's starting noise comes from its own seed, so an image does not depend on which batch it
was generated in (up to float rounding: a different batch size can change a pixel by one level), and
`generate(..., seeds=[7])` reproduces image 7 of any earlier call.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers import DDIMScheduler

from .base import BaseModel
from .checks import autocast_for
from .data import Record


def ddim_scheduler(base: BaseModel, steps: int) -> DDIMScheduler:
    # "trailing" spacing starts at the last training timestep (pure noise): a pixel-space model
    # decides colours there, and SD loses nothing by it
    scheduler = DDIMScheduler.from_config(base.scheduler.config, timestep_spacing="trailing",
                                          clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def initial_noise(base: BaseModel, seeds: list[int]) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, one CPU generator per seed (same on every device)."""
    channels, side = base.unet.config.in_channels, base.unet.config.sample_size
    noise = [torch.randn(channels, side, side, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(base.device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(base: BaseModel, records: list[Record], seeds: list[int], *, adapter=None, scale: float = 1.0,
             tau: float = 1.0, steps: int = 25, guidance: float = 3.0, batch_size: int = 64) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for each record's caption (and boxes, when an adapter is given).

    `scale` multiplies every adapter gate; `tau` is GLIGEN's scheduled sampling: grounding is on for
    the first `tau` share of the denoising steps (where layout is decided), then off."""
    if len(records) != len(seeds):
        raise ValueError(f"{len(records)} records but {len(seeds)} seeds: give one seed per record")
    out = []
    for start in range(0, len(records), batch_size):
        out.append(_generate_batch(base, records[start:start + batch_size], seeds[start:start + batch_size],
                                   adapter, scale, tau, steps, guidance))
    return np.concatenate(out) if out else np.zeros((0, base.resolution, base.resolution, 3), np.uint8)


def _generate_batch(base, records, seeds, adapter, scale, tau, steps, guidance):
    scheduler = ddim_scheduler(base, steps)
    n = len(records)
    with autocast_for(base):
        context = base.encode_captions([""] * n + [r.caption for r in records])   # (2n, L, D): [uncond; cond]
        grounding = adapter.prepare(base, records + records) if adapter is not None else None
    latents = initial_noise(base, seeds) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        grounded = adapter is not None and scale != 0 and i < round(tau * len(scheduler.timesteps))
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with autocast_for(base), adapter.injecting(grounding, scale) if grounded else contextlib.nullcontext():
            pred = base.unet(model_in, t, encoder_hidden_states=context).sample
        uncond, cond = pred.float().chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    with autocast_for(base):
        return to_uint8(base.from_latents(latents))


def boxed_grid(images: np.ndarray, records: list[Record] | None = None, upscale: int = 4, ncols: int = 8):
    """A PIL image: the samples side by side, enlarged, each requested box drawn in its colour."""
    from PIL import Image, ImageDraw

    from .evaluate import color_of
    from .shapes import COLORS
    n, h, w, _ = images.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    pad = 2
    grid = Image.new("RGB", (ncols * (w * upscale + pad) + pad, nrows * (h * upscale + pad) + pad), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = pad + (i % ncols) * (w * upscale + pad), pad + (i // ncols) * (h * upscale + pad)
        grid.paste(Image.fromarray(image).resize((w * upscale, h * upscale), Image.NEAREST), (x, y))
        for obj in (records[i].objects if records else ()):
            x0, y0, x1, y1 = obj.box
            color = COLORS.get(color_of(obj.phrase) or "", (0, 0, 0))
            draw.rectangle([x + x0 * w * upscale, y + y0 * h * upscale, x + x1 * w * upscale - 1,
                            y + y1 * h * upscale - 1], outline=tuple(int(c * 0.6) for c in color), width=1)
    return grid
