"""Phase detection on synthetic metrics: each anomaly is found at the step it was put at, by its rule."""
import numpy as np
import pandas as pd
import pytest

from adapterlib.analysis.figures import plot_gate_heatmap, plot_gates
from adapterlib.analysis.gates import detect_phases

SPREAD = np.array([0.5, 1.0, 1.0, 1.5])                  # per-layer |gate| relative to the mean


def metrics(steps, gate_mean, gate_raw_max=None):
    """A metrics.csv-like frame with 4 layers whose |tanh| average to `gate_mean`."""
    steps, gate_mean = np.asarray(steps), np.asarray(gate_mean, float)
    layers = np.clip(gate_mean[:, None] * SPREAD, 0, 0.999)                    # (rows, layers)
    frame = pd.DataFrame(dict(step=steps, loss=0.03, loss_avg=0.03, lr=1e-4, grad_norm=0.1,
                              gate_mean=layers.mean(1), gate_max=layers.max(1),
                              gate_raw_max=np.arctanh(layers.max(1)) if gate_raw_max is None else gate_raw_max,
                              samples_per_s=10.0, wall_s=steps * 0.1, skipped=0))
    for i in range(layers.shape[1]):
        frame[f"gate_{i}_attn"] = layers[:, i] * (-1) ** i                    # signs differ, |.| counts
    return frame


def found(findings, name, kind):
    rows = findings[(findings.finding == name) & (findings.kind == kind)]
    return rows.iloc[0] if len(rows) else None


STEPS = np.arange(50, 25001, 50)                                            # 500 rows, like the seed's run


def seed_like(jump_at=8000):
    """Zero, slow growth to ~0.08, a logistic jump at `jump_at`, a plateau at ~0.4."""
    slow = 0.08 * np.clip((STEPS - 1000) / 4000, 0, 1)
    return slow + 0.32 / (1 + np.exp(-(STEPS - jump_at) / 200))


def test_sudden_jump_is_found_at_its_step():
    findings = detect_phases(metrics(STEPS, seed_like(8000)), total_steps=25000)
    jump = found(findings, "sudden convergence (gate mean)", "jump")
    assert jump is not None, findings.rule.tolist()
    assert abs(jump.step - 8000) <= 100
    assert "needs >= 50%" in jump.rule and "median slope" in jump.rule
    assert 1400 <= found(findings, "zero-init", "phase").end_step <= 1500      # slow growth passes 0.01 at 1500
    assert findings[findings.kind == "alarm"].empty


def test_smoothly_rising_run_raises_no_alarm_and_no_jump():
    rng = np.random.default_rng(0)
    mean = 0.4 * STEPS / STEPS[-1] + rng.normal(0, 0.002, len(STEPS))
    findings = detect_phases(metrics(STEPS, mean), total_steps=25000)
    assert findings[findings.kind.isin(["alarm", "jump"])].empty, findings[["finding", "kind", "rule"]]
    assert found(findings, "sudden convergence (gate mean)", "note").rule.startswith("no sudden convergence")
    assert found(findings, "grown", "phase") is not None


def test_collapse_is_found_where_the_gate_drops_to_zero():
    mean = np.where(STEPS < 9000, 0.2 * np.minimum(STEPS / 3000, 1), 0.001)
    collapse = found(detect_phases(metrics(STEPS, mean), total_steps=25000), "collapse", "alarm")
    assert collapse is not None and collapse.step == 9000
    assert "RMSNorm" in collapse.rule


def test_gate_that_never_leaves_zero_is_a_collapse_at_the_threshold_step():
    findings = detect_phases(metrics(STEPS, np.full(len(STEPS), 0.001)), total_steps=25000)
    collapse = found(findings, "collapse", "alarm")
    assert collapse is not None and collapse.step == 5000                   # 20% of 25000 planned steps
    assert found(findings, "zero-init", "phase").end_step == 25000


def test_zero_gate_during_the_lr_warmup_is_not_a_collapse():
    short = STEPS[STEPS <= 2000]
    findings = detect_phases(metrics(short, np.full(len(short), 0.001)), total_steps=2000, warmup=2500)
    assert findings[findings.kind == "alarm"].empty


def test_zero_gate_early_in_a_long_run_is_not_a_collapse():
    early = STEPS[STEPS <= 800]                                              # still in the seed's zero-init phase
    findings = detect_phases(metrics(early, np.full(len(early), 0.001)), total_steps=25000)
    assert findings[findings.kind == "alarm"].empty


def test_over_activation_is_found_at_the_first_raw_gate_above_one():
    raw = np.where(STEPS >= 4200, 1.3, 0.6)
    alarm = found(detect_phases(metrics(STEPS, seed_like(), gate_raw_max=raw)), "over-activation", "alarm")
    assert alarm is not None and alarm.step == 4200 and alarm.value == pytest.approx(1.3)
    assert "lower the learning rate" in alarm.rule


def test_grounding_success_jump_is_found_between_checkpoints():
    grounding = pd.DataFrame(dict(step=[0, 2000, 4000, 6000, 8000, 10000],
                                  success_rate=[0.02, 0.03, 0.05, 0.70, 0.74, 0.75]))
    jump = found(detect_phases(metrics(STEPS, seed_like()), grounding=grounding),
                 "sudden convergence (grounding success)", "jump")
    assert jump is not None and (jump.start_step, jump.step) == (4000, 6000)


def test_too_few_rows_gives_notes_not_errors():
    findings = detect_phases(metrics([5, 10, 15], [0.0, 0.002, 0.004]))
    assert found(findings, "sudden convergence (gate mean)", "note").rule.startswith("not enough rows")
    assert findings[findings.kind == "alarm"].empty
    assert found(detect_phases(pd.DataFrame()), "metrics", "note") is not None


def test_figures_draw_the_gate_curve_the_phases_and_the_layers():
    import matplotlib
    matplotlib.use("Agg")
    frame = metrics(STEPS, seed_like(8000))
    findings = detect_phases(frame, total_steps=25000)
    ax = plot_gates(frame, findings)
    mean_line = next(l for l in ax.get_lines() if l.get_label() == "gate mean")
    assert np.allclose(mean_line.get_ydata(), frame.gate_mean) and np.array_equal(mean_line.get_xdata(), frame.step)
    labels = [t.get_text() for t in ax.texts]
    assert any("sudden convergence (gate mean)" in t for t in labels)          # the jump is marked
    assert ax.get_xlim() == (0, 25000)
    heat = plot_gate_heatmap(frame)
    mesh = heat.collections[0]
    assert mesh.get_array().reshape(4, len(frame)).shape == (4, len(frame))     # layers x rows
    assert np.allclose(mesh.get_array().reshape(4, -1)[1], frame.gate_1_attn)   # signed tanh, per layer
    # a run with one row draws without error and says so in its axes
    tiny = metrics([5], [0.0])
    assert plot_gates(tiny, detect_phases(tiny)).get_lines()
