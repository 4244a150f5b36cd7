"""DMD2's times, losses and update rule: the noise times each loss draws, the distribution-matching,
fake-score, regression and GAN losses, the two time-scale update rule, the generator's inputs (backward
simulation) and sampling (docs/methods.md section 5; the symbols are the package's, :mod:`fedlib.dmd2`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.denoiser import Denoiser, diffusion_loss
from ..diffusion.process import EDM, Process, _bcast
from ..diffusion.samplers import check_grid
from ..diffusion.schedules import karras_sigmas
from ..utils import check_choice

DM_RANGE = (0.02, 0.98)  # the middle of the noise range the generator loss draws t from (DMD2 sec. 4)
FULL_RANGE = (0.0, 1.0)  # the fake score's denoising loss and the GAN term: the whole noise range
PAPER_SAMPLE_DIM = 3 * 64 * 64  # elements of one ImageNet-64 sample: the scale the paper's GAN weights were set at


# ---------------------------------------------------------------------------------------------
# Times


def t_from_noise_fraction(process: Process, u: torch.Tensor) -> torch.Tensor:
    """Map a noise fraction ``u`` in [0, 1] (0: the least noise, t_min; 1: the most, t_max) to the
    process's time. VP: linear in t (the DDPM step index / N); EDM: Karras' rho = 7 interpolation
    between sigma_min and sigma_max, the grid DMD2 discretises EDM teachers on."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if isinstance(process, EDM):
        return karras_sigmas(1 - u, process.t_min, process.t_max)
    if getattr(process, "discrete", False):  # land on the DDPM grid t = (n+1)/N, n = 0..N-1
        n = process.n_steps
        return torch.clamp(torch.round(u * n), 1, n) / n
    return process.t_min + u * (process.t_max - process.t_min)


def _check_range(name: str, rng: tuple[float, float]):
    lo, hi = rng
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{name}={tuple(rng)!r} must satisfy 0 <= lo < hi <= 1 (fractions of the noise range)")


def sample_dm_times(process: Process, n: int, dm_range: tuple[float, float] = DM_RANGE,
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[n] times uniform in noise fraction over ``dm_range``: the distribution-matching loss's middle
    2%..98% by default (the extremes carry no useful score difference); ``FULL_RANGE`` for the fake
    score and the GAN term."""
    _check_range("dm_range", dm_range)
    lo, hi = dm_range
    u = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return t_from_noise_fraction(process, u).float().to(device)


def student_times(process: Process, n_steps: int) -> torch.Tensor:
    """The fixed, decreasing input times of an ``n_steps`` generator: noise fractions
    1, (n-1)/n, ..., 1/n (DMD2's 4-step ImageNet student uses DDPM steps 999, 749, 499, 249)."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be >= 1 (1 = the one-step generator)")
    u = torch.arange(n_steps, 0, -1, dtype=torch.float64) / n_steps
    return t_from_noise_fraction(process, u).float()


# ---------------------------------------------------------------------------------------------
# Losses


def dm_direction(x: torch.Tensor, x_real: torch.Tensor, x_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, w): DMD's update direction g = (x_fake - x_real) / w with the per-sample normaliser
    w = mean over the sample's own elements of |x - x_real| (not over the batch)."""
    w = (x - x_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (x_fake - x_real) / _bcast(w, x), w


def _per_sample_dm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """0.5 mean_i (x_i - sg(x_i - g_i))^2 per sample: its gradient is g / d."""
    return 0.5 * ((x - (x - g).detach()) ** 2).flatten(1).mean(1)


def distribution_matching_loss(x: torch.Tensor, teacher: Denoiser, fake_score: Denoiser, t: torch.Tensor,
                               eps: torch.Tensor, reduction: str = "mean", return_direction: bool = False):
    """DMD's generator loss on generator samples ``x`` (with grad) at times ``t`` [B] and noise ``eps``.

    ``reduction="sum"``: 0.5 ||x - sg(x - g)||^2 summed, so d loss / d x = g exactly;
    ``"mean"`` (default, the paper's reduction): the same averaged over every element, so
    d loss / d x = g / x.numel(); ``"none"``: one value per sample (averaged over its elements).
    With ``return_direction`` also returns (g, w).
    """
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    with torch.no_grad():
        x_t = teacher.process.add_noise(x.detach(), eps, t)
        g, w = dm_direction(x.detach(), teacher(x_t, t), fake_score(x_t, t))
    per_sample = _per_sample_dm(x, g)
    loss = {"mean": per_sample.mean(), "sum": per_sample.sum() * x[0].numel(), "none": per_sample}[reduction]
    return (loss, g, w) if return_direction else loss


def fake_score_loss(fake_score: Denoiser, x_fake: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """The fake score's ordinary denoising loss on *detached* generator samples: it tracks the
    generator, never pushes it. Draw ``t`` over the whole noise range (:func:`sample_dm_times` with
    ``FULL_RANGE``)."""
    return diffusion_loss(fake_score, x_fake.detach(), eps, t, reduction=reduction)


def regression_loss(x: torch.Tensor, x_ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """DMD1's regression term: G(x_T) against the teacher's ODE sample from the same x_T (DMD1 used
    LPIPS on images; we use the squared error), averaged over elements like the DM loss so that its
    weight means the same at any sample size."""
    per_sample = ((x - x_ref) ** 2).flatten(1).mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample


def gan_weight_scale(sample_dim: int, reference_dim: int = PAPER_SAMPLE_DIM, role: str = "generator") -> float:
    """Factor on the paper's GAN weight of ``role`` ("generator" or "critic") at ``sample_dim`` elements
    per sample, so that each GAN term keeps the paper's weight relative to the loss it is added to.

    Which loss is a mean over what (the paper's code and here alike):

    - generator: the DM loss 0.5 mean_{B x d}(x - sg(x - g))^2 is a mean over B x d elements, so its
      gradient reaches each element of x as g / (B d), with g of order 1 per element (DMD's normaliser);
      the GAN loss softplus(-D(x_t)) is a mean over the B samples alone, and its push on x does not carry
      the 1/d. At the paper's d = ``reference_dim`` (3 x 64 x 64) the weight 3e-3 balanced the two pushes;
      at our d the DM push per element is reference_dim / d times larger, so the GAN weight is multiplied
      by reference_dim / d to keep the paper's balance;
    - critic: both losses train the same parameters (the fake score's trunk, the head) and both are means,
      the fake-score denoising loss over B x d elements of squared error, the critic loss over B samples.
      The gradient of a mean does not shrink with d (every element pushes the same parameters), so the
      paper's ratio 1e-2 carries over unchanged: factor 1 at any d. (Scaling it like the generator's made
      the critic 192x (8x8 digits) and 6144x (2-D) too strong against the fake-score loss.)

    ``reference_dim`` 0 turns the scaling off (factor 1).
    """
    check_choice("GAN weight role", role, ("generator", "critic"))
    if sample_dim < 1:
        raise ValueError(f"sample_dim={sample_dim} must be >= 1")
    if role == "critic" or not reference_dim:
        return 1.0
    return reference_dim / sample_dim


def warmup_factor(update: int, warmup_steps: int) -> float:
    """Learning-rate factor of generator update ``update`` (0-based) under a linear warm-up over
    ``warmup_steps`` generator updates: min(1, (update + 1) / warmup_steps); 1 throughout when
    ``warmup_steps`` is 0. The fake-score updates of round ``update`` (the ``ttur_ratio`` updates
    before generator update ``update``) use the same factor, so both networks warm up together, as in
    the authors' code (one constant-with-warm-up schedule per optimiser, both stepped every iteration).
    The +1 makes the first update move (the authors' schedule starts at lr 0: one wasted update)."""
    if warmup_steps < 0 or int(warmup_steps) != warmup_steps:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 0 (0: no warm-up)")
    return 1.0 if warmup_steps == 0 else min(1.0, (update + 1) / warmup_steps)


class GANHead(nn.Module):
    """Real-vs-fake logit from the fake score's bottleneck features: ``kind="conv"`` for [B, C, h, w]
    (U-Net), ``"mlp"`` for [B, C] (MLP)."""

    def __init__(self, feature_channels: int, hidden: int = 64, kind: str = "conv"):
        super().__init__()
        check_choice("GAN head kind", kind, ("conv", "mlp"))
        self.kind = kind
        if kind == "conv":
            self.body = nn.Sequential(nn.GroupNorm(1, feature_channels), nn.SiLU(),
                                      nn.Conv2d(feature_channels, hidden, 3, padding=1), nn.SiLU())
        else:
            self.body = nn.Sequential(nn.SiLU(), nn.Linear(feature_channels, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.body(features)
        return self.out(h.mean((2, 3)) if h.ndim == 4 else h).squeeze(-1)


def _gan_logits(head: GANHead, fake_score: Denoiser, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    x_t = fake_score.process.add_noise(x, eps, t)
    _, feats = fake_score.features(x_t, t)
    return head(feats)


def gan_critic_loss(head: GANHead, fake_score: Denoiser, x_real: torch.Tensor, x_fake: torch.Tensor,
                    t_real: torch.Tensor, t_fake: torch.Tensor, eps_real: torch.Tensor,
                    eps_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic critic loss softplus(-D(real_t)) + softplus(D(fake_t)) on noised inputs;
    trains the head and the fake score's trunk (the generator's samples are detached)."""
    real = _gan_logits(head, fake_score, x_real, t_real, eps_real)
    fake = _gan_logits(head, fake_score, x_fake.detach(), t_fake, eps_fake)
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def gan_generator_loss(head: GANHead, fake_score: Denoiser, x_fake: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(fake_t)); gradients flow into x_fake only (the
    caller steps the generator's optimiser alone)."""
    return F.softplus(-_gan_logits(head, fake_score, x_fake, t, eps)).mean()


# ---------------------------------------------------------------------------------------------
# Update rule, generator inputs, sampling


def ttur_schedule(n_generator_updates: int, ratio: int = 5) -> list[str]:
    """The two time-scale update rule as a flat list of updates: ``ratio`` x "fake" then one
    "generator", repeated. ``ratio=1`` alternates (DMD1's rhythm). :func:`train_dmd2` iterates it."""
    if ratio < 1 or int(ratio) != ratio:
        raise ValueError(f"ttur_ratio={ratio!r} must be a positive integer (fake-score updates per generator update)")
    return (["fake"] * int(ratio) + ["generator"]) * int(n_generator_updates)


def _noise_like(x: torch.Tensor, noise_generator=None, noise=None) -> torch.Tensor:
    if noise is not None:
        return noise().to(x.device, x.dtype)
    return torch.randn(x.shape, generator=noise_generator).to(x.device, x.dtype)


def _step_input(process: Process, x0: torch.Tensor, t_next: torch.Tensor, noise_generator=None, noise=None):
    t_next = torch.as_tensor(t_next, device=x0.device)
    t_next = t_next.expand(x0.shape[0]) if t_next.ndim == 0 else t_next
    return process.add_noise(x0, _noise_like(x0, noise_generator, noise), t_next)


def sample_student(generator: Denoiser, x_T: torch.Tensor, times: torch.Tensor, noise_generator=None):
    """Run the few-step generator: x0 = G(x_{t_i}, t_i), re-noised with fresh noise to t_{i+1}.
    Same signature as the diffusion samplers: returns (x0, nfe) with nfe = len(times)."""
    times = check_grid(times, device=x_T.device, min_points=1)[0]  # a NaN or negative t gives NaN samples
    x = x_T
    for i in range(len(times)):
        x0 = generator(x, times[i].expand(x.shape[0]))
        if i + 1 < len(times):
            x = _step_input(generator.process, x0, times[i + 1], noise_generator)
    return x0, len(times)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def _per_sample_k(k, n: int, device) -> torch.Tensor:
    k = torch.as_tensor(k, dtype=torch.long, device=device)
    return k.expand(n) if k.ndim == 0 else k


@torch.no_grad()
def backward_simulation(generator: Denoiser, times: torch.Tensor, k, x_T: torch.Tensor,
                        noise_generator=None, noise=None) -> torch.Tensor:
    """The generator's own input at step ``k`` (an int, or one step per sample): run it from pure
    noise for k steps without gradient and re-noise each result to t_k (k = 0 returns x_T). Training
    then sees what inference sees. ``noise()`` (optional) returns the fresh noise of one re-noising."""
    times = torch.as_tensor(times, device=x_T.device)
    k = _per_sample_k(k, x_T.shape[0], x_T.device)
    x = x_T
    for i in range(int(k.max()) if len(k) else 0):
        x0 = generator(x, times[i].expand(x.shape[0]))
        x_next = _step_input(generator.process, x0, times[i + 1], noise_generator, noise)
        x = torch.where(_rows(k > i, x), x_next, x)
    return x


def generator_input(generator: Denoiser, times: torch.Tensor, k, x_T: torch.Tensor, x_real: torch.Tensor,
                    backward: bool = True, noise_generator=None, noise=None) -> torch.Tensor:
    """Input of step ``k`` (an int or one per sample) during training: pure noise at k = 0; for k > 0
    either backward simulation (``backward=True``) or, as without it, real data noised to t_k (the
    train/inference mismatch)."""
    times = torch.as_tensor(times, device=x_T.device)
    k = _per_sample_k(k, x_T.shape[0], x_T.device)
    if not bool((k > 0).any()):
        return x_T
    if backward:
        return backward_simulation(generator, times, k, x_T, noise_generator, noise)
    noised = _step_input(generator.process, x_real, times[k], noise_generator, noise)
    return torch.where(_rows(k > 0, x_T), noised, x_T)


@torch.no_grad()
def generate(generator: Denoiser, times: torch.Tensor, n: int, shape=None, seed: int = 0, device=None,
             batch_size: int = 2048) -> torch.Tensor:
    """``n`` student samples from seeded prior noise, in batches. ``shape`` defaults to the shape the
    generator was trained on (stored as ``generator.sample_shape``)."""
    shape = tuple(shape or generator.sample_shape)
    g = torch.Generator().manual_seed(seed)
    device = device or next(generator.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x_T = generator.process.prior((b, *shape), generator=g, device=device)
        out.append(sample_student(generator, x_T, times, noise_generator=g)[0])
    return torch.cat(out)


class SamplerGenerator(nn.Module):
    """A diffusion model and its sampling grid as a plain generator ``z -> x`` (``z_dim`` Gaussian inputs,
    the prior noise x_T = sigma_T z): what a protocol that only knows generators (FedGO's server G,
    :mod:`fedlib.fedgo`) can sample from. ``solver`` None runs a DMD2 student (:func:`sample_student` on
    ``times``); a sampler name runs the teacher's ODE on ``times`` (e.g. an LD3 grid, with its
    ``network_times``). Samples are clamped to [-1, 1] (the data range). ``vmappable`` is False: the
    solvers branch on values, so callers run it outside ``torch.func.vmap``."""

    vmappable = False

    def __init__(self, denoiser: Denoiser, times, shape, solver: str | None = None, network_times=None):
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("times", torch.as_tensor(times, dtype=torch.float64).clone())
        self.register_buffer("network_times", None if network_times is None else
                             torch.as_tensor(network_times, dtype=torch.float64).clone())
        self.shape, self.solver = tuple(shape), solver
        self.z_dim = math.prod(self.shape)
        self.nfe = len(self.times) if solver is None else None  # set by the first call for an ODE solver

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from ..diffusion.samplers import solve

        process = self.denoiser.process
        sigma_T = float(process.sigma(torch.tensor(process.t_max, dtype=torch.float64)))
        x_T = sigma_T * z.reshape(-1, *self.shape)
        if self.solver is None:
            x, nfe = sample_student(self.denoiser, x_T, self.times)
        else:
            x, nfe = solve(self.denoiser, x_T, self.times, self.solver, self.network_times)
        self.nfe = nfe
        return x.clamp(-1, 1)
