"""FedLGD (fedlib.fedlgd): gradient matching against its definition, the anchor loss where it must vanish,
the per-class aggregation, the local sets under label skew, the refusals, and one tiny run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlib import condense as cd
from fedlib import fedlgd as fl
from fedlib.federated import classification_loss, functional, get_params


def _linear(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return model, functional(model), get_params(model)


def test_gradient_matching_equals_its_definition_by_hand():
    model, call, params = _linear()
    W, b = params["weight"], params["bias"]
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.3, -0.7], [-0.2, 0.8, 0.1]])
    y = torch.tensor([0, 1, 1])
    g = torch.Generator().manual_seed(1)
    target = {"weight": torch.randn(2, 2, 3, generator=g), "bias": torch.randn(2, 2, generator=g)}
    counts = torch.tensor([4.0, 3.0])
    # by hand: the CE gradient of one sample is (softmax(Wx + b) - e_y) x^T for W and softmax - e_y for b;
    # a class's gradient is the mean over its images
    def grads(xs, c):
        r = torch.stack([torch.softmax(W @ xi + b, 0) - F.one_hot(torch.tensor(c), 2).float() for xi in xs])
        return (r[:, :, None] * xs[:, None, :]).mean(0), r.mean(0)

    def one_minus_cos(a, b_):
        return 1 - (a.flatten() @ b_.flatten()) / (a.norm() * b_.norm())

    expected = 0.0
    for c, xs in [(0, x[:1]), (1, x[1:])]:
        gw, gb = grads(xs, c)
        expected += one_minus_cos(gw, target["weight"][c]) + one_minus_cos(gb, target["bias"][c])
    got = fl.gradient_matching_loss(call, params, x, y, target, counts, 2)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # a class no client holds does not count
    only0 = fl.gradient_matching_loss(call, params, x, y, target, torch.tensor([4.0, 0.0]), 2)
    gw, gb = grads(x[:1], 0)
    assert float(only0) == pytest.approx(float(one_minus_cos(gw, target["weight"][0]) + one_minus_cos(gb, target["bias"][0])),
                                         rel=1e-5)
    # matching the target exactly (its own gradients) gives 0
    own, _ = fl.class_gradients(call, params, x, y, 2)
    assert float(fl.gradient_matching_loss(call, params, x, y, own, counts, 2)) == pytest.approx(0.0, abs=1e-5)


def test_the_aggregated_gradient_is_the_gradient_on_the_union_of_the_virtual_sets():
    _, call, params = _linear(1)
    g = torch.Generator().manual_seed(2)
    xa, ya = torch.randn(5, 3, generator=g), torch.tensor([0, 0, 1, 0, 0])
    xb, yb = torch.randn(3, 3, generator=g), torch.tensor([1, 1, 0])
    agg, counts = fl.aggregate_class_gradients([fl.class_gradients(call, params, xa, ya, 2),
                                                fl.class_gradients(call, params, xb, yb, 2)])
    pooled, pooled_counts = fl.class_gradients(call, params, torch.cat([xa, xb]), torch.cat([ya, yb]), 2)
    assert counts.tolist() == pooled_counts.tolist() == [5.0, 3.0]
    for n in agg:
        torch.testing.assert_close(agg[n], pooled[n], atol=1e-6, rtol=1e-5)


def test_the_server_step_lowers_the_gradient_distance():
    _, call, params = _linear(2)
    g = torch.Generator().manual_seed(3)
    x_real, y_real = torch.randn(20, 3, generator=g), torch.arange(20) % 2
    target, counts = fl.class_gradients(call, params, x_real, y_real, 2)
    x_g, y_g = torch.randn(4, 3, generator=g), torch.tensor([0, 0, 1, 1])
    cfg = fl.FedLGDConfig(server_steps=30, lr_global=0.05)
    _, history = fl.server_gradient_matching(call, params, x_g, y_g, target, counts, 2, cfg)
    assert history[-1] < 0.5 * history[0]


def test_the_anchor_loss_vanishes_where_it_should():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    # every anchor of the sample's own class: exactly 0, wherever the features are
    same = fl.anchor_contrastive(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.randn(4, 2),
                                 torch.zeros(4, dtype=torch.long), 0.5)
    assert torch.equal(same, torch.zeros(3))
    # a class without anchors contributes 0
    assert float(fl.anchor_contrastive(z, torch.tensor([2, 2]), z, y, 0.5).abs().sum()) == 0.0
    # features on their own class's anchor and orthogonal to the other: near 0 at a small temperature,
    # and far larger when the anchors' labels are swapped
    aligned = fl.anchor_contrastive(z, y, z, y, 0.05)
    swapped = fl.anchor_contrastive(z, y, z, 1 - y, 0.05)
    assert float(aligned.max()) < 1e-6 and float(swapped.min()) > 10.0


def test_the_anchored_loss_without_anchors_weight_is_cross_entropy():
    torch.manual_seed(0)
    from fedlib.models import SmallCNN

    model = SmallCNN(1, 3, width=4)
    call, params = functional(model), get_params(model)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 3
    batch = {"x": x, "y": y, "mask": torch.ones(6)}
    anchors = torch.randn(3, 1, 8, 8), torch.arange(3)
    ce = classification_loss(call, params, batch)
    assert float(fl.anchored_loss(model, *anchors, 0.0, 0.5)(call, params, batch)) == pytest.approx(float(ce))
    assert float(fl.anchored_loss(model, *anchors, 1.0, 0.5)(call, params, batch)) > float(ce)


def _skewed(seed=0):
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 1, 8, 8, generator=g)
    y = torch.tensor([0] * 20 + [2] * 12 + [1] * 1)  # class 1 held once: fewer than ipc
    x = torch.tanh(templates[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g))
    return x, y


def test_local_sets_hold_the_clients_classes_and_the_refresh_moves_them():
    x, y = _skewed()
    cfg = fl.FedLGDConfig(ipc=2, dm_iterations=3, batch_real=8, refresh_iterations=3)
    (s,) = fl.local_virtual_sets([(x, y)], 3, cfg)
    assert s.y.tolist() == [0, 0, 2, 2]
    torch.manual_seed(0)
    from fedlib.models import SmallCNN

    model = SmallCNN(1, 3, width=4)
    (r,) = fl.refresh_local_sets(model, get_params(model), [(x, y)], [s], 3, cfg, round_=1)
    assert r.y.tolist() == s.y.tolist() and not torch.equal(r.x, s.x)
    with pytest.raises(ValueError, match=r"ipc=30.*largest class \(20\)"):
        cd.random_subset(x, y, 3, 30, present_only=True)


@pytest.mark.parametrize("field, value, words", [
    ("rounds", 0, ["rounds=0", ">= 1", "whole number"]),
    ("lr", 0.0, ["lr=0.0", "> 0"]),
    ("tau", -1, ["tau=-1", "> 0", "temperature"]),
    ("lam", -0.5, ["lam=-0.5", ">= 0"]),
    ("server_steps", 1.5, ["server_steps=1.5", "integer"]),
])
def test_bad_config_values_name_the_value_the_rule_and_the_fix(field, value, words):
    with pytest.raises(ValueError) as err:
        fl.FedLGDConfig(**{field: value})
    for w in words:
        assert w in str(err.value)


def three_class_clients(seed: int, per_class: int, noise: float):
    """Three noisy 8x8 templates, ``per_class`` images each, split in half between two clients."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 1, 8, 8, generator=g)
    y = torch.arange(3).repeat(per_class)
    x = torch.tanh(2 * templates[y] + noise * torch.randn(len(y), 1, 8, 8, generator=g))
    half = len(y) // 2
    return x, y, [(x[:half], y[:half]), (x[half:], y[half:])]


def test_a_tiny_run_trains_all_three_methods():
    x, y, clients = three_class_clients(0, per_class=30, noise=0.3)
    cfg = fl.FedLGDConfig(rounds=3, local_steps=5, ipc=2, dm_iterations=3, batch_real=8, refresh_every=2,
                          refresh_iterations=2, global_ipc=1, server_steps=2, width=4, feature_width=4)
    out = fl.run_fedlgd(clients, [(x, y)], 3, cfg)
    assert set(out["accuracy"]) == set(fl.METHODS) and all(len(v) == 3 for v in out["accuracy"].values())
    assert max(v[-1] for v in out["accuracy"].values()) > 0.5
    assert len(out["server_distance"]) == 6 and out["global"][0].shape == (3, 1, 8, 8)
    spread = fl.heterogeneity(clients, out["local_sets"], 3, cfg)
    assert spread["virtual"] > 0 and spread["real"] > 0


def test_without_its_additions_fedlgd_is_fedavg():
    # lam 0, no refresh and no server steps leave FedAvg on the same sets, batches and start: any other
    # difference between the methods would be a bug of the comparison, not FedLGD
    x, y, clients = three_class_clients(1, per_class=20, noise=0.5)
    cfg = fl.FedLGDConfig(rounds=2, local_steps=3, ipc=2, dm_iterations=2, batch_real=8, refresh_every=1,
                          refresh_iterations=0, server_steps=0, lam=0.0, width=4, feature_width=4)
    out = fl.run_fedlgd(clients, [(x, y)], 3, cfg)
    for n, v in out["params"]["FedLGD"].items():
        torch.testing.assert_close(v, out["params"]["FedAvg"][n], atol=1e-5, rtol=1e-4)
    assert not all(torch.allclose(v, out["params"]["FedProx"][n]) for n, v in out["params"]["FedLGD"].items())


def three_clients():
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 1, 8, 8, generator=g)
    y = torch.arange(3).repeat(20)
    x = torch.tanh(2 * templates[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g))
    return x, y, [(x[:20], y[:20]), (x[20:40], y[20:40]), (x[40:], y[40:])]


TINY = dict(rounds=3, local_steps=3, ipc=2, dm_iterations=2, batch_real=8, refresh_every=2, refresh_iterations=2,
            global_ipc=1, server_steps=2, width=4, feature_width=4)


def test_an_unknown_backend_is_refused_like_the_others():
    from fedlib import backends

    x, y, clients = three_clients()
    with pytest.raises(ValueError, match=r"unknown backend 'ray'; allowed: 'inprocess', 'flower'") as err:
        backends.run_fedlgd(clients, [(x, y)], 3, fl.FedLGDConfig(**TINY), backend="ray")
    with pytest.raises(ValueError) as other:
        backends.run_rounds(None, [], ["fedavg"], rounds=1, backend="ray")
    assert str(err.value) == str(other.value)
    with pytest.raises(ValueError, match="fedlib.backends.run_fedlgd"):
        fl.run_fedlgd(clients, [(x, y)], 3, fl.FedLGDConfig(**TINY), backend="flower")
