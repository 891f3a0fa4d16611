"""A Stable Diffusion 1.5-architecture pipeline folder with random weights, built from configs, and a manifest of
generated 512-px images: the real training loop at real size where no weights can be downloaded
(scripts/gpu_speed_check.sh).

    python scripts/gpu_sd15_folder.py --out DIR [--images 1000]      # DIR/sd15 (the base), DIR/data/data.jsonl
    python scripts/gpu_sd15_folder.py --out DIR --small              # a CPU rehearsal: the tests' tiny SD folder

The UNet is SD 1.5's (diffusers' defaults: 320-640-1280-1280, 16 transformer blocks), the VAE SD's (128-256-512-512,
4 latent channels, 8x down), the text encoder CLIP ViT-L/14's text tower (768 wide, 12 layers), with the tests' small
CLIP BPE vocabulary (tests/helpers.py: the real one cannot be downloaded; the vocabulary size does not change the
step's cost). Weights are saved in fp16 (the runs load them in their compute dtype). The images are Shapes v2
layouts (2-6 objects) rendered at 32 px and scaled to 512 px (nearest), so each record's boxes and phrases hold.
"""
import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_helpers():
    """tests/helpers.py, the tests' builders of tiny folders (the CLIP tokenizer, a tiny SD)."""
    spec = importlib.util.spec_from_file_location("adapterlib_test_helpers", REPO / "tests" / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_sd15_folder(folder: Path, device: str) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapterlib.evaluation.workloads import sd15_unet_config

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd15_unet_config())
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    unet.half().save_pretrained(folder / "unet")
    vae.half().save_pretrained(folder / "vae")
    helpers = test_helpers()
    vocab_size = helpers.write_clip_tokenizer(folder / "tokenizer")
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            pad_token_id=1, bos_token_id=0, eos_token_id=2))
    text.half().save_pretrained(folder / "text_encoder")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return folder


def write_images(folder: Path, n: int, side: int) -> Path:
    """n Shapes v2 layouts (crowded: 2-6 objects), scaled to side x side px, and their manifest."""
    from adapterlib.data.manifest import Record, write_manifest
    from adapterlib.shapes.world import render_batch

    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, records = render_batch(range(n), 6)
    out = []
    for image, record in zip(images, records):
        name = f"images/{record.seed:07d}.png"
        Image.fromarray(np.asarray(image)).resize((side, side), Image.NEAREST).save(folder / name, compress_level=1)
        out.append(Record(record.caption, record.objects, image=name, id=record.id, seed=record.seed))
    return write_manifest(folder / "data.jsonl", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--small", action="store_true", help="the tests' tiny SD folder and 64-px images (a CPU rehearsal)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random weights are drawn (faster on the GPU)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = args.out / "sd15"
    if args.small:
        test_helpers().build_tiny_sd_folder(base)
    else:
        build_sd15_folder(base, args.device)
    t1 = time.perf_counter()
    manifest = write_images(args.out / "data", args.images, 64 if args.small else 512)
    t2 = time.perf_counter()
    print(json.dumps(dict(base=str(base), manifest=str(manifest), images=args.images, base_s=round(t1 - t0, 1),
                          images_s=round(t2 - t1, 1))))


if __name__ == "__main__":
    main()
