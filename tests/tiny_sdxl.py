"""A tiny Stable-Diffusion-XL-architecture folder built from configs, offline (as conftest.py builds a tiny SD).

The layout of a real SDXL base checkpoint on disk (model_index.json, unet/ with addition_embed_type
"text_time", text_encoder/ (CLIPTextModel) + tokenizer/, text_encoder_2/ (CLIPTextModelWithProjection) +
tokenizer_2/ (padded with "!", as SDXL's second tokenizer is), vae/ with SDXL's scaling factor and
force_upcast, scheduler/ with SDXL's Euler config), at toy size: the UNet's widths follow diffusers' own
SDXL pipeline tests (two transformer layers in its deeper block, 6 time ids of 8 features each), so the
folder runs in diffusers' StableDiffusionXLPipeline as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conftest import write_clip_tokenizer

SDXL_UNET_SAMPLE_SIZE = 8        # latent side
SDXL_RESOLUTION = 16             # two VAE blocks: one downsampling by 2
TEXT_WIDTH = 16                  # each encoder's hidden width: the context is 2 x 16 = 32 wide
TIME_FEATURES = 8                # addition_time_embed_dim


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=3,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2)


def unet_config(time_ids: int = 6, **changes) -> dict:
    """The tiny SDXL UNet's config: 6 size / crop ids (a refiner: 5), `changes` on top."""
    return {**dict(sample_size=SDXL_UNET_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_FEATURES,
                   transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_WIDTH,
                   projection_class_embeddings_input_dim=time_ids * TIME_FEATURES + TEXT_WIDTH), **changes}


def build_tiny_sdxl_folder(folder: Path) -> Path:
    """Write a random-weight, SDXL-base-architecture pipeline folder (latent space, 4 channels)."""
    folder = Path(folder)
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_config()).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SDXL_RESOLUTION, scaling_factor=0.13025, force_upcast=True,
    ).save_pretrained(folder / "vae")
    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    config = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    special = json.loads((folder / "tokenizer_2" / "special_tokens_map.json").read_text())
    (folder / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    CLIPTextModel(_text_config(vocab_size)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(_text_config(vocab_size)).save_pretrained(folder / "text_encoder_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading", num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }, indent=2))
    return folder
