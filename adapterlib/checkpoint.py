"""Checkpoints: written atomically, loaded back into an adapter on its run's base.

A checkpoint is a folder `<run>/checkpoints/step_0002000/` (layout and lookup: `runs.py`):
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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter import SpatialAdapter, build_adapter
from .base import BaseModel, load_base
from .precision import resolve_device
from .runs import checkpoint_dir, read_config, resolve_checkpoint, resolve_run


def save_checkpoint(run: Path, step: int, adapter: SpatialAdapter, state: dict, config: dict) -> Path:
    final = checkpoint_dir(run, step)
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


def adapter_config(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["adapter_config"])


def load_adapter(checkpoint: Path, base: BaseModel) -> SpatialAdapter:
    """Build the adapter a checkpoint folder (or .safetensors file) was saved from, on `base`, attached."""
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


def load_run_base(run: Path, device: str | None = None) -> BaseModel:
    """The base model a run was trained on (from its config.json), on `device` (default: auto)."""
    return load_base(read_config(run)["base_model"], device=resolve_device(device))


@dataclass
class Checkpoint:
    """An adapter loaded from a run's checkpoint, attached to the run's base."""
    base: BaseModel
    adapter: SpatialAdapter          # attached to base.unet
    run_dir: Path
    step: int
    path: Path

    @property
    def name(self) -> str:
        return f"{self.run_dir.name} step {self.step}"


def load_checkpoint(run: str | Path | None = None, which: str | int = "latest", *, base: BaseModel | None = None,
                    device: str | None = None) -> Checkpoint:
    """The adapter of `run` (a run name or path; None or "": the run with the newest checkpoint) at
    `which` (latest | final | a step), on the run's base model. Pass `base` (a BaseModel already
    loaded for the same base) to attach a second checkpoint to the same model: only the adapter whose
    forward runs acts."""
    run_dir = resolve_run(run)
    step, path = resolve_checkpoint(run_dir, str(which))
    base = base if base is not None else load_run_base(run_dir, device)
    return Checkpoint(base, load_adapter(path, base), run_dir, step, path)


def parse_checkpoint_spec(spec: str, run: Path) -> tuple[Path, str]:
    """`"500"`, `"latest"`, `"final"` -> that checkpoint of `run`; `"other-run"` or `"runs/other"` ->
    its latest; `"other-run:500"` -> that step of another run."""
    spec = str(spec).strip()
    if spec.isdigit() or spec in ("latest", "final"):
        return Path(run), spec
    name, _, which = spec.partition(":")
    return resolve_run(name), which or "latest"
