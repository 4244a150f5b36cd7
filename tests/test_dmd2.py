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
    head = dmd2.GANHead(2, hidden=8, kind="mlp")
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
    cfg = dmd2.DMD2Config(steps=80, ttur_ratio=2, batch_size=64, lr=0.1, gan_critic_weight=0.0,
                          gan_generator_weight=0.0, checkpoint_every=10)
    assert float(dmd2.generate(start, dmd2.student_times(VP(), 1), 500, shape=(2,)).mean()) < 0.7
    res = dmd2.train_dmd2(teacher, data, cfg, progress=False, init_generator=start)
    assert res.diverged is None and len(res.history["loss_dm"]) == 80
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


def test_a_finite_blow_up_is_a_divergence_too():
    """lr 10 on the 2-D ring: the samples reach 1e8-1e10 while every loss stays finite (DMD's direction is
    normalised), and the run used to finish with diverged=None. The guard watches the samples' scale."""
    from fedlib.data import toy_2d

    data = toy_2d("ring", 256).x
    cfg = dmd2.DMD2Config(steps=30, ttur_ratio=1, batch_size=32, lr=10.0, gan_critic_weight=0.0,
                          gan_generator_weight=0.0, checkpoint_every=10)
    with pytest.warns(RuntimeWarning, match="samples blew up"):
        res = dmd2.train_dmd2(_toy_teacher(), data, cfg, progress=False)
    assert res.diverged is not None and "the generator's samples blew up: sample_rms = " in res.diverged
    assert "allowed: at most 142 (100 x the data's RMS 1.42" in res.diverged and "Lower lr" in res.diverged
    assert res.steps_done == len(res.history["step"]) < 10
    x = res.sample(500)  # the restored generator (here: the teacher's copy) is sane
    assert float(x.pow(2).mean().sqrt()) < 100 * 1.42
    with pytest.warns(RuntimeWarning, match=r"in seed\(s\) \[3, 4\]: the generator's samples blew up"):
        res = dmd2.train_dmd2_seeds(_toy_teacher(), data, cfg, [3, 4], progress=False)
    assert all(r.diverged for r in res)


def test_a_restore_discards_the_records_of_the_discarded_updates():
    """Blown up (finite) after update 6, restored to the checkpoint of update 4: the history ends at 4."""
    teacher = _toy_teacher()
    data = torch.randn(128, 2)

    def poisoned_eval(gen, times):
        if len(seen) == 5:  # after update 6: samples at about 1e6, every loss still finite
            with torch.no_grad():
                gen.net.head.bias.fill_(1e6)
        seen.append(1)
        return {"calls": len(seen)}

    seen = []
    cfg = dmd2.DMD2Config(steps=20, ttur_ratio=1, batch_size=32, gan_critic_weight=0.0, gan_generator_weight=0.0,
                          checkpoint_every=4, eval_every=1)
    with pytest.warns(RuntimeWarning, match="diverged at generator update 7"):
        res = dmd2.train_dmd2(teacher, data, cfg, eval_fn=poisoned_eval, progress=False)
    assert "blew up" in res.diverged and "last good checkpoint (update 4" in res.diverged
    assert res.steps_done == 4 and res.history["step"] == [1, 2, 3, 4]
    assert all(len(res.history[k]) == 4 for k in ("loss_dm", "loss_fake", "grad_norm_generator", "grad_norm_fake"))
    assert [e["step"] for e in res.history["eval"]] == [1, 2, 3, 4]
    with pytest.raises(dmd2.DivergenceError, match="blew up"):
        seen.clear()
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


# ---------------------------------------------------------------------------------------------
# Issue 18: deviations from the paper, one test per point checked against docs/methods.md section 5


class _TimeSpy(nn.Module):
    """Affine x0-net that records every network time it is called with."""

    def __init__(self, dim=2):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.zeros(dim))
        self.feature_channels = dim
        self.seen = []

    def forward(self, x, t_net, return_features=False):
        self.seen.append(t_net.detach().clone())
        out = self.a * x + self.b
        return (out, x) if return_features else out


def _nets(cfg, spy_fake=None, dim=2, n=64):
    process = EDM()
    teacher = Denoiser(Affine(0.3, 0.0, dim), process, "x0")
    gen = Denoiser(Affine(0.5, 0.1, dim), process, "x0")
    fake = Denoiser(spy_fake or Affine(0.4, 0.0, dim), process, "x0")
    head = dmd2.GANHead(dim, hidden=8, kind="mlp") if cfg.use_gan else None
    times = dmd2.student_times(process, cfg.n_student_steps)
    return dmd2.DMD2Nets(teacher, gen, fake, head, times, torch.randn(n, dim))


def _share_above(t, sigma=2.0):
    return float((t > sigma).float().mean())


def test_fake_score_times_cover_the_whole_noise_range_like_the_dm_loss():
    """Issue 18.1: the fake score is trained where the generator loss asks it (uniform noise
    fraction over [0, 1]); EDM's log-normal training law gives sigma > 2 only ~6% of the time."""
    cfg = dmd2.DMD2Config(batch_size=4000, gan_critic_weight=0.0, gan_generator_weight=0.0)
    spy = _TimeSpy()
    nets = _nets(cfg, spy)
    dmd2.fake_score_losses(nets, cfg, dmd2._Draws([0], "cpu"))
    t_fake = spy.seen[-1]
    t_dm = dmd2.sample_dm_times(EDM(), 20_000, generator=torch.Generator().manual_seed(1))
    assert _share_above(t_dm) == pytest.approx(0.527, abs=0.02)
    assert _share_above(t_fake) == pytest.approx(0.526, abs=0.03)
    assert float(t_fake.min()) < 0.01 and float(t_fake.max()) > 60  # both ends of [0.002, 80]
    old = dmd2.DMD2Config(batch_size=4000, gan_critic_weight=0.0, gan_generator_weight=0.0, fake_times="process")
    dmd2.fake_score_losses(nets, old, dmd2._Draws([0], "cpu"))
    assert _share_above(spy.seen[-1]) == pytest.approx(0.057, abs=0.02)


def test_gan_terms_see_the_whole_noise_range():
    """Issue 18.2: the critic (and the generator's GAN loss) draw times over the full range."""
    cfg = dmd2.DMD2Config(batch_size=3000, gan_critic_weight=1e-2, gan_generator_weight=3e-3)
    spy = _TimeSpy()
    nets = _nets(cfg, spy)
    dmd2.fake_score_losses(nets, cfg, dmd2._Draws([0], "cpu"))
    t = spy.seen[-1]  # one fused call: [denoising | real | fake] per member
    t_real, t_gen = t[3000:6000], t[6000:]
    for tt in (t_real, t_gen):
        assert float(tt.min()) < 0.01 and float(tt.max()) > 60
    spy.seen.clear()
    dmd2.generator_losses(nets, cfg, dmd2._Draws([0], "cpu"))
    t_gan = spy.seen[-1]  # the generator's GAN call comes after the DM call
    assert float(t_gan.min()) < 0.01 and float(t_gan.max()) > 60
    lo, hi = dmd2.t_from_noise_fraction(EDM(), torch.tensor(dmd2.DM_RANGE))
    t_dm = spy.seen[-2]
    assert float(t_dm.min()) >= float(lo) - 1e-4 and float(t_dm.max()) <= float(hi) + 1e-3


@pytest.mark.parametrize("dim", [2, 64])
def test_gan_weights_keep_the_papers_ratio_to_the_dm_loss(dim):
    """Issue 18.3: the DM loss is averaged over B*d elements and the GAN loss over B, so the paper's
    weights (set at d = 3*64*64) are multiplied by 12288 / d; the total is exactly that sum."""
    assert dmd2.gan_weight_scale(dim) == pytest.approx(12288 / dim)
    assert dmd2.gan_weight_scale(dim, reference_dim=0) == 1.0
    cfg = dmd2.DMD2Config(batch_size=16, gan_critic_weight=1e-2, gan_generator_weight=3e-3)
    nets = _nets(cfg, dim=dim)
    scale = dmd2.gan_weight_scale(dim)
    total, losses = dmd2.generator_losses(nets, cfg, dmd2._Draws([0], "cpu"), scale)
    expected = losses["loss_dm"] + 3e-3 * scale * losses["loss_gan_generator"]
    torch.testing.assert_close(total, expected.sum())
    total_f, lf = dmd2.fake_score_losses(nets, cfg, dmd2._Draws([0], "cpu"), scale)
    torch.testing.assert_close(total_f, (lf["loss_fake"] + 1e-2 * scale * lf["loss_gan_critic"]).sum())
    # the DM gradient per element is g / (B d): the GAN-to-DM ratio per element grows like d, which the scale undoes
    x = torch.randn(16, dim, requires_grad=True)
    g = torch.ones(16, dim)
    (grad,) = torch.autograd.grad(dmd2._per_sample_dm(x, g).mean(), x)
    torch.testing.assert_close(grad, g / (16 * dim))


def test_regression_loss_is_averaged_over_elements_and_one_step_only():
    """Issue 18.4: same normalisation as the DM loss (a weight means the same at any d), and only
    for the one-step generator (a multi-step chain has no deterministic x_T -> x_0 map)."""
    x, ref = torch.randn(8, 2), torch.randn(8, 2)
    wide = dmd2.regression_loss(x.repeat(1, 32), ref.repeat(1, 32))  # the same error in 64 dimensions
    torch.testing.assert_close(wide, dmd2.regression_loss(x, ref))
    torch.testing.assert_close(dmd2.regression_loss(x, ref), ((x - ref) ** 2).mean())
    with pytest.raises(ValueError, match="one-step"):
        dmd2.DMD2Config(regression_weight=0.25, n_student_steps=4)


def test_dm_gradient_is_the_normalised_score_difference_and_moves_towards_the_data():
    """Sign and normaliser (issue 14): with exact denoisers, g = sigma^2 (s_fake - s_real) / w, and a
    small step x - lr * g raises the true density of the generator's samples."""
    from fedlib.data import mixture

    ring = mixture("ring")
    from fedlib.data import GaussianMixture2D

    angle = math.pi / 8  # the generator's modes sit between the true ones
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    fake_mix = GaussianMixture2D(ring.means @ rot.T, ring.std)
    real, fake = dmd2.exact_denoiser(ring), dmd2.exact_denoiser(fake_mix)
    g0 = torch.Generator().manual_seed(0)
    x, _ = fake_mix.sample(512, g0)
    sigma = torch.full((512,), 0.5)
    eps = torch.randn(512, 2, generator=g0)
    x_g = x.clone().requires_grad_(True)
    loss, g, w = dmd2.distribution_matching_loss(x_g, real, fake, sigma, eps, reduction="sum", return_direction=True)
    (grad,) = torch.autograd.grad(loss, x_g)
    x_t = x + 0.5 * eps
    s_real, s_fake = ring.score(x_t, 0.5), fake_mix.score(x_t, 0.5)
    torch.testing.assert_close(g, 0.25 * (s_fake - s_real) / w[:, None], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, g)
    w_exact = (x - real(x_t, sigma)).abs().mean(1)
    torch.testing.assert_close(w, w_exact)
    assert float(ring.log_prob(x - 0.05 * g).mean()) > float(ring.log_prob(x).mean()) + 0.1


def test_each_update_trains_only_its_own_networks():
    """Which network each loss trains (issue 14): the fake-score update (denoising + critic) reaches
    the fake score and the head, never the generator; the generator update (DM + GAN) reaches the
    generator only, even though its GAN loss runs through the fake score and the head."""
    cfg = dmd2.DMD2Config(batch_size=8, gan_critic_weight=1e-2, gan_generator_weight=3e-3)
    nets = _nets(cfg)
    for p in nets.generator.parameters():
        p.requires_grad_(True)
    total, _ = dmd2.fake_score_losses(nets, cfg, dmd2._Draws([0], "cpu"))
    total.backward()
    assert all(p.grad is None for p in nets.generator.parameters())
    assert all(p.grad is not None for p in nets.fake_score.parameters())
    assert all(p.grad is not None for p in nets.head.parameters())
    for m in (nets.fake_score, nets.head):
        m.zero_grad(set_to_none=True)
    total, losses = dmd2.generator_losses(nets, cfg, dmd2._Draws([0], "cpu"))
    assert set(losses) == {"loss_dm", "loss_gan_generator"}
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.generator.parameters())
    assert all(p.grad is None for p in nets.fake_score.parameters())
    assert all(p.grad is None for p in nets.head.parameters())
    assert all(p.requires_grad for p in nets.fake_score.parameters())  # switched back on afterwards


def test_backward_simulation_with_one_step_per_sample_matches_the_inference_chain():
    """What the generator sees under backward simulation: sample i's input at step k_i is the
    inference chain's state at k_i (same noise), also when every sample has its own k."""
    process = EDM()
    torch.manual_seed(0)
    gen = Denoiser(Affine(0.7, 0.3), process, "x0")
    times = dmd2.student_times(process, 4)
    x_T = process.prior((8, 2), generator=torch.Generator().manual_seed(1))
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    sim = dmd2.backward_simulation(gen, times, k, x_T, noise_generator=torch.Generator().manual_seed(2))
    for kk in range(4):
        ref = dmd2.backward_simulation(gen, times, kk, x_T, noise_generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(sim[k == kk], ref[k == kk])


def test_training_iterates_the_ttur_schedule(monkeypatch):
    """The loop runs exactly the documented update list (Issue 12): ratio fake-score updates before
    every generator update."""
    calls = []
    real_f, real_g = dmd2.fake_score_losses, dmd2.generator_losses
    monkeypatch.setattr(dmd2.training, "fake_score_losses", lambda *a, **k: (calls.append("fake"), real_f(*a, **k))[1])
    monkeypatch.setattr(dmd2.training, "generator_losses", lambda *a, **k: (calls.append("generator"), real_g(*a, **k))[1])
    cfg = dmd2.DMD2Config(steps=3, ttur_ratio=4, batch_size=8, gan_critic_weight=0.0, gan_generator_weight=0.0)
    dmd2.train_dmd2(_toy_teacher(), torch.randn(32, 2), cfg, progress=False)
    assert calls == dmd2.ttur_schedule(3, 4)


def test_vectorised_seeds_follow_their_single_runs():
    """train_dmd2_seeds stacks 2-D networks over seeds: member s draws the random numbers of the
    single run with seed s, clips its own gradient, and so follows it up to rounding."""
    teacher = _toy_teacher()
    data = torch.randn(64, 2)
    cfg = dmd2.DMD2Config(steps=4, ttur_ratio=2, batch_size=16, lr=1e-2, grad_clip=0.05, checkpoint_every=2,
                          gan_critic_weight=1e-2, gan_generator_weight=3e-3, n_student_steps=2)
    stacked = dmd2.train_dmd2_seeds(teacher, data, cfg, [3, 5], progress=False)
    single = dmd2.train_dmd2(teacher, data, dmd2.DMD2Config(**{**dmd2.config_dict(cfg), "seed": 5}), progress=False)
    assert [r.seed for r in stacked] == [3, 5]
    for key in ("loss_dm", "loss_fake", "loss_gan_critic", "loss_gan_generator", "grad_norm_generator"):
        assert stacked[1].history[key] == pytest.approx(single.history[key], rel=1e-3, abs=1e-5), key
    assert stacked[0].history["loss_dm"] != pytest.approx(single.history["loss_dm"], rel=1e-3)
    x_s, x_1 = stacked[1].sample(100, seed=1), single.sample(100, seed=1)
    torch.testing.assert_close(x_s, x_1, rtol=1e-3, atol=1e-4)
    assert dmd2.can_stack(teacher.net) and not dmd2.can_stack(dmd2.GANHead(4, kind="conv"))


def test_stack_and_unstack_round_trip():
    from fedlib.diffusion.networks import MLPDenoiser

    nets = [MLPDenoiser(hidden=16, depth=2, emb_dim=8) for _ in range(3)]
    stacked = dmd2.stack_members(nets)
    x, t = torch.randn(3 * 5, 2), torch.rand(3 * 5)
    out = stacked(x, t)
    for i, net in enumerate(nets):
        torch.testing.assert_close(out[5 * i:5 * (i + 1)], net(x[5 * i:5 * (i + 1)], t[5 * i:5 * (i + 1)]))
        torch.testing.assert_close(dmd2.unstack_member(stacked, i)(x[:5], t[:5]), net(x[:5], t[:5]))
    with pytest.raises(ValueError, match="nn.Linear"):
        dmd2.stack_members([dmd2.GANHead(4, kind="conv")] * 2)


def test_late_average_and_checkpointer(tmp_path):
    h = {"eval": [{"step": s, "sw": float(s)} for s in (10, 20, 30, 40)]}
    assert dmd2.late_average(h, "sw") == pytest.approx(35.0)  # steps 30 and 40 (> 20)
    assert dmd2.late_average(h, "sw", upto=20) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="no evaluation"):
        dmd2.late_average(h, "sw", upto=5)
    net = nn.Linear(2, 2)
    ck = dmd2.Checkpointer(tmp_path / "c.pt", net=net)
    ck.save(7)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    assert ck.restore() == 7
    torch.testing.assert_close(net.weight, before)


def test_exact_denoiser_matches_the_mixture_score():
    from fedlib.data import mixture

    ring = mixture("ring")
    den = dmd2.exact_denoiser(ring)
    x = torch.randn(20, 2) * 2
    for s in (0.05, 1.0, 10.0):
        torch.testing.assert_close(den(x, torch.full((20,), s)), x + s**2 * ring.score(x, s), rtol=1e-4, atol=1e-5)


def test_toy_evaluator_matches_the_library_metric_and_keeps_val_and_test_apart():
    from fedlib import metrics
    from fedlib.data import mixture

    ring = mixture("ring")
    ev = dmd2.ToyEvaluator(ring, n=400, seed=3)
    x = torch.randn(400, 2)
    assert ev.sw(x, ev.test) == pytest.approx(metrics.sliced_wasserstein(x, ev.test), rel=1e-9)
    assert not torch.equal(ev.val, ev.test)
    ref = dmd2.stratified_sample(ring, 403, 0)
    counts = torch.cdist(ref, ring.means).argmin(1).bincount(minlength=8)
    assert int(counts.max() - counts.min()) <= 1 and len(ref) == 403  # the exact share per mode
    assert dmd2.off_mode_fraction(ring, ring.means) == 0.0 and dmd2.off_mode_fraction(ring, torch.zeros(5, 2)) == 1.0
    assert dmd2.mode_weight_tv(ring, ring.means.repeat(3, 1)) == pytest.approx(0.0)
    assert dmd2.mode_weight_tv(ring, ring.means[:1].repeat(8, 1)) == pytest.approx(7 / 8)  # all mass on one mode
    assert set(ev(dmd2.exact_denoiser(ring), torch.tensor([1.0]))) >= {"sw_val", "sw_test", "off_mode_test", "mode_tv_test"}


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_critic_weight_against_the_fake_score_loss_is_the_papers(monkeypatch, shape):
    """The fake-score loss and the critic loss are both means (over B x d elements and over B
    samples, in the paper's code and here), so the critic's weight relative to the fake-score loss is the
    paper's 1e-2 at any d: read off what training backpropagates (the old code used 1e-2 x 12288 / d:
    6144x too strong on 2-D, 192x on 8x8 digits). The generator's GAN weight keeps its 12288 / d."""
    seen = {"fake": [], "generator": []}
    real_f, real_g = dmd2.fake_score_losses, dmd2.generator_losses

    def spy_f(*a, **k):
        total, losses = real_f(*a, **k)
        seen["fake"].append(((total - losses["loss_fake"].sum()) / losses["loss_gan_critic"].sum()).item())
        return total, losses

    def spy_g(*a, **k):
        total, losses = real_g(*a, **k)
        seen["generator"].append(((total - losses["loss_dm"].sum()) / losses["loss_gan_generator"].sum()).item())
        return total, losses

    monkeypatch.setattr(dmd2.training, "fake_score_losses", spy_f)
    monkeypatch.setattr(dmd2.training, "generator_losses", spy_g)
    d = math.prod(shape)
    process = EDM()
    teacher = Denoiser(Affine(0.3, 0.0, shape[0]), process, "x0")
    teacher.net.feature_channels = d
    cfg = dmd2.DMD2Config(steps=2, ttur_ratio=2, batch_size=8, gan_critic_weight=1e-2, gan_generator_weight=3e-3)
    monkeypatch.setattr(dmd2.training, "_gan_head", lambda *a: dmd2.GANHead(d, hidden=8, kind="mlp"))
    dmd2.train_dmd2(teacher, torch.randn(32, *shape), cfg, progress=False)
    assert len(seen["fake"]) == 4 and len(seen["generator"]) == 2
    for w in seen["fake"]:
        assert w == pytest.approx(1e-2, rel=1e-2)  # float32 rounding of total - loss_fake
    for w in seen["generator"]:
        assert w == pytest.approx(3e-3 * 12288 / d, rel=1e-2)
    assert dmd2.gan_weight_scale(d, role="critic") == 1.0


def test_warmup_factor_is_linear_then_constant():
    """The optional linear warm-up (the authors' code warms 500 iterations = 100 generator updates at
    ttur_ratio 5; the paper states none, so fedlib's default is off)."""
    assert [dmd2.warmup_factor(u, 4) for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert all(dmd2.warmup_factor(u, 0) == 1.0 for u in range(5))
    assert dmd2.DMD2Config().warmup_steps == 0
    with pytest.raises(ValueError, match="warmup_steps"):
        dmd2.DMD2Config(warmup_steps=-1)


def test_warmup_sets_both_optimisers_learning_rates(monkeypatch):
    """Every update (fake-score and generator) of generator round u runs at lr x warmup_factor(u)."""
    lrs = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = dmd2.DMD2Config(steps=4, ttur_ratio=2, batch_size=8, lr=0.01, warmup_steps=2, gan_critic_weight=0.0,
                          gan_generator_weight=0.0)
    dmd2.train_dmd2(_toy_teacher(), torch.randn(32, 2), cfg, progress=False)
    expected = [0.01 * f for f in (0.5, 0.5, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1)]
    assert lrs == pytest.approx(expected)
