"""A run's checkpoints as the loop writes them (`Saver`): the checkpoint itself (rank 0; `checkpoint`), pruning to
`keep_last`, the checkpoint's sample grid, and the samples' grounding measured by the run's detector
(`checkpoint_grounding`: the grounding_* columns of metrics.csv).
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from adapterlib.training import checkpoint
from adapterlib.training import worlds
from adapterlib.training.step import Training
from adapterlib.analysis.figures import boxed_grid
from adapterlib.files import OutOfSpace
from adapterlib.model.sample import generate


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
