"""The frozen base text-to-image model: the shipped tiny Shapes model, or a Stable Diffusion folder.

Both are diffusers-style folders (`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and `vae/`
for latent models) and both load through `load_base`, so everything that works on the embedded
default runs unchanged on SD 1.x/2.x. The tiny model works in pixel space (no `vae/`): its
"latents" are the RGB image scaled to [-1, 1].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerFast

from .paths import repo_path


SHIPPED_BASE = Path(__file__).parent / "models" / "shapes-tiny"
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
        return self.text_encoder(self.tokenize(captions))[0]

    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """(N, D) one vector per phrase: the EOS token's final hidden state (CLIP's pooled output,
        before the projection), which is what GLIGEN feeds its grounding MLP: it summarises the
        whole phrase and lives in the same space for the tiny model and for SD."""
        if not phrases:
            return torch.zeros(0, self.text_encoder.config.hidden_size, device=self.device)
        return self.text_encoder(self.tokenize(phrases)).pooler_output

    def to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, C, h, w) what the UNet denoises."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, H, W) images in [-1, 1]."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def freeze(self) -> "BaseModel":
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.vae) if m is not None]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BaseModel":
        """Move every part; `dtype` casts the (frozen) weights, e.g. to bf16 on a GPU."""
        for module in self.modules():
            same = dtype is None or all(p.dtype == dtype for p in module.parameters())
            module.to(device) if same else module.to(device, dtype)
        return self

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        return folder


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
    missing = [f"{part}/{file or ''}" for part, file in REQUIRED_PARTS.items()
               if not ((path / part / file).is_file() if file else (path / part).is_dir())]
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {', '.join(missing)}: a diffusers-style Stable "
                                "Diffusion folder has unet/, text_encoder/, tokenizer/, scheduler/ (and vae/)")
    import json
    unet = json.loads((path / "unet" / "config.json").read_text())
    blocks = list(unet.get("down_block_types", [])) + list(unet.get("up_block_types", []))
    mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""     # diffusers' default; null: no mid block
    if not any("CrossAttn" in b for b in blocks + [mid]):
        raise ValueError(f"base model {path}: its UNet has no cross-attention transformer blocks "
                         f"({blocks}), so a spatial adapter has nothing to attach to")
    if unet.get("in_channels") == 4 and not (path / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"base model {path}: a latent UNet (4 input channels) needs its VAE, and there is "
                                "no vae/config.json")


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
    base = BaseModel(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        # SD folders ship a PNDM/DDIM config; the DDPM view of the same betas is the training schedule
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(path, subfolder="scheduler")),
        vae=vae, path=str(path))
    return base
