"""Training on several processes (GPUs, or CPU processes over gloo), started by Hugging Face Accelerate.

    accelerate launch --num_processes 8 -m adapterlib train --preset sd15 --base_model /sd15 --data d.jsonl
    accelerate launch --multi_gpu --num_processes 2 -m adapterlib train --device cpu ...   # 2 CPU processes
    adapterlib.training.train.launch(cfg, num_processes=2)                                         # from a notebook

Accelerate (or torchrun) starts the processes and sets WORLD_SIZE, RANK, LOCAL_RANK; `setup` sees them,
sets up torch.distributed through Accelerate's `PartialState` and returns this process's `Shard`, which
the training loop asks in a few places:
- `batch_size` is the GLOBAL batch: every process takes its rows (`take`) of the same global index list,
  so it must be divisible by the number of processes (checked before any work);
- every process holds the same seeded generator and draws the random numbers of the WHOLE global batch
  (caption and phrase dropout, noise, timesteps, scales), keeping its rows: together the processes train
  on exactly the batch one process would, and the gradient DDP averages is the one-process gradient up
  to float summation order;
- rank 0 alone writes the run folder (config, train.log, metrics.csv, progress, checkpoints, sample
  grids, final/); the others wait for each checkpoint (`main_only`);
- SIGTERM / Ctrl-C only ask to stop: the request travels with the step's loss (`mean`), every process
  finishes the same step, rank 0 writes the checkpoint while the others wait, then all stop.

One process (plain `python -m adapterlib train`, the notebooks, the tests) gets `Shard()`: every method is
the identity, Accelerate is not imported and nothing is synchronised, so results are bitwise what they
were before this module existed.
"""
from __future__ import annotations

import functools
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch

from adapterlib.model.adapter import BatchPart
from adapterlib.training.config import TrainConfig
from adapterlib.model.precision import resolve_device

# what launchers set: torchrun and `accelerate launch` (WORLD_SIZE), MPI (the others)
WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# how long a process waits for the others at a collective (rank 0 writing a checkpoint and its samples)
TIMEOUT = timedelta(minutes=30)


class Silent:
    """What processes other than rank 0 hold in place of the run log and the progress bar: every call does
    nothing (and `due()` is never true)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


SILENT = Silent()


def launched_processes() -> int:
    """The number of processes the launcher started (1 when started plainly)."""
    for name in WORLD_ENV:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def check_batch(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise ValueError(f"batch_size = {batch_size} is the global batch and must be divisible by the number of "
                         f"processes ({processes}): give e.g. --batch_size {processes * max(1, batch_size // processes)}")


@dataclass
class Shard:
    """This process's part of a training run: its rank among `world` processes, its device, and its rows
    of each global batch of `batch` samples."""
    device: torch.device
    rank: int = 0
    world: int = 1
    batch: int = 0
    stopping: bool = False          # a stop was asked on some process (known to all after the step's `mean`)
    _asked: bool = field(default=False, repr=False)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.rank == 0

    @property
    def rows(self) -> slice:
        size = self.batch // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def describe(self) -> str:
        return f"global batch {self.batch} = {self.world} processes x {self.batch // self.world}"

    def take(self, whole):
        """This process's rows of something drawn or listed for the whole global batch (one process: all)."""
        return whole if self.world == 1 else whole[self.rows]

    def part(self, records) -> BatchPart | None:
        """Where this process's records sit in the global batch, for phrase dropout (`Grounding.from_records`):
        None with one process; else the rows and the global batch's largest object count."""
        if self.world == 1:
            return None
        objects = torch.tensor(max([len(r.objects) for r in records], default=0), device=self.device)
        torch.distributed.all_reduce(objects, op=torch.distributed.ReduceOp.MAX)
        return BatchPart(start=self.rows.start, size=self.batch, objects=max(1, int(objects)))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model DDP averages the gradients of (its trainable parameters: the adapter's). No
        find_unused_parameters: every adapter parameter takes part in every forward (checked for the three
        attention variants, with and without the feed-forward: DDP stops with an error otherwise)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's loss (the mean of the processes' losses: their batches are equal), so every
        process takes the same decision on a non-finite loss; a stop asked on any process rides along."""
        if self.world == 1:
            return loss
        both = torch.stack([loss.detach().float() / self.world, torch.tensor(float(self._asked), device=loss.device)])
        torch.distributed.all_reduce(both)
        self.stopping = bool(both[1] > 0)
        return both[0]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the processes, left on the device (no wait for the host)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value

    def total(self, count: int) -> int:
        """A count summed over the processes (crop / flip counts of each process's samples)."""
        if self.world == 1:
            return count
        value = torch.tensor(count, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(value)
        return int(value)

    def wait(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def main_only(self, write):
        """`write` (a function writing to the run folder) runs on rank 0; the others wait until it is done
        (so no process leaves, and no launcher stops rank 0, while it writes)."""
        @functools.wraps(write)
        def run(*args, **kwargs):
            result = write(*args, **kwargs) if self.main else None
            self.wait()
            return result
        return run

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writes the generated data set), then the others."""
        if not self.main:
            self.wait()
        yield
        if self.main:
            self.wait()

    def handle_signals(self, on_sigterm):
        """Install the stop handlers; returns what restores the previous ones. One process: SIGTERM calls
        `on_sigterm` (it raises, and the run checkpoints as on Ctrl-C). Several: SIGTERM and SIGINT only ask
        to stop (`stopping`, after the current step), since an exception in the middle of a collective would
        leave the other processes waiting for it."""
        def ask(signum, frame):
            self._asked = True
        handlers = {signal.SIGTERM: on_sigterm} if self.world == 1 else {signal.SIGTERM: ask, signal.SIGINT: ask}
        try:
            old = {s: signal.signal(s, h) for s, h in handlers.items()}
        except ValueError:          # not the main thread: leave signals alone
            return lambda: None
        return lambda: [signal.signal(s, h) for s, h in old.items() if h is not None]

    def agree(self, text: str) -> str:
        """Rank 0's `text` on every process (the run name: a default one holds the start time, which the
        processes read at slightly different moments)."""
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor(len(data), device=self.device)
        torch.distributed.broadcast(size, src=0)
        buffer = data if self.main else torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        torch.distributed.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()


def setup(cfg: TrainConfig) -> tuple[Shard, TrainConfig]:
    """This process's Shard and the config every process trains (rank 0's run name). Started plainly: one
    process on `cfg.device`, Accelerate untouched. Started by a launcher with N processes: checks that
    `batch_size` divides by N (before any work), sets up torch.distributed through Accelerate's PartialState
    (NCCL on GPUs, gloo on CPUs) and gives each process its own device (cuda:LOCAL_RANK, or the CPU)."""
    processes = launched_processes()
    if processes == 1:
        return Shard(resolve_device(cfg.device)), cfg
    check_batch(cfg.batch_size, processes)
    if (cfg.batch_size // processes) % cfg.gradient_accumulation_steps:
        raise ValueError(f"batch_size = {cfg.batch_size} over {processes} processes is {cfg.batch_size // processes} "
                         f"a process, which does not split into gradient_accumulation_steps = "
                         f"{cfg.gradient_accumulation_steps} equal micro-batches: give a batch_size that is a multiple "
                         f"of {processes * cfg.gradient_accumulation_steps}")
    if cfg.device.startswith("cuda:"):
        raise ValueError(f"device = {cfg.device!r} with {processes} processes: each process takes its own GPU "
                         "(LOCAL_RANK); give device auto or cuda (or pick GPUs with CUDA_VISIBLE_DEVICES)")
    from accelerate import PartialState
    state = PartialState(cpu=resolve_device(cfg.device).type == "cpu", timeout=TIMEOUT)
    if state.num_processes != processes:
        raise RuntimeError(f"the launcher started {processes} processes but torch.distributed was set up for "
                           f"{state.num_processes} ({state.distributed_type})")
    device = state.device if state.device.type != "cpu" else torch.device("cpu")      # not "cpu:0"
    shard = Shard(device=device, rank=state.process_index, world=state.num_processes, batch=cfg.batch_size)
    return shard, replace(cfg, run_name=shard.agree(cfg.run_name))
