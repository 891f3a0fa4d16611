"""Reading the gates: their statistics during training, and the training phases the training plan
expects (docs/guide/training-plan.md), found by stated rules. The figures are in `figures.py`.

The training plan's gate table (SD 1.5, batch 2, 25000 steps) is the reference:

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

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from adapterlib.runs import read_metrics

FINDING_COLUMNS = ["finding", "kind", "step", "start_step", "end_step", "value", "rule"]

# the training plan's expected gate mean, at ITS step counts: (first step, last step, low, high, label)
SEED_BANDS = [(0, 1000, 0.0, 0.01, "~0 (zero init)"), (1000, 5000, 0.0, 0.10, "slow growth"),
              (5000, 15000, 0.10, 0.30, "sudden jump"), (15000, 25000, 0.30, 0.50, "stable")]
SEED_LABEL = "training plan (SD 1.5, batch 2)"


def gate_stats(adapter) -> dict:
    """Gate mean/max of |tanh(raw)| (the effective gate at scale 1), the largest raw value, and each
    layer's tanh(raw) as gate_<layer>_attn / gate_<layer>_ff (the columns of metrics.csv)."""
    raw = {n: p.item() for n, p in adapter.gate_parameters().items()}
    eff = [abs(math.tanh(v)) for v in raw.values()]
    column = lambda n: (n.replace("layers.", "").replace(".gate_", "_")         # gligen: alpha_attn / alpha_dense
                        .replace(".alpha_attn", "_attn").replace(".alpha_dense", "_ff"))
    per_layer = {"gate_" + column(n): math.tanh(v) for n, v in raw.items()}
    return dict(gate_mean=sum(eff) / len(eff), gate_max=max(eff), gate_raw_max=max(abs(v) for v in raw.values()),
                **per_layer)


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
                              f"{mean[-1]:.3g} (the training plan expects 0.3-0.5 once stable)"))

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
                                  f"the collapse threshold ({how}); the training plan's remedy: RMSNorm (adapter_norm='rmsnorm')"))

    # --- over-activation: a raw gate above over_max
    over = np.flatnonzero(m.gate_raw_max.to_numpy(float) > over_max)
    if len(over):
        found.append(_finding("over-activation", "alarm", int(steps[over[0]]), int(steps[over[0]]),
                              int(steps[over[-1]]), float(m.gate_raw_max.iloc[over[0]]),
                              f"first row with gate_raw_max > {over_max:g} (raw gate, before tanh); "
                              f"{len(over)} rows above, max {m.gate_raw_max.max():.3g}; "
                              "the training plan's remedy: lower the learning rate"))
    else:
        found.append(_finding("over-activation", "note", rule=f"no over-activation: gate_raw_max <= {over_max:g} "
                                                              f"on every row (max {m.gate_raw_max.max():.3g})"))
    table = pd.DataFrame(found, columns=FINDING_COLUMNS)
    return table.astype({c: "Int64" for c in ("step", "start_step", "end_step")})


def run_phases(run_dir, metrics: pd.DataFrame | None = None, grounding: pd.DataFrame | None = None,
               **rules) -> pd.DataFrame:
    """`detect_phases` on a run folder, with the planned steps and LR warmup from its config.json."""
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
