"""The frozen base text-to-image model: the shipped tiny Shapes model, or a Stable Diffusion folder.

Both are diffusers-style folders (`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and `vae/`
for latent models) and both load through `load_base`, so everything that works on the embedded
default runs unchanged on SD 1.x/2.x. The tiny model works in pixel space (no `vae/`): its
"latents" are the RGB image scaled to [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from . import shapes
from .paths import repo_path

# loading a few-MB model needs no progress bars (they clutter notebooks and logs)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

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
    return path


def load_base(name_or_path: str | Path = DEFAULT_BASE, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> BaseModel:
    """Load a frozen base from the shipped name or any diffusers-style SD folder (no hub access).
    `dtype` casts the frozen weights (bf16/fp16 on a GPU); None keeps them as saved (fp32)."""
    path = resolve_base_path(name_or_path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae") if (path / "vae").is_dir() else None
    base = BaseModel(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        # SD folders ship a PNDM/DDIM config; the DDPM view of the same betas is the training schedule
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(path, subfolder="scheduler")),
        vae=vae, path=str(path))
    return base.freeze().to(device, dtype)


# ----------------------------------------------------------------------------------------------
# The tiny Shapes base: built from the real classes, trained by notebooks/00_base_model.ipynb

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = ["a", "an", "and", ",", "the", "with", *shapes.COLORS, *shapes.SHAPES]
MAX_TOKENS = 32   # longest Shapes caption is 13 tokens


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the Shapes vocabulary, saved and loaded in Hugging Face format."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()      # also splits "," off its word
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]", model_max_length=MAX_TOKENS)


def tiny_unet_config(resolution: int = shapes.RESOLUTION) -> dict:
    """Pixel-space UNet: 32x32 (plain ResNet), 16x16 and 8x8 with cross-attention to the caption."""
    return dict(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 96), norm_num_groups=16, cross_attention_dim=64,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=4)   # diffusers' legacy name: this is the number of heads


def build_tiny_base(seed: int = 0) -> BaseModel:
    """A freshly initialised (untrained) tiny base, the starting point of base training."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)  # pooled output = hidden state at this EOS id
    # v-prediction on a cosine schedule: the loss keeps weight on the high-noise steps where colour
    # and layout are decided (epsilon loss gives them almost none; see WORKBOOK.md)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    return BaseModel(unet=UNet2DConditionModel(**tiny_unet_config()), text_encoder=CLIPTextModel(text_config),
                     tokenizer=tokenizer, scheduler=scheduler, vae=None, path="(untrained tiny base)")
