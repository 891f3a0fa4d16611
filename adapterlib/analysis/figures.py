"""Every figure of the project: image grids with the requested boxes drawn on top, the sample grid a
run writes at each checkpoint, loss and gate curves, grounding curves, success by bucket.

A box is drawn in the colour its phrase names when the phrase names one ("red circle" -> red; any
CSS colour name), else in a fixed cycle of colours, so Shapes and real phrases draw alike."""
from __future__ import annotations

import math
import re
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import CSS4_COLORS, to_rgb
from matplotlib.patches import Rectangle

from adapterlib.analysis.gates import SEED_BANDS, SEED_LABEL, gate_columns


def show_grid(images, records=None, titles=None, boxes: bool = True, ncols: int = 8):
    """A Figure of (N, H, W, 3) uint8 images, `ncols` a row. Each image is titled by `titles[i]`, else
    its record's caption; with `boxes`, each record's requested boxes are drawn in their phrase's
    colour (dashed, in a cycle colour, when the phrase names none: `box_color`)."""
    images = np.asarray(images)
    n = len(images)
    if records is not None and len(records) != n:
        raise ValueError(f"{n} images but {len(records)} records")
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], interpolation="nearest")
        h, w = images[i].shape[:2]
        title = titles[i] if titles is not None else records[i].caption if records is not None else ""
        ax.set_title("\n".join(textwrap.wrap(title, 22)), fontsize=6)
        if boxes and records is not None:
            draw_boxes(ax, records[i], h, w)
    fig.tight_layout()
    return fig


_CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def named_color(phrase: str) -> tuple[float, float, float] | None:
    """The RGB (0-1) of the first colour word of a phrase ("a red circle" -> red), else None."""
    for word in re.findall(r"[a-z]+", phrase.lower()):
        if word in CSS4_COLORS:
            return to_rgb(CSS4_COLORS[word])
    return None


def box_color(phrase: str, index: int) -> tuple[tuple[float, float, float], bool]:
    """(RGB 0-1, named): the phrase's colour, or the index-th colour of a fixed cycle."""
    rgb = named_color(phrase)
    return (rgb, True) if rgb is not None else (to_rgb(_CYCLE[index % len(_CYCLE)]), False)


def draw_boxes(ax, record, h: int, w: int) -> None:
    """A record's requested boxes over an (h, w) image on `ax`, in their phrase's colour (dashed, in a
    cycle colour, when the phrase names none)."""
    for i, obj in enumerate(record.objects):
        x0, y0, x1, y1 = obj.box
        rgb, named = box_color(obj.phrase, i)
        # pixel edges sit at -0.5 in imshow coordinates
        ax.add_patch(Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                               edgecolor=rgb, linewidth=1, linestyle="-" if named else "--"))


def boxed_grid(images: np.ndarray, records=None, upscale: int = 4, ncols: int = 8):
    """A PIL image (no matplotlib figure: cheap enough for every checkpoint): the samples side by side,
    enlarged `upscale` times, each requested box drawn in its phrase's colour, darkened."""
    from PIL import Image, ImageDraw
    n, h, w, _ = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    pad = 2
    grid = Image.new("RGB", (ncols * (w * upscale + pad) + pad, nrows * (h * upscale + pad) + pad), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = pad + (i % ncols) * (w * upscale + pad), pad + (i // ncols) * (h * upscale + pad)
        grid.paste(Image.fromarray(image).resize((w * upscale, h * upscale), Image.NEAREST), (x, y))
        for j, obj in enumerate(records[i].objects if records else ()):
            x0, y0, x1, y1 = obj.box
            rgb, _ = box_color(obj.phrase, j)
            draw.rectangle([x + x0 * w * upscale, y + y0 * h * upscale, x + x1 * w * upscale - 1,
                            y + y1 * h * upscale - 1], outline=tuple(int(c * 255 * 0.6) for c in rgb), width=1)
    return grid


def show_image_table(images, records, column_titles, boxes: bool = True):
    """A Figure of images (R, C, H, W, 3): row r shows record r (its caption on the left) under C
    settings (`column_titles`, e.g. the injection scales), with the requested boxes drawn."""
    images = np.asarray(images)
    n_rows, n_cols = images.shape[:2]
    if len(records) != n_rows or len(column_titles) != n_cols:
        raise ValueError(f"images are {n_rows} x {n_cols} but there are {len(records)} records "
                         f"and {len(column_titles)} column titles")
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols + 1.2, 1.5 * n_rows + 0.3), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if boxes:
                draw_boxes(ax, records[r], *images.shape[2:4])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=8)
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(records[r].caption, 18)), fontsize=6)
    fig.tight_layout()
    return fig


def plot_grounding_vs_scale(table, metrics=("success_rate", "miou")):
    """Success and mIoU against the injection scale, one line per tau, from `evaluate.compare`'s table;
    the ground truth (the ceiling) and the base alone (the floor) as horizontal reference lines."""
    adapter = table[table.reference == "adapter"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for tau, rows in adapter.groupby("tau"):
            rows = rows.sort_values("scale")
            ax.plot(rows.scale, rows[metric], marker="o", label=f"adapter, tau {tau:g}")
        for reference, style in (("ground-truth", "--"), ("base", ":")):
            value = table.loc[table.reference == reference, metric]
            if len(value):
                ax.axhline(value.iloc[0], color="gray", linestyle=style,
                           label="ground truth" if reference == "ground-truth" else "base alone")
        ax.set_xlabel("injection scale")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    n = int(table.n_images.iloc[0])
    fig.suptitle(f"grounding on {n} layouts", fontsize=9)
    fig.tight_layout()
    return fig


def plot_buckets(report: pd.DataFrame, measured: str = "adapter"):
    """Grounding success by bucket from `buckets.bucket_report`: one panel for layouts whose requested
    boxes stay apart, one for layouts where two intersect; per object count, grouped bars of the ceiling
    (ground truth), the base alone (when the report has it) and `measured`, with its ratio to the ceiling
    written above its bar."""
    bars = [("ceiling_success_rate", "ground truth (ceiling)", "0.75"), ("base_success_rate", "base alone", "#9ecae1"),
            ("success_rate", measured, "#d62728")]
    bars = [b for b in bars if len(report) and report[b[0]].notna().any()]
    if not bars:                  # nothing the detector could measure (e.g. the colour detector on real phrases)
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no measurable objects: the detector measures none of these phrases", ha="center",
                va="center")
        ax.set_axis_off()
        return fig
    counts = sorted(report["objects"].unique())
    width = 0.8 / len(bars)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, overlap in zip(axes, (False, True)):
        rows = report[report["overlap"] == overlap].sort_values("objects")
        for i, (column, label, color) in enumerate(bars):
            x = rows["objects"].to_numpy(float) + (i - (len(bars) - 1) / 2) * width
            ax.bar(x, rows[column].fillna(0.0), width, label=label, color=color)
            if column == "success_rate":
                for xi, height, ratio in zip(x, rows[column], rows["ratio"]):
                    if pd.notna(ratio):
                        ax.text(xi, height + 0.02, f"{ratio:.2f}", ha="center", fontsize=6)
        ax.set_xticks(counts)
        ax.set(xlabel="objects in the layout", ylim=(0, 1.12),
               title="boxes overlap" if overlap else "boxes apart")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("success rate (IoU >= 0.5)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"success by bucket ({int(report['n_layouts'].sum())} layouts; number: {measured} / ceiling)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_progress(metrics: pd.DataFrame, axes=None):
    """Loss (raw and smoothed) and the gate (mean over layers, max) against step; with them, where the run measured
    its checkpoint samples (`checkpoint_grounding`), grounding success and mIoU at each checkpoint."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    loss_ax, gate_ax = axes
    loss_ax.clear(); gate_ax.clear()
    measured = metrics.dropna(subset=["grounding_success"]) if "grounding_success" in metrics else metrics.iloc[:0]
    if len(metrics):
        loss_ax.plot(metrics.step, metrics.loss, alpha=0.3, label="loss")
        loss_ax.plot(metrics.step, metrics.loss_avg.ewm(span=10).mean(), label="smoothed")
        gate_ax.plot(metrics.step, metrics.gate_mean, label="gate mean |tanh|")
        gate_ax.plot(metrics.step, metrics.gate_max, label="gate max", alpha=0.6)
    if len(measured):
        gate_ax.plot(measured.step, measured.grounding_success, "o-", color="tab:green", label="grounding success")
        gate_ax.plot(measured.step, measured.grounding_miou, "s--", color="tab:olive", label="grounding mIoU")
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    gate_ax.set(xlabel="step", ylabel="tanh(gate); grounding" if len(measured) else "tanh(gate)",
                title="gates and checkpoint grounding" if len(measured) else "gates")
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    return axes[0].figure


# ---------------------------------------------------------------------------------------------
# gate figures (the rules that find phases live in gates.py)

_PHASE_COLORS = {"zero-init": "0.85", "slow growth": "#fde9c4", "grown": "#dcefd9"}


def _axes(ax, figsize=(7, 3.4)):
    return plt.subplots(figsize=figsize)[1] if ax is None else ax


def draw_seed_bands(ax, xmax: float) -> None:
    """The training plan's expected gate mean at its own step counts, clipped to [0, xmax]: a reference,
    not rescaled to this run's length (the plan trains SD 1.5 at batch 2 for 25000 steps)."""
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
    """The gate mean over layers (|tanh(raw)|), the min-max band over layers, the training plan's bands
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 3.6), sharex=True)
    plot_gates(metrics, findings, left)
    plot_grounding(grounding, findings, right)
    right.set_xlim(left.get_xlim())
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# throughput (adapterlib.evaluation.bench)

def plot_throughput(result: dict, ax=None):
    """Samples/s of every bench row as bars (floor grey, peer orange, ours blue, other rows green),
    the floor and the peer as dashed lines, each bar labelled with its ratio to the peer."""
    rows = result["rows"][::-1]                                       # the first row on top
    ax = _axes(ax, figsize=(7, 0.35 * len(rows) + 1.2))
    kind = lambda name: next((c for k, c in (("floor", "0.6"), ("peer", "tab:orange"), ("ours", "tab:blue"))
                              if name.startswith(k)), "tab:green")
    speeds = [r["samples_per_s"] or 0 for r in rows]
    ax.barh([r["name"] for r in rows], speeds, color=[kind(r["name"]) for r in rows])
    for y, r in enumerate(rows):
        text = "n/a" if r["samples_per_s"] is None else f" {r['x_peer']:.2f}x peer" if r["x_peer"] else ""
        ax.text(speeds[y], y, text, va="center", fontsize=7)
    for name, style in (("floor", "0.4"), ("peer", "tab:orange")):
        ax.axvline(result[f"{name}_samples_per_s"], color=style, linestyle="--", linewidth=0.8)
    ax.set_xlabel("training samples / s (median over rounds)")
    ax.set_title(f"{result['size']} on {result['device_name']}, batch {result['batch']}, {result['objects']} slots",
                 fontsize=9)
    ax.set_xlim(0, max(speeds) * 1.25)
    return ax
