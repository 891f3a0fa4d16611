"""What an SD 1.5 run will cost where it has not been measured yet: the parts of GPU memory that can be computed,
the 25,000-step run's time at a given rate, and the COCO encoding cache's size. Everything here is arithmetic on
counts: parameter counts of the real architectures built on the meta device (no weights, seconds on a CPU) and the
sizes the code stores. docs/notes/sd15-cost.md prints this output and says what it leaves out (activations).

    python scripts/cost_arithmetic.py                 # SD 1.5, the sd15 preset (decoder blocks, 4x feed-forward)
    python scripts/cost_arithmetic.py --rate 80.7     # the 25,000 steps x batch 2 at 80.7 samples/s
    python scripts/cost_arithmetic.py --sdxl          # also the adapter's size on SDXL base by block choice

The measurement that replaces it: OUT=<dir> bash scripts/gpu_speed_check.sh (one GPU call).
"""
import argparse

import torch

GiB, MiB = 2**30, 2**20

# COCO 2017 train (the sizes of the released annotation files): images, captions (about 5 an image), categories
COCO_TRAIN_IMAGES, COCO_TRAIN_CAPTIONS, COCO_CATEGORIES = 118_287, 591_753, 80


def counts() -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapterlib.evaluation.workloads import sd15_unet_config

    n = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49_408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
        found = dict(unet=n(unet), vae=n(vae), text_encoder=n(text))
        found.update(adapter_counts(unet, 768))
    return found


def adapter_counts(unet, text_dim: int) -> dict[str, int]:
    """Trainable parameters of the masked adapter with its gated feed-forward, by block choice and width."""
    from adapterlib.model.adapter import SpatialAdapter

    return {f"adapter {blocks} {ff}x": sum(p.numel() for p in SpatialAdapter(
                unet, text_dim, attention="masked", adapted_blocks=blocks, ff_mult=ff).parameters())
            for blocks in ("decoder", "all", "low", "migc") for ff in (4, 2)}


def sdxl_counts() -> dict[str, int]:
    from diffusers import UNet2DConditionModel

    from adapterlib.evaluation.workloads import sdxl_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config())
        return {"unet": sum(p.numel() for p in unet.parameters()), **adapter_counts(unet, 1280)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=None, help="samples/s for the 25,000-step run's time")
    ap.add_argument("--sdxl", action="store_true", help="also SDXL base's UNet and the adapter on it by block choice")
    args = ap.parse_args()

    c = counts()
    print("SD 1.5 parameters (computed on the meta device; adapter: masked + gated FF, by blocks and FF width):")
    for name, value in c.items():
        print(f"  {name:22s} {value:>13,d}")
    if args.sdxl:
        print("SDXL base parameters (the same way, 1280-wide phrases):")
        for name, value in sdxl_counts().items():
            print(f"  {name:22s} {value:>13,d}")

    adapter = c["adapter decoder 4x"]                                  # the sd15 preset's
    print("\nGPU memory of a training step that can be computed (sd15 preset, bf16 base, fp32 adapter, AdamW):")
    rows = [("UNet weights, bf16 (2 B each)", c["unet"] * 2),
            ("VAE + text encoder weights, bf16 (resident: the base moves as a whole)", (c["vae"] + c["text_encoder"]) * 2),
            ("adapter weights fp32 (4 B)", adapter * 4),
            ("adapter gradients fp32 (4 B)", adapter * 4),
            ("AdamW states exp_avg + exp_avg_sq fp32 (8 B)", adapter * 8)]
    for name, size in rows:
        print(f"  {name:75s} {size / GiB:6.2f} GiB")
    print(f"  {'total computed (activations, workspace and the CUDA context not included)':75s} "
          f"{sum(s for _, s in rows) / GiB:6.2f} GiB")

    samples = 25_000 * 2
    print(f"\nthe plan's run: 25,000 steps x batch 2 = {samples:,d} samples")
    for rate in ([args.rate] if args.rate else []) + [0.74]:
        print(f"  at {rate:g} samples/s: {samples / rate / 60:,.1f} min ({samples / rate / 3600:.1f} h)")

    print("\nthe COCO train2017 encoding cache (one record per image, --caption-mode first):")
    latent = 4 * 64 * 64                                                # SD 1.5 at 512 px: 4 x 64 x 64 latents
    for dtype, b in (("bf16 (a GPU run under mixed_precision bf16)", 2), ("fp32 (a CPU run)", 4)):
        images = COCO_TRAIN_IMAGES * 2 * latent * b                     # latent mean + std per image
        captions = COCO_TRAIN_IMAGES * 77 * 768 * b                     # hidden states, one row per distinct caption
        captions_all = COCO_TRAIN_CAPTIONS * 77 * 768 * b
        phrases = COCO_CATEGORIES * 768 * b                             # one embedding per distinct phrase: the names
        empty = 77 * 768 * b                                            # the empty caption's hidden states
        print(f"  {dtype}:")
        print(f"    latent mean + std: {COCO_TRAIN_IMAGES:,d} x 2 x 4x64x64 x {b} B = {images / GiB:.2f} GiB")
        print(f"    caption hidden states: up to {COCO_TRAIN_IMAGES:,d} x 77x768 x {b} B = {captions / GiB:.2f} GiB "
              f"(--caption-mode all: {COCO_TRAIN_CAPTIONS:,d} captions, {captions_all / GiB:.2f} GiB)")
        print(f"    phrase embeddings: {COCO_CATEGORIES} categories x 768 x {b} B = {phrases / MiB:.2f} MiB")
        print(f"    the empty caption: 77x768 x {b} B = {empty / MiB:.2f} MiB")
        print(f"    total: {(images + captions + phrases + empty) / GiB:.2f} GiB (+ records.jsonl and meta.json)")


if __name__ == "__main__":
    main()
