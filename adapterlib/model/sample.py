"""Seeded sampling: the one denoising loop (`denoise`), classifier-free guidance, with or without a spatial adapter.

`generate` (DDIM, what training's sample grids, evaluation and the notebooks use) and the diffusers pipeline
(`interop.pipeline.GroundedPipeline`, any diffusers scheduler) both sample through `denoise`, so the rules are stated
once: when the grounding acts (scale, tau), what the unconditional branch is (`grounding_guidance`), and the checks
of the settings (`check_settings`).

Each image's starting noise comes from its own seed, so an image does not depend on which batch it
was generated in (up to float rounding: a different batch size can change a pixel by one level), and
`generate(..., seeds=[7])` reproduces image 7 of any earlier call.

The sampling settings (steps, guidance, injection scale, scheduled-sampling tau, grounding guidance) live in
one place, `Sampling`; every function that samples takes them as keyword arguments and builds one.

Classifier-free guidance with an adapter, `grounding_guidance` (`options.GROUNDING_GUIDANCE`): "base" (the default)
makes the unconditional prediction the base alone (empty caption, no adapter), so the guidance scale strengthens the
boxes and phrases together with the caption; "null" grounds the unconditional branch on null objects (every object
replaced by the learned null one: diffusers' StableDiffusionGLIGENPipeline); "off" gives it the conditional branch's
own grounding, so only the caption is guided. On the crowded Shapes world "base" is what brings objects that
overlap to the ceiling (docs/notes/harder-world.md). (Earlier names: `grounding_guidance=True` / `False`, the CLI's
`on`, the pipeline's `unconditional="grounded"`: "base" and "off".)
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from adapterlib.model.adapter import AdaptedUNet, BatchPart, Grounding, SpatialAdapter
from adapterlib.model.base import BaseModel
from adapterlib.data.manifest import Record
from adapterlib.options import GROUNDING_GUIDANCE, MAX_OBJECTS
from adapterlib.model.precision import autocast_for


def check_settings(*, steps: int, tau: float, scale: float, grounding_guidance: str,
                   names: dict[str, str] | None = None) -> None:
    """The checks of the sampling settings, stated once (`Sampling` runs them; the pipeline before any work).
    `names`: what the caller calls a setting in the message (the pipeline: steps -> num_inference_steps)."""
    name = lambda setting: (names or {}).get(setting, setting)
    if steps < 1:
        raise ValueError(f"{name('steps')} = {steps}: give at least 1 denoising step")
    if not 0 <= tau <= 1:
        raise ValueError(f"{name('tau')} = {tau}: give a share of the steps in [0, 1]")
    if scale < 0:
        raise ValueError(f"{name('scale')} = {scale}: give a scale >= 0")
    if grounding_guidance not in GROUNDING_GUIDANCE:
        raise ValueError(f"{name('grounding_guidance')} = {grounding_guidance!r}: choose one of {GROUNDING_GUIDANCE}")


@dataclass(frozen=True)
class Sampling:
    """How images are sampled. `scale` multiplies every adapter gate; `tau` is GLIGEN's scheduled
    sampling: grounding is on for the first `tau` share of the denoising steps (where layout is
    decided), then off. `grounding_guidance` (`options.GROUNDING_GUIDANCE`): what classifier-free guidance's
    unconditional branch is: "base", the base alone, so guidance strengthens the grounding with the caption (the
    default); "null", the adapter on null objects (diffusers' GLIGEN pipeline); "off", the same grounding, so only
    the caption is guided. True / False, its earlier values, are "base" / "off" (with a DeprecationWarning)."""
    steps: int = 25
    guidance: float = 3.0
    scale: float = 1.0
    tau: float = 1.0
    grounding_guidance: str = "base"

    def __post_init__(self):
        if isinstance(self.grounding_guidance, (bool, np.bool_)):
            value = "base" if self.grounding_guidance else "off"
            warnings.warn(f"grounding_guidance={bool(self.grounding_guidance)} is grounding_guidance={value!r} "
                          f"(one of {GROUNDING_GUIDANCE})", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "grounding_guidance", value)
        check_settings(steps=self.steps, tau=self.tau, scale=self.scale, grounding_guidance=self.grounding_guidance)

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


def ddim_scheduler(config) -> DDIMScheduler:
    """Our sampler's DDIM from a scheduler config (the base's): `generate`'s scheduler and the pipeline's default.
    `denoise` sets its timesteps."""
    # "trailing" spacing starts at the last training timestep (pure noise): a pixel-space model
    # decides colours there, and SD loses nothing by it
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)


def sampler(base: BaseModel):
    """Our sampler for a base: DDIM for a DDPM schedule (`ddim_scheduler`), the flow-matching Euler sampler of the
    base's own schedule config (SD3's pipeline's) for a flow base. `denoise` sets its timesteps."""
    if base.is_flow:
        return FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
    return ddim_scheduler(base.scheduler.config)


def initial_noise(base: BaseModel, seeds: list[int]) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, one CPU generator per seed (same on every device)."""
    channels, side = base.latent_shape
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
    sampled with DDIM and `Sampling.of(sampling, **settings)` (e.g. `scale=0.5, steps=20`)."""
    sampling = Sampling.of(sampling, **settings)
    if len(records) != len(seeds):
        raise ValueError(f"{len(records)} records but {len(seeds)} seeds: give one seed per record")
    out = [denoise(base, records[i:i + batch_size], initial_noise(base, seeds[i:i + batch_size]), sampling,
                   adapter=adapter) for i in range(0, len(records), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, base.resolution, base.resolution, 3), np.uint8)


def timestep_settings(base: BaseModel, scheduler, steps: int) -> dict:
    """What `set_timesteps` takes besides the step count: for FLUX's schedule (a resolution-dependent shift), the
    shift at the base's resolution (`mu`) and FluxPipeline's sigmas, 1 down to 1/steps; else nothing."""
    mu = base.flow_mu()
    if mu is None or not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or \
            not scheduler.config.get("use_dynamic_shifting"):
        return {}
    return {"mu": mu, "sigmas": np.linspace(1.0, 1 / steps, steps)}


def halves(added: dict | None, n: int) -> tuple[dict | None, dict | None]:
    """The unconditional and conditional rows of an [uncond; cond] added conditioning (None: None, None)."""
    if added is None:
        return None, None
    return ({k: v[:n] for k, v in added.items()}, {k: v[n:] for k, v in added.items()})


def null_objects(grounding: Grounding) -> Grounding:
    """The same slots with no object present: every phrase and box the adapter's learned null one."""
    return replace(grounding, present=torch.zeros_like(grounding.present))


def stack(first: Grounding, second: Grounding) -> Grounding:
    """Two groundings of the same slot count as one batch (`first`'s rows first)."""
    return Grounding(*(torch.cat([a, b]) for a, b in zip((first.phrases, first.boxes, first.present, first.keep_text),
                                                         (second.phrases, second.boxes, second.present,
                                                          second.keep_text))))


@torch.no_grad()
def denoise(base: BaseModel, records: list[Record], latents: torch.Tensor, sampling: Sampling, *,
            adapter: SpatialAdapter | None = None, scheduler=None, negatives: list[str] | None = None,
            timesteps_device: torch.device | str | None = None, generator: torch.Generator | None = None,
            callback=None, progress=None) -> np.ndarray:
    """The one denoising loop: `records`' captions (and, with `adapter`, their phrases and boxes) from the starting
    noise `latents` (B, C, h, w), with classifier-free guidance, to images (B, H, W, 3) uint8.

    `scheduler`: any diffusers scheduler (None: our sampler for the base, `sampler`), its timesteps set here on
    `timesteps_device` (None: the CPU, as `generate` has always had them; the pipeline: the base's device).
    `negatives`: the unconditional branch's captions (None: empty). The grounding acts at `sampling.scale` on the first
    `tau` share of the steps (not at all at scale 0 or without an adapter); the unconditional branch is
    `sampling.grounding_guidance`'s. `generator` reaches the scheduler's step when it takes one (stochastic
    samplers); `callback(i, t, latents)` after each step; `progress` wraps the timesteps (a progress bar).

    A guidance-distilled base (FLUX.1-dev: `base.distilled`) takes `sampling.guidance` as an input and runs one
    branch, the conditional one, as FluxPipeline does: no unconditional branch, so `negatives` and
    `grounding_guidance` do not apply."""
    s, n = sampling, len(records)
    model = AdaptedUNet(base.net, adapter) if adapter is not None else None
    scheduler = sampler(base) if scheduler is None else scheduler
    with autocast_for(base):
        captions = (list(negatives) if negatives is not None else [""] * n) + [r.caption for r in records]
        context, pooled = base.encode_text(captions[n:] if base.distilled else captions)   # (2n, L, D): [uncond; cond]
        grounding = ground(base, records, max_objects=adapter.max_objects) if model is not None else None   # (n, ...)
    added = base.added_cond(pooled, guidance=s.guidance)   # SDXL: pooled captions, uncropped at the base's size; SD: None
    uncond_added, cond_added = halves(added, n)
    if grounding is not None and s.grounding_guidance != "base":    # both branches through the adapter
        pair = grounding.repeat(2) if s.grounding_guidance == "off" else stack(null_objects(grounding), grounding)
    scheduler.set_timesteps(s.steps, device=timesteps_device, **timestep_settings(base, scheduler, s.steps))
    latents = latents.to(base.device) * getattr(scheduler, "init_noise_sigma", 1.0)
    step_kwargs = {"generator": generator} if generator is not None and \
        "generator" in inspect.signature(scheduler.step).parameters else {}
    timesteps = scheduler.timesteps
    grounded_steps = round(s.tau * len(timesteps))
    for i, t in enumerate(progress(timesteps) if progress is not None else timesteps):
        grounded = model is not None and s.scale != 0 and i < grounded_steps
        if base.distilled:                         # one branch: the guidance is an input of the network
            with autocast_for(base):
                pred = model(latents, t, context, grounding, s.scale, added) if grounded else \
                    base.predict(latents, t, context, added)
            guided = pred.float()
        else:
            model_in = torch.cat([latents, latents])
            if hasattr(scheduler, "scale_model_input"):            # flow-matching schedulers have none
                model_in = scheduler.scale_model_input(model_in, t)
            with autocast_for(base):
                if not grounded:
                    pred = base.predict(model_in, t, context, added)
                elif s.grounding_guidance == "base":   # unconditional: the base alone; conditional: caption, grounding
                    pred = torch.cat([base.predict(model_in[:n], t, context[:n], uncond_added),
                                      model(model_in[n:], t, context[n:], grounding, s.scale, cond_added)])
                else:                                  # both branches grounded ("off": the same; "null": null objects)
                    pred = model(model_in, t, context, pair, s.scale, added)
            uncond, cond = pred.float().chunk(2)
            guided = uncond + s.guidance * (cond - uncond)
        latents = scheduler.step(guided, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, t, latents)
    with autocast_for(base):
        return to_uint8(base.from_latents(latents))
