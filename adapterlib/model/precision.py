"""Where the work runs and in which dtypes: the device choice and the precision policy, in one place.

- `resolve_device("auto")` is CUDA when available, else the CPU; any other name is taken as given.
- The precision policy: the frozen base in the compute dtype, the adapter's trainable weights in fp32
  (the master weights) in every case, the forward under autocast at the compute dtype; fp16 needs a
  loss scaler. On a CPU everything runs in fp32.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from adapterlib.options import MIXED_PRECISIONS


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): CUDA when available, else the CPU; anything else as given ("cuda:1", "cpu")."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (use 'auto' or 'cpu')")
    return device


class Precision(NamedTuple):
    compute_dtype: torch.dtype             # the frozen base's weights
    autocast_dtype: torch.dtype | None     # None: no autocast (plain fp32)
    needs_grad_scaler: bool                # fp16 gradients underflow without a loss scaler


def precision_policy(device: str | torch.device, mixed_precision: str) -> Precision:
    """How a device and a `mixed_precision` setting ("no", "bf16", "fp16") map onto dtypes."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision {mixed_precision!r}: choose one of {MIXED_PRECISIONS}")
    if torch.device(device).type != "cuda" or mixed_precision == "no":
        return Precision(torch.float32, None, False)      # CPU: fp32 everything
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return Precision(dtype, dtype, mixed_precision == "fp16")


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing when `dtype` is None or fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def autocast_for(base) -> contextlib.AbstractContextManager:
    """Autocast at the frozen base's dtype (the policy's autocast dtype), or nothing for an fp32 base."""
    return autocast(base.device, base.net.dtype)
