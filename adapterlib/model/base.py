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
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from adapterlib.paths import repo_path


SHIPPED_BASE = Path(__file__).resolve().parents[1] / "models" / "shapes-tiny"   # adapterlib/models/
DEFAULT_BASE = "shapes-tiny"  # the name `load_base` resolves to the shipped folder


@dataclass
class BaseModel:
    """The frozen parts of a text-to-image model, ready for training or sampling an adapter."""
    unet: UNet2DConditionModel
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

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def phrase_dim(self) -> int:
        """Width of one phrase embedding (`encode_phrases`; the adapter's text_dim)."""
        if self.is_sdxl:
            return self.text_encoder_2.config.projection_dim
        return self.text_encoder.config.hidden_size

    @property
    def vae_upcast(self) -> bool:
        """Whether the VAE is kept fp32 under an fp16 base (SDXL's VAE overflows in fp16: force_upcast)."""
        return self.is_sdxl and self.vae is not None and self.vae.dtype == torch.float32 \
            and self.unet.dtype == torch.float16

    @property
    def resolution(self) -> int:
        """Side of generated images in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, L) token ids, padded to the tokenizer's fixed length as Stable Diffusion does."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """(B, L, D) per-token hidden states: the UNet's cross-attention context."""
        if self.is_sdxl:
            return self.encode_text(captions)[0]
        return self.text_encoder(self.tokenize(captions))[0]

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (B, L, D), pooled (B, P) or None). SD: `encode_captions`, no pooled embedding. SDXL, as its
        pipeline encodes a prompt: both encoders' penultimate hidden states concatenated (D = 768 + 1280), and
        encoder 2's projected pooled output (P = 1280, the UNet's `text_embeds`). An empty caption (caption
        dropout, the unconditional branch) is zeros in both when `zero_empty_prompt`: SDXL was trained with
        zeroed embeddings for a dropped caption and its pipeline samples the unconditional branch with them."""
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

    def added_cond(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None = None) -> dict | None:
        """The UNet's `added_cond_kwargs`: None for SD; for SDXL the pooled caption embeddings (B, P) and the
        size / crop conditioning `time_ids` (B, 6), by default an uncropped image at the base's resolution
        (original size = target size, crop (0, 0): what StableDiffusionXLPipeline samples with)."""
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
        if self.is_sdxl:
            return self.text_encoder_2(_token_ids(self.tokenizer_2, phrases, self.device)).text_embeds
        return self.text_encoder(self.tokenize(phrases)).pooler_output

    def to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, C, h, w) what the UNet denoises."""
        if self.vae is None:
            return images
        with self._vae_precision():
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, H, W) images in [-1, 1]."""
        if self.vae is None:
            return latents
        with self._vae_precision():
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def _vae_precision(self):
        """An upcast VAE runs in fp32 even inside the caller's fp16 autocast."""
        return torch.autocast(self.device.type, enabled=False) if self.vae_upcast else contextlib.nullcontext()

    def freeze(self) -> "BaseModel":
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.vae, self.text_encoder_2) if m is not None]

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
        self.unet.save_pretrained(folder / "unet")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        if self.is_sdxl:
            self.text_encoder_2.save_pretrained(folder / "text_encoder_2")
            self.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        return folder


def _token_ids(tokenizer, texts: list[str], device) -> torch.Tensor:
    """(B, L) token ids padded to the tokenizer's fixed length (as `BaseModel.tokenize`, any tokenizer)."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def resolve_base_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) == DEFAULT_BASE:
        if not (SHIPPED_BASE / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"the shipped base is missing from {SHIPPED_BASE}: reinstall the package, "
                                    "or retrain it with notebooks/00_base_model.ipynb -p retrain True")
        return SHIPPED_BASE
    path = repo_path(name_or_path)      # relative paths are relative to the repository root
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"base model {str(name_or_path)!r}: no unet/config.json under {path}. "
                                f"Give {DEFAULT_BASE!r} or a diffusers-style Stable Diffusion folder "
                                "(unet/, text_encoder/, tokenizer/, scheduler/, vae/).")
    check_base_folder(path)
    return path


# the parts a base folder must have, each named by a file that must exist in it
REQUIRED_PARTS = {"unet": "config.json", "text_encoder": "config.json", "tokenizer": None,
                  "scheduler": "scheduler_config.json"}


def check_base_folder(path: Path) -> None:
    """A clear error, before anything loads, for a base folder that lacks a part or whose UNet the
    adapter cannot attach to (no cross-attention transformer blocks), or a latent UNet without its VAE."""
    unet = json.loads((path / "unet" / "config.json").read_text())
    if unet.get("addition_embed_type") is not None:      # SDXL (or a refiner): its own parts and errors first
        check_sdxl_folder(path, unet)
    missing = [f"{part}/{file or ''}" for part, file in REQUIRED_PARTS.items()
               if not ((path / part / file).is_file() if file else (path / part).is_dir())]
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {', '.join(missing)}: a diffusers-style Stable "
                                "Diffusion folder has unet/, text_encoder/, tokenizer/, scheduler/ (and vae/)")
    blocks = list(unet.get("down_block_types", [])) + list(unet.get("up_block_types", []))
    mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""     # diffusers' default; null: no mid block
    if not any("CrossAttn" in b for b in blocks + [mid]):
        raise ValueError(f"base model {path}: its UNet has no cross-attention transformer blocks "
                         f"({blocks}), so a spatial adapter has nothing to attach to")
    if unet.get("in_channels") == 4 and not (path / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"base model {path}: a latent UNet (4 input channels) needs its VAE, and there is "
                                "no vae/config.json")


SDXL_PARTS = {"text_encoder_2": "config.json", "tokenizer_2": None}
SDXL_TIME_IDS = 6      # original (h, w), crop (top, left), target (h, w)


def check_sdxl_folder(path: Path, unet: dict) -> None:
    """A UNet with added conditioning: an SDXL base folder (text_time, both text encoders and tokenizers,
    6 size / crop ids) or a clear error: another addition type, an SDXL refiner, a missing second encoder."""
    kind = unet.get("addition_embed_type")
    if kind != "text_time":
        raise ValueError(f"base model {path}: its UNet's addition_embed_type is {kind!r}; adapterlib takes SD 1.x/2.x "
                         "(none) and Stable Diffusion XL ('text_time')")
    index = path / "model_index.json"
    index = json.loads(index.read_text()) if index.is_file() else {}
    encoder_2 = path / "text_encoder_2" / "config.json"
    refiner = index.get("requires_aesthetics_score") or (encoder_2.is_file() and not (path / "text_encoder").is_dir())
    if refiner:
        raise ValueError(f"base model {path} is an SDXL refiner (one text encoder, text_encoder_2, and an aesthetic "
                         "score in place of the target size in its conditioning): it refines the base's latents and "
                         "is not a base to ground. Give the Stable Diffusion XL base folder (text_encoder/ and "
                         "text_encoder_2/)")
    missing = [f"{part}/{file or ''}" for part, file in {"text_encoder": "config.json", "tokenizer": None,
                                                          **SDXL_PARTS}.items()
               if not ((path / part / file).is_file() if file else (path / part).is_dir())]
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {', '.join(missing)}: its UNet is Stable Diffusion "
                                "XL's (addition_embed_type 'text_time'), which needs text_encoder/ + tokenizer/ and "
                                "text_encoder_2/ + tokenizer_2/; copy the whole SDXL folder")
    projection = json.loads(encoder_2.read_text()).get("projection_dim")
    per_id = unet.get("addition_time_embed_dim") or 0
    extra = (unet.get("projection_class_embeddings_input_dim") or 0) - (projection or 0)
    if not per_id or extra != SDXL_TIME_IDS * per_id:
        raise ValueError(f"base model {path}: its UNet takes {extra / per_id if per_id else '?'} size / crop ids "
                         f"(projection_class_embeddings_input_dim {unet.get('projection_class_embeddings_input_dim')} "
                         f"- text_encoder_2's projection_dim {projection}, over addition_time_embed_dim {per_id}); "
                         f"the SDXL base takes {SDXL_TIME_IDS} (original size, crop, target size)")


@contextlib.contextmanager
def _quiet_loading():
    """No download/loading progress bars while a few-MB model loads; the user's settings are restored."""
    import diffusers
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
