"""Notebook 04's figures (DMD2, one-step distillation)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..data import from_uint8
from .style import image_grid


def density_backdrop(ax, mixture, lim: float = 3.2, n: int = 160):
    """The exact density of a 2-D mixture as grey filled contours on ``ax``."""
    import torch

    xs = np.linspace(-lim, lim, n)
    grid = torch.tensor(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2), dtype=torch.float32)
    dens = mixture.log_prob(grid).exp().reshape(n, n).numpy()
    ax.contourf(xs, xs, dens, levels=12, cmap="Greys")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    return ax


def samples_over_density(axes, mixture, panels, lim: float = 3.2):
    """One panel per (title, points [N, 2]): the points in red over the true density."""
    for ax, (title, x) in zip(np.ravel(axes), panels):
        density_backdrop(ax, mixture, lim)
        if x is not None:
            x = np.asarray(x, dtype=float)
            ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color="C3")
        ax.set_title(title, fontsize=8)
    return axes


def dm_gradient_quiver(ax, real_mixture, fake_mixture, x, step, lim: float = 3.2):
    """DMD's teaching picture: generator samples ``x`` (red), the true density (grey), the generator's
    own modes (blue crosses) and the update -g of each sample (arrows)."""
    density_backdrop(ax, real_mixture, lim)
    m = np.asarray(fake_mixture.means)
    ax.scatter(m[:, 0], m[:, 1], marker="x", color="C0", label="generator's modes")
    x, step = np.asarray(x, dtype=float), np.asarray(step, dtype=float)
    ax.scatter(x[:, 0], x[:, 1], color="C3", s=12, label="samples x")
    ax.quiver(x[:, 0], x[:, 1], step[:, 0], step[:, 1], angles="xy", scale_units="xy", scale=1, color="C3", width=0.006)
    ax.legend(fontsize=7, loc="lower left")
    return ax


def seed_band_plot(ax, frame, x: str, y: str, hue: str | None = None, logx: bool = False):
    """Mean over seeds with a band of +-1 standard deviation (seaborn), one line per ``hue``."""
    import seaborn as sns

    sns.lineplot(data=frame, x=x, y=y, hue=hue, errorbar="sd", marker="o", ax=ax)
    if logx:
        ax.set_xscale("log", base=2)
    return ax


def budget_gap_figure(frame, paper_ratio: float, title: str, panels: list | None = None):
    """Student/teacher distance ratio against the generator-update budget: seeds as a band, the
    paper's ratio and 'as good as the teacher' (1) drawn in. ``frame``: columns budget, ratio, seed.
    ``panels``: more panels, each (column, teacher level, label): that column of ``frame`` against the
    budget, with the teacher's level drawn in."""
    panels = panels or []
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.2 * (1 + len(panels)), 3.4), squeeze=False)
    ax = axes[0, 0]
    seed_band_plot(ax, frame, "budget", "ratio", logx=True)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="as good as the teacher")
    ax.axhline(paper_ratio, color="C2", lw=1.2, ls=":", label=f"paper: {paper_ratio:.2f}")
    ax.set(xlabel="generator updates (log scale)", ylabel="student / teacher distance (log scale)", title=title,
           yscale="log")
    ax.legend(fontsize=7)
    for ax, (column, level, label) in zip(axes[0, 1:], panels):
        seed_band_plot(ax, frame, "budget", column, logx=True)
        ax.axhline(level, color="k", lw=0.8, ls="--", label="teacher")
        ax.set(xlabel="generator updates (log scale)", ylabel=label, title=label)
        ax.legend(fontsize=7)
    return fig


def search_figure(records, key: str = "score", title: str = "hyper-parameter search (validation)"):
    """One panel per searched hyper-parameter: the validation score (mean over seeds, +-1 sd band)
    against its value, the others held at their best. ``records``: [{"param", "value", "seed", key}]."""
    import pandas as pd

    frame = pd.DataFrame(records)
    params = list(dict.fromkeys(frame["param"]))
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.0), squeeze=False)
    for ax, p in zip(axes[0], params):
        sub = frame[frame["param"] == p].copy()
        sub["value"] = sub["value"].astype(float)
        positive = (sub["value"] > 0).all() and sub["value"].nunique() > 2
        seed_band_plot(ax, sub, "value", key, logx=False)
        if positive:
            ax.set_xscale("log")
        ax.set(xlabel=p, ylabel=f"validation {key}")
    fig.suptitle(title, fontsize=9)
    return fig


def curves_figure(frame, y: str, teacher_level: float | None = None, title: str = "", levels: dict | None = None):
    """Training curves of several runs (column ``run``) over generator updates (``step``), seeds as
    bands; ``levels`` {label: value} draws more reference levels (other samplers of the teacher)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    seed_band_plot(ax, frame, "step", y, hue="run")
    if teacher_level is not None:
        ax.axhline(teacher_level, color="k", lw=0.8, ls=":", label="teacher, many steps")
    for i, (label, level) in enumerate((levels or {}).items()):
        ax.axhline(level, color=f"C{i + 1}", lw=0.9, ls=("--", ":", "-.")[i % 3], label=label)
    ax.set(xlabel="generator update", ylabel=y, yscale="log", title=title)
    ax.legend(fontsize=7)
    return fig


def dmd2_explorer_figure(data: dict, model: str, step: int):
    """Notebook 04's explorer view from its stored data: (left) 2-D samples of ``model`` over the true
    density, (middle) the 1-step student's samples at generator update ``step``, (right) digits of
    ``model`` where it was run on images."""
    import torch

    from ..data import GaussianMixture2D

    mix = GaussianMixture2D(data["mixture_means"], float(data["mixture_std"]))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    toy = data["toy_samples"].get(model)
    steps = data["training_steps"]
    pos = min(range(len(steps)), key=lambda i: abs(steps[i] - step))
    at = steps[pos]
    samples_over_density(axes[:2], mix, [(f"{model} ({data['toy_scores'].get(model, float('nan')):.3f} SW)"
                                          if toy is not None else f"{model}: not run on 2-D", toy),
                                         (f"1-step student at update {at}", data["training_samples"][pos])])
    grid = data["image_samples"].get(model)
    if grid is not None:
        image_grid(from_uint8(torch.as_tensor(grid)), nrow=8, ax=axes[2], title=f"{model} (digits)")
    else:
        axes[2].set_axis_off()
        axes[2].set_title(f"{model}: not run on digits", fontsize=8)
    return fig
