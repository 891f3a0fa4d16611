"""Seeded sampling: DDIM with classifier-free guidance, with or without a spatial adapter.

Each image's starting noise comes from its own seed, so an image does not depend on which batch it
was generated in (up to float rounding: a different batch size can change a pixel by one level), and
`generate(..., seeds=[7])` reproduces image 7 of any earlier call.

The sampling settings (DDIM steps, guidance, injection scale, scheduled-sampling tau, whether guidance
covers the grounding) live in one place, `Sampling`; every function that samples takes them as keyword
arguments and builds one.

Classifier-free guidance with an adapter: by default the unconditional prediction is the base alone (empty
caption, no adapter), so the guidance scale strengthens the boxes and phrases together with the caption
(`grounding_guidance=True`). GLIGEN's inference gives the unconditional branch the same grounding as the
conditional one, so only the caption is guided (`grounding_guidance=False`). On the crowded Shapes world the
first is what brings objects that overlap to the ceiling (docs/notes/harder-world.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from diffusers import DDIMScheduler

from adapterlib.model.adapter import AdaptedUNet, BatchPart, Grounding, SpatialAdapter
from adapterlib.model.base import BaseModel
from adapterlib.data.manifest import Record
from adapterlib.options import MAX_OBJECTS
from adapterlib.model.precision import autocast_for


@dataclass(frozen=True)
class Sampling:
    """How images are sampled. `scale` multiplies every adapter gate; `tau` is GLIGEN's scheduled
    sampling: grounding is on for the first `tau` share of the denoising steps (where layout is
    decided), then off. `grounding_guidance`: the unconditional branch is the base alone, so guidance
    strengthens the grounding with the caption (True), or it is grounded too, so only the caption is
    guided (False, GLIGEN's inference)."""
    steps: int = 25
    guidance: float = 3.0
    scale: float = 1.0
    tau: float = 1.0
    grounding_guidance: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampling steps = {self.steps}: give at least 1 DDIM step")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"tau = {self.tau} must be in [0, 1]")

    @classmethod
    def of(cls, sampling: "Sampling | None" = None, **settings) -> "Sampling":
        """`sampling` (default: the defaults) with `settings` replaced; an unknown name is an error."""
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {sorted(unknown)}; they are {list(cls.__dataclass_fields__)}")
        return replace(sampling or cls(), **settings)

    def key(self) -> dict:
        """The settings as a plain dict (what a cached result is keyed on)."""
        return asdict(self)


def ground(base: BaseModel, records: list[Record], *, max_objects: int = MAX_OBJECTS, phrase_dropout: float = 0.0,
           generator: torch.Generator | None = None, part: BatchPart | None = None) -> Grounding:
    """The grounding inputs of `records`, their phrases embedded by the base's frozen text encoder
    (`part`: where they sit in a global batch split over processes, see `Grounding.from_records`)."""
    with torch.no_grad():
        embeddings = base.encode_phrases([o.phrase for r in records for o in r.objects])
    return Grounding.from_records(records, embeddings, max_objects=max_objects, phrase_dropout=phrase_dropout,
                                  generator=generator, part=part)


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
def generate(base: BaseModel, records: list[Record], seeds: list[int], *, adapter: SpatialAdapter | None = None,
             sampling: Sampling | None = None, batch_size: int = 64, **settings) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for each record's caption (and boxes, when an adapter is given),
    sampled with `Sampling.of(sampling, **settings)` (e.g. `scale=0.5, steps=20`)."""
    sampling = Sampling.of(sampling, **settings)
    if len(records) != len(seeds):
        raise ValueError(f"{len(records)} records but {len(seeds)} seeds: give one seed per record")
    model = AdaptedUNet(base.unet, adapter) if adapter is not None else None
    out = [_generate_batch(base, model, records[i:i + batch_size], seeds[i:i + batch_size], sampling)
           for i in range(0, len(records), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, base.resolution, base.resolution, 3), np.uint8)


def halves(added: dict | None, n: int) -> tuple[dict | None, dict | None]:
    """The unconditional and conditional rows of an [uncond; cond] added conditioning (None: None, None)."""
    if added is None:
        return None, None
    return ({k: v[:n] for k, v in added.items()}, {k: v[n:] for k, v in added.items()})


def _generate_batch(base, model, records, seeds, s: Sampling):
    scheduler = ddim_scheduler(base, s.steps)
    n = len(records)
    with autocast_for(base):
        context, pooled = base.encode_text([""] * n + [r.caption for r in records])   # (2n, L, D): [uncond; cond]
        grounding = ground(base, records, max_objects=model.adapter.max_objects) if model else None   # (n, ...)
    added = base.added_cond(pooled)        # SDXL: pooled captions, uncropped at the base's size; SD: None
    uncond_added, cond_added = halves(added, n)
    latents = initial_noise(base, seeds) * scheduler.init_noise_sigma
    grounded_steps = round(s.tau * len(scheduler.timesteps))
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with autocast_for(base):
            if model is None or s.scale == 0 or i >= grounded_steps:
                pred = base.unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            elif s.grounding_guidance:       # unconditional: the base alone; conditional: caption and grounding
                pred = torch.cat([base.unet(model_in[:n], t, encoder_hidden_states=context[:n],
                                            added_cond_kwargs=uncond_added).sample,
                                  model(model_in[n:], t, context[n:], grounding, s.scale, cond_added)])
            else:                            # both branches grounded: only the caption is guided
                pred = model(model_in, t, context, grounding.repeat(2), s.scale, added)
        uncond, cond = pred.float().chunk(2)
        latents = scheduler.step(uncond + s.guidance * (cond - uncond), t, latents).prev_sample
    with autocast_for(base):
        return to_uint8(base.from_latents(latents))
