"""Reading the gates: the training phases the seed plan expects, found by stated rules, and the figures.

The seed plan's gate table (SD 1.5, batch 2, 25000 steps) is the reference:

| step       | gate mean   | phase               |
|------------|-------------|---------------------|
| 0-1000     | ~0.00       | zero-init           |
| 1000-5000  | 0.00-0.10   | slow growth         |
| 5000-15000 | sudden jump | sudden convergence  |
| 15000+     | 0.30-0.50   | stable              |

and its two anomalies: a gate that stays at 0 (collapse: add RMSNorm) and a raw gate above 1.0
(over-activation: lower the learning rate). `detect_phases` turns each into a deterministic rule
over `metrics.csv` (gate_mean is the mean over layers of |tanh(raw gate)|) and writes the rule, with
its numbers, into the finding, so a table or figure says how it was found, not only what.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

FINDING_COLUMNS = ["finding", "kind", "step", "start_step", "end_step", "value", "rule"]

# the seed plan's expected gate mean, at ITS step counts: (first step, last step, low, high, label)
SEED_BANDS = [(0, 1000, 0.0, 0.01, "~0 (zero init)"), (1000, 5000, 0.0, 0.10, "slow growth"),
              (5000, 15000, 0.10, 0.30, "sudden jump"), (15000, 25000, 0.30, 0.50, "stable")]
SEED_LABEL = "seed plan (SD 1.5, batch 2)"


def gate_columns(metrics: pd.DataFrame) -> list[str]:
    """The per-layer columns gate_<layer>_attn / gate_<layer>_ff (tanh of the raw gate)."""
    return [c for c in metrics.columns if c.startswith("gate_") and c.endswith(("_attn", "_ff"))]


def smoothed(values, rows: int) -> np.ndarray:
    """Centred rolling mean over `rows` log rows (no lag, so a jump is not shifted later)."""
    return pd.Series(np.asarray(values, float)).rolling(rows, center=True, min_periods=1).mean().to_numpy()


def _finding(finding, kind, step=None, start_step=None, end_step=None, value=None, rule=""):
    return dict(finding=finding, kind=kind, step=step, start_step=start_step, end_step=end_step,
                value=value, rule=rule)


# ---------------------------------------------------------------------------------------------
# sudden convergence: one rule for the gate mean and for grounding success

def find_jump(steps, values, *, what: str, window: int, smooth: int = 1, min_share: float = 0.5,
              min_ratio: float = 3.0, min_rows: int = 3, unit: str = "log rows") -> dict:
    """The largest rise of `values` (smoothed over `smooth` rows) over `window` log rows, reported as a
    sudden convergence only if it is >= `min_share` of the total rise and its slope is >= `min_ratio`
    times the median slope over all windows. The step is where the smoothed series crosses the
    middle of that rise. Returns a finding (kind "jump", or a "note" saying why none was found)."""
    name = f"sudden convergence ({what})"
    steps, raw = np.asarray(steps, float), np.asarray(values, float)
    keep = np.isfinite(raw)
    steps, raw = steps[keep], raw[keep]
    if len(raw) < max(min_rows, window + 1):
        return _finding(name, "note", rule=f"not enough {unit} to detect a sudden convergence of the {what} "
                                           f"({len(raw)}; needs {max(min_rows, window + 1)})")
    y = smoothed(raw, smooth)
    rise = y[window:] - y[:-window]                                     # (n - W,) rise over each window
    slope = rise / np.maximum(steps[window:] - steps[:-window], 1e-12)
    i = int(np.argmax(rise))
    total = float(y.max() - y[0])
    median = float(np.median(slope))
    ratio = slope[i] / median if median > 0 else math.inf
    a, b = int(steps[i]), int(steps[i + window])
    smoothing = f" (centred mean over {smooth} {unit})" if smooth > 1 else ""
    rule = (f"largest rise of the {what}{smoothing} over {window} {unit}: "
            f"{rise[i]:.3g} from step {a} to {b}, {rise[i] / total:.0%} of the total rise {total:.3g} "
            f"(needs >= {min_share:.0%}), slope {ratio:.3g}x the median slope (needs >= {min_ratio:g}x)"
            if total > 0 else f"the {what} does not rise (total rise {total:.3g})")
    if total <= 0 or rise[i] < min_share * total or ratio < min_ratio:
        return _finding(name, "note", start_step=a, end_step=b, value=float(rise[i]),
                        rule="no sudden convergence: " + rule)
    middle = (y[i] + y[i + window]) / 2
    j = i + int(np.argmax(y[i:i + window + 1] >= middle))              # first row past the middle
    return _finding(name, "jump", int(steps[j]), a, b, float(rise[i]),
                    f"the step where the {what} crosses the middle of its " + rule)


# ---------------------------------------------------------------------------------------------

def detect_phases(metrics: pd.DataFrame, *, grounding: pd.DataFrame | None = None, total_steps: int | None = None,
                  warmup: int = 0,
                  zero_eps: float = 0.01, slow_max: float = 0.1, collapse_eps: float | None = None,
                  collapse_share: float = 0.2, collapse_step: int | None = None, min_collapse_rows: int = 3,
                  over_max: float = 1.0, window: int | None = None, window_share: float = 0.1, smooth: int = 5,
                  min_share: float = 0.5, min_ratio: float = 3.0, min_rows: int = 10) -> pd.DataFrame:
    """Findings (FINDING_COLUMNS) over a run's metrics, each with the rule that produced it.

    kind "phase": zero-init (gate_mean < zero_eps from the first row), slow growth (from there until
    gate_mean first reaches slow_max), grown (from then on).
    kind "jump": sudden convergence of the gate mean (see `find_jump`; the window is `window` rows,
    default `window_share` of the rows), and of grounding success when `grounding` (step,
    success_rate per checkpoint, from `probe.grounding_vs_step`) is given (window 1 checkpoint, at
    least 4 checkpoints: with 3 the slope test cannot pass, the median of two slopes being their mean).
    kind "alarm": collapse (gate_max < collapse_eps from some row to the last, with at least
    `min_collapse_rows` rows at or after `collapse_step`, default `collapse_share` of `total_steps`
    (or of the last logged step), but not before the LR `warmup` ends) and over-activation (first row with gate_raw_max > over_max).
    kind "note": a rule that could not be applied (too few rows) or found nothing worth saying."""
    found = []
    if metrics is None or len(metrics) == 0:
        return pd.DataFrame([_finding("metrics", "note", rule="no metrics rows yet: nothing to detect")],
                            columns=FINDING_COLUMNS)
    m = metrics.sort_values("step").reset_index(drop=True)
    steps, mean = m.step.to_numpy(), m.gate_mean.to_numpy(float)
    last = int(steps[-1])

    # --- zero-init, slow growth, grown: first crossings of zero_eps and slow_max
    above_zero, above_slow = np.flatnonzero(mean >= zero_eps), np.flatnonzero(mean >= slow_max)
    z_end = above_zero[0] if len(above_zero) else len(m)            # first row out of zero-init
    s_end = above_slow[0] if len(above_slow) else len(m)            # first row out of slow growth
    if z_end > 0:
        found.append(_finding("zero-init", "phase", int(steps[0]), int(steps[0]), int(steps[z_end - 1]),
                              float(mean[:z_end].max()),
                              f"gate_mean < {zero_eps:g} from the first row" +
                              (f" until step {int(steps[z_end])}" if z_end < len(m) else " to the last row (ongoing)")))
    else:
        found.append(_finding("zero-init", "note", rule=f"gate_mean is already >= {zero_eps:g} at the first "
                                                        f"logged step {int(steps[0])}: no zero-init row logged"))
    if z_end < len(m) and s_end > z_end:
        found.append(_finding("slow growth", "phase", int(steps[z_end]), int(steps[z_end]), int(steps[s_end - 1]),
                              float(mean[s_end - 1]),
                              f"{zero_eps:g} <= gate_mean < {slow_max:g}: from the first row >= {zero_eps:g}" +
                              (f" until gate_mean first reaches {slow_max:g} at step {int(steps[s_end])}"
                               if s_end < len(m) else " to the last row (ongoing)")))
    if s_end < len(m):
        found.append(_finding("grown", "phase", int(steps[s_end]), int(steps[s_end]), last, float(mean[-1]),
                              f"gate_mean >= {slow_max:g} first at step {int(steps[s_end])}; last value "
                              f"{mean[-1]:.3g} (the seed plan expects 0.3-0.5 once stable)"))

    # --- sudden convergence of the gate mean (and of grounding success)
    w = window or max(2, round(window_share * len(m)))
    if len(m) < min_rows:
        found.append(_finding("sudden convergence (gate mean)", "note",
                              rule=f"not enough rows to detect a sudden convergence ({len(m)} rows; needs {min_rows})"))
    else:
        found.append(find_jump(steps, mean, what="gate mean", window=w, smooth=smooth, min_share=min_share,
                               min_ratio=min_ratio))
    if grounding is not None and len(grounding):
        g = grounding.sort_values("step")
        found.append(find_jump(g.step, g.success_rate, what="grounding success", window=1, smooth=1,
                               min_share=min_share, min_ratio=min_ratio, min_rows=4, unit="checkpoints"))

    # --- collapse: the gate stays near zero past the threshold step
    eps = zero_eps if collapse_eps is None else collapse_eps
    threshold = collapse_step if collapse_step is not None else max(int(collapse_share * (total_steps or last)), warmup)
    how = (f"step {threshold}" if collapse_step is not None else
           f"step {threshold} = the larger of {collapse_share:.0%} of "
           f"{'the planned ' + str(total_steps) if total_steps else 'the last logged step ' + str(last)} steps "
           f"and the LR warmup ({warmup})")
    late = steps >= threshold
    if len(m) < min_rows:
        found.append(_finding("collapse", "note", rule=f"not enough rows to detect a collapse ({len(m)} rows; "
                                                       f"needs {min_rows})"))
    elif late.sum() < min_collapse_rows:
        found.append(_finding("collapse", "note", rule=f"not enough rows past the collapse threshold ({how}) to "
                                                       f"detect a collapse ({int(late.sum())}; needs {min_collapse_rows})"))
    else:
        gmax = m.gate_max.to_numpy(float)
        high = np.flatnonzero(gmax >= eps)
        start = high[-1] + 1 if len(high) else 0                     # first row of the trailing near-zero stretch
        if start >= len(m) or (late[start:]).sum() < min_collapse_rows:
            found.append(_finding("collapse", "note", rule=f"no collapse: gate_max >= {eps:g} at step "
                                                           f"{int(steps[high[-1]])}, past the threshold ({how})"))
        else:
            at = max(start, int(np.argmax(late)))
            found.append(_finding("collapse", "alarm", int(steps[at]), int(steps[start]), last,
                                  float(gmax[start:].max()),
                                  f"gate_max < {eps:g} from step {int(steps[start])} to the last row ({last}), past "
                                  f"the collapse threshold ({how}); seed remedy: RMSNorm (adapter_norm='rmsnorm')"))

    # --- over-activation: a raw gate above over_max
    over = np.flatnonzero(m.gate_raw_max.to_numpy(float) > over_max)
    if len(over):
        found.append(_finding("over-activation", "alarm", int(steps[over[0]]), int(steps[over[0]]),
                              int(steps[over[-1]]), float(m.gate_raw_max.iloc[over[0]]),
                              f"first row with gate_raw_max > {over_max:g} (raw gate, before tanh); "
                              f"{len(over)} rows above, max {m.gate_raw_max.max():.3g}; "
                              "seed remedy: lower the learning rate"))
    else:
        found.append(_finding("over-activation", "note", rule=f"no over-activation: gate_raw_max <= {over_max:g} "
                                                              f"on every row (max {m.gate_raw_max.max():.3g})"))
    table = pd.DataFrame(found, columns=FINDING_COLUMNS)
    return table.astype({c: "Int64" for c in ("step", "start_step", "end_step")})


def run_phases(run_dir, metrics: pd.DataFrame | None = None, grounding: pd.DataFrame | None = None,
               **rules) -> pd.DataFrame:
    """`detect_phases` on a run folder, with the planned steps and LR warmup from its config.json."""
    import json
    from pathlib import Path

    from .monitor import read_metrics
    path = Path(run_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    metrics = read_metrics(run_dir) if metrics is None else metrics
    return detect_phases(metrics, grounding=grounding, total_steps=config.get("steps"),
                         warmup=config.get("warmup", 0), **rules)


def describe(findings: pd.DataFrame) -> str:
    """The findings in sentences: what was found, at which step, by which rule."""
    lines = []
    for f in findings.itertuples():
        where = (f"at step {f.step}" if f.kind in ("jump", "alarm") else
                 f"steps {f.start_step}-{f.end_step}" if f.kind == "phase" else "")
        lines.append(f"- {f.finding} [{f.kind}] {where}: {f.rule}".replace(" :", ":"))
    return "\n".join(lines)


def alarms(findings: pd.DataFrame) -> pd.DataFrame:
    return findings[findings.kind == "alarm"]


# ---------------------------------------------------------------------------------------------
# figures

_PHASE_COLORS = {"zero-init": "0.85", "slow growth": "#fde9c4", "grown": "#dcefd9"}


def _axes(ax, figsize=(7, 3.4)):
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=figsize)[1] if ax is None else ax


def draw_seed_bands(ax, xmax: float) -> None:
    """The seed plan's expected gate mean at its own step counts, clipped to [0, xmax]: a reference,
    not rescaled to this run's length (the seed trains SD 1.5 at batch 2 for 25000 steps)."""
    from matplotlib.patches import Rectangle
    first = True
    for x0, x1, lo, hi, text in SEED_BANDS:
        if x0 >= xmax:
            break
        x1 = min(x1, xmax)
        ax.add_patch(Rectangle((x0, lo), x1 - x0, max(hi - lo, 0.004), facecolor="none", edgecolor="tab:purple",
                               hatch="///", alpha=0.35, linewidth=0.8, label=SEED_LABEL if first else None))
        ax.text(x0 + 0.01 * xmax, hi, text, fontsize=6, color="tab:purple", va="bottom")
        first = False


def plot_gates(metrics: pd.DataFrame, findings: pd.DataFrame | None = None, ax=None, *, label: str = "gate mean",
               seed_bands: bool = True, color=None):
    """The gate mean over layers (|tanh(raw)|), the min-max band over layers, the seed plan's bands
    and the detected phases, jumps and alarms."""
    ax = _axes(ax)
    if len(metrics) == 0:
        ax.set_title("gates: no rows yet")
        return ax
    layers = metrics[gate_columns(metrics)].abs()
    line, = ax.plot(metrics.step, metrics.gate_mean, label=label, color=color, lw=1.5)
    if layers.shape[1]:
        ax.fill_between(metrics.step, layers.min(axis=1), layers.max(axis=1), color=line.get_color(), alpha=0.2,
                        label="min-max over layers")
    xmax = float(metrics.step.max())
    if seed_bands:
        draw_seed_bands(ax, xmax)
    if findings is not None:
        annotate(ax, findings)
    ax.set(xlabel="step", ylabel="|tanh(gate)|", xlim=(0, xmax), title="gates")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    return ax


def annotate(ax, findings: pd.DataFrame) -> None:
    """Phases as shaded spans, jumps and alarms as labelled vertical lines."""
    for f in findings.itertuples():
        if f.kind == "phase" and f.finding in _PHASE_COLORS:
            ax.axvspan(f.start_step, f.end_step, color=_PHASE_COLORS[f.finding], alpha=0.5, zorder=0, lw=0,
                       label=f"{f.finding} (steps {f.start_step}-{f.end_step})")
        elif f.kind in ("jump", "alarm"):
            color = "tab:green" if f.kind == "jump" else "tab:red"
            ax.axvline(f.step, color=color, ls="--", lw=1)
            ax.text(f.step, 0.5, f" {f.finding} @ {f.step}", transform=ax.get_xaxis_transform(), color=color,
                    fontsize=7, rotation=90, va="center")


def plot_gate_heatmap(metrics: pd.DataFrame, ax=None):
    """tanh(raw gate) per layer (rows) against step (columns); the sign shows which way a gate points."""
    import matplotlib.pyplot as plt
    ax = _axes(ax, (7, 3.2))
    columns = gate_columns(metrics)
    if len(metrics) == 0 or not columns:
        ax.set_title("gate heat map: no rows yet")
        return ax
    values = metrics[columns].to_numpy(float).T                         # (layers, rows)
    limit = max(float(np.abs(values).max()), 1e-6)
    steps = metrics.step.to_numpy(float)
    edges = np.concatenate([[steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1) / 2],
                            (steps[1:] + steps[:-1]) / 2, [steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1) / 2]])
    mesh = ax.pcolormesh(edges, np.arange(len(columns) + 1), values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_yticks(np.arange(len(columns)) + 0.5, [c.removeprefix("gate_") for c in columns], fontsize=6)
    ax.set(xlabel="step", title="tanh(gate) per layer")
    plt.colorbar(mesh, ax=ax, label="tanh(raw gate)")
    return ax


def plot_loss(metrics: pd.DataFrame, ax=None, *, label: str = "", span: int = 10):
    """The loss of each logged step (faint) and, smoothed, the exponential moving average over `span`
    rows of loss_avg (the mean loss of each logging interval)."""
    ax = _axes(ax)
    if len(metrics):
        line, = ax.plot(metrics.step, metrics.loss, alpha=0.25, lw=0.8)
        ax.plot(metrics.step, metrics.loss_avg.ewm(span=span).mean(), color=line.get_color(),
                label=f"{label} smoothed (EMA {span} rows of loss_avg)".strip())
        ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss (raw, smoothed)")
    return ax


def plot_runs(runs: dict[str, pd.DataFrame], axes=None):
    """Several runs side by side: smoothed loss and gate mean (with its layer spread) per run."""
    import matplotlib.pyplot as plt
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    last = 1.0
    for name, metrics in runs.items():
        plot_loss(metrics, axes[0], label=name)
        plot_gates(metrics, ax=axes[1], label=name, seed_bands=False)
        last = max(last, float(metrics.step.max()) if len(metrics) else 0.0)
    axes[1].set_xlim(0, last)                  # the longest run, not the last one drawn
    return axes


def plot_grounding(grounding: pd.DataFrame, findings: pd.DataFrame | None = None, ax=None):
    """Grounding success rate and mIoU of the checkpoint tests against step."""
    ax = _axes(ax)
    if grounding is not None and len(grounding):
        ax.plot(grounding.step, grounding.success_rate, "o-", label="success rate (IoU >= 0.5)")
        ax.plot(grounding.step, grounding.miou, "s--", alpha=0.7, label="mIoU")
        if findings is not None:
            annotate(ax, findings[findings.finding == "sudden convergence (grounding success)"])
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.set_title("no checkpoint tests yet")
    ax.set(xlabel="step", ylabel="grounding", ylim=(0, 1), title="grounding of the checkpoint tests")
    return ax


def plot_gates_and_grounding(metrics: pd.DataFrame, grounding: pd.DataFrame, findings: pd.DataFrame | None = None):
    """The gate curve and grounding success vs step side by side, on the same step axis."""
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 3.6), sharex=True)
    plot_gates(metrics, findings, left)
    plot_grounding(grounding, findings, right)
    right.set_xlim(left.get_xlim())
    fig.tight_layout()
    return fig
