"""Notebook 02's figures (FedDM)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..data import from_uint8
from .style import image_grid


def feddm_quality(mean, variants: list[str], partitions: list[str], floor: float, metric: str = "fd"):
    """Quality against rounds and against bytes (up + down), one pair of panels per federated
    partition: ``mean`` holds one row per (partition, variant, round) with ``metric``, ``bytes_up``,
    ``bytes_down`` (means over seeds); the central model is drawn on the rounds panels only, dashed; the
    grey line is real training images against the same reference (the floor)."""
    fig, axes = plt.subplots(1, 2 * len(partitions), figsize=(4.2 * 2 * len(partitions), 3.2), squeeze=False)
    axes = axes[0]
    for j, pname in enumerate(partitions):
        for variant in variants:
            sub = mean[(mean["variant"] == variant) & (mean["partition"].isin([pname, "union"]))]
            style = dict(ls="--" if variant == "central" else "-", marker="o", ms=3, label=variant)
            axes[2 * j].plot(sub["round"], sub[metric], **style)
            if variant != "central":
                axes[2 * j + 1].plot((sub["bytes_up"] + sub["bytes_down"]) / 2**20, sub[metric], **style)
        axes[2 * j].set(title=f"{pname}: quality vs rounds", xlabel="round", ylabel="classifier FD (not FID)")
        axes[2 * j + 1].set(title=f"{pname}: quality vs bytes", xlabel="MiB communicated (up + down)",
                            ylabel="classifier FD (not FID)")
        for ax in axes[2 * j: 2 * j + 2]:
            ax.axhline(floor, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    return fig


def _alpha_of(partition: str) -> float:
    return float(partition.split()[-1]) if partition.startswith("dirichlet") else float("inf")


def feddm_budget(bands, chosen: str | None = None, k_se: float = 2.0):
    """The budget sweep of the proximal term: ``bands`` (from :func:`fedlib.feddm.band` over
    :func:`fedlib.feddm.paired_gaps`: partition, series, round, mean, se, count). One panel per non-IID
    partition: the paired gap prox - vanilla (classifier FD; below 0 = prox helps) against rounds, one
    line per mu, the band mean +- ``k_se`` SE over seeds (the noise rule's width), and the non-IID penalty
    (vanilla non-IID - vanilla IID) dashed. Last panel: the same at the last round against alpha."""
    parts = sorted(bands["partition"].unique(), key=_alpha_of)
    series = list(dict.fromkeys(bands["series"]))
    colors = {s: plt.cm.viridis(i / max(1, len(series) - 1)) for i, s in enumerate(s for s in series if "mu" in s)}
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(3.4 * (len(parts) + 1), 3.1), squeeze=False, sharey=True)
    axes = axes[0]

    def draw(ax, x, sub, s):
        pen = "mu" not in s
        kw = dict(color="grey" if pen else colors[s], ls="--" if pen else "-", lw=2.2 if s == chosen else 1.2)
        ax.plot(x, sub["mean"], marker="o", ms=3, label=s + (" (chosen on validation)" if s == chosen else ""), **kw)
        ax.fill_between(x, sub["mean"] - k_se * sub["se"].fillna(0), sub["mean"] + k_se * sub["se"].fillna(0),
                        color=kw["color"], alpha=0.15, lw=0)

    for ax, p in zip(axes, parts):
        for s in series:
            sub = bands[(bands["partition"] == p) & (bands["series"] == s)].sort_values("round")
            if len(sub):
                draw(ax, sub["round"], sub, s)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=p, xlabel="round")
    axes[0].set_ylabel("paired FD gap (prox - vanilla)\nbelow 0: prox helps")
    last = bands[bands["round"] == bands["round"].max()]
    finite = [_alpha_of(p) for p in parts if np.isfinite(_alpha_of(p))]
    iid_x = 10 * max(finite) if finite else 1.0  # IID drawn right of the largest alpha
    for s in series:
        sub = last[last["series"] == s].copy()
        sub["alpha"] = [a if np.isfinite(a) else iid_x for a in sub["partition"].map(_alpha_of)]
        sub = sub.sort_values("alpha")
        if len(sub):
            draw(axes[-1], sub["alpha"], sub, s)
    axes[-1].axhline(0, color="black", lw=0.8)
    axes[-1].set(xscale="log", xlabel="Dirichlet alpha (smaller: more skewed; right: IID)",
                 title=f"round {bands['round'].max()}, against alpha")
    axes[-1].set_xticks(sorted(finite) + [iid_x], [f"{a:g}" for a in sorted(finite)] + ["IID"])
    axes[-1].minorticks_off()
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def feddm_view(store: dict, name: str, partition: str, round_: int):
    """The explorer's view of notebook 02 from its stored data: the sample grid of one (variant, partition,
    eval round) of the stored seed, and the quality-vs-bytes points of that partition (every variant and
    round, mean over seeds) with the chosen one marked. ``name`` is a variant's name ("quant 8-bit" for the
    quantised ones), as in ``store["variants"]``."""
    where = "union" if name == "central" else partition
    key = f"{name} | {where}"
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8.4, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    if key not in store["grids"]:
        ax0.text(0.5, 0.5, f"not stored: {key}", ha="center", va="center")
        ax0.set_axis_off()
    else:
        i = store["rounds"].index(round_)
        image_grid(from_uint8(store["grids"][key][i]), nrow=int(np.ceil(np.sqrt(len(store["grids"][key][i])))),
                   ax=ax0, title=f"{name} | {where}\nround {round_}, seed {store['seed']}")
    pts = [p for p in store["points"] if p["partition"] in (partition, "union")]
    for v in dict.fromkeys(p["variant"] for p in pts):
        if v == "central":
            continue
        vp = sorted((p for p in pts if p["variant"] == v), key=lambda p: p["round"])
        ax1.plot([p["mib"] for p in vp], [p["fd"] for p in vp], marker="o", ms=3, alpha=0.6, label=v)
    sel = [p for p in pts if p["variant"] == name and p["round"] == round_]
    for p in sel:
        ax1.errorbar(p["mib"], p["fd"], yerr=2 * p["fd_se"], color="red", marker="*", ms=12, capsize=3,
                     label=f"{name}, round {round_}: FD {p['fd']:.2f} at {p['mib']:.2f} MiB")
    ax1.axhline(store["floor"], color="grey", lw=0.8)
    ax1.set(title=f"{partition}: quality vs bytes (mean over seeds)", xlabel="MiB communicated (up + down)",
            ylabel="classifier FD (not FID)")
    ax1.legend(fontsize=6)
    fig.tight_layout()
    return fig
