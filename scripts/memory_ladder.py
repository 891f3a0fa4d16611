"""The memory ladder: what one training step of the sd15 preset (SD 1.5 at 512 px) or the sdxl preset (SDXL at
1,024 px) needs, per batch x gradient accumulation x gradient checkpointing, against 8 / 12 / 16 / 24 / 40 / 80 GB
cards. COMPUTED, not measured on a GPU: `adapterlib.training.memory`'s estimate (the run's own train.log line) with
its parts taken here:
- the frozen base in bf16: parameter counts of the real architectures (UNet, VAE, text encoders) built on the meta
  device, x 2 bytes;
- the adapter (the preset's blocks and feed-forward): trainable parameters x 16 bytes (fp32 weights, gradients,
  AdamW's two moments);
- the activations per sample: every tensor autograd saves in one forward of the preset's adapted network, measured
  on this machine's CPU at batch 1 (and 2, to check they grow linearly) with the network in bf16 under bf16 autocast
  (what a GPU run does), with and without gradient checkpointing (`memory.SavedBytes`, the counter a run uses);
- plus a fixed allowance for what the estimate leaves out: the CUDA context and the allocator's slack (1 GiB), and
  with checkpointing one segment's recompute at a time (measured: the largest saved set of one checkpointed segment
  at batch 1, times the micro-batch).
A cell fits when the total is at most 90% of the card (the rest: fragmentation). The numbers it prints go to
docs/notes/memory.md with this command:

    OMP_NUM_THREADS=2 python scripts/memory_ladder.py            # sd15 (about 1 min on 2 cores)
    OMP_NUM_THREADS=2 python scripts/memory_ladder.py --sdxl     # also sdxl at 1,024 px (a few minutes, ~20 GB RAM)
    python scripts/memory_ladder.py --cuda [--sdxl]                # on a GPU: each micro-batch MEASURED (CUDA's peak)

`--cuda` measures instead: for each micro-batch (batch / accumulation) one training step of the preset's adapter on
the random-weight network in bf16 (forward, backward, AdamW step), with and without checkpointing, and its
`torch.cuda.max_memory_allocated` plus the VAE's and text encoders' bf16 weights (a run loads them too), or OOM.
On a GPU the same parts are in a run's train.log ("memory estimated: ...") with CUDA's measured peak beside them.
"""
import argparse
import json

import torch

GiB = 2 ** 30
CARDS_GB = (8, 12, 16, 24, 40, 80)
BATCHES = (1, 2, 4, 8, 16)
ACCUMULATION = (1, 4)
OVERHEAD = 1.0 * GiB           # CUDA context + allocator slack, not in the estimate
HEADROOM = 0.9                 # a cell fits when its total is within 90% of the card's memory


def base_bytes(size: str) -> int:
    """The frozen base's parameters in bf16: network + VAE + text encoder(s) of the real architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from adapterlib.evaluation.bench import sd15_unet_config, sdxl_unet_config

    n = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(sd15_unet_config() if size == "sd15" else sdxl_unet_config()))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2)
        clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=49_408, hidden_size=768, intermediate_size=3072,
                                              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
        count = n(unet) + n(vae) + n(clip_l)
        if size == "sdxl":
            count += n(CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49_408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)))
    return 2 * count


def activations(size: str, batch: int, checkpointing: bool) -> tuple[int, int, int]:
    """(saved bytes of one forward at `batch`, trainable parameters, the largest segment's saved bytes when
    checkpointing: its recompute's extra) for the preset's adapter on a random-weight network of `size`, bf16."""
    from adapterlib.evaluation.bench import make_adapter, make_workload
    from adapterlib.model.adapter import AdaptedUNet
    from adapterlib.model.hooks import set_gradient_checkpointing
    from adapterlib.training.config import PRESETS, TrainConfig
    from adapterlib.training.memory import SavedBytes

    preset = PRESETS[size]
    w = make_workload(size, device="cpu", batch=batch)
    w.unet.to(torch.bfloat16)
    adapter = make_adapter(w, "masked", True, preset.get("adapter_blocks", TrainConfig.adapter_blocks),
                           preset.get("adapter_ff_mult", TrainConfig.adapter_ff_mult))
    model = AdaptedUNet(w.unet, adapter)
    set_gradient_checkpointing(w.unet, adapter, checkpointing)
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedBytes(model) as watch:
        out = model(w.noisy, w.t, w.context, w.grounding, w.scale, w.added)
    segment = 0
    if checkpointing:         # one forward more, each segment first run plainly under a counter: its saved set is
        import torch.utils.checkpoint as cp          # what the backward holds while it recomputes that segment
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        original = cp.checkpoint

        def measuring(fn, *args, **kwargs):
            nonlocal segment
            sizes = {}

            def pack(tensor):
                if tensor.untyped_storage().data_ptr() not in weights:
                    sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(*args)
            segment = max(segment, sum(sizes.values()))
            return original(fn, *args, **kwargs)
        cp.checkpoint = measuring
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(w.noisy, w.t, w.context, w.grounding, w.scale, w.added)
        finally:
            cp.checkpoint = original
    del out
    trainable = sum(p.numel() for p in adapter.trainable_parameters().values())
    set_gradient_checkpointing(w.unet, adapter, False)
    return watch.bytes, trainable, segment


def measured_peak(size: str, micro: int, checkpointing: bool) -> int | None:
    """CUDA's peak allocated bytes over one training step (bf16 network, fp32 adapter under autocast, AdamW) at
    `micro` samples; None when it runs out of memory."""
    import torch.nn.functional as F
    from adapterlib.evaluation.bench import make_adapter, make_workload
    from adapterlib.model.adapter import AdaptedUNet
    from adapterlib.model.hooks import set_gradient_checkpointing
    from adapterlib.training.config import PRESETS, TrainConfig

    preset = PRESETS[size]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        w = make_workload(size, device="cuda", batch=micro)
        adapter = make_adapter(w, "masked", True, preset.get("adapter_blocks", TrainConfig.adapter_blocks),
                               preset.get("adapter_ff_mult", TrainConfig.adapter_ff_mult))
        model = AdaptedUNet(w.unet, adapter)
        set_gradient_checkpointing(w.unet, adapter, checkpointing)
        opt = torch.optim.AdamW(list(adapter.trainable_parameters().values()), lr=1e-4, fused=True)
        for _ in range(2):                                   # the second step has AdamW's states allocated
            with w.autocast():
                out = model(w.noisy, w.t, w.context, w.grounding, w.scale, w.added)
            F.mse_loss(out.float(), w.target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def cells(total) -> list[dict]:
    """The ladder's rows: each (checkpointing, batch, accumulation) with `total(micro_batch, checkpointing)` in GiB
    (None: out of memory) and the cards it fits."""
    rows = []
    for checkpointing in (False, True):
        for batch in BATCHES:
            for accumulation in ACCUMULATION:
                if batch % accumulation:
                    continue
                need = total(batch // accumulation, checkpointing)
                rows.append(dict(batch=batch, accumulation=accumulation, checkpointing=checkpointing,
                                 total_gib=None if need is None else need / GiB,
                                 fits={gb: need is not None and need <= HEADROOM * gb * 1e9 for gb in CARDS_GB}))
    return rows


def measured_ladder(size: str) -> dict:
    """The ladder's cells measured on this GPU (the network's peak plus the VAE's and text encoders' weights)."""
    others = base_bytes(size) - 2 * _network_parameters(size)
    peaks = {}

    def total(micro: int, checkpointing: bool) -> int | None:
        if (micro, checkpointing) not in peaks:
            peaks[micro, checkpointing] = measured_peak(size, micro, checkpointing)
        peak = peaks[micro, checkpointing]
        return None if peak is None else peak + others
    rows = cells(total)
    return dict(size=size, measured_on=torch.cuda.get_device_name(), others_gib=others / GiB, rows=rows)


def _network_parameters(size: str) -> int:
    from diffusers import UNet2DConditionModel
    from adapterlib.evaluation.bench import sd15_unet_config, sdxl_unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(sd15_unet_config() if size == "sd15" else sdxl_unet_config()))
    return sum(p.numel() for p in unet.parameters())


def ladder(size: str) -> dict:
    base = base_bytes(size)
    plain1, trainable, _ = activations(size, 1, False)
    plain2, _, _ = activations(size, 2, False)
    ckpt1, _, segment = activations(size, 1, True)
    per = {False: plain1, True: ckpt1}
    rows = cells(lambda micro, checkpointing: base + 16 * trainable + per[checkpointing] * micro + OVERHEAD
                 + (segment * micro if checkpointing else 0))      # + one segment's recompute of the micro-batch
    return dict(size=size, base_gib=base / GiB, trainable=trainable, adapter_gib=16 * trainable / GiB,
                activations_per_sample_gib=plain1 / GiB, batch2_over_batch1=plain2 / plain1,
                checkpointed_per_sample_gib=ckpt1 / GiB, recompute_segment_gib=segment / GiB, rows=rows)


def show(result: dict) -> None:
    if "measured_on" in result:
        print(f"\n{result['size']}: MEASURED on {result['measured_on']}: one training step's CUDA peak + the VAE's and "
              f"text encoders' bf16 weights ({result['others_gib']:.2f} GiB)")
    else:
        _show_parts(result)
    label = "total GiB" if "measured_on" in result else "total GiB (computed)"
    print(f"| batch | accumulation | checkpointing | {label} | " + " | ".join(f"{gb} GB" for gb in CARDS_GB) + " |")
    print("|---" * (4 + len(CARDS_GB)) + "|")
    for r in result["rows"]:
        total = "OOM" if r["total_gib"] is None else f"{r['total_gib']:.1f}"
        print(f"| {r['batch']} | {r['accumulation']} | {'yes' if r['checkpointing'] else 'no'} | {total} | "
              + " | ".join("fits" if r["fits"][gb] else "-" for gb in CARDS_GB) + " |")


def _show_parts(result: dict) -> None:
    print(f"\n{result['size']}: frozen base bf16 {result['base_gib']:.2f} GiB; adapter {result['trainable']:,} "
          f"parameters x 16 B = {result['adapter_gib']:.2f} GiB; activations a sample {result['activations_per_sample_gib']:.2f}"
          f" GiB (batch 2 / batch 1: {result['batch2_over_batch1']:.2f}), with checkpointing "
          f"{result['checkpointed_per_sample_gib']:.3f} GiB + one segment's recompute "
          f"{result['recompute_segment_gib']:.2f} GiB a sample; + {OVERHEAD / GiB:.1f} GiB CUDA context and slack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdxl", action="store_true", help="also SDXL at 1,024 px (needs ~20 GB of RAM)")
    parser.add_argument("--cuda", action="store_true", help="measure each cell on this GPU instead of computing it")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    make = measured_ladder if args.cuda else ladder
    results = [make("sd15")] + ([make("sdxl")] if args.sdxl else [])
    for result in results:
        show(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
