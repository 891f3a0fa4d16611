"""The frozen base text-to-image model: the shipped tiny Shapes model, or a Stable Diffusion folder.

Both are diffusers-style folders (`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and `vae/`
for latent models) and both load through `load_base`, so everything that works on the embedded
default runs unchanged on SD 1.x/2.x. The tiny model works in pixel space (no `vae/`): its
"latents" are the RGB image scaled to [-1, 1].

Stable Diffusion XL (a UNet with `addition_embed_type="text_time"`) loads through the same call, with its
second text encoder and tokenizer (`text_encoder_2/`, `tokenizer_2/`). Its captions are both encoders'
penultimate hidden states concatenated (the context) and encoder 2's projected pooled output (the UNet's
`text_embeds`); its size and crop conditioning (`time_ids`) comes with each image (`encodings.time_ids`).
`added_cond` assembles the two as the UNet's `added_cond_kwargs` (None for SD 1.x/2.x). docs/guide/sdxl.md.

Stable Diffusion 3 / 3.5 (an MM-DiT: `transformer/`, an `SD3Transformer2DModel`) loads through the same call: its
two CLIP encoders with projection and the optional T5 (`text_encoder_3/`), the 16-channel VAE with its shift, and
a flow-matching schedule. `base.net` is the denoising network of either family (the UNet or the transformer) and
`predict` calls it; `noised` is the training objective of the base's schedule (DDPM's noise, or rectified flow's
velocity). The shipped tiny MM-DiT (`shapes-dit`) is a pixel-space SD3 transformer. docs/guide/sd3.md.

FLUX.1 (a `FluxTransformer2DModel`: 19 double-stream then 38 single-stream blocks) loads through the same call: its
CLIP (`text_encoder/`, the pooled vector) and T5 (`text_encoder_2/`, the caption's tokens), the 16-channel VAE, and a
flow-matching schedule whose shift depends on the image's token count. Everything outside `predict` sees its latents
as (B, 16, h, w) like any other base's; `predict` packs them into 2x2 patches with their rotary position ids and
unpacks the prediction, so the losses, the box regions and the sampler are the same code. A guidance-distilled
FLUX (dev: `guidance_embeds`) takes the guidance value as an input (`guidance`). docs/guide/flux.md.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)
from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                          T5EncoderModel)

from adapterlib.model.folders import resolve_base_path, transformer_class
from adapterlib.paths import SHIPPED_BASES


DEFAULT_BASE = "shapes-tiny"  # the name `load_base` resolves to the shipped folder (paths.SHIPPED_BASES: the others)
SHIPPED_BASE = SHIPPED_BASES[DEFAULT_BASE]
T5_TOKENS = 256    # the T5 part of an SD3 caption (StableDiffusion3Pipeline's max_sequence_length default)
FLUX_T5_TOKENS = 512      # a FLUX caption's T5 tokens (FluxPipeline's max_sequence_length default)
FLUX_SAMPLE_SIZE = 128    # a FLUX folder's latent side (FluxPipeline's default: 1,024 px through the 8x VAE)
FLUX_GUIDANCE = 3.5       # the guidance a guidance-distilled FLUX (dev) trains and samples at (its card's, FluxPipeline's)


@dataclass
class BaseModel:
    """The frozen parts of a text-to-image model, ready for training or sampling an adapter. A UNet base has
    `unet`; an MM-DiT base (SD3, FLUX) has `transformer` (and `unet` None). `net` is whichever it has. A FLUX base
    keeps its T5 where its folder does, in `text_encoder_2` / `tokenizer_2`."""
    unet: UNet2DConditionModel | None
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast
    scheduler: DDPMScheduler          # the training noise schedule (sampling builds DDIM from its config)
    vae: AutoencoderKL | None         # None: pixel-space model
    path: str
    # SDXL only (None / False otherwise): the second text encoder (with its projection) and tokenizer, and
    # whether an empty caption is all zeros (the folder's force_zeros_for_empty_prompt, diffusers' default True)
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: PreTrainedTokenizerFast | None = None
    zero_empty_prompt: bool = False
    # SD3 only: the MM-DiT, the optional T5 encoder and its tokenizer, and how many T5 tokens a caption has
    # (with no T5, that many zero tokens, as diffusers' pipeline gives; the shipped tiny DiT has 0)
    transformer: SD3Transformer2DModel | FluxTransformer2DModel | None = None
    text_encoder_3: T5EncoderModel | None = None
    tokenizer_3: PreTrainedTokenizerFast | None = None
    t5_tokens: int = T5_TOKENS
    # FLUX only: the latent side (its transformer's config has none; the folder's sample_size.json, else
    # FLUX_SAMPLE_SIZE) and, for a guidance-distilled one, the guidance value its forward takes in training
    sample_size: int | None = None
    guidance: float = FLUX_GUIDANCE

    @property
    def net(self):
        """The denoising network: the UNet, or the MM-DiT transformer."""
        return self.transformer if self.transformer is not None else self.unet

    @property
    def family(self) -> str:
        """"unet" (SD 1.x/2.x, SDXL, the tiny UNet), "mmdit" (SD3 / 3.5, the tiny DiT) or "flux" (FLUX.1)."""
        return "flux" if self.is_flux else "mmdit" if self.transformer is not None else "unet"

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None and self.transformer is None

    @property
    def is_sd3(self) -> bool:
        return self.transformer is not None and not self.is_flux

    @property
    def is_flux(self) -> bool:
        return isinstance(self.transformer, FluxTransformer2DModel)

    @property
    def distilled(self) -> bool:
        """A guidance-distilled base (FLUX.1-dev): the guidance value is an input of its forward, and sampling
        runs one branch (no classifier-free guidance)."""
        return self.is_flux and bool(self.transformer.config.guidance_embeds)

    @property
    def pooled(self) -> bool:
        """Whether captions come with a pooled vector the network conditions on (SDXL, SD3)."""
        return self.text_encoder_2 is not None

    @property
    def is_flow(self) -> bool:
        """Whether the schedule is flow matching (SD3's rectified flow) rather than DDPM's."""
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)

    @property
    def kind(self) -> str:
        """The base's family in words (messages)."""
        if self.is_sd3:
            return "an SD3 (MM-DiT)" if self.vae is not None else "a pixel-space MM-DiT"
        if self.is_flux:
            return "a FLUX (MM-DiT)" if self.vae is not None else "a pixel-space FLUX-architecture"
        return "an SDXL" if self.is_sdxl else "an SD 1.x/2.x" if self.vae is not None else "a pixel-space"

    @property
    def phrase_dim(self) -> int:
        """Width of one phrase embedding (`encode_phrases`; the adapter's text_dim)."""
        if self.is_sd3:
            return self.text_encoder.config.projection_dim + self.text_encoder_2.config.projection_dim
        if self.is_sdxl:
            return self.text_encoder_2.config.projection_dim
        return self.text_encoder.config.hidden_size

    @property
    def vae_upcast(self) -> bool:
        """Whether the VAE is kept fp32 under an fp16 base (SDXL's VAE overflows in fp16: force_upcast)."""
        return self.is_sdxl and self.vae is not None and self.vae.dtype == torch.float32 \
            and self.net.dtype == torch.float16

    @property
    def resolution(self) -> int:
        """Side of generated images in pixels (the network's sample size times the VAE's scale: diffusers'
        pipelines' default)."""
        return self.latent_shape[1] * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(channels, side) of what the network denoises, as everything but `predict` sees it: a FLUX
        transformer's input is 2x2 patches of it (in_channels = 4 x channels)."""
        config = self.net.config
        if self.is_flux:
            return config.in_channels // 4, self.sample_size or FLUX_SAMPLE_SIZE
        return config.in_channels, config.sample_size

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.net.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, L) token ids, padded to the tokenizer's fixed length as Stable Diffusion does."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """(B, L, D) per-token hidden states: the UNet's cross-attention context."""
        if self.pooled:
            return self.encode_text(captions)[0]
        return self.text_encoder(self.tokenize(captions))[0]

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (B, L, D), pooled (B, P) or None). SD: `encode_captions`, no pooled embedding. SDXL, as its
        pipeline encodes a prompt: both encoders' penultimate hidden states concatenated (D = 768 + 1280), and
        encoder 2's projected pooled output (P = 1280, the UNet's `text_embeds`). An empty caption (caption
        dropout, the unconditional branch) is zeros in both when `zero_empty_prompt`: SDXL was trained with
        zeroed embeddings for a dropped caption and its pipeline samples the unconditional branch with them."""
        if self.is_sd3:
            return self._encode_sd3(captions)
        if self.is_flux:
            return self._encode_flux(captions)
        if not self.is_sdxl:
            return self.encode_captions(captions), None
        first = self.text_encoder(self.tokenize(captions), output_hidden_states=True)
        second = self.text_encoder_2(_token_ids(self.tokenizer_2, captions, self.device), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        if self.zero_empty_prompt:
            empty = torch.tensor([c == "" for c in captions], device=context.device)
            context, pooled = context.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
        return context, pooled

    def _encode_sd3(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3, as StableDiffusion3Pipeline encodes a prompt: both CLIP encoders' penultimate hidden states
        concatenated and zero-padded to the T5 width, then the T5 states (`t5_tokens` of them; zeros without a
        T5) after them in the sequence; pooled: both CLIPs' projected pooled outputs concatenated. An empty
        caption is encoded like any other (SD3's pipeline does not zero it)."""
        first = self.text_encoder(self.tokenize(captions), output_hidden_states=True)
        second = self.text_encoder_2(_token_ids(self.tokenizer_2, captions, self.device), output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        width = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is not None:
            ids = self.tokenizer_3(list(captions), padding="max_length", max_length=self.t5_tokens, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = self.text_encoder_3(ids)[0]
        else:
            t5 = torch.zeros(len(captions), self.t5_tokens, width, device=clip.device, dtype=clip.dtype)
        context = torch.cat([torch.nn.functional.pad(clip, (0, width - clip.shape[-1])), t5.to(clip.dtype)], dim=-2)
        return context, torch.cat([first.text_embeds, second.text_embeds], dim=-1)

    def _encode_flux(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX, as FluxPipeline encodes a prompt: the T5's last hidden states (`t5_tokens` of them) are the caption's
        tokens; the CLIP's pooled output (before any projection) is the pooled vector. An empty caption is encoded
        like any other."""
        pooled = self.text_encoder(self.tokenize(captions), output_hidden_states=False).pooler_output
        ids = self.tokenizer_2(list(captions), padding="max_length", max_length=self.t5_tokens, truncation=True,
                               return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder_2(ids, output_hidden_states=False)[0], pooled

    def added_cond(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None = None,
                   guidance: float | None = None) -> dict | None:
        """The UNet's `added_cond_kwargs`: None for SD; for SDXL the pooled caption embeddings (B, P) and the
        size / crop conditioning `time_ids` (B, 6), by default an uncropped image at the base's resolution
        (original size = target size, crop (0, 0): what StableDiffusionXLPipeline samples with)."""
        if self.is_sd3:
            return {"pooled_projections": pooled}
        if self.is_flux:         # a guidance-distilled FLUX: the guidance value per sample (`guidance`, else the base's)
            if not self.distilled:
                return {"pooled_projections": pooled}
            value = self.guidance if guidance is None else guidance
            return {"pooled_projections": pooled, "guidance": torch.full((len(pooled),), float(value),
                                                                         device=pooled.device)}
        if not self.is_sdxl:
            return None
        if time_ids is None:
            R = self.resolution
            time_ids = torch.tensor([[R, R, 0, 0, R, R]], dtype=torch.float32).expand(len(pooled), 6)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}

    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """(N, D) one vector per phrase: the EOS token's final hidden state (CLIP's pooled output,
        before the projection), which is what GLIGEN feeds its grounding MLP: it summarises the
        whole phrase and lives in the same space for the tiny model and for SD. SDXL: encoder 2's
        projected pooled output, the vector SDXL itself conditions on for a whole caption (docs/guide/sdxl.md)."""
        if not phrases:
            return torch.zeros(0, self.phrase_dim, device=self.device)
        if self.is_sd3:        # the vector SD3 conditions on for a whole caption: both CLIPs' projected pooled outputs
            return torch.cat([self.text_encoder(self.tokenize(phrases)).text_embeds,
                              self.text_encoder_2(_token_ids(self.tokenizer_2, phrases, self.device)).text_embeds], -1)
        if self.is_sdxl:
            return self.text_encoder_2(_token_ids(self.tokenizer_2, phrases, self.device)).text_embeds
        # SD 1.x/2.x and FLUX (whose pooled vector for a whole caption is this one: its CLIP's pooled output)
        return self.text_encoder(self.tokenize(phrases)).pooler_output

    def to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, C, h, w) what the UNet denoises."""
        if self.vae is None:
            return images
        with self._vae_precision():
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.sample(generator) - self.latent_shift) * self.vae.config.scaling_factor

    @property
    def latent_shift(self) -> float:
        """The VAE's shift factor (SD3's 16-channel VAE: 0.0609; SD: none), taken off before the scaling."""
        return (self.vae.config.get("shift_factor") or 0.0) if self.vae is not None else 0.0

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, H, W) images in [-1, 1]."""
        if self.vae is None:
            return latents
        with self._vae_precision():
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor
                                   + self.latent_shift).sample

    def _vae_precision(self):
        """An upcast VAE runs in fp32 even inside the caller's fp16 autocast."""
        return torch.autocast(self.device.type, enabled=False) if self.vae_upcast else contextlib.nullcontext()

    def freeze(self) -> "BaseModel":
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self

    def parts(self) -> dict[str, torch.nn.Module]:
        """The base's networks by their folder name (the ones it has)."""
        names = ("unet", "transformer", "text_encoder", "vae", "text_encoder_2", "text_encoder_3")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def modules(self) -> list[torch.nn.Module]:
        return list(self.parts().values())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BaseModel":
        """Move every part; `dtype` casts the (frozen) weights, e.g. to bf16 on a GPU. SDXL's VAE stays fp32
        under fp16 when its config says force_upcast (it overflows in fp16), as diffusers' SDXL pipeline and
        training example keep it."""
        for module in self.modules():
            want = dtype
            if module is self.vae and self.is_sdxl and dtype == torch.float16 and self.vae.config.get("force_upcast"):
                want = torch.float32
            same = want is None or all(p.dtype == want for p in module.parameters())
            module.to(device) if same else module.to(device, want)
        return self

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.net.save_pretrained(folder / ("transformer" if self.transformer is not None else "unet"))
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        if self.pooled:
            self.text_encoder_2.save_pretrained(folder / "text_encoder_2")
            self.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        if self.text_encoder_3 is not None:
            self.text_encoder_3.save_pretrained(folder / "text_encoder_3")
            self.tokenizer_3.save_pretrained(folder / "tokenizer_3")
        if self.transformer is not None and self.t5_tokens != (FLUX_T5_TOKENS if self.is_flux else T5_TOKENS):
            (folder / T5_TOKENS_FILE).write_text(json.dumps({"t5_tokens": self.t5_tokens}) + "\n")
        if self.is_flux and self.sample_size is not None and self.sample_size != FLUX_SAMPLE_SIZE:
            (folder / SAMPLE_SIZE_FILE).write_text(json.dumps({"sample_size": self.sample_size}) + "\n")
        return folder

    # --- the network and its objective, for either family
    def predict(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added: dict | None = None,
                net=None) -> torch.Tensor:
        """The network's prediction for `noisy` at `t` (`net`: the network to call, default `self.net`; an adapted
        module passes itself). A UNet takes `added` as its `added_cond_kwargs`; the MM-DiT takes its entries
        (`pooled_projections`) as keyword arguments and one timestep per sample."""
        return predict(self.net if net is None else net, noisy, t, context, added)

    def flow_mu(self) -> float | None:
        """The resolution-dependent shift of a FLUX schedule (`use_dynamic_shifting`) at the base's resolution
        (FluxPipeline's `calculate_shift` of its image token count); None for a schedule with a fixed shift."""
        if not (self.is_flow and self.scheduler.config.get("use_dynamic_shifting")):
            return None
        side = self.latent_shape[1] // 2 if self.is_flux else self.latent_shape[1]
        return flow_mu(self.scheduler.config, side * side)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """The training objective at integer timesteps `t` in [0, T) (larger: noisier): (the noisy input, the
        target, the network's timestep). DDPM: `add_noise`, and the noise, the velocity or the sample as the
        schedule's prediction_type says. Flow matching (SD3's rectified flow): x_t = (1 - sigma) x0 + sigma noise
        with sigma the schedule's (shifted) sigma of `t`, target the velocity noise - x0, timestep sigma * T. A
        schedule whose shift depends on the resolution (FLUX's) is shifted at the base's (`flow_mu`), as its
        sampler is."""
        if self.is_flow:
            sigma = flow_sigmas(self.scheduler.config, self.flow_mu()).to(latents.device)[t].float()
            s = sigma.reshape(-1, *[1] * (latents.dim() - 1))
            T = self.scheduler.config.num_train_timesteps
            return (1 - s) * latents + s * noise, noise - latents, sigma * T
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = {"epsilon": lambda: noise, "v_prediction": lambda: self.scheduler.get_velocity(latents, noise, t),
                  "sample": lambda: latents}[self.scheduler.config.prediction_type]()
        return noisy, target, t


T5_TOKENS_FILE = "t5_tokens.json"     # an MM-DiT folder's own T5 length (the shipped tiny DiT: 0); else the default
SAMPLE_SIZE_FILE = "sample_size.json"  # a FLUX folder's own latent side; else FLUX_SAMPLE_SIZE


def predict(net, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added: dict | None = None):
    """Call a UNet (`added`: its added_cond_kwargs), an SD3 transformer (`added`: pooled_projections; one
    timestep per sample) or a FLUX transformer (`added`: pooled_projections and, distilled, guidance) and return
    its prediction tensor, (B, C, h, w) like `noisy`."""
    if isinstance(net, SD3Transformer2DModel):
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(len(noisy))
        return net(hidden_states=noisy, timestep=t, encoder_hidden_states=context, **(added or {})).sample
    if isinstance(net, FluxTransformer2DModel):
        return _predict_flux(net, noisy, t, context, added)
    return net(noisy, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def _predict_flux(net, noisy, t, context, added):
    """FLUX's forward on (B, C, h, w) latents, as FluxPipeline calls it: 2x2 patches in row-major order (the image
    token at row i, column j of the h/2 x w/2 grid has rotary id (0, i, j); every caption token (0, 0, 0)), the
    timestep (sigma * 1000) over 1000, then the prediction unpacked."""
    B, C, h, w = noisy.shape
    if h % 2 or w % 2:
        raise ValueError(f"a FLUX transformer takes 2x2 patches of its latents; these are {h}x{w}")
    packed = noisy.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(noisy.device, noisy.dtype)
    txt_ids = torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(B) / 1000
    out = net(hidden_states=packed, timestep=t, encoder_hidden_states=context, img_ids=img_ids, txt_ids=txt_ids,
              **(added or {})).sample
    return out.reshape(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


_SIGMAS: dict = {}


def flow_mu(config, image_tokens: int) -> float:
    """A resolution-dependent flow shift (FluxPipeline's `calculate_shift`): linear in the image's token count from
    base_shift at base_image_seq_len to max_shift at max_image_seq_len."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    a, b = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return a + (b - a) * (image_tokens - lo) / (hi - lo)


def flow_sigmas(config, mu: float | None = None) -> torch.Tensor:
    """(T,) the flow-matching schedule's training sigmas in ascending order (index t: larger is noisier), as
    FlowMatchEulerDiscreteScheduler computes them from `config` (its shift included); a schedule with a
    resolution-dependent shift (`use_dynamic_shifting`) is shifted by `mu` (`flow_mu`) as its sampler shifts:
    sigma' = e^mu / (e^mu + 1/sigma - 1)."""
    key = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True,
                     default=str) + repr(mu)
    if key not in _SIGMAS:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sigmas = scheduler.sigmas.flip(0).double()
        if mu is not None and config.get("use_dynamic_shifting"):
            sigmas = scheduler.time_shift(mu, 1.0, sigmas)
        _SIGMAS[key] = sigmas.float().clone()
    return _SIGMAS[key]


def _token_ids(tokenizer, texts: list[str], device) -> torch.Tensor:
    """(B, L) token ids padded to the tokenizer's fixed length (as `BaseModel.tokenize`, any tokenizer)."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@contextlib.contextmanager
def _quiet_loading():
    """No download/loading progress bars while a few-MB model loads; the user's settings are restored."""
    import transformers
    libs = [diffusers.utils.logging, transformers.utils.logging]
    was = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in zip(libs, was):
            if enabled:
                lib.enable_progress_bar()


def load_base(name_or_path: str | Path = DEFAULT_BASE, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> BaseModel:
    """Load a frozen base from the shipped name or any diffusers-style SD folder (no hub access).
    `dtype` casts the frozen weights (bf16/fp16 on a GPU); None keeps them as saved (fp32)."""
    path = resolve_base_path(name_or_path)
    with _quiet_loading():
        base = _load_parts(path)
    return base.freeze().to(device, dtype)


def _load_parts(path: Path) -> BaseModel:
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae") if (path / "vae").is_dir() else None
    if (kind := transformer_class(path)) is not None:
        return _load_flux(path, vae) if kind == "FluxTransformer2DModel" else _load_sd3(path, vae)
    if (path / "text_encoder_2").is_dir() and UNet2DConditionModel.load_config(path, subfolder="unet").get(
            "addition_embed_type") == "text_time":
        return _load_sdxl(path, vae)
    base = BaseModel(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        # SD folders ship a PNDM/DDIM config; the DDPM view of the same betas is the training schedule
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(path, subfolder="scheduler")),
        vae=vae, path=str(path))
    return base


def _load_sdxl(path: Path, vae: AutoencoderKL) -> BaseModel:
    index = path / "model_index.json"
    index = json.loads(index.read_text()) if index.is_file() else {}
    return BaseModel(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(path, subfolder="scheduler")),
        vae=vae, path=str(path),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(path / "tokenizer_2"),
        zero_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))


def _load_sd3(path: Path, vae: AutoencoderKL | None) -> BaseModel:
    t5 = (path / "text_encoder_3").is_dir()
    return BaseModel(
        unet=None, transformer=SD3Transformer2DModel.from_pretrained(path, subfolder="transformer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(path / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3") if t5 else None,
        tokenizer_3=AutoTokenizer.from_pretrained(path / "tokenizer_3") if t5 else None,
        t5_tokens=_folder_value(path, T5_TOKENS_FILE, "t5_tokens", T5_TOKENS),
        scheduler=_flow_schedule(path), vae=vae, path=str(path))


def _load_flux(path: Path, vae: AutoencoderKL | None) -> BaseModel:
    return BaseModel(
        unet=None, transformer=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(path / "tokenizer_2"),
        t5_tokens=_folder_value(path, T5_TOKENS_FILE, "t5_tokens", FLUX_T5_TOKENS),
        sample_size=_folder_value(path, SAMPLE_SIZE_FILE, "sample_size", FLUX_SAMPLE_SIZE),
        scheduler=_flow_schedule(path), vae=vae, path=str(path))


def _folder_value(path: Path, file: str, key: str, default: int) -> int:
    """A value an MM-DiT folder may carry in a small JSON file of its own (the shipped tiny ones do), else the
    family's default."""
    return json.loads((path / file).read_text())[key] if (path / file).is_file() else default


def _flow_schedule(path: Path) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
