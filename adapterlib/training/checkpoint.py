"""Checkpoints: written so that a crash, a full disk or bit rot never costs more than the steps since
the last good one, loaded without ever running code, and loaded back into an adapter on its run's base.

A checkpoint is a folder `<run>/checkpoints/step_0002000/` (layout and lookup: `runs.py`):
- `adapter.safetensors`: the adapter weights (fp32), with the adapter's architecture in the metadata;
- `state.pt`: optimizer, LR schedule, loss scaler, RNG states, data position, step, skipped steps, as
  plain tensors and numbers: it loads with `torch.load(weights_only=True)`, which refuses anything that
  could run code (there is no fallback to full pickle loading);
- `config.json`: the run's config;
- `checksums.json`: the SHA-256 of each file above, checked before a checkpoint is used.
It is written to `step_XXXXXXX.tmp/`, every file and the folder fsynced, then renamed, so a crash
mid-write leaves no half-written checkpoint under a real name (the next save clears the leftover); a
write that fails (a full disk) removes the partial folder and says which checkpoint is still good.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterlib.model.adapter import SpatialAdapter, build_adapter, grounding_width
from adapterlib.model.base import BaseModel, load_base
from adapterlib.model.precision import resolve_device
from adapterlib.files import OutOfSpace, fsync, is_out_of_space, out_of_space, out_of_space_message, sha256
from adapterlib.runs import CHECKPOINT_FILES, checkpoint_dir, list_checkpoints, read_config, resolve_checkpoint, resolve_run

CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or must not be used: says which and what is still good."""


# ---------------------------------------------------------------------------------------------
# RNG states as plain data (numpy's holds an ndarray, which weights-only loading refuses)

def rng_state(train_state: torch.Tensor) -> dict:
    """The training generator's state (as of the last completed step) and the global RNGs, now."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(train=train_state, torch=torch.get_rng_state(), python=random.getstate(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached_gaussian=float(cached)))


def set_rng_state(generator: torch.Generator, rng: dict) -> None:
    generator.set_state(rng["train"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))


# ---------------------------------------------------------------------------------------------
# writing

def save_checkpoint(run: Path, step: int, adapter: SpatialAdapter, state: dict, config: dict) -> Path:
    """Write the checkpoint of `step` atomically: a temporary folder, fsynced, with checksums, renamed.
    A failed write (a full disk, a lost mount) removes the partial folder and raises CheckpointError."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter(adapter, tmp / "adapter.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        sums = {name: sha256(tmp / name) for name in CHECKPOINT_FILES}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        for name in (*CHECKPOINT_FILES, CHECKSUMS):
            fsync(tmp / name)
        fsync(tmp)
        if final.exists():                   # re-saving the same step (interrupt right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(final.parent)                 # the rename itself is durable
    except Exception as e:
        if not (isinstance(e, OSError) or is_out_of_space(e)):       # torch.save on a full disk: a RuntimeError
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        good = [s for s, _ in list_checkpoints(run) if s != step]
        still = f"the checkpoint of step {good[-1]} is intact: resume from it" if good else "there is no earlier checkpoint"
        if is_out_of_space(e):
            raise OutOfSpace(errno.ENOSPC, f"{out_of_space_message(final, f'the checkpoint of step {step}', e)}; "
                                           f"{still}") from e
        raise CheckpointError(f"could not write the checkpoint of step {step} to {final} ({e}); {still} once the "
                              "cause (disk space, the mount) is fixed") from e
    return final


def save_final(run: Path, adapter: SpatialAdapter, info: dict) -> Path:
    """`<run>/final/` (adapter.safetensors + info.json), written as a whole: built in final.tmp/ and
    swapped in, so the weights and their step always belong together."""
    final, tmp = Path(run) / "final", Path(run) / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with out_of_space("the final adapter", final):
            save_adapter(adapter, tmp / "adapter.safetensors")
            (tmp / "info.json").write_text(json.dumps(info))
            for name in ("adapter.safetensors", "info.json"):
                fsync(tmp / name)
    except OutOfSpace:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run: Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` valid checkpoints (0: keep all). The newest valid one always
    stays, and an invalid one never counts towards the ones kept. Returns the steps deleted."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(run)
    valid = [(s, p) for s, p in found if verify_checkpoint(p) is None]
    keep = {s for s, _ in valid[-keep_last:]}
    deleted = [s for s, p in found if s not in keep and s < max(keep, default=0)]
    for s, p in found:
        if s in deleted:
            shutil.rmtree(p)
    return deleted


# ---------------------------------------------------------------------------------------------
# reading: verify, then load without running code

def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches checksums.json, else what is wrong (missing file, damaged file)."""
    path = Path(path)
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        return f"{CHECKSUMS} is missing"
    try:
        sums = json.loads(sums_path.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{CHECKSUMS} is damaged"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        if sums.get(name) != sha256(path / name):
            return f"{name} does not match its checksum (damaged on disk)"
    return None


def latest_valid_checkpoint(run: Path) -> tuple[tuple[int, Path] | None, list[str]]:
    """The newest checkpoint whose files match their checksums, and a note for each newer one skipped."""
    notes = []
    for step, path in reversed(list_checkpoints(run)):
        problem = verify_checkpoint(path)
        if problem is None:
            return (step, path), notes
        notes.append(f"checkpoint {path.name} is invalid ({problem}): skipped for an earlier one")
    return None, notes


def load_state(path: Path) -> dict:
    """A checkpoint's state.pt, loaded as plain data only: anything else is refused, and nothing runs."""
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused {Path(path) / 'state.pt'}: it holds objects other than tensors and plain "
                              "numbers (loading it could run code). A checkpoint written by adapterlib never does; "
                              "do not use this file") from e


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
    _check_base_shape(path, config, base)
    options = {k: config[k] for k in ("attention", "norm", "feedforward", "max_objects", "fourier_freqs", "mlp_width")}
    options["depth"] = config.get("depth", "none")
    options["subcell"] = config.get("subcell", False)                          # written before it: off
    options["ff_mult"] = config.get("ff_mult", 4)                               # written before it: GLIGEN's 4
    options["adapted_blocks"] = ",".join(config.get("adapted_blocks", [])) or "all"     # written before it: every block
    adapter = build_adapter(base, **options)
    if adapter.config != config:
        adapter.detach()
        diff = sorted(k for k in config if adapter.config.get(k) != config[k])
        raise ValueError(f"checkpoint {path} was trained on another base: {diff} differ")
    adapter.load_state_dict(load_file(str(path), device=str(base.device)))
    return adapter


def _base_shape(text_dim, token_dim, blocks) -> str:
    return f"phrase width {text_dim}, context width {token_dim}, {len(blocks)} transformer blocks"


def _check_base_shape(path: Path, saved: dict, base: BaseModel) -> None:
    """The adapter saved at `path` fits `base` (phrase and context widths, transformer blocks), or an error
    naming both: e.g. an SD 1.5 adapter loaded onto (or resumed on) an SDXL folder."""
    from adapterlib.model.hooks import transformer_blocks
    token_dim = grounding_width(base.net)
    blocks = list(transformer_blocks(base.net))
    if (saved.get("text_dim"), saved.get("token_dim"), saved.get("blocks")) != (base.phrase_dim, token_dim, blocks):
        kind = base.kind
        raise ValueError(f"adapter {path} does not fit the base {base.path} ({kind} base): the adapter was trained "
                         f"with {_base_shape(saved.get('text_dim'), saved.get('token_dim'), saved.get('blocks') or [])}"
                         f", this base has {_base_shape(base.phrase_dim, token_dim, blocks)}. Load it on the base "
                         "it was trained on (its run's config.json names it), or train an adapter for this base")


def check_adapter_fits(checkpoint: Path, base: BaseModel) -> None:
    """Before a resume does any work: the checkpoint's adapter fits `base` (`_check_base_shape`)."""
    path = Path(checkpoint)
    path = path / "adapter.safetensors" if path.is_dir() else path
    _check_base_shape(path, adapter_config(path), base)


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
