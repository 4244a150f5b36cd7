"""Learned proximal networks (LPN; Fang, Buchanan & Sulam, ICLR 2024; docs/methods.md §8).

An LPN is f = ∇ψ for an input-convex network ψ (ICNN) with a small strongly convex term α/2 ||y||²:
ψ convex makes f the gradient of a convex function, which is exactly what a proximal operator is
(Moreau), so f = prox_R for the regulariser

    R(x) = ψ*(x) - 1/2 ||x||²,   evaluated at x = f(y) as   R(f(y)) = <y, f(y)> - ψ(y) - 1/2 ||f(y)||².

(ψ* is the Fenchel conjugate; the supremum in ψ*(x) = sup_y <x, y> - ψ(y) is attained where ∇ψ(y) = x,
so evaluating R at an arbitrary x needs y = f⁻¹(x): :func:`invert` minimises ψ(y) - <x, y>, which is
α-strongly convex, so the answer is unique.) R may be nonconvex: only R + 1/2||.||² is convex.

Trained with **proximal matching**, ℓ_PM = 1 - exp(-||f(y) - x||² / (d γ²)) with γ annealed down, f
approaches the MAP estimate of x from y = x + σ v, i.e. prox of -σ² log p, so R / σ² recovers -log p up
to a constant; trained with the mean squared error it approaches E[x | y] (the MMSE denoiser), the prox of
a smoother regulariser. A plug-and-play (PnP) solver uses f in place of a prox: with an LPN it is a real
proximal gradient method on 1/2||Ax - b||² / η + R; with a plain denoiser it has no such guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import check_choice, check_number

LOSSES = ("pm", "mse")  # proximal matching (the paper's), mean squared error (the plain denoiser's)


@dataclass
class LPNConfig:
    """Settings of one LPN / denoiser training run (notebook 07's parameter names; the paper's values in
    comments where they exist)."""

    hidden: int = 32  # width of each hidden layer (channels for images)
    layers: int = 3  # hidden layers of ψ
    alpha: float = 1e-3  # weight of the strongly convex term α/2 ||y||² (paper: small, so f is invertible)
    sigma: float = 1.0  # noise level σ of the training pairs y = x + σ v
    steps: int = 500  # optimiser steps (paper: tens of thousands)
    batch: int = 256  # training pairs per step
    lr: float = 1e-3  # Adam learning rate
    loss: str = "pm"  # "pm": proximal matching; "mse": the plain MSE objective
    warmup: float = 0.3  # fraction of the steps trained with MSE before proximal matching (paper: an L1 / L2 warm start)
    gamma_start: float = 1.0  # γ of ℓ_PM at the end of the warm start, per coordinate in units of σ (ours)
    gamma_end: float = 0.1  # γ at the last step, annealed geometrically (paper: γ decreased in stages)
    seed: int = 0
    beta: float = 4.0  # sharpness of the image ICNN's softplus, softplus(β t) / β (ours; chosen on validation)

    def __post_init__(self):
        check_number("hidden", self.hidden, at_least=1, integer=True, fix="Give the hidden width, e.g. 32.")
        check_number("layers", self.layers, at_least=1, integer=True, fix="Give the number of hidden layers, e.g. 3.")
        check_number("alpha", self.alpha, above=0, at_most=10,
                      fix="alpha > 0 makes psi strongly convex (f invertible); the paper keeps it small, e.g. 1e-3.")
        check_number("sigma", self.sigma, above=0, fix="Give the training noise level, e.g. 0.1 on images.")
        check_number("steps", self.steps, at_least=1, integer=True, fix="Give the number of optimiser steps.")
        check_number("batch", self.batch, at_least=1, integer=True, fix="Give the training pairs per step.")
        check_number("lr", self.lr, above=0, fix="Give Adam's learning rate, e.g. 1e-3.")
        check_choice("loss", self.loss, LOSSES, fix="'pm' is the paper's proximal matching; 'mse' the plain denoiser's.")
        check_number("warmup", self.warmup, at_least=0, at_most=1,
                     fix="Give the fraction of steps trained with MSE first, in [0, 1].")
        check_number("gamma_start", self.gamma_start, above=0, fix="Give the first gamma, e.g. 1.")
        check_number("gamma_end", self.gamma_end, above=0, at_most=self.gamma_start,
                     fix="gamma is annealed down: gamma_end must lie in (0, gamma_start].")
        check_number("seed", self.seed, at_least=0, integer=True, fix="Give a non-negative seed.")
        check_number("beta", self.beta, above=0, at_most=1000,
                     fix="Give the softplus sharpness of the image ICNN, e.g. 4 (1 is the plain softplus).")

    def gamma(self, step: int) -> float:
        """γ at ``step`` of the proximal-matching phase (geometric from gamma_start to gamma_end)."""
        start = int(self.warmup * self.steps)
        frac = (step - start) / max(1, self.steps - 1 - start)
        return self.gamma_start * (self.gamma_end / self.gamma_start) ** min(1.0, max(0.0, frac))


# ----------------------------------------------------------------------------------------------
# networks
class ICNN(nn.Module):
    """ψ(y) for vectors y [N, d]: z_1 = s(W_0 y + b_0), z_{k+1} = s(U_k⁺ z_k + W_k y + b_k), ψ = w⁺·z_L +
    α/2 ||y||², with s = softplus (convex, non-decreasing) and U⁺, w⁺ = softplus(·) ≥ 0: each layer is a
    non-decreasing convex function of convex functions, hence convex in y."""

    def __init__(self, dim: int, hidden: int = 32, layers: int = 3, alpha: float = 1e-3, beta: float = 1.0):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.W = nn.ModuleList([nn.Linear(dim, hidden) for _ in range(layers)])
        self.U = nn.ParameterList([nn.Parameter(torch.randn(hidden, hidden) / hidden - 2.0) for _ in range(layers - 1)])
        self.w = nn.Parameter(torch.randn(hidden) / hidden - 2.0)

    def forward(self, y):
        # s(t) = softplus(β t) / β: β > 1 sharpens the kinks a prox of a nonsmooth prior needs
        z = F.softplus(self.W[0](y), beta=self.beta)
        for U, W in zip(self.U, self.W[1:]):
            z = F.softplus(z @ F.softplus(U).T + W(y), beta=self.beta)
        return z @ F.softplus(self.w) + 0.5 * self.alpha * (y ** 2).sum(-1)


class ConvICNN(nn.Module):
    """ψ(y) for images y [N, C, H, W], the LPN paper's construction restated with 3x3 convolutions: the
    input y enters every layer, z_1 = s(W_0 y + b_0), z_{k+1} = s(H_k⁺ z_k + W_k y + b_k), with s(t) =
    softplus(β t) / β (convex, non-decreasing, smooth), H_k⁺ = softplus(θ_k) ≥ 0 and W_k free; ψ sums a
    non-negative 1x1 read-out a⁺ = softplus(θ_a) of z_L over the pixels, so it is convex in y. Added,
    all convex: a quadratic 1/2 ||K y||² (K a free 3x3 convolution to ``quad`` channels: its gradient
    KᵀK y is any symmetric positive semidefinite convolution, the linear (Wiener-like) part of a
    denoiser), a linear term <v, y> (v per channel: a constant offset of f) and α/2 ||y||².

    Initialisation (ours; it decides whether the network learns at our budget): θ near -4, so H⁺ and a⁺
    start near 0.02 and the network starts close to the quadratic alone, whose K is started at the
    identity kernel, so f starts at the identity (the prox of a flat regulariser). Larger starting
    weights made ψ's scale grow with depth and the first steps diverge; a softplus at β = 1 over
    pre-activations of order one is nearly linear, so f stayed nearly linear (both measured on the
    validation split, docs/methods.md §8)."""

    def __init__(self, channels: int, hidden: int = 16, layers: int = 2, alpha: float = 1e-3, beta: float = 4.0,
                 quad: int = 8):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.W = nn.ModuleList([nn.Conv2d(channels, hidden, 3, padding=1) for _ in range(layers)])
        self.H = nn.ParameterList([nn.Parameter(-4.0 + 0.1 * torch.randn(hidden, hidden, 3, 3))
                                   for _ in range(layers - 1)])
        self.a = nn.Parameter(-4.0 + 0.1 * torch.randn(hidden))
        K = 0.01 * torch.randn(quad, channels, 3, 3)
        K[0, :, 1, 1] += 1.0  # KᵀK ≈ identity: f starts at y
        self.K = nn.Parameter(K)
        self.v = nn.Parameter(torch.zeros(channels))

    def forward(self, y):
        z = F.softplus(self.W[0](y), beta=self.beta)
        for H, W in zip(self.H, self.W[1:]):
            z = F.softplus(F.conv2d(z, F.softplus(H), padding=1) + W(y), beta=self.beta)
        quad = 0.5 * (F.conv2d(y, self.K, padding=1) ** 2).flatten(1).sum(-1)
        return (torch.einsum("nchw,c->n", z, F.softplus(self.a)) + quad + torch.einsum("nchw,c->n", y, self.v)
                + 0.5 * self.alpha * (y ** 2).flatten(1).sum(-1))


class PlainDenoiser(nn.Module):
    """The unconstrained network of the same size (the same convolutions, no sign constraints), used as
    a generic residual denoiser: D(y) = y - ε(y). No gradient structure, so no prox guarantee."""

    def __init__(self, channels: int, hidden: int = 16, layers: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.Softplus(),
                                 *[m for _ in range(layers - 1) for m in (nn.Conv2d(hidden, hidden, 3, padding=1),
                                                                          nn.Softplus())],
                                 nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, y):
        return y - self.net(y)


def lpn(psi: nn.Module, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """f(y) = ∇ψ(y), the learned proximal network (``create_graph`` while training)."""
    with torch.enable_grad():
        y = y if y.requires_grad else y.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(psi(y).sum(), y, create_graph=create_graph)
    return g


def apply(model: nn.Module, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The denoiser a PnP solver calls: ∇ψ for an ICNN, the network itself otherwise."""
    if isinstance(model, (ICNN, ConvICNN)):
        return lpn(model, y, create_graph)
    return model(y)


# ----------------------------------------------------------------------------------------------
# the regulariser
def invert(psi: nn.Module, x: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """y with ∇ψ(y) = x, by L-BFGS on the strongly convex ψ(y) - <x, y> (summed over the batch: the rows
    are independent problems), at most ``iters`` iterations, started at y = x."""
    x = x.detach()
    y = x.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], lr=1, max_iter=iters, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = psi(y).sum() - (x * y).sum()
        obj.backward()
        return obj

    for p in psi.parameters():
        p.requires_grad_(False)
    try:
        opt.step(closure)
    finally:
        for p in psi.parameters():
            p.requires_grad_(True)
    return y.detach()


def regulariser_at_image(psi: nn.Module, y: torch.Tensor):
    """(x, R(x)) for x = f(y): R(f(y)) = <y, f(y)> - ψ(y) - 1/2||f(y)||², no inversion needed."""
    x = lpn(psi, y)
    with torch.no_grad():
        r = (y * x).flatten(1).sum(-1) - psi(y) - 0.5 * (x ** 2).flatten(1).sum(-1)
    return x, r


def regulariser(psi: nn.Module, x: torch.Tensor, iters: int = 200, tol: float = 1e-7):
    """R(x) at arbitrary points x (rows), through y = f⁻¹(x) (:func:`invert`)."""
    y = invert(psi, x, iters, tol)
    # ⟨x, y⟩ - ψ(y) is stationary in y at the solution, so an inexact y errs only to second order here,
    # where R(f(y)) at the inexact y's own image would err to first order
    with torch.no_grad():
        return (x * y).flatten(1).sum(-1) - psi(y) - 0.5 * (x ** 2).flatten(1).sum(-1)


# ----------------------------------------------------------------------------------------------
# training
def proximal_matching_loss(fx: torch.Tensor, x: torch.Tensor, gamma: float, sigma: float) -> torch.Tensor:
    """ℓ_PM = 1 - exp(-||f(y) - x||² / (d (γσ)²)), averaged over the batch: a smoothed 0-1 loss whose
    minimiser tends to the posterior's mode as γ → 0 (γ per coordinate, in units of σ: our scaling)."""
    d = x[0].numel()
    sq = ((fx - x) ** 2).flatten(1).sum(-1)
    return (1 - torch.exp(-sq / (d * (gamma * sigma) ** 2))).mean()


def train(model: nn.Module, sample, cfg: LPNConfig, progress=None) -> dict:
    """Train ``model`` (an ICNN, a ConvICNN or a PlainDenoiser) on pairs (x, x + σ v), x = ``sample(n,
    generator)``; MSE for the first ``warmup`` of the steps (all of them for loss "mse"), then proximal
    matching with γ annealed. Returns the loss history."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = int(cfg.warmup * cfg.steps) if cfg.loss == "pm" else cfg.steps
    # in the proximal-matching phase the learning rate decays linearly to zero: ℓ_PM's gradients shrink
    # with γ and Adam would otherwise blow their noise up to full-size steps (ours)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < start else 1 - (k - start) / max(1, cfg.steps - start))
    history = {"loss": [], "gamma": []}
    for step in range(cfg.steps):
        x = sample(cfg.batch, g)
        y = x + cfg.sigma * torch.randn(x.shape, generator=g).to(x.device)
        fx = apply(model, y, create_graph=True)
        if step < start:
            loss, gamma = ((fx - x) ** 2).flatten(1).sum(-1).mean(), float("nan")
        else:
            gamma = cfg.gamma(step)
            loss = proximal_matching_loss(fx, x, gamma, cfg.sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history["loss"].append(float(loss.detach()))
        history["gamma"].append(gamma)
        if progress is not None:
            progress.update(1)
    return history


def laplace_sampler(b: float = 1.0):
    """x ~ Laplace(0, b) in 1-D, as [n, 1]: -log p(x) = |x| / b + log 2b."""
    def sample(n, g):
        u = torch.rand(n, 1, generator=g) - 0.5
        return -b * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))
    return sample


def soft_threshold(y: torch.Tensor, t: float) -> torch.Tensor:
    """prox of t|x|: the exact MAP denoiser of a Laplacian prior (t = σ² / b)."""
    return torch.sign(y) * (y.abs() - t).clamp_min(0)


def prior_error(r: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute error between R and the target after removing the best constant (the median of the
    difference minimises it): regularisers are defined up to a constant."""
    diff = r - target
    return float((diff - diff.median()).abs().mean())


# ----------------------------------------------------------------------------------------------
# plug-and-play
def gaussian_blur_operator(width: float = 1.0, size: int = 5, channels: int = 1, device=None):
    """A(x): a normalised Gaussian blur (symmetric, so Aᵀ = A; ||A|| ≤ 1), zero padding."""
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-t ** 2 / (2 * width ** 2))
    k = torch.outer(k1, k1)
    k = (k / k.sum()).expand(channels, 1, size, size).contiguous().to(device)

    def A(x):
        return F.conv2d(x, k, padding=size // 2, groups=channels)
    return A


def pnp_pgd(model: nn.Module, A, b: torch.Tensor, eta: float = 1.0, iters: int = 50, x0: torch.Tensor | None = None,
            keep: tuple = ()):
    """PnP proximal gradient: x_{k+1} = D(x_k - η Aᵀ(A x_k - b)), D the denoiser (A symmetric). Returns
    (x, residuals [iters, N] = ||x_{k+1} - x_k|| per image, {k: x_k for k in keep})."""
    x = b.clone() if x0 is None else x0.clone()
    residuals, kept = [], {0: x.clone()} if 0 in keep else {}
    for k in range(1, iters + 1):
        z = x - eta * A(A(x) - b)
        x_new = apply(model, z).detach()
        residuals.append((x_new - x).flatten(1).norm(dim=1))
        x = x_new
        if k in keep:
            kept[k] = x.clone()
    return x, torch.stack(residuals), kept


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2), x clipped to that range."""
    mse = ((x.clamp(-1, 1) - ref) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(peak ** 2 / mse.clamp_min(1e-12))


def oscillation(residuals: torch.Tensor) -> torch.Tensor:
    """Per image: the fraction of iterations whose residual rose above the previous one (0 for a
    monotone decrease)."""
    return (residuals[1:] > residuals[:-1] * (1 + 1e-6)).float().mean(0)


# ----------------------------------------------------------------------------------------------
# the notebook's two studies
def laplace_study(cfg: LPNConfig, b: float = 1.0, beta: float = 10.0, grid_max: float = 2.0, n_grid: int = 81,
                  progress=None) -> dict:
    """Train a 1-D LPN (ICNN gradient) on a Laplace(0, b) prior with ``cfg`` and measure it on a grid of
    [-grid_max, grid_max]: R / σ² against -log p = |x| / b (its :func:`prior_error`), and f against the
    exact prox, the soft threshold at σ² / b (mean absolute difference over the same grid of y)."""
    torch.manual_seed(cfg.seed)
    psi = ICNN(1, cfg.hidden, cfg.layers, cfg.alpha, beta=beta)
    history = train(psi, laplace_sampler(b), cfg, progress)
    grid = torch.linspace(-grid_max, grid_max, n_grid)[:, None]
    r = regulariser(psi, grid) / cfg.sigma ** 2
    f = lpn(psi, grid).detach()
    target = grid[:, 0].abs() / b
    r_shifted = r - (r - target).median()  # drawn with the best constant removed
    return {"grid": grid[:, 0], "R": r_shifted, "f": f[:, 0], "neg_log_p": target,
            "prox": soft_threshold(grid, cfg.sigma ** 2 / b)[:, 0], "prior_error": prior_error(r, target),
            "prox_error": float((f - soft_threshold(grid, cfg.sigma ** 2 / b)).abs().mean()),
            "final_loss": history["loss"][-1]}


def train_denoisers(x_train: torch.Tensor, cfg: LPNConfig, plain_cfg: LPNConfig | None = None,
                    progress=None) -> dict:
    """The two denoisers of one seed on images ``x_train`` [N, C, H, W]: the LPN (a ConvICNN's gradient,
    trained with ``cfg``) and the plain network trained with MSE under ``plain_cfg`` (its own depth and
    learning rate, each chosen on validation; default: ``cfg``'s), on the same noise draws (the same
    seed) and the same number of steps."""
    def sample(n, g):
        return x_train[torch.randint(len(x_train), (n,), generator=g).to(x_train.device)]

    channels = x_train.shape[1]
    torch.manual_seed(cfg.seed)
    lpn_net = ConvICNN(channels, cfg.hidden, cfg.layers, cfg.alpha, cfg.beta).to(x_train.device)
    train(lpn_net, sample, cfg, progress)
    plain_cfg = replace(plain_cfg or cfg, loss="mse", seed=cfg.seed, steps=cfg.steps, sigma=cfg.sigma)
    torch.manual_seed(cfg.seed)
    plain = PlainDenoiser(channels, plain_cfg.hidden, plain_cfg.layers).to(x_train.device)
    train(plain, sample, plain_cfg, progress)
    return {"LPN": lpn_net, "plain": plain}


__all__ = ["soft_threshold", "laplace_study", "train_denoisers", "LOSSES", "LPNConfig", "ICNN", "ConvICNN", "PlainDenoiser", "lpn", "apply", "invert",
           "regulariser_at_image", "regulariser", "proximal_matching_loss", "train", "laplace_sampler",
           "prior_error", "gaussian_blur_operator", "pnp_pgd", "psnr", "oscillation"]
