"""Notebook 03's figures (LD3, learned time steps)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..data import from_uint8
from .style import image_grid


def ld3_gain_figure(gains: dict, nfes, solvers):
    """Relative gain of LD3 over the best hand-made grid (held-out teacher distance) against NFE, one
    panel per dataset; ``gains[(dataset, solver, nfe)]`` = per-seed gains (dots) and their mean (line)."""
    datasets = list(dict.fromkeys(k[0] for k in gains))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.0 * len(datasets), 2.6), sharey=True, squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for k, solver in enumerate(solvers):
            xs = [n for n in nfes if (ds, solver, n) in gains]
            for n in xs:
                g = 100 * np.asarray(gains[(ds, solver, n)])
                ax.plot(np.full(len(g), n + 0.15 * (k - 0.5)), g, ".", color=f"C{k}", alpha=0.6)
            ax.plot(xs, [100 * np.mean(gains[(ds, solver, n)]) for n in xs], "-", color=f"C{k}", label=solver)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=ds, xlabel="NFE", xticks=sorted({k[2] for k in gains if k[0] == ds}))
    axes[0, 0].set_ylabel("LD3 gain over best hand-made\n(held-out teacher distance, %)")
    axes[0, -1].legend(fontsize=7)
    return fig


def ld3_grids_figure(sigmas: dict, datasets, solver: str, nfe: int):
    """sigma_i against step i of every grid of ``solver`` at ``nfe``, one panel per dataset;
    ``sigmas[(dataset, solver, grid, nfe)]`` -> N+1 noise levels (LD3: seed 0's learned grid)."""
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.0 * len(datasets), 2.6), sharey=True, squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for (d, s, grid, n), sig in sigmas.items():
            if (d, s, n) == (ds, solver, nfe):
                ld3 = grid == "ld3"
                ax.plot(range(len(sig)), sig, "o-" if ld3 else ".--", lw=2 if ld3 else 1, color="k" if ld3 else None,
                        label=grid)
        ax.set(yscale="log", xlabel="step i", title=f"{ds}: {solver}, NFE {nfe}")
    axes[0, 0].set_ylabel("sigma_i")
    axes[0, -1].legend(fontsize=7)
    return fig


def ld3_samples_figure(panels: dict):
    """One column per dataset, one row per grid: ``panels[dataset]`` = [(title, samples), ...] with
    samples an image batch [n, C, H, W] in [-1, 1] (shown as a grid) or 2-D points [n, 2] (a scatter)."""
    n_rows = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(n_rows, len(panels), figsize=(2.4 * len(panels), 2.5 * n_rows), squeeze=False)
    for j, items in enumerate(panels.values()):
        for i, (title, x) in enumerate(items):
            ax = axes[i, j]
            x = x.float().cpu()
            if x.ndim == 4:
                image_grid(x, nrow=int(np.ceil(np.sqrt(len(x)))), ax=ax)
            else:
                ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
                ax.set(aspect="equal", xlim=(-3.2, 3.2), ylim=(-3.2, 3.2))
            ax.set_title(title, fontsize=8)
    return fig


def ld3_explorer_view(ex: dict, dataset: str, solver: str, grid: str, nfe: int):
    """The explorer's figure from stored data only (``fedlib.ld3.explorer_data``): the samples of one
    (dataset, solver, grid, NFE) from the first seed's held-out noise, and its sigmas beside the
    hand-made grids', titled with its held-out teacher distance and metric (mean over seeds)."""
    key = f"{dataset}|{solver}|{grid}|{nfe}"
    if key not in ex["samples"]:
        print(f"nothing stored for {key}: LD3 was learned for {dataset} at NFE "
              f"{sorted({int(k.split('|')[3]) for k in ex['samples'] if k.startswith(dataset + '|')})}")
        return None
    x = ex["samples"][key]
    vals = [r for r in ex["rows"] if (r["dataset"], r["solver"], r["grid"], r["nfe"]) == (dataset, solver, grid, nfe)]
    td, m = np.mean([r["teacher_distance"] for r in vals]), np.mean([r["metric"] for r in vals])
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.5, 3.2))
    if x.ndim == 4:
        image_grid(from_uint8(x), nrow=int(np.ceil(np.sqrt(len(x)))), ax=a)
    else:
        a.scatter(x[:, 0].float(), x[:, 1].float(), s=2, alpha=0.5)
        a.set(aspect="equal", xlim=(-3.2, 3.2), ylim=(-3.2, 3.2))
    a.set_title(f"{dataset}, {solver}, {grid}, NFE {nfe}\nteacher distance {td:.4g}, "
                f"{ex['metric_names'][dataset]} {m:.4g}", fontsize=8)
    for g in ex["grids"]:
        sig = ex["sigmas"].get(f"{dataset}|{solver}|{g}|{nfe}")
        if sig is not None:
            b.plot(range(len(sig)), sig, "o-" if g == grid else ".--", lw=2 if g == grid else 0.8, label=g)
    b.set(yscale="log", xlabel="step i", ylabel="sigma_i", title="the grid (seed 0)")
    b.legend(fontsize=7)
    return fig
