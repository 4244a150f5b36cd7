"""Figures of notebook 07 (learned proximal networks: the learned prior, PnP residuals, restorations)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import image_grid

LOSS_COLOURS = {"proximal matching": "C0", "MSE": "C1"}
METHOD_COLOURS = {"LPN": "C0", "plain": "C3"}


def learned_prior_figure(studies: dict):
    """``studies``: label (training loss) -> list over seeds of :func:`fedlib.lpn.laplace_study` dicts.
    Left: the learned R / σ² (best constant removed) against -log p; right: f against the exact prox."""
    fig, (ax_r, ax_f) = plt.subplots(1, 2, figsize=(7.4, 3.0))
    first = next(iter(studies.values()))[0]
    x = np.asarray(first["grid"])
    ax_r.plot(x, np.asarray(first["neg_log_p"]), color="k", lw=2, label="-log p (true)")
    ax_f.plot(x, np.asarray(first["prox"]), color="k", lw=2, label="exact prox (soft threshold)")
    for label, runs in studies.items():
        for i, s in enumerate(runs):
            kw = {"color": LOSS_COLOURS.get(label, None), "alpha": 0.7, "lw": 1,
                  "label": label if i == 0 else None}
            ax_r.plot(x, np.asarray(s["R"]), **kw)
            ax_f.plot(x, np.asarray(s["f"]), **kw)
    ax_r.set(xlabel="x", ylabel="R(x) / σ² + const", title="learned regulariser (one line per seed)")
    ax_f.set(xlabel="y", ylabel="f(y)", title="learned proximal operator")
    for ax in (ax_r, ax_f):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def residual_figure(residuals: dict):
    """``residuals``: method -> list over seeds of per-iteration mean residuals ||x_{k+1} - x_k||."""
    fig, ax = plt.subplots(figsize=(4.4, 3.0))
    for m, runs in residuals.items():
        for i, r in enumerate(runs):
            r = np.asarray(r)
            ax.semilogy(np.arange(1, len(r) + 1), r, color=METHOD_COLOURS.get(m), alpha=0.8, lw=1,
                        label=m if i == 0 else None)
    ax.set(xlabel="PnP iteration k", ylabel="mean ||x_{k+1} - x_k||", title="PnP residuals (one line per seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def restored_figure(rows: dict, nrow: int = 8):
    """``rows``: label -> images [N, C, H, W] in [-1, 1] (clean, observed, each method's restoration)."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.5 * nrow + 0.4, 0.75 * len(rows) + 0.3), squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], rows.items()):
        image_grid(x[:nrow].float().clamp(-1, 1), nrow=nrow, ax=ax, title=label)
    fig.tight_layout()
    return fig


def lpn_explorer_figure(data: dict, method: str, seed: int, iteration: int):
    """The explorer's view: that method's iterate k on the stored test images, and the seed's residual
    curve with iteration k marked."""
    from ..data import from_uint8

    key = f"{method} seed {seed}"
    ks = data["iterations"]
    x = from_uint8(data["iterates"][key][ks.index(iteration)])
    fig, (ax_img, ax_res) = plt.subplots(1, 2, figsize=(7.6, 2.6), gridspec_kw={"width_ratios": [1.6, 1]})
    image_grid(x, nrow=len(x), ax=ax_img, title=f"{method}, seed {seed}, iterate {iteration} "
                                                 f"(PSNR {data['psnr'][key][ks.index(iteration)]:.2f} dB)")
    for m in data["methods"]:
        r = np.asarray(data["residuals"][f"{m} seed {seed}"])
        ax_res.semilogy(np.arange(1, len(r) + 1), r, color=METHOD_COLOURS.get(m), lw=2 if m == method else 1,
                        alpha=1 if m == method else 0.4, label=m)
    if iteration >= 1:
        r = data["residuals"][key]
        ax_res.scatter([iteration], [r[iteration - 1]], color="k", zorder=3)
    ax_res.set(xlabel="iteration", title="residuals")
    ax_res.legend(fontsize=7)
    fig.tight_layout()
    return fig
