"""The bench's workloads: the frozen network of each size and one seeded batch of its inputs, shared by every row of
`bench.run_bench` (and by the memory and cost scripts).

    w = make_workload("tiny", batch=16, objects=3)     # the shipped base, pixel space 32x32
    w = make_workload("sd15", device="cuda")          # a random-weight SD 1.5-size UNet, 64x64 latents

The sizes' networks are built from their released configs with random weights (`sd15_unet_config`,
`sdxl_unet_config`, `sd3_transformer_config`, `flux_transformer_config`): a step's cost depends on the shapes, not
the weights. FLUX.1-dev (`flux`) is 11.9 B parameters, 48 GB in fp32: on the CPU its network is built at a reduced depth and side
unless told (`depth`, `side`: by default 1 double- + 2 single-stream blocks of its 19 + 38, FLUX's 1:2, and 32x32
latents, 256 px), everything else FLUX.1-dev's (width 3,072, 24 heads of 128, 2x2 patches of 16 channels, 512 T5
tokens of 4,096, the 768-wide pooled CLIP vector, the guidance input); the result's `size_note` says which. The block
choices then keep their places in the shorter stack (`adapter.select_blocks`). `depth` reduces sd3 the same way
(`num_layers`; no default reduction there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from adapterlib.model.adapter import Grounding
from adapterlib.model.base import FLUX_GUIDANCE, FLUX_SAMPLE_SIZE, FLUX_T5_TOKENS, load_base
from adapterlib.model.precision import autocast, precision_policy, resolve_device
from adapterlib.training.config import BENCH_SIZES

SIZES = tuple(BENCH_SIZES)
DEFAULT_OBJECTS = {"tiny": 3, "sd15": 30, "sdxl": 30, "sd3": 30, "flux": 30}          # grounding slots per sample
PRESENT_SHARE = {"tiny": 1.0, "sd15": 0.3, "sdxl": 0.3, "sd3": 0.3, "flux": 0.3}   # share of the slots holding an object


@dataclass
class Workload:
    """The frozen network, one batch of inputs and where it all runs: shared by every row."""
    size: str
    device: torch.device
    unet: nn.Module                  # the frozen network (UNet or MM-DiT), in the compute dtype
    amp: torch.dtype | None          # autocast dtype (None on the CPU)
    text_dim: int                    # our adapter's phrase-embedding width (the text encoder's)
    noisy: torch.Tensor              # (B, C, h, w)
    t: torch.Tensor                  # (B,): UNet integer steps in [0, 1000); MM-DiT floats in [0, 1000) (sigma * 1000)
    context: torch.Tensor            # (B, L, cross_attention_dim | joint_attention_dim)
    target: torch.Tensor             # (B, C, h, w)
    grounding: Grounding             # phrases (B, N, text_dim), boxes, present
    peer_phrases: torch.Tensor | None  # (B, N, cross_attention_dim): diffusers' position_net's width; None: no peer
    scale: torch.Tensor              # (B,) injection scale per sample, drawn as training draws it
    base: object | None = None       # the loaded BaseModel (tiny), for the train_step row
    added: dict | None = None        # the UNet's added_cond_kwargs (SDXL: pooled text_embeds, time_ids); the
                                     # MM-DiT's keyword inputs (pooled_projections; FLUX.1-dev's also guidance)
    note: str | None = None          # how the network differs from the size's real one (a reduced depth or side)

    @property
    def batch(self) -> int:
        return len(self.noisy)

    @property
    def is_dit(self) -> bool:
        """An MM-DiT (SD3's or FLUX's): no GLIGEN peer, float timesteps, joint context."""
        return isinstance(self.unet, (SD3Transformer2DModel, FluxTransformer2DModel))

    @property
    def is_flux(self) -> bool:
        return isinstance(self.unet, FluxTransformer2DModel)

    def autocast(self):
        return autocast(self.device, self.amp)


def sd15_unet_config() -> dict:
    """Stable Diffusion 1.5's UNet (diffusers' defaults are its widths and blocks), 64x64 latents."""
    return dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet_config() -> dict:
    """Stable Diffusion XL base's UNet (its released config: 70 transformer blocks, 2048-wide context,
    text_time added conditioning of 6 ids x 256 + a 1280-wide pooled text embedding), 128x128 latents."""
    return dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


SDXL_POOLED = 1280        # text_encoder_2's projection: SDXL's text_embeds, and our phrase width on SDXL


def sd3_transformer_config() -> dict:
    """Stable Diffusion 3 medium's MM-DiT (its released transformer config: 24 joint blocks of 24 x 64 = 1536, 2x2
    patches of 16-channel latents, 4096-wide T5 / CLIP context, 2048-wide pooled CLIP projections), 128x128 latents."""
    return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192)


SD3_POOLED = 2048         # both CLIPs' pooled projections (768 + 1280): our phrase width on SD3
SD3_CONTEXT = 77 + 256    # SD3's context tokens: the CLIPs' 77, then T5's 256


def flux_transformer_config() -> dict:
    """FLUX.1-dev's transformer (its released config: 19 double-stream then 38 single-stream blocks of 24 x 128 =
    3,072, 2x2 patches of 16-channel latents packed to 64 inputs, 4,096-wide T5 context, the 768-wide pooled CLIP
    vector, guidance-distilled, rotary axes 16 + 56 + 56 = 128). Its config has no sample size: 128x128 latents
    (1,024 px, FluxPipeline's default)."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


FLUX_POOLED = 768             # CLIP-L's pooled vector: FLUX's pooled_projections, and our phrase width on FLUX
FLUX_CPU_DEPTH = 1            # on the CPU, unless told: 1 double- + 2 single-stream blocks (FLUX.1-dev: 19 + 38) ...
FLUX_CPU_SIDE = 32            # ... and 32x32 latents (256 px: 256 image tokens beside the 512 T5 tokens)


def reduced_config(size: str, config: dict, depth: int | None) -> dict:
    """`config` at `depth`: sd3's `num_layers` joint blocks; flux's `depth` double- and 2 x `depth` single-stream
    blocks (FLUX.1's 1:2). None: as it is."""
    if depth is None:
        return config
    if size == "flux":
        return {**config, "num_layers": depth, "num_single_layers": 2 * depth}
    return {**config, "num_layers": depth}


def make_workload(size: str = "tiny", device: str | torch.device = "auto", batch: int = 16,
                  objects: int | None = None, seed: int = 0, side: int | None = None,
                  depth: int | None = None) -> Workload:
    """The frozen network of `size` and one seeded batch: `tiny` is the shipped base (pixel space 32x32),
    `sd15` a random-weight SD 1.5-size UNet (64x64 latents, 77 context tokens, 30 slots ~30% present), `sdxl`
    a random-weight SDXL-size UNet (128x128 latents, 77 tokens of 2048, its pooled text embedding and size /
    crop ids for 1024 px, 30 slots ~30% present; our phrases are 1280 wide, encoder 2's pooled output), `sd3` a
    random-weight SD3-medium MM-DiT (128x128 16-channel latents, 77 + 256 tokens of 4096, a 2048-wide pooled
    projection, float timesteps in [0, 1000), 30 slots ~30% present; our phrases are 2048 wide, both CLIPs' pooled).
    `side`: the latents' side for sd15 / sdxl / sd3 instead of the base's own (64 / 128 / 128), e.g. SDXL at 64 (512
    px) where a 1024-px step does not fit in memory, as on a 24 GB CPU machine: the ratios then hold at that side
    only. `flux` a random-weight FLUX.1-dev transformer (128x128 16-channel latents, which `base.predict` packs into
    2x2 patches with their rotary ids; 512 T5 tokens of 4096; pooled_projections the 768-wide CLIP vector and the
    guidance input 3.5; float timesteps in [0, 1000); 30 slots ~30% present; our phrases are 768 wide, CLIP's), on
    the CPU at FLUX_CPU_DEPTH and FLUX_CPU_SIDE unless `depth` / `side` are given (the workload's `note` says so).
    `depth`: sd3's joint blocks, or flux's double-stream blocks (and twice as many single-stream ones)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {SIZES}")
    if batch < 1:
        raise ValueError(f"batch {batch}: give at least 1")
    objects = DEFAULT_OBJECTS[size] if objects is None else objects
    if objects < 1:
        raise ValueError(f"objects {objects}: give at least 1")
    if side is not None and (size == "tiny" or side < 8 or side % 8):
        raise ValueError(f"side {side}: " + ("the shipped tiny base has its own (32 px)" if size == "tiny" else
                                             "give a latent side that is a multiple of 8 (64: 512 px)"))
    if depth is not None and (size not in ("sd3", "flux") or depth < 1):
        raise ValueError(f"depth {depth}: " + ("give at least 1 block" if size in ("sd3", "flux") else
                                               "a reduced depth is an MM-DiT's (sd3, flux), a stack of blocks"))
    device = resolve_device(device)
    note, defaulted = None, []
    if size == "flux" and device.type == "cpu":       # 48 GB in fp32: the CPU builds a shorter, smaller-side FLUX
        defaulted = [flag for flag, value in (("--depth", depth), ("--side", side)) if value is None]
        depth = FLUX_CPU_DEPTH if depth is None else depth
        side = FLUX_CPU_SIDE if side is None else side
    if depth is not None or (size == "flux" and side not in (None, FLUX_SAMPLE_SIZE)):
        full = {"sd3": sd3_transformer_config, "flux": flux_transformer_config}.get(size, dict)()
        shape = reduced_config(size, full, depth)
        blocks = (f"{shape['num_layers']} double- + {shape['num_single_layers']} single-stream blocks of "
                  f"{full['num_layers']} + {full['num_single_layers']}" if size == "flux" else
                  f"{shape['num_layers']} of {full['num_layers']} joint blocks" if size == "sd3" else "")
        at = side or (FLUX_SAMPLE_SIZE if size == "flux" else full["sample_size"])
        note = (f"reduced {size}: {blocks + ', ' if depth is not None else ''}latents {at}x{at} "
                f"({8 * at} px); every other setting the real network's"
                + (f" (the CPU's default, not given: {', '.join(defaulted)})" if defaulted else ""))
    compute_dtype, amp, _ = precision_policy(device, "bf16")
    torch.manual_seed(seed)
    if size == "tiny":
        base = load_base("shapes-tiny", device, dtype=compute_dtype)
        unet, text_dim, context_len = base.unet, base.text_encoder.config.hidden_size, base.tokenizer.model_max_length
    else:
        with torch.device(device):
            config = reduced_config(size, {"sd15": sd15_unet_config, "sdxl": sdxl_unet_config, "sd3": sd3_transformer_config,
                                           "flux": flux_transformer_config}[size](), depth)
            kind = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}.get(size, UNet2DConditionModel)
            unet = kind(**config) if size == "flux" else kind(**{**config, "sample_size": side or config["sample_size"]})
        if compute_dtype != torch.float32:
            unet = unet.to(dtype=compute_dtype)
        unet = unet.requires_grad_(False).eval()
        base = None
        text_dim, context_len = {"sd15": (768, 77), "sdxl": (SDXL_POOLED, 77), "sd3": (SD3_POOLED, SD3_CONTEXT),
                                 "flux": (FLUX_POOLED, FLUX_T5_TOKENS)}[size]
    cfg = unet.config
    dit = isinstance(unet, (SD3Transformer2DModel, FluxTransformer2DModel))
    flux = isinstance(unet, FluxTransformer2DModel)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    B, N = batch, objects
    channels = cfg.in_channels // 4 if flux else cfg.in_channels     # FLUX: (B, 16, h, w), packed 2x2 in predict
    out_channels = channels if flux else cfg.out_channels
    side = (side or FLUX_SAMPLE_SIZE) if flux else cfg.sample_size
    xy = rand(B, N, 2) * 0.7
    boxes = torch.cat([xy, xy + 0.1 + rand(B, N, 2) * 0.2], dim=-1).clamp(max=1.0)
    present = rand(B, N) < PRESENT_SHARE[size]
    present[:, 0] = True                                     # every sample has at least one object
    phrases = torch.randn(B, N, text_dim, generator=gen)
    ctx_dim = cfg.joint_attention_dim if dit else cfg.cross_attention_dim
    peer_phrases = None if dit else phrases if ctx_dim == text_dim else torch.randn(B, N, ctx_dim, generator=gen)
    grounding = Grounding(phrases=phrases.to(device), boxes=boxes.to(device), present=present.to(device),
                          keep_text=torch.ones(B, N, dtype=torch.bool, device=device))
    added = _sdxl_added(unet, B, gen, device) if size == "sdxl" else \
        {"pooled_projections": torch.randn(B, cfg.pooled_projection_dim, generator=gen).to(device)} if dit else None
    if flux and cfg.guidance_embeds:              # FLUX.1-dev: the guidance value is an input (BaseModel.added_cond)
        added["guidance"] = torch.full((B,), FLUX_GUIDANCE, device=device)
    return Workload(
        size=size, device=device, unet=unet, amp=amp, text_dim=text_dim,
        noisy=torch.randn(B, channels, side, side, generator=gen).to(device),
        t=(rand(B) * 1000 if dit else torch.randint(0, 1000, (B,), generator=gen)).to(device),
        context=torch.randn(B, context_len, ctx_dim, generator=gen).to(device),
        target=torch.randn(B, out_channels, side, side, generator=gen).to(device),
        grounding=grounding, peer_phrases=None if peer_phrases is None else peer_phrases.to(device),
        scale=(0.5 + 0.5 * rand(B)).to(device), base=base, added=added, note=note)


def _sdxl_added(unet, batch: int, gen: torch.Generator, device) -> dict:
    """SDXL's added conditioning for a batch: random pooled embeddings, the size / crop ids of 1024 px images."""
    side = unet.config.sample_size * 8
    ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(batch, 6)
    return {"text_embeds": torch.randn(batch, SDXL_POOLED, generator=gen).to(device), "time_ids": ids.to(device)}
