"""What several test modules share, in one place: tiny model folders built from configs (an SD 1.x, an SDXL, an
OWL-ViT / OWLv2 detector), data fixtures (a COCO-format set, non-square photos), notebooks run through papermill as a
user runs them, and two-process training through Accelerate. conftest.py turns the folders into session fixtures;
test modules import what they need from here (never from each other).

The SD folder has the layout of a real SD 1.x checkpoint on disk (model_index.json, unet/, vae/, text_encoder/,
tokenizer/ with a CLIP BPE vocab.json + merges.txt, scheduler/ with SD's PNDM config), at toy size, so `load_base`
is tested on the SD path without any download. The SDXL folder is a real SDXL base's layout (unet/ with
addition_embed_type "text_time", text_encoder/ + tokenizer/, text_encoder_2/ (with projection) + tokenizer_2/
(padded with "!"), vae/ with SDXL's scaling factor and force_upcast, scheduler/ with SDXL's Euler config): its
widths follow diffusers' own SDXL pipeline tests, so it runs in diffusers' StableDiffusionXLPipeline as it is.
The SD3 folder is written by diffusers' own StableDiffusion3Pipeline.save_pretrained (transformer/, two CLIP encoders
with projection, an optional T5 in text_encoder_3/ + tokenizer_3/, the 16-channel VAE with SD3's shift and scaling,
a flow-matching scheduler), so it runs in StableDiffusion3Pipeline as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from adapterlib.data.manifest import GroundedObject, Record, write_manifest
from adapterlib.paths import REPO_ROOT
from adapterlib.training.checkpoint import save_checkpoint
from adapterlib.training.config import make_config

NOTEBOOKS = REPO_ROOT / "notebooks"
PAPERMILL = [sys.executable, "-m", "papermill", "--kernel", "python3"]


# ---------------------------------------------------------------------------------------------
# tiny Stable Diffusion 1.x, detectors, COCO

SD_UNET_SAMPLE_SIZE = 8   # latent side


SD_VAE_SCALE = 2          # two VAE blocks -> one downsampling by 2


SD_RESOLUTION = SD_UNET_SAMPLE_SIZE * SD_VAE_SCALE


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_clip_tokenizer(folder: Path) -> int:
    """A tiny CLIP BPE tokenizer as SD ships it (vocab.json, merges.txt, configs); returns its vocab size.

    Like the real vocab it holds every byte character alone and as a word end ("a</w>"), a few
    merges, then the two special tokens last, so the EOS token has the highest id (CLIP's pooled
    output takes the argmax id when eos_token_id is the legacy 2, as in SD's text encoder config)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("a", "n"), ("an", "d</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}))
    return len(vocab)


def build_tiny_sd_folder(folder: Path) -> Path:
    """Write a random-weight, SD-1.x-architecture pipeline folder (latent space, 4 channels)."""
    folder = Path(folder)
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=SD_UNET_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SD_RESOLUTION,
    ).save_pretrained(folder / "vae")
    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,   # as in SD 1.x's config: 2 = "pool at the argmax id"
    )).save_pretrained(folder / "text_encoder")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                  ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
    }, indent=2))
    return folder


def write_coco_fixture(root: Path, n: int = 8, first: int = 0) -> Path:
    """A COCO-format data set under `root`: n pictures (ids and file names from `first` on) of a dog (red) and
    a cat (blue) as rectangles, with instances.json and captions.json (`python -m adapterlib import coco`)."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(first, first + n):
        w, h = 48 + 4 * (i % 8), 40
        im = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(im)
        dog, cat = [2 + i % 8, 4, 20, 20], [24, 10 + i % 3, 18, 16]
        for box, colour in ((dog, "red"), (cat, "blue")):
            draw.rectangle([box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1], fill=colour)
        im.save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns += [{"id": 10 * i + k, "image_id": i + 1, "category_id": k, "bbox": box, "iscrowd": 0,
                  "area": box[2] * box[3]} for k, box in ((1, dog), (2, cat))]
    (root / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]}))
    (root / "captions.json").write_text(json.dumps(
        {"annotations": [{"id": 100 + i, "image_id": i + 1, "caption": f"a dog and a cat, picture {i}"}
                         for i in range(first, first + n)]}))
    return root


def import_coco_fixture(root: Path, n: int = 8, first: int = 0) -> Path:
    """`write_coco_fixture` imported as a user does (`python -m adapterlib import coco`): root/data/data.jsonl."""
    from adapterlib.__main__ import main

    coco = write_coco_fixture(root / "coco", n, first)
    assert main(["import", "coco", "--instances", str(coco / "instances.json"), "--images", str(coco / "images"),
                 "--captions", str(coco / "captions.json"), "--out", str(root / "data")]) == 0
    return root / "data" / "data.jsonl"


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
OWL_MODELS = {"owlvit": ("OwlViTConfig", "OwlViTForObjectDetection", "OwlViTImageProcessor"),
              "owlv2": ("Owlv2Config", "Owlv2ForObjectDetection", "Owlv2ImageProcessor")}


def build_tiny_owl_folder(folder, kind: str = "owlvit"):
    """A random-weight OWL-ViT (or OWLv2) folder as a hub download looks: config.json + safetensors, a CLIP
    tokenizer, preprocessor_config.json (32 x 32 input, 4 x 4 patches). The random box and logit heads are
    tamed so that boxes stay near their patch's grid box and scores near sigmoid(cosine): untamed, they
    saturate (boxes on the image border, scores all exactly 1.0), which would hide coordinate mistakes."""
    import transformers
    config_name, model_name, processor = OWL_MODELS[kind]
    config_class, model_class = getattr(transformers, config_name), getattr(transformers, model_name)
    folder = Path(folder)
    vocab = write_clip_tokenizer(folder)
    torch.manual_seed(0)
    model = model_class(config_class(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32))
    with torch.no_grad():
        for layer in (model.box_head.dense2, model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(0.01)
            layer.bias.zero_()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": processor, "do_resize": True, "size": {"height": 32, "width": 32},
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_pad": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    return folder


# ---------------------------------------------------------------------------------------------
# tiny Stable Diffusion XL

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


# ---------------------------------------------------------------------------------------------
# tiny Stable Diffusion 3

SD3_SAMPLE_SIZE = 8              # latent side
SD3_RESOLUTION = 16              # two VAE blocks: one downsampling by 2
SD3_LAYERS = 4                   # joint blocks: first-half 0-1, middle 1-2, last-half 2-3
SD3_JOINT_WIDTH = 48             # joint_attention_dim = the T5's d_model; both CLIPs' 2 x 16 are zero-padded
                                 # to it (a real SD3: 768 + 1280 padded to 4096)
SD3_T5_TOKENS = 8                # the T5 part of a caption (the folder's t5_tokens.json; a real SD3's: 256)
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305
T5_WORDS = ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in "a red blue green dog cat and , the picture box".split()]


def sd3_transformer_config(**changes) -> dict:
    """The tiny SD3 transformer's config (`changes` on top)."""
    return {**dict(sample_size=SD3_SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=SD3_LAYERS,
                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=SD3_JOINT_WIDTH,
                   caption_projection_dim=16, pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=8), **changes}


def build_tiny_sd3_folder(folder: Path, t5: bool = True) -> Path:
    """Write a random-weight, SD3-architecture pipeline folder through diffusers' own StableDiffusion3Pipeline (so
    model_index.json is a real SD3's): a latent 16-channel VAE with SD3's shift and scaling, two CLIP encoders with
    projection (tokenizer_2 padded with "!", as SD3's), with `t5` a tiny T5 encoder and its tokenizer, and a
    flow-matching Euler scheduler (shift 3.0). t5_tokens.json keeps the T5 part of a caption short."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
    folder = Path(folder)
    torch.manual_seed(0)
    vocab_size = write_clip_tokenizer(folder / "_clip")
    write_clip_tokenizer(folder / "_clip_2")
    config = json.loads((folder / "_clip_2" / "tokenizer_config.json").read_text())
    (folder / "_clip_2" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    special = json.loads((folder / "_clip_2" / "special_tokens_map.json").read_text())
    (folder / "_clip_2" / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    parts = dict(
        transformer=SD3Transformer2DModel(**sd3_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                          norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SD3_RESOLUTION,
                          scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT, use_quant_conv=False,
                          use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_text_config(vocab_size)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "_clip"),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size)),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "_clip_2"),
        text_encoder_3=None, tokenizer_3=None)
    if t5:
        parts["text_encoder_3"] = T5EncoderModel(T5Config(
            vocab_size=len(T5_WORDS), d_model=SD3_JOINT_WIDTH, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        parts["tokenizer_3"] = T5Tokenizer(vocab=[(w, 0.0 if i < 3 else -1.0) for i, w in enumerate(T5_WORDS)],
                                           extra_ids=0, model_max_length=512)
    StableDiffusion3Pipeline(**parts).save_pretrained(folder)
    for scratch in ("_clip", "_clip_2"):
        shutil.rmtree(folder / scratch)
    (folder / "t5_tokens.json").write_text(json.dumps({"t5_tokens": SD3_T5_TOKENS}) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# tiny FLUX.1

FLUX_SAMPLE_SIZE = 8             # latent side (sample_size.json): a 4x4 grid of 2x2-patch tokens
FLUX_RESOLUTION = 16             # two VAE blocks: one downsampling by 2
FLUX_DOUBLE, FLUX_SINGLE = 2, 3  # double- then single-stream blocks (FLUX.1: 19 and 38)
FLUX_WIDTH = 16                  # heads x head width (2 x 8; FLUX.1: 24 x 128 = 3,072)
FLUX_T5_WIDTH = 24               # joint_attention_dim = the T5's d_model (FLUX.1: 4,096)
FLUX_T5_TOKENS = 8               # the T5 part of a caption (t5_tokens.json; FLUX.1-dev's: 512)
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611


def flux_transformer_config(**changes) -> dict:
    """The tiny FLUX transformer's config (`changes` on top): 4 latent channels packed 2x2 (16 inputs), rotary axes
    2 + 2 + 4 = the head width 8, guidance-distilled (FLUX.1-dev's `guidance_embeds`) unless changed."""
    return {**dict(patch_size=1, in_channels=16, out_channels=16, num_layers=FLUX_DOUBLE,
                   num_single_layers=FLUX_SINGLE, attention_head_dim=8, num_attention_heads=2,
                   joint_attention_dim=FLUX_T5_WIDTH, pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True,
                   axes_dims_rope=(2, 2, 4)), **changes}


def build_tiny_flux_folder(folder: Path, distilled: bool = True) -> Path:
    """Write a random-weight, FLUX.1-architecture pipeline folder through diffusers' own FluxPipeline (so
    model_index.json is a real FLUX's): a latent VAE with 4 channels and FLUX's shift and scaling (FLUX.1's has 16),
    a CLIP encoder (its pooled output is the pooled vector) and a tiny T5 (its states are the caption's tokens), a
    flow-matching Euler scheduler with FLUX's resolution-dependent shift, and a transformer with 2 double- and 3
    single-stream blocks, guidance-distilled when `distilled` (dev), else not (schnell). t5_tokens.json keeps a
    caption's T5 part short; sample_size.json gives the latent side (a FLUX transformer's config has none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
    folder = Path(folder)
    torch.manual_seed(0)
    vocab_size = write_clip_tokenizer(folder / "_clip")
    parts = dict(
        transformer=FluxTransformer2DModel(**flux_transformer_config(guidance_embeds=distilled)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                          norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=FLUX_RESOLUTION,
                          scaling_factor=FLUX_VAE_SCALE, shift_factor=FLUX_VAE_SHIFT, use_quant_conv=False,
                          use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_text_config(vocab_size)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "_clip"),
        text_encoder_2=T5EncoderModel(T5Config(
            vocab_size=len(T5_WORDS), d_model=FLUX_T5_WIDTH, d_ff=32, num_layers=2, num_heads=2, d_kv=12,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
        tokenizer_2=T5Tokenizer(vocab=[(w, 0.0 if i < 3 else -1.0) for i, w in enumerate(T5_WORDS)], extra_ids=0,
                                model_max_length=512))
    FluxPipeline(**parts).save_pretrained(folder)
    shutil.rmtree(folder / "_clip")
    (folder / "t5_tokens.json").write_text(json.dumps({"t5_tokens": FLUX_T5_TOKENS}) + "\n")
    (folder / "sample_size.json").write_text(json.dumps({"sample_size": FLUX_SAMPLE_SIZE}) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# photos, runs, adapters

def import_train_resume(tmp_path: Path, monkeypatch, capsys, preset: str, folder: Path, *fields: str):
    """As a user runs a base folder end to end, up to its checkpoints: `import coco` of the fixture (8 records),
    `cache`, a 4-step run `whole` and a 2-step run `half` resumed to 4 steps (batch 2, a checkpoint and samples every
    2 steps, flips, `fields` on top), each checked: the cache holds every record, the run trained (a gate moved), the
    resume is exact on the CPU, samples were written, the encodings were read from the cache. Returns (the runs root,
    the manifest, whole's final adapter weights); the captured output is cleared."""
    from safetensors.torch import load_file

    from adapterlib.__main__ import main
    runs = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(runs))
    coco = write_coco_fixture(tmp_path / "coco")
    assert main(["import", "coco", "--instances", str(coco / "instances.json"), "--images", str(coco / "images"),
                 "--captions", str(coco / "captions.json"), "--out", str(tmp_path / "data")]) == 0
    manifest = str(tmp_path / "data" / "data.jsonl")
    common = ["--preset", preset, "--base_model", str(folder), "--data", manifest]
    assert main(["cache", *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"] == 8
    fields = ["--batch_size", "2", "--save_every", "2", "--log_every", "1", "--n_samples", "2", "--flip", "true",
              *fields]
    assert main(["train", *common, *fields, "--steps", "4", "--run_name", "whole"]) == 0
    assert main(["train", *common, *fields, "--steps", "2", "--run_name", "half"]) == 0
    assert main(["train", "--resume", "half", "--steps", "4"]) == 0
    whole, resumed = (load_file(str(runs / name / "final" / "adapter.safetensors")) for name in ("whole", "half"))
    assert max(whole[k].abs().max().item() for k in whole if "gate" in k) > 0          # it trained
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)                        # exact resume on the CPU
    assert (runs / "whole" / "samples" / "step_0000004.png").is_file()
    assert "encodings cached" in json.loads((runs / "whole" / "data_report.json").read_text())["inputs"]
    capsys.readouterr()
    return runs, manifest, whole


def sample_and_export(tmp_path: Path, pipe, folder: Path, whole: dict, records: list) -> None:
    """After `import_train_resume`: the run's pipeline `pipe` samples `records` (phrases and boxes) as our loop does,
    an opened adapter changes the images, and `export` writes the run's adapter, which `GroundedPipeline.from_adapter`
    on `folder` samples into the same images."""
    import numpy as np
    from safetensors.torch import load_file

    from adapterlib.__main__ import main
    from adapterlib.interop.pipeline import GroundedPipeline
    from adapterlib.model.sample import generate, initial_noise
    base, adapter = pipe._base(), pipe.adapter
    call = dict(prompt=[r.caption for r in records], phrases=[[o.phrase for o in r.objects] for r in records],
                boxes=[[o.box for o in r.objects] for r in records], num_inference_steps=2, output_type="np")
    noise = lambda: initial_noise(base, list(range(len(records))))
    ours = pipe(**call, latents=noise()).images
    assert ours.shape == (len(records), base.resolution, base.resolution, 3)
    assert np.array_equal(ours, generate(base, records, list(range(len(records))), adapter=adapter, steps=2))
    with torch.no_grad():                            # every gate at 1: the adapter acts
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    assert not np.array_equal(pipe(**call, latents=noise()).images,
                              generate(base, records, list(range(len(records))), steps=2))   # the adapter acts
    adapter.detach()
    assert main(["export", "whole", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()
    assert max_diff(load_file(str(tmp_path / "out" / "adapter.safetensors")), whole) == 0
    again = GroundedPipeline.from_adapter(tmp_path / "out", folder)
    again.set_progress_bar_config(disable=True)
    try:
        assert np.array_equal(again(**call, latents=noise()).images, ours)
    finally:
        again.adapter.detach()


def block_outputs(base, spec: str, inputs: tuple, records: list) -> tuple[list[str], dict[str, list]]:
    """An adapter on the blocks `spec` chooses, every gate at 1: (the blocks with a layer, each block's output in the
    base's forward and then in the adapted forward of `inputs` = (noisy, t, context, added)), the adapter detached."""
    from adapterlib.model.adapter import AdaptedUNet, build_adapter
    from adapterlib.model.hooks import transformer_blocks
    from adapterlib.model.sample import ground
    adapter = build_adapter(base, adapted_blocks=spec)
    outputs: dict[str, list] = {}
    spies = [block.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, []).append(out))
             for name, block in transformer_blocks(base.net).items()]    # after the adapter's hooks: they see its output
    try:
        with torch.no_grad():
            for gate in adapter.gate_parameters().values():
                gate.fill_(1.0)
            noisy, t, context, added = inputs
            base.predict(noisy, t, context, added)
            AdaptedUNet(base.net, adapter)(noisy, t, context, ground(base, records), added=added)
    finally:
        for spy in spies:
            spy.remove()
        adapter.detach()
    assert len(adapter.layers) == len(adapter.block_names)
    return adapter.block_names, outputs


def photo_manifest(folder: Path, n: int = 6) -> Path:
    """Non-square pictures (a red and a blue rectangle) with captions that repeat, as COCO's do."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = 40 + 8 * i, 30 + 4 * (i % 3)
        image = Image.new("RGB", (w, h), (20 + 30 * i, 120, 60))
        image.paste((220, 30, 30), (2, 3, w // 2, h - 4))
        image.paste((30, 30, 220), (w // 2 + 2, 5, w - 3, h // 2))
        image.save(folder / "images" / f"{i}.png")
        records.append(Record(f"a red box and a blue box {i % 2}",
                              (GroundedObject("red box", (2 / w, 3 / h, 0.5, (h - 4) / h)),
                               GroundedObject("blue box", ((w // 2 + 2) / w, 5 / h, (w - 3) / w, 0.5))),
                              image=f"images/{i}.png", id=str(i)))
    return write_manifest(folder / "data.jsonl", records)


def opened(adapter, value=1.0, seed=0):
    """Every gate at `value` and the null features random, so the adapter visibly changes the images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.trainable_parameters().items():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(value)
            elif "null_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return adapter


def sd15_run_on_a_swapped_base(tmp_path, monkeypatch, tiny_sd_folder, other_folder):
    """An SD 1.5 run "sd" (2 steps, a checkpoint at 2) on a copy of the tiny SD folder, whose folder is then replaced by
    `other_folder` (another architecture: SDXL, SD3): (the runs root, the run's base folder, its caches so far)."""
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    runs = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(runs))
    base_folder = tmp_path / "base"
    shutil.copytree(tiny_sd_folder, base_folder)
    train(make_config("sd15", run_name="sd", data=str(photo_manifest(tmp_path / "d")), base_model=str(base_folder),
                      steps=2, save_every=2, batch_size=2, n_samples=0), progress=False)
    shutil.rmtree(base_folder)
    shutil.copytree(other_folder, base_folder)
    return runs, base_folder, set((runs / "_cache").iterdir())


def write_run(runs, name, base_model, adapter, step=5, **fields):
    """A run folder holding one checkpoint of `adapter`, written by the checkpoint writer training uses."""
    cfg = make_config("shapes", run_name=name, base_model=str(base_model),
                      adapter_attention=adapter.config["attention"], **fields).to_dict()
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_checkpoint(folder, step, adapter, {"step": step}, cfg)
    return folder


# ---------------------------------------------------------------------------------------------
# notebooks through papermill

def papermill(notebook, out, params, env=None):
    """`papermill notebooks/<notebook> out -p NAME VALUE ...` as a user runs it; returns the process."""
    args = [a for name, value in params.items() for a in ("-p", name, str(value))]
    return subprocess.run(PAPERMILL + [str(NOTEBOOKS / notebook), str(out), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def notebook_outputs(notebook: Path) -> str:
    nb = nbformat.read(notebook, 4)
    return "\n".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# ---------------------------------------------------------------------------------------------
# two processes through Accelerate

TOLERANCE = 1e-5


TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(root) -> dict:
    return {**os.environ, "ADAPTERLIB_RUNS": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "adapterlib", "train", *args]


def accelerate_train(root, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(args), cwd=REPO_ROOT, env=train_env(root), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------
# tiny GroundingDINO and SAM

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BERT_WORDS = ["a", "and", "red", "blue", "green", "yellow", "circle", "square", "triangle", "ball", "box", "dog", "cat"]


def write_bert_tokenizer(folder: Path) -> int:
    """A tiny BERT WordPiece tokenizer (vocab.txt + configs) whose special tokens sit at bert-base-uncased's ids
    ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, "." 1012, "?" 1029): GroundingDINO's modelling code
    finds the phrase delimiters by those ids. Any lower-case word tokenizes (letters and "##" letters), a few
    whole. Returns the vocab size."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,'-")
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += chars + ["##" + c for c in chars] + BERT_WORDS

    def fill_to(index: int):
        tokens.extend(f"[unused{i}]" for i in range(len(tokens), index))

    fill_to(1012)
    tokens.append(".")
    fill_to(1029)
    tokens.append("?")
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return len(tokens)


def build_tiny_grounding_dino_folder(folder) -> Path:
    """A random-weight GroundingDINO folder as IDEA-Research/grounding-dino-tiny's download looks: config.json
    (model_type "grounding-dino") + model.safetensors, a BERT tokenizer (`write_bert_tokenizer`),
    preprocessor_config.json (images resized to 64 on their longer side). A 3-stage Swin of width 8, a 1-layer
    BERT of width 32, d_model 32 (GroundingDINO's GroupNorm needs 32 channels), 1 encoder and 2 decoder layers
    (the decoder's box heads are tied, which needs two), 20 queries, 64 text tokens. Tamed as the OWL folder is: the
    last text layer norm is scaled down, so scores spread around 0.5 instead of saturating at 1.0, and the box
    head is given a bias towards wider boxes, so that some of the 20 boxes overlap above 0.8 (NMS has work to do)."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    folder = Path(folder)
    vocab = write_bert_tokenizer(folder)
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1], window_size=4, image_size=64,
                                   out_indices=[1, 2, 3]),
        text_config=BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, num_queries=20, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_n_points=2, decoder_n_points=2,
        max_text_len=64))
    with torch.no_grad():
        norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
        norm.weight.mul_(0.1)
        norm.bias.mul_(0.1)
        last = model.bbox_embed[0].layers[-1]               # tied: every decoder layer's box head
        last.weight.normal_(0.0, 0.02)
        last.bias.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0]))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "GroundingDinoImageProcessor", "processor_class": "GroundingDinoProcessor",
        "do_resize": True, "size": {"shortest_edge": 64, "longest_edge": 64}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "do_pad": True, "format": "coco_detection"}))
    return folder


def build_tiny_sam_folder(folder) -> Path:
    """A random-weight SAM folder as facebook/sam-vit-huge's download looks (config.json with model_type "sam",
    model.safetensors, preprocessor_config.json), at toy size: a 1-layer ViT of width 16 on 64 x 64 inputs (16 px
    patches: a 4 x 4 embedding, 16 x 16 low-resolution masks), images resized to 64 on their longer side and padded."""
    from transformers import SamConfig, SamModel

    folder = Path(folder)
    torch.manual_seed(0)
    SamModel(SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=1,
                           image_size=64, patch_size=16, window_size=2, global_attn_indexes=[0], mlp_dim=32,
                           num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor", "do_resize": True,
        "size": {"longest_edge": 64}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_pad": True,
        "pad_size": {"height": 64, "width": 64}, "mask_size": {"longest_edge": 16},
        "mask_pad_size": {"height": 16, "width": 16}, "do_convert_rgb": True}))
    return folder
