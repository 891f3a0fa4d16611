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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapterlib.training import checkpoint
from adapterlib.training import worlds
from adapterlib.training import distributed
from adapterlib.training import cache
from adapterlib.model.adapter import AdaptedUNet, Grounding, architecture_options, build_adapter, region_mask
from adapterlib.model.base import load_base, resolve_base_path
from adapterlib.options import TIMESTEPS
from adapterlib.training.config import FIELDS, TrainConfig, resume_changes
from adapterlib.analysis.figures import boxed_grid
from adapterlib.analysis.gates import gate_stats
from adapterlib.paths import repo_path
from adapterlib.model.precision import precision_policy
from adapterlib.files import write_json
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
        s = set_up(cfg, shard, run, progress)
        return _loop(s, run, progress, progress_every_s, on_log, stop_at_step)
    finally:
        lock.release()


def check_data(cfg: TrainConfig) -> None:
    """No silent Shapes on the real path: a run that names no data (the sd15 preset), or a latent base (one with
    a VAE: Stable Diffusion) given the generated 32-px Shapes world, stops here and says what to give."""
    if not cfg.data.strip():
        raise ValueError(f"data is empty: the {cfg.preset!r} preset trains on your data and names none. Give a "
                         "manifest, data=PATH/data.jsonl (`python -m adapterlib import coco ...` writes one from COCO "
                         "or ODVG annotations; docs/data.md), or data=shapes-v2 for the generated Shapes world on the "
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
class Setup:
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
    source: object                          # cache.training_source: cached encodings or images
    eval_records: list                      # drawn at each checkpoint

    @property
    def device(self) -> torch.device:
        return self.shard.device


def set_up(cfg: TrainConfig, shard: distributed.Shard, run: OpenedRun, progress: bool) -> Setup:
    """The frozen base in the compute dtype, the fp32 adapter (master weights) and the optimiser, the data source
    (checked and cached before any step), and the resumed states."""
    device = shard.device
    compute_dtype, amp_dtype, use_scaler = precision_policy(device, cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.base_model, device=device, dtype=compute_dtype)
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
    model = shard.wrap(AdaptedUNet(base.unet, adapter))      # DDP with several processes
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
    folder = run.folder
    with shard.main_first():                                  # rank 0 writes a generated set (and its cache) once
        report = folder / DATA_REPORT      # on resume: the manifest the run started with
        started_with = json.loads(report.read_text()).get("manifest") if run.resume and report.is_file() else None
        manifest = worlds.training_manifest(cfg.data, cfg.n_train, runs_root(), started_with)
        source, source_note = cache.training_source(
            base, manifest, runs_root(), cache=cfg.cache, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed,
            max_objects=cfg.max_objects, on_bad_record=cfg.on_bad_record, compute_dtype=compute_dtype,
            progress=progress and shard.main)
    run.notes.append(source_note)
    if cfg.box_loss_weight > 0 and cfg.box_loss_region != "box":
        worlds.check_region_records(source.records, cfg.box_loss_region)   # or stop before any step
    if shard.main:
        write_json(folder / DATA_REPORT, dict(manifest=str(manifest), records=len(source), skipped=len(source.skipped),
                                              on_bad_record=cfg.on_bad_record, first_reasons=source.skipped[:10],
                                              inputs=source_note))
    if source.skipped:
        run.notes.append(f"{len(source.skipped)} bad record(s) skipped (on_bad_record='skip'; first: "
                         f"{source.skipped[0]}; all in {DATA_REPORT})")
    eval_records = worlds.sample_records(cfg.data, source.records, cfg.n_samples)
    if run.resume:
        adapter.load_state_dict(load_file(str(run.latest[1] / "adapter.safetensors"), device=str(device)))
        opt.load_state_dict(run.state["optimizer"])
        sched.load_state_dict(run.state["scheduler"])
        scaler.load_state_dict(run.state["scaler"])
    return Setup(cfg, shard, base, adapter, model, params, opt, sched, scaler, compute_dtype, amp_dtype, sync_free,
                 slots, source, eval_records)


def step_loss(s: Setup, batch: cache.Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's loss and the global batch's (every process decides alike on it). The random numbers of the
    whole global batch are drawn in a fixed order from `gen` (several processes: each keeps its rows)."""
    cfg, shard, device, base = s.cfg, s.shard, s.device, s.base
    # --- inputs: captions (caption dropout), grounding (phrase dropout), latents, noise, timesteps, scales
    drop = shard.take(torch.rand(cfg.batch_size, generator=gen)) < cfg.caption_dropout
    context, phrase_embeddings, added = cache.text_inputs(base, batch, drop, device, s.compute_dtype, s.amp_dtype)
    grounding = Grounding.from_records(batch.records, phrase_embeddings, max_objects=cfg.max_objects,
                                       phrase_dropout=cfg.phrase_dropout, generator=gen,
                                       part=shard.part(batch.records), pad_to=s.slots)
    latents = cache.sample_latents(base, batch, gen, device, s.compute_dtype, s.amp_dtype,
                                       draw=lambda shape: shard.take(torch.randn((cfg.batch_size, *shape[1:]), generator=gen)))
    noise = shard.take(torch.randn((cfg.batch_size, *latents.shape[1:]), generator=gen)).to(device)
    t = shard.take(draw_timesteps(cfg.timesteps, cfg.batch_size, base.scheduler.config.num_train_timesteps, gen)).to(device)
    scale = shard.take(cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(cfg.batch_size, generator=gen)).to(device)
    noisy = base.scheduler.add_noise(latents, noise, t)
    prediction = base.scheduler.config.prediction_type
    target = {"epsilon": noise, "v_prediction": base.scheduler.get_velocity(latents, noise, t),
              "sample": latents}[prediction]
    # --- forward: the frozen UNet with the adapter, through the one module
    with torch.autocast(device.type, s.amp_dtype, enabled=s.amp_dtype is not None):
        pred = s.model(noisy.to(s.compute_dtype), t, context, grounding, scale, added)   # added: SDXL's; SD: None
    loss = F.mse_loss(pred.float(), target)
    if cfg.box_loss_weight > 0:
        # several processes: each adds its objects' errors over the global batch's object count, times the
        # process count (DDP averages the gradients), so together they make the global batch's loss
        objects = shard.sum(grounding.present.sum().float()) / shard.world
        region = (visible_region(batch, grounding, pred.shape[-2:], cfg.box_loss_region)
                  if cfg.box_loss_region != "box" else None)
        loss = loss + cfg.box_loss_weight * box_loss(pred.float(), target, grounding, objects, region)
    return loss, shard.mean(loss.detach())


def update(s: Setup, loss: torch.Tensor, batch_loss: torch.Tensor, counted: "NonFiniteCount | None"):
    """Backward, clip, the optimiser and schedule steps. On sync-free devices a non-finite loss is caught on the
    device: the fused AdamW skips the update itself (`found_inf`) and `counted` counts it. Returns the gradient
    norm and whether the loss was finite (both on the device)."""
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(s.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(s.params.values()), s.cfg.grad_clip)
    good = torch.isfinite(batch_loss)
    if s.sync_free:                              # checked on the device; the fused AdamW skips a bad step
        if not s.scaler.is_enabled():            # (the loss scaler hands it its own found_inf)
            s.opt.found_inf = (~good).float()
        counted.add(~good)
    s.scaler.step(s.opt)
    s.opt.__dict__.pop("found_inf", None)
    s.scaler.update()
    s.sched.step()
    return grad_norm, good


class Meter:
    """The numbers between two log rows: the mean finite loss and the samples/s since the last row, and the
    non-finite losses (checked every step on the CPU; counted on the device and read at intervals on CUDA), with
    the stop rule `max_nonfinite_steps`."""

    def __init__(self, s: Setup, log, bar, skipped: int, last_saved: int):
        self.s, self.log, self.bar, self.skipped, self.last_saved = s, log, bar, skipped, last_saved
        self.skipped_before, self.in_a_row = skipped, 0
        self.counted = NonFiniteCount(s.device) if s.sync_free else None
        self.t_start = time.perf_counter()
        self.restart()

    def restart(self) -> None:
        """A new window after a row: the loss sums and the clock."""
        zero = lambda: torch.zeros((), device=self.s.device)
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
        if self.in_a_row >= self.s.cfg.max_nonfinite_steps:
            self.stop(self.in_a_row, at_step)

    def read_device_counts(self, at_step: int) -> None:
        """Sync-free devices: the skipped total, a note, the stop rule."""
        total, new, longest = self.counted.read()
        self.skipped = self.skipped_before + total
        if new:
            self.log.text(f"steps up to {at_step}: {new} non-finite loss(es), steps skipped ({self.skipped} so far)")
        if longest >= self.s.cfg.max_nonfinite_steps:
            self.stop(longest, at_step)

    def stop(self, in_a_row: int, at_step: int):
        cfg = self.s.cfg
        message = (f"{in_a_row} non-finite losses in a row, the last at step {at_step}: the numbers overflow. Check "
                   f"mixed_precision ({cfg.mixed_precision!r}: fp16 needs the loss scaler; try bf16 or no) and lower lr "
                   f"({cfg.lr:g}); the last checkpoint (step {self.last_saved}) is untouched")
        self.log.text(f"stopped: {message}")
        self.bar.say(f"stopped: {message}")
        raise NonFiniteLoss(message)

    def row(self, step: int, batch_loss: torch.Tensor, grad_norm: torch.Tensor) -> dict:
        """The metrics.csv row of this window (gate statistics read now); the window restarts."""
        stats = gate_stats(self.s.adapter)
        now = time.perf_counter()
        row = dict(step=step, loss=batch_loss.item(), loss_avg=self.loss_avg(), lr=self.s.sched.get_last_lr()[0],
                   grad_norm=grad_norm.item(), samples_per_s=self.samples_per_s(now), wall_s=now - self.t_start,
                   skipped=self.skipped, **stats)
        self.restart()
        return row

    def loss_avg(self) -> float:
        return self.loss_sum.item() / max(1.0, self.loss_count.item())

    def samples_per_s(self, now: float | None = None) -> float:
        return self.window_steps * self.s.cfg.batch_size / max((now or time.perf_counter()) - self.t_window, 1e-9)


class Saver:
    """Writes a checkpoint (rank 0; the other processes wait), prunes old ones (`keep_last`), and draws the
    checkpoint's samples."""

    def __init__(self, s: Setup, folder: Path, log, bar):
        self.s, self.folder, self.log, self.bar = s, folder, log, bar

    def __call__(self, at_step: int, rng_state: torch.Tensor, skipped: int) -> None:
        self.s.shard.main_only(self._save)(at_step, rng_state, skipped)

    def _save(self, at_step: int, rng_state: torch.Tensor, skipped: int) -> None:
        s, cfg, folder, log = self.s, self.s.cfg, self.folder, self.log
        state = dict(optimizer=s.opt.state_dict(), scheduler=s.sched.state_dict(), scaler=s.scaler.state_dict(),
                     rng=checkpoint.rng_state(rng_state), step=at_step, samples_seen=at_step * cfg.batch_size,
                     skipped=skipped, processes=s.shard.world)
        try:
            path = checkpoint.save_checkpoint(folder, at_step, s.adapter, state, cfg.to_dict())
        except checkpoint.CheckpointError as e:
            log.text(f"checkpoint failed: {e}")
            self.bar.say(f"checkpoint failed: {e}")
            raise
        for gone in checkpoint.prune_checkpoints(folder, cfg.keep_last):      # under the run's lock
            log.text(f"checkpoint step {gone} deleted (keep_last {cfg.keep_last})")
        if s.eval_records:
            images = generate(s.base, s.eval_records, list(range(len(s.eval_records))), adapter=s.adapter,
                              batch_size=32)
            (folder / "samples").mkdir(exist_ok=True)
            grid = boxed_grid(images, s.eval_records)
            grid.save(folder / "samples" / f"step_{at_step:07d}.png")
            log.image("samples", grid, at_step)
        log.text(f"checkpoint {path.relative_to(folder)}")


def _loop(s: Setup, run: OpenedRun, progress: bool, progress_every_s: float, on_log, stop_at_step) -> Path:
    """The steps from the run's current step to `steps`, with logging and checkpoints, then the final adapter."""
    cfg, shard, folder = s.cfg, s.shard, run.folder
    gen = torch.Generator().manual_seed(cfg.seed)
    step, skipped = 0, 0
    if run.resume:
        step = run.latest[0]
        checkpoint.set_rng_state(gen, run.state["rng"])
        skipped = run.state["skipped"]
    log = RunLog(folder, list(gate_stats(s.adapter))[3:], step if run.resume else None,
                 tensorboard=cfg.tensorboard) if shard.main else distributed.SILENT
    bar = Progress(folder.name, step, cfg.steps, every_s=progress_every_s, bar=progress) if shard.main else distributed.SILENT
    notes = run.notes
    if run.changes:
        log.text(CHANGES + json.dumps({k: v for k, v in run.changes.items()}))
        notes.append("with changes " + ", ".join(f"{k}={v!r}" for k, v in run.changes.items()))
    summary = (f"{'; '.join(notes)} on {s.device} (base {cfg.base_model}, adapter {cfg.adapter_attention}/"
               f"{cfg.adapter_norm}, {sum(p.numel() for p in s.params.values())} trainable parameters)")
    log.text(summary)
    bar.say(f"{summary}; run folder {folder}")
    save = Saver(s, folder, log, bar)

    # --- SIGTERM (a killed papermill job, a scheduler) checkpoints like Ctrl-C (several processes: after the step)
    def on_sigterm(signum, frame):
        raise Interrupted(f"signal {signum}")
    restore_signals = shard.handle_signals(on_sigterm)
    meter = Meter(s, log, bar, skipped, last_saved=step)
    rng_done = gen.get_state()                 # RNG state after the last completed step: what a checkpoint holds
    batches = cache.step_batches(s.source, seed=cfg.seed, batch_size=cfg.batch_size, start=step, stop=cfg.steps,
                                     workers=cfg.num_workers, take=shard.take)
    try:
        while step < cfg.steps:
            if stop_at_step is not None and step == stop_at_step:
                raise Interrupted(f"stop_at_step {stop_at_step}")
            if shard.stopping:
                raise Interrupted(f"a signal to one of the {shard.world} processes")
            # --- one step: the loss; a non-finite one is skipped (the CPU checks each step), else the update
            loss, batch_loss = step_loss(s, next(batches), gen)
            s.opt.zero_grad(set_to_none=True)
            if not s.sync_free and not torch.isfinite(batch_loss):
                meter.skip(batch_loss, step + 1)
                s.sched.step()
                step, rng_done = step + 1, gen.get_state()
                continue
            grad_norm, good = update(s, loss, batch_loss, meter.counted)
            step, rng_done = step + 1, gen.get_state()   # the step is complete only now
            meter.add(batch_loss, good)
            bar.tick(step)
            # --- log, progress line, checkpoint
            logging, due = step % cfg.log_every == 0 or step == cfg.steps, bar.due()
            if s.sync_free and (logging or due or step % cfg.save_every == 0):
                meter.read_device_counts(step)
            if due:
                bar.line(meter.loss_avg(), gate_stats(s.adapter)["gate_mean"], meter.samples_per_s(), cfg.batch_size)
            if logging:
                log.row(meter.row(step, batch_loss, grad_norm))
                if on_log is not None and shard.main:
                    on_log(folder)
            if step % cfg.save_every == 0:
                save(step, rng_done, meter.skipped)
                meter.last_saved = step
                meter.restart_clock()
    except torch.OutOfMemoryError as e:
        per = cfg.batch_size // shard.world
        message = (f"out of {s.device.type} memory at step {step + 1} (batch {per} per process at {s.base.resolution} "
                   f"px, mixed_precision {cfg.mixed_precision!r}): lower batch_size, keep mixed_precision bf16/fp16 on "
                   f"a GPU, train at a lower resolution (a base with a smaller sample_size), or spread the batch over "
                   f"more GPUs (accelerate launch); the last checkpoint (step {meter.last_saved}) is untouched")
        log.text(f"stopped: {message}")
        bar.say(f"stopped: {message}")
        raise OutOfMemory(message) from e
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
    # --- the final adapter
    if step > meter.last_saved:
        save(step, rng_done, meter.skipped)
    final = shard.main_only(checkpoint.save_final)(folder, s.adapter, dict(step=step, skipped=meter.skipped))
    if cfg.crop != "none" or cfg.flip:
        source = s.source
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
    s.adapter.detach()
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


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` as a share of cfg.lr: a linear warm-up, then constant or a cosine down to 0."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    done = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.5 * (1.0 + math.cos(math.pi * done))


def draw_timesteps(rule: str, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps (int64) in [0, T): "uniform", or "cubic", t = floor((1 - u^3) T) with u uniform, which
    puts 79% of the steps in the noisier half (T2I-Adapter's schedule: the layout is decided at high noise)."""
    T = num_train_timesteps
    if rule == "uniform":
        return torch.randint(0, T, (n,), generator=generator)
    if rule == "cubic":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return ((1 - u ** 3) * T).long().clamp(0, T - 1)
    raise ValueError(f"timesteps = {rule!r}: choose one of {TIMESTEPS}")


def box_loss(pred: torch.Tensor, target: torch.Tensor, grounding: Grounding,
             objects: torch.Tensor | None = None, region: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the batch's objects of the squared error inside each object's box (on the prediction's grid, a
    cell counting when it overlaps the box): a small object weighs as much as a large one, where the image's MSE
    weighs it by its pixel count. `objects`: the count to divide by (default: this batch's objects). `region`
    (B, h * w, N) bool: each object's cells instead of its box's (`visible_region`)."""
    err = (pred - target).square().mean(dim=1).flatten(1)                     # (B, h * w)
    inside = (region_mask(grounding.boxes, *pred.shape[-2:]) if region is None else region).float()  # (B, h * w, N)
    per_box = (err[:, :, None] * inside).sum(1) / inside.sum(1).clamp(min=1)  # (B, N)
    present = grounding.present.float()
    return (per_box * present).sum() / (present.sum() if objects is None else objects).clamp(min=1)


def visible_region(batch: cache.Batch, grounding: Grounding, grid: tuple[int, int],
                   region: str = "visible") -> torch.Tensor:
    """The box loss's region of each object, (B, h * w, N) bool, from the training images, on a pixel base (the
    prediction's grid is the image's). `box_loss_region visible`: its own pixels, those of its phrase's colour
    (`worlds.visible_masks`); `exclusive`: its box less the pixels other objects show (its own pixels and the
    background inside its box); `layered`: its own pixels if it is hidden in part (some of its whole shape shows
    another object, `worlds.hidden_in_part`), else exclusive. Either way an object hidden in part is not judged
    on the object in front of it."""
    if batch.pixels is None or tuple(batch.pixels.shape[1:3]) != tuple(grid):
        raise ValueError(f"box_loss_region {region!r} needs a pixel base whose prediction grid is the image's "
                         f"(here {tuple(grid)}); with a latent base use box_loss_region = 'box'")
    masks = worlds.visible_masks(batch.pixels.numpy(), batch.records, grounding.boxes.shape[1])    # (B, N, H, W)
    device = grounding.boxes.device
    own = torch.from_numpy(masks).flatten(2).transpose(1, 2).to(device)                  # (B, h * w, N)
    if region == "visible":
        return own
    background = ~own.any(-1, keepdim=True)                                                 # (B, h * w, 1)
    exclusive = own | (region_mask(grounding.boxes, *grid) & background)
    if region == "exclusive":
        return exclusive
    hidden = torch.from_numpy(worlds.hidden_in_part(masks, batch.records)).to(device)   # (B, N)
    return torch.where(hidden[:, None, :], own, exclusive)
