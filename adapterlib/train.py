"""The training loop: one function, top to bottom, with exact resume.

Everything random (data order, noise, timesteps, dropouts, injection scales) comes from one torch
Generator whose state is saved in each checkpoint, and the data order is a pure function of
(seed, samples seen), so a run stopped at any step and resumed ends with the same weights as an
uninterrupted one (on CPU; GPU kernels are not bitwise deterministic).
"""
from __future__ import annotations

import csv
import json
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, shapes
from .adapter import build_adapter
from .base import load_base
from .checks import precision_policy
from .config import RESUME_FIXED_FIELDS, TrainConfig
from .data import ManifestImages
from .paths import RUNS, repo_path
from .sample import boxed_grid, generate
from safetensors.torch import load_file

RESUME_FREE_FIELDS = ("steps", "save_every", "log_every", "n_samples", "device")


class Interrupted(KeyboardInterrupt):
    """Raised by SIGTERM (or `stop_at_step`) inside the loop, so it checkpoints like Ctrl-C does."""


# ---------------------------------------------------------------------------------------------
# run folders

def run_dir_of(run_name: str, runs_dir: Path | None = None) -> Path:
    return Path(runs_dir or RUNS) / run_name


def resolve_run(name_or_path: str | Path) -> Path:
    """A run folder from a run name ("default-...", looked up in runs/) or a path."""
    if (RUNS / str(name_or_path) / "config.json").is_file():
        return RUNS / str(name_or_path)
    return repo_path(name_or_path)


def resume_config(run_dir: Path, **changes) -> TrainConfig:
    """The saved config of a run with `changes`; refuses changes to anything but RESUME_FREE_FIELDS."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    refused = sorted(k for k, v in changes.items() if k not in RESUME_FREE_FIELDS and saved.get(k) != v)
    if refused:
        raise ValueError(f"resume of {run_dir}: cannot change {refused} "
                         f"(saved: {[saved.get(k) for k in refused]}, asked: {[changes[k] for k in refused]}); "
                         f"only {list(RESUME_FREE_FIELDS)} may change on resume: start a new run_name instead")
    return TrainConfig(**{**saved, **changes})


def check_resumable(cfg: TrainConfig, saved: dict, where: Path) -> None:
    diff = [k for k in RESUME_FIXED_FIELDS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"resume of {where}: {', '.join(f'{k} (saved {saved.get(k)!r}, now {getattr(cfg, k)!r})' for k in diff)} "
                         "differ: these fix the architecture or the data; start a new run_name instead")


def training_data(cfg: TrainConfig, resolution: int, runs_dir: Path) -> ManifestImages:
    """The manifest to train on; "shapes" writes (once) a Shapes set in the manifest format."""
    if cfg.data == "shapes":
        folder = Path(runs_dir) / "_datasets" / f"shapes-{cfg.n_train}"
        if not (folder / "data.jsonl").is_file():
            shapes.write_dataset(folder, cfg.n_train, seed=0)
        return ManifestImages(folder / "data.jsonl", resolution)
    return ManifestImages(repo_path(cfg.data), resolution)


def batch_indices(seed: int, n: int, start: int, size: int) -> list[int]:
    """Indices of samples start .. start+size-1 in an endless sequence of seeded epoch permutations."""
    out, cache = [], {}
    for pos in range(start, start + size):
        epoch = pos // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(cache[epoch][pos % n]))
    return out


# ---------------------------------------------------------------------------------------------
# logging: train.log (tail -f) and metrics.csv (pandas), one row per logging interval

class RunLog:
    def __init__(self, run_dir: Path, gate_columns: list[str], resume_step: int | None):
        self.log_path, self.csv_path = run_dir / "train.log", run_dir / "metrics.csv"
        self.columns = ["step", "loss", "loss_avg", "lr", "grad_norm", "gate_mean", "gate_max", "gate_raw_max",
                        "samples_per_s", "wall_s", "skipped"] + gate_columns
        if resume_step is not None and self.csv_path.exists():
            # rows logged after the checkpoint we resume from are redone: drop them, no duplicates
            with self.csv_path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._write_rows(rows)
        elif not self.csv_path.exists() or resume_step is None:
            self._write_rows([])

    def _write_rows(self, rows):
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def text(self, line: str) -> None:
        with self.log_path.open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def row(self, row: dict) -> None:
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        self.text(" ".join(f"{k}={_fmt(row[k])}" for k in self.columns[:11]))


def _fmt(v):
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def gate_stats(adapter) -> dict:
    """Gate mean/max of tanh(raw) (the effective gate at scale 1), the largest raw value, per-layer values."""
    raw = {n: p.item() for n, p in adapter.gate_parameters().items()}
    eff = [abs(math.tanh(v)) for v in raw.values()]
    per_layer = {"gate_" + n.replace("layers.", "").replace(".gate_", "_"): math.tanh(v) for n, v in raw.items()}
    return dict(gate_mean=sum(eff) / len(eff), gate_max=max(eff), gate_raw_max=max(abs(v) for v in raw.values()),
                **per_layer)


# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, resume: bool = False, runs_dir: Path | None = None, progress: bool = True,
          on_log=None, stop_at_step: int | None = None) -> Path:
    """Train (or resume) the run `cfg.run_name`; returns its folder. `on_log(run_dir)` is called at
    each logging interval (the notebook's live plot); `stop_at_step` simulates an interrupt there."""
    # --- the run folder: new, or resumed from its latest complete checkpoint
    run_dir = run_dir_of(cfg.run_name, runs_dir)
    latest = checkpoint.latest_checkpoint(run_dir)
    if resume:
        if latest is None:
            raise FileNotFoundError(f"resume: run {run_dir} has no complete checkpoint to resume from")
        check_resumable(cfg, json.loads((run_dir / "config.json").read_text()), run_dir)
    elif latest is not None or (run_dir / "metrics.csv").exists():
        raise FileExistsError(f"run {run_dir} already exists: resume it (notebooks/03_resume.ipynb) "
                              "or choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (run_dir / "config.txt").write_text(cfg.to_text())

    # --- model: frozen base in the compute dtype, fp32 adapter (master weights)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    compute_dtype, amp_dtype, use_scaler = precision_policy(device, cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.base_model, device=device, dtype=compute_dtype)
    adapter = build_adapter(base, attention=cfg.adapter_attention, norm=cfg.adapter_norm,
                            feedforward=cfg.adapter_feedforward, max_objects=cfg.max_objects)
    params = adapter.trainable_parameters()
    gates = adapter.gate_parameters()
    opt = torch.optim.AdamW([
        {"params": [p for n, p in params.items() if n not in gates], "weight_decay": cfg.weight_decay},
        {"params": list(gates.values()), "weight_decay": 0.0, "lr": cfg.lr * cfg.gate_lr_scale}], lr=cfg.lr)
    warm = lambda s: min(1.0, (s + 1) / cfg.warmup)                       # then constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [warm, warm])
    scaler = torch.amp.GradScaler(device, enabled=use_scaler)
    data = training_data(cfg, base.resolution, runs_dir or RUNS)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, skipped = 0, 0
    if resume:
        step, path = latest
        state = torch.load(path / "state.pt", weights_only=False)
        adapter.load_state_dict(load_file(str(path / "adapter.safetensors"), device=device))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"]["train"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        skipped = state["skipped"]
    log = RunLog(run_dir, list(gate_stats(adapter))[3:], step if resume else None)
    log.text(f"{'resumed at' if resume else 'started at'} step {step} of {cfg.steps} on {device} "
             f"(base {cfg.base_model}, adapter {cfg.adapter_attention}/{cfg.adapter_norm}, "
             f"{sum(p.numel() for p in params.values())} trainable parameters)")
    eval_records = shapes.heldout_records(cfg.n_samples) if cfg.n_samples else []

    def save(at_step, rng_state):
        state = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                     rng=dict(train=rng_state, torch=torch.get_rng_state(), python=random.getstate(),
                              numpy=np.random.get_state()),
                     step=at_step, samples_seen=at_step * cfg.batch_size, skipped=skipped)
        path = checkpoint.save_checkpoint(run_dir, at_step, adapter, state, cfg.to_dict())
        if eval_records:
            images = generate(base, eval_records, list(range(len(eval_records))), adapter=adapter, batch_size=32)
            (run_dir / "samples").mkdir(exist_ok=True)
            boxed_grid(images, eval_records).save(run_dir / "samples" / f"step_{at_step:07d}.png")
        log.text(f"checkpoint {path.relative_to(run_dir)}")

    # --- SIGTERM (a killed papermill job, a scheduler) checkpoints like Ctrl-C
    def on_sigterm(signum, frame):
        raise Interrupted(f"signal {signum}")
    old_handler = _install_sigterm(on_sigterm)
    bar = _progress(progress, step, cfg.steps)
    t_start, t_window, losses, last_saved = time.perf_counter(), time.perf_counter(), [], step
    rng_done = gen.get_state()                 # RNG state after the last completed step: what a checkpoint holds
    try:
        while step < cfg.steps:
            if stop_at_step is not None and step == stop_at_step:
                raise Interrupted(f"stop_at_step {stop_at_step}")
            # --- batch: images, captions (caption dropout), grounding (phrase dropout)
            idx = batch_indices(cfg.seed, len(data), step * cfg.batch_size, cfg.batch_size)
            images, records = data.load(idx)
            x0 = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            drop = torch.rand(len(records), generator=gen) < cfg.caption_dropout
            captions = ["" if d else r.caption for d, r in zip(drop.tolist(), records)]
            with torch.no_grad(), torch.autocast(device, amp_dtype, enabled=amp_dtype is not None):
                latents = base.to_latents(x0.to(compute_dtype)).float()
                context = base.encode_captions(captions)
            grounding = adapter.prepare(base, records, cfg.phrase_dropout, gen)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, base.scheduler.config.num_train_timesteps, (len(records),), generator=gen).to(device)
            scale = (cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(len(records), generator=gen)).to(device)
            noisy = base.scheduler.add_noise(latents, noise, t)
            target = {"epsilon": noise, "v_prediction": base.scheduler.get_velocity(latents, noise, t),
                      "sample": latents}[base.scheduler.config.prediction_type]
            # --- forward through the frozen UNet with the adapter injecting
            with torch.autocast(device, amp_dtype, enabled=amp_dtype is not None), adapter.injecting(grounding, scale):
                pred = base.unet(noisy.to(compute_dtype), t, encoder_hidden_states=context).sample
            loss = F.mse_loss(pred.float(), target)
            # --- update: skip non-finite steps instead of poisoning the weights
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                skipped += 1
                log.text(f"step {step + 1}: non-finite loss {loss.item()}, step skipped ({skipped} so far)")
                sched.step()
                step, rng_done = step + 1, gen.get_state()
                continue
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip).item()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step, rng_done = step + 1, gen.get_state()   # the step is complete only now
            losses.append(loss.item())
            bar.update(1)
            # --- log, checkpoint
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                stats = gate_stats(adapter)
                row = dict(step=step, loss=losses[-1], loss_avg=sum(losses) / len(losses), lr=sched.get_last_lr()[0],
                           grad_norm=grad_norm, samples_per_s=len(losses) * cfg.batch_size / (now - t_window),
                           wall_s=now - t_start, skipped=skipped, **stats)
                log.row(row)
                bar.set_postfix(loss=f"{row['loss_avg']:.4f}", gate=f"{stats['gate_mean']:.3f}",
                                samples_s=f"{row['samples_per_s']:.1f}")
                losses, t_window = [], time.perf_counter()
                if on_log is not None:
                    on_log(run_dir)
            if step % cfg.save_every == 0:
                save(step, rng_done)
                last_saved, t_window = step, time.perf_counter()   # samples/s counts training only
    except KeyboardInterrupt as stop:           # Ctrl-C, a kernel interrupt, SIGTERM, stop_at_step
        if step > last_saved:
            save(step, rng_done)
        log.text(f"interrupted at step {step} ({stop!r}); resume with notebooks/03_resume.ipynb")
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        bar.close()
    # --- the final adapter
    if step > last_saved:
        save(step, rng_done)
    final = run_dir / "final"
    final.mkdir(exist_ok=True)
    checkpoint.save_adapter(adapter, final / "adapter.safetensors")
    (final / "info.json").write_text(json.dumps({"step": step, "skipped": skipped}))
    log.text(f"finished: {step} steps, final adapter in final/adapter.safetensors")
    adapter.detach()
    return run_dir


def _install_sigterm(handler):
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread: leave signals alone
        return None


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def find_latest_run(runs_dir: Path | None = None) -> Path:
    """The run folder whose newest complete checkpoint is the most recent."""
    candidates = [(path.stat().st_mtime, run) for run in Path(runs_dir or RUNS).iterdir() if run.is_dir()
                  for _, path in checkpoint.list_checkpoints(run)[-1:]]
    if not candidates:
        raise FileNotFoundError(f"no run under {runs_dir or RUNS} has a complete checkpoint")
    return max(candidates)[1]
