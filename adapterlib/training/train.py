"""The training loop, in parts that read alone, with exact resume and one writer per run.

Everything random (data order, noise, timesteps, dropouts, injection scales) comes from one torch
Generator whose state is saved in each checkpoint, and the data order is a pure function of
(seed, samples seen), so a run stopped at any step and resumed ends with the same weights as an
uninterrupted one (on CPU; GPU kernels are not bitwise deterministic).

    train(make_config("shapes", run_name="x"))       # a new run (or one killed before its first checkpoint)
    train(resume_config("x", steps=3000), resume=True)   # continue it, here extended to 3000 steps
"""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapterlib.training import checkpoint
from adapterlib.training import memory
from adapterlib.training import worlds
from adapterlib.training import distributed
from adapterlib.training import batches as inputs
from adapterlib.model.adapter import AdaptedUNet, Grounding, architecture_options, build_adapter, region_mask
from adapterlib.model.hooks import set_gradient_checkpointing
from adapterlib.model.base import load_base, resolve_base_path
from adapterlib.training.config import FIELDS, TrainConfig, check_preset_fits, resume_changes, trackers
from adapterlib.training.losses import box_loss, draw_timesteps, edge_ring, lr_factor, visible_region
from adapterlib.analysis.figures import boxed_grid
from adapterlib.analysis.gates import gate_stats
from adapterlib.paths import repo_path
from adapterlib.model.precision import precision_policy
from adapterlib.files import OutOfSpace, write_json
from adapterlib.training.lock import RunLock, RunLocked
from adapterlib.training.progress import Progress
from adapterlib.runs import CHANGES, DATA_REPORT, RunLog, effective_config, latest_checkpoint, run_dir, runs_root
from adapterlib.model.sample import generate

class Interrupted(KeyboardInterrupt):
    """Raised by SIGTERM (or `stop_at_step`) inside the loop, so it checkpoints like Ctrl-C does."""


# Devices where a step never waits for the host: the loss's finiteness is checked on the device (the fused
# AdamW skips a non-finite step itself, through `found_inf`), and counted and read at log intervals.
SYNC_FREE_DEVICES = ("cuda",)


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a step: the message says what to lower; the last checkpoint is intact."""


class NonFiniteLoss(RuntimeError):
    """`max_nonfinite_steps` non-finite losses in a row: the run stops, its last checkpoint untouched."""


# ---------------------------------------------------------------------------------------------
# the resume policy (config.RESUME_FIXED / RESUME_FREE), applied to a run folder

def resume_config(run: str | Path, **changes) -> TrainConfig:
    """The config to resume `run` (a name or path) with: its effective config, with `changes` to the
    fields that may change on resume; any other change is an error naming the field."""
    folder = run_dir(run)
    saved = effective_config(folder)
    cfg = TrainConfig(**{**saved, **resume_changes(saved, changes, folder)})
    if run_dir(cfg.run_name) != folder:      # a run given by a path outside the runs root keeps that path
        cfg.run_name = str(folder)
    return cfg


# ---------------------------------------------------------------------------------------------
# the loop, in parts that read alone: the run opened under its lock (`open_run`), the model, optimiser and data
# set up (`set_up`), one optimisation step (`step_loss`, `update`), the numbers between log rows (`Meter`), a
# checkpoint (`Saver`); `train` strings them together top to bottom.

def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, progress_every_s: float = 30.0,
          on_log=None, stop_at_step: int | None = None) -> Path:
    """Train the run `cfg.run_name` (a name under the runs root, or a path); returns its folder.

    A run has one writer: the run's lock (adapterlib/training/lock.py) is taken before anything is written, and a second
    process training the same run stops with `RunLocked`. A new run refuses a folder that already has a
    checkpoint (resume it, or pick another name); a run killed before its first checkpoint starts again from
    step 0, saying so. With `resume`, training continues from the latest complete checkpoint; `cfg` may differ
    from the run's config only in the fields that may change on resume, and the changes are written to train.log.
    `progress`: a progress bar (a widget in a notebook); lines go to the terminal every `progress_every_s`
    seconds either way. `on_log(run_dir)` is called at each logging interval (the notebook's live plot);
    `stop_at_step` simulates an interrupt there.

    Started by `accelerate launch` (or `launch`) with several processes, `batch_size` is the global batch,
    split over them; rank 0 writes the run folder and holds the lock (adapterlib/training/distributed.py)."""
    check_data(cfg)
    shard, cfg = distributed.setup(cfg)
    folder = run_dir(cfg.run_name)
    lock, lock_note = take_lock(folder, shard)
    try:
        run = open_run(cfg, folder, resume, shard)
        if lock_note:
            run.notes.append(lock_note)
        training = set_up(cfg, shard, run, progress)
        return _loop(training, run, progress, progress_every_s, on_log, stop_at_step)
    finally:
        lock.release()


def check_data(cfg: TrainConfig) -> None:
    """No silent Shapes on the real path: a run that names no data (the sd15 preset), or a latent base (one with
    a VAE: Stable Diffusion) given the generated 32-px Shapes world, stops here and says what to give."""
    if not cfg.data.strip():
        raise ValueError(f"data is empty: the {cfg.preset!r} preset trains on your data and names none. Give a "
                         "manifest, data=PATH/data.jsonl (`python -m adapterlib import coco ...` writes one from COCO "
                         "or ODVG annotations; docs/guide/data.md), or data=shapes-v2 for the generated Shapes world on the "
                         "shipped base")
    if worlds.is_shapes(cfg.data) and (resolve_base_path(cfg.base_model) / "vae").is_dir():
        raise ValueError(f"base {cfg.base_model} is a latent model (it has a VAE) but data = {cfg.data!r} is the "
                         "generated Shapes world, 32-px images made for the shipped pixel base: give your manifest, "
                         "data=PATH/data.jsonl. To train this base on Shapes images anyway, write them as a manifest "
                         "(adapterlib.shapes.write_dataset(folder, n)) and give its data.jsonl")


def take_lock(folder: Path, shard: distributed.Shard) -> tuple[RunLock, str | None]:
    """The run's writer lock, taken by rank 0 for every process before anything is written; every process
    stops alike when it is held elsewhere."""
    lock, note, refused = RunLock(folder), None, None
    if shard.main:
        try:
            note = lock.acquire()
        except RunLocked as e:
            refused = e
    if shard.world > 1 and int(shard.sum(torch.tensor(float(refused is not None), device=shard.device))):
        raise refused or RunLocked(f"run {folder} is being trained by another process (rank 0 of this job could not "
                                   "take the run's lock: its message says which)")
    if refused is not None:
        raise refused
    return lock, note


@dataclass
class OpenedRun:
    """What opening the run decided: a new run or a resume, from which checkpoint, with which changes."""
    folder: Path
    resume: bool
    latest: tuple[int, Path] | None          # the checkpoint resumed from
    state: dict | None                       # its state.pt: plain data only
    changes: dict                            # the resume's changes to the config (free fields only)
    notes: list[str]                         # for train.log and the first progress line


def open_run(cfg: TrainConfig, folder: Path, resume: bool, shard: distributed.Shard) -> OpenedRun:
    """Decide new run or resume (every check before any work), and write a new run's config.json."""
    notes = []
    existing = latest_checkpoint(folder)
    if existing is not None and not resume:
        raise FileExistsError(f"run {folder} already exists with a checkpoint at step {existing[0]}: resume it "
                              "(notebooks/03_resume.ipynb, `python -m adapterlib train --resume NAME`) or choose "
                              "another run_name")
    if resume and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"resume: {folder} is not a run folder (no config.json)")
    latest, skipped_notes = checkpoint.latest_valid_checkpoint(folder) if resume else (None, [])
    notes += skipped_notes
    state = checkpoint.load_state(latest[1]) if latest is not None else None   # plain data only, before any work
    if resume and latest is not None:
        saved = {**effective_config(folder), "run_name": cfg.run_name}     # the folder is the run's identity
        changes = resume_changes(saved, {k: getattr(cfg, k) for k in FIELDS}, folder)
        notes.append(f"resumed at step {latest[0]} of {cfg.steps}")
    else:
        if (folder / "config.json").is_file():        # killed before its first checkpoint
            notes.append(f"run {folder.name} has no {'valid' if skipped_notes else 'complete'} checkpoint: "
                         "starting again from step 0")
        resume, changes = False, {}
        shard.wait()                                   # every process has read the folder before rank 0 writes
        if shard.main:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "config.json", cfg.to_dict())      # atomically: a kill never leaves half a config
            (folder / "config.txt").write_text(cfg.to_text())
        notes.append(f"started at step 0 of {cfg.steps}")
    if shard.world > 1:
        notes.append(shard.describe())
    if state is not None and state.get("processes", 1) != shard.world:
        notes.append(f"the checkpoint was written by {state.get('processes', 1)} process(es), this run has "
                     f"{shard.world}: the same global batch and random numbers, float rounding differs")
    return OpenedRun(folder, resume, latest, state, changes, notes)


@dataclass
class Training:
    """Everything a step needs: the frozen base and the adapter as one module, the optimiser, the data."""
    cfg: TrainConfig
    shard: distributed.Shard
    base: object
    adapter: object
    model: torch.nn.Module                  # AdaptedUNet (DDP-wrapped with several processes, compiled if asked)
    params: dict                            # the adapter's trainable parameters, by name
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    compute_dtype: torch.dtype
    amp_dtype: torch.dtype | None
    sync_free: bool                         # CUDA: no host sync per step (SYNC_FREE_DEVICES)
    slots: int | None                       # grounding slots per batch (compiled runs: max_objects)
    source: object                          # inputs.training_source: cached encodings or images
    eval_records: list                      # drawn at each checkpoint

    @property
    def device(self) -> torch.device:
        return self.shard.device


def set_up(cfg: TrainConfig, shard: distributed.Shard, run: OpenedRun, progress: bool) -> Training:
    """The frozen base in the compute dtype, the fp32 adapter (master weights) and the optimiser, the data source
    (checked and cached before any step), and the resumed states."""
    device = shard.device
    compute_dtype = precision_policy(device, cfg.mixed_precision)[0]
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.base_model, device=device, dtype=compute_dtype)
    check_preset_fits(cfg, base)
    if cfg.box_loss_weight > 0 and cfg.box_loss_region != "box" and base.vae is not None:
        raise ValueError(f"box_loss_region = {cfg.box_loss_region!r} needs a pixel base (the Shapes bases); "
                         f"{cfg.base_model} has a "
                         "VAE, so an object's pixels are not the prediction's cells: use box_loss_region = 'box'")
    adapter = build_adapter(base, **architecture_options(cfg))       # the same builder as notebook 01's
    if run.resume:              # a checkpoint of another base (an SD 1.5 adapter, the folder now SDXL): refused now
        checkpoint.check_adapter_fits(run.latest[1], base)
    if cfg.init_from and not run.resume:                     # a diffusers GLIGEN folder's weights (a resume reads its own)
        from adapterlib.model.gligen import load_gligen_weights
        load_gligen_weights(adapter, repo_path(cfg.init_from))
    training = make_training(cfg, shard, base, adapter)
    folder = run.folder
    with shard.main_first():                                  # rank 0 writes a generated set (and its cache) once
        report = folder / DATA_REPORT      # on resume: the manifest the run started with
        started_with = json.loads(report.read_text()).get("manifest") if run.resume and report.is_file() else None
        manifest = worlds.training_manifest(cfg.data, cfg.n_train, runs_root(), started_with)
        source, source_note = inputs.training_source(
            base, manifest, runs_root(), cache=cfg.cache, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed,
            max_objects=cfg.max_objects, on_bad_record=cfg.on_bad_record, compute_dtype=compute_dtype,
            progress=progress and shard.main)
    run.notes.append(source_note)
    training.source = source
    if cfg.box_loss_weight > 0 and cfg.box_loss_region != "box":
        worlds.check_region_records(source.records, cfg.box_loss_region)   # or stop before any step
    if shard.main:
        write_json(folder / DATA_REPORT, dict(manifest=str(manifest), records=len(source), skipped=len(source.skipped),
                                              on_bad_record=cfg.on_bad_record, first_reasons=source.skipped[:10],
                                              inputs=source_note))
    if source.skipped:
        run.notes.append(f"{len(source.skipped)} bad record(s) skipped (on_bad_record='skip'; first: "
                         f"{source.skipped[0]}; all in {DATA_REPORT})")
    training.eval_records = worlds.sample_records(cfg.data, source.records, cfg.n_samples, cfg.heldout)
    if run.resume:
        adapter.load_state_dict(load_file(str(run.latest[1] / "adapter.safetensors"), device=str(device)))
        training.opt.load_state_dict(run.state["optimizer"])
        training.sched.load_state_dict(run.state["scheduler"])
        training.scaler.load_state_dict(run.state["scaler"])
    return training


def make_training(cfg: TrainConfig, shard: distributed.Shard, base, adapter) -> Training:
    """What a run of `cfg` steps with, around `adapter` (attached to `base`): the one module (DDP-wrapped with several
    processes, compiled if asked), AdamW with two groups (the gates and learned depth weights at lr *
    gate_lr_scale without weight decay; the rest at lr), the schedule (`losses.lr_factor`) and the loss scaler.
    `set_up` adds the data; `bench` builds one to time this same step (`step_loss`, `update`)."""
    device = shard.device
    compute_dtype, amp_dtype, use_scaler = precision_policy(device, cfg.mixed_precision)
    set_gradient_checkpointing(base.net, adapter, cfg.gradient_checkpointing)
    model = shard.wrap(AdaptedUNet(base.net, adapter))      # DDP with several processes
    params = adapter.trainable_parameters()
    fast = adapter.fast_parameters()                        # the gates (and learned depth weights): lr * gate_lr_scale
    sync_free = device.type in SYNC_FREE_DEVICES
    opt = torch.optim.AdamW([
        {"params": [p for n, p in params.items() if n not in fast], "weight_decay": cfg.weight_decay},
        {"params": list(fast.values()), "weight_decay": 0.0, "lr": cfg.lr * cfg.gate_lr_scale}], lr=cfg.lr,
        fused=sync_free)
    # compiled: every batch has max_objects grounding slots, so the model compiles once (a batch's largest object
    # count varies; inductor's dynamic shapes failed on it, and a graph per count would compile up to 30 times)
    slots = cfg.max_objects if cfg.compile else None
    if cfg.compile:
        model = torch.compile(model, dynamic=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    return Training(cfg, shard, base, adapter, model, params, opt, sched, scaler, compute_dtype, amp_dtype, sync_free,
                    slots, source=None, eval_records=[])


@dataclass
class StepInputs:
    """Everything a step's forward takes, for this process's rows of the global batch, drawn in one fixed order."""
    noisy: torch.Tensor
    target: torch.Tensor
    net_t: torch.Tensor
    context: torch.Tensor
    grounding: Grounding
    scale: torch.Tensor
    added: dict | None                      # SDXL's / SD3's added conditioning
    region: torch.Tensor | None             # the box loss's regions (box_loss_region other than "box")
    objects: torch.Tensor | None            # the box loss's divisor: the global batch's objects / processes


def step_inputs(training: Training, batch: inputs.Batch, gen: torch.Generator) -> StepInputs:
    """The inputs of one step. The random numbers of the whole global batch are drawn in a fixed order from `gen`
    (several processes: each keeps its rows), so micro-batches and processes split the same draws."""
    cfg, shard, device, base = training.cfg, training.shard, training.device, training.base
    # --- inputs: captions (caption dropout), grounding (phrase dropout), latents, noise, timesteps, scales
    drop = shard.take(torch.rand(cfg.batch_size, generator=gen)) < cfg.caption_dropout
    context, phrase_embeddings, added = inputs.text_inputs(base, batch, drop, device, training.compute_dtype, training.amp_dtype)
    grounding = Grounding.from_records(batch.records, phrase_embeddings, max_objects=cfg.max_objects,
                                       phrase_dropout=cfg.phrase_dropout, generator=gen,
                                       part=shard.part(batch.records), pad_to=training.slots)
    latents = inputs.sample_latents(base, batch, gen, device, training.compute_dtype, training.amp_dtype,
                                       draw=lambda shape: shard.take(torch.randn((cfg.batch_size, *shape[1:]), generator=gen)))
    noise = shard.take(torch.randn((cfg.batch_size, *latents.shape[1:]), generator=gen)).to(device)
    t = shard.take(draw_timesteps(cfg.timesteps, cfg.batch_size, base.scheduler.config.num_train_timesteps, gen)).to(device)
    scale = shard.take(cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(cfg.batch_size, generator=gen)).to(device)
    noisy, target, net_t = base.noised(latents, noise, t)       # DDPM's target, or flow matching's velocity (SD3)
    region = objects = None
    if cfg.box_loss_weight > 0:
        # several processes: each adds its objects' errors over the global batch's object count, times the
        # process count (DDP averages the gradients), so together they make the global batch's loss; micro-batches
        # the same, summed
        objects = shard.sum(grounding.present.sum().float()) / shard.world
        region = (visible_region(batch, grounding, latents.shape[-2:], cfg.box_loss_region)
                  if cfg.box_loss_region != "box" else None)
        if cfg.box_loss_ring > 0:                                # and the background just outside each box
            grid = tuple(latents.shape[-2:])
            inside = region if region is not None else region_mask(grounding.boxes, *grid)
            region = inside | edge_ring(grounding.boxes, grid, cfg.box_loss_ring)
    return StepInputs(noisy, target, net_t, context, grounding, scale, added, region, objects)


def micro_loss(training: Training, x: StepInputs, rows: slice | None = None, share: float = 1.0) -> torch.Tensor:
    """The loss of `rows` of the step's inputs (None: all of them) through the one module: the image MSE (times
    `share`, the rows' part of the batch, so that micro-batches sum to the batch's mean) plus the box loss (its
    divisor is the whole batch's object count already)."""
    cfg = training.cfg
    take = (lambda v: v) if rows is None else (lambda v: None if v is None else v[rows])
    grounding = x.grounding if rows is None else x.grounding.rows(rows)
    added = x.added if rows is None or not x.added else {k: take(v) for k, v in x.added.items()}
    target = take(x.target)
    with torch.autocast(training.device.type, training.amp_dtype, enabled=training.amp_dtype is not None):
        pred = training.model(take(x.noisy).to(training.compute_dtype), take(x.net_t), take(x.context), grounding,
                              take(x.scale), added)                    # added: SDXL's, SD3's
    loss = F.mse_loss(pred.float(), target)
    if rows is not None:
        loss = loss * share
    if cfg.box_loss_weight > 0:
        loss = loss + cfg.box_loss_weight * box_loss(pred.float(), target, grounding, x.objects, take(x.region))
    return loss


def step_loss(training: Training, batch: inputs.Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's loss and the global batch's (every process decides alike on it): `step_inputs`, then the
    forward of all its rows (`micro_loss`)."""
    loss = micro_loss(training, step_inputs(training, batch, gen))
    return loss, training.shard.mean(loss.detach())


def accumulated_backward(training: Training, batch: inputs.Batch, gen: torch.Generator,
                         first=nullcontext()) -> torch.Tensor:
    """`gradient_accumulation_steps` micro-batches of this process's rows, each forward and backward in turn (the
    activations of one at a time), their gradients summed into the one step's; DDP averages over the processes at
    the last one only. Returns the global batch's loss, as `step_loss` does; `update(training, None, ...)` steps."""
    k = training.cfg.gradient_accumulation_steps
    x = step_inputs(training, batch, gen)
    n = len(x.noisy)
    size = n // k
    total = torch.zeros((), device=training.device)
    for i in range(k):
        last = i == k - 1
        sync = nullcontext() if last or not hasattr(training.model, "no_sync") else training.model.no_sync()
        with sync:
            with first if i == 0 else nullcontext():          # (the memory estimate watches the first forward)
                loss = micro_loss(training, x, slice(i * size, (i + 1) * size), size / n)
            if torch.isfinite(loss) or training.sync_free:            # a non-finite one: the step is skipped
                training.scaler.scale(loss).backward()
        total = total + loss.detach()
    return training.shard.mean(total)


def update(training: Training, loss: torch.Tensor, batch_loss: torch.Tensor, counted: "NonFiniteCount | None"):
    """Backward, clip, the optimiser and schedule steps, behind the one guard against a non-finite loss. Returns the
    gradient norm (None: the step was skipped on the host) and whether the loss was finite (on the device).

    The guard: where the host reads the loss at no cost (the CPU), a non-finite loss skips backward and the
    optimiser step, and the schedule moves on. Where reading it would make every step wait for the device (CUDA:
    `sync_free`), the check stays on the device: the update runs, and the fused AdamW skips its own parameter
    update when its `found_inf` tensor is 1 -- the flag torch's loss scaler hands it under fp16; without a scaler
    we set it ourselves for this one step, then remove it. `counted` counts the skips, read at log intervals."""
    good = torch.isfinite(batch_loss)
    if not training.sync_free and not good:
        training.sched.step()
        return None, good
    if loss is not None:                     # None: `accumulated_backward` did the backward passes
        training.scaler.scale(loss).backward()
    training.scaler.unscale_(training.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(training.params.values()), training.cfg.grad_clip)
    if training.sync_free:
        if not training.scaler.is_enabled():
            training.opt.found_inf = (~good).float()
        counted.add(~good)
    training.scaler.step(training.opt)
    training.opt.__dict__.pop("found_inf", None)
    training.scaler.update()
    training.sched.step()
    return grad_norm, good


class Meter:
    """The numbers between two log rows: the mean finite loss and the samples/s since the last row, and the
    non-finite losses (checked every step on the CPU; counted on the device and read at intervals on CUDA), with
    the stop rule `max_nonfinite_steps`."""

    def __init__(self, training: Training, log, bar, skipped: int, last_saved: int):
        self.training, self.log, self.bar, self.skipped, self.last_saved = training, log, bar, skipped, last_saved
        self.skipped_before, self.in_a_row = skipped, 0
        self.counted = NonFiniteCount(training.device) if training.sync_free else None
        self.t_start = time.perf_counter()
        self.restart()

    def restart(self) -> None:
        """A new window after a row: the loss sums and the clock."""
        zero = lambda: torch.zeros((), device=self.training.device)
        self.loss_sum, self.loss_count = zero(), zero()
        self.restart_clock()

    def restart_clock(self) -> None:
        """samples/s counts training only: the clock restarts after a checkpoint (the loss sums go on)."""
        self.window_steps, self.t_window = 0, time.perf_counter()

    def add(self, batch_loss: torch.Tensor, good: torch.Tensor) -> None:
        self.loss_sum += torch.where(good, batch_loss, 0.0)   # read back at log intervals only: no host sync per step
        self.loss_count += good
        self.window_steps += 1
        self.in_a_row = 0

    def skip(self, batch_loss: torch.Tensor, at_step: int) -> None:
        """The CPU's per-step check found a non-finite loss: the step is skipped (no update)."""
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        self.log.text(f"step {at_step}: non-finite loss {batch_loss.item()}, step skipped ({self.skipped} so far)")
        if self.in_a_row >= self.training.cfg.max_nonfinite_steps:
            self.stop(self.in_a_row, at_step)

    def read_device_counts(self, at_step: int) -> None:
        """Sync-free devices: the skipped total, a note, the stop rule."""
        total, new, longest = self.counted.read()
        self.skipped = self.skipped_before + total
        if new:
            self.log.text(f"steps up to {at_step}: {new} non-finite loss(es), steps skipped ({self.skipped} so far)")
        if longest >= self.training.cfg.max_nonfinite_steps:
            self.stop(longest, at_step)

    def stop(self, in_a_row: int, at_step: int):
        cfg = self.training.cfg
        message = (f"{in_a_row} non-finite losses in a row, the last at step {at_step}: the numbers overflow. Check "
                   f"mixed_precision ({cfg.mixed_precision!r}: fp16 needs the loss scaler; try bf16 or no) and lower lr "
                   f"({cfg.lr:g}); the last checkpoint (step {self.last_saved}) is untouched")
        self.log.text(f"stopped: {message}")
        self.bar.say(f"stopped: {message}")
        raise NonFiniteLoss(message)

    def row(self, step: int, batch_loss: torch.Tensor, grad_norm: torch.Tensor) -> dict:
        """The metrics.csv row of this window (gate statistics read now); the window restarts."""
        stats = gate_stats(self.training.adapter)
        now = time.perf_counter()
        row = dict(step=step, loss=batch_loss.item(), loss_avg=self.loss_avg(), lr=self.training.sched.get_last_lr()[0],
                   grad_norm=grad_norm.item(), samples_per_s=self.samples_per_s(now), wall_s=now - self.t_start,
                   skipped=self.skipped, peak_mem_gib=memory.peak(self.training.device), **stats)
        self.restart()
        return row

    def loss_avg(self) -> float:
        return self.loss_sum.item() / max(1.0, self.loss_count.item())

    def samples_per_s(self, now: float | None = None) -> float:
        return self.window_steps * self.training.cfg.batch_size / max((now or time.perf_counter()) - self.t_window, 1e-9)


class Saver:
    """Writes a checkpoint (rank 0; the other processes wait), prunes old ones (`keep_last`), and draws the
    checkpoint's samples."""

    def __init__(self, training: Training, folder: Path, log, bar):
        self.training, self.folder, self.log, self.bar = training, folder, log, bar
        self.detector = None                        # the run's detector, loaded at the first measurement
        self.measuring = training.cfg.checkpoint_grounding

    def __call__(self, at_step: int, rng_state: torch.Tensor, skipped: int) -> dict:
        """Save (rank 0); the checkpoint samples' grounding (`measure`), {} when not measured or on another rank."""
        return self.training.shard.main_only(self._save)(at_step, rng_state, skipped) or {}

    def measure(self, images, at_step: int) -> dict:
        """The checkpoint samples measured by the run's detector (`checkpoint_grounding`): the grounding_* columns
        of metrics.csv, and a train.log line with what it cost. Turned off, with one line saying why, when the
        detector can measure none of the layouts' phrases (the colour detector on "dog")."""
        training, cfg = self.training, self.training.cfg
        start = time.perf_counter()
        if self.detector is None:
            self.detector = worlds.load_detector(cfg.detector, training.device)
        records = training.eval_records
        if not any(self.detector.measurable(o.phrase) for r in records for o in r.objects):
            self.measuring = False
            self.log.text(f"checkpoint grounding off: the {self.detector.name} detector can measure none of the "
                          f"checkpoint samples' phrases (e.g. {records[0].objects[0].phrase!r}); set `detector`")
            return {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*could not be measured")
            summary = worlds.measure(images, records, self.detector)[1]
        found = dict(grounding_success=summary["success_rate"], grounding_miou=summary["miou"],
                     grounding_o_miou=math.nan if summary["o_miou"] is None else summary["o_miou"])
        self.log.text(f"grounding at step {at_step} on the {len(records)} checkpoint samples by {self.detector.name}: "
                      f"success {found['grounding_success']:.3f}, mIoU {found['grounding_miou']:.3f}, O-mIoU "
                      f"{found['grounding_o_miou']:.3f} (measured in {time.perf_counter() - start:.2f} s)")
        return found

    def _save(self, at_step: int, rng_state: torch.Tensor, skipped: int) -> dict:
        training, cfg, folder, log = self.training, self.training.cfg, self.folder, self.log
        state = dict(optimizer=training.opt.state_dict(), scheduler=training.sched.state_dict(), scaler=training.scaler.state_dict(),
                     rng=checkpoint.rng_state(rng_state), step=at_step, samples_seen=at_step * cfg.batch_size,
                     skipped=skipped, processes=training.shard.world)
        try:
            path = checkpoint.save_checkpoint(folder, at_step, training.adapter, state, cfg.to_dict())
        except (checkpoint.CheckpointError, OutOfSpace) as e:
            log.text(f"checkpoint failed: {e}")
            self.bar.say(f"checkpoint failed: {e}")
            raise
        for gone in checkpoint.prune_checkpoints(folder, cfg.keep_last):      # under the run's lock
            log.text(f"checkpoint step {gone} deleted (keep_last {cfg.keep_last})")
        if training.eval_records:
            images = generate(training.base, training.eval_records, list(range(len(training.eval_records))), adapter=training.adapter,
                              batch_size=32)
            (folder / "samples").mkdir(exist_ok=True)
            grid = boxed_grid(images, training.eval_records)
            grid.save(folder / "samples" / f"step_{at_step:07d}.png")
            log.image("samples", grid, at_step)
        log.text(f"checkpoint {path.relative_to(folder)}")
        return self.measure(images, at_step) if training.eval_records and self.measuring else {}


def _loop(training: Training, run: OpenedRun, progress: bool, progress_every_s: float, on_log, stop_at_step) -> Path:
    """The steps from the run's current step to `steps`, with logging and checkpoints, then the final adapter."""
    cfg, shard, folder = training.cfg, training.shard, run.folder
    gen, step, log, bar, meter, save = _start(training, run, progress, progress_every_s)
    watch = None                           # the first step's saved activations (rank 0; not under torch.compile)
    if shard.main and step < cfg.steps:
        log.text(memory.describe_parameters(training))
        watch = None if cfg.compile else memory.SavedBytes(getattr(training.model, "module", training.model))
    rng_done = gen.get_state()                 # RNG state after the last completed step: what a checkpoint holds
    batches = inputs.step_batches(training.source, seed=cfg.seed, batch_size=cfg.batch_size, start=step,
                                 stop=cfg.steps, workers=cfg.num_workers, take=shard.take)
    restore_signals = shard.handle_signals(_on_sigterm)
    try:
        while step < cfg.steps:
            if stop_at_step is not None and step == stop_at_step:
                raise Interrupted(f"stop_at_step {stop_at_step}")
            if shard.stopping:
                raise Interrupted(f"a signal to one of the {shard.world} processes")
            first = watch if watch is not None and not watch.done else nullcontext()
            if cfg.gradient_accumulation_steps == 1:
                with first:
                    loss, batch_loss = step_loss(training, next(batches), gen)
                training.opt.zero_grad(set_to_none=True)
            else:
                training.opt.zero_grad(set_to_none=True)
                loss, batch_loss = None, accumulated_backward(training, next(batches), gen, first)
            grad_norm, good = update(training, loss, batch_loss, meter.counted)
            if first is watch:
                micro = cfg.batch_size // shard.world // cfg.gradient_accumulation_steps
                log.text(memory.describe(memory.estimate(training, watch.bytes // micro), training.device,
                                         memory.peak(training.device)))
            step, rng_done = step + 1, gen.get_state()   # the step is complete only now
            if grad_norm is None:                        # non-finite, skipped on the host (update's guard)
                meter.skip(batch_loss, step)
                continue
            meter.add(batch_loss, good)
            bar.tick(step)
            saving = step % cfg.save_every == 0 or step == cfg.steps
            logging, due = step % cfg.log_every == 0 or saving, bar.due()    # a checkpoint's row holds its grounding
            if training.sync_free and (logging or due):
                meter.read_device_counts(step)
            if due:
                bar.line(meter.loss_avg(), gate_stats(training.adapter)["gate_mean"], meter.samples_per_s(),
                         cfg.batch_size)
            row = meter.row(step, batch_loss, grad_norm) if logging else None     # its speed: before the save
            if saving:
                row.update(save(step, rng_done, meter.skipped))
                meter.last_saved = step
                meter.restart_clock()
            if logging:
                log.row(row)
                if on_log is not None and shard.main:
                    on_log(folder)
    except torch.OutOfMemoryError as e:
        raise _out_of_memory(training, step, meter, log, bar) from e
    except KeyboardInterrupt as stop:           # Ctrl-C, a kernel interrupt, SIGTERM, stop_at_step
        if step > meter.last_saved:
            save(step, rng_done, meter.skipped)
        log.text(f"interrupted at step {step} ({stop!r}); resume with notebooks/03_resume.ipynb "
                 f"or `python -m adapterlib train --resume {folder.name}`")
        bar.say(f"interrupted at step {step}; checkpoint saved")
        raise
    finally:
        restore_signals()
        bar.close()
    if step > meter.last_saved:
        save(step, rng_done, meter.skipped)
    return _finish(training, run, step, meter, log, bar)


def _on_sigterm(signum, frame):
    """SIGTERM (a killed papermill job, a scheduler) checkpoints like Ctrl-C (several processes: after the step)."""
    raise Interrupted(f"signal {signum}")


def _start(training: Training, run: OpenedRun, progress: bool, progress_every_s: float):
    """Before the first step: the random stream and the step where the run stands, the run's log and progress line
    (rank 0), the first line saying what runs where, the meter and the saver."""
    cfg, shard, folder = training.cfg, training.shard, run.folder
    gen = torch.Generator().manual_seed(cfg.seed)
    step, skipped = 0, 0
    if run.resume:
        step = run.latest[0]
        checkpoint.set_rng_state(gen, run.state["rng"])
        skipped = run.state["skipped"]
    log = RunLog(folder, list(gate_stats(training.adapter))[3:], step if run.resume else None,
                 trackers=trackers(cfg), config=cfg.to_dict()) if shard.main else distributed.SILENT
    bar = (Progress(folder.name, step, cfg.steps, every_s=progress_every_s, bar=progress) if shard.main
           else distributed.SILENT)
    notes = run.notes
    if run.changes:
        log.text(CHANGES + json.dumps({k: v for k, v in run.changes.items()}))
        notes.append("with changes " + ", ".join(f"{k}={v!r}" for k, v in run.changes.items()))
    summary = (f"{'; '.join(notes)} on {training.device} (base {cfg.base_model}, adapter {cfg.adapter_attention}/"
               f"{cfg.adapter_norm}, {sum(p.numel() for p in training.params.values())} trainable parameters)")
    log.text(summary)
    bar.say(f"{summary}; run folder {folder}")
    return gen, step, log, bar, Meter(training, log, bar, skipped, last_saved=step), Saver(training, folder, log, bar)


def _out_of_memory(training: Training, step: int, meter: "Meter", log, bar) -> OutOfMemory:
    """The out-of-memory stop, logged, naming what to lower."""
    cfg = training.cfg
    per = cfg.batch_size // training.shard.world
    k = cfg.gradient_accumulation_steps
    fits = (f"gradient_accumulation_steps {2 * k} keeps the batch and halves the activations (micro-batch "
            f"{per // (2 * k)}; a new run), " if per % (2 * k) == 0 else "")
    if not cfg.gradient_checkpointing:
        fits += "gradient_checkpointing true keeps only each block's inputs (free on resume: --resume RUN), "
    message = (f"out of {training.device.type} memory at step {step + 1} (batch {per} per process in micro-batches "
               f"of {per // k}, at {training.base.resolution} px, mixed_precision {cfg.mixed_precision!r}): {fits}"
               f"lower batch_size, keep "
               f"mixed_precision bf16/fp16 on a GPU, train at a lower resolution (a base with a smaller sample_size), "
               f"or spread the batch over more GPUs (accelerate launch); the last checkpoint (step {meter.last_saved}) "
               f"is untouched")
    log.text(f"stopped: {message}")
    bar.say(f"stopped: {message}")
    return OutOfMemory(message)


def _finish(training: Training, run: OpenedRun, step: int, meter: "Meter", log, bar) -> Path:
    """After the last step (its checkpoint written): the final adapter, the crop / flip counts, the last lines."""
    cfg, shard, folder = training.cfg, training.shard, run.folder
    final = shard.main_only(checkpoint.save_final)(folder, training.adapter, dict(step=step, skipped=meter.skipped))
    if cfg.crop != "none" or cfg.flip:
        source = training.source
        counts = dict(cropped_away=shard.total(source.dropped_by_crop), flipped=shard.total(source.flipped),
                      side_words_flipped=shard.total(source.side_words_flipped))
        if shard.main:
            write_json(folder / DATA_REPORT, {**json.loads((folder / DATA_REPORT).read_text()), **counts})
        log.text(f"crop {cfg.crop!r}, flip {cfg.flip}: {counts['cropped_away']} object(s) cropped away, "
                 f"{counts['flipped']} sample(s) flipped, {counts['side_words_flipped']} flipped phrase(s) naming a "
                 "side (left as written) since this process started")
    log.text(f"finished: {step} steps, final adapter in final/adapter.safetensors")
    bar.say(f"finished: {step} steps in {time.perf_counter() - meter.t_start:.0f} s; final adapter in {final}")
    log.close()            # after the final checkpoint's sample grid (each TensorBoard write is flushed as it goes)
    training.adapter.detach()
    return folder


def launch(cfg: TrainConfig, num_processes: int, *, resume: bool = False, **launcher_options) -> Path:
    """Train `cfg` on `num_processes` processes from a notebook (`accelerate.notebook_launcher`: GPUs, or
    CPU processes where there is no GPU); returns the run folder. `batch_size` is the global batch.
    `launcher_options` go to notebook_launcher (e.g. `use_port="29501"` when another run holds 29500)."""
    from accelerate import notebook_launcher

    distributed.check_batch(cfg.batch_size, num_processes)
    notebook_launcher(_train_process, (cfg.to_dict(), resume), num_processes=num_processes, **launcher_options)
    return run_dir(cfg.run_name)


def _train_process(config: dict, resume: bool) -> None:
    train(TrainConfig(**config), resume=resume, progress=False)


class NonFiniteCount:
    """Non-finite losses counted on the device, so a step never waits for the host: the total, those since the
    last read, and the longest run in a row since the last read (a run still going carries over)."""

    def __init__(self, device):
        zero = lambda: torch.zeros((), dtype=torch.int64, device=device)
        self.total, self.new, self.run, self.longest = zero(), zero(), zero(), zero()

    def add(self, bad: torch.Tensor) -> None:
        bad = bad.long()
        self.total += bad
        self.new += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def read(self) -> tuple[int, int, int]:
        total, new, longest = (int(v) for v in torch.stack([self.total, self.new, self.longest]).tolist())
        self.new.zero_()
        self.longest.copy_(self.run)
        return total, new, longest
