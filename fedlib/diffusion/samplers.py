"""Probability-flow ODE samplers over an explicit, decreasing time tensor (papers.md section 3).

Every sampler is one plain function::

    x_0, nfe = sampler(denoiser, x_T, times, network_times=None)

- ``denoiser(x, t, t_net) -> x0_hat`` (a :class:`~fedlib.diffusion.denoiser.Denoiser`); its
  ``process`` gives alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t).
- ``times``: N+1 strictly decreasing process times t_0 > ... > t_N (noisy -> clean), e.g. from
  :mod:`fedlib.diffusion.schedules` or :func:`fedlib.ld3.learned_timesteps`. ``t_N = 0`` (sigma = 0)
  is allowed: the last step is then the first-order step x_0 = D(x_{N-1}).
- ``network_times``: optional N+1 times fed to the network instead of ``times`` (LD3's decoupled
  network time); the solver coefficients always use ``times``.
- returns the sample at t_N and the exact number of network evaluations (NFE).

All coefficients are computed once, before the loop, from ``times`` (in float64, differentiably:
gradients flow to ``times`` and ``network_times``); the loop only calls the network and forms
linear combinations. The only host synchronisation is the one check of the grid.

Samplers (data-prediction / EDM forms; x_bar = x / alpha, sigma_bar = sigma / alpha = e^{-lambda}):

- :func:`euler` (= :func:`ddim`): x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1}(1 - e^{-h_i}) D_i,
  h_i = lambda_{i+1} - lambda_i. Order 1, NFE N.
- :func:`heun`: EDM's 2nd-order Heun in (x_bar, sigma_bar); NFE 2N (2N - 1 when t_N = 0).
- :func:`dpm_solver_pp_2m`: DPM-Solver++(2M) (Lu et al. 2022), variable step, first step
  first-order (``lower_order_final=True``: the last too below 15 steps, diffusers' convention). Order 2, NFE N.
- :func:`dpm_solver_pp_3m`: multistep 3rd order with exact exponential-integrator weights
  (phi functions) on the quadratic interpolant of D in lambda. Order 3, NFE N.
- :func:`ipndm`: improved PNDM (Zhang & Chen 2023): Adams-Bashforth in sigma_bar on
  d = (x_bar - D)/sigma_bar with the fixed (equal-step) coefficients, order ramping 1..``order``
  (<= 4). NFE N.
- :func:`unipc`: UniPC (Zhao et al. 2023), data prediction, predictor of ``order`` p with the
  UniC corrector (order p + 1; no corrector after the last step, so NFE N); ``variant`` "bh1"
  (B(h) = h) or "bh2" (B(h) = e^h - 1 in the noise-prediction form, i.e. 1 - e^{-h} for data prediction).
"""

from __future__ import annotations

import math

import torch

from ..utils import check_choice


def check_grid(times, network_times=None, device=None, min_points: int = 2):
    """``times`` (and ``network_times``) as tensors on ``device``, refused unless 1-D with at least
    ``min_points`` points, every value finite and >= 0, ``times`` strictly decreasing and
    ``network_times`` of the same shape. Returns ``(times, network_times, t_N == 0)``.

    All value checks read one combined mask back to the host: the one host synchronisation of a
    solve (NaN compares False, so without the finiteness check a NaN grid passes the order check
    and every sample comes out NaN)."""
    times = torch.as_tensor(times, device=device)
    if times.ndim != 1 or len(times) < min_points:
        raise ValueError(f"times must be a 1-D tensor of at least {min_points} time points, got shape "
                         f"{tuple(times.shape)}")
    tn = times if network_times is None else torch.as_tensor(network_times, device=times.device)
    if tn.shape != times.shape:
        raise ValueError(f"network_times has shape {tuple(tn.shape)} but times has {tuple(times.shape)}; "
                         "pass one network time per time point (or None)")
    n = len(times)
    flags = torch.cat([~torch.isfinite(times) | (times < 0), ~torch.isfinite(tn) | (tn < 0),
                       times[1:] >= times[:-1], times[-1:] == 0]).cpu()  # the one host sync of a solve
    for name, t, bad in (("times", times, flags[:n]), ("network_times", tn, flags[n:2 * n])):
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}]={float(t[i])!r} ({int(bad.sum())} of {n} points bad); allowed: finite "
                             "times >= 0 (t_N = 0 is fine). Build grids with fedlib.diffusion.schedules, or look "
                             "for the NaN or negative step in what computed these times.")
    order = flags[2 * n:3 * n - 1]
    if order.any():
        i = int(order.nonzero()[0])
        raise ValueError(f"times must be strictly decreasing (noisy -> clean), but times[{i}]={float(times[i]):.6g} "
                         f"<= times[{i + 1}]={float(times[i + 1]):.6g}. Build grids with fedlib.diffusion.schedules "
                         "or flip an increasing grid with times.flip(0).")
    return times, tn, bool(flags[-1])


class _Grid:
    """Per-step quantities of a time grid, float64, differentiable."""

    def __init__(self, denoiser, x: torch.Tensor, times, network_times):
        times, tn, self.final_zero = check_grid(times, network_times, x.device)
        p = denoiser.process
        t64 = times.double()
        self.times, self.network_times = times, tn
        self.N = len(times) - 1
        self.alpha, self.sigma = p.alpha(t64), p.sigma(t64)
        self.lam = p.lambda_(t64)
        self.h = self.lam[1:] - self.lam[:-1]
        self.ratio = self.sigma[1:] / self.sigma[:-1]  # sigma_{i+1} / sigma_i
        self.one_minus_exp = -torch.expm1(-self.h)  # 1 - e^{-h}; = 1 when sigma_{i+1} = 0
        self.dtype = x.dtype

    def cast(self, v: torch.Tensor) -> list:
        """A coefficient vector as a list of 0-d tensors in the sample's dtype (indexing a list
        in the loop costs nothing)."""
        return list(v.to(self.dtype).unbind(0))


def _check_order(order: int, max_order: int, name: str):
    if not (isinstance(order, int) and 1 <= order <= max_order):
        raise ValueError(f"{name} order must be an int in 1..{max_order}, got {order!r}")


def euler(denoiser, x: torch.Tensor, times, network_times=None):
    """Euler in (x_bar, sigma_bar) = DDIM (eta = 0) = DPM-Solver++(1). Returns (x, nfe)."""
    g = _Grid(denoiser, x, times, network_times)
    a = g.cast(g.ratio)
    b = g.cast(g.alpha[1:] * g.one_minus_exp)
    t, tn = g.times, g.network_times
    for i in range(g.N):
        x = a[i] * x + b[i] * denoiser(x, t[i], tn[i])
    return x, g.N


ddim = euler


def heun(denoiser, x: torch.Tensor, times, network_times=None):
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1 without churn)."""
    g = _Grid(denoiser, x, times, network_times)
    sb = g.sigma / g.alpha
    dt = g.cast(sb[1:] - sb[:-1])
    inv_sb = g.cast(1.0 / sb[:-1])
    inv_sb_next = g.cast(torch.where(sb[1:] > 0, 1.0 / sb[1:].clamp_min(1e-300), torch.zeros_like(sb[1:])))
    alpha = g.cast(g.alpha)
    inv_alpha0 = 1.0 / g.alpha[0].to(x.dtype)
    t, tn = g.times, g.network_times
    xb, nfe = x * inv_alpha0, 0
    for i in range(g.N):
        d = (xb - denoiser(alpha[i] * xb, t[i], tn[i])) * inv_sb[i]
        nfe += 1
        xb_next = xb + dt[i] * d
        if i < g.N - 1 or not g.final_zero:
            d_next = (xb_next - denoiser(alpha[i + 1] * xb_next, t[i + 1], tn[i + 1])) * inv_sb_next[i]
            nfe += 1
            xb_next = xb + dt[i] * 0.5 * (d + d_next)
        xb = xb_next
    return alpha[g.N] * xb, nfe


def _phi(h: torch.Tensor, k: int) -> torch.Tensor:
    """h psi_k(h) scaled: returns psi_k(h) with psi_1 = (1 - e^{-h})/h, psi_{k+1} = (1/k! - psi_k)/h;
    psi_k(h) = int_0^1 e^{-h(1-u)} u^{k-1}/(k-1)! du. Series for small h (cancellation)."""
    small = h.abs() < 0.05 * k
    hs = torch.where(small, torch.ones_like(h), h)  # keeps the unused branch finite (and its grad)
    out = -torch.expm1(-hs) / hs
    for j in range(1, k):
        out = (1.0 / math.factorial(j) - out) / hs
    # small-h series: psi_k(h) = sum_m (-h)^m / (m + k)!
    hz = torch.where(small, h, torch.zeros_like(h))
    series = sum((-hz) ** m / math.factorial(m + k) for m in range(8))
    return torch.where(small, series, out)


LOWER_ORDER_FINAL_BELOW = 15  # diffusers' DPMSolverMultistepScheduler: lower_order_final acts below 15 steps


def dpm_solver_pp_2m(denoiser, x: torch.Tensor, times, network_times=None, lower_order_final: bool = False):
    """DPM-Solver++(2M): D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i.

    The first step is first order, and so is a last step onto sigma = 0 (t_N = 0). ``lower_order_final``
    (default False: fedlib's convention, the last step onto sigma_min > 0 stays second order) follows
    diffusers' ``DPMSolverMultistepScheduler(lower_order_final=True, final_sigmas_type="sigma_min")``:
    with fewer than 15 steps its last step is first order whatever the final sigma. Pass True to match
    diffusers (e.g. a grid from :func:`fedlib.diffusion.interop.diffusers_timesteps_to_times` with
    ``final_zero=False`` and sigma_min appended)."""
    g = _Grid(denoiser, x, times, network_times)
    base = g.alpha[1:] * g.one_minus_exp
    c0, c1 = base.clone(), torch.zeros_like(base)
    lower_final = g.final_zero or (lower_order_final and g.N < LOWER_ORDER_FINAL_BELOW)
    last = g.N - 1 if lower_final else g.N  # the last step stays first order
    if last > 1:
        r = g.h[: last - 1] / g.h[1:last]
        c0 = torch.cat([base[:1], base[1:last] * (1 + 0.5 / r), base[last:]])
        c1 = torch.cat([c1[:1], -base[1:last] * 0.5 / r, c1[last:]])
    a, b0, b1 = g.cast(g.ratio), g.cast(c0), g.cast(c1)
    t, tn = g.times, g.network_times
    m_prev = None
    for i in range(g.N):
        m = denoiser(x, t[i], tn[i])
        x = a[i] * x + b0[i] * m if m_prev is None else a[i] * x + b0[i] * m + b1[i] * m_prev
        m_prev = m
    return x, g.N


def _multistep_weights(g: _Grid, i: int, order: int) -> list[torch.Tensor]:
    """Weights on (m_i, m_{i-1}, ...) of the exponential-integrator step i of the given order
    (1..3), exact phi functions, Newton interpolation of D in lambda."""
    h = g.h[i]
    alpha = g.alpha[i + 1]
    if order == 1:
        return [alpha * g.one_minus_exp[i]]
    A = h * _phi(h, 2)  # (h - 1 + e^{-h}) / h
    r0 = g.h[i - 1] / h
    if order == 2:
        # D1 = (m0 - m1)/r0 ~ h D'
        return [alpha * (g.one_minus_exp[i] + A / r0), -alpha * A / r0]
    B = h * _phi(h, 3)  # (h^2/2 - h + 1 - e^{-h}) / h^2
    r1 = g.h[i - 2] / h
    u = A * (1 + r0 / (r0 + r1)) + 2 * B / (r0 + r1)
    w = A * r0 / (r0 + r1) + 2 * B / (r0 + r1)
    return [alpha * (g.one_minus_exp[i] + u / r0), -alpha * (u / r0 + w / r1), alpha * w / r1]


def dpm_solver_pp_3m(denoiser, x: torch.Tensor, times, network_times=None):
    """Multistep DPM-Solver++ of order 3 (orders 1, 2 for the first two steps; first order onto
    sigma = 0)."""
    g = _Grid(denoiser, x, times, network_times)
    weights = []
    for i in range(g.N):
        order = 1 if (g.final_zero and i == g.N - 1) else min(3, i + 1)
        weights.append(g.cast(torch.stack(_multistep_weights(g, i, order))))
    a = g.cast(g.ratio)
    t, tn = g.times, g.network_times
    hist = []
    for i in range(g.N):
        hist.insert(0, denoiser(x, t[i], tn[i]))
        del hist[3:]
        w = weights[i]
        x = a[i] * x
        for j in range(len(w)):
            x = x + w[j] * hist[j]
    return x, g.N


IPNDM_COEFFICIENTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def ipndm(denoiser, x: torch.Tensor, times, network_times=None, order: int = 4):
    """iPNDM: x_bar_{i+1} = x_bar_i + (sigma_bar_{i+1} - sigma_bar_i) sum_j b_j d_{i-j}."""
    _check_order(order, 4, "iPNDM")
    g = _Grid(denoiser, x, times, network_times)
    sb = g.sigma / g.alpha
    dt = g.cast(sb[1:] - sb[:-1])
    inv_sb = g.cast(1.0 / sb[:-1])
    alpha = g.cast(g.alpha)
    t, tn = g.times, g.network_times
    xb = x * (1.0 / g.alpha[0].to(x.dtype))
    ds = []
    for i in range(g.N):
        ds.insert(0, (xb - denoiser(alpha[i] * xb, t[i], tn[i])) * inv_sb[i])
        del ds[order:]
        coef = IPNDM_COEFFICIENTS[len(ds) - 1]
        step = coef[0] * ds[0]
        for j in range(1, len(ds)):
            step = step + coef[j] * ds[j]
        xb = xb + dt[i] * step
    return alpha[g.N] * xb, g.N


def _unipc_weights(g: _Grid, s: int, past: int, with_new: bool, variant: str) -> list[torch.Tensor]:
    """UniPC weights for the step s -> s+1 on (m_s, m_{s-1}, ..., m_{s-past}) and, with
    ``with_new`` (the corrector), on m_{s+1} first. Returns [w_new?, w_s, w_{s-1}, ...]."""
    h = g.h[s]
    alpha = g.alpha[s + 1]
    B = h if variant == "bh1" else -torch.expm1(-h)  # data prediction: B1 = h, B2 = 1 - e^{-h}
    # differences D_k = m_k - m_s at relative positions r_k = (lambda_k - lambda_s) / h
    rs = [(g.lam[s - k] - g.lam[s]) / h for k in range(1, past + 1)]
    if with_new:
        rs = rs + [torch.ones_like(h)]
    K = len(rs)
    w_s = alpha * g.one_minus_exp[s]
    if K == 0:
        return [w_s]
    if K == 1:
        a = [torch.full_like(h, 0.5)]  # UniPC's choice for one difference
    else:
        R = torch.stack([torch.stack([r ** (k - 1) for r in rs]) for k in range(1, K + 1)])
        rhs = torch.stack([math.factorial(k) * h * _phi(h, k + 1) / B for k in range(1, K + 1)])
        a = list(torch.linalg.solve(R, rhs).unbind(0))
    # update term alpha B sum_k a_k D_k / r_k
    coef = [alpha * B * a_k / r_k for a_k, r_k in zip(a, rs)]
    w_past = coef[:past]
    w_s = w_s - sum(coef)
    return ([coef[-1]] if with_new else []) + [w_s] + w_past


def unipc(denoiser, x: torch.Tensor, times, network_times=None, order: int = 2, variant: str = "bh2"):
    """UniPC: UniP-``order`` predictor + UniC corrector (reusing the next model output; none after
    the last step). Lower orders while history builds up; first order onto sigma = 0."""
    _check_order(order, 3, "UniPC")
    check_choice("UniPC variant", variant, ("bh1", "bh2"))
    g = _Grid(denoiser, x, times, network_times)
    pred, corr, orders = [], [], []
    for i in range(g.N):
        p = 1 if (g.final_zero and i == g.N - 1) else min(order, i + 1)
        orders.append(p)
        pred.append(g.cast(torch.stack(_unipc_weights(g, i, p - 1, False, variant))))
        corr.append(g.cast(torch.stack(_unipc_weights(g, i, p - 1, True, variant))) if i < g.N - 1 else None)
    a = g.cast(g.ratio)
    t, tn = g.times, g.network_times
    hist, x_base = [], x
    for i in range(g.N):
        m = denoiser(x, t[i], tn[i])
        if i > 0:  # UniC: correct x_i with the new output, from the base state of step i-1
            w = corr[i - 1]
            x = a[i - 1] * x_base + w[0] * m
            for j in range(1, len(w)):
                x = x + w[j] * hist[j - 1]
        hist.insert(0, m)
        del hist[order:]
        w = pred[i]
        x_base = x
        x = a[i] * x
        for j in range(len(w)):
            x = x + w[j] * hist[j]
    return x, g.N


SAMPLERS = {
    "euler": euler,
    "ddim": ddim,
    "heun": heun,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
    "dpm_solver_pp_3m": dpm_solver_pp_3m,
    "ipndm": ipndm,
    "unipc": unipc,
    "unipc_bh1": lambda d, x, t, nt=None, order=2: unipc(d, x, t, nt, order=order, variant="bh1"),
}


def get_sampler(name: str):
    """The sampler function called ``name`` (see ``SAMPLERS``)."""
    check_choice("sampler", name, SAMPLERS)
    return SAMPLERS[name]


def solve(denoiser, x_T: torch.Tensor, times, sampler="dpm_solver_pp_2m", network_times=None,
          batch_size: int | None = None, **sampler_kw):
    """"Solve x_T with sampler S on grid T, in batches": (x_0, nfe). ``sampler`` is a name in
    ``SAMPLERS`` or a sampler function; ``batch_size`` (None: all at once) bounds memory, the result
    is the same as one call. Gradients flow as the caller's grad mode says (LD3 trains through it;
    wrap in ``torch.no_grad()`` to sample)."""
    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1 (or None for one batch)")
    if batch_size is None or len(x_T) <= batch_size:
        return fn(denoiser, x_T, times, network_times, **sampler_kw)
    outs, nfe = [], 0
    for i in range(0, len(x_T), batch_size):
        out, nfe = fn(denoiser, x_T[i:i + batch_size], times, network_times, **sampler_kw)
        outs.append(out)
    return torch.cat(outs), nfe


def nfe_for_steps(name: str, steps: int, final_zero: bool = False) -> int:
    """NFE of ``steps`` steps of sampler ``name`` (Heun: 2 per step, one fewer onto sigma = 0)."""
    check_choice("sampler", name, SAMPLERS)
    if name == "heun":
        return 2 * steps - (1 if final_zero else 0)
    return steps
