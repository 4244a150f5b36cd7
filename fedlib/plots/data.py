"""Notebook 00's figures: data and partitions."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def label_heatmaps(panels: dict, width: float = 3.2):
    """One heatmap per panel title -> label counts [K, C]: rows are clients, columns classes, colour the
    share of the class in the client's data (one colour scale for all)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.0), constrained_layout=True,
                             squeeze=False)
    for ax, (title, counts) in zip(axes[0], panels.items()):
        counts = np.asarray(counts, dtype=float)
        im = ax.imshow(counts / np.maximum(counts.sum(1, keepdims=True), 1e-12), cmap="Blues", aspect="auto",
                       vmin=0, vmax=1)
        ax.set(title=title, xlabel="class", ylabel="client")
        ax.grid(False)
    fig.colorbar(im, ax=axes, label="share of the client's samples", shrink=0.9)
    return fig
