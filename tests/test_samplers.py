"""Samplers against the exact probability-flow ODE of Gaussian data.

For x_0 ~ N(mu, diag(s^2)) the denoiser is D(x, t) = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x - alpha mu)
and the ODE maps x_T to x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z, z fixed by x_T.
"""

import math

import numpy as np
import pytest
import torch

from fedlib.diffusion import EDM, SAMPLERS, VP, get_sampler, nfe_for_steps, schedule

MU = torch.tensor([0.5, -0.3, 0.1, 0.2], dtype=torch.float64)
S = torch.tensor([0.5, 0.2, 1.0, 0.5], dtype=torch.float64)


class GaussianDenoiser:
    def __init__(self, process):
        self.process, self.calls = process, 0

    def __call__(self, x, t, t_net=None):
        self.calls += 1
        a, s = self.process.alpha(t), self.process.sigma(t)
        return MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)


def exact_solution(process, x_T, t_T, t_0):
    t_T, t_0 = torch.tensor(t_T, dtype=torch.float64), torch.tensor(t_0, dtype=torch.float64)
    a_T, s_T, a_0, s_0 = process.alpha(t_T), process.sigma(t_T), process.alpha(t_0), process.sigma(t_0)
    z = (x_T - a_T * MU) / torch.sqrt(a_T**2 * S**2 + s_T**2)
    return a_0 * MU + torch.sqrt(a_0**2 * S**2 + s_0**2) * z


def _slope(process, name, grid, t_max, t_min, steps, **kw):
    den = GaussianDenoiser(process)
    x_T = process.sigma(torch.tensor(t_max, dtype=torch.float64)) * torch.randn(
        32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact_solution(process, x_T, t_max, t_min)
    fn = get_sampler(name)
    errs = []
    for n in steps:
        out, _ = fn(den, x_T, schedule(grid, process, n, t_max=t_max, t_min=t_min), **kw)
        errs.append(float((out - ref).abs().max()))
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


# (sampler, kwargs, grid, theoretical order). Multistep methods start with lower orders; from a
# high-noise start (sigma_bar 80) that warm-up error is negligible in this range of steps.
CASES = [
    ("euler", {}, "uniform_lambda", 1),
    ("heun", {}, "uniform_lambda", 2),
    ("dpm_solver_pp_2m", {}, "uniform_lambda", 2),
    ("dpm_solver_pp_3m", {}, "uniform_lambda", 3),
    ("unipc", {"order": 1}, "uniform_lambda", 2),  # UniP-1 + UniC
    ("unipc", {"order": 2}, "uniform_lambda", 3),  # UniP-2 + UniC
    ("unipc_bh1", {}, "uniform_lambda", 3),
]


@pytest.mark.parametrize("process", [EDM(), VP("linear", discrete=False)], ids=["edm", "vp"])
@pytest.mark.parametrize("name,kw,grid,order", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_error_shrinks_at_the_theoretical_order(process, name, kw, grid, order):
    slope, errs = _slope(process, name, grid, process.t_max, process.t_min, [20, 40, 80, 160], **kw)
    assert slope > order - 0.25, (slope, errs)
    assert errs[-1] < 0.1 and errs[-1] < errs[0]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_order_on_equal_steps_in_sigma_bar(order):
    # iPNDM's fixed Adams-Bashforth weights assume equal steps in sigma_bar (uniform_t for EDM);
    # the Euler warm-up bounds the asymptotic order by 2, so the range starts at sigma_bar = 5
    slope, errs = _slope(EDM(), "ipndm", "uniform_t", 5.0, 0.05, [40, 80, 160], order=order)
    assert slope > order - 0.4, (slope, errs)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
@pytest.mark.parametrize("final_zero", [False, True])
def test_nfe_is_exact(name, steps, final_zero):
    p = EDM()
    times = schedule("edm", p, steps)
    if final_zero:
        times = torch.cat([times[:-1], torch.zeros(1, dtype=times.dtype)])
    den = GaussianDenoiser(p)
    out, nfe = get_sampler(name)(den, torch.randn(3, 4, dtype=torch.float64) * 80, times)
    assert nfe == den.calls == nfe_for_steps(name, steps, final_zero)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc"])
def test_final_zero_sigma_is_a_denoising_step(name):
    # onto sigma = 0 the sample is D(x) of the previous state; with a Gaussian the result must be
    # close to the exact solution at t = 0
    p = EDM()
    times = torch.cat([schedule("uniform_lambda", p, 60), torch.zeros(1, dtype=torch.float64)])
    x_T = 80 * torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, _ = get_sampler(name)(GaussianDenoiser(p), x_T, times)
    assert (out - exact_solution(p, x_T, 80.0, 0.0)).abs().max() < (0.1 if name == "euler" else 2e-2)


@pytest.mark.parametrize("bad", [[80.0, 1.0, 1.0, 0.002], [0.002, 1.0, 80.0], [80.0, 5.0, 10.0, 0.01]])
def test_times_must_be_strictly_decreasing(bad):
    with pytest.raises(ValueError, match="strictly decreasing"):
        get_sampler("dpm_solver_pp_2m")(GaussianDenoiser(EDM()), torch.randn(2, 4), torch.tensor(bad))


def test_network_times_shape_is_checked():
    with pytest.raises(ValueError, match="network_times"):
        get_sampler("euler")(GaussianDenoiser(EDM()), torch.randn(2, 4), torch.tensor([80.0, 1.0, 0.01]),
                             torch.tensor([80.0, 0.01]))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("which", ["times", "network_times"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5])
@pytest.mark.parametrize("pos", [0, 2, 4])
def test_non_finite_or_negative_times_are_refused_before_any_evaluation(name, which, value, pos):
    p = EDM()
    times = schedule("edm", p, 4)
    tn = times.clone()
    (times if which == "times" else tn)[pos] = value
    den = GaussianDenoiser(p)
    with pytest.raises(ValueError) as info:
        get_sampler(name)(den, torch.randn(2, 4, dtype=torch.float64), times, tn)
    msg = str(info.value)
    assert f"{which}[{pos}]={value!r}" in msg and "allowed: finite times >= 0" in msg
    assert den.calls == 0


def test_a_final_time_of_zero_is_still_allowed_and_detected():
    from fedlib.diffusion.samplers import check_grid

    t = torch.tensor([80.0, 1.0, 0.0])
    assert check_grid(t)[2] is True and check_grid(t[:2])[2] is False
    assert check_grid(t[2:], min_points=1)[2] is True


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc"])
def test_differentiable_with_respect_to_times(name):
    p = EDM()
    times = schedule("edm", p, 5).clone().requires_grad_(True)
    tn = times.detach().clone().requires_grad_(True)

    class NetTimeDenoiser(GaussianDenoiser):  # depends on t_net so network_times gets a gradient
        def __call__(self, x, t, t_net=None):
            return super().__call__(x, t) * (1 + 0.01 * torch.log(t_net))

    out, _ = get_sampler(name)(NetTimeDenoiser(p), 80 * torch.randn(4, 4, dtype=torch.float64), times, tn)
    out.square().sum().backward()
    assert torch.isfinite(times.grad).all() and times.grad[1:-1].abs().sum() > 0
    assert torch.isfinite(tn.grad).all() and tn.grad[1:-1].abs().sum() > 0


def test_euler_is_ddim_and_matches_the_ddim_update():
    p = VP("linear", discrete=True)
    times = schedule("uniform_t", p, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    den = GaussianDenoiser(p)
    out, _ = get_sampler("ddim")(den, x, times)
    y = x.clone()
    for i in range(4):  # x' = alpha' D + sigma' eps_hat
        a, s, a2, s2 = p.alpha(times[i]), p.sigma(times[i]), p.alpha(times[i + 1]), p.sigma(times[i + 1])
        d = den(y, times[i])
        y = a2 * d + s2 * (y - a * d) / s
    torch.testing.assert_close(out, y)
    assert math.isclose(float(times[0]), 1.0) and math.isclose(float(times[-1]), 1e-3)


def test_solve_in_batches_equals_one_call_and_takes_names_or_functions():
    from fedlib.diffusion import EDM, solve
    from fedlib.diffusion.samplers import dpm_solver_pp_2m

    class Exact:  # the exact denoiser of N(0, I) data under EDM: D(x, sigma) = x / (1 + sigma^2)
        process = EDM()

        def __call__(self, x, t, t_net=None):
            return x / (1 + torch.as_tensor(t, dtype=x.dtype) ** 2)

    x_T = 80 * torch.randn(37, 3, generator=torch.Generator().manual_seed(0))
    times = schedule("edm", Exact.process, 6)
    whole, nfe = solve(Exact(), x_T, times, "dpm_solver_pp_2m")
    parts, nfe2 = solve(Exact(), x_T, times, dpm_solver_pp_2m, batch_size=10)
    assert nfe == nfe2 == 6 and torch.allclose(whole, parts, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size=0"):
        solve(Exact(), x_T, times, batch_size=0)


def test_karras_sigmas_is_the_edm_grid_everywhere():
    from fedlib import dmd2
    from fedlib.diffusion import EDM, karras_sigmas

    p = EDM()
    u = torch.linspace(0, 1, 9, dtype=torch.float64)
    s = karras_sigmas(u, p.t_min, p.t_max)
    assert s[0] == pytest.approx(p.t_max) and s[-1] == pytest.approx(p.t_min) and (s[1:] < s[:-1]).all()
    assert torch.allclose(schedule("edm", p, 8), s)
    assert torch.allclose(dmd2.t_from_noise_fraction(p, 1 - u), s)


@pytest.mark.parametrize("t_max,t_min", [(math.nan, 0.002), (80.0, math.nan), (math.inf, 0.002), (80.0, -0.1),
                                         (1.0, 2.0)])
def test_schedule_refuses_a_range_it_cannot_span(t_max, t_min):
    with pytest.raises(ValueError) as info:
        schedule("edm", EDM(), 5, t_max=t_max, t_min=t_min)
    assert f"t_max={t_max!r}, t_min={t_min!r}" in str(info.value) and "0 <= t_min < t_max" in str(info.value)
