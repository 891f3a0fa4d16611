"""What a run's memory is made of, stated before the first step (`estimate`) and measured while it runs (`peak`).

The estimate adds up, in bytes:
- the frozen base: every parameter and buffer of its loaded parts (network, VAE, text encoders), in their dtypes;
- the adapter: its trainable parameters at 16 bytes each (fp32 weights, gradients and AdamW's two moments);
- the activations: what autograd keeps for the backward pass (every tensor saved in the first step's forward, of
  its first micro-batch, counted once per storage, the weights left out: measured, not guessed, with
  `torch.autograd.graph.saved_tensors_hooks` in the run's own first step, which it does not change), per sample,
  times the micro-batch (`batch_size` / processes / `gradient_accumulation_steps`).
The parameters' part is written to train.log before the first step, the whole estimate right after it (beside the
peak so far).
It leaves out the framework's own (a CUDA context, about 0.3-0.5 GiB; the allocator's slack) and the temporaries
of one layer at a time, so the peak measured during a run is above it by those.

The peak: CUDA's `max_memory_allocated` on a GPU, the process's resident peak (`ru_maxrss`) on the CPU.
"""
from __future__ import annotations

import resource
import sys

import torch

GIB = 1024 ** 3


def _bytes(module) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def base_bytes(base) -> int:
    """The frozen base's parameters and buffers, every loaded part."""
    parts = {id(p): p for p in (base.net, base.vae, base.text_encoder, getattr(base, "text_encoder_2", None),
                                getattr(base, "text_encoder_3", None)) if p is not None}
    return sum(_bytes(p) for p in parts.values())


class SavedBytes:
    """A context manager counting the bytes autograd saves for the backward pass inside it, each storage once,
    `model`'s weights and buffers left out; the tensors are passed through as they are (nothing changes)."""

    def __init__(self, model):
        self.weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.seen: dict[int, int] = {}
        self.done = False
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.done = True
        return False

    @property
    def bytes(self) -> int:
        return int(sum(self.seen.values()))


def estimate(training, per_sample: int) -> dict:
    """The estimate's parts (bytes) and total for this run, given the activations of one sample (`saved_bytes`)."""
    cfg, shard = training.cfg, training.shard
    micro = cfg.batch_size // shard.world // cfg.gradient_accumulation_steps
    trainable = sum(p.numel() for p in training.params.values())
    parts = dict(base=base_bytes(training.base), adapter=16 * trainable, activations=per_sample * micro)
    return dict(parts, total=sum(parts.values()), trainable_parameters=trainable, activations_per_sample=per_sample,
                micro_batch=micro, checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)))


def describe_parameters(training) -> str:
    """The train.log line before the first step: the base's and the adapter's parts."""
    trainable = sum(p.numel() for p in training.params.values())
    return (f"memory before the first step: frozen base {base_bytes(training.base) / 1024 ** 2:,.1f} MiB + adapter "
            f"{trainable:,} parameters x 16 bytes (fp32 weights, gradients, AdamW's moments) "
            f"{16 * trainable / 1024 ** 2:,.1f} MiB; the activations are measured in the first step")


def describe(est: dict, device: torch.device, peak_gib: float) -> str:
    """The train.log line after the first step: the estimate, how it was made, and the peak so far."""
    mib = lambda b: f"{b / 1024 ** 2:,.1f} MiB"            # noqa: E731
    where = "CUDA's peak allocated" if device.type == "cuda" else "the process's resident peak, Python included"
    return (f"memory estimated: about {est['total'] / GIB:.2f} GiB on {device.type} = frozen base {mib(est['base'])} "
            f"+ adapter {est['trainable_parameters']:,} parameters x 16 bytes {mib(est['adapter'])} + activations "
            f"{mib(est['activations_per_sample'])} a sample (what autograd kept for the first step's backward) x "
            f"micro-batch {est['micro_batch']} {mib(est['activations'])}"
            f"{' (gradient checkpointing: only what enters each block)' if est.get('checkpointing') else ''}; not counted: "
            f"the framework's own (a CUDA context) and one layer's temporaries"
            f"{' and one block recomputed at a time' if est.get('checkpointing') else ''}; peak so far {peak_gib:.2f} GiB "
            f"({where})")


def peak(device: torch.device) -> float:
    """The memory peak so far, GiB: CUDA's max allocated on a GPU; the process's resident peak on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss             # KiB on Linux, bytes on macOS
    return rss / (GIB if sys.platform == "darwin" else 1024 ** 2)
