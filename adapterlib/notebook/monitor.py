"""Watching a run while it trains: a live loss/gate plot for the notebook (throttled so it never
slows training) and the status of a run folder (the training plan's monitor script), from its files."""
from __future__ import annotations

import json
import time
from pathlib import Path

from adapterlib.analysis.figures import plot_progress
from adapterlib.analysis.gates import run_phases
from adapterlib.training import lock
from adapterlib.files import strict_json
from adapterlib.runs import DATA_REPORT, effective_config, latest_checkpoint, read_metrics


class LivePlot:
    """`on_log` callback for `train`: redraws the loss/gate plot in place from metrics.csv, at most every
    `every_s` seconds, and always at the first and the final logged step (so a short run shows its
    end, and a long run's plot ends at its final state). `png(run_dir)` is the image it shows."""

    def __init__(self, every_s: float = 3.0, dpi: int = 80):
        import matplotlib.pyplot as plt
        self.every_s, self.dpi, self.last = every_s, dpi, None
        self.figure, self.axes = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
        plt.close(self.figure)                 # shown through the display handle only
        self.handle = None

    def png(self, run_dir) -> bytes:
        """The plot of the run's metrics.csv as it is now (PNG bytes), titled with its step."""
        return self._png(run_dir, read_metrics(run_dir), _planned_steps(run_dir))

    def _png(self, run_dir, metrics, total) -> bytes:
        import io
        plot_progress(metrics, self.axes)
        step = int(metrics.step.iloc[-1]) if len(metrics) else 0
        self.figure.suptitle(f"{Path(run_dir).name}: step {step}" + (f" of {total}" if total else ""), fontsize=10)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=self.dpi)
        return buffer.getvalue()

    def __call__(self, run_dir) -> None:
        from IPython.display import Image, display
        throttled = self.last is not None and time.monotonic() - self.last < self.every_s
        metrics, total = read_metrics(run_dir), _planned_steps(run_dir)   # read once: the end test and the plot
        at_end = bool(total) and len(metrics) > 0 and int(metrics.step.iloc[-1]) >= total
        if throttled and not at_end:
            return
        self.last = time.monotonic()
        image = Image(data=self._png(run_dir, metrics, total), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)


def _planned_steps(run_dir) -> int | None:
    return effective_config(Path(run_dir)).get("steps") if (Path(run_dir) / "config.json").is_file() else None


# ---------------------------------------------------------------------------------------------
# status of a run folder (the training plan's monitor script), while it trains or after

def run_status(run_dir: str | Path, *, stalled_after_s: float = 600.0, now: float | None = None) -> dict:
    """Where a run stands, from its folder alone (no access to the training process).

    state: "finished" (final/adapter.safetensors written for the configured steps), "interrupted"
    (train.log's last line says so: Ctrl-C, SIGTERM), "stalled" (no new metrics row for more than
    `stalled_after_s` seconds: crashed, killed or hung), else "running". Warnings: the alarms of
    `gates.detect_phases` (collapse, over-activation), non-finite steps skipped, a stalled run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() and not (run_dir / "metrics.csv").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json, no metrics.csv)")
    now = time.time() if now is None else now
    config = effective_config(run_dir) if (run_dir / "config.json").is_file() else {}
    total = config.get("steps")
    metrics = read_metrics(run_dir)
    log_lines = (run_dir / "train.log").read_text().splitlines() if (run_dir / "train.log").is_file() else []
    last_line = log_lines[-1] if log_lines else ""
    csv_path = run_dir / "metrics.csv"
    age = now - csv_path.stat().st_mtime if csv_path.is_file() else None
    final = run_dir / "final" / "info.json"
    final_step = json.loads(final.read_text())["step"] if final.is_file() else None

    if final_step is not None and (total is None or final_step >= total):
        state = "finished"
    elif "interrupted" in last_line:
        state = "interrupted"
    elif age is not None and age > stalled_after_s:
        state = "stalled"
    else:
        state = "running"

    status = dict(run=run_dir.name, path=str(run_dir), state=state, step=None, total_steps=total, progress=None,
                  loss_smoothed=None, gate_mean=None, gate_max=None, gate_raw_max=None, samples_per_s=None,
                  eta_s=None, last_checkpoint=None, skipped=0, metrics_age_s=age, last_log_line=last_line,
                  grounding=None, peak_mem_gib=None, warnings=[])
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        status["last_checkpoint"] = latest[0]
    if len(metrics):
        row = metrics.iloc[-1]
        step = int(row.step)
        recent = metrics.samples_per_s.tail(5).mean()            # samples/s of the training steps only
        status.update(step=step, loss_smoothed=float(metrics.loss_avg.ewm(span=10).mean().iloc[-1]),
                      gate_mean=float(row.gate_mean), gate_max=float(row.gate_max),
                      gate_raw_max=float(row.gate_raw_max), samples_per_s=float(recent), skipped=int(row.skipped))
        if "peak_mem_gib" in metrics and metrics.peak_mem_gib.notna().any():     # a run saved before: none
            status["peak_mem_gib"] = float(metrics.peak_mem_gib.max())
        measured = metrics.dropna(subset=["grounding_success"]) if "grounding_success" in metrics else []
        if len(measured):                                # the last checkpoint's samples, measured while training
            last = measured.iloc[-1]
            status["grounding"] = dict(step=int(last.step), success_rate=float(last.grounding_success),
                                       miou=float(last.grounding_miou), o_miou=float(last.grounding_o_miou))
        if total:
            status["progress"] = step / total
            if state == "finished":
                status["eta_s"] = 0.0
            elif state == "running" and recent > 0 and config.get("batch_size"):
                status["eta_s"] = float((total - step) * config["batch_size"] / recent)
    findings = run_phases(run_dir, metrics)
    status["warnings"] = [f"{f.finding} at step {f.step}: {f.rule}" for f in findings.itertuples() if f.kind == "alarm"]
    status["writer"] = lock.holder(run_dir)           # the last process that took the run's lock (read, never taken)
    report = run_dir / DATA_REPORT
    data = json.loads(report.read_text()) if report.is_file() else {}
    status["skipped_records"] = data.get("skipped", 0)
    if status["skipped_records"]:
        first = data.get("first_reasons") or ["?"]
        status["warnings"].append(f"{data['skipped']} bad training record(s) skipped (on_bad_record='skip'), "
                                  f"first: {first[0]}; all reasons in {DATA_REPORT}")
    if status["skipped"]:
        status["warnings"].append(f"{status['skipped']} step(s) skipped for a non-finite loss (grep train.log "
                                  "for 'non-finite'; check the dtype configuration)")
    if state == "stalled":
        status["warnings"].append(f"stalled: no new metrics row for {age / 60:.0f} min (more than "
                                  f"{stalled_after_s / 60:.0f} min) and the run is not finished: it crashed, was "
                                  "killed or hangs; see the end of train.log (and the papermill notebook)")
    return strict_json(status)


def format_status(status: dict) -> str:
    """A readable block of `run_status`'s numbers."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    eta = status["eta_s"]
    eta = "-" if eta is None else f"{eta / 3600:.1f} h" if eta >= 3600 else f"{eta / 60:.0f} min"
    progress = f" ({status['progress']:.0%})" if status["progress"] is not None else ""
    checkpoint = "-" if status["last_checkpoint"] is None else f"step {status['last_checkpoint']}"
    age = "-" if status["metrics_age_s"] is None else f"{status['metrics_age_s']:.0f} s ago"
    lines = [f"run         {status['run']}  [{status['state']}]",
             f"step        {num(status['step'], 'd')} / {num(status['total_steps'], 'd')}{progress}   ETA {eta}",
             f"loss        {num(status['loss_smoothed'], '.4f')} (smoothed)",
             f"gate        mean {num(status['gate_mean'], '.3f')}   max {num(status['gate_max'], '.3f')}   "
             f"raw max {num(status['gate_raw_max'], '.3f')}",
             f"speed       {num(status['samples_per_s'], '.1f')} samples/s",
             f"memory      peak {num(status.get('peak_mem_gib'), '.2f')} GiB (CUDA's allocated on a GPU, the "
             f"process's resident peak on the CPU; the estimate before the first step is in train.log)",
             f"checkpoint  {checkpoint}",
             f"grounding   {_grounding_line(status.get('grounding'))}",
             f"skipped     {status['skipped']} non-finite step(s)",
             f"metrics     last row written {age}",
             f"writer      {lock.describe(status['writer']) if status.get('writer') else '-'} (the last to take its lock)",
             f"log         {status['last_log_line'][:110]}"]
    lines += [f"WARNING     {w}" for w in status["warnings"]] or ["warnings    none"]
    return "\n".join(lines)


def _grounding_line(grounding: dict | None) -> str:
    """The last checkpoint samples' grounding (`checkpoint_grounding`), or why there is none."""
    if grounding is None:
        return "- (not measured: no checkpoint yet, n_samples 0 or checkpoint_grounding false)"
    def num(key):                 # None (strict JSON's NaN): no object measured, or no overlap among the samples
        value = grounding.get(key)
        return "-" if value is None or value != value else f"{value:.3f}"
    return (f"success {num('success_rate')}   mIoU {num('miou')}   O-mIoU {num('o_miou')}   "
            f"(step {grounding['step']}, the checkpoint samples)")
