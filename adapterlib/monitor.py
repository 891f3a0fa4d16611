"""Watching a run while it trains: a live loss/gate plot for the notebook (throttled so it never
slows training) and the reading of a run folder's metrics."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv of a run, also while it is being written (a half-written last line is dropped)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return pd.DataFrame()
    frame = pd.read_csv(path, on_bad_lines="skip")
    return frame.dropna(subset=["step"]).astype({"step": int})


def plot_progress(metrics: pd.DataFrame, axes=None):
    """Loss (raw and smoothed) and the gate (mean over layers, max) against step."""
    import matplotlib.pyplot as plt
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    loss_ax, gate_ax = axes
    loss_ax.clear(); gate_ax.clear()
    if len(metrics):
        loss_ax.plot(metrics.step, metrics.loss, alpha=0.3, label="loss")
        loss_ax.plot(metrics.step, metrics.loss_avg.ewm(span=10).mean(), label="smoothed")
        gate_ax.plot(metrics.step, metrics.gate_mean, label="gate mean |tanh|")
        gate_ax.plot(metrics.step, metrics.gate_max, label="gate max", alpha=0.6)
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    gate_ax.set(xlabel="step", ylabel="tanh(gate)", title="gates")
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    return axes[0].figure


class LivePlot:
    """`on_log` callback for `train`: redraws in place at most every `every_s` seconds."""

    def __init__(self, every_s: float = 15.0):
        import matplotlib.pyplot as plt
        self.every_s, self.last = every_s, 0.0
        self.figure, self.axes = plt.subplots(1, 2, figsize=(10, 3.2))
        plt.close(self.figure)                 # shown through the display handle only
        self.handle = None

    def __call__(self, run_dir) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        from IPython.display import display
        self.last = time.monotonic()
        plot_progress(read_metrics(run_dir), self.axes)
        if self.handle is None:
            self.handle = display(self.figure, display_id=True)
        else:
            self.handle.update(self.figure)
