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

`--flux`: FLUX.1-dev (12 B parameters) COMPUTED, in parts (docs/notes/memory.md, "FLUX.1-dev, computed"):
- our adapter's trainable parameters per block choice and feed-forward width: FLUX.1-dev's transformer and the
  adapter built on the meta device (`flux_trainable`);
- the frozen base in bf16: the transformer, T5-XXL's encoder, CLIP-L's text tower and FLUX's 16-channel VAE with
  their real configs, counted on the meta device (`flux_base_parameters`);
- the activations at 512 and 1,024 px, batch 1 and 2: one forward with grad on this CPU of a full-width FLUX with 3
  double- and 3 single-stream blocks (bf16 weights under bf16 autocast, the adapter fp32) at three block choices
  (double, single, middle: between them every class of block), each tensor autograd saves attributed to the block
  it was saved in (its adapter layer with it) and each block's inputs (what a checkpointed block keeps) recorded; a
  block's bytes depend on its kind (double / single), whether it has a layer and whether its image and caption
  tokens carry a gradient (`flux_block_bytes`, `flux_classes`); FLUX.1-dev's 57 blocks are then summed class by
  class (`flux_activations`). The one assumption: a block of FLUX.1-dev costs what the same class of block costs
  in the short network (the same width, tokens and inputs). Checked here: the classes summed for the short network
  give its own measured forward, plain and checkpointed;
- the cells: one 80 GB and one 24 GB card at 512 / 1,024 px, batch 1 and 2, with and without checkpointing, for the
  `flux` preset (middle, feed-forward x2) and `double` (x2), every part of the base resident as our training keeps
  it, and beside it the total with T5, CLIP and the VAE off the GPU (`flux_ladder`).

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 python scripts/memory_ladder.py --flux   # ~6 min, ~11 GB RAM
"""
import argparse
import json
import sys

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

    from adapterlib.evaluation.workloads import sd15_unet_config, sdxl_unet_config

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
    from adapterlib.evaluation.bench import make_adapter
    from adapterlib.evaluation.workloads import make_workload
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
    from adapterlib.evaluation.bench import make_adapter
    from adapterlib.evaluation.workloads import make_workload
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
    from adapterlib.evaluation.workloads import sd15_unet_config, sdxl_unet_config
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


# ---------------------------------------------------------------------------------------------
# FLUX.1-dev, computed (--flux)

FLUX_CHOICES = ("all", "double", "single", "middle", "first-half", "last-half")
FLUX_FFS = (4, 2, None)               # adapter_ff_mult 4 and 2; None: adapter_feedforward false
FLUX_PX = {512: 64, 1024: 128}        # latent sides: 1,024 / 4,096 image tokens (2x2 patches) beside 512 T5 tokens
FLUX_CARDS_GB = (80, 24)
FLUX_BATCHES = (1, 2)
FLUX_CELLS = (("flux", "middle"), ("double", "double"))    # (row, adapter_blocks), both at the flux preset's ff x2
FLUX_FF = 2                                                # the flux preset's adapter_ff_mult
MEASURE_BLOCKS = (3, 3)               # the CPU measurement's double- and single-stream blocks, at FLUX.1-dev's width
MEASURE_CHOICES = ("double", "single", "middle")   # together they hold every class of block any choice needs


def flux_config(**changes) -> dict:
    from adapterlib.evaluation.workloads import flux_transformer_config
    return {**flux_transformer_config(), **changes}


def flux_trainable(config: dict | None = None, text_dim: int | None = None, choices=FLUX_CHOICES,
                   ffs=FLUX_FFS) -> dict:
    """{(choice, ff): trainable parameters} of our adapter (masked attention, the default; `ff` None: no
    feed-forward) on a FLUX transformer of `config` (default FLUX.1-dev's), the network and each adapter built on the
    meta device: the real modules' counts, without their memory."""
    from diffusers import FluxTransformer2DModel
    from adapterlib.evaluation.workloads import FLUX_POOLED
    from adapterlib.model.adapter import SpatialAdapter

    out = {}
    with torch.device("meta"):
        net = FluxTransformer2DModel(**(config or flux_config()))
        for choice in choices:
            for ff in ffs:
                adapter = SpatialAdapter(net, text_dim or FLUX_POOLED, adapted_blocks=choice, feedforward=ff is not None,
                                         ff_mult=ff or 4)
                out[choice, ff] = sum(p.numel() for p in adapter.parameters())
    return out


def flux_base_parameters() -> dict[str, int]:
    """FLUX.1-dev's frozen parts' parameter counts, each built on the meta device with its real config: the
    transformer, T5-XXL's encoder (text_encoder_2), CLIP-L's text tower (text_encoder) and the 16-channel VAE."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    n = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        parts = dict(
            transformer=FluxTransformer2DModel(**flux_config()),
            t5_xxl=T5EncoderModel(T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                                           vocab_size=32128, feed_forward_proj="gated-gelu")),
            clip_l=CLIPTextModel(CLIPTextConfig(vocab_size=49_408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77)),
            vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False))
        return {name: n(module) for name, module in parts.items()}


def block_class(kind: str, adapted: bool, image_grad: bool, text_grad: bool) -> str:
    return f"{kind} {'layer' if adapted else 'plain'} grad:{'image' if image_grad else '-'}+{'text' if text_grad else '-'}"


def input_class(kind: str, previous: str, previous_adapted: bool) -> str:
    return f"{kind} after {previous}{' with a layer' if previous_adapted else ''}"


def flux_inputs(net, batch: int, side: int, text_tokens: int, text_dim: int, seed: int = 0):
    """One seeded FLUX batch as the bench makes one (workloads.make_workload's conventions), in bf16 where the run's are."""
    from adapterlib.evaluation.workloads import PRESENT_SHARE
    from adapterlib.model.base import FLUX_GUIDANCE
    from adapterlib.model.adapter import Grounding

    cfg, gen = net.config, torch.Generator().manual_seed(seed)
    N = 30
    xy = torch.rand(batch, N, 2, generator=gen) * 0.7
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(batch, N, 2, generator=gen) * 0.2], dim=-1).clamp(max=1.0)
    present = torch.rand(batch, N, generator=gen) < PRESENT_SHARE["flux"]
    present[:, 0] = True
    grounding = Grounding(phrases=torch.randn(batch, N, text_dim, generator=gen), boxes=boxes, present=present,
                          keep_text=torch.ones(batch, N, dtype=torch.bool))
    added = {"pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen).bfloat16()}
    if cfg.guidance_embeds:
        added["guidance"] = torch.full((batch,), FLUX_GUIDANCE)
    noisy = torch.randn(batch, cfg.in_channels // 4, side, side, generator=gen).bfloat16()
    context = torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=gen).bfloat16()
    return noisy, torch.rand(batch, generator=gen) * 1000, context, grounding, (0.5 + 0.5 * torch.rand(batch, generator=gen)), added


def build_flux(config: dict, blocks: tuple[int, int] = MEASURE_BLOCKS):
    """A random-weight FLUX transformer of `config` with `blocks` (double, single), bf16, frozen: built on the meta
    device and made real in bf16 (no fp32 copy; the values do not change what autograd saves)."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        net = FluxTransformer2DModel(**{**config, "num_layers": blocks[0], "num_single_layers": blocks[1]})
    net = torch.nn.Module.to(net, torch.bfloat16).to_empty(device="cpu")     # bf16 from the start: no fp32 copy
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (*net.parameters(), *net.buffers()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return net.requires_grad_(False).eval()


class Storages:
    """The storages tensors were seen on, each with the places it was seen in. A storage freed during the forward
    whose address is then reused is another storage: an address whose first tensor is gone starts a new entry (the
    old one kept in `gone`), so two tensors never merge by address alone."""

    def __init__(self):
        self.live: dict[int, dict] = {}
        self.gone: list[dict] = []

    def add(self, tensor: torch.Tensor, owner: str) -> None:
        import weakref
        storage = tensor.untyped_storage()
        entry = self.live.get(storage.data_ptr())
        if entry is not None and entry["ref"]() is None:
            self.gone.append(self.live.pop(storage.data_ptr()))
            entry = None
        if entry is None:
            entry = self.live[storage.data_ptr()] = dict(bytes=storage.nbytes(), owners=set(), ref=weakref.ref(tensor))
        entry["owners"].add(owner)

    def entries(self, alive_only: bool) -> list[tuple[int, set]]:
        """(bytes, owners) of each storage: only those still held at the end (`alive_only`), or every one seen."""
        if alive_only:
            return [(e["bytes"], e["owners"]) for e in self.live.values() if e["ref"]() is not None]
        return [(e["bytes"], e["owners"]) for e in (*self.gone, *self.live.values())]


def flux_block_bytes(net, choice: str, ff_mult: int | None, batch: int, side: int, text_tokens: int = 512,
                     text_dim: int | None = None, checkpointing: bool = False) -> dict:
    """One forward with grad of our adapter at `choice` on `net` (bf16 under bf16 autocast, the adapter fp32), every
    tensor autograd saves attributed to where it was saved: a block (its adapter layer with it), the grounding
    tokenizer, before the blocks (`head`) or after them (`tail`); a storage saved in more than one place is `shared`.
    Only what is still held when the forward ends counts (a graph node made and dropped frees what it saved). Each
    block's class (`block_class`: its kind, whether it has a layer, whether its image and caption tokens carry a
    gradient, read off its inputs) with its bytes; the inputs of each block whose output carries a gradient (what a
    checkpointed block keeps for its recompute: `input_class`) with theirs, those of more than one block (the
    timestep embedding, the rotary tables) `shared_inputs`.
    `checkpointing`: the network's own gradient checkpointing on instead, measured: `total`, what is held for the
    backward when the forward ends (saved outside the blocks, each checkpointed block's inputs: torch's checkpoint
    saves the tensors and its recompute's closure holds the rotary tables); `run_counts`, what a run's estimate
    counts (`memory.SavedBytes`: every storage ever packed, by address, so also the inputs of the blocks before the
    first layer, which are saved and freed at once: it errs high)."""
    import gc
    import torch.utils.checkpoint as cp
    from adapterlib.evaluation.workloads import FLUX_POOLED
    from adapterlib.model.adapter import AdaptedUNet, SpatialAdapter
    from adapterlib.model.hooks import set_gradient_checkpointing, transformer_blocks

    text_dim = text_dim or FLUX_POOLED
    adapter = SpatialAdapter(net, text_dim, adapted_blocks=choice, feedforward=ff_mult is not None,
                             ff_mult=ff_mult or 4).float().attach(net)
    for p in adapter.gate_parameters().values():
        p.data.fill_(0.1)
    model = AdaptedUNet(net, adapter)
    blocks = transformer_blocks(net)
    names = list(blocks)
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    stack, saved, inputs, info, packed = ["head"], Storages(), Storages(), {}, {}

    def tensors(*items):
        for item in items:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (tuple, list)):
                yield from tensors(*item)
            elif isinstance(item, dict):
                yield from tensors(*item.values())

    def pre(name):
        def hook(block, args, kwargs):
            stack.append(name)
            image = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            info[name] = dict(image_grad=image.requires_grad, text_grad=text.requires_grad)
            for t in tensors(args, kwargs):
                inputs.add(t, name)
        return hook

    def post(name):
        def hook(block, args, kwargs, output):
            info[name]["output_grad"] = any(t.requires_grad for t in tensors(output))
            stack.pop()
            stack[-1] = "tail"                      # after the first block, what runs outside them is the tail
        return hook

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in weights:
            return tensor
        packed[storage.data_ptr()] = storage.nbytes()              # memory.SavedBytes's count
        tensor = tensor.detach()      # the same storage; handing back a node's own output would make a reference
        saved.add(tensor, stack[-1])  # cycle (output -> its node -> the saved output) that outlives the forward
        return tensor

    handles = [h for name, block in blocks.items() for h in (block.register_forward_pre_hook(pre(name), with_kwargs=True),
                                                              block.register_forward_hook(post(name), with_kwargs=True))]
    handles.append(adapter.tokenizer.register_forward_pre_hook(lambda m, a: stack.append("tokenizer")))
    handles.append(adapter.tokenizer.register_forward_hook(lambda m, a, o: stack.pop() and None))
    noisy, t, context, grounding, scale, added = flux_inputs(net, batch, side, text_tokens, text_dim)
    held, original = Storages(), cp.checkpoint

    def checkpoint(fn, *args, **kwargs):           # a checkpointed block with a graph: its inputs stay held
        out = original(fn, *args, **kwargs)
        if any(x.requires_grad for x in tensors(out)):
            for x in tensors(args):
                held.add(x, "checkpoint")
        return out
    try:
        set_gradient_checkpointing(net, adapter, checkpointing)
        cp.checkpoint = checkpoint
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = model(noisy, t, context, grounding, scale, added)
        gc.collect()
        if checkpointing:
            kept = {}                                  # saved outside the blocks, or a block's input: once each
            for store in (saved, held):
                for entry in store.live.values():
                    if (tensor := entry["ref"]()) is not None:
                        kept[tensor.untyped_storage().data_ptr()] = entry["bytes"]
            return dict(total=sum(kept.values()), run_counts=sum(packed.values()),
                        inputs=sum(b for b, _ in held.entries(alive_only=True)))
        entries = saved.entries(alive_only=True)
    finally:
        cp.checkpoint = original
        set_gradient_checkpointing(net, adapter, False)
        for h in handles:
            h.remove()
        adapter.detach()
    del out
    owned = lambda listed, owner: sum(b for b, who in listed if who == {owner})
    seen_inputs = inputs.entries(alive_only=False)
    chosen = set(adapter.block_names)
    kind = lambda name: "single" if name.startswith("single_") else "double"
    rows = []
    for i, name in enumerate(names):
        previous = names[i - 1] if i else None
        rows.append(dict(
            block=name, adapted=name in chosen, **info[name],
            saved_class=block_class(kind(name), name in chosen, info[name]["image_grad"], info[name]["text_grad"]),
            saved=owned(entries, name),
            input_class=input_class(kind(name), kind(previous) if previous else "head", previous in chosen),
            kept=owned(seen_inputs, name) if info[name]["output_grad"] else 0))
    return dict(choice=choice, ff_mult=ff_mult, batch=batch, side=side, text_tokens=text_tokens, blocks=rows,
                head=owned(entries, "head"), tail=owned(entries, "tail"), tokenizer=owned(entries, "tokenizer"),
                shared=sum(b for b, who in entries if len(who) > 1),
                shared_inputs=sum(b for b, who in seen_inputs if len(who) > 1),
                total=sum(b for b, _ in entries), run_counts=sum(packed.values()))


def flux_classes(measured: list[dict]) -> dict:
    """Each class's bytes from several `flux_block_bytes` results (each class measured alike wherever it occurs, or
    an error), and the parts outside the blocks (the largest measured)."""
    if len({m["batch"] for m in measured}) != 1:
        raise ValueError("classes are of one batch size: measure each batch apart")
    saved, kept = {}, {}
    for m in measured:
        for r in m["blocks"]:
            for table, cls, value, on in ((saved, r["saved_class"], r["saved"], True),
                                          (kept, r["input_class"], r["kept"], r["output_grad"])):
                if not on:
                    continue
                seen = table.setdefault(cls, value)
                if abs(seen - value) > 0.01 * max(seen, value, 1):
                    raise ValueError(f"{cls}: {seen} and {value} bytes in two places: the class does not fix the cost")
    outside = {k: max(m[k] for m in measured) for k in ("head", "tail", "tokenizer", "shared", "shared_inputs")}
    return dict(batch=measured[0]["batch"], saved=saved, kept=kept, **outside)


def flux_activations(classes: dict, names: list[str], chosen: list[str]) -> dict:
    """A network's activations, at the batch `classes` were measured at, from the measured classes: its blocks
    `names` in order, `chosen` those with a layer. A block's image tokens carry a gradient after the first layer; its
    caption tokens from the block after that (a joint block mixes them). Plain: every block's saved bytes, the
    tokenizer's, the head's and tail's, the shared ones once. Checkpointed: the inputs each block with a graph keeps,
    the shared inputs once, what the tokenizer and the tail save, and at the backward one block's recompute (the
    largest of those blocks' saved sets). Not per sample: autocast's bf16 copies of the fp32 adapter weights (kept
    for the backward, once a step) and the rotary tables do not grow with the batch, so each batch is measured."""
    kind = lambda name: "single" if name.startswith("single_") else "double"
    first = min(names.index(n) for n in chosen)
    plain = classes["head"] + classes["tail"] + classes["tokenizer"] + classes["shared"]
    kept = classes["head"] + classes["tail"] + classes["tokenizer"] + classes["shared_inputs"]
    recompute = 0
    for i, name in enumerate(names):
        adapted, image_grad, text_grad = name in chosen, i > first, i > first + 1
        cls = block_class(kind(name), adapted, image_grad, text_grad)
        if cls not in classes["saved"]:
            raise ValueError(f"no measurement of a block of class {cls!r}: measure a choice that has one")
        plain += classes["saved"][cls]
        if adapted or image_grad:
            before = input_class(kind(name), kind(names[i - 1]) if i else "head", i > 0 and names[i - 1] in chosen)
            if before not in classes["kept"]:
                raise ValueError(f"no measurement of the inputs of a block {before!r}: measure a choice that has one")
            kept += classes["kept"][before]
            recompute = max(recompute, classes["saved"][cls])
    return dict(plain=plain, checkpointed=kept, recompute=recompute)


def flux_ladder(measure_choices=MEASURE_CHOICES, blocks=MEASURE_BLOCKS) -> dict:
    """FLUX.1-dev's parts and cells (module docstring), computed; the activations measured on this CPU."""
    from diffusers import FluxTransformer2DModel
    from adapterlib.model.adapter import select_blocks
    from adapterlib.model.hooks import transformer_blocks

    trainable = flux_trainable()
    base = flux_base_parameters()
    with torch.device("meta"):
        full = FluxTransformer2DModel(**flux_config())
    names = list(transformer_blocks(full))
    net = build_flux(flux_config(), blocks)
    short = list(transformer_blocks(net))
    per = {}
    checks = {}
    for px, side in FLUX_PX.items():
        for batch in FLUX_BATCHES:
            measured = []
            for c in measure_choices:
                measured.append(flux_block_bytes(net, c, FLUX_FF, batch, side))
                print(f"measured: {px} px, batch {batch}, {c}: {measured[-1]['total'] / GiB:.2f} GiB saved",
                      file=sys.stderr, flush=True)
            classes = flux_classes(measured)
            for m in measured:              # the short network's own forward, summed from the classes: the same
                mine = flux_activations(classes, short, select_blocks(net, m["choice"]))["plain"]
                checks.setdefault("short network: classes summed / measured", []).append(mine / m["total"])
            for row, choice in FLUX_CELLS:
                per[px, row, batch] = flux_activations(classes, names, select_blocks(full, choice))
            if px == 512:                    # the checkpointed forward measured, against the classes' sum for it
                for choice in ("middle", "double"):
                    ck = flux_block_bytes(net, choice, FLUX_FF, batch, side, checkpointing=True)
                    mine = flux_activations(classes, short, select_blocks(net, choice))["checkpointed"]
                    checks.setdefault("short network checkpointed: classes summed / measured", []).append(
                        mine / ck["total"])
                    checks.setdefault("short network checkpointed: what a run's estimate counts / held", []).append(
                        ck["run_counts"] / ck["total"])
            per[px, batch, "classes"] = classes
            per[px, batch, "middle"] = measured[measure_choices.index("middle")]["total"]
        checks[f"short network, middle, {px} px: batch 2 / batch 1"] = [per[px, 2, "middle"] / per[px, 1, "middle"]]
    resident = 2 * sum(base.values())                 # what our training keeps on the device: every part, bf16
    transformer_only = 2 * base["transformer"]
    rows = []
    for row, choice in FLUX_CELLS:
        params = trainable[choice, FLUX_FF]
        for px in FLUX_PX:
            for batch in FLUX_BATCHES:
                act = per[px, row, batch]
                for checkpointing in (False, True):
                    a = act["checkpointed"] + act["recompute"] if checkpointing else act["plain"]
                    total = resident + 16 * params + a + OVERHEAD
                    lean = transformer_only + 16 * params + a + OVERHEAD
                    rows.append(dict(row=row, blocks=choice, ff_mult=FLUX_FF, px=px, batch=batch,
                                     checkpointing=checkpointing, activations_gib=a / GiB, total_gib=total / GiB,
                                     lean_gib=lean / GiB,
                                     fits={gb: total <= HEADROOM * gb * 1e9 for gb in FLUX_CARDS_GB},
                                     lean_fits={gb: lean <= HEADROOM * gb * 1e9 for gb in FLUX_CARDS_GB}))
    return dict(size="flux", trainable={f"{c} ff{ff or '-'}": n for (c, ff), n in trainable.items()},
                layers={c: len(select_blocks(full, c)) for c in FLUX_CHOICES}, base=base,
                resident_gib=resident / GiB, transformer_gib=transformer_only / GiB,
                activations={f"{px} px {row} batch {b}": {k: v / GiB for k, v in per[px, row, b].items()}
                             for px in FLUX_PX for row, _ in FLUX_CELLS for b in FLUX_BATCHES},
                classes={f"{px} px batch {b}": per[px, b, "classes"] for px in FLUX_PX for b in FLUX_BATCHES},
                measured_blocks=blocks,
                checks=checks, rows=rows)


def show_flux(result: dict) -> None:
    base = result["base"]
    print("\nFLUX.1-dev: our adapter's trainable parameters (masked attention; built on the meta device)")
    print("| blocks | layers | ff x4 | ff x2 | no feed-forward |")
    print("|---|---|---|---|---|")
    for c in FLUX_CHOICES:
        t = result["trainable"]
        print(f"| {c} | {result['layers'][c]} | {t[f'{c} ff4']:,} | {t[f'{c} ff2']:,} | {t[f'{c} ff-']:,} |")
    print("\nfrozen base, parameters (meta device): " + ", ".join(f"{k} {v:,}" for k, v in base.items())
          + f"; in bf16 {result['resident_gib']:.2f} GiB all parts, the transformer alone {result['transformer_gib']:.2f} GiB")
    for key, cls in result["classes"].items():
        print(f"\n{key}, measured per block class on a {result['measured_blocks'][0]} + "
              f"{result['measured_blocks'][1]}-block FLUX at width 3,072 (MiB): saved "
              + "; ".join(f"{k} {v / 2 ** 20:,.1f}" for k, v in sorted(cls["saved"].items()))
              + " | inputs kept " + "; ".join(f"{k} {v / 2 ** 20:,.1f}" for k, v in sorted(cls["kept"].items()))
              + " | " + ", ".join(f"{k} {cls[k] / 2 ** 20:,.1f}" for k in ("head", "tail", "tokenizer", "shared",
                                                                            "shared_inputs")))
    for name, values in result["checks"].items():
        print(f"check: {name}: " + ", ".join(f"{v:.4f}" for v in values))
    print("\nactivations, FLUX.1-dev's 57 blocks (GiB): " + "; ".join(
        f"{k}: plain {v['plain']:.2f}, checkpointed {v['checkpointed']:.2f} + recompute {v['recompute']:.2f}"
        for k, v in result["activations"].items()))
    print("\n| adapter | px | batch | checkpointing | activations GiB | total GiB, as our training runs (all parts "
          "resident) | " + " | ".join(f"{gb} GB" for gb in FLUX_CARDS_GB) + " | total GiB, T5 + CLIP + VAE off the GPU "
          "(not done) | " + " | ".join(f"{gb} GB" for gb in FLUX_CARDS_GB) + " |")
    print("|---" * (6 + 2 * len(FLUX_CARDS_GB) + 1) + "|")
    for r in result["rows"]:
        print(f"| {r['row']} ({r['blocks']}, ff x{r['ff_mult']}) | {r['px']} | {r['batch']} | "
              f"{'yes' if r['checkpointing'] else 'no'} | {r['activations_gib']:.1f} | {r['total_gib']:.1f} computed | "
              + " | ".join("fits" if r["fits"][gb] else "no" for gb in FLUX_CARDS_GB)
              + f" | {r['lean_gib']:.1f} computed | "
              + " | ".join("fits" if r["lean_fits"][gb] else "no" for gb in FLUX_CARDS_GB) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdxl", action="store_true", help="also SDXL at 1,024 px (needs ~20 GB of RAM)")
    parser.add_argument("--cuda", action="store_true", help="measure each cell on this GPU instead of computing it")
    parser.add_argument("--flux", action="store_true",
                        help="FLUX.1-dev instead, computed (its activations measured on this CPU on a 3 + 3-block "
                             "full-width FLUX: ~11 GB of RAM, ~6 min on one core)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.flux:
        results = [flux_ladder()]
        show_flux(results[0])
    else:
        make = measured_ladder if args.cuda else ladder
        results = [make("sd15")] + ([make("sdxl")] if args.sdxl else [])
        for result in results:
            show(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
