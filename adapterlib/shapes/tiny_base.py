"""The tiny Shapes base models: built from the real diffusers/transformers classes, trained on
captions only (placing objects is the adapter's job). Three families: the tiny UNet (`shapes-tiny`, the default),
the tiny MM-DiT (`shapes-dit`: an SD3 transformer in pixel space, two tiny CLIP encoders, flow matching) and the
tiny FLUX (`shapes-flux`: a FLUX transformer in pixel space, double- then single-stream blocks, a tiny CLIP for the
pooled vector and a tiny T5 for the caption's tokens, flow matching).

Used by notebooks/00_base_model.ipynb and by scripts/gpu_train_base.py. The recipe, and why:
- v-prediction on a cosine schedule, loss weighted min(1 + SNR, gamma) in x0 terms: every noise level
  keeps at least weight 1, so the high-noise steps where colour is decided are not starved (an
  epsilon-loss trial learned shapes but ignored the caption: the model card, adapterlib/models/shapes-tiny/README.md);
- the text encoder trains jointly (it is ours and tiny); 10% empty captions for guidance;
- an EMA of the weights is what gets saved.
The tiny DiT (`family="dit"`) and the tiny FLUX (`family="flux"`) train with SD3's objective instead, rectified flow (the velocity noise - x0 at
sigma drawn uniformly: a pixel-space model decides colours at high noise, which a logit-normal density rarely
draws), unweighted, as diffusers' SD3 training example with weighting "none"; the rest as above.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel)

from adapterlib.model.base import BaseModel, load_base
from . import world as shapes


@dataclass
class PretrainConfig:
    steps: int = 20_000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.01
    caption_dropout: float = 0.1     # share of empty captions, for classifier-free guidance
    snr_gamma: float = 5.0           # cap on the x0-space loss weight 1 + SNR
    ema_decay: float = 0.999
    n_images: int = 200_000          # training layouts: seeds 0 .. n_images - 1 (held-out ones are >= 10M)
    world: str = "mix"               # the layouts: "shapes" (the first world), "shapes-v2" (1-6 objects, overlaps,
                                     # smaller sides) or "mix" (half the seeds in each: the shipped base's)
    init_from: str = ""              # "" trains from scratch; a base name/folder fine-tunes it (its UNet and text encoder)
    family: str = "unet"             # "unet" (the tiny UNet, shapes-tiny), "dit" (the tiny MM-DiT, shapes-dit) or
                                     # "flux" (the tiny FLUX, shapes-flux)
    seed: int = 0
    mixed_precision: str = "bf16"    # on CUDA; CPU always runs fp32
    log_every: int = 200

    def __post_init__(self):
        for name in ("steps", "batch_size", "warmup", "n_images", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} = {getattr(self, name)} must be >= 1")
        if self.family not in BUILDERS:
            raise ValueError(f"PretrainConfig.family = {self.family!r}: choose one of {list(BUILDERS)}")
        if self.world not in BASE_WORLDS:
            raise ValueError(f"PretrainConfig.world = {self.world!r}: choose one of {list(BASE_WORLDS)}")


# The layouts a base trains on: (options of each part of the seeds): a Shapes world's training options, or "mix",
# the first half of the seeds in the first world and the rest in the v2 world.
BASE_WORLDS = {**{name: (w.training,) for name, w in shapes.WORLDS.items()},
               "mix": (shapes.WORLDS["shapes"].training, shapes.WORLDS["shapes-v2"].training)}


def render_world(world: str, n: int):
    """Images (n, H, W, 3) uint8 and records of seeds 0..n-1 drawn in `world` (BASE_WORLDS)."""
    parts = BASE_WORLDS[world]
    bounds = [n * i // len(parts) for i in range(len(parts) + 1)]
    rendered = [shapes.render_batch(range(lo, hi), options=o) for o, lo, hi in zip(parts, bounds, bounds[1:])]
    return np.concatenate([r[0] for r in rendered]), [rec for r in rendered for rec in r[1]]


def loss_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weight on the v-loss so that the effective x0-space weight is min(1 + SNR, gamma)."""
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
    snr_plus_one = 1 / (1 - alpha_bar)                       # 1 + SNR; v-loss = (1 + SNR) * x0-loss
    return snr_plus_one.clamp(max=gamma) / snr_plus_one


def train_base(cfg: PretrainConfig, out_dir: str | Path, device: str = "cpu", log=print) -> BaseModel:
    """Train a fresh tiny base for `cfg.steps` steps; save the EMA weights to `out_dir`."""
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    if cfg.init_from:
        base = load_base(cfg.init_from, device=device)
        for module in base.modules():
            module.requires_grad_(True).train()
    else:
        base = BUILDERS[cfg.family](cfg.seed).to(device)
    unet, text_encoder, scheduler = base.unet, base.text_encoder, base.scheduler
    params = [p for module in base.modules() for p in module.parameters()]
    ema = [p.detach().clone() for p in params]

    # --- data: the whole training set rendered once, kept on the device as uint8
    t0 = time.perf_counter()
    images, records = render_world(cfg.world, cfg.n_images)
    images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()   # (N, 3, H, W) uint8
    captions = base.tokenize([r.caption for r in records])                        # (N, L)
    empty = base.tokenize([""])                                                    # (1, L)
    log(f"rendered {cfg.n_images} training images in {time.perf_counter() - t0:.1f} s")

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    amp = device.startswith("cuda") and cfg.mixed_precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    gen = torch.Generator(device).manual_seed(cfg.seed)
    history, t_start = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        # --- batch: images in [-1, 1], captions with 10% dropped to empty
        idx = torch.randint(0, cfg.n_images, (cfg.batch_size,), device=device, generator=gen)
        x0 = images[idx].float() / 127.5 - 1
        ids = captions[idx]
        drop = torch.rand(cfg.batch_size, device=device, generator=gen) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty, ids)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), device=device, generator=gen)
        if base.is_flow:
            # --- forward (the DiT): rectified flow, the velocity target, unweighted
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
                texts = ["" if d else records[i].caption for i, d in zip(idx.tolist(), drop.tolist())]
                context, pooled = base.encode_text(texts)
                noisy, target, net_t = base.noised(x0, noise, t)
                pred = base.predict(noisy, net_t, context, base.added_cond(pooled))
            loss = F.mse_loss(pred.float(), target)
        else:
            # --- forward: v-prediction, SNR-capped weights
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
                pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample
            target = scheduler.get_velocity(x0, noise, t)
            per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * loss_weights(scheduler, t, cfg.snr_gamma)).mean()
        # --- update and EMA
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg.ema_decay)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = dict(step=step, loss=loss.item(), lr=sched.get_last_lr()[0], wall_s=time.perf_counter() - t_start)
            history.append(row)
            log(json.dumps(row))

    # --- save the EMA weights as the base
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    base.path = str(out_dir)
    base.to("cpu").save(out_dir)
    (out_dir / "training.json").write_text(json.dumps(
        dict(config=asdict(cfg), device=device, train_seconds=time.perf_counter() - t_start, history=history), indent=1))
    return base.freeze()


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
    # and layout are decided (an epsilon loss gives them almost none: the tiny model then learns shapes
    # but ignores the caption; the model card, adapterlib/models/shapes-tiny/README.md)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    return BaseModel(unet=UNet2DConditionModel(**tiny_unet_config()), text_encoder=CLIPTextModel(text_config),
                     tokenizer=tokenizer, scheduler=scheduler, vae=None, path="(untrained tiny base)")


def tiny_dit_config(resolution: int = shapes.RESOLUTION, layers: int = 6, width: int = 128) -> dict:
    """Pixel-space SD3 transformer: 2x2 patches (a 16x16 token grid at 32 px), `layers` joint blocks of `width`
    (heads of 32), the caption's tokens projected to the same width."""
    return dict(sample_size=resolution, patch_size=2, in_channels=3, out_channels=3, num_layers=layers,
                attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=2 * TEXT_WIDTH,
                caption_projection_dim=width, pooled_projection_dim=2 * TEXT_WIDTH,
                pos_embed_max_size=resolution // 2)


TEXT_WIDTH = 64     # each tiny CLIP's width and projection


def build_tiny_dit(seed: int = 0) -> BaseModel:
    """A freshly initialised tiny MM-DiT: SD3's architecture (`SD3Transformer2DModel`, two CLIP encoders with
    projection, no T5 and no T5 tokens: `t5_tokens` 0, flow matching) in pixel space, the Shapes tokenizer."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)) for _ in range(2)]
    return BaseModel(unet=None, transformer=SD3Transformer2DModel(**tiny_dit_config()),
                     text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                     tokenizer_2=build_tokenizer(), t5_tokens=0,
                     scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                     vae=None, path="(untrained tiny DiT)")


def tiny_flux_config(double: int = 2, single: int = 4, width: int = 128) -> dict:
    """Pixel-space FLUX transformer: 2x2 patches of the RGB image (12 inputs: a 16x16 token grid at 32 px), `double`
    double-stream then `single` single-stream blocks (FLUX.1's ratio, 19 : 38) of `width` (heads of 32, rotary axes
    4 + 14 + 14 = 32 as FLUX's 16 + 56 + 56 = 128), the T5's tokens and the CLIP's pooled vector 64 wide, no
    guidance input (trained with caption dropout for classifier-free guidance, like the tiny DiT)."""
    return dict(patch_size=1, in_channels=12, out_channels=12, num_layers=double, num_single_layers=single,
                attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=TEXT_WIDTH,
                pooled_projection_dim=TEXT_WIDTH, guidance_embeds=False, axes_dims_rope=(4, 14, 14))


def build_tiny_flux(seed: int = 0) -> BaseModel:
    """A freshly initialised tiny FLUX: FLUX.1's architecture (`FluxTransformer2DModel`: 2 double- + 4 single-stream
    blocks, a CLIP text encoder whose pooled output is the pooled vector, a T5 encoder whose states are the caption's
    32 tokens, flow matching) in pixel space, the Shapes tokenizer for both encoders. The schedule's shift is fixed at
    1.0, the tiny DiT's (FLUX's resolution-dependent shift would give 1.65 at 256 tokens: toward the noise, where a
    pixel-space model already decides colours)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_ff=2 * TEXT_WIDTH, num_layers=2,
                                 num_heads=4, d_kv=TEXT_WIDTH // 4, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    return BaseModel(unet=None, transformer=FluxTransformer2DModel(**tiny_flux_config()), text_encoder=clip,
                     tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=build_tokenizer(), t5_tokens=MAX_TOKENS,
                     sample_size=shapes.RESOLUTION,
                     scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                     vae=None, path="(untrained tiny FLUX)")


BUILDERS = {"unet": build_tiny_base, "dit": build_tiny_dit, "flux": build_tiny_flux}
