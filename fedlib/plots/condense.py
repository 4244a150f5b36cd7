"""Figures of notebook 06 (dataset distillation: NCFM, DM, random real subsets; FedLGD on local virtual data)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import image_grid, method_colours

METHOD_COLOURS = {"NCFM": "C0", "DM": "C1", "random": "C7"}


def synthetic_sets_figure(sets: dict, ipc: int, n_classes: int, title: str = ""):
    """One image grid per method (``sets``: method -> images [C * ipc, ...] in [-1, 1], class-major): one
    row per synthetic image of each class (``ipc`` rows, at most 10), one column per class."""
    fig, axes = plt.subplots(1, len(sets), figsize=(2.9 * len(sets), 0.3 * min(ipc, 10) + 1.2), squeeze=False)
    for ax, (name, x) in zip(axes[0], sets.items()):
        rows = min(ipc, 10)
        # class-major [C, ipc] -> rows of one image per class
        order = [c * ipc + r for r in range(rows) for c in range(n_classes)]
        image_grid(x[order].float(), nrow=n_classes, ax=ax, title=name)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def accuracy_figure(frame, methods: list[str], reference: dict | None = None):
    """Test accuracy of a classifier trained on each set: one dot per seed, the mean as a bar, per IPC."""
    ipcs = sorted(frame["ipc"].unique())
    # the registry's tab20 shades (method_colours) put these unregistered names in pale greys
    colours = {**method_colours(methods), **{m: c for m, c in METHOD_COLOURS.items() if m in methods}}
    fig, axes = plt.subplots(1, len(ipcs), figsize=(3.2 * len(ipcs), 3.0), squeeze=False, sharey=True)
    for ax, ipc in zip(axes[0], ipcs):
        sub = frame[frame["ipc"] == ipc]
        for i, m in enumerate(methods):
            v = sub[sub["method"] == m]["accuracy"].to_numpy()
            ax.bar(i, v.mean(), color=colours[m], alpha=0.5, width=0.7)
            ax.errorbar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, color="k", capsize=3)
            ax.scatter(np.full(len(v), i), v, color="k", s=8, zorder=3)
        if reference and ipc in reference:
            ax.axhline(reference[ipc], color="grey", ls="--", lw=1, label="whole training set")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"IPC {ipc}", fontsize=9)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle("bars: mean over seeds; whiskers: sd; dots: seeds", fontsize=8)
    fig.tight_layout()
    return fig


def cost_figure(ratios: dict):
    """NCFM / DM cost ratios (``ratios``: label -> per-seed ratios), one dot per seed, against 1."""
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    for i, (label, v) in enumerate(ratios.items()):
        v = np.asarray(v, dtype=float)
        ax.bar(i, v.mean(), color="C0", alpha=0.5, width=0.6)
        ax.scatter(np.full(len(v), i), v, color="k", s=8, zorder=3)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(ratios)), list(ratios), fontsize=7)
    ax.set_ylabel("NCFM / DM")
    fig.tight_layout()
    return fig


def condense_explorer_figure(data: dict, ipc: int, seed: int, method: str):
    """The explorer's view: one stored synthetic set as a grid, titled with its test accuracy."""
    from ..data import from_uint8

    key = f"{method} ipc {ipc} seed {seed}"
    x = from_uint8(data["sets"][key])
    n_classes = data["n_classes"]
    rows = min(ipc, 10)
    order = [c * ipc + r for r in range(rows) for c in range(n_classes)]
    fig, ax = plt.subplots(figsize=(4.5, 0.4 * rows + 1.0))
    image_grid(x[order], nrow=n_classes, ax=ax,
               title=f"{method}, IPC {ipc}, seed {seed}: test accuracy {data['accuracy'][key]:.3f}")
    return fig


# ----------------------------------------------------------------------------------------------
# FedLGD (notebook 06's second part)
FEDLGD_COLOURS = {"FedLGD": "C2", "FedAvg": "C0", "FedProx": "C1"}


def fedlgd_rounds_figure(frame, methods: list[str]):
    """Test accuracy of the global model per round (``frame``: setting, method, seed, round, accuracy): one
    panel per setting, the mean over seeds as a line and the seeds' range as a band."""
    settings = list(dict.fromkeys(frame["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 2.8), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for m in methods:
            sub = frame[(frame["setting"] == setting) & (frame["method"] == m)]
            by = sub.groupby("round")["accuracy"]
            r = by.mean().index.to_numpy() + 1
            ax.plot(r, by.mean().to_numpy(), color=FEDLGD_COLOURS.get(m, "C7"), label=m, lw=1.5)
            ax.fill_between(r, by.min().to_numpy(), by.max().to_numpy(), color=FEDLGD_COLOURS.get(m, "C7"), alpha=0.15)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[0][0].set_ylabel("global model's test accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("lines: mean over seeds; bands: the seeds' range", fontsize=8)
    fig.tight_layout()
    return fig


def virtual_sets_figure(local: list, global_x, title: str = "", row_names: list[str] | None = None):
    """Each client's local virtual set (class-major images in [-1, 1]) on a row of its own, then the server's
    global virtual set on the last row."""
    rows = list(local) + [global_x]
    names = row_names or [f"client {k}" for k in range(len(local))] + ["global (server)"]
    width = max(len(x) for x in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(min(0.32 * width + 1.0, 9.0), 0.7 * len(rows) + 0.6),
                             squeeze=False)
    for ax, x, name in zip(axes[:, 0], rows, names):
        image_grid(x.float(), nrow=width, ax=ax)
        ax.set_title(name, fontsize=7, loc="left", pad=2)  # image_grid hides the axes, labels included
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def fedlgd_explorer_figure(data: dict, setting: str, seed: int, which: str):
    """The explorer's FedLGD view: one seed's local virtual sets (initial or refreshed) and the global set."""
    from ..data import from_uint8

    key = f"{setting} seed {seed}"
    local = [from_uint8(x) for x in data["fedlgd_sets"][key][which]]
    acc = data["fedlgd_accuracy"][key]
    title = f"{setting}, seed {seed}, {which} local sets; final accuracy " + ", ".join(f"{m} {a:.3f}" for m, a in acc.items())
    return virtual_sets_figure(local, from_uint8(data["fedlgd_sets"][key]["global"]), title=title)
