"""DMD2: distribution matching distillation into a one- or few-step generator (docs/methods.md section 5).

Three denoisers share one architecture and one process (:class:`fedlib.diffusion.denoiser.Denoiser`,
``D(x_t, t) -> x0_hat``): the frozen **teacher** (the "real score"), the **generator** G (initialised from
the teacher; one step maps pure noise x_T at t_max to a sample) and the **fake score** (initialised from
the teacher; keeps learning the distribution of G's current samples). Symbols follow the paper:

- generator loss (:func:`distribution_matching_loss`, :func:`dm_direction`): x = G(z); t in the middle
  2%..98% of the noise range (:func:`sample_dm_times`); x_t = alpha_t x + sigma_t eps; ``x_real`` =
  teacher(x_t), ``x_fake`` = fake_score(x_t); per-sample normaliser w = mean|x - x_real|;
  g = (x_fake - x_real) / w; loss 0.5 ||x - stopgrad(x - g)||^2 averaged over the elements, whose gradient
  with respect to x is g / (B d);
- fake-score loss (:func:`fake_score_loss`): the ordinary denoising loss on *detached* G samples at times
  drawn uniformly in noise fraction over the **whole** noise range (``fake_range = (0, 1)``);
- two time-scale update rule (:func:`ttur_schedule`): ``ratio`` fake-score updates per generator update;
  :func:`train_dmd2` iterates exactly this list;
- GAN term (:class:`GANHead`, :func:`gan_critic_loss`, :func:`gan_generator_loss`): a small classifier on
  the fake score's bottleneck features tells noised real data from noised G samples, at times over the
  whole noise range; non-saturating logistic losses. The paper's weights (1e-2 critic, 3e-3 generator) were
  set against losses averaged over B x 12288 elements (ImageNet 64x64x3) for the denoising terms but over
  B for the GAN terms; :func:`gan_weight_scale` rescales the generator's by 12288 / d so that its push
  on x keeps the paper's ratio to the DM loss's g / (B d) at our sample size d (2 on 2-D, 64 on 8x8
  digits), and leaves the critic's as it is (it is added to the fake score's denoising loss, a mean
  like itself; the derivation is in :func:`gan_weight_scale`);
- multi-step generator over fixed times (:func:`student_times`, :func:`sample_student`) trained with
  backward simulation (:func:`generator_input`);
- DMD1's regression loss (:func:`regression_loss`), averaged over elements like the DM loss, on pairs
  (x_T, teacher ODE sample) for the one-step generator, as an ablation.

Training (:func:`train_dmd2`) = :func:`fake_score_losses` and :func:`generator_losses` (each returns its
losses, like EDM's ``EDMLoss.__call__``) driven by :func:`ttur_schedule`, AdamW, gradient clipping, a
:class:`Checkpointer` of the last good state and a divergence guard. :func:`train_dmd2_seeds` trains
several seeds at once: 2-D networks (all parameters in ``nn.Linear`` layers) are vectorised into one
network whose every layer holds one weight per seed (:func:`stack_members`), so S seeds cost about one
run with an S-times larger batch; other networks run one seed after the other.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion.denoiser import Denoiser, diffusion_loss, frozen
from .diffusion.process import EDM, Process, _bcast
from .diffusion.samplers import check_grid
from .diffusion.schedules import karras_sigmas
from .utils import atomic_torch_save, check_choice

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
        from .diffusion.samplers import solve

        process = self.denoiser.process
        sigma_T = float(process.sigma(torch.tensor(process.t_max, dtype=torch.float64)))
        x_T = sigma_T * z.reshape(-1, *self.shape)
        if self.solver is None:
            x, nfe = sample_student(self.denoiser, x_T, self.times)
        else:
            x, nfe = solve(self.denoiser, x_T, self.times, self.solver, self.network_times)
        self.nfe = nfe
        return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Several seeds in one network (2-D): one weight per seed in every linear layer


class StackedLinear(nn.Module):
    """S linear layers applied to S member-major blocks of the batch: x [S*B, in] -> [S*B, out]
    with member s's rows through layer s (one batched matmul)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        if any(lin.bias is None for lin in linears):
            raise ValueError("StackedLinear needs linear layers with a bias")
        self.weight = nn.Parameter(torch.stack([lin.weight.detach().t() for lin in linears]).clone())
        self.bias = nn.Parameter(torch.stack([lin.bias.detach() for lin in linears])[:, None].clone())

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.baddbmm(self.bias, x.reshape(self.members, -1, x.shape[-1]), self.weight)
        return y.reshape(-1, y.shape[-1])

    def member(self, i: int) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[2]).to(self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight[i].t())
            lin.bias.copy_(self.bias[i, 0])
        return lin


def can_stack(module: nn.Module) -> bool:
    """True when every parameter of ``module`` lives in an ``nn.Linear`` layer (then
    :func:`stack_members` can vectorise it over seeds)."""
    in_linear = {id(p) for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return all(id(p) in in_linear for p in module.parameters())


def _replace(root: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def stack_members(modules: list[nn.Module]) -> nn.Module:
    """One module computing ``len(modules)`` copies of the same architecture at once on a member-major
    batch [S*B, ...] (member s = rows s*B..(s+1)*B-1). Every parameter must live in an ``nn.Linear``
    (:func:`can_stack`); everything else in the forward pass must act per sample."""
    if not all(can_stack(m) for m in modules):
        raise ValueError("only networks whose parameters all live in nn.Linear layers can be stacked over seeds "
                         "(the 2-D MLPs); train other networks one seed at a time")
    base = copy.deepcopy(modules[0])
    for name, m in list(base.named_modules()):
        if isinstance(m, nn.Linear):
            _replace(base, name, StackedLinear([mod.get_submodule(name) for mod in modules]))
    base.members = len(modules)
    return base


def unstack_member(module: nn.Module, i: int) -> nn.Module:
    """Member ``i`` of a :func:`stack_members` module as an ordinary module (its own copy)."""
    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if isinstance(m, StackedLinear):
            _replace(out, name, m.member(i))
    if hasattr(out, "members"):
        del out.members
    return out


def _member_cat(tensors: list[torch.Tensor], members: int) -> torch.Tensor:
    """Concatenate member-major batches so that the result is member-major again."""
    return torch.cat([t.reshape(members, -1, *t.shape[1:]) for t in tensors], 1).flatten(0, 1)


def _member_split(x: torch.Tensor, members: int, sizes: list[int]) -> list[torch.Tensor]:
    return [p.flatten(0, 1) for p in x.reshape(members, -1, *x.shape[1:]).split(sizes, 1)]


def _member_mean(v: torch.Tensor, members: int) -> torch.Tensor:
    return v.reshape(members, -1).mean(1)


def _clip_per_member(params: list[torch.Tensor], max_norm: float, members: int) -> torch.Tensor:
    """Clip each member's gradient to ``max_norm`` on its own (as S separate runs would); returns the
    S norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if members == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).reshape(1)
    norms = torch.sqrt(sum(g.reshape(members, -1).pow(2).sum(1) for g in grads))
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(members, *[1] * (g.ndim - 1)))
    return norms


# ---------------------------------------------------------------------------------------------
# Training


class DivergenceError(RuntimeError):
    """A DMD2 loss became non-finite, or the generator's samples blew up; the last good checkpoint is kept."""


# The generator's samples may reach this many times the data's scale (its RMS, counted as at least 1),
# in RMS and in mean distance to the teacher's denoised estimate. Healthy runs stay within a few times
# (G starts as the teacher); a finite blow-up (lr 10 on the 2-D ring: samples at 1e10) goes far beyond,
# and its losses stay finite because DMD's direction is normalised.
BLOW_UP_FACTOR = 100.0


def _blown_up(scales: dict, limit: float) -> dict:
    """{name: members whose scale exceeds ``limit``} (a non-finite one counts too)."""
    bad = {}
    for name, v in scales.items():
        idx = torch.nonzero(~(v.detach() <= limit)).flatten().tolist()
        if idx:
            bad[name] = idx
    return bad


@dataclass
class DMD2Config:
    """Everything :func:`train_dmd2` needs besides the networks and the data (DMD2 defaults in comments)."""

    steps: int = 500  # generator updates
    ttur_ratio: int = 5  # fake-score updates per generator update (paper: 5)
    batch_size: int = 128
    lr: float = 2e-4  # equal for G and the fake score (paper: 2e-6 / 5e-7 for its large nets)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    dm_range: tuple[float, float] = DM_RANGE  # noise fractions of the DM loss (paper: 2%..98%)
    fake_range: tuple[float, float] = FULL_RANGE  # noise fractions of the fake score's loss (paper: all)
    fake_times: str = "uniform"  # "uniform" in noise fraction over fake_range (paper); "process": its training law
    gan_range: tuple[float, float] = FULL_RANGE  # noise fractions of the GAN term (paper: all)
    gan_critic_weight: float = 1e-2  # paper: about 1e-2 (at PAPER_SAMPLE_DIM); 0 disables the critic
    gan_generator_weight: float = 3e-3  # paper: 3e-3 (at PAPER_SAMPLE_DIM); 0 disables the GAN term in G
    gan_reference_dim: int = PAPER_SAMPLE_DIM  # generator's GAN weight x reference / d (gan_weight_scale); 0: as given
    warmup_steps: int = 0  # linear lr warm-up over this many generator updates (warmup_factor); paper: none stated,
    #                        the authors' code: 500 iterations = 100 generator updates at ttur_ratio 5
    n_student_steps: int = 1
    backward_simulation: bool = True
    regression_weight: float = 0.0  # > 0: DMD1's regression term (one-step generator; needs regression pairs)
    checkpoint_every: int = 50  # generator updates between checkpoints of the last good state
    eval_every: int = 0  # call eval_fn every this many generator updates (0: never)
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        ttur_schedule(1, self.ttur_ratio)  # validates the ratio
        warmup_factor(0, self.warmup_steps)  # validates the warm-up
        if self.regression_weight < 0 or self.gan_critic_weight < 0 or self.gan_generator_weight < 0:
            raise ValueError("loss weights must be >= 0; set a weight to 0 to switch its term off")
        if self.regression_weight > 0 and self.n_student_steps > 1:
            raise ValueError(f"regression_weight={self.regression_weight} with n_student_steps={self.n_student_steps}: "
                             "DMD1's regression loss pairs one noise x_T with one teacher sample, which only a one-step "
                             "generator maps deterministically; use n_student_steps=1 or regression_weight=0")
        for name in ("dm_range", "fake_range", "gan_range"):
            _check_range(name, getattr(self, name))
        check_choice("fake_times", self.fake_times, ("uniform", "process"))

    @property
    def use_gan(self) -> bool:
        return self.gan_critic_weight > 0 or self.gan_generator_weight > 0


@dataclass
class DMD2Result:
    generator: Denoiser
    fake_score: Denoiser
    gan_head: GANHead | None
    times: torch.Tensor
    history: dict = field(default_factory=dict)
    diverged: str | None = None  # the divergence message, None when training finished
    steps_done: int = 0
    seconds: float = 0.0  # wall time of the run (of the whole vectorised run when seeds were stacked)
    seed: int = 0

    def sample(self, n: int, seed: int = 0, device=None, batch_size: int = 2048):
        """``n`` samples from the trained generator (fixed seed)."""
        return generate(self.generator, self.times, n, seed=seed, device=device, batch_size=batch_size)


def _trainable_copy(teacher: Denoiser) -> Denoiser:
    m = copy.deepcopy(teacher).train()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train_dmd2` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    """The last good state of a run (modules and optimisers by name, plus the generator update it was
    taken at), in memory or at ``path`` (``torch.save``; read back with :func:`load_checkpoint`)."""

    def __init__(self, path: str | Path | None = None, **objects):
        self.path = Path(path) if path is not None else None
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self._memory = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, step: int) -> None:
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["step"] = int(step)
        if self.path is not None:
            atomic_torch_save(state, self.path)
        else:
            self._memory = copy.deepcopy(state)

    def restore(self) -> int:
        """Load the last saved state back (modules only) and return its generator update."""
        state = load_checkpoint(self.path) if self.path is not None else self._memory
        for name, obj in self.objects.items():
            if isinstance(obj, nn.Module):
                obj.load_state_dict(state[name])
        return int(state["step"])

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "memory"


class _Draws:
    """The random draws of a run with S members: one ``torch.Generator`` per member seed, so member s
    draws exactly what a single run with that seed draws; results are member-major [S*b, ...]."""

    def __init__(self, seeds: list[int], device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def _cat(self, fn) -> torch.Tensor:
        return torch.cat([fn(g) for g in self.gens]).to(self.device)

    def randn(self, shape) -> torch.Tensor:
        return self._cat(lambda g: torch.randn(shape, generator=g))

    def index(self, high: int, b: int) -> torch.Tensor:
        return self._cat(lambda g: torch.randint(0, high, (b,), generator=g))

    def times(self, process: Process, b: int, rng: tuple[float, float]) -> torch.Tensor:
        return self._cat(lambda g: sample_dm_times(process, b, rng, g))

    def process_times(self, process: Process, b: int) -> torch.Tensor:
        return self._cat(lambda g: process.sample_t(b, generator=g))

    def prior(self, process: Process, shape) -> torch.Tensor:
        return self._cat(lambda g: process.prior(shape, generator=g))


@dataclass
class DMD2Nets:
    """What one DMD2 update reads and writes. ``members`` > 1: generator, fake score and head are
    :func:`stack_members` networks holding one copy per seed; every batch is member-major."""

    teacher: Denoiser
    generator: Denoiser
    fake_score: Denoiser
    head: GANHead | None
    times: torch.Tensor
    data: torch.Tensor
    members: int = 1

    @property
    def process(self) -> Process:
        return self.teacher.process

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[1:])


@contextmanager
def _no_param_grads(*modules):
    """Gradients flow through these modules to their inputs only (the generator step must not train
    the fake score or the GAN head, nor pay for their parameter gradients)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_samples(nets: DMD2Nets, cfg: DMD2Config, draws: _Draws, b: int, grad: bool):
    """(x, k): ``b`` generator samples per member from a random step k per member (backward
    simulation or noised real data below it), with or without gradient."""
    n = nets.members * b
    k = draws._cat(lambda g: torch.randint(0, cfg.n_student_steps, (1,), generator=g).expand(b))
    x_T = draws.prior(nets.process, (b, *nets.shape))
    x_real = nets.data[draws.index(len(nets.data), b)] if not cfg.backward_simulation and cfg.n_student_steps > 1 else x_T
    # the re-noising noise is drawn whatever k is, so that each member's stream is its single run's
    noises = iter([draws.randn((b, *nets.shape)) for _ in range(cfg.n_student_steps - 1)])
    x_in = generator_input(nets.generator, nets.times, k, x_T, x_real, cfg.backward_simulation,
                           noise=lambda: next(noises))
    with torch.set_grad_enabled(grad):
        x = nets.generator(x_in, nets.times[k])
    assert x.shape[0] == n
    return x, k


def fake_score_losses(nets: DMD2Nets, cfg: DMD2Config, draws: _Draws, gan_scale: float = 1.0) -> tuple:
    """One fake-score update's losses: (total to backpropagate, {name: per-member values}).

    The fake score's denoising loss on detached generator samples at times over ``cfg.fake_range``
    (or the process's own training law, ``fake_times="process"``), plus ``gan_critic_weight x gan_scale``
    (:func:`train_dmd2` passes the critic's factor, 1: :func:`gan_weight_scale`) x the critic loss on noised real and generator samples at times over ``cfg.gan_range``: one forward
    pass of the fake score on the three batches together."""
    S, b, p = nets.members, cfg.batch_size, nets.process
    with torch.no_grad():
        x, _ = generator_samples(nets, cfg, draws, b, grad=False)
    t_f = draws.times(p, b, cfg.fake_range) if cfg.fake_times == "uniform" else draws.process_times(p, b)
    eps_f = draws.randn((b, *nets.shape))
    x_tf = p.add_noise(x, eps_f, t_f)
    critic = nets.head is not None and cfg.gan_critic_weight > 0
    if not critic:
        out = nets.fake_score.raw(x_tf, t_f)
    else:
        x_r = nets.data[draws.index(len(nets.data), b)]
        t_r, t_g = draws.times(p, b, cfg.gan_range), draws.times(p, b, cfg.gan_range)
        x_rt = p.add_noise(x_r, draws.randn((b, *nets.shape)), t_r)
        x_gt = p.add_noise(x, draws.randn((b, *nets.shape)), t_g)
        out, feats = nets.fake_score.raw(_member_cat([x_tf, x_rt, x_gt], S), _member_cat([t_f, t_r, t_g], S),
                                         return_features=True)
        out = _member_split(out, S, [b, 2 * b])[0]
        logits = nets.head(_member_split(feats, S, [b, 2 * b])[1])
        real, fake = _member_split(logits, S, [b, b])
    per_sample = ((out - nets.fake_score.target(x, eps_f, t_f)) ** 2).flatten(1).mean(1)
    losses = {"loss_fake": _member_mean(per_sample, S)}
    total = losses["loss_fake"]
    if critic:
        losses["loss_gan_critic"] = _member_mean(F.softplus(-real), S) + _member_mean(F.softplus(fake), S)
        total = total + cfg.gan_critic_weight * gan_scale * losses["loss_gan_critic"]
    return total.sum(), losses


def generator_losses(nets: DMD2Nets, cfg: DMD2Config, draws: _Draws, gan_scale: float = 1.0,
                     regression_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                     scales: dict | None = None) -> tuple:
    """One generator update's losses: (total to backpropagate, {name: per-member values}).

    The DM loss (:func:`dm_direction` at times over ``cfg.dm_range``), plus ``gan_generator_weight x
    gan_scale`` x the non-saturating GAN loss through the fake score's trunk and the head (their
    parameters get no gradient), plus ``regression_weight`` x DMD1's regression loss. A ``scales`` dict
    is filled with per-member ``sample_rms`` (of G's samples x) and ``teacher_distance`` (mean |x -
    x_real|, DMD's normaliser w): what the divergence guard watches besides finiteness."""
    S, b, p = nets.members, cfg.batch_size, nets.process
    x, _ = generator_samples(nets, cfg, draws, b, grad=True)
    t = draws.times(p, b, cfg.dm_range)
    x_t = p.add_noise(x.detach(), draws.randn((b, *nets.shape)), t)
    with torch.no_grad():
        x_real = nets.teacher(x_t, t)
        g, w = dm_direction(x.detach(), x_real, nets.fake_score(x_t, t))
        if scales is not None:
            scales["sample_rms"] = _member_mean(x.detach().flatten(1).pow(2).mean(1), S).sqrt()
            scales["teacher_distance"] = _member_mean(w, S)
    losses = {"loss_dm": _member_mean(_per_sample_dm(x, g), S)}
    total = losses["loss_dm"]
    if nets.head is not None and cfg.gan_generator_weight > 0:
        t_g = draws.times(p, b, cfg.gan_range)
        x_gt = p.add_noise(x, draws.randn((b, *nets.shape)), t_g)
        with _no_param_grads(nets.fake_score, nets.head):
            _, feats = nets.fake_score.features(x_gt, t_g)
            losses["loss_gan_generator"] = _member_mean(F.softplus(-nets.head(feats)), S)
        total = total + cfg.gan_generator_weight * gan_scale * losses["loss_gan_generator"]
    if cfg.regression_weight > 0:
        z_ref, x_ref = regression_pairs
        idx = draws.index(len(z_ref), b)
        x_reg = nets.generator(z_ref[idx].to(x.device), nets.times[0].expand(len(idx)))
        losses["loss_regression"] = _member_mean(regression_loss(x_reg, x_ref[idx].to(x.device), "none"), S)
        total = total + cfg.regression_weight * losses["loss_regression"]
    return total.sum(), losses


def _gan_head(teacher: Denoiser, data: torch.Tensor, seed: int, device) -> GANHead:
    with torch.no_grad():
        _, feats = teacher.features(data[:2].to(device), teacher.process.sample_t(2).to(device))
    torch.manual_seed(seed)
    return GANHead(teacher.net.feature_channels, kind="conv" if feats.ndim == 4 else "mlp").to(device)


def _check_finite(losses: dict) -> dict:
    """{name: members whose value is not finite}."""
    bad = {}
    for name, v in losses.items():
        idx = torch.nonzero(~torch.isfinite(v.detach())).flatten().tolist()
        if idx:
            bad[name] = idx
    return bad


def train_dmd2(teacher: Denoiser, data: torch.Tensor, config: DMD2Config | None = None, *,
               regression_pairs: tuple[torch.Tensor, torch.Tensor] | None = None, eval_fn=None,
               checkpoint_path: str | Path | None = None, on_divergence: str = "stop",
               progress: bool = True, desc: str = "DMD2", device=None,
               init_generator: Denoiser | None = None) -> DMD2Result:
    """Distil ``teacher`` into a ``config.n_student_steps``-step generator (seed ``config.seed``).

    ``data``: real samples [N, ...] (used by the GAN term and, without backward simulation, as the
    noised inputs of steps k > 0). ``regression_pairs``: (x_T, teacher sample) for DMD1's regression
    term. ``eval_fn(generator, times) -> dict`` is called every ``config.eval_every`` generator updates.
    Checkpoints (``torch.save``; read back with :func:`load_checkpoint`, weights_only) go to
    ``checkpoint_path`` or stay in memory. On a non-finite loss, ``on_divergence="stop"`` restores the
    last good checkpoint, warns, and returns with ``result.diverged`` set (the history keeps only the
    updates up to that checkpoint); ``"raise"`` raises :class:`DivergenceError` after restoring. Samples
    whose RMS, or mean distance to the teacher's estimate, exceeds ``BLOW_UP_FACTOR`` x the data's RMS
    (at least 1) count as a divergence too: their losses stay finite. ``init_generator`` (default: the teacher) starts G
    elsewhere, e.g. to resume.
    """
    return _train(teacher, data, config or DMD2Config(), [(config or DMD2Config()).seed], regression_pairs, eval_fn,
                  checkpoint_path, on_divergence, progress, desc, device, init_generator, stack=False)[0]


def train_dmd2_seeds(teacher: Denoiser, data: torch.Tensor, config: DMD2Config, seeds: list[int], *,
                     regression_pairs=None, eval_fn=None, on_divergence: str = "stop", progress: bool = True,
                     desc: str = "DMD2", device=None, vectorise: bool = True) -> list[DMD2Result]:
    """:func:`train_dmd2` for each of ``seeds`` (``config.seed`` is ignored), one result per seed.

    With ``vectorise`` and a teacher whose parameters all live in linear layers (the 2-D MLPs), the
    seeds train together in one stacked network (:func:`stack_members`): member s draws exactly the
    random numbers of a single run with seed s, clips its own gradient, and its losses are summed with
    the others' (each member's gradient is its own), so it follows the single run up to floating-point
    rounding, at a fraction of the cost. A non-finite loss in any member stops all of them at the last
    good checkpoint. Other teachers train one seed after the other.
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of distinct integers")
    if vectorise and len(seeds) > 1 and can_stack(teacher.net):
        return _train(teacher, data, config, seeds, regression_pairs, eval_fn, None, on_divergence, progress, desc,
                      device, None, stack=True)
    return [train_dmd2(teacher, data, DMD2Config(**{**asdict(config), "seed": s}), regression_pairs=regression_pairs,
                       eval_fn=eval_fn, on_divergence=on_divergence, progress=progress, desc=f"{desc} seed {s}",
                       device=device) for s in seeds]


def _train(teacher, data, cfg: DMD2Config, seeds, regression_pairs, eval_fn, checkpoint_path, on_divergence,
           progress, desc, device, init_generator, stack: bool) -> list[DMD2Result]:
    from tqdm.auto import tqdm

    check_choice("on_divergence", on_divergence, ("stop", "raise"))
    if cfg.regression_weight > 0 and regression_pairs is None:
        raise ValueError("regression_weight > 0 (DMD1's regression term) needs regression_pairs=(x_T, x_teacher); "
                         "draw them with a teacher sampler or set regression_weight=0")
    device = device or next(teacher.parameters()).device
    S = len(seeds)
    torch.manual_seed(seeds[0])
    teacher = frozen(teacher).to(device)
    data = data.to(device)
    start = init_generator if init_generator is not None else teacher
    heads = [_gan_head(teacher, data, s, device) for s in seeds] if cfg.use_gan else None
    if stack:
        generator = Denoiser(stack_members([start.net] * S), teacher.process, teacher.prediction)
        fake_score = Denoiser(stack_members([teacher.net] * S), teacher.process, teacher.prediction)
        head = stack_members(heads) if heads else None
        generator, fake_score = _trainable_copy(generator).to(device), _trainable_copy(fake_score).to(device)
    else:
        generator, fake_score = _trainable_copy(start).to(device), _trainable_copy(teacher).to(device)
        head = heads[0] if heads else None
    times = student_times(teacher.process, cfg.n_student_steps).to(device)
    nets = DMD2Nets(teacher, generator, fake_score, head, times, data, S)
    fake_params = list(fake_score.parameters()) + (list(head.parameters()) if head is not None else [])
    adamw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    opt_g = torch.optim.AdamW(generator.parameters(), **adamw)
    opt_f = torch.optim.AdamW(fake_params, **adamw)
    draws = _Draws(seeds, device)
    d = math.prod(nets.shape)
    critic_scale = gan_weight_scale(d, cfg.gan_reference_dim, role="critic")
    generator_scale = gan_weight_scale(d, cfg.gan_reference_dim, role="generator")
    ckpt = Checkpointer(checkpoint_path, generator=generator, fake_score=fake_score, gan_head=head,
                        opt_generator=opt_g, opt_fake=opt_f)
    ckpt.save(0)
    keys = ("loss_dm", "loss_fake", "loss_gan_critic", "loss_gan_generator", "loss_regression",
            "grad_norm_generator", "grad_norm_fake")
    histories = [{"step": [], **{k: [] for k in keys}, "eval": []} for _ in seeds]

    def member(module, i):
        return module if not stack else unstack_member(module, i)

    data_scale = max(1.0, float(data.float().pow(2).mean().sqrt()))
    limit = BLOW_UP_FACTOR * data_scale
    diverged, step, t0, fake_log = None, 0, time.time(), []
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False)
    for update in ttur_schedule(cfg.steps, cfg.ttur_ratio):
        scales = {}
        if update == "fake":
            total, losses = fake_score_losses(nets, cfg, draws, critic_scale)
            params, opt = fake_params, opt_f
        else:
            total, losses = generator_losses(nets, cfg, draws, generator_scale, regression_pairs, scales)
            params, opt = list(generator.parameters()), opt_g
        for grp in opt.param_groups:  # step counts the generator updates done: this round's is update `step`
            grp["lr"] = cfg.lr * warmup_factor(step, cfg.warmup_steps)
        bad, big = _check_finite(losses), _blown_up(scales, limit)
        if bad or big or not math.isfinite(float(total.detach())):
            good = ckpt.restore()
            members = sorted({seeds[i] for v in (*bad.values(), *big.values()) for i in v})
            who = "" if S == 1 else f" in seed(s) {members}"
            if bad or not big:
                what = f"non-finite {', '.join(bad) or 'total loss'}"
            else:
                name = next(iter(big))
                top = float(scales[name].max())
                what = (f"the generator's samples blew up: {name} = {top:.3g}; allowed: at most {limit:.3g} "
                        f"({BLOW_UP_FACTOR:g} x the data's RMS {data_scale:.3g}, counted as at least 1)")
            diverged = (f"DMD2 diverged at generator update {step + 1}{who}: {what} in the {update} update; training "
                        f"stopped and the last good checkpoint (update {good}, {ckpt.where}) was restored. Lower lr, "
                        f"raise ttur_ratio or clip gradients tighter (grad_clip).")
            # the updates after the checkpoint were discarded: so are their records
            for h in histories:
                kept = sum(1 for s_ in h["step"] if s_ <= good)
                for k in ("step", *keys):
                    del h[k][kept:]
                h["eval"] = [e for e in h["eval"] if e["step"] <= good]
            if on_divergence == "raise":
                raise DivergenceError(diverged)
            warnings.warn(diverged, RuntimeWarning, stacklevel=3)
            step = good
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        norms = _clip_per_member(params, cfg.grad_clip, S)
        opt.step()
        if update == "fake":
            fake_log.append({**losses, "grad_norm_fake": norms})
            continue
        step += 1
        values = {**{k: torch.stack([f[k] for f in fake_log]).mean(0) for k in fake_log[0]}, **losses,
                  "grad_norm_generator": norms}
        fake_log = []
        for i, h in enumerate(histories):
            h["step"].append(step)
            for k in keys:
                h[k].append(float(values[k][i].detach()) if k in values else float("nan"))
        bar.update(1)
        bar.set_postfix({k.replace("loss_", ""): f"{float(v.detach().mean()):.3g}" for k, v in values.items() if "loss" in k})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            ckpt.save(step)
        if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            for i, h in enumerate(histories):
                gen_i = member(generator, i)
                gen_i.eval()
                h["eval"].append({"step": step, **eval_fn(gen_i, times)})
                gen_i.train()
    bar.close()
    seconds = time.time() - t0
    results = []
    for i, s in enumerate(seeds):
        gen_i, fake_i = member(generator, i).eval(), member(fake_score, i).eval()
        gen_i.sample_shape = nets.shape
        results.append(DMD2Result(gen_i, fake_i, member(head, i) if head is not None else None, times, histories[i],
                                  diverged, step, seconds, s))
    return results


def config_dict(cfg: DMD2Config) -> dict:
    return asdict(cfg)


def late_average(history: dict, key: str, upto: int | None = None, fraction: float = 0.5) -> float:
    """Mean of the evaluated ``key`` over the last ``fraction`` of training up to generator update
    ``upto`` (default: the end): the late-training average the notebook's verdicts use instead of the
    last iterate."""
    evals = history["eval"]
    upto = upto if upto is not None else (evals[-1]["step"] if evals else 0)
    window = [e[key] for e in evals if upto * (1 - fraction) < e["step"] <= upto]
    if not window:
        raise ValueError(f"no evaluation of {key!r} in ({upto * (1 - fraction):g}, {upto}]; evaluate more often "
                         "(eval_every) or widen the fraction")
    return float(sum(window) / len(window))


# ---------------------------------------------------------------------------------------------
# 2-D evaluation and the hyper-parameter search (notebook 04)


def stratified_sample(mixture, n: int, seed: int) -> torch.Tensor:
    """``n`` points of a 2-D mixture with the exact share of points per mode (largest remainders), so a
    reference sample carries no mode-count noise into a sliced Wasserstein distance."""
    g = torch.Generator().manual_seed(seed)
    share = mixture.weights * n
    counts = share.floor().long()
    counts[torch.argsort(share - counts, descending=True)[: n - int(counts.sum())]] += 1
    means = mixture.means.repeat_interleave(counts, 0)
    return means + mixture.std * torch.randn(n, 2, generator=g)


def off_mode_fraction(mixture, x: torch.Tensor, n_std: float = 3.0) -> float:
    """Fraction of the points farther than ``n_std`` standard deviations from every mode: the mass a
    continuous one-step map must leave on the seams between separated modes."""
    d = torch.cdist(x.detach().float().cpu(), mixture.means).min(1).values
    return float((d > n_std * mixture.std).float().mean())


def mode_weight_tv(mixture, x: torch.Tensor, n_std: float = 3.0) -> float:
    """Total variation between the shares of the on-mode points per mode (nearest mode, within ``n_std``
    standard deviations) and the mixture's weights: how unevenly the generator splits its mass."""
    d = torch.cdist(x.detach().float().cpu(), mixture.means)
    near, idx = d.min(1)
    on = near <= n_std * mixture.std
    if not bool(on.any()):
        return 1.0
    share = torch.bincount(idx[on], minlength=mixture.n_components).float()
    return float(0.5 * (share / share.sum() - mixture.weights).abs().sum())


class ToyEvaluator:
    """``eval_fn`` of :func:`train_dmd2` on a 2-D mixture: sliced W2 of ``n`` generator samples to a
    *validation* reference (generator noise seed ``noise_seed``) and, from fresh generator noise, to a
    held-out *test* reference; the two references are independent stratified samples. The
    hyper-parameter search reads ``sw_val`` only, the claims ``sw_test`` (and ``off_mode_test``, the
    share of test samples off every mode, :func:`off_mode_fraction`, and ``mode_tv_test``, how unevenly
    the on-mode ones split over the modes, :func:`mode_weight_tv`). ``keep`` > 0 also returns
    that many test samples (float16) under ``"samples"`` for the explorer."""

    def __init__(self, mixture, n: int = 2000, seed: int = 0, noise_seed: int = 7, keep: int = 0,
                 n_projections: int = 256):
        self.val = stratified_sample(mixture, n, seed + 1)
        self.test = stratified_sample(mixture, n, seed + 2)
        self.n, self.noise_seed, self.keep, self.mixture = n, noise_seed, keep, mixture
        # the projections of fedlib.metrics.sliced_wasserstein (seed 0), the references' sorted once
        g = torch.Generator().manual_seed(0)
        dirs = torch.randn(2, n_projections, generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        self._sorted = {id(self.val): (self.val.double() @ self.dirs).sort(0).values,
                        id(self.test): (self.test.double() @ self.dirs).sort(0).values}

    def sw(self, x: torch.Tensor, reference: torch.Tensor) -> float:
        """Sliced W2 of ``x`` (n points) to ``self.val`` or ``self.test``: the value of
        :func:`fedlib.metrics.sliced_wasserstein`, with the reference's projections sorted once."""
        ref = self._sorted[id(reference)]
        px = (x.detach().double().cpu() @ self.dirs).sort(0).values
        if len(px) != len(ref):
            raise ValueError(f"ToyEvaluator compares {len(ref)} points with {len(ref)}; got {len(px)}")
        return float(((px - ref) ** 2).mean().sqrt())

    def __call__(self, generator: Denoiser, times: torch.Tensor) -> dict:
        x_val = generate(generator, times, self.n, shape=(2,), seed=self.noise_seed)
        x_test = generate(generator, times, self.n, shape=(2,), seed=self.noise_seed + 1)
        out = {"sw_val": self.sw(x_val, self.val), "sw_test": self.sw(x_test, self.test),
               "off_mode_test": off_mode_fraction(self.mixture, x_test),
               "mode_tv_test": mode_weight_tv(self.mixture, x_test)}
        if self.keep:
            out["samples"] = x_test[: self.keep].half().cpu()
        return out


def coordinate_search(evaluate, grids: dict, start: dict) -> tuple[dict, list[dict]]:
    """Search one hyper-parameter at a time, in the order of ``grids``, over its grid with the others
    at their best so far. ``evaluate(params) -> per-seed scores`` (lower is better; called once per
    distinct ``params``). Returns (best params, records [{"param", "value", "seed", "score"}])."""
    best, cache, records = dict(start), {}, []
    for name, values in grids.items():
        means = {}
        for v in values:
            params = {**best, name: v}
            key = tuple(sorted(params.items()))
            if key not in cache:
                cache[key] = [float(s) for s in evaluate(params)]
            records += [{"param": name, "value": v, "seed": i, "score": s} for i, s in enumerate(cache[key])]
            means[v] = sum(cache[key]) / len(cache[key])
        best[name] = min(means, key=means.get)
    return best, records


# ---------------------------------------------------------------------------------------------
# Teaching helper: exact denoisers of a 2-D Gaussian mixture


class _MixtureNet(nn.Module):
    """x0-prediction 'network' of the exact EDM denoiser of a 2-D Gaussian mixture:
    D(x, sigma) = x + sigma^2 grad log p_sigma(x)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture
        self.feature_channels = 2
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x, t_net, return_features=False):
        m = self.mixture
        sigma2 = (t_net.to(x.dtype) ** 2)[:, None]  # [B, 1]
        var = m.std**2 + sigma2  # every noised component is N(mu_m, var I)
        d = x[:, None, :] - m.means[None].to(x)  # [B, M, 2]
        r = torch.softmax(m.weights.log()[None].to(x) - 0.5 * (d**2).sum(-1) / var, dim=1)
        out = x - sigma2 / var * (r[..., None] * d).sum(1)  # x + sigma^2 * grad log p_sigma(x)
        return (out, x) if return_features else out


def exact_denoiser(mixture) -> Denoiser:
    """The exact EDM denoiser E[x_0 | x_t] of a :class:`fedlib.data.GaussianMixture2D` (no training):
    the ideal real score of the teaching cell and of tests."""
    return Denoiser(_MixtureNet(mixture), EDM(), prediction="x0")


# ---------------------------------------------------------------------------------------------
# Evaluation helpers (the notebook's comparison table)


@torch.no_grad()
def teacher_baselines(teacher: Denoiser, x_T: torch.Tensor, nfes, samplers, score, schedule_name: str = "edm",
                      batch_size: int = 1000) -> list[dict]:
    """The teacher at each NFE with each sampler (``schedule_name`` grid, ``nfe`` steps; samplers
    whose NFE is one per step), all from the same noise ``x_T``. ``score(x) -> float`` (lower is
    better). Rows: nfe, sampler, score, seconds per 1000 samples, and ``best`` (the lowest score
    at that NFE: the teacher "with its best sampler")."""
    from .diffusion.samplers import nfe_for_steps, solve
    from .diffusion.schedules import schedule

    rows = []
    for nfe in nfes:
        times = schedule(schedule_name, teacher.process, int(nfe))
        for name in samplers:
            if nfe_for_steps(name, int(nfe)) != int(nfe):
                raise ValueError(f"sampler {name!r} does not take one network evaluation per step; "
                                 "use euler, dpm_solver_pp_2m/3m, ipndm or unipc here")
            start = time.perf_counter()
            x, used = solve(teacher, x_T, times, name, batch_size=batch_size)
            seconds = time.perf_counter() - start
            if used != nfe:
                raise RuntimeError(f"{name} used {used} network evaluations on a {nfe}-step grid")
            rows.append({"nfe": int(nfe), "sampler": name, "score": float(score(x)),
                         "s_per_1000": seconds / len(x_T) * 1000, "samples": x})
        best = min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["score"])
        for r in rows:
            if r["nfe"] == nfe:
                r["best"] = r is best
    return rows


def timed_sample(result: DMD2Result, n: int, seed: int = 0, device=None) -> tuple[torch.Tensor, float]:
    """(``n`` student samples, seconds per 1000 samples)."""
    start = time.perf_counter()
    x = result.sample(n, seed=seed, device=device)
    return x, (time.perf_counter() - start) / n * 1000
