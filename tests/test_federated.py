"""fedlib.federated: vectorised == sequential, padding, aggregation, FedProx, byte accounting."""

import numpy as np
import pytest
import torch

from fedlib import federated as fl
from fedlib import models
from tolerance import float32_tolerance, params_tolerance, training_terms


def _clients(sizes, seed=0, n_classes=4, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    cuts = np.cumsum([0] + list(sizes))
    return x, y, [np.arange(cuts[i], cuts[i + 1]) for i in range(len(sizes))]


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("momentum,mu,wd", [(0.0, 0.0, 0.0), (0.9, 0.1, 1e-3)])
def test_vectorised_equals_sequential_epochs(momentum, mu, wd):
    torch.manual_seed(0)
    x, y, idx = _clients([5, 37, 12, 64])
    clients = fl.pack_clients(x, y, idx)
    model = models.SmallCNN(1, 4, width=4)
    w = fl.get_params(model)
    kw = dict(epochs=2, lr=0.1, momentum=momentum, mu=mu, weight_decay=wd, batch_size=16)
    a, la = fl.local_train(model, w, clients, generator=torch.Generator().manual_seed(3), return_loss=True, **kw)
    b, lb = fl.local_train(model, w, clients, generator=torch.Generator().manual_seed(3), vectorised=False,
                           return_loss=True, **kw)
    # the largest client takes 2 epochs of ceil(64 / 16) steps; a conv gradient entry sums 16 x 8 x 8 products
    terms = training_terms(steps=2 * 4, batch=16, positions=8 * 8)
    assert _max_diff(a, b) < params_tolerance(a, terms)
    assert torch.allclose(la.nan_to_num(-1), lb.nan_to_num(-1), rtol=0,
                          atol=float32_tolerance(la.nan_to_num(0).abs().max(), terms, compared=la.numel()))
    # client k takes E * ceil(n_k / B) steps; idle afterwards
    assert (~la.isnan()).sum(1).tolist() == [2 * int(np.ceil(n / 16)) for n in (5, 37, 12, 64)]


def test_vectorised_equals_sequential_steps_with_extras_and_custom_loss():
    """The FedDM-style use: a regression loss using per-sample noise drawn by extras_fn."""
    x, y, idx = _clients([3, 20, 9], shape=(2,))
    clients = fl.pack_clients(x, y, idx)
    model = models.MLP(2, 2, hidden=16)

    def extras(xb, yb, g):
        return {"noise": torch.randn(xb.shape, generator=g), "t": torch.rand(len(xb), generator=g)}

    def loss_fn(call, params, batch):
        x_t = batch["x"] * (1 - batch["t"][:, None]) + batch["t"][:, None] * batch["noise"]
        err = ((call(params, x_t) - batch["noise"]) ** 2).sum(-1)
        return fl.masked_mean(err, batch["mask"])

    kw = dict(steps=7, lr=0.05, batch_size=8, extras_fn=extras, loss_fn=loss_fn)
    a = fl.local_train(model, fl.get_params(model), clients, generator=torch.Generator().manual_seed(1), **kw)
    b = fl.local_train(model, fl.get_params(model), clients, generator=torch.Generator().manual_seed(1),
                       vectorised=False, **kw)
    assert _max_diff(a, b) < 1e-5


def test_per_client_extras_vectorised_equals_sequential():
    """extras_fn as a list: client k draws with its own function (FedGen: from the generator its server
    sent); client 1's scale 0 makes its extra term vanish, as if it had none."""
    x, y, idx = _clients([3, 20, 9], shape=(2,))
    clients = fl.pack_clients(x, y, idx)
    model = models.MLP(2, 4, hidden=16)

    def scaled(s):
        return lambda xb, yb, g: {"shift": s * torch.randn(len(xb), 2, generator=g), "w": torch.tensor(float(s))}

    def loss_fn(call, params, batch):
        return fl.classification_loss(call, params, batch) + batch["w"] * call(params, batch["shift"]).pow(2).mean()

    kw = dict(steps=5, lr=0.05, batch_size=8, loss_fn=loss_fn, extras_fn=[scaled(1.0), scaled(0.0), scaled(2.0)])
    a = fl.local_train(model, fl.get_params(model), clients, generator=torch.Generator().manual_seed(1), **kw)
    b = fl.local_train(model, fl.get_params(model), clients, generator=torch.Generator().manual_seed(1),
                       vectorised=False, **kw)
    assert _max_diff(a, b) < 1e-5
    plain = fl.local_train(model, fl.get_params(model), clients, steps=5, lr=0.05, batch_size=8,
                           generator=torch.Generator().manual_seed(1))
    assert _max_diff(fl.index_params(a, 1), fl.index_params(plain, 1)) < 1e-6
    assert _max_diff(fl.index_params(a, 0), fl.index_params(plain, 0)) > 1e-4
    with pytest.raises(ValueError, match="extras_fn holds 2 functions for 3 clients"):
        fl.local_train(model, fl.get_params(model), clients, steps=1, extras_fn=[scaled(1.0)] * 2)


def test_padding_does_not_change_a_client():
    """Adding a much larger client (more padding) leaves client 0's training identical: no truncation."""
    x, y, idx = _clients([10, 200])
    model = models.SmallCNN(1, 4, width=4)
    w = fl.get_params(model)
    alone = fl.local_train(model, w, fl.pack_clients(x, y, idx[:1]), epochs=1, batch_size=8,
                           generator=torch.Generator().manual_seed(0))
    both = fl.local_train(model, w, fl.pack_clients(x, y, idx), epochs=1, batch_size=8,
                          generator=torch.Generator().manual_seed(0))
    assert _max_diff(alone, fl.index_params(both, slice(0, 1))) < 1e-6


def test_schedule_visits_every_sample_once_per_epoch():
    gens = fl.client_generators(torch.Generator().manual_seed(0), 3)
    idx, bmask, active = fl.batch_schedule([7, 16, 1], 4, epochs=3, generators=gens)
    for k, n in enumerate([7, 16, 1]):
        seen = idx[k][bmask[k].bool()]
        assert sorted(seen.tolist()) == sorted(list(range(n)) * 3)
        assert active[k].sum() == 3 * int(np.ceil(n / 4))
        assert active[k, : int(active[k].sum())].all()  # a prefix


def test_stacked_start_trains_methods_in_one_vmap():
    """M methods' global models x K clients in one call: each block starts from its own model and
    equals the sequential reference run from the same stacked start."""
    x, y, idx = _clients([8, 20])
    clients = fl.pack_clients(x, y, idx).repeat(3)
    model = models.SmallCNN(1, 4, width=4)
    starts = [fl.get_params(models.SmallCNN(1, 4, width=4)) for _ in range(3)]
    stacked = fl.stack_params([s for s in starts for _ in range(2)])
    kw = dict(epochs=1, batch_size=8, lr=0.1)
    vec = fl.local_train(model, stacked, clients, generator=torch.Generator().manual_seed(0), **kw)
    seq = fl.local_train(model, stacked, clients, generator=torch.Generator().manual_seed(0), vectorised=False, **kw)
    assert _max_diff(vec, seq) < 1e-5
    avg = fl.fedavg(vec, clients.n_k, groups=3)
    assert fl.n_stacked(avg) == 3
    for m in range(3):  # each method moved from its own start, not from another's
        d_own = sum(((avg[n][m] - starts[m][n]) ** 2).sum() for n in avg)
        d_other = sum(((avg[n][m] - starts[(m + 1) % 3][n]) ** 2).sum() for n in avg)
        assert d_own < d_other
    with pytest.raises(ValueError, match="parameter sets but there are 6 clients"):
        fl.local_train(model, fl.stack_params(starts), clients, **kw)


def test_training_reduces_loss_and_single_class_client_trains():
    x, y, idx = _clients([40, 40])
    y[idx[0]] = 2  # client 0 holds one class only
    clients = fl.pack_clients(x, y, idx)
    model = models.SmallCNN(1, 4, width=4)
    w, loss = fl.local_train(model, fl.get_params(model), clients, epochs=5, lr=0.1, batch_size=8,
                             generator=torch.Generator().manual_seed(0), return_loss=True)
    assert torch.isfinite(loss[~loss.isnan()]).all()
    assert loss[0, -1] < loss[0, 0] and loss[1, -3:].mean() < loss[1, :3].mean()


def test_fedprox_large_mu_stays_near_start():
    x, y, idx = _clients([30, 30])
    clients = fl.pack_clients(x, y, idx)
    model = models.SmallCNN(1, 4, width=4)
    w = fl.get_params(model)
    free = fl.local_train(model, w, clients, epochs=10, lr=0.05, generator=torch.Generator().manual_seed(0))
    prox = fl.local_train(model, w, clients, epochs=10, lr=0.05, mu=10.0, generator=torch.Generator().manual_seed(0))
    dist = lambda s: sum(((s[n] - w[n]) ** 2).sum() for n in w)  # noqa: E731
    assert dist(prox) < 0.5 * dist(free)


def test_fedavg_weights_by_sample_count():
    ps = [{"a": torch.full((2, 3), float(k)), "b": torch.tensor([k * 2.0])} for k in range(3)]
    stacked = fl.stack_params(ps)
    n_k = torch.tensor([1, 1, 2])
    avg = fl.fedavg(stacked, n_k)
    assert torch.allclose(avg["a"], torch.full((2, 3), (0 + 1 + 4) / 4))
    assert torch.allclose(avg["b"], torch.tensor([(0 + 2 + 8) / 4]))
    same = fl.fedavg(fl.broadcast_params(ps[1], 5), torch.arange(1, 6))
    assert torch.allclose(same["a"], ps[1]["a"])
    grouped = fl.fedavg(fl.stack_params(ps + ps), torch.tensor([1, 1, 2, 1, 1, 2]), groups=2)
    assert torch.allclose(grouped["a"][0], avg["a"]) and torch.allclose(grouped["a"][1], avg["a"])
    with pytest.raises(ValueError, match="n_k has 2 entries"):
        fl.fedavg(stacked, torch.tensor([1, 2]))
    for bad in (float("nan"), float("inf"), -1.0, 0.0):  # each would give NaN or negative weights
        for groups in (None, 1):
            with pytest.raises(ValueError, match=rf"n_k\[2\]={bad!r} .*allowed: finite counts, each must be > 0"):
                fl.fedavg(stacked, torch.tensor([1.0, 1.0, bad]), groups=groups)


def test_pack_clients_errors():
    x, y, idx = _clients([3, 3])
    with pytest.raises(ValueError, match="larger than the number of samples"):
        fl.pack_clients(x, y, [np.array([0])] * 7)
    with pytest.raises(ValueError, match=r"clients \[1\] have no samples"):
        fl.pack_clients(x, y, [idx[0], np.array([], dtype=int)])
    c = fl.pack_clients(x, y, [idx[0], idx[1][:1]])
    assert c.mask.sum(1).tolist() == [3, 1] and c.n_k.tolist() == [3, 1]


def test_concat_clients_pads():
    x, y, idx = _clients([3, 9])
    a, b = fl.pack_clients(x, y, idx[:1]), fl.pack_clients(x, y, idx[1:])
    c = fl.concat_clients([a, b])
    assert c.x.shape[:2] == (2, 9) and c.mask.sum(1).tolist() == [3, 9]
    assert torch.equal(c.x[0, :3], a.x[0])


def test_state_bytes_and_ledger():
    model = models.SmallCNN(1, 10, width=8)
    assert fl.state_bytes(model) == 4 * models.n_params(model)
    assert fl.state_bytes(fl.broadcast_params(fl.get_params(model), 3)) == 3 * fl.state_bytes(model)
    led = fl.CommLedger()
    led.log(fl.SETUP, "down", "generator", 1000, copies=10)
    led.log(fl.SETUP, "up", "discriminator", 50, copies=10)
    for r in range(3):
        led.log(r, "down", "model", 200, copies=10)
        led.log(r, "up", "model", 200, copies=10)
    assert led.total("down") == 10_000 + 3 * 2000
    assert led.total(item="discriminator") == 500
    assert led.per_round()[fl.SETUP] == {"down": 10_000, "up": 500}
    assert led.total() - led.total(round=fl.SETUP) == fl.rounds_bytes(200, 10, 3)
    with pytest.raises(ValueError, match="allowed: 'down', 'up'"):
        led.log(0, "sideways", "model", 1)


def test_flops_per_sample_positive_and_scales_with_width():
    x = torch.randn(4, 1, 8, 8)
    f4 = fl.train_flops_per_sample(models.SmallCNN(width=4), x)
    f8 = fl.train_flops_per_sample(models.SmallCNN(width=8), x)
    assert 0 < f4 < f8


def test_predict_stacked():
    model = models.SmallCNN(1, 4, width=4)
    ps = [fl.get_params(models.SmallCNN(1, 4, width=4)) for _ in range(3)]
    x = torch.randn(10, 1, 8, 8)
    out = fl.predict(fl.functional(model), fl.stack_params(ps), x, batch_size=4, stacked=True)
    assert out.shape == (3, 10, 4)
    # one forward pass: the longest reduction behind a logit is a GroupNorm statistic over 2w x 4 x 4
    # entries or the head's fan-in of 2w x 4 x 4 (w = 4)
    one = fl.predict(fl.functional(model), ps[1], x)
    assert torch.allclose(out[1], one, rtol=0, atol=float32_tolerance(one.abs().max(), 8 * 4 * 4, one.numel()))
