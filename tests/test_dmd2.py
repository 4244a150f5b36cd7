"""DMD2 (fedlib.dmd2): loss gradients, time range, TTUR, backward simulation, divergence guard.

Stand-in denoisers: tiny networks inside the real Denoiser wrapper whose x0 estimate is known in
closed form, so every property is checked against an exact answer.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from fedlib import dmd2
from fedlib.diffusion.denoiser import Denoiser
from fedlib.diffusion.process import EDM, VP


class Affine(nn.Module):
    """x0-prediction net out = a x + b (+ features = x): D(x_t, t) = a x_t + b."""

    def __init__(self, a=1.0, b=0.0, dim=2):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.full((dim,), float(b)))
        self.feature_channels = dim

    def forward(self, x, t_net, return_features=False):
        b = self.b.view(1, -1, *([1] * (x.ndim - 2)))
        out = self.a * x + b
        return (out, x.flatten(1)[:, : self.feature_channels]) if return_features else out


class Constant(nn.Module):
    """Ignores its input: D = c (a generator whose samples are known exactly)."""

    def __init__(self, c, dim=2):
        super().__init__()
        self.c = nn.Parameter(torch.full((dim,), float(c)))
        self.feature_channels = dim

    def forward(self, x, t_net, return_features=False):
        out = self.c.expand(x.shape[0], -1) + 0 * x
        return (out, out) if return_features else out


def _den(net, process=None):
    return Denoiser(net, process or VP("linear"), prediction="x0")


shapes = st.sampled_from([(5, 2), (3, 1, 4, 4), (1, 3)])


@settings(max_examples=15, deadline=None)
@given(shape=shapes, a_real=st.floats(-2, 2), a_fake=st.floats(-2, 2), b_fake=st.floats(-1, 1),
       seed=st.integers(0, 10_000))
def test_generator_gradient_is_normalised_score_difference(shape, a_real, a_fake, b_fake, seed):
    dim = shape[1]
    g = torch.Generator().manual_seed(seed)
    teacher, fake = _den(Affine(a_real, 0.0, dim)), _den(Affine(a_fake, b_fake, dim))
    x = torch.randn(shape, generator=g, requires_grad=True)
    eps = torch.randn(shape, generator=g)
    t = dmd2.sample_dm_times(teacher.process, shape[0], generator=g)
    loss, direction, w = dmd2.distribution_matching_loss(x, teacher, fake, t, eps, reduction="sum",
                                                         return_direction=True)
    (grad,) = torch.autograd.grad(loss, x)
    # closed form: x_t = alpha x + sigma eps; x_real = a_real x_t; x_fake = a_fake x_t + b
    alpha = teacher.process.alpha(t).view(-1, *[1] * (x.ndim - 1))
    sigma = teacher.process.sigma(t).view(-1, *[1] * (x.ndim - 1))
    x_t = alpha * x.detach() + sigma * eps
    x_real = a_real * x_t
    x_fake = a_fake * x_t + b_fake
    w_exact = (x.detach() - x_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    g_exact = (x_fake - x_real) / w_exact.view(-1, *[1] * (x.ndim - 1))
    torch.testing.assert_close(w, w_exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, g_exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(direction, g_exact, rtol=1e-4, atol=1e-5)
    # the default "mean" reduction is the same direction scaled by 1 / numel
    loss_mean = dmd2.distribution_matching_loss(x, teacher, fake, t, eps)
    (grad_mean,) = torch.autograd.grad(loss_mean, x)
    torch.testing.assert_close(grad_mean * x.numel(), g_exact, rtol=1e-4, atol=1e-5)


def test_normaliser_is_per_sample():
    """Scaling one sample's distance to the teacher leaves the others' gradients unchanged, and the
    normalised direction has the same size for every sample whatever its own scale."""
    teacher, fake = _den(Affine(0.0)), _den(Affine(0.0, 0.5))  # x_real = 0, x_fake = 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g)
    eps, t = torch.randn(6, 2, generator=g), torch.full((6,), 0.5)
    _, g1, w1 = dmd2.distribution_matching_loss(x, teacher, fake, t, eps, return_direction=True)
    x2 = x.clone()
    x2[0] *= 100.0
    _, g2, w2 = dmd2.distribution_matching_loss(x2, teacher, fake, t, eps, return_direction=True)
    torch.testing.assert_close(g1[1:], g2[1:])
    assert float(w2[0]) == pytest.approx(100 * float(w1[0]), rel=1e-5)
    torch.testing.assert_close(g2[0] * 100, g1[0])  # normalised by its own, 100x larger, distance


@pytest.mark.parametrize("process", [VP("linear"), VP("cosine", discrete=False), EDM()], ids=repr)
def test_dm_times_stay_in_the_middle_of_the_noise_range(process):
    t = dmd2.sample_dm_times(process, 20_000, generator=torch.Generator().manual_seed(0))
    lo, hi = dmd2.t_from_noise_fraction(process, torch.tensor([0.02, 0.98])).float()
    assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6
    # both ends are reached (not a narrower range), and the full range is wider
    span = float(hi - lo)
    assert t.min() - lo < 0.01 * span and hi - t.max() < 0.01 * span
    full = dmd2.t_from_noise_fraction(process, torch.tensor([0.0, 1.0]))
    assert full[0] < lo and full[1] > hi
    assert torch.allclose(full.float(), torch.tensor([process.t_min, process.t_max]).float(), rtol=1e-3)


def test_dm_range_rejects_bad_values():
    with pytest.raises(ValueError, match="dm_range"):
        dmd2.sample_dm_times(VP(), 4, dm_range=(0.9, 0.1))


@given(n=st.integers(1, 20), ratio=st.integers(1, 8))
def test_ttur_schedule(n, ratio):
    plan = dmd2.ttur_schedule(n, ratio)
    assert plan.count("generator") == n and plan.count("fake") == n * ratio
    # every generator update is preceded by exactly `ratio` fake-score updates
    gen_at = [i for i, u in enumerate(plan) if u == "generator"]
    assert gen_at == [(i + 1) * (ratio + 1) - 1 for i in range(n)]


def test_ttur_ratio_is_validated():
    with pytest.raises(ValueError, match="ttur_ratio"):
        dmd2.ttur_schedule(3, 0)
    with pytest.raises(ValueError, match="ttur_ratio"):
        dmd2.DMD2Config(ttur_ratio=0)


def test_student_times_are_decreasing_from_t_max():
    for process in (VP("linear"), EDM()):
        times = dmd2.student_times(process, 4)
        assert len(times) == 4 and torch.all(times[1:] < times[:-1])
        assert float(times[0]) == pytest.approx(process.t_max, rel=1e-5)
    torch.testing.assert_close(dmd2.student_times(VP("linear"), 4), torch.tensor([1.0, 0.75, 0.5, 0.25]))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_backward_simulation_input_distribution(k):
    """With a generator whose every output is c, step k's input is alpha_k c + sigma_k eps: what the
    generator sees at inference. Without backward simulation it is noised *real* data instead."""
    process = VP("linear")
    c, n = 1.5, 40_000
    gen = _den(Constant(c))
    times = dmd2.student_times(process, 4)
    g = torch.Generator().manual_seed(k)
    x_T = process.prior((n, 2), generator=g)
    x_real = torch.full((n, 2), -2.0)
    x_in = dmd2.generator_input(gen, times, k, x_T, x_real, backward=True, noise_generator=g)
    if k == 0:
        assert torch.equal(x_in, x_T)
    alpha, sigma = float(process.alpha(times[k])), float(process.sigma(times[k]))
    mean = alpha * c if k > 0 else 0.0
    assert float(x_in.mean()) == pytest.approx(mean, abs=0.02)
    assert float(x_in.std()) == pytest.approx(sigma, rel=0.02)
    # inference runs the same chain: the k-th input of sample_student has the same law
    if k > 0:
        no_bs = dmd2.generator_input(gen, times, k, x_T, x_real, backward=False, noise_generator=g)
        assert float(no_bs.mean()) == pytest.approx(alpha * -2.0, abs=0.02)
        assert float(no_bs.std()) == pytest.approx(sigma, rel=0.02)


def test_backward_simulation_matches_inference_chain():
    """The input at step k is exactly the inference chain's state at step k under the same noise."""
    process = VP("linear")
    torch.manual_seed(0)
    gen = _den(Affine(0.7, 0.3))
    times = dmd2.student_times(process, 4)
    x_T = process.prior((8, 2), generator=torch.Generator().manual_seed(1))
    sim = dmd2.backward_simulation(gen, times, 3, x_T, noise_generator=torch.Generator().manual_seed(2))
    full, nfe = dmd2.sample_student(gen, x_T, times, noise_generator=torch.Generator().manual_seed(2))
    assert nfe == 4
    torch.testing.assert_close(gen(sim, times[3].expand(8)), full)
    assert not sim.requires_grad


@pytest.mark.parametrize("bad,match", [(math.nan, r"times\[1\]=nan"), (-0.25, r"times\[1\]=-0\.25"),
                                       (1.5, "strictly decreasing")])
def test_sample_student_refuses_times_it_cannot_use(bad, match):
    process = VP("linear")
    gen = _den(Affine(0.7, 0.3))
    times = dmd2.student_times(process, 3)
    times[1] = bad
    with pytest.raises(ValueError, match=match) as info:
        dmd2.sample_student(gen, torch.randn(4, 2), times)
    if bad != 1.5:
        assert "allowed: finite times >= 0" in str(info.value)


def test_fake_score_loss_does_not_reach_the_generator():
    gen, fake = _den(Affine(0.5, 0.1)), _den(Affine(1.0))
    x = gen(torch.randn(4, 2), torch.full((4,), 1.0))
    loss = dmd2.fake_score_loss(fake, x, torch.randn(4, 2), torch.full((4,), 0.3))
    loss.backward()
    assert gen.net.a.grad is None and fake.net.a.grad is not None


def test_gan_losses_are_non_saturating_and_train_the_right_nets():
    fake = _den(Affine(1.0))
    head = dmd2.GANHead(2, hidden=8)
    x_real, x_fake = torch.randn(16, 2), torch.randn(16, 2, requires_grad=True)
    t, e = torch.full((16,), 0.3), torch.randn(16, 2)
    lc = dmd2.gan_critic_loss(head, fake, x_real, x_fake, t, t, e, e)
    lc.backward()
    assert x_fake.grad is None and head.out.weight.grad is not None
    lg = dmd2.gan_generator_loss(head, fake, x_fake, t, e)
    (gx,) = torch.autograd.grad(lg, x_fake)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    # a head that already calls every fake "fake" (logit -> -inf) still gives the generator gradient
    with torch.no_grad():
        head.out.bias.fill_(-20.0)
    (gx,) = torch.autograd.grad(dmd2.gan_generator_loss(head, fake, x_fake, t, e), x_fake)
    assert gx.abs().sum() > 1e-3
    assert dmd2.GANHead(4)(torch.randn(3, 4, 2, 2)).shape == (3,)


def _toy_teacher():
    from fedlib.diffusion.networks import MLPDenoiser

    torch.manual_seed(0)
    return _den(MLPDenoiser(hidden=32, depth=2, emb_dim=16))


def test_training_logs_every_loss_and_matches_a_shifted_gaussian():
    """A teacher that knows the data (here: the exact denoiser of N(m, s^2)) pulls a generator that
    starts at the wrong mean towards m."""

    class GaussianDenoiser(nn.Module):
        def __init__(self, m, s):
            super().__init__()
            self.m, self.s = m, s
            self.bias = nn.Parameter(torch.zeros(2))  # trainable copy for generator / fake score
            self.feature_channels = 2

        def forward(self, x, t_net, return_features=False):
            t = (t_net + 1) / 1000
            a, sg = VP("linear").alpha(t)[:, None], VP("linear").sigma(t)[:, None]
            # E[x0 | x_t] for x0 ~ N(m, s^2 I)
            out = self.m + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x - a * self.m) + self.bias
            return (out, x) if return_features else out

    teacher = _den(GaussianDenoiser(2.0, 0.5))
    data = 2.0 + 0.5 * torch.randn(256, 2)
    start = _den(GaussianDenoiser(2.0, 0.5))
    start.net.bias.data.fill_(-1.5)  # the generator starts 1.5 below the data mean
    cfg = dmd2.DMD2Config(steps=40, ttur_ratio=2, batch_size=64, lr=0.1, gan_critic_weight=0.0,
                          gan_generator_weight=0.0, checkpoint_every=10)
    assert float(dmd2.generate(start, dmd2.student_times(VP(), 1), 500, shape=(2,)).mean()) < 0.7
    res = dmd2.train_dmd2(teacher, data, cfg, progress=False, init_generator=start)
    assert res.diverged is None and len(res.history["loss_dm"]) == 40
    for key in ("loss_dm", "loss_fake", "grad_norm_generator", "grad_norm_fake"):
        assert all(math.isfinite(v) for v in res.history[key])
    x = res.sample(2000)
    assert x.shape == (2000, 2)
    assert float(x.mean()) == pytest.approx(2.0, abs=0.3)


def test_divergence_guard_keeps_last_good_checkpoint(tmp_path):
    teacher = _toy_teacher()
    data = torch.randn(128, 2)

    calls = {"n": 0}

    def poisoned_eval(gen, times):
        calls["n"] += 1
        if calls["n"] == 2:  # after update 4, blow the generator up: its next loss is non-finite
            with torch.no_grad():
                for p in gen.parameters():
                    p.fill_(float("nan"))
        return {"calls": calls["n"]}

    cfg = dmd2.DMD2Config(steps=20, ttur_ratio=1, batch_size=32, gan_critic_weight=0.0, gan_generator_weight=0.0,
                          checkpoint_every=2, eval_every=2)
    path = tmp_path / "dmd2.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dmd2.train_dmd2(teacher, data, cfg, eval_fn=poisoned_eval, checkpoint_path=path, progress=False)
    assert res.diverged is not None and "diverged at generator update 5" in res.diverged
    assert "last good checkpoint (update 4" in res.diverged
    assert any("diverged" in str(w.message) for w in caught)
    state = dmd2.load_checkpoint(path)  # weights_only=True
    assert state["step"] == 4
    for name, p in res.generator.state_dict().items():
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, state["generator"][name])
    with pytest.raises(dmd2.DivergenceError, match="non-finite"):
        calls["n"] = 0
        dmd2.train_dmd2(teacher, data, cfg, eval_fn=poisoned_eval, on_divergence="raise", progress=False)


def test_regression_term_needs_pairs():
    with pytest.raises(ValueError, match="regression_pairs"):
        dmd2.train_dmd2(_toy_teacher(), torch.randn(8, 2), dmd2.DMD2Config(steps=1, regression_weight=1.0),
                        progress=False)


def test_multistep_gan_training_runs_on_a_unet():
    from fedlib.diffusion.networks import UNet

    torch.manual_seed(0)
    teacher = _den(UNet(channels=4, channel_mults=(1, 2)))
    cfg = dmd2.DMD2Config(steps=2, ttur_ratio=1, batch_size=4, n_student_steps=4, checkpoint_every=0)
    res = dmd2.train_dmd2(teacher, torch.randn(16, 1, 8, 8).tanh(), cfg, progress=False)
    assert res.diverged is None
    assert all(math.isfinite(v) for v in res.history["loss_gan_critic"] + res.history["loss_gan_generator"])
    assert res.sample(5).shape == (5, 1, 8, 8)
