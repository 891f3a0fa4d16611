"""Progress where the user looks: a line in the terminal at least every `every_s` seconds while a run
trains headless (papermill or the command line), and a progress bar in a notebook.

The lines go to the process's own stderr (`sys.__stderr__`): under papermill that is the terminal the
user started papermill from (the kernel inherits it), whatever the notebook captures; from the command
line it is the terminal or the nohup log.

    [train my-run] step 120/1500 (8%)  loss 0.0312  gate 0.113  44.1 samples/s  ETA 8m12s
"""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """`tick()` after every step (cheap: a clock read); `due()` says when a line is owed; `line(...)`
    writes it. `bar=True` also shows a tqdm bar (a widget in a notebook)."""

    def __init__(self, name: str, start: int, total: int, *, every_s: float = 30.0, bar: bool = False, stream=None):
        self.name, self.start, self.total, self.every_s = name, start, total, every_s
        self.stream = stream if stream is not None else (sys.__stderr__ or sys.stderr)
        self.last = time.monotonic()
        self.step = start
        self.bar = None
        if bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def tick(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s or self.step == self.total

    def line(self, loss: float, gate_mean: float, samples_per_s: float, batch_size: int) -> None:
        self.last = time.monotonic()
        left = (self.total - self.step) * batch_size / samples_per_s if samples_per_s > 0 else float("nan")
        eta = format_duration(left) if left == left else "-"
        text = (f"[train {self.name}] step {self.step}/{self.total} ({self.step / self.total:.0%})  loss {loss:.4f}  "
                f"gate {gate_mean:.3f}  {samples_per_s:.1f} samples/s  ETA {eta}")
        self.say(text)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", gate=f"{gate_mean:.3f}", samples_s=f"{samples_per_s:.1f}")

    def say(self, text: str) -> None:
        """A line of its own (start, checkpoint, restart, end)."""
        if self.stream is not None:
            print(text if text.startswith("[train") else f"[train {self.name}] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
