"""Figures the notebooks show: image grids with the requested boxes drawn on top."""
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
        if not (boxes and records is not None):
            continue
        for obj in records[i].objects:
            x0, y0, x1, y1 = obj.box
            color = color_of(obj.phrase)
            rgb = np.array(COLORS[color]) / 255 if color else "black"
            # pixel edges sit at -0.5 in imshow coordinates
            ax.add_patch(Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                   edgecolor=rgb, linewidth=1, linestyle="-" if color else "--"))
    fig.tight_layout()
    return fig
