"""What both adapters (ours in `adapter`, diffusers' GLIGEN modules in `gligen`) share: the network's transformer
blocks by name (a UNet's `BasicTransformerBlock`s, an MM-DiT's joint blocks, FLUX's double- and single-stream
blocks), hooks on them that are attached, detached and asked about in one way, and gradient checkpointing with those
hooks inside."""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

JOINT_TYPES = (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)   # return (context, image)
BLOCK_TYPES = (BasicTransformerBlock, *JOINT_TYPES)


def transformer_blocks(unet) -> dict[str, nn.Module]:
    """The network's transformer blocks by module name, in its order: a UNet's `BasicTransformerBlock`s, an SD3
    transformer's `JointTransformerBlock`s (`transformer_blocks.0` ..), or FLUX's double-stream blocks
    (`transformer_blocks.0` ..) then its single-stream ones (`single_transformer_blocks.0` ..)."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, BLOCK_TYPES)}


def block_width(block: nn.Module) -> int:
    """The width of a block's image tokens."""
    if isinstance(block, JOINT_TYPES):
        return block.attn.to_q.in_features
    return block.norm1.normalized_shape[0]


def block_heads(block: nn.Module) -> int:
    return (block.attn if isinstance(block, JOINT_TYPES) else block.attn1).heads


def image_tokens(output):
    """The image tokens of a block's output: a UNet block returns them; a joint block (SD3's; FLUX's double- and
    single-stream blocks, whose one sequence is split back into its two parts) returns (context, image)."""
    return output[1] if isinstance(output, tuple) else output


def with_image_tokens(output, tokens):
    """`output` with its image tokens replaced (a joint block's context stream passes unchanged)."""
    return (output[0], tokens) if isinstance(output, tuple) else tokens


class HookedAdapter(nn.Module):
    """An adapter that lives in hooks on a UNet's transformer blocks. A subclass sets `config["blocks"]` (every
    transformer block of the UNet it was built for) and implements `_hook_blocks(blocks)` (register its hooks,
    return their handles); `_unhook()` undoes anything else it did to the blocks. `injection` is set by
    `AdaptedUNet.forward` for the length of one forward; a hook with no injection leaves its block alone."""

    def __init__(self):
        super().__init__()
        self._handles: list = []
        self._unet_id: int | None = None   # which UNet the hooks are on (not a submodule: never saved or moved)
        self.injection = None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every adapter parameter, by name; the base's parameters never train. The optimizer, checkpoints and the
        dtype checks all take their list from here."""
        return dict(self.named_parameters())

    def attach(self, unet) -> "HookedAdapter":
        if self._handles:
            raise RuntimeError("adapter is already attached; detach() it first")
        blocks = transformer_blocks(unet)
        if list(blocks) != self.config["blocks"]:
            raise ValueError("this UNet's transformer blocks differ from the ones the adapter was built for "
                             f"({len(blocks)} vs {len(self.config['blocks'])}): build the adapter for this UNet")
        self._handles = self._hook_blocks(blocks)
        self._unet_id = id(unet)
        return self

    def _hook_blocks(self, blocks: dict) -> list:
        raise NotImplementedError

    def _unhook(self) -> None:
        """Undo what attaching did besides the hooks (nothing, unless a subclass says)."""

    def attached_to(self, unet) -> bool:
        return self.attached and self._unet_id == id(unet)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._unhook()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def set_gradient_checkpointing(net, adapter: HookedAdapter, enabled: bool) -> None:
    """Gradient checkpointing of `net` (a UNet's resnets and transformer blocks, an MM-DiT's blocks: diffusers' own
    segments) with the adapter's hooks inside: each segment's activations are dropped after the forward and
    recomputed in the backward pass. A hook reads the adapter's `injection`, which lives only for the length of one
    forward; the recompute runs later, in the backward pass, so each segment keeps the injection its forward saw
    and puts it back while it is recomputed. The same gradients as without it, for less memory and a second forward
    of the checkpointed blocks."""
    if not enabled:
        if getattr(net, "is_gradient_checkpointing", False):
            net.disable_gradient_checkpointing()
        return

    def checkpointed(module, *args):
        injection = adapter.injection                   # what this segment's forward sees

        def contexts():
            return contextlib.nullcontext(), _injected(adapter, injection)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)
    net.enable_gradient_checkpointing(checkpointed)


@contextlib.contextmanager
def _injected(adapter: HookedAdapter, injection):
    """The adapter's injection set to `injection` for the length of the block (a segment's recompute)."""
    saved, adapter.injection = adapter.injection, injection
    try:
        yield
    finally:
        adapter.injection = saved
