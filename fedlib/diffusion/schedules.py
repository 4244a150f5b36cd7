"""Hand-made time grids (papers.md section 3): N+1 decreasing process times, noisy -> clean.

``schedule(name, process, n_steps, t_max=None, t_min=None)`` with name in
- ``"uniform_t"``: uniform in the process time t (for EDM, t = sigma);
- ``"quadratic_t"``: t_i = t_min + (t_max - t_min) (1 - i/N)^2 (dense near the data; DDIM's quadratic);
- ``"uniform_lambda"``: uniform in the half log-SNR lambda (DPM-Solver's default);
- ``"edm"``: sigma_bar_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7
  (Karras et al. 2022; :func:`karras_sigmas`), mapped to t through lambda = -log sigma_bar.
All are float64 tensors with exactly t_max first and t_min last.

:func:`karras_sigmas` is the one place the rho = 7 interpolation is written (k-diffusion's
``get_sigmas_karras``); DMD2's noise fractions and FedDM's sampling grid use it too.
"""

from __future__ import annotations

import math

import torch

from ..utils import check_choice

SCHEDULES = ("uniform_t", "quadratic_t", "uniform_lambda", "edm")
EDM_RHO = 7.0


def karras_sigmas(u, sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: sigma(u) = (s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)))^rho for
    fractions u in [0, 1] (0 -> sigma_max, 1 -> sigma_min), float64, differentiable in u."""
    u = torch.as_tensor(u, dtype=torch.float64)
    hi, lo = float(sigma_max) ** (1 / rho), float(sigma_min) ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


def schedule(name: str, process, n_steps: int, t_max: float | None = None, t_min: float | None = None,
             rho: float = 7.0) -> torch.Tensor:
    check_choice("schedule", name, SCHEDULES, fix="Or pass your own decreasing tensor of times to the sampler.")
    if not (isinstance(n_steps, int) and n_steps >= 1):
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    t_max = process.t_max if t_max is None else float(t_max)
    t_min = process.t_min if t_min is None else float(t_min)
    if not 0 <= t_min < t_max < math.inf:  # also False for NaN, which would give an all-NaN grid
        raise ValueError(f"t_max={t_max!r}, t_min={t_min!r}; allowed: finite times with 0 <= t_min < t_max. "
                         "Leave them None for the process's own range (process.t_max, process.t_min).")
    u = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    if name == "uniform_t":
        t = t_max + u * (t_min - t_max)
    elif name == "quadratic_t":
        t = t_min + (t_max - t_min) * (1 - u) ** 2
    else:
        lam_lo, lam_hi = process.lambda_(torch.tensor(t_max, dtype=torch.float64)), process.lambda_(
            torch.tensor(t_min, dtype=torch.float64))
        if name == "uniform_lambda":
            lam = lam_lo + u * (lam_hi - lam_lo)
        else:
            sb = karras_sigmas(u, float(torch.exp(-lam_hi)), float(torch.exp(-lam_lo)), rho)
            lam = -torch.log(sb)
        t = process.t_of_lambda(lam).double()
    t = t.clone()
    t[0], t[-1] = t_max, t_min
    return t
