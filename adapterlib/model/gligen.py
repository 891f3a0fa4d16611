"""The `gligen` variant: diffusers' own GLIGEN modules, trained by our loop on a frozen base.

GLIGEN (Li et al. 2023) puts a gated self-attention "fuser" in every transformer block, between its
self-attention and its cross-attention, and turns phrases + boxes into grounding tokens with a
"position net". diffusers ships both (`GatedSelfAttentionDense`, `GLIGENTextBoundingboxProjection`) inside
a `UNet2DConditionModel(attention_type="gated")`. This adapter holds exactly those modules, with diffusers'
parameter names, and lends them to a plain base UNet without editing it:

- each fuser is set on its `BasicTransformerBlock` as a plain attribute (`block.fuser`, not a registered
  submodule: the base's parameters, state_dict and `.to()` stay what they were), which is where diffusers'
  block looks for it;
- a forward pre-hook on each block passes `cross_attention_kwargs={"gligen": {"objs": tokens}}` during
  an `AdaptedUNet` forward only, so the block runs its own GLIGEN branch; outside it the block is the base's.

The fusers' gates are tanh(alpha_attn) and tanh(alpha_dense), both exactly 0 at init, so the adapted
UNet is the base at step 0. Our injection scale multiplies both gates (1.0: diffusers' maths, bit for bit).
Grounding tokens are always padded to GLIGEN's 30 slots (padding slots get the learned null features and,
as in GLIGEN, take part in the fuser's self-attention), so the same weights give the same tokens here and in
diffusers' `StableDiffusionGLIGENPipeline`. `adapterlib.interop.export` writes a run as that pipeline's folder;
`read_gligen_folder` reads one back (a released GLIGEN, to fine-tune or evaluate).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import GatedSelfAttentionDense
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from torch import nn

from adapterlib.model.hooks import HookedAdapter, transformer_blocks

SLOTS = 30                # diffusers' StableDiffusionGLIGENPipeline pads every prompt to 30 objects
MLP_WIDTH = 512           # GLIGENTextBoundingboxProjection's hidden width (fixed in diffusers)
FOURIER_FREQS = 8


class ScaledFuser(GatedSelfAttentionDense):
    """diffusers' fuser with the injection scale on its two gates (per sample: `scale` (B, 1, 1), set by the
    adapter's hook for the length of one forward; 1.0 is diffusers' forward exactly)."""

    scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale if self.scale is not None else x.new_ones(())
        n_visual = x.shape[1]
        objs = self.linear(objs).to(x.dtype)
        out = x + s * self.alpha_attn.tanh() * self.attn(self.norm1(torch.cat([x, objs], dim=1)))[:, :n_visual, :]
        out = out + s * self.alpha_dense.tanh() * self.ff(self.norm2(out))
        return out.to(x.dtype)


def check_widths(text_dim: int, token_dim: int, where: str = "this base") -> None:
    if text_dim != token_dim:
        raise ValueError(f"adapter_attention 'gligen' on {where}: the phrase embedding width (the text encoder's "
                         f"hidden_size, {text_dim}) differs from the UNet's cross_attention_dim ({token_dim}); "
                         "diffusers' GLIGEN position net takes phrase embeddings of the cross-attention width. "
                         "Use a base whose widths match (SD 1.x: 768 and 768) or another adapter_attention")


class GligenAdapter(HookedAdapter):
    """diffusers' GLIGEN modules as an adapter with `SpatialAdapter`'s interface (attach/detach, tokenizer,
    trainable/gate/fast parameters, gate_values, config, max_objects), so training, sampling, checkpoints,
    checks and evaluation take it unchanged. Parameters: `position_net.*` (diffusers' names) and
    `layers.<i>.*` (block i's fuser, diffusers' `<block>.fuser.*`)."""

    def __init__(self, unet, text_dim: int, *, attention: str = "gligen", norm: str = "layernorm",
                 feedforward: bool = True, max_objects: int = SLOTS, fourier_freqs: int = FOURIER_FREQS,
                 mlp_width: int | None = None, depth: str = "none", adapted_blocks: str = "all",
                 ff_mult: int = 4, subcell: bool = False):
        super().__init__()
        wrong = {k: v for k, v, ok in (("adapter_norm", norm, "layernorm"), ("adapter_feedforward", feedforward, True),
                                       ("adapter_depth", depth, "none"), ("fourier_freqs", fourier_freqs, FOURIER_FREQS),
                                       ("mlp_width", mlp_width or MLP_WIDTH, MLP_WIDTH), ("adapter_blocks", adapted_blocks, "all"),
                                       ("adapter_ff_mult", ff_mult, 4), ("adapter_subcell", subcell, False)) if v != ok}
        if attention != "gligen" or wrong:
            raise ValueError(f"adapter_attention 'gligen' is diffusers' GLIGEN as it is: {wrong} cannot be set for it "
                             "(leave them at their defaults: layernorm, feed-forward on at width 4, depth none, no "
                             "sub-cell map, every block)")
        if not 1 <= max_objects <= SLOTS:
            raise ValueError(f"max_objects = {max_objects}: GLIGEN has {SLOTS} object slots; give 1..{SLOTS}")
        blocks = transformer_blocks(unet)
        if not blocks:
            raise ValueError("this UNet has no transformer blocks: nothing to attach GLIGEN's fusers to")
        token_dim = unet.config.cross_attention_dim
        token_dim = token_dim[0] if isinstance(token_dim, (list, tuple)) else token_dim
        check_widths(text_dim, token_dim)
        self.config = dict(attention="gligen", norm=norm, feedforward=True, max_objects=max_objects,
                           fourier_freqs=FOURIER_FREQS, mlp_width=MLP_WIDTH, text_dim=text_dim, token_dim=token_dim,
                           blocks=list(blocks))
        self.block_names = list(blocks)
        self.max_objects = max_objects
        self.position_net = GLIGENTextBoundingboxProjection(positive_len=text_dim, out_dim=token_dim,
                                                            feature_type="text-only", fourier_freqs=FOURIER_FREQS)
        self.layers = nn.ModuleList(
            ScaledFuser(b.norm1.normalized_shape[0], token_dim, b.attn1.heads, b.attn1.inner_dim // b.attn1.heads)
            for b in blocks.values())
        self._blocks: list = []

    # --- grounding tokens: diffusers' position net over GLIGEN's 30 slots
    def tokenizer(self, g) -> torch.Tensor:
        """`Grounding` (B, N objects) -> (B, 30, token_dim) objs, as diffusers' UNet computes them from the
        GLIGEN pipeline's boxes, masks and phrase embeddings. A dropped phrase (keep_text False) becomes the
        learned null phrase, its box kept."""
        B, N = g.present.shape
        if N > SLOTS:
            raise ValueError(f"{N} objects: GLIGEN takes at most {SLOTS}")
        net = self.position_net
        pad = SLOTS - N
        phrases = torch.where((g.present & g.keep_text)[..., None], g.phrases.float(), net.null_positive_feature)
        return net(boxes=F.pad(g.boxes.float(), (0, 0, 0, pad)), masks=F.pad(g.present.float(), (0, pad)),
                   positive_embeddings=F.pad(phrases, (0, 0, 0, pad)))

    # --- which parameters train (all: HookedAdapter.trainable_parameters); the gates learn fast
    def gate_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.trainable_parameters().items() if n.endswith((".alpha_attn", ".alpha_dense"))}

    def fast_parameters(self) -> dict[str, nn.Parameter]:
        return self.gate_parameters()

    # --- attaching
    def _hook_blocks(self, blocks: dict) -> list:
        handles = []
        for fuser, block in zip(self.layers, blocks.values()):
            object.__setattr__(block, "fuser", fuser)     # a plain attribute: not in the base's parameters
            handles.append(block.register_forward_pre_hook(self._hook(fuser), with_kwargs=True))
            self._blocks.append(block)
        return handles

    def _unhook(self) -> None:
        for block in self._blocks:
            if block.__dict__.get("fuser") is not None:
                del block.__dict__["fuser"]
        self._blocks = []

    def _hook(self, fuser: ScaledFuser):
        def hook(block, args, kwargs):
            inj = self.injection
            if inj is None:             # not this adapter's forward: the block runs as the base's
                return None
            fuser.scale = inj.scale
            extra = dict(kwargs.get("cross_attention_kwargs") or {}, gligen={"objs": inj.tokens})
            return args, {**kwargs, "cross_attention_kwargs": extra}
        return hook

    def gate_values(self) -> dict[str, dict[str, float]]:
        rows = {}
        for name, fuser in zip(self.block_names, self.layers):
            a, d = fuser.alpha_attn.item(), fuser.alpha_dense.item()
            rows[name] = {"attn_raw": a, "attn": math.tanh(a), "ff_raw": d, "ff": math.tanh(d)}
        return rows

    # --- diffusers' key names
    def diffusers_names(self) -> dict[str, str]:
        """Our parameter name -> its key in a gated UNet's state_dict (`<block>.fuser.*`, `position_net.*`)."""
        out = {}
        for name in self.state_dict():
            if name.startswith("layers."):
                i, rest = name[len("layers."):].split(".", 1)
                out[name] = f"{self.block_names[int(i)]}.fuser.{rest}"
            else:
                out[name] = name
        return out


# ---------------------------------------------------------------------------------------------
# a diffusers GLIGEN folder (a pipeline folder with unet/, or a unet folder), read without running code

def gligen_unet_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    unet = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet / "config.json").is_file():
        raise FileNotFoundError(f"GLIGEN folder {folder}: no unet/config.json (nor config.json) in it; give a diffusers "
                                "GLIGEN folder (e.g. masterful/gligen-1-4-generation-text-box on disk)")
    return unet


def read_gligen_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the UNet config, the GLIGEN tensors: `position_net.*` and every `<block>.fuser.*`) of a diffusers
    GLIGEN folder; the frozen UNet's own weights are not read into memory. Refuses another architecture,
    a pickled .bin, and a folder without a position net, each naming the folder or key."""
    from safetensors import safe_open
    unet = gligen_unet_folder(folder)
    config = json.loads((unet / "config.json").read_text())
    kind = config.get("attention_type", "default")
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel" or kind != "gated":
        raise ValueError(f"{unet}/config.json: a {config.get('_class_name')} with attention_type {kind!r}, not diffusers' "
                         "GLIGEN (UNet2DConditionModel, attention_type 'gated'; 'gated-text-image' is not supported)")
    files = sorted(unet.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in unet.glob("*.bin"))
        raise ValueError(f"{unet}: no .safetensors weights" + (f"; {pickled} are pickled (loading them could run "
                         "code): refused. Convert them to safetensors where you trust them" if pickled else ""))
    tensors = {}
    for file in files:
        if file.name.endswith(".index.json"):
            continue
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.startswith("position_net.") or ".fuser." in key:
                    tensors[key] = f.get_tensor(key)
    if not any(k.startswith("position_net.") for k in tensors):
        raise ValueError(f"{unet}: no 'position_net.*' key in its weights: GLIGEN's position net is missing")
    if "position_net.null_positive_feature" not in tensors:
        raise ValueError(f"{unet}: no 'position_net.null_positive_feature': only the text-only GLIGEN is supported")
    return config, tensors


def load_gligen_weights(adapter: GligenAdapter, folder: str | Path) -> GligenAdapter:
    """Copy the fuser and position-net weights of a diffusers GLIGEN folder into `adapter` (built for the
    base they go on). The folder's cross-attention width and transformer blocks must match the base's."""
    if not isinstance(adapter, GligenAdapter):
        raise ValueError(f"init_from {folder}: a GLIGEN folder initialises adapter_attention 'gligen' only")
    config, tensors = read_gligen_folder(folder)
    width = config.get("cross_attention_dim")
    width = width[0] if isinstance(width, (list, tuple)) else width
    if width != adapter.config["token_dim"]:
        raise ValueError(f"{gligen_unet_folder(folder)}: cross_attention_dim {width} does not match the base's "
                         f"{adapter.config['token_dim']}: this GLIGEN was trained for another base architecture")
    names = adapter.diffusers_names()
    missing = sorted(v for v in names.values() if v not in tensors)
    if missing:
        raise ValueError(f"{gligen_unet_folder(folder)}: key {missing[0]!r} missing ({len(missing)} in all): its "
                         "transformer blocks do not match the base's")
    state = adapter.state_dict()
    for ours, theirs in names.items():
        if tensors[theirs].shape != state[ours].shape:
            raise ValueError(f"{gligen_unet_folder(folder)}: key {theirs!r} has shape {tuple(tensors[theirs].shape)}, "
                             f"the base needs {tuple(state[ours].shape)}")
    adapter.load_state_dict({ours: tensors[theirs].float() for ours, theirs in names.items()})
    return adapter


def gated_unet(base_unet, adapter: GligenAdapter):
    """A diffusers `UNet2DConditionModel(attention_type="gated")` holding the base UNet's weights and the
    adapter's fusers and position net (a copy: the base and the adapter are not touched)."""
    from diffusers import UNet2DConditionModel
    config = {k: v for k, v in base_unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "attention_type": "gated"})
    state = {k: v.detach().cpu() for k, v in base_unet.state_dict().items()}
    names = adapter.diffusers_names()
    state.update({names[k]: v.detach().cpu() for k, v in adapter.state_dict().items()})
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the gated UNet does not match the base + adapter: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return (unet if base_unet.dtype == torch.float32 else unet.to(base_unet.dtype)).eval()
