from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib import ld3, studies
from fedlib.diffusion import EDM, SCHEDULES, VP, Denoiser, MLPDenoiser, get_sampler, schedule, solve

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
    s = ld3.load_or_learn(den, 3, tr, va, solver="dpm_solver_pp_2m", model_name="gauss", rounds_theta=2, rounds_both=2,
                          lr=5e-2)
    assert s.history["best_val_loss"] < 0.8 * s.history["start_val_loss"]
    assert not s.history["cached"]
    again = ld3.load_or_learn(den, 3, tr, va, solver="dpm_solver_pp_2m", model_name="gauss")
    assert again.history["cached"] and again.times == s.times and again.network_times == s.network_times
    out, nfe = again.sample(den, va[0])
    assert nfe == 3
    ref, _ = get_sampler("dpm_solver_pp_2m")(den, va[0], schedule("uniform_lambda", den.process, 3))
    assert ((out - va[1]) ** 2).mean() < ((ref - va[1]) ** 2).mean()


def test_lpips_raises_a_clear_error_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not download"):
        ld3.make_loss("lpips")


# --- the hand-made start, the inverse map and the validated quantity (issue 17) ------------------------

increasing = st.lists(st.floats(1e-3, 1.0, allow_nan=False), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(increasing)
def test_inverse_map_round_trips_exactly(gaps):
    d = torch.tensor(gaps, dtype=torch.float64)
    u = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(d, 0) / d.sum()])
    u[-1] = 1.0
    theta = ld3.ld3_theta(u)
    assert theta.shape == u.shape and float(theta[0]) == 0.0
    torch.testing.assert_close(ld3.ld3_u(theta), u, rtol=0, atol=1e-14)
    # theta_0 drops out and theta_{1:} is defined up to a constant: any such logits give the same grid
    torch.testing.assert_close(ld3.ld3_u(theta + torch.cat([torch.tensor([5.0]), torch.full((len(u) - 1,), -2.0)])
                                         .double()), u, rtol=0, atol=1e-14)


@pytest.mark.parametrize("process", [EDM(), VP("linear", discrete=False), VP("cosine")], ids=["edm", "vp", "vp-discrete"])
@pytest.mark.parametrize("name", ["uniform_t", "quadratic_t", "uniform_lambda", "edm"])
@pytest.mark.parametrize("space", ["lambda", "t"])
def test_every_hand_made_grid_is_exactly_reachable_in_ld3s_logits(process, name, space):
    for n in (2, 4, 7, 10):
        t = schedule(name, process, n)
        back = ld3.ld3_times(ld3.theta_of_times(t, process, space), process, space)
        assert float(back[0]) == process.t_max and float(back[-1]) == process.t_min
        torch.testing.assert_close(back, t, rtol=1e-10, atol=0)


def test_inverse_map_refuses_a_grid_that_is_not_increasing():
    with pytest.raises(ValueError, match="strictly increasing"):
        ld3.ld3_theta(torch.tensor([0.0, 0.5, 0.5, 1.0]))


def _val_loss(den, solver, times, tn, pairs):
    out, _ = solve(den, pairs[0], times, solver, tn)
    return float(((out - pairs[1]) ** 2).flatten(1).mean(1).mean())


@pytest.mark.parametrize("solver,nfe", [("dpm_solver_pp_2m", 3), ("ipndm", 4), ("euler", 5)])
def test_learned_is_never_worse_on_validation_than_the_best_hand_made_grid(solver, nfe):
    den = _gaussian_denoiser()
    tr = ld3.teacher_pairs(den, 8, (4,), seed=0)
    va = ld3.teacher_pairs(den, 8, (4,), seed=1)
    # a learning rate large enough to throw theta about: the result must still be no worse than the start
    for lr in (5e-3, 0.5):
        s = ld3.learned_timesteps(den, nfe, tr, va, solver=solver, rounds_theta=1, rounds_both=1, lr=lr, seed=0)
        hand = {name: _val_loss(den, solver, schedule(name, den.process, nfe), None, va) for name in SCHEDULES}
        best = min(hand, key=hand.get)
        assert s.history["start"] == best
        # by construction, exactly: the start and every learned state are validated through the same solve
        assert s.history["best_val_loss"] <= min(s.history["hand_made_val_loss"].values())
        for name, v in hand.items():  # the validation quantity is the plain mean loss of each grid's solve
            assert abs(s.history["hand_made_val_loss"][name] - v) <= 1e-6 * v
        got = _val_loss(den, solver, *s.tensors(), va)  # float32 samples: equal to 1e-6
        assert got <= hand[best] * (1 + 1e-6) and abs(got - s.history["best_val_loss"]) <= 1e-6 * got
        if s.history["kept"] == "start":  # nothing better found: exactly the best hand-made grid, phi = 0
            torch.testing.assert_close(torch.tensor(s.times, dtype=torch.float64), schedule(best, den.process, nfe), rtol=1e-10, atol=0)
            assert s.network_times == s.times


def test_a_named_start_and_the_significance_check():
    den = _gaussian_denoiser()
    tr = ld3.teacher_pairs(den, 8, (4,), seed=0)
    va = ld3.teacher_pairs(den, 8, (4,), seed=1)
    s = ld3.learned_timesteps(den, 3, tr, va, solver="dpm_solver_pp_2m", rounds_theta=1, rounds_both=0, start="uniform_t",
                              lr=5e-2)
    assert s.history["start"] == "uniform_t" and list(s.history["hand_made_val_loss"]) == ["uniform_t"]
    assert s.history["kept"] == "learned" and s.history["best_val_loss"] < s.history["start_val_loss"]
    strict = ld3.learned_timesteps(den, 3, tr, va, solver="dpm_solver_pp_2m", rounds_theta=1, rounds_both=0,
                                   start="uniform_t", lr=5e-2, significance=1e9)
    assert strict.history["kept"] == "start" and not strict.history["significant"]
    torch.testing.assert_close(torch.tensor(strict.times, dtype=torch.float64), schedule("uniform_t", den.process, 3), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="LD3 start"):
        ld3.learned_timesteps(den, 3, tr, va, solver="euler", start="karras")


def test_held_out_study_reports_the_validated_quantity_on_noise_ld3_never_saw(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    den = _gaussian_denoiser()
    case = SimpleNamespace(dataset="gauss", teacher=den, shape=(4,), loss="l2", feature_fn=None, n_eval=32,
                           model_name="gauss", metric=lambda x: float(x.mean().abs()))
    cfg = ld3.LD3Config(rounds_theta=1, rounds_both=1, lr=5e-2)
    res = ld3.held_out_study(case, ["dpm_solver_pp_2m"], [3], [0, 1, 2], config=cfg, n_train=8, n_val=8)
    assert len(res.rows) == 3 * (len(SCHEDULES) + 1) and len(res.learned) == 3
    for seed in (0, 1, 2):
        ev = ld3.teacher_pairs(den, 32, (4,), seed=1000 * seed + 300)
        tr = ld3.teacher_pairs(den, 8, (4,), seed=1000 * seed + 100)
        assert not any(torch.equal(a, b) for a in ev[0] for b in tr[0])  # held-out noise, never a training pair
        s = res.learned[(seed, "dpm_solver_pp_2m", 3)]
        for r in (r for r in res.rows if r["seed"] == seed):
            times, tn = s.tensors() if r["grid"] == "ld3" else (schedule(r["grid"], den.process, 3), None)
            assert abs(r["teacher_distance"] - _val_loss(den, "dpm_solver_pp_2m", times, tn, ev)) < 1e-7
    verdict, deciding, comps = studies.beats_every_grid(res.rows, "gauss", ["dpm_solver_pp_2m"], [3], SCHEDULES, [0, 1, 2])
    assert len(comps) == len(SCHEDULES) and deciding in comps and verdict in ("holds", "within noise", "does not hold")
    table = studies.summary_table(res.rows, ["gauss"], ["dpm_solver_pp_2m"], [3], SCHEDULES, [0, 1, 2], {"gauss": "m"})
    assert table.loc[0, "teacher distance: LD3 beats every grid"] == verdict
    assert len(studies.relative_gain(res.rows, "gauss", "dpm_solver_pp_2m", 3, SCHEDULES, [0, 1, 2])) == 3
    again = ld3.held_out_study(case, ["dpm_solver_pp_2m"], [3], [0], config=cfg, n_train=8, n_val=8)
    assert again.learned[(0, "dpm_solver_pp_2m", 3)].history["cached"]


def test_beats_every_grid_follows_the_noise_rule():
    rows = [{"dataset": "d", "seed": s, "solver": "x", "nfe": 4, "grid": g, "teacher_distance": v, "metric": v}
            for s in range(3) for g, v in (("a", 1.0 + 0.01 * s), ("b", 2.0), ("ld3", 0.5 + 0.02 * s))]
    assert studies.beats_every_grid(rows, "d", ["x"], [4], ["a", "b"], [0, 1, 2])[:2] == ("holds", "x NFE 4 vs a")
    worse = [dict(r, teacher_distance=1.5 + 0.01 * r["seed"]) if r["grid"] == "ld3" else r for r in rows]
    assert studies.beats_every_grid(worse, "d", ["x"], [4], ["a", "b"], [0, 1, 2])[0] == "does not hold"


def test_ld3_cases_for_a_mixture_and_a_pooled_cheap_image_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    from fedlib.studies import ld3_case, pooled

    ring = ld3_case("ring", teacher_steps=5, n_eval=64)
    assert ring.shape == (2,) and ring.loss == "l2" and ring.feature_fn is None and ring.metric_name == "sliced W2"
    assert ring.metric(torch.randn(64, 2)) > 0
    img = ld3_case("digits", teacher_steps=5, feature_steps=5, n_eval=8, image_size=4, teacher="small")
    assert img.shape == (1, 4, 4) and img.info["image_side"] == 4 and img.teacher.net.channels == 8
    assert img.feature_fn(torch.zeros(2, 1, 4, 4)).shape[0] == 2 and img.metric(torch.rand(16, 1, 4, 4) * 2 - 1) >= 0
    from fedlib.data import load_digits

    ds = load_digits("test")
    small = pooled(ds, 4)
    torch.testing.assert_close(small.x[:, :, 0, 0], ds.x[:, :, :2, :2].mean((-1, -2)))
    assert pooled(ds, 8) is ds


class _EpsNet(torch.nn.Module):
    """A network whose output depends on its input and its time input (so that any time it is given shows)."""

    def forward(self, x, t_net, return_features=False):
        return torch.tanh(x) * (1 + 0.1 * t_net.view(-1, *[1] * (x.ndim - 1)))


@pytest.mark.parametrize("process,prediction", [(VP("linear"), "eps"), (VP("cosine"), "v"), (EDM(), "edm")])
def test_the_shifted_network_time_moves_the_whole_data_prediction(process, prediction):
    """LD3 evaluates x_theta(x_{t_i}, s'_i) entirely at the shifted time s'_i: c_in, c_noise and
    the eps/v/F -> x0 conversion (the old code moved only c_noise). ``time_shift="c_noise"`` keeps the old."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.5 if isinstance(process, VP) else 2.0, dtype=torch.float64)
    s = t * 0.8  # the shifted network time
    den = Denoiser(_EpsNet(), process, prediction)
    torch.testing.assert_close(den(x, t, s), den(x, s))
    assert not torch.allclose(den(x, t, s), den(x, t))
    old = Denoiser(_EpsNet(), process, prediction, time_shift="c_noise")
    torch.testing.assert_close(old(x, t, s), old.to_x0(old.raw(x, t, s), x, t))
    assert not torch.allclose(old(x, t, s), den(x, t, s))
    # a sampler's step reads the whole prediction at the network time, its coefficients at the solver time
    times = torch.tensor([float(t), float(t) * 0.5], dtype=torch.float64)
    tn = torch.tensor([float(s), float(t) * 0.5], dtype=torch.float64)
    out, _ = get_sampler("euler")(den, x, times, tn)
    alpha, sigma = process.alpha(times), process.sigma(times)
    h = process.lambda_(times[1]) - process.lambda_(times[0])
    expected = (sigma[1] / sigma[0]) * x + alpha[1] * (-torch.expm1(-h)) * den(x, s)
    torch.testing.assert_close(out, expected.to(x.dtype))
    with pytest.raises(ValueError, match="time_shift"):
        Denoiser(_EpsNet(), process, prediction, time_shift="t")


def test_a_plateau_reloads_the_best_state():
    """After `patience` steps without a better validation loss LD3 decays the learning rates
    and resumes from the best state so far (the old code kept the stale state)."""
    den = _gaussian_denoiser()
    tr = ld3.teacher_pairs(den, 8, (4,), seed=0)
    va = ld3.teacher_pairs(den, 8, (4,), seed=1)
    seen = []
    # a learning rate large enough to make most steps worse: plateaus come quickly
    s = ld3.learned_timesteps(den, 3, tr, va, solver="dpm_solver_pp_2m", rounds_theta=2, rounds_both=2, lr=0.5,
                              patience=2, start="uniform_lambda", callback=seen.append)
    assert seen[0]["step"] == 0 and s.history["reloads"] >= 1
    best_v, best_theta, best_phi = float("inf"), None, None
    reloads = 0
    for info in seen:
        if info["val_loss"] < best_v:
            best_v, best_theta, best_phi = info["val_loss"], info["theta"], info["phi"]
        if info["reloaded"]:
            reloads += 1
            torch.testing.assert_close(info["theta_next"], best_theta, rtol=0, atol=0)
            torch.testing.assert_close(info["phi_next"], best_phi, rtol=0, atol=0)
        else:
            torch.testing.assert_close(info["theta_next"], info["theta"], rtol=0, atol=0)
    assert reloads == s.history["reloads"]
    off = ld3.learned_timesteps(den, 3, tr, va, solver="dpm_solver_pp_2m", rounds_theta=2, rounds_both=2, lr=0.5,
                                patience=2, start="uniform_lambda", reload_best=False)
    assert off.history["reloads"] == 0


def test_a_schedule_learned_under_the_other_time_convention_is_learned_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    den = _gaussian_denoiser()
    tr = ld3.teacher_pairs(den, 4, (4,), seed=0)
    va = ld3.teacher_pairs(den, 4, (4,), seed=1)
    kw = dict(model_name="conv", rounds_theta=1, rounds_both=0)
    s = ld3.load_or_learn(den, 3, tr, va, solver="euler", **kw)
    assert s.history["time_shift"] == "prediction" and ld3.learned_under(s, den)
    assert ld3.load_or_learn(den, 3, tr, va, solver="euler", **kw).history["cached"]
    s.history["time_shift"] = "c_noise"
    s.save(ld3.schedule_path("conv", "euler", 3))
    assert not ld3.load_or_learn(den, 3, tr, va, solver="euler", **kw).history["cached"]


# --- one validated config for LD3's settings ----------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("solver", "heun", "'euler'"), ("start", "karras", "'best'"), ("space", "sigma", "'lambda', 't'"),
    ("rounds_theta", -1, ">= 0"), ("rounds_both", 1.5, "an integer"), ("batch", 0, ">= 1"), ("lr", 0.0, "> 0"),
    ("lr", float("nan"), "> 0"), ("lr_phi", -1.0, "> 0"), ("momentum", 1.0, "< 1"), ("decay", 1.5, "<= 1"),
    ("validate_every", 0, ">= 1"), ("patience", 0, ">= 1"), ("clip", 0, "> 0"), ("significance", -1.0, ">= 0")])
def test_ld3_config_refuses_a_bad_value_naming_it_and_what_is_allowed(field, value, allowed):
    import re

    with pytest.raises(ValueError, match=re.escape(repr(value)) + ".*" + re.escape(allowed)):
        ld3.LD3Config(**{field: value})


def test_the_ld3_solver_is_checked_in_one_place_only():
    import inspect
    import pathlib

    import fedlib

    root = pathlib.Path(fedlib.__file__).parent
    hits = [p for p in root.rglob("*.py") if 'check_choice("LD3 solver"' in p.read_text()]
    assert hits == [root / "ld3.py"] and inspect.getsource(ld3.LD3Config).count('"LD3 solver"') == 1
    assert inspect.getsource(ld3).count('"LD3 solver"') == 1


def test_learned_timesteps_refuses_an_unknown_setting_and_a_config_with_settings():
    den = _gaussian_denoiser()
    tr = ld3.teacher_pairs(den, 4, (4,), seed=0)
    with pytest.raises(ValueError, match="lr_theta.*allowed: solver"):
        ld3.learned_timesteps(den, 3, tr, tr, lr_theta=0.1)
    with pytest.raises(ValueError, match="LD3Config and the settings"):
        ld3.learned_timesteps(den, 3, tr, tr, ld3.LD3Config(), lr=0.1)
    with pytest.raises(ValueError, match="unknown LD3 solver 'heun'"):
        ld3.held_out_study(None, ["heun"], [3], [0])
