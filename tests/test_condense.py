"""Dataset distillation (fedlib.condense): the NCFD's algebra, the min-max's two steps, the runs."""

import math

import pytest
import torch

from fedlib import condense as cd


def _gauss(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 0.3 + shift


def test_ncfd_of_identical_sets_is_zero():
    x = _gauss(50, 6, 0)
    t = torch.randn(128, 6, generator=torch.Generator().manual_seed(1))
    for alpha in (0.0, 0.5, 1.0):
        assert abs(float(cd.ncfd(x, x.clone(), t, alpha))) < 1e-5


def test_ncfd_grows_monotonically_with_a_mean_shift():
    x = _gauss(200, 4, 0)
    t = torch.randn(4000, 4, generator=torch.Generator().manual_seed(2))
    u = torch.tensor([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)
    values = [float(cd.ncfd(x, x + s * u, t)) for s in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)]
    assert values[0] < 1e-6
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_amplitude_plus_phase_is_the_squared_cf_difference():
    x, s = _gauss(40, 5, 0), _gauss(7, 5, 3, shift=0.4)
    t = torch.randn(64, 5, generator=torch.Generator().manual_seed(4))
    phi_x = torch.exp(1j * (x @ t.T).to(torch.complex64)).mean(0)
    phi_s = torch.exp(1j * (s @ t.T).to(torch.complex64)).mean(0)
    direct = (phi_x - phi_s).abs() ** 2
    amplitude, phase = cd.ncfd_terms(x, s, t)
    torch.testing.assert_close(amplitude + phase, direct, atol=1e-5, rtol=1e-4)
    # the amplitude term is the squared difference of the moduli; the phase term 2|.||.|(1 - cos of the angle)
    torch.testing.assert_close(amplitude, (phi_x.abs() - phi_s.abs()) ** 2, atol=1e-6, rtol=1e-4)
    angle = torch.angle(phi_x) - torch.angle(phi_s)
    torch.testing.assert_close(phase, 2 * phi_x.abs() * phi_s.abs() * (1 - torch.cos(angle)), atol=1e-5, rtol=1e-4)
    mixed = float(cd.ncfd(x, s, t, alpha=0.3))
    assert mixed == pytest.approx(float((0.3 * amplitude + 0.7 * phase).mean()), rel=1e-4)


def test_per_class_ncfd_sums_the_classes():
    x, s = _gauss(30, 4, 0), _gauss(6, 4, 1, shift=0.2)
    yx, ys = torch.arange(30) % 3, torch.arange(6) % 3
    t = torch.randn(32, 4, generator=torch.Generator().manual_seed(5))
    per_class = sum(float(cd.ncfd(x[yx == c], s[ys == c], t)) for c in range(3))
    assert float(cd.ncfd_per_class(x, yx, s, ys, t, 3)) == pytest.approx(per_class, rel=1e-4)


def test_sampler_step_raises_ncfd_and_synthetic_step_lowers_it():
    torch.manual_seed(0)
    x, y = _gauss(60, 8, 0), torch.arange(60) % 2
    s = _gauss(4, 8, 1, shift=0.5).requires_grad_(True)
    ys = torch.arange(4) % 2
    psi = cd.FrequencySampler(8, freq_scale=3.0)
    z_seed = 7

    def value():
        t = psi(256, torch.Generator().manual_seed(z_seed))
        return cd.ncfd_per_class(x, y, s, ys, t, 2)

    before = float(value().detach())
    opt_psi = torch.optim.SGD(psi.parameters(), lr=1e-2)
    (-value()).backward()
    opt_psi.step()
    after_psi = float(value().detach())
    assert after_psi > before
    opt_s = torch.optim.SGD([s], lr=1e-2)
    opt_s.zero_grad()
    value().backward()
    opt_s.step()
    assert float(value().detach()) < after_psi


def _digits_like(n_per_class=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 1, 8, 8, generator=g)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.tanh(templates[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g))
    return x, y


def test_a_tiny_ncfm_run_lowers_ncfd_from_its_start():
    x, y = _digits_like()
    cfg = cd.CondenseConfig(ipc=2, iterations=40, batch_real=16, init="noise", lr_images=0.05, seed=0)
    start = cd.random_subset(x, y, 3, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    start.x = torch.randn(start.x.shape, generator=g).clamp(-1, 1)  # the run's own noise start
    out = cd.distill_ncfm(x, y, 3, cfg)
    assert out.x.shape == (6, 1, 8, 8) and out.y.tolist() == [0, 0, 1, 1, 2, 2]
    after, before = cd.measure_ncfd(x, y, [out, start], 3)
    assert after < 0.5 * before
    assert len(out.history["loss"]) == 40 and out.history["saved_bytes"] > 0


def test_runs_are_repeatable_and_the_methods_differ():
    x, y = _digits_like()
    cfg = cd.CondenseConfig(ipc=1, iterations=3, batch_real=8, seed=3)
    a, b = cd.distill_dm(x, y, 3, cfg), cd.distill_dm(x, y, 3, cfg)
    torch.testing.assert_close(a.x, b.x)
    n = cd.distill_ncfm(x, y, 3, cfg)
    assert n.x.shape == a.x.shape and not torch.equal(n.x, a.x)


def test_random_subset_is_stratified_and_seeded():
    x, y = _digits_like()
    a, b = cd.random_subset(x, y, 3, 5, seed=1), cd.random_subset(x, y, 3, 5, seed=1)
    torch.testing.assert_close(a.x, b.x)
    assert torch.bincount(a.y).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match=r"ipc=21.*smallest class \(20\)"):
        cd.random_subset(x, y, 3, 21)


def test_evaluate_sets_learns_from_the_real_data():
    x, y = _digits_like(30)
    sets = [cd.random_subset(x, y, 3, 20, seed=s) for s in range(2)]
    acc = cd.evaluate_sets(sets, x, y, 3, cd.EvalConfig(steps=60, lr=0.05))
    assert len(acc) == 2 and min(acc) > 0.6


@pytest.mark.parametrize("field, value, words", [
    ("ipc", 0, ["ipc=0", "integer >= 1"]),
    ("alpha", 1.5, ["alpha=1.5", "[0, 1]", "amplitude"]),
    ("lr_images", -1.0, ["lr_images=-1.0", "> 0", "positive"]),
    ("n_freqs", 0, ["n_freqs=0", ">= 1", "e.g. 64"]),
    ("init", "zeros", ["'zeros'", "'real'", "'noise'"]),
])
def test_bad_config_values_name_the_value_the_rule_and_the_fix(field, value, words):
    with pytest.raises(ValueError) as err:
        cd.CondenseConfig(**{field: value})
    for w in words:
        assert w in str(err.value)


def test_bad_eval_config_is_refused():
    with pytest.raises(ValueError, match=r"momentum=1.0.*\[0, 1\)"):
        cd.EvalConfig(momentum=1.0)


def test_the_sampler_keeps_the_size_of_its_frequencies_while_it_learns():
    torch.manual_seed(0)
    x, y = _gauss(40, 8, 0), torch.arange(40) % 2
    s, ys = _gauss(2, 8, 1, shift=0.3), torch.arange(2) % 2
    psi = cd.FrequencySampler(8, freq_scale=2.0)
    opt = torch.optim.Adam(psi.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        (-cd.ncfd_per_class(x, y, s, ys, psi(128), 2)).backward()
        opt.step()
    with torch.no_grad():
        t = psi(128)
    assert float(t.pow(2).sum(1).mean()) == pytest.approx(4.0, rel=1e-4)
    assert psi.mlp[-1].weight.abs().sum() > 0  # it did learn (directions and spread)


def test_the_counted_operations_repeat_and_ncfm_counts_its_sampler_step():
    x, y = _digits_like()
    cfg = cd.CondenseConfig(ipc=2, iterations=2, batch_real=16, seed=0)
    ncfm = [cd.distill_ncfm(x, y, 3, cfg).history["flops"] for _ in range(2)]
    dm = cd.distill_dm(x, y, 3, cfg).history["flops"]
    assert ncfm[0] == ncfm[1] > dm > 0  # the same count every run; NCFM's ascent and frequency products add work
