"""Shared fixtures: a tiny Stable-Diffusion-architecture folder built from configs, offline.

The folder has the layout of a real SD 1.x checkpoint on disk (model_index.json, unet/, vae/,
text_encoder/, tokenizer/ with a CLIP BPE vocab.json + merges.txt, scheduler/ with SD's PNDM
config), at toy size, so `load_base` is tested on the SD path without any download.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A tiny SD-architecture folder on disk, built once per test session."""
    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd"))


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


# --- a tiny zero-shot detector (OWL-ViT / OWLv2) folder, built from configs, offline

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


@pytest.fixture(scope="session")
def tiny_owl_folder(tmp_path_factory) -> Path:
    """A tiny random-weight OWL-ViT folder on disk, built once per test session."""
    return build_tiny_owl_folder(tmp_path_factory.mktemp("tiny-owlvit"))


# --- the shipped base and adapters on it, shared by the adapter, checks, evaluation and slider tests

@pytest.fixture(scope="session")
def base():
    from adapterlib.model.base import load_base
    return load_base("shapes-tiny")


@pytest.fixture(scope="session")
def records():
    from adapterlib import shapes
    return shapes.heldout_records(3)


@pytest.fixture
def fresh_adapter(base):
    """A just-built adapter (all gates exactly zero), detached after the test."""
    from adapterlib.model.adapter import build_adapter
    adapter = build_adapter(base)
    yield adapter
    adapter.detach()


@pytest.fixture(scope="module")
def open_adapter(base):
    """An untrained adapter with every gate at 1.0, so that it visibly changes the images."""
    import torch

    from adapterlib.model.adapter import build_adapter
    torch.manual_seed(0)
    adapter = build_adapter(base)
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    yield adapter
    adapter.detach()
