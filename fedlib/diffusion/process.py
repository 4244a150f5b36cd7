"""Forward processes x_t = alpha_t x_0 + sigma_t eps (papers.md section 3).

Every process maps its own time variable ``t`` (decreasing towards the data when sampling) to
``alpha(t)``, ``sigma(t)`` and the half log-SNR ``lambda_(t) = log(alpha_t / sigma_t)``, inverts
lambda (``t_of_lambda``), says what time the network is fed (``network_time``), and draws training
times (``sample_t``). All maps are torch functions of a tensor ``t``, so schedules built from them
stay differentiable (LD3 backpropagates through them).

- :class:`VP` ``schedule="linear" | "cosine"``, ``discrete=True`` (DDPM, 1000 steps: ``t = (n+1)/N``
  for step index n, log alpha interpolated piecewise linearly between steps, network fed the index
  ``n = N t - 1``) or ``discrete=False`` (continuous beta(t), network fed ``1000 t``).
- :class:`EDM` (Karras et al. 2022): ``alpha = 1``, ``sigma = t`` in [0.002, 80], network fed sigma
  (the EDM preconditioning in :mod:`fedlib.diffusion.denoiser` turns it into c_noise).

``t = 0`` is allowed as the *last* point of a sampling grid and means sigma = 0 (clean data); the
samplers finish such a grid with a first-order (denoising) step.
"""

from __future__ import annotations

import math

import torch

from ..utils import check_choice

VP_SCHEDULES = ("linear", "cosine")


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (like numpy.interp, increasing ``xp``, clamped ends),
    differentiable in ``x``."""
    xp = xp.to(x.device, x.dtype)
    fp = fp.to(x.device, x.dtype)
    i = torch.searchsorted(xp, x.detach().contiguous(), right=False).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = (x - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


class Process:
    """Common interface. Subclasses define ``log_alpha(t)``, ``sigma(t)`` and ``t_of_lambda``."""

    name = "process"
    t_min: float
    t_max: float

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR log(alpha_t / sigma_t) (+inf where sigma_t = 0)."""
        return self.log_alpha(t) - self.sigma(t).log()

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t / alpha_t = exp(-lambda_t): the EDM-equivalent noise level."""
        return self.sigma(t) / self.alpha(t)

    @property
    def lambda_min(self) -> float:
        return float(self.lambda_(torch.tensor(self.t_max, dtype=torch.float64)))

    @property
    def lambda_max(self) -> float:
        return float(self.lambda_(torch.tensor(self.t_min, dtype=torch.float64)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps; ``t`` is a scalar or one time per sample."""
        a, s = _bcast(self.alpha(t), x0), _bcast(self.sigma(t), x0)
        return a * x0 + s * eps

    def prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """x_T ~ N(0, sigma_T^2 I) (alpha_T is ~0 for VP; EDM's sigma_max = 80)."""
        z = torch.randn(shape, generator=generator, dtype=dtype)
        s = self.sigma(torch.tensor(self.t_max, dtype=torch.float64))
        return (float(s) * z).to(device)

    def __repr__(self) -> str:
        return self.name


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def ddpm_betas(schedule: str, n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> torch.Tensor:
    """DDPM betas (float64): ``linear`` (Ho et al.), ``scaled_linear`` (latent diffusion) or
    ``cosine`` (Nichol & Dhariwal, clipped at 0.999)."""
    check_choice("beta schedule", schedule, ("linear", "scaled_linear", "cosine"))
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n_steps, dtype=torch.float64) ** 2
    s = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((s + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class VP(Process):
    """Variance-preserving process (alpha^2 + sigma^2 = 1).

    ``discrete=True``: the DDPM chain of ``n_steps`` betas (or ``betas`` given, e.g. from a diffusers
    scheduler), step n at time t = (n+1)/N, plus the anchor t = 0 (alpha = 1). ``discrete=False``:
    continuous linear beta(t) = beta_0 + t (beta_1 - beta_0) or the continuous cosine schedule.
    """

    def __init__(self, schedule: str = "linear", discrete: bool = True, n_steps: int = 1000,
                 betas: torch.Tensor | None = None, beta_0: float = 0.1, beta_1: float = 20.0,
                 cosine_s: float = 0.008, t_min: float | None = None):
        self.schedule = schedule if betas is None else "custom"
        if betas is None:
            check_choice("VP schedule", schedule, VP_SCHEDULES)
        self.discrete = discrete
        self.name = f"vp_{self.schedule}_{'discrete' if discrete else 'continuous'}"
        if discrete:
            b = ddpm_betas(schedule, n_steps) if betas is None else torch.as_tensor(betas, dtype=torch.float64)
            self.n_steps = len(b)
            log_alpha = 0.5 * torch.log1p(-b).cumsum(0)
            self._tp = torch.cat([torch.zeros(1, dtype=torch.float64),
                                  torch.arange(1, self.n_steps + 1, dtype=torch.float64) / self.n_steps])
            self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha])
            self.t_min, self.t_max = 1.0 / self.n_steps, 1.0
        else:
            self.n_steps = 1000
            self.beta_0, self.beta_1, self.cosine_s = beta_0, beta_1, cosine_s
            if schedule == "linear":
                self.t_min, self.t_max = 1e-3, 1.0
            else:  # alpha -> 0 at t = 1; stop where lambda is still finite (as DPM-Solver does)
                self.t_min, self.t_max = 1e-3, 0.9946
        if t_min is not None:
            self.t_min = float(t_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if self.discrete:
            return _interp(t, self._tp, self._log_alpha)
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - math.log(math.cos(s / (1 + s) * math.pi / 2))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        lam = torch.as_tensor(lam)
        # log alpha from lambda: alpha^2 = 1 / (1 + exp(-2 lambda))
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        if self.discrete:
            # the exact inverse of the piecewise-linear log alpha(t) (log alpha is decreasing in t)
            return _interp(-log_alpha, -self._log_alpha, self._tp)
        if self.schedule == "linear":
            b0, b1 = self.beta_0, self.beta_1
            # solve 0.25 t^2 (b1 - b0) + 0.5 t b0 + log_alpha = 0
            return (-b0 + torch.sqrt(b0**2 - 4 * (b1 - b0) * log_alpha)) / (b1 - b0)
        s = self.cosine_s
        c = log_alpha + math.log(math.cos(s / (1 + s) * math.pi / 2))
        return 2 * (1 + s) / math.pi * torch.arccos(c.exp()) - s

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.n_steps * t - 1 if self.discrete else 1000 * t

    def sample_t(self, n: int, generator=None, device=None) -> torch.Tensor:
        """Training times: uniform step indices (discrete) or uniform in [t_min, 1]."""
        if self.discrete:
            idx = torch.randint(0, self.n_steps, (n,), generator=generator)
            return ((idx + 1).float() / self.n_steps).to(device)
        u = torch.rand(n, generator=generator)
        return (self.t_min + u * (self.t_max - self.t_min)).to(device)


class EDM(Process):
    """Karras et al. (2022): x_t = x_0 + sigma eps, t = sigma in [sigma_min, sigma_max]; training
    sigmas log-normal (P_mean, P_std)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 p_mean: float = -1.2, p_std: float = 1.2):
        self.name = "edm"
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(torch.as_tensor(t))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(torch.as_tensor(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(torch.as_tensor(t))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.as_tensor(lam))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t)

    def sample_t(self, n: int, generator=None, device=None) -> torch.Tensor:
        return torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=generator)).to(device)


def make_process(name: str, **kw) -> Process:
    """``"edm"``, ``"vp_linear"``, ``"vp_cosine"`` (discrete DDPM) or ``"vp_linear_continuous"``,
    ``"vp_cosine_continuous"``."""
    names = ("edm", "vp_linear", "vp_cosine", "vp_linear_continuous", "vp_cosine_continuous")
    check_choice("process", name, names)
    if name == "edm":
        return EDM(**kw)
    parts = name.split("_")
    return VP(parts[1], discrete=len(parts) == 2, **kw)
