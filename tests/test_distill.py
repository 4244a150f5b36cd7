"""fedlib.distill: pseudo-labels, majority vote, KL distillation, the FedGO protocol pieces."""

import re

import pytest
import torch

from fedlib import datafree
from fedlib import distill as D
from fedlib import methods
from fedlib import fedgo
from fedlib import federated as fl
from fedlib import models
from fedlib import weighting as W
from tolerance import float32_tolerance


def test_pseudo_labels_prob_and_logit():
    logits = torch.randn(3, 5, 4)
    a = torch.softmax(torch.randn(3, 5), 0)
    q = D.pseudo_labels(logits, a)
    assert torch.allclose(q.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(q, (a[..., None] * logits.softmax(-1)).sum(0))
    ql = D.pseudo_labels(logits, a, mode="logit", temperature=2.0)
    assert torch.allclose(ql, torch.softmax((a[..., None] * logits).sum(0) / 2.0, -1))
    one = torch.zeros(3, 5)
    one[1] = 1.0
    assert torch.allclose(D.pseudo_labels(logits, one), logits[1].softmax(-1))  # all weight on client 1
    with pytest.raises(ValueError, match="unknown pseudo-label mode 'mean'; allowed: 'prob', 'logit'"):
        D.pseudo_labels(logits, a, mode="mean")
    with pytest.raises(ValueError, match=r"must be \[K, N\]"):
        D.pseudo_labels(logits, a[:, :4])


def test_majority_vote():
    logits = torch.tensor([[[5.0, 0, 0], [0, 5, 0]], [[5, 0, 0], [0, 0, 5]], [[0, 5, 0], [5, 0, 0]]])
    q = D.majority_vote(logits)  # sample 0: votes 0,0,1 -> 0; sample 1: 1,2,0 -> three-way tie
    assert torch.allclose(q[0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(q[1], torch.full((3,), 1 / 3))


def test_kl_distill_matches_targets_and_vectorises():
    torch.manual_seed(0)
    model = models.MLP(2, 3, hidden=16)
    x = torch.randn(256, 2)
    targets = torch.softmax(3 * x @ torch.randn(2, 3), -1)  # a learnable teacher
    call = fl.functional(model)
    w0 = fl.get_params(model)
    before = D.kl_to_targets(call(w0, x), targets).mean()
    w = D.kl_distill_params(model, w0, x, targets, steps=200, lr=1e-2, generator=torch.Generator().manual_seed(0))
    after = D.kl_to_targets(call(w, x), targets).mean()
    assert after < 0.3 * before
    # two models in one vmap == one at a time (same batch indices)
    t2 = torch.stack([targets, targets.flip(0)])
    both = D.kl_distill_params(model, fl.broadcast_params(w0, 2), x, t2, steps=20, generator=torch.Generator().manual_seed(1))
    alone = D.kl_distill_params(model, w0, x, t2[1], steps=20, generator=torch.Generator().manual_seed(1))
    assert max((both[n][1] - alone[n]).abs().max().item() for n in alone) < 1e-5


def test_functional_adam_matches_torch():
    torch.manual_seed(0)
    model = models.MLP(2, 3, hidden=8)
    x, targets = torch.randn(32, 2), torch.softmax(torch.randn(32, 3), -1)
    w = D.kl_distill_params(model, fl.get_params(model), x, targets, steps=5, lr=1e-2, batch_size=32,
                     generator=torch.Generator().manual_seed(0))
    ref = models.MLP(2, 3, hidden=8)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        i = torch.randint(0, 32, (32,), generator=g)
        loss = D.kl_to_targets(ref(x[i]), targets[i]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max((w[n] - p).abs().max().item() for n, p in ref.named_parameters()) < 1e-5


def test_discriminators_recover_density_ratio_direction():
    """Each client's D_k, trained against a broad Gaussian G, scores its own region higher, and the
    FedGO weights it gives are closer to the oracle than uniform weights."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    x = torch.cat([centres[0] + 0.3 * torch.randn(150, 2, generator=g), centres[1] + 0.3 * torch.randn(60, 2, generator=g)])
    y = torch.cat([torch.zeros(150), torch.ones(60)]).long()
    clients = fl.pack_clients(x, y, [torch.arange(150), torch.arange(150, 210)])
    Dm = models.MLPDiscriminator(2, hidden=32)
    dp = fedgo.train_discriminators(Dm, fedgo.GaussianSource(2, 3.0), clients, epochs=40, lr=0.05, generator=g)
    probe = centres
    logits = fedgo.discriminator_logits(Dm, dp, probe)  # [K=2, 2 points]
    assert logits[0, 0] > logits[1, 0] and logits[1, 1] > logits[0, 1]
    a = W.fedgo_weights(logits, clients.n_k)
    assert a[0, 0] > 0.9 and a[1, 1] > 0.9


def test_discriminator_nan_is_a_clear_error():
    Dm = models.MLPDiscriminator(2, hidden=4)
    p = fl.broadcast_params(fl.get_params(Dm), 2)
    p["net.net.0.weight"][1] = float("nan")
    with pytest.raises(ValueError, match="discriminator produced NaN"):
        fedgo.discriminator_logits(Dm, p, torch.randn(3, 2))


def test_gan_and_dense_run_and_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    G = models.make_generator((1, 8, 8), z_dim=8)
    fedgo.train_gan(x, G, models.make_discriminator((1, 8, 8)), steps=3, batch_size=16, generator=g)
    assert fedgo.sample(G, 10, g).shape == (10, 1, 8, 8)
    clf = models.SmallCNN(1, 10, width=4)
    clients = fl.broadcast_params(fl.get_params(clf), 3)
    Gd = models.make_generator((1, 8, 8), z_dim=8 + 10)
    w = datafree.dense_distill(clf, fl.get_params(clf), clients, Gd, 10, steps=2, batch_size=8, generator=g)
    assert set(w) == set(fl.get_params(clf))


def test_fedgo_overhead_shrinks_with_rounds():
    kw = dict(classifier_bytes=1000, generator_bytes=3000, discriminator_bytes=500, n_clients=10, n_k=[50] * 10,
              local_epochs=1, disc_epochs=2, clf_flops=100.0, disc_flops=40.0, gen_forward_flops=10.0)
    few, many = fedgo.fedgo_overhead(rounds=5, **kw), fedgo.fedgo_overhead(rounds=500, **kw)
    assert few["extra_bytes"] == 10 * 3500 and few["training_bytes"] == 2 * 1000 * 10 * 5
    assert many["bytes_pct"] < few["bytes_pct"] and many["flops_pct"] < few["flops_pct"]
    assert few["extra_client_flops"] == 500 * 2 * (80 + 10)


def test_run_rounds_small_end_to_end():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1, 8, 8)
    y = torch.randint(0, 3, (120,))
    parts = [torch.arange(0, 30), torch.arange(30, 40), torch.arange(40, 80)]
    clients = fl.pack_clients(x, y, parts)
    setup = D.Setup(clients, x[80:], x[:20], y[:20], y[80:], disc_logits=torch.randn(3, 40))
    clf = models.SmallCNN(1, 3, width=4)
    res = D.run_rounds(clf, [setup, setup], ["fedavg", "fedprox", "feddf", "fedgo", "fedka"], rounds=2,
                       distill_steps=3, generator=g)
    assert res.accuracy.shape == (2, 5, 2) and torch.isfinite(res.accuracy).all()
    assert torch.isnan(res.teacher_accuracy[:, :2]).all() and torch.isfinite(res.teacher_accuracy[:, 2:]).all()
    with pytest.raises(ValueError, match="unknown method 'fedsgd'"):
        D.run_rounds(clf, [setup], ["fedsgd"], rounds=1)


def _teacher_problem():
    torch.manual_seed(0)
    model = models.MLP(2, 3, hidden=16)
    x = torch.randn(300, 2)
    return model, x, torch.softmax(3 * x @ torch.randn(2, 3), -1)


def test_epoch_distillation_keeps_the_best_held_out_epoch_and_stops_early():
    """The epoch budget: each model keeps the epoch whose KL to the teacher on the held-out part of the
    server data is lowest (the FedAvg start included), and stops once none improved for `patience`."""
    model, x, targets = _teacher_problem()
    call, w0 = fl.functional(model), fl.get_params(model)
    report = {}
    w = D.kl_distill_params(model, w0, x, targets, epochs=8, lr=1e-2, val_fraction=0.2, cosine=True,
                            generator=torch.Generator().manual_seed(0), report=report)
    assert report["epochs_run"] == 8 and 1 <= int(report["best_epoch"][0]) <= 8
    assert D.kl_to_targets(call(w, x), targets).mean() < 0.5 * D.kl_to_targets(call(w0, x), targets).mean()
    # a diverging learning rate never beats the start on held-out data: the start is kept, and with
    # patience 2 the loop stops after two epochs
    report = {}
    bad = D.kl_distill_params(model, w0, x, targets, epochs=10, lr=1e3, val_fraction=0.2, patience=2,
                              generator=torch.Generator().manual_seed(0), report=report)
    assert report["epochs_run"] == 2 and int(report["best_epoch"][0]) == 0
    assert all(torch.equal(bad[n], w0[n]) for n in w0)
    with pytest.raises(ValueError, match="exactly one distillation budget"):
        D.kl_distill_params(model, w0, x, targets, steps=5, epochs=5)


def test_epoch_distillation_vectorises_over_models_with_their_own_best_epochs():
    model, x, targets = _teacher_problem()
    w0 = fl.get_params(model)
    t2 = torch.stack([targets, targets.flip(0)])
    both = D.kl_distill_params(model, fl.broadcast_params(w0, 2), x, t2, epochs=3, val_fraction=0.25,
                               generator=torch.Generator().manual_seed(1))
    alone = D.kl_distill_params(model, w0, x, t2[1], epochs=3, val_fraction=0.25,
                                generator=torch.Generator().manual_seed(1))
    assert max((both[n][1] - alone[n]).abs().max().item() for n in alone) < 1e-5


def test_cosine_schedule_and_predict_each():
    assert methods._lr_at(0.1, 1, 10, True) == pytest.approx(0.1) and methods._lr_at(0.1, 10, 10, True) < 0.01
    assert methods._lr_at(0.1, 7, 10, False) == 0.1
    clf = models.SmallCNN(1, 10, width=4)
    stacked = fl.broadcast_params(fl.get_params(clf), 3)
    stacked = {n: p + 0.01 * torch.randn_like(p) for n, p in stacked.items()}
    x = torch.randn(50, 1, 8, 8)
    call = fl.functional(clf)
    each = fl.predict(call, stacked, x, stacked=True)
    # one forward pass: its longest reduction is the head's fan-in, 2w x 4 x 4 (w = 4)
    tol = float32_tolerance(each.abs().max(), 8 * 4 * 4, each.numel())
    assert torch.allclose(D.predict_each(call, stacked, x, 16), each, rtol=0, atol=tol)


def test_run_rounds_epoch_budget_logs_the_distillation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 1, 8, 8), torch.randint(0, 3, (120,))
    clients = fl.pack_clients(x, y, [torch.arange(0, 30), torch.arange(30, 80)])
    setup = D.Setup(clients, x[80:], x[:20], y[:20], y[80:], disc_logits=torch.randn(2, 40))
    res = D.run_rounds(models.SmallCNN(1, 3, width=4), [setup], ["fedavg", "feddf", "fedgo"], rounds=2,
                       distill_epochs=2, distill_val=0.25, generator=g)
    assert [e["round"] for e in res.distill_log] == [1, 2] and res.distill_log[0]["groups"] == [1, 2]
    assert all(e["epochs_run"] <= 2 and e["val_kl"].shape == (2,) for e in res.distill_log)
    assert torch.isfinite(res.accuracy).all()


# --- one validated config for a run of rounds -----------------------------------------------------

def test_run_rounds_takes_one_config_not_a_keyword_per_setting():
    import inspect

    from fedlib import backends

    assert len(inspect.signature(D.run_rounds).parameters) <= 10
    assert len(inspect.signature(backends.run_rounds).parameters) <= 10
    # every setting the old keywords carried is a field, and the server side is ServerConfig's
    fields = set(D.RoundsConfig.__dataclass_fields__)
    assert {"rounds", "local_epochs", "lr", "momentum", "batch_size", "mu"} <= fields
    assert set(D.ServerConfig.__dataclass_fields__) - {"generator"} <= fields
    cfg = D.RoundsConfig(rounds=2, distill_lr=0.01, method_options={"fedgen": {"weight": 1.0}})
    server = cfg.server(torch.Generator())
    assert server.distill_lr == 0.01 and server.method_options == {"fedgen": {"weight": 1.0}}
    assert server.method_options is not cfg.method_options  # a run never writes into the caller's config


@pytest.mark.parametrize("field, value, allowed", [
    ("rounds", 0, ">= 1"), ("rounds", 1.5, "an integer"), ("lr", 0.0, "> 0"), ("lr", float("nan"), "> 0"),
    ("momentum", 1.0, "< 1"), ("mu", -0.1, ">= 0"), ("batch_size", 0, ">= 1"), ("local_epochs", -1, ">= 0"),
    ("distill_val", 1.0, "< 1"), ("temperature", 0, "> 0"), ("chunk_size", 0, ">= 1"), ("dense_steps", -2, ">= 0"),
    ("pseudo_label_mode", "soft", "'prob', 'logit'"), ("method_options", [], "a dict")])
def test_rounds_config_refuses_a_bad_value_naming_it_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=re.escape(repr(value)) + ".*" + re.escape(allowed)):
        D.RoundsConfig(**{"rounds": 1, field: value})


def test_run_rounds_refuses_an_unknown_setting_and_a_config_with_settings():
    setup = D.Setup(fl.pack_clients(torch.randn(6, 1, 8, 8), torch.zeros(6, dtype=torch.long), [torch.arange(6)]),
                    torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="distil_lr.*allowed: rounds"):
        D.run_rounds(models.SmallCNN(1, 3, width=4), [setup], ["fedavg"], rounds=1, distil_lr=0.1)
    with pytest.raises(ValueError, match="config and the settings"):
        D.run_rounds(models.SmallCNN(1, 3, width=4), [setup], ["fedavg"], D.RoundsConfig(rounds=1), rounds=1)
    clf = models.SmallCNN(1, 3, width=4)
    a = D.run_rounds(clf, [setup], ["fedavg"], D.RoundsConfig(rounds=2, batch_size=4),
                     generator=torch.Generator().manual_seed(0))
    b = D.run_rounds(clf, [setup], ["fedavg"], rounds=2, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.accuracy, b.accuracy) and all(torch.equal(a.params[n], b.params[n]) for n in a.params)
