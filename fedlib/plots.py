"""One figure style and one way to write figures (``savefig``), so every notebook looks the same
and every figure lands where the runner expects it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .utils import REPO_ROOT

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 130,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "legend.frameon": False,
    "image.cmap": "viridis",
    "svg.hashsalt": "fedlib",  # stable SVG ids so figures diff cleanly
}


def use_style() -> None:
    plt.rcParams.update(STYLE)


INTERACTIVE_FIGURES = REPO_ROOT / "results" / "interactive" / "figures"


def figures_dir() -> Path:
    """``$FEDLIB_FIGURES_DIR`` (the runner sets it to the run's folder), else
    ``results/interactive/figures/`` (ignored by git): running a notebook by hand, in JupyterLab say,
    never rewrites the tracked ``figures/``. Only ``python -m fedlib reproduce --update-notebooks``
    copies a run's figures there."""
    path = Path(os.environ.get("FEDLIB_FIGURES_DIR") or INTERACTIVE_FIGURES)
    path.mkdir(parents=True, exist_ok=True)
    return path


def savefig(fig, name: str, formats: tuple[str, ...] = ("png",)) -> Path:
    """Write ``fig`` as ``<figures_dir>/<name>.<fmt>``; returns the first path written."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"figure name {name!r} may only hold letters, digits, '_', '.', '-'")
    paths = []
    for fmt in formats:
        path = figures_dir() / f"{name}.{fmt}"
        fig.savefig(path, metadata={"Software": None} if fmt == "png" else None)
        paths.append(path)
    return paths[0]


def to_numpy_images(x) -> np.ndarray:
    """[N, C, H, W] tensor in [-1, 1] -> [N, H, W, C] float array in [0, 1]."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
    return np.transpose(x, (0, 2, 3, 1))


def image_grid(x, nrow: int = 8, ax=None, title: str | None = None, pad: int = 1):
    """Show a batch of images (tensor [N, C, H, W] in [-1, 1]) as one grid on ``ax``."""
    imgs = to_numpy_images(x)
    n, h, w, c = imgs.shape
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c))
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    if ax is None:
        _, ax = plt.subplots(figsize=(ncol * 0.5 + 0.5, nrows * 0.5 + 0.5))
    ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap="gray_r" if c == 1 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


# ---------------------------------------------------------------------------------------------
# notebook 00: partitions


def label_tv(counts) -> float:
    """Mean over clients of the total-variation distance between a client's label mix and the global
    one, from label counts [K, C] (0: IID; 1: clients with disjoint classes)."""
    counts = np.asarray(counts, dtype=float)
    local = counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)
    glob = counts.sum(0) / counts.sum()
    return float(0.5 * np.abs(local - glob).sum(1).mean())


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


# ---------------------------------------------------------------------------------------------
# notebook 04 (DMD2)


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

    from .data import GaussianMixture2D

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
        image_grid(torch.as_tensor(grid).float() / 127.5 - 1.0, nrow=8, ax=axes[2], title=f"{model} (digits)")
    else:
        axes[2].set_axis_off()
        axes[2].set_title(f"{model}: not run on digits", fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# notebook 02: FedDM


def to_uint8(x):
    """Images in [-1, 1] (tensor [..., C, H, W]) -> uint8 0..255: the compact form explorers store."""
    import torch

    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x):
    """Inverse of :func:`to_uint8` (up to its rounding): uint8 -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


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


# ---------------------------------------------------------------------------------------------
# 03_ld3_learned_timesteps


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
        image_grid(x.float() / 127.5 - 1.0, nrow=int(np.ceil(np.sqrt(len(x)))), ax=a)
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


# ---------------------------------------------------------------------------------------------
# notebook 01 (FedGO)


def method_colours(methods) -> dict:
    """One colour per method, the same in every figure and distinct for up to 20 methods (the registry
    has more than matplotlib's 10 default colours): registered methods take their registry position in
    tab20, others follow."""
    from .methods import methods as registered

    known = list(registered())
    order = known + [m for m in methods if m not in known]
    cmap = plt.get_cmap("tab20")
    return {m: cmap(order.index(m) % 20) for m in methods}


def _band(ax, x, values, label=None, color=None, lw=1.2, **kw):
    """Seed mean of ``values`` [seeds, len(x)] as a line, +-1 std as a band."""
    values = np.asarray(values, dtype=float)
    mean, sd = values.mean(0), values.std(0)
    line, = ax.plot(x, mean, label=label, color=color, lw=lw, **kw)
    ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15, lw=0)
    return line


def toy_weights_figure(toy, title: str = ""):
    """Top row: the weight of client 0 under each rule on the toy grid (its data in white); bottom row:
    the server model distilled from each rule's pseudo-labels (first seed of a ``ToyStudy``)."""
    rules = toy.rules
    fig, axes = plt.subplots(2, len(rules), figsize=(2.3 * len(rules), 4.8), sharex=True, sharey=True)
    gs, ext = toy.grid_size, toy.grid_extent
    own = toy.x[np.asarray(toy.parts[0])]
    for j, rule in enumerate(rules):
        axes[0, j].imshow(toy.weights_grid[rule][0].reshape(gs, gs), origin="lower", extent=ext, vmin=0, vmax=1)
        axes[0, j].scatter(own[:, 0], own[:, 1], s=1, c="w", alpha=0.3)
        axes[0, j].set_title(f"{rule}\nTV to oracle {toy.weight_tv_to_oracle[rule][0]:.2f}")
        axes[1, j].imshow(toy.grid_prediction[rule].reshape(gs, gs), origin="lower", extent=ext, cmap="tab10",
                          vmin=0, vmax=9, alpha=0.6)
        axes[1, j].scatter(toy.server_x[:, 0], toy.server_x[:, 1], c=toy.server_y, cmap="tab10", vmin=0, vmax=9, s=1)
        axes[1, j].set_title(f"server acc {toy.server_test_accuracy[rule][0]:.3f}")
        for ax in axes[:, j]:
            ax.grid(False)
    axes[0, 0].set_ylabel("weight of client 0")
    axes[1, 0].set_ylabel("distilled server model")
    fig.suptitle(title, y=1.02)
    return fig


def accuracy_rounds_figure(frame, central: float | None = None, value: str = "accuracy", highlight: str = "fedgo"):
    """Server test accuracy (or ``value``) per round: one panel per (scenario, client count, alpha),
    one line per method (seed mean, +-1 std band), from the long-format frame of
    :func:`fedlib.studies.rounds_frame`."""
    panels = frame[["scenario", "clients", "alpha"]].drop_duplicates().values.tolist()
    scen = list(dict.fromkeys(p[0] for p in panels))
    cols = max(sum(p[0] == s for p in panels) for s in scen)
    fig, axes = plt.subplots(len(scen), cols, figsize=(3.0 * cols, 2.7 * len(scen)), squeeze=False, sharey=True,
                             constrained_layout=True)
    colour = method_colours(dict.fromkeys(frame["method"]))
    for r, s in enumerate(scen):
        mine = [p for p in panels if p[0] == s]
        for c, (_, K, a) in enumerate(mine):
            ax = axes[r, c]
            f = frame[(frame.scenario == s) & (frame.clients == K) & (frame.alpha == a)]
            for m in dict.fromkeys(f["method"]):
                cube = f[f.method == m].pivot_table(index="seed", columns="round", values=value)
                _band(ax, cube.columns, cube.values, m, colour[m], lw=2.4 if m == highlight else 1.0)
            if central is not None and value == "accuracy":
                ax.axhline(central, color="k", ls=":", lw=1, label="central")
            ax.set_title(f"{s}, K={K}, α={a}", fontsize=8)
            ax.set_xlabel("round")
        for c in range(len(mine), cols):
            axes[r, c].set_axis_off()
        axes[r, 0].set_ylabel(value.replace("_", " "))
        axes[r, len(mine) - 1].legend(fontsize=6, loc="lower right")
    return fig


def oneshot_figure(frame, value: str = "accuracy"):
    """One-shot results: per (K, alpha) panel, each method's ``value`` after its single round as a bar
    (seed mean, +-1 sd) with the seeds as dots (seaborn). ``frame``: :func:`fedlib.studies.rounds_frame`."""
    import seaborn as sns

    panels = list(frame.groupby(["clients", "alpha"], sort=False).groups)  # keeps K an integer
    colour = method_colours(dict.fromkeys(frame["method"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 2.8), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, (K, a) in zip(axes[0], panels):
        f = frame[(frame.clients == K) & (frame.alpha == a) & (frame["round"] == frame["round"].max())]
        sns.barplot(data=f, x="method", y=value, hue="method", palette=colour, errorbar="sd", ax=ax, legend=False)
        sns.stripplot(data=f, x="method", y=value, color="k", size=3, ax=ax)
        ax.set_title(f"one round, K={K}, α={a}", fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.set_xlabel("")
    axes[0, 0].set_ylabel(f"server model test {value}")
    return fig


def teacher_student_figure(frame, scenario: str = "pre", baselines=("fedavg", "fedprox")):
    """Each distilling method's teacher accuracy on the server data (x) against its server model's test
    accuracy (y) at the last round, one point per (K, alpha, seed); dashed: the seed-mean accuracy of the
    aggregation-only baselines. Points on the diagonal: the server model is as good as its teacher."""
    f = frame[(frame.scenario == scenario) & (frame["round"] == frame["round"].max())]
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    colour = method_colours(dict.fromkeys(f["method"]))
    for m in colour:
        g = f[f.method == m]
        if g["teacher_accuracy"].notna().any():
            ax.scatter(g["teacher_accuracy"], g["accuracy"], s=14, label=m, color=colour[m])
        elif m in baselines:
            ax.axhline(g["accuracy"].mean(), color=colour[m], ls="--", lw=1, label=f"{m} (no teacher)")
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls=":")
    ax.set(xlabel="teacher accuracy on the server data (last round)", ylabel="server model test accuracy",
           xlim=(0, 1.02), ylim=(0, 1.02), title=f"{scenario}: a better teacher, a better server model?")
    ax.legend(fontsize=6, loc="lower right")
    return fig


def gap_sweep_figure(frame, x: str, gap: str = "gap", group: str | None = None, paper: float | None = None,
                     paper_label: str = "paper", xlabel: str | None = None, log_x: bool = False, title: str = ""):
    """A claim's measured gap against a budget: ``frame`` has one row per (budget ``x``, seed[, group]),
    the gap in column ``gap``; seed mean with a +-1 std band per ``group``; the paper's value drawn in."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    groups = [None] if group is None else list(dict.fromkeys(frame[group]))
    for i, gv in enumerate(groups):
        f = frame if gv is None else frame[frame[group] == gv]
        cube = f.pivot_table(index="seed", columns=x, values=gap)
        _band(ax, cube.columns.astype(float), cube.values, None if gv is None else f"{group} {gv}", f"C{i}", marker="o",
              ms=3)
    ax.axhline(0, color="k", lw=0.8)
    if np.allclose(frame[x].astype(float) % 1, 0):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    if paper is not None:
        ax.axhline(paper, color="C3", ls="--", lw=1.2, label=paper_label)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel or x, ylabel=gap.replace("_", " "), title=title)
    ax.legend(fontsize=7)
    return fig


def overhead_figure(curves: dict, threshold: float = 5.0, marks: dict | None = None):
    """FedGO's one-off overhead (% of bytes, % of client FLOPs) against the number of rounds, one line
    per model size (``curves``: label -> DataFrame with columns rounds, bytes_pct, flops_pct); the
    'negligible' threshold and marked points (``marks``: label -> (rounds, bytes_pct, flops_pct))."""
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.1), sharey=True, constrained_layout=True)
    for i, (label, c) in enumerate(curves.items()):
        for ax, col in zip(axes, ("bytes_pct", "flops_pct")):
            ax.plot(c["rounds"], c[col], color=f"C{i}", label=label)
    for j, (label, (r, b, f)) in enumerate((marks or {}).items()):
        for ax, v in zip(axes, (b, f)):
            ax.plot([r], [v], marker="*", ms=10, ls="", color=f"C{j + len(curves)}", label=label)
    for ax, what in zip(axes, ("communication", "client compute")):
        ax.axhline(threshold, color="k", ls=":", lw=1, label=f"{threshold:g} % ('negligible')")
        ax.set(xscale="log", yscale="log", xlabel="rounds", title=f"FedGO's extra {what}")
    axes[0].set_ylabel("overhead, % of the whole run")
    axes[1].legend(fontsize=6)
    return fig


def fedgo_search_figure(table, x: str, values: dict, chosen=None, by=("clients", "alpha")):
    """A hyper-parameter search: one panel per validation quantity (``values``: column -> label), one
    line per ``by`` group, the chosen value marked."""
    fig, axes = plt.subplots(1, len(values), figsize=(3.3 * len(values), 2.8), squeeze=False, constrained_layout=True)
    for ax, (col, label) in zip(axes[0], values.items()):
        for key, g in table.groupby(list(by)):
            ax.plot(g[x], g[col], marker="o", ms=3, label=", ".join(f"{b}={v}" for b, v in zip(by, key)))
        if chosen is not None:
            ax.axvline(chosen, color="k", ls=":", lw=1)
        ax.set(xscale="log", xlabel=x, title=label)
        ticks = sorted(set(table[x]))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    axes[0, -1].legend(fontsize=6)
    return fig


# ---------------------------------------------------------------------------------------------
# notebook 05: the pipeline

def _uint8_images(x):
    import torch

    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


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
