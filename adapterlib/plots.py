"""Figures the notebooks show: image grids with the requested boxes drawn on top, grounding curves."""
from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from .evaluate import color_of
from .shapes import COLORS


def show_grid(images, records=None, titles=None, boxes: bool = True, ncols: int = 8):
    """A Figure of (N, H, W, 3) uint8 images, `ncols` a row. Each image is titled by `titles[i]`, else
    its record's caption; with `boxes`, each record's requested boxes are drawn in their phrase's
    colour (dashed black when the phrase names no Shapes colour)."""
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


def draw_boxes(ax, record, h: int, w: int) -> None:
    """A record's requested boxes over an (h, w) image on `ax`, in their phrase's colour (dashed black
    when the phrase names no Shapes colour)."""
    for obj in record.objects:
        x0, y0, x1, y1 = obj.box
        color = color_of(obj.phrase)
        rgb = np.array(COLORS[color]) / 255 if color else "black"
        # pixel edges sit at -0.5 in imshow coordinates
        ax.add_patch(Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                               edgecolor=rgb, linewidth=1, linestyle="-" if color else "--"))


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
