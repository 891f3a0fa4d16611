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
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterlib.training import checkpoint
from adapterlib.training import memory
from adapterlib.training import worlds
from adapterlib.training import distributed
from adapterlib.training import batches as inputs
from adapterlib.training.step import NonFiniteCount, Training, accumulated_backward, step_loss, update
from adapterlib.training.saver import Saver
from adapterlib.model.adapter import AdaptedUNet, architecture_options, build_adapter
from adapterlib.model.hooks import set_gradient_checkpointing
from adapterlib.model.base import load_base
from adapterlib.model.folders import resolve_base_path
from adapterlib.training.config import FIELDS, TrainConfig, check_preset_fits, resume_changes, trackers
from adapterlib.training.losses import lr_factor
from adapterlib.analysis.gates import gate_stats
from adapterlib.paths import repo_path
from adapterlib.model.precision import precision_policy
from adapterlib.files import write_json
from adapterlib.training.lock import RunLock, RunLocked
from adapterlib.training.progress import Progress
from adapterlib.runs import CHANGES, DATA_REPORT, RunLog, effective_config, latest_checkpoint, run_dir, runs_root


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
# set up (`set_up`), one optimisation step (`step_loss`, `update`: step.py), the numbers between log rows (`Meter`),
# a checkpoint (`Saver`: saver.py); `train` strings them together top to bottom.

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


def set_up(cfg: TrainConfig, shard: distributed.Shard, run: OpenedRun, progress: bool) -> Training:
    """The frozen base in the compute dtype, the fp32 adapter (master weights) and the optimiser, the data source
    (checked and cached before any step), and the resumed states."""
    device = shard.device
    compute_dtype = precision_policy(device, cfg.mixed_precision)[0]
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.base_model, device=device, dtype=compute_dtype)
    check_preset_fits(cfg, base)
    base.guidance = cfg.base_guidance        # a guidance-distilled base's guidance input in training (FLUX.1-dev)
    if base.distilled:
        run.notes.append(f"guidance-distilled base: trains with guidance {cfg.base_guidance} as its input "
                         "(base_guidance)")
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
