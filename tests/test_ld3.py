import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib import ld3
from fedlib.diffusion import EDM, VP, Denoiser, MLPDenoiser, get_sampler, schedule

logits = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=200, deadline=None)
@given(logits)
def test_parameterisation_is_monotone_and_hits_both_end_points(theta):
    theta = torch.tensor(theta, dtype=torch.float64)
    u = ld3.ld3_u(theta)
    assert float(u[0]) == 0.0 and float(u[-1]) == 1.0
    assert (u[1:] >= u[:-1]).all()
    for p in (EDM(), VP("linear")):
        t = ld3.ld3_times(theta, p)
        assert float(t[0]) == p.t_max and float(t[-1]) == p.t_min
        assert (t[1:] <= t[:-1]).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=12))
def test_moderate_logits_give_strictly_decreasing_times(theta):
    t = ld3.ld3_times(torch.tensor(theta, dtype=torch.float64), EDM())
    assert (t[1:] < t[:-1]).all()


def test_initial_logits_are_uniform_in_log_snr_and_t_space_is_uniform_in_t():
    p = EDM()
    torch.testing.assert_close(ld3.ld3_times(torch.ones(6), p), schedule("uniform_lambda", p, 5))
    torch.testing.assert_close(ld3.ld3_times(torch.ones(6), p, space="t"), schedule("uniform_t", p, 5))


@settings(max_examples=100, deadline=None)
@given(logits, st.lists(st.floats(-50, 50, allow_nan=False), min_size=12, max_size=12))
def test_network_shift_keeps_end_points_and_stays_within_half_the_smallest_gap(theta, phi):
    theta = torch.tensor(theta, dtype=torch.float64)
    phi = torch.tensor(phi[: len(theta)], dtype=torch.float64)
    p = EDM()
    v = ld3.ld3_grid(theta, p)
    tn = ld3.network_times(theta, phi, p)
    t = ld3.ld3_times(theta, p)
    assert float(tn[0]) == float(t[0]) and float(tn[-1]) == float(t[-1])
    gap = (v[1:] - v[:-1]).abs().min()
    assert ((p.lambda_(tn[1:-1]) - v[1:-1]).abs() <= 0.5 * gap + 1e-9).all()


class _Shrink(torch.nn.Module):
    """A 2-D toy 'network' whose ideal denoiser is known: data N(0.3, 0.2^2)."""

    def forward(self, x, t_net, return_features=False):
        return torch.zeros_like(x)


def _gaussian_denoiser():
    class GD(Denoiser):
        def forward(self, x, t, t_net=None, params=None):
            s = self.process.sigma(torch.as_tensor(t)).to(x.dtype)
            s_net = self.process.sigma(torch.as_tensor(t if t_net is None else t_net)).to(x.dtype)
            # depends on the network time a little, like a real network would
            return 0.3 + 0.04 / (0.04 + s**2) * (x - 0.3) * (1 + 0.01 * torch.log(s_net / s))
    return GD(_Shrink(), EDM(), "edm")


def test_learned_timesteps_beats_its_uniform_start_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    den = _gaussian_denoiser()
    tr = ld3.teacher_pairs(den, 16, (4,), seed=0)
    va = ld3.teacher_pairs(den, 16, (4,), seed=1)
    s = ld3.load_or_learn(den, "dpm_solver_pp_2m", 3, tr, va, model_name="gauss", rounds_theta=2, rounds_both=2,
                          lr_theta=5e-2)
    assert s.history["best_val_loss"] < 0.8 * s.history["start_val_loss"]
    assert not s.history["cached"]
    again = ld3.load_or_learn(den, "dpm_solver_pp_2m", 3, tr, va, model_name="gauss")
    assert again.history["cached"] and again.times == s.times and again.network_times == s.network_times
    out, nfe = again.sample(den, va[0])
    assert nfe == 3
    ref, _ = get_sampler("dpm_solver_pp_2m")(den, va[0], schedule("uniform_lambda", den.process, 3))
    assert ((out - va[1]) ** 2).mean() < ((ref - va[1]) ** 2).mean()


def test_lpips_raises_a_clear_error_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    import pytest

    with pytest.raises(FileNotFoundError, match="does not download"):
        ld3.make_loss("lpips")
