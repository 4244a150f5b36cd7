"""One figure style and one way to write figures (``savefig``), so every notebook looks the same
and every figure lands where the runner expects it; the image grid and the method colours every
notebook shares."""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..utils import REPO_ROOT

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


def method_colours(methods) -> dict:
    """One colour per method, the same in every figure and distinct for up to 20 methods (the registry
    has more than matplotlib's 10 default colours): registered methods take their registry position in
    tab20, others follow."""
    from ..methods import methods as registered

    known = list(registered())
    order = known + [m for m in methods if m not in known]
    cmap = plt.get_cmap("tab20")
    return {m: cmap(order.index(m) % 20) for m in methods}
