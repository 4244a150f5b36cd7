"""Notebook 05's figures: the whole pipeline."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..data import from_uint8
from .style import image_grid


def _uint8_images(x):
    import torch

    return from_uint8(x) if x.dtype == torch.uint8 else x


def pipeline_figure(samples: dict, accuracy, title: str = ""):
    """The whole path: one sample grid per stage (``samples``: {stage label: images [N, C, H, W] in [-1, 1]
    or uint8}) above the server models' final test accuracy (``accuracy``: a frame with columns
    generator, method, seed, accuracy), mean ± sd over seeds per generator and method."""
    n = len(samples)
    fig = plt.figure(figsize=(max(2.3 * n, 7.5), 5.6), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.1])
    axes = top.subplots(1, n, squeeze=False)[0]
    for ax, (label, x) in zip(axes, samples.items()):
        image_grid(_uint8_images(x)[:32].cpu(), nrow=8, ax=ax, title=label)
    ax = bottom.subplots()
    gens = list(dict.fromkeys(accuracy["generator"]))
    methods = list(dict.fromkeys(accuracy["method"]))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        stats = accuracy[accuracy.method == m].groupby("generator")["accuracy"].agg(["mean", "std"]).reindex(gens)
        xs = np.arange(len(gens)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(xs, stats["mean"], width, yerr=stats["std"].fillna(0), label=m, color=f"C{j}", capsize=2)
    ax.set_xticks(np.arange(len(gens)), gens, fontsize=8)
    ax.set(ylabel="server model test accuracy", title="last round, mean ± sd over seeds (empty: not run)")
    lo = float(accuracy["accuracy"].min())
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.legend(fontsize=7, ncol=len(methods))
    if title:
        fig.suptitle(title)
    return fig


def pipeline_explorer_figure(data: dict, stage: str, seed: int):
    """Notebook 05's explorer: ``stage``'s samples for ``seed`` (with their Fréchet distance and
    samples/s), beside the test accuracy per round of every server model of that seed, the models
    distilled with ``stage``'s generator drawn bold."""
    fig, (ax_img, ax_acc) = plt.subplots(1, 2, figsize=(8.6, 3.4), gridspec_kw={"width_ratios": [1, 1.4]},
                                         constrained_layout=True)
    x = data["samples"][stage][seed]
    fd = data["fd"].get(stage, {}).get(seed)
    sps = data["samples_per_s"].get(stage, {}).get(seed)
    info = ", ".join(s for s in (f"FD {fd:.2f}" if fd is not None else "",
                                 f"{sps:,.0f} samples/s" if sps is not None else "") if s)
    image_grid(_uint8_images(x)[:32], nrow=8, ax=ax_img, title=f"{stage}, seed {seed}\n{info}")
    own = data["generator_of_stage"].get(stage, "")
    for i, (gen, per_method) in enumerate(data["accuracy"].items()):
        for j, (method, per_seed) in enumerate(per_method.items()):
            acc = per_seed[seed]
            ax_acc.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, color=f"C{i}",
                        ls=["-", "--", ":", "-."][j % 4], lw=2.4 if gen == own else 0.9,
                        alpha=1.0 if gen == own or not own else 0.45, label=f"{gen} · {method}")
    rounds = max(len(acc) for per_method in data["accuracy"].values() for per_seed in per_method.values()
                 for acc in per_seed.values())
    ax_acc.set_xticks(range(1, rounds + 1))
    ax_acc.set(xlabel="round", ylabel="server model test accuracy",
               title=f"seed {seed}: bold = with this stage's generator" if own else f"seed {seed}: every server model")
    ax_acc.legend(fontsize=6, ncol=2)
    return fig
