"""Figures of notebook 08 (FedKA: the global workspace and the federated vote on feature-shift domains)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import image_grid, method_colours

METHOD_LABELS = {"fedavg": "FedAvg", "fedka": "FedAvg + vote", "fedavg_mmd": "FedAvg + MMD",
                 "fedka_mmd": "FedKA (MMD + vote)"}


# the registry's tab20 shades (method_colours) give the two new methods greys; one hue per part instead
METHOD_COLOURS = {"fedavg": "C0", "fedka": "C4", "fedavg_mmd": "C2", "fedka_mmd": "C3"}


def _colours(methods) -> dict:
    return {**method_colours(methods), **{m: c for m, c in METHOD_COLOURS.items() if m in methods}}


def _label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def domains_figure(images: dict, n_per_domain: int = 10):
    """The same images moved to every domain (``images``: domain -> [N, C, H, W] in [-1, 1]), one row each."""
    fig, axes = plt.subplots(len(images), 1, figsize=(0.45 * n_per_domain + 1.2, 0.8 * len(images) + 0.3),
                             squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], images.items()):
        image_grid(x[:n_per_domain].float(), nrow=n_per_domain, ax=ax, title=name)
    fig.tight_layout()
    return fig


def target_accuracy_figure(final, methods: list[str], value: str = "target_accuracy",
                           ylabel: str = "target test accuracy"):
    """One panel per target domain: ``value`` per method, one dot per seed, the mean as a bar."""
    targets = list(dict.fromkeys(final["target"]))
    colours = _colours(methods)
    fig, axes = plt.subplots(1, len(targets), figsize=(2.9 * len(targets) + 0.4, 3.0), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], targets):
        sub = final[final["target"] == t]
        for i, m in enumerate(methods):
            v = sub[sub["method"] == m][value].to_numpy()
            ax.bar(i, v.mean(), color=colours[m], alpha=0.6, width=0.7)
            ax.scatter(np.full(len(v), i), v, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(methods)), [_label(m) for m in methods], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"target: {t}", fontsize=9)
    axes[0, 0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def rounds_figure(rounds, methods: list[str], value: str = "accuracy", ylabel: str = "target test accuracy"):
    """``value`` per round, mean over seeds with a band of one standard deviation, one panel per target."""
    targets = list(dict.fromkeys(rounds["target"]))
    colours = _colours(methods)
    fig, axes = plt.subplots(1, len(targets), figsize=(3.0 * len(targets) + 0.6, 2.8), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], targets):
        sub = rounds[rounds["target"] == t]
        for m in methods:
            g = sub[sub["method"] == m].groupby("round")[value]
            mean, sd = g.mean(), g.std().fillna(0)
            ax.plot(mean.index, mean.values, color=colours[m], label=_label(m), marker="o", ms=3)
            ax.fill_between(mean.index, mean - sd, mean + sd, color=colours[m], alpha=0.15)
        ax.set_title(f"target: {t}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(sorted(sub["round"].unique()))
    axes[0, 0].set_ylabel(ylabel)
    axes[0, -1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def fedka_explorer_figure(explorer: dict, target: str, method: str, value: str):
    """The explorer's view: ``value`` of one method against FedAvg, per seed, on one target."""
    rows = [r for r in explorer["final"] if r["target"] == target]
    seeds = sorted({r["seed"] for r in rows})
    get = {(r["method"], r["seed"]): r[value] for r in rows}
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    x = np.arange(len(seeds))
    colours = _colours(["fedavg", method])
    ax.bar(x - 0.2, [get["fedavg", s] for s in seeds], 0.4, color=colours["fedavg"], label=_label("fedavg"))
    ax.bar(x + 0.2, [get[method, s] for s in seeds], 0.4, color=colours[method], label=_label(method))
    ax.set_xticks(x, [f"seed {s}" for s in seeds])
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title(f"target {target}: {_label(method)} against FedAvg", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
