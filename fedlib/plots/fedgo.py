"""Notebook 01's figures (FedGO)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import method_colours


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
