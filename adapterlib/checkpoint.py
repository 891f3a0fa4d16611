"""Checkpoints: written atomically, found by step, loaded back into an adapter.

A checkpoint is a folder `runs/<run>/checkpoints/step_0002000/`:
- `adapter.safetensors`: the adapter weights (fp32), with the adapter's architecture in the metadata;
- `state.pt`: optimizer, LR schedule, loss scaler, RNG states, data position, step, skipped steps;
- `config.json`: the run's config.
It is written to `step_XXXXXXX.tmp/` and renamed when complete, so a crash mid-write leaves no
half-written checkpoint under a real name (and the next save clears the leftover).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import SpatialAdapter

FILES = ("adapter.safetensors", "state.pt", "config.json")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, adapter: SpatialAdapter, state: dict, config: dict) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(adapter, tmp / "adapter.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if final.exists():                       # re-saving the same step (interrupt right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_adapter(adapter: SpatialAdapter, path: Path) -> None:
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in adapter.trainable_parameters().items()}
    save_file(tensors, str(path), metadata={"adapter_config": json.dumps(adapter.config)})


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for d in (Path(run_dir) / "checkpoints").glob("step_*"):
        if d.suffix != ".tmp" and all((d / f).is_file() for f in FILES):
            found.append((int(d.name.split("_")[1]), d))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(run_dir: Path, which: str | int = "latest") -> tuple[int, Path]:
    """`latest`, `final` or a step number -> (step, checkpoint folder)."""
    run_dir = Path(run_dir)
    if which == "final" and (run_dir / "final" / "adapter.safetensors").is_file():
        return json.loads((run_dir / "final" / "info.json").read_text())["step"], run_dir / "final"
    found = dict(list_checkpoints(run_dir))
    if not found:
        raise FileNotFoundError(f"run {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    step = max(found) if which in ("latest", "final") else int(which)
    if step not in found:
        raise FileNotFoundError(f"run {run_dir}: no checkpoint at step {step}; there are {sorted(found)}")
    return step, found[step]


def adapter_config(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["adapter_config"])


def load_adapter(checkpoint: Path, base) -> SpatialAdapter:
    """Build the adapter a checkpoint folder (or .safetensors file) was saved from, on `base`, attached."""
    from .adapter import build_adapter
    path = Path(checkpoint)
    path = path / "adapter.safetensors" if path.is_dir() else path
    config = adapter_config(path)
    options = {k: config[k] for k in ("attention", "norm", "feedforward", "max_objects", "fourier_freqs", "mlp_width")}
    adapter = build_adapter(base, **options)
    if adapter.config != config:
        adapter.detach()
        diff = sorted(k for k in config if adapter.config.get(k) != config[k])
        raise ValueError(f"checkpoint {path} was trained on another base: {diff} differ")
    adapter.load_state_dict(load_file(str(path), device=str(base.device)))
    return adapter
