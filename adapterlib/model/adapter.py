"""The spatial adapter: phrases + boxes -> grounding tokens -> a gated layer after each chosen transformer block.

GLIGEN's maths, arranged so the frozen UNet is never edited: each gated layer is attached with a
forward hook on a diffusers `BasicTransformerBlock` (tiny default, SD 1.x/2.x, SDXL alike) and adds

    x <- x + scale * tanh(gate_attn) * Attn(norm(x), grounding tokens)
    x <- x + scale * tanh(gate_ff)   * FF(norm(x))                      (optional)

to the block's output. Gates start at exactly 0, so at step 0 the adapted model *is* the base model.
Gates are bounded with tanh (as GLIGEN): the effective gate stays in (-1, 1) whatever the learning
rate, and the raw values are always exposed, since a raw gate above 1.0 is the training plan's
over-activation signal (tanh(1) = 0.76: the gate is saturating).

Which blocks get a layer (`blocks`, `select_blocks`): "all" (GLIGEN's placement), "decoder" (the mid block and
the up blocks), "low" (blocks at a quarter of the input's side or less), "migc" (the mid block and the first up
block with transformer blocks), or a comma list of block names / prefixes ("mid_block,up_blocks.1"). A block
without a layer carries no hook; when no block before the first adapted one has a layer, nothing there needs a
gradient, so the backward pass stops at the first adapted block (the frozen base's weights never need one).

Attention variants (`attention`):
- "self":   GLIGEN's gated self-attention over [visual; grounding] tokens, visual part kept;
- "cross":  visual tokens attend to the grounding tokens (cheaper at high resolution);
- "masked": cross-attention where a visual token sees only the objects whose box covers it
            (InstanceDiffusion / MIGC's region prior). Cross variants also see a learned
            "nothing here" token, so a token outside every box has somewhere to attend.

Sub-cell geometry (`subcell`, masked only): a box edge seldom falls on a cell's edge, and without it every cell a
box touches gets the same value from the box's token, so an object fills whole cells (on a 16x16 grid over 32 px,
edges drawn up to a pixel outside the box). With it, the value a cell takes from an object's token also carries
the part of the cell the box covers: the box clipped to the cell, in the cell's own coordinates, as Fourier
features through a learned per-head map (`cell_cover`). A fully covered cell reads (0, 0, 1, 1), a cell whose left
half lies outside the box (0.5, 0, 1, 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from adapterlib.data.manifest import Record
from adapterlib.model.gligen import GligenAdapter
from adapterlib.model.base import predict
from adapterlib.model.hooks import (HookedAdapter, block_heads, block_width, image_tokens, transformer_blocks,
                                    with_image_tokens)
from adapterlib.options import (ARCHITECTURE, ATTENTIONS, BLOCK_CHOICES, DEPTHS, MAX_OBJECTS, NORMS,
                                check_attention_options)

# How a visual token inside several boxes picks (masked attention): "none" lets it attend to every box covering
# it; "smaller-front" keeps only the smallest-area box covering it, the depth rule "smaller objects in front"
# (the harder Shapes world's, and a common one in photographs: a cup on a table, a rider on a horse).
# "learned" is the soft form: each head of each layer has a learned weight on the covering box's -log(area) in its
# attention logits, zero at init (no preference), so training decides whether (and how much) smaller boxes win.
# (The lists of choices are in adapterlib/options.py.)

CELL_FREQS = 4           # Fourier frequencies of the sub-cell map's input (a box clipped to a cell, in [0, 1])


def zero_gate() -> nn.Parameter:
    """A scalar gate initialised to exactly zero: the layer starts as the identity."""
    return nn.Parameter(torch.zeros(()))


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"adapter_norm {kind!r}: choose one of {NORMS}")
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


def fourier_embed(boxes: torch.Tensor, freqs: int) -> torch.Tensor:
    """(B, N, 4) xyxy in [0, 1] -> (B, N, 4 * 2 * freqs) sin/cos features (GLIGEN: 8 frequencies)."""
    bands = (2.0 ** torch.arange(freqs, device=boxes.device)) * math.pi       # (F,)
    angles = boxes[..., None].float() * bands                                 # (B, N, 4, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


@dataclass(frozen=True)
class BatchPart:
    """Records that are rows `start`.. of a global batch of `size` records whose largest has `objects`
    objects (training on several processes: each holds a part of the batch, `distributed.Shard.part`).
    Phrase dropout is then drawn for the whole batch and this part's rows kept, so the parts together draw
    exactly what the whole batch draws on one process."""
    start: int
    size: int
    objects: int


@dataclass
class Grounding:
    """What one UNet batch is grounded on: per sample, up to N objects (padded), each a phrase
    embedding and a box. Built by `Grounding.from_records` from phrase embeddings computed elsewhere
    (the frozen text encoder, or a cache of its outputs): the adapter never calls the text encoder."""
    phrases: torch.Tensor    # (B, N, D) phrase embeddings (the text encoder's pooled EOS state)
    boxes: torch.Tensor      # (B, N, 4) xyxy in [0, 1]
    present: torch.Tensor    # (B, N) bool: a real object (False: padding)
    keep_text: torch.Tensor  # (B, N) bool: False where phrase dropout replaced the phrase by the null one

    @classmethod
    def from_records(cls, records: list[Record], phrase_embeddings: torch.Tensor, *, max_objects: int = MAX_OBJECTS,
                     phrase_dropout: float = 0.0, generator: torch.Generator | None = None,
                     part: BatchPart | None = None, pad_to: int | None = None) -> "Grounding":
        """`phrase_embeddings` (total, D): one row per object of `records`, in order. Padded to the
        batch's largest object count, or to `pad_to` slots (every batch the same shape: what a compiled
        model needs); phrase dropout draws from `generator` (on the CPU), for the whole global batch when the
        records are a `part` of one."""
        counts = [len(r.objects) for r in records]
        most = max(1, max(counts, default=0))
        if most > max_objects:
            raise ValueError(f"a record has {most} objects; this adapter takes at most {max_objects}")
        n = most if pad_to is None else pad_to
        if n < most:
            raise ValueError(f"a record has {most} objects, more than the {pad_to} slots asked for")
        if len(phrase_embeddings) != sum(counts):
            raise ValueError(f"{len(phrase_embeddings)} phrase embeddings for {sum(counts)} objects")
        B, device = len(records), phrase_embeddings.device
        out = cls(phrases=torch.zeros(B, n, phrase_embeddings.shape[-1], device=device),
                  boxes=torch.zeros(B, n, 4, device=device),
                  present=torch.zeros(B, n, dtype=torch.bool, device=device),
                  keep_text=torch.ones(B, n, dtype=torch.bool, device=device))
        i = 0
        for b, (r, k) in enumerate(zip(records, counts)):
            out.phrases[b, :k] = phrase_embeddings[i:i + k].float()
            out.boxes[b, :k] = torch.tensor([o.box for o in r.objects], device=device).reshape(k, 4)
            out.present[b, :k] = True
            i += k
        if phrase_dropout > 0:
            if part is None:
                draw = torch.rand(B, n, generator=generator)
            else:
                draw = torch.rand(part.size, max(part.objects, n), generator=generator)[part.start:part.start + B, :n]
            out.keep_text = draw.to(device) >= phrase_dropout
        return out

    def rows(self, rows: slice) -> "Grounding":
        """These rows of the batch (a micro-batch of gradient accumulation), with the batch's slot count."""
        return Grounding(self.phrases[rows], self.boxes[rows], self.present[rows], self.keep_text[rows])

    def repeat(self, times: int) -> "Grounding":
        """The batch repeated `times` (e.g. twice for the unconditional and conditional halves of CFG)."""
        return Grounding(*(t.repeat(times, *[1] * (t.dim() - 1)) for t in
                           (self.phrases, self.boxes, self.present, self.keep_text)))


@dataclass
class Injection:
    """What the gated layers act on during one forward of `AdaptedUNet` (None outside a forward)."""
    tokens: torch.Tensor                 # (B, N, T) grounding tokens
    present: torch.Tensor                # (B, N) bool
    boxes: torch.Tensor                  # (B, N, 4)
    scale: torch.Tensor                  # (B, 1, 1) injection scale per sample
    sample_hw: tuple[int, int]           # the UNet input's spatial size (to place each block's tokens)
    regions: dict = field(default_factory=dict)   # token count -> (B, L, N) region mask, built once per forward
    cells: dict = field(default_factory=dict)     # token count -> (B, L, N, F) Fourier features of each box in each cell

    def region(self, n_tokens: int, depth: str = "none") -> torch.Tensor:
        depth = "smaller-front" if depth == "smaller-front" else "none"    # only the hard rule changes the mask
        if (n_tokens, depth) not in self.regions:
            region = region_mask(self.boxes, *token_grid(self.sample_hw, n_tokens))
            self.regions[n_tokens, depth] = region if depth == "none" else front_only(region, self.boxes, self.present)
        return self.regions[n_tokens, depth]

    def cell_features(self, n_tokens: int) -> torch.Tensor:
        """The sub-cell map's input on a grid of `n_tokens`, built once per forward (every layer's backward shares it)."""
        if n_tokens not in self.cells:
            self.cells[n_tokens] = cell_features(self.boxes, *token_grid(self.sample_hw, n_tokens))
        return self.cells[n_tokens]


class GroundingTokenizer(nn.Module):
    """Phrase embedding + Fourier(box) -> MLP -> one grounding token per object (GLIGEN's position_net).
    Padding slots and dropped phrases use learnable null embeddings."""

    def __init__(self, text_dim: int, token_dim: int, width: int, freqs: int = 8):
        super().__init__()
        self.freqs = freqs
        self.null_text = nn.Parameter(torch.zeros(text_dim))
        self.null_box = nn.Parameter(torch.zeros(4 * 2 * freqs))
        self.mlp = nn.Sequential(nn.Linear(text_dim + 4 * 2 * freqs, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, token_dim))

    def forward(self, g: Grounding) -> torch.Tensor:
        text = torch.where((g.present & g.keep_text)[..., None], g.phrases.float(), self.null_text)
        box = torch.where(g.present[..., None], fourier_embed(g.boxes, self.freqs), self.null_box)
        return self.mlp(torch.cat([text, box], dim=-1))                      # (B, N, token_dim)


class GatedLayer(nn.Module):
    """One gated grounding layer for a transformer block of width `dim`."""

    def __init__(self, dim: int, token_dim: int, heads: int, attention: str, norm: str, feedforward: bool,
                 depth: str = "none", ff_mult: int = 4, subcell: bool = False):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"adapter_attention {attention!r}: choose one of {ATTENTIONS}")
        if depth not in DEPTHS:
            raise ValueError(f"adapter_depth {depth!r}: choose one of {DEPTHS}")
        check_attention_options(attention, depth, subcell)
        self.attention, self.heads, self.depth = attention, heads, depth
        self.to_objects = nn.Linear(token_dim, dim)
        self.norm = make_norm(norm, dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.nothing = nn.Parameter(torch.zeros(1, 1, dim)) if attention != "self" else None
        self.gate_attn = zero_gate()
        self.ff = nn.Sequential(make_norm(norm, dim), nn.Linear(dim, ff_mult * dim), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim)) if feedforward else None
        self.gate_ff = zero_gate() if feedforward else None
        self.depth_bias = nn.Parameter(torch.zeros(heads)) if depth == "learned" else None
        # the sub-cell map: per head, Fourier features of the covered part of a cell -> that head's value width
        features = 4 * 2 * CELL_FREQS
        self.cell_value = nn.Parameter(torch.empty(heads, features, dim // heads).uniform_(
            -features ** -0.5, features ** -0.5)) if subcell else None

    def _attend(self, q_in, kv_in, allowed, key_bias=None, cells=None):
        # allowed: (B, Lq or 1, Lk) bool; key_bias (B, Lk); cells (B, Lq, N, F): the last N keys' `cell_features`
        B, Lq, C = q_in.shape
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, L, C/h)
        mask = allowed[:, None]
        if key_bias is not None:                                  # per head: depth_bias[h] * key_bias, -inf where not allowed
            bias = self.depth_bias[None, :, None, None].to(q_in.dtype) * key_bias[:, None, None, :].to(q_in.dtype)
            mask = torch.where(mask, bias, torch.tensor(float("-inf"), dtype=q_in.dtype, device=q_in.device))
        q, k, v = split(self.q(q_in)), split(self.k(kv_in)), split(self.v(kv_in))
        if cells is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:   # the attention weights are needed twice: for the values, and for each key's sub-cell features.
            # Keys first, (B, h, Lk, Lq): a softmax over a few keys runs several times faster along a middle
            # dimension than along the last (and this whole path faster than scaled_dot_product_attention on a CPU)
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            logits = k @ q.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask.transpose(-1, -2)
            weights = torch.softmax(logits, dim=-2)                                                # (B, h, Lk, Lq)
            covered = torch.einsum("bhkq,bqkf->bhqf", weights[:, :, -cells.shape[2]:], cells.to(q.dtype))
            out = weights.transpose(-1, -2) @ v + torch.einsum("bhqf,hfd->bhqd", covered, self.cell_value.to(q.dtype))
        return self.out(out.transpose(1, 2).reshape(B, Lq, C))

    def forward(self, x, tokens, present, region, scale, boxes=None, cells=None):
        # x (B, L, C) visual tokens; tokens (B, N, T); present (B, N); region (B, L, N) or None; scale (B, 1, 1);
        # boxes (B, N, 4): read by the learned depth preference only; cells (B, L, N, F): by the sub-cell map only
        B, L, _ = x.shape
        objects = self.to_objects(tokens)                                      # (B, N, C)
        if self.attention == "self":
            h = self.norm(torch.cat([x, objects], dim=1))                      # (B, L + N, C)
            keys = torch.cat([present.new_ones(B, L), present], dim=1)            # (B, L + N)
            allowed = keys[:, None, :]                     # (B, 1, L + N): the same keys for every query, broadcast
            delta = self._attend(h, h, allowed)[:, :L]
        else:
            kv = torch.cat([self.nothing.expand(B, 1, -1).to(objects.dtype), objects], dim=1)  # (B, 1 + N, C)
            allowed = present[:, None, :].expand(B, L, -1)                                  # (B, L, N)
            if self.attention == "masked":
                allowed = allowed & region
            allowed = torch.cat([allowed.new_ones(B, L, 1), allowed], dim=-1)              # "nothing" always allowed
            key_bias = None
            if self.depth_bias is not None:                  # -log(box area): larger for smaller boxes; 0 for "nothing"
                area = box_area(boxes).clamp(min=1e-4)
                key_bias = torch.cat([area.new_zeros(B, 1), -area.log()], dim=-1)
            delta = self._attend(self.norm(x), kv, allowed, key_bias, cells if self.cell_value is not None else None)
        out = x + scale * torch.tanh(self.gate_attn) * delta
        if self.ff is not None:
            out = out + scale * torch.tanh(self.gate_ff) * self.ff(out)
        return out.to(x.dtype)


def region_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4) boxes -> (B, height * width, N) bool: the token's grid cell overlaps the box."""
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    x0, y0, x1, y1 = (boxes[..., i, None].float() for i in range(4))         # (B, N, 1) each
    in_x = (xs / width < x1) & ((xs + 1) / width > x0)                        # (B, N, W)
    in_y = (ys / height < y1) & ((ys + 1) / height > y0)                      # (B, N, H)
    return (in_y[..., :, None] & in_x[..., None, :]).flatten(-2).transpose(1, 2)


def cell_cover(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4) boxes -> (B, height * width, N, 4): each box clipped to each grid cell, in the cell's coordinates
    ((0, 0, 1, 1): the box covers the whole cell; a cell the box does not touch reads an empty box on its border)."""
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)
    x0, y0, x1, y1 = (boxes[..., i, None].float() for i in range(4))         # (B, N, 1) each
    cx0, cx1 = ((e * width - xs).clamp(0, 1) for e in (x0, x1))               # (B, N, W)
    cy0, cy1 = ((e * height - ys).clamp(0, 1) for e in (y0, y1))              # (B, N, H)
    H, W = height, width
    cover = torch.stack([cx0[..., None, :].expand(-1, -1, H, W), cy0[..., :, None].expand(-1, -1, H, W),
                         cx1[..., None, :].expand(-1, -1, H, W), cy1[..., :, None].expand(-1, -1, H, W)], dim=-1)
    return cover.flatten(2, 3).transpose(1, 2)                                # (B, H * W, N, 4)


def cell_features(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4) boxes -> (B, height * width, N, 4 * 2 * CELL_FREQS): `cell_cover` as Fourier features."""
    return fourier_embed(cell_cover(boxes, height, width), CELL_FREQS)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) xyxy boxes -> (B, N) float areas (fractions of the image)."""
    return ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).float()


def front_only(region: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, L, N) region mask -> each token keeps only the present box of smallest area covering it (ties keep
    all of them): the depth rule "smaller objects in front". A token no box covers stays uncovered."""
    area = box_area(boxes)                                                                    # (B, N)
    cover = region & present[:, None, :]
    areas = torch.where(cover, area[:, None, :], torch.inf)                                    # (B, L, N)
    return cover & (areas <= areas.min(dim=-1, keepdim=True).values)


def token_grid(sample_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """The (h, w) of a block's token grid, from the UNet input size and the token count."""
    H, W = sample_hw
    for k in range(8):
        h, w = math.ceil(H / 2 ** k), math.ceil(W / 2 ** k)
        if h * w == n_tokens:
            return h, w
    raise ValueError(f"cannot place {n_tokens} tokens on a grid downsampled from {H}x{W}")


class SpatialAdapter(HookedAdapter):
    """The trainable adapter for one UNet architecture. `attach(unet)` hooks it in, `detach()` removes it."""

    def __init__(self, unet, text_dim: int, *, attention: str = "masked", norm: str = "layernorm",
                 feedforward: bool = True, max_objects: int = MAX_OBJECTS, fourier_freqs: int = 8,
                 mlp_width: int | None = None, depth: str = "none", adapted_blocks: str = "all",
                 ff_mult: int = 4, subcell: bool = False):
        super().__init__()
        if ff_mult < 1:
            raise ValueError(f"adapter_ff_mult = {ff_mult}: give a width multiple >= 1")
        all_blocks = transformer_blocks(unet)
        if not all_blocks:
            raise ValueError("this UNet has no transformer blocks: nothing to attach a spatial adapter to")
        chosen = select_blocks(unet, adapted_blocks)
        token_dim = grounding_width(unet)
        mlp_width = mlp_width or min(512, 4 * token_dim)
        # every architecture field, saved with checkpoints: resume refuses to change them. `blocks` is the UNet's
        # transformer blocks (which base it fits), `adapted_blocks` the ones with a layer
        self.config = dict(attention=attention, norm=norm, feedforward=feedforward, max_objects=max_objects,
                           fourier_freqs=fourier_freqs, mlp_width=mlp_width, text_dim=text_dim,
                           token_dim=token_dim, blocks=list(all_blocks))
        if depth != "none":                      # written only when set: older checkpoints read as "none"
            self.config["depth"] = depth
        if feedforward and ff_mult != 4:          # written only when not GLIGEN's 4: older checkpoints read as 4
            self.config["ff_mult"] = ff_mult
        if subcell:                               # written only when set: older checkpoints read as off
            self.config["subcell"] = True
        if chosen != list(all_blocks):           # written only when not every block: older checkpoints read as all
            self.config["adapted_blocks"] = chosen
        self.block_names = chosen                # the blocks with a layer, in the UNet's order (one per layer)
        self.tokenizer = GroundingTokenizer(text_dim, token_dim, mlp_width, fourier_freqs)
        self.layers = nn.ModuleList(
            GatedLayer(block_width(all_blocks[n]), token_dim, block_heads(all_blocks[n]), attention, norm,
                       feedforward, depth, ff_mult, subcell)
            for n in chosen)
        self.max_objects = max_objects

    # --- which parameters train (all of them: HookedAdapter.trainable_parameters); which learn fast
    def gate_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.trainable_parameters().items() if n.split(".")[-1].startswith("gate_")}

    def fast_parameters(self) -> dict[str, nn.Parameter]:
        """What learns at lr * gate_lr_scale, without weight decay: the gates, and the learned depth preferences
        (a few scalars per layer that start at zero, like the gates)."""
        return {n: p for n, p in self.trainable_parameters().items()
                if n.split(".")[-1].startswith("gate_") or n.endswith("depth_bias")}

    # --- attaching (HookedAdapter.attach / detach): only the adapted blocks get a hook
    def _hook_blocks(self, blocks: dict) -> list:
        return [blocks[name].register_forward_hook(self._hook(layer))
                for layer, name in zip(self.layers, self.block_names)]

    def _hook(self, layer: GatedLayer):
        def hook(block, args, output):
            inj = self.injection
            if inj is None:                 # not this adapter's forward: the block's output passes unchanged
                return output
            x = image_tokens(output)        # a joint block's image stream; its context stream passes unchanged
            region = inj.region(x.shape[1], layer.depth) if layer.attention == "masked" else None
            cells = inj.cell_features(x.shape[1]) if layer.cell_value is not None else None
            return with_image_tokens(output, layer(x, inj.tokens, inj.present, region, inj.scale, inj.boxes, cells))
        return hook

    # --- gates, as the workbook watches them
    def gate_values(self) -> dict[str, dict[str, float]]:
        """Per layer: raw gate values and tanh(raw) (the effective gate at scale 1)."""
        rows = {}
        for name, layer in zip(self.block_names, self.layers):
            row = {"attn_raw": layer.gate_attn.item(), "attn": math.tanh(layer.gate_attn.item())}
            if layer.gate_ff is not None:
                row.update(ff_raw=layer.gate_ff.item(), ff=math.tanh(layer.gate_ff.item()))
            rows[name] = row
        return rows


def grounding_width(net) -> int:
    """The width of the grounding tokens for a network: a UNet's cross-attention width (its caption's), an
    MM-DiT's joint width (caption_projection_dim, what its caption tokens are projected to; FLUX's: its inner
    width, heads x head width)."""
    width = net.config.get("cross_attention_dim") or net.config.get("caption_projection_dim") or \
        net.config.num_attention_heads * net.config.attention_head_dim
    return width[0] if isinstance(width, (list, tuple)) else width


def block_factors(unet) -> dict[str, int]:
    """Each transformer block's downsampling factor from the UNet's input (1, 2, 4, 8: its token grid is the
    input's side / factor), read off the UNet's structure: the down blocks in order (one with a downsampler halves
    the side after it), the mid block at the deepest, the up blocks back up (one with an upsampler doubles it)."""
    factors, f = {}, 1

    def mark(prefix, module):
        factors.update({f"{prefix}.{n}": f for n, m in module.named_modules() if isinstance(m, BasicTransformerBlock)})
    for i, block in enumerate(getattr(unet, "down_blocks", ())):
        mark(f"down_blocks.{i}", block)
        f *= 2 if getattr(block, "downsamplers", None) else 1
    if getattr(unet, "mid_block", None) is not None:
        mark("mid_block", unet.mid_block)
    for i, block in enumerate(getattr(unet, "up_blocks", ())):
        mark(f"up_blocks.{i}", block)
        f //= 2 if getattr(block, "upsamplers", None) else 1
    return factors


def select_blocks(unet, spec: str = "all") -> list[str]:
    """The transformer blocks (full module names, in the UNet's order) that `spec` gives a gated layer:
    - "all": every one (GLIGEN, InstanceDiffusion);
    - "decoder": the mid block and the up blocks (the backward pass then stops at the mid block);
    - "low": every block at a quarter of the input's side or less: on SD 1.5 at 512 px (64x64 latents) the
      16x16 and 8x8 ones (down_blocks.2, mid_block, up_blocks.1: 6 of 16), where the training-free box methods
      steer; on the shipped tiny base (32x32) the 8x8 ones (down_blocks.2, mid_block, up_blocks.0: 4 of 7);
    - "migc": the mid block and the first up block holding transformer blocks (MIGC's released placement: on
      SD 1.5 mid_block + up_blocks.1, 4 blocks; on the tiny base mid_block + up_blocks.0, 3 blocks);
    - else a comma list of block names or prefixes ("mid_block,up_blocks.1", "up_blocks.1.attentions.0"): a
      block is chosen when its name is an item or starts with an item followed by a dot.
    - "first-half", "last-half", "middle" (the middle third): positions in the stack of blocks, the choices that
      mean something for an MM-DiT's joint blocks (ContextGen found the middle third of FLUX's best); on a UNet
      they count its transformer blocks in order; on FLUX they count its double- then single-stream blocks;
    - "double", "single": FLUX's double-stream blocks (`transformer_blocks.*`: image and caption tokens in two
      streams, CreatiLayout-FLUX's site) or its single-stream ones (`single_transformer_blocks.*`: one sequence);
    "decoder", "low" and "migc" are a UNet's (an MM-DiT has no encoder, decoder or resolutions): an error there;
    "double" and "single" are FLUX's.
    A choice or an item matching no transformer block is an error naming it and this UNet's blocks."""
    blocks = list(transformer_blocks(unet))
    spec = str(spec).strip()
    n = len(blocks)
    stack = {"first-half": blocks[:(n + 1) // 2], "last-half": blocks[n // 2:],
             "middle": blocks[n // 3: n - n // 3] if n >= 3 else blocks}
    if spec in stack:
        return stack[spec]
    single = [b for b in blocks if b.startswith("single_transformer_blocks.")]
    if spec in ("double", "single"):
        if not single:
            raise ValueError(f"adapter_blocks {spec!r} is FLUX's choice (its double- and single-stream blocks); this "
                             f"network has no single-stream blocks: choose one of {BLOCK_CHOICES} that fits it "
                             "(an MM-DiT: all, first-half, last-half, middle)")
        return single if spec == "single" else [b for b in blocks if b not in single]
    if spec in ("decoder", "low", "migc") and not any(n.startswith(("down_blocks.", "mid_block", "up_blocks."))
                                                      for n in blocks):
        raise ValueError(f"adapter_blocks {spec!r} is a UNet's choice (encoder, decoder, resolutions); this network "
                         f"is a stack of {n} joint blocks: choose all, first-half, last-half, middle or a comma list "
                         "of block names (transformer_blocks.3)")
    top = lambda name: ".".join(name.split(".")[:2]) if name.startswith(("down_blocks.", "up_blocks.")) \
        else name.split(".")[0]
    groups = list(dict.fromkeys(top(n) for n in blocks))          # down_blocks.1, mid_block, up_blocks.0, ...
    if spec == "all":
        chosen = blocks
    elif spec == "decoder":
        chosen = [n for n in blocks if n.startswith(("mid_block.", "up_blocks."))]
    elif spec == "low":
        factors = block_factors(unet)
        chosen = [n for n in blocks if factors.get(n, 0) >= 4]
    elif spec == "migc":
        first_up = next((g for g in groups if g.startswith("up_blocks.")), None)
        chosen = [n for n in blocks if top(n) in ("mid_block", first_up)]
    else:
        items = [i.strip() for i in spec.split(",") if i.strip()]
        match = lambda name, item: name == item or name.startswith(item + ".")
        unknown = [i for i in items if not any(match(n, i) for n in blocks)]
        if unknown or not items:
            raise ValueError(f"adapter_blocks {spec!r}: {', '.join(map(repr, unknown)) or 'nothing'} matches no "
                             f"transformer block of this UNet. Choose one of {BLOCK_CHOICES} or a comma list of "
                             f"block names / prefixes; this UNet's blocks with transformer blocks: {groups}")
        chosen = [n for n in blocks if any(match(n, i) for i in items)]
    if not chosen:
        factors = block_factors(unet)
        levels = {g: factors.get(next(n for n in blocks if top(n) == g)) for g in groups}
        raise ValueError(f"adapter_blocks {spec!r} selects no transformer block of this UNet (its blocks with "
                         f"transformer blocks, and their downsampling factors: {levels}): choose another of "
                         f"{BLOCK_CHOICES} or a comma list of those blocks")
    return chosen


class AdaptedUNet(nn.Module):
    """The frozen UNet and its adapter as one module with a real forward: what training, sampling, the
    checks and the benchmarks call (and what DDP/Accelerate wrap and torch.compile compiles).

        model = AdaptedUNet(base.unet, adapter)
        pred = model(noisy, t, context, grounding, scale)      # (B, C, h, w)
        pred = model(noisy, t, context, grounding, scale, base.added_cond(pooled, time_ids))   # SDXL

    Only the adapter's parameters train; the UNet's are frozen. With `grounding=None` (or a scale of
    exactly 0) the forward is the base UNet's, bit for bit."""

    def __init__(self, unet, adapter: SpatialAdapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter
        if not adapter.attached:
            adapter.attach(unet)
        elif not adapter.attached_to(unet):
            raise ValueError("this adapter is attached to another UNet (another loaded base), where its hooks "
                             "act; detach() it first, or load the checkpoint on this base")

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                grounding: Grounding | None = None, scale: float | torch.Tensor = 1.0,
                added: dict | None = None) -> torch.Tensor:
        """`added`: the UNet's `added_cond_kwargs` (SDXL's `text_embeds` and `time_ids`; None for SD)."""
        if grounding is None or (isinstance(scale, (int, float)) and scale == 0):
            return predict(self.unet, noisy, t, context, added)
        tokens = self.adapter.tokenizer(grounding)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=tokens.device).reshape(-1, 1, 1)
        self.adapter.injection = Injection(tokens, grounding.present, grounding.boxes, scale,
                                           tuple(noisy.shape[-2:]))
        try:
            return predict(self.unet, noisy, t, context, added)
        finally:
            self.adapter.injection = None


def build_adapter(base, **options) -> SpatialAdapter:
    """An adapter sized for `base` (its UNet blocks and phrase embedding width), attached and on its device
    (`options`: SpatialAdapter's, e.g. `adapted_blocks="decoder"`). Its weights are fp32 whatever the base's dtype: they are
    the master weights. `attention="gligen"`: diffusers' own GLIGEN modules with the same interface
    (adapterlib/model/gligen.py), in every block."""
    kind = GligenAdapter if options.get("attention") == "gligen" else SpatialAdapter
    if kind is GligenAdapter and base.family != "unet":
        raise ValueError(f"adapter_attention 'gligen' is diffusers' GLIGEN modules, made for a UNet's transformer "
                         f"blocks; {base.path} is {base.kind} base: choose one of {ATTENTIONS}")
    adapter = kind(base.net, base.phrase_dim, **options)
    return adapter.to(base.device, torch.float32).attach(base.net)


def architecture_options(cfg) -> dict:
    """build_adapter's options from a training config's architecture fields: `build_adapter(base,
    **architecture_options(cfg))` is the adapter a run of `cfg` trains (and notebook 01 checks)."""
    return {option: getattr(cfg, field) for field, option in ARCHITECTURE.items() if option is not None}
