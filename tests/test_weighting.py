"""fedlib.weighting: every rule is a distribution over clients; FedGO == oracle on exact ratios."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib import weighting as W
from fedlib.data import GaussianMixture2D


def _inputs(K, N, C, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(logits=3 * torch.randn(K, N, C, generator=g), n_k=torch.randint(1, 50, (K,), generator=g),
                disc_logits=4 * torch.randn(K, N, generator=g), log_densities=-5 * torch.rand(K, N, generator=g))


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 6), N=st.integers(1, 20), C=st.integers(2, 5), seed=st.integers(0, 10_000),
       name=st.sampled_from(list(W.RULES)))
def test_every_rule_is_a_distribution_over_clients(K, N, C, seed, name):
    inp = _inputs(K, N, C, seed)
    a = W.compute_weights(name, inp.pop("logits"), **inp)
    assert a.shape == (K, N)
    assert (a >= 0).all() and torch.isfinite(a).all()
    assert torch.allclose(a.sum(0), torch.ones(N), atol=1e-5)


def test_simple_rules():
    inp = _inputs(3, 4, 5, 0)
    assert torch.allclose(W.uniform_weights(inp["logits"]), torch.full((3, 4), 1 / 3))
    sc = W.sample_count_weights(inp["logits"], torch.tensor([1, 2, 7]))
    assert torch.allclose(sc, torch.tensor([0.1, 0.2, 0.7])[:, None].expand(3, 4))
    # a confident client vs an undecided one
    logits = torch.stack([torch.tensor([[10.0, 0, 0]]), torch.zeros(1, 3)])
    for rule in (W.entropy_weights, W.variance_weights):
        a = rule(logits)
        assert a[0, 0] > 0.5 > a[1, 0]
    # all-uniform predictions: variance weights fall back to uniform
    assert torch.allclose(W.variance_weights(torch.zeros(4, 2, 3)), torch.full((4, 2), 0.25))
    d = torch.tensor([[0.0], [math.log(3.0)]])  # D = 0.5 and 0.75
    assert torch.allclose(W.dafkd_weights(d)[:, 0], torch.tensor([0.4, 0.6]))
    # FedGO: odds 1 and 3, counts 1 and 2 -> 1 : 6
    assert torch.allclose(W.fedgo_weights(d, torch.tensor([1, 2]))[:, 0], torch.tensor([1 / 7, 6 / 7]))


def test_fedgo_equals_oracle_with_exact_density_ratio_logits():
    """Clients hold different components of a mixture; an optimal discriminator against a generator
    density p_G has logit l_k = log p_k - log p_G; FedGO must then equal the oracle exactly."""
    base = GaussianMixture2D(torch.tensor([[-2.0, 0], [2.0, 0], [0, 2.0], [0, -2.0]]), 0.7)
    client_mix = [torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.05, 0.05, 0.45, 0.45]),
                  torch.tensor([0.25, 0.25, 0.25, 0.25])]
    n_k = torch.tensor([100, 30, 400])
    x, _ = base.sample(500, torch.Generator().manual_seed(0))
    comp = base.component_log_prob(x)                                     # [N, M]
    log_p = torch.stack([torch.logsumexp(comp + w.log(), 1) for w in client_mix])  # [K, N]
    p_g = GaussianMixture2D(torch.zeros(1, 2), 3.0)                     # a broad generator density
    disc = log_p - p_g.log_prob(x)[None]
    logits = torch.randn(3, 500, 4)
    fedgo = W.compute_weights("fedgo", logits, disc_logits=disc, n_k=n_k)
    oracle = W.compute_weights("oracle", logits, log_densities=log_p, n_k=n_k)
    assert torch.allclose(fedgo, oracle, atol=1e-5)
    assert W.weight_distance(fedgo, oracle) < 1e-5
    # and it is not trivially uniform: the other rules are far from the oracle here
    assert W.weight_distance(W.uniform_weights(logits), oracle) > 0.1
    # DaFKD (no odds, no n_k) is not the oracle
    assert W.weight_distance(W.dafkd_weights(disc), oracle) > 0.05


def test_fedgo_needs_no_clamping():
    d = torch.tensor([[60.0, -80.0], [-70.0, 90.0]])  # sigmoid saturates to exactly 0 / 1 in float32
    a = W.fedgo_weights(d, torch.tensor([1, 1]))
    assert torch.isfinite(a).all() and torch.allclose(a.sum(0), torch.ones(2))


def test_weight_distance_range():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert W.weight_distance(a, a) == 0
    assert W.weight_distance(a, a.flip(0)) == 1


def test_bad_input_errors():
    inp = _inputs(3, 4, 5, 0)
    with pytest.raises(ValueError, match=r"unknown weighting 'fedgoo'; allowed: 'uniform'.*'oracle'"):
        W.compute_weights("fedgoo", inp["logits"])
    with pytest.raises(ValueError, match="needs disc_logits, n_k"):
        W.compute_weights("fedgo", inp["logits"])
    with pytest.raises(ValueError, match=r"disc_logits must have shape \[K, N\] = \[3, 4\]"):
        W.compute_weights("fedgo", inp["logits"], disc_logits=torch.zeros(3, 5), n_k=inp["n_k"])
    bad = inp["disc_logits"].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="disc_logits has 1 non-finite.*discriminator produced NaN"):
        W.compute_weights("dafkd", inp["logits"], disc_logits=bad)
    with pytest.raises(ValueError, match="n_k has 2 entries but there are K=3"):
        W.compute_weights("sample_count", inp["logits"], n_k=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"shape \[K, N, C\]"):
        W.compute_weights("uniform", torch.zeros(3, 4))
    with pytest.raises(ValueError, match="must be > 0"):
        W.compute_weights("fedgo", inp["logits"], disc_logits=inp["disc_logits"], n_k=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("name", ["sample_count", "fedgo", "oracle"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -3.0, 0.0])
def test_counts_that_are_not_finite_and_positive_are_refused(name, value):
    inp = _inputs(3, 4, 5, 0)
    n_k = torch.tensor([5.0, value, 2.0])
    with pytest.raises(ValueError) as info:
        W.compute_weights(name, inp["logits"], n_k=n_k, disc_logits=inp["disc_logits"],
                          log_densities=inp["log_densities"])
    assert f"n_k[1]={value!r} (1 of 3 entries bad)" in str(info.value)
    assert "allowed: finite counts, each must be > 0" in str(info.value)


@pytest.mark.parametrize("name", list(W.RULES))
def test_zero_clients_are_refused_by_every_rule(name):
    # K = 0: uniform divided by zero, the softmax rules returned an empty [0, N] "distribution"
    inp = _inputs(3, 4, 5, 0)
    empty = {k: v[:0] for k, v in inp.items()}
    with pytest.raises(ValueError, match=r"K=0 clients \(shape \(0, 4, 5\)\); allowed: K >= 1"):
        W.compute_weights(name, empty.pop("logits"), **empty)
