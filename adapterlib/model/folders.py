"""Base folders, read and checked before anything loads: the shipped bases by name, and diffusers-style folders of
each family (Stable Diffusion 1.x/2.x, SDXL, SD3 / 3.5, FLUX.1). Each check names the folder and the part that is
missing or does not fit, so a wrong folder is refused with a clear error before minutes of loading
(`model.base.load_base` calls `resolve_base_path` first)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from adapterlib.paths import SHIPPED_BASES, repo_path


def missing_parts(path: Path, parts: dict[str, str | None]) -> list[str]:
    """The parts of `parts` (a folder, and the file it must hold, or None: the folder alone) missing under `path`."""
    return [f"{part}/{file or ''}" for part, file in parts.items()
            if not ((path / part / file).is_file() if file else (path / part).is_dir())]


def transformer_class(path: Path) -> str | None:
    """The class name of a folder's transformer/ (an MM-DiT base), or None where it has none."""
    config = path / "transformer" / "config.json"
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


def resolve_base_path(name_or_path: str | Path) -> Path:
    """The folder of a shipped base's name (`SHIPPED_BASES`) or of a diffusers-style folder, checked
    (`check_base_folder`, `check_sd3_folder`) before anything loads."""
    if str(name_or_path) in SHIPPED_BASES:
        path = SHIPPED_BASES[str(name_or_path)]
        if not any((path / part / "config.json").is_file() for part in ("unet", "transformer")):
            raise FileNotFoundError(f"the shipped base {str(name_or_path)!r} is missing from {path}: reinstall the "
                                    "package, or retrain it with notebooks/00_base_model.ipynb -p retrain True")
        return path
    path = repo_path(name_or_path)      # relative paths are relative to the repository root
    if (kind := transformer_class(path)) is not None:
        check_flux_folder(path) if kind == "FluxTransformer2DModel" else check_sd3_folder(path)
        return path
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"base model {str(name_or_path)!r}: no unet/config.json or transformer/config.json "
                                f"under {path}. Give one of {list(SHIPPED_BASES)}, a diffusers-style Stable Diffusion "
                                "folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/) or a Stable Diffusion 3 "
                                "folder (transformer/, text_encoder/, text_encoder_2/, tokenizers, scheduler/, vae/) "
                                "or a FLUX.1 folder (the same parts; its text_encoder_2/ is the T5)")
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
    missing = missing_parts(path, REQUIRED_PARTS)
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
    missing = missing_parts(path, {"text_encoder": "config.json", "tokenizer": None, **SDXL_PARTS})
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


SD3_PARTS = {"transformer": "config.json", "text_encoder": "config.json", "tokenizer": None,
             "text_encoder_2": "config.json", "tokenizer_2": None, "scheduler": "scheduler_config.json"}


def check_sd3_folder(path: Path) -> None:
    """A clear error, before anything loads, for an MM-DiT folder adapterlib cannot train on: a transformer that is
    not SD3's (FLUX's, say), a missing part (the T5 is optional, as diffusers allows: without it a caption's T5
    part is zeros), a T5 without its tokenizer, a latent transformer without its VAE, a schedule that is not flow
    matching, or encoders whose widths do not fit the transformer's."""
    read = lambda *parts: json.loads(path.joinpath(*parts).read_text())
    transformer = read("transformer", "config.json")
    kind = transformer.get("_class_name", "?")
    if kind != "SD3Transformer2DModel":
        raise ValueError(f"base model {path}: its transformer is a {kind}; adapterlib takes UNet bases (SD 1.x/2.x, "
                         "SDXL), Stable Diffusion 3 / 3.5 MM-DiTs (SD3Transformer2DModel) and FLUX.1 "
                         "(FluxTransformer2DModel)")
    missing = missing_parts(path, SD3_PARTS)
    if (path / "text_encoder_3").is_dir() and not (path / "tokenizer_3").is_dir():
        missing.append("tokenizer_3/ (text_encoder_3/ is there)")
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {', '.join(missing)}: a Stable Diffusion 3 folder has "
                                "transformer/, text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/, scheduler/, "
                                "vae/ (and optionally text_encoder_3/ + tokenizer_3/, the T5); copy the whole folder")
    if transformer.get("in_channels", 16) != 3 and not (path / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"base model {path}: a latent transformer ({transformer.get('in_channels', 16)} input "
                                "channels) needs its VAE, and there is no vae/config.json")
    scheduler = read("scheduler", "scheduler_config.json").get("_class_name", "?")
    if scheduler != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"base model {path}: its scheduler is a {scheduler}; an SD3 base is trained with flow "
                         "matching (FlowMatchEulerDiscreteScheduler)")
    clip = [read(part, "config.json") for part in ("text_encoder", "text_encoder_2")]
    widths = sum(c.get("hidden_size", 0) for c in clip)
    pooled = sum(c.get("projection_dim", 0) for c in clip)
    if widths > transformer.get("joint_attention_dim", 4096) or pooled != transformer.get("pooled_projection_dim", 2048):
        raise ValueError(f"base model {path}: its text encoders (hidden widths {widths} together, projections {pooled}) "
                         f"do not fit its transformer (joint_attention_dim {transformer.get('joint_attention_dim')}, "
                         f"pooled_projection_dim {transformer.get('pooled_projection_dim')})")


FLUX_PARTS = {"transformer": "config.json", "text_encoder": "config.json", "tokenizer": None,
              "text_encoder_2": "config.json", "tokenizer_2": None, "scheduler": "scheduler_config.json"}


def check_flux_folder(path: Path) -> None:
    """A clear error, before anything loads, for a FLUX folder adapterlib cannot train on: a diffusers older than
    0.35 (its single-stream blocks take the joined sequence, not the image and caption tokens apart), a missing part
    (FLUX needs its T5: text_encoder_2/ + tokenizer_2/), a latent transformer without its VAE, a schedule that is not
    flow matching, a text encoder that is not a T5 where FLUX has one, or encoders whose widths do not fit the
    transformer's."""
    if "encoder_hidden_states" not in inspect.signature(FluxSingleTransformerBlock.forward).parameters:
        raise RuntimeError(f"base model {path} is a FLUX folder, and this diffusers ({diffusers.__version__}) runs FLUX's "
                           "single-stream blocks on one joined sequence, where the adapter cannot tell the image tokens "
                           "from the caption's: FLUX needs diffusers >= 0.35 (pip install -U diffusers)")
    read = lambda *parts: json.loads(path.joinpath(*parts).read_text())
    missing = missing_parts(path, FLUX_PARTS)
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {', '.join(missing)}: a FLUX.1 folder has "
                                "transformer/, text_encoder/ + tokenizer/ (CLIP), text_encoder_2/ + tokenizer_2/ (the "
                                "T5), scheduler/ and vae/; copy the whole folder")
    transformer = read("transformer", "config.json")
    if transformer.get("in_channels", 64) != 12 and not (path / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"base model {path}: a latent FLUX transformer ({transformer.get('in_channels', 64)} "
                                "input channels: 2x2 patches of the VAE's latents) needs its VAE, and there is no "
                                "vae/config.json")
    scheduler = read("scheduler", "scheduler_config.json").get("_class_name", "?")
    if scheduler != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"base model {path}: its scheduler is a {scheduler}; a FLUX base is trained with flow "
                         "matching (FlowMatchEulerDiscreteScheduler)")
    clip, t5 = read("text_encoder", "config.json"), read("text_encoder_2", "config.json")
    if t5.get("model_type") != "t5":
        raise ValueError(f"base model {path}: its text_encoder_2/ is a {t5.get('model_type', '?')} model; FLUX's "
                         "second text encoder is a T5 (T5EncoderModel), whose states are the caption's tokens")
    if clip.get("hidden_size") != transformer.get("pooled_projection_dim", 768) or \
            t5.get("d_model") != transformer.get("joint_attention_dim", 4096):
        raise ValueError(f"base model {path}: its text encoders (CLIP hidden width {clip.get('hidden_size')}, T5 width "
                         f"{t5.get('d_model')}) do not fit its transformer (pooled_projection_dim "
                         f"{transformer.get('pooled_projection_dim')}, joint_attention_dim "
                         f"{transformer.get('joint_attention_dim')})")
