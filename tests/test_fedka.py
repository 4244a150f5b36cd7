"""fedlib.fedka: the workspace's MMD, its gradient into the client, the vote, the config's refusals, and
two tiny rounds of FedAvg and FedKA through the rounds engine."""

import pytest
import torch

from fedlib import data as fdata
from fedlib import federated as fl
from fedlib import fedka
from fedlib.methods import get_method, majority_vote
from fedlib.models import SmallCNN


def test_mmd_is_zero_on_identical_sets_and_grows_with_a_mean_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 5, generator=g)
    assert float(fedka.gaussian_mmd(a, a.clone())) == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(64, 5, generator=g)
    vals = [float(fedka.gaussian_mmd(a, b + s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(vals, vals[1:])), vals
    # padding rows (weight 0) do not count
    padded = torch.cat([a, 100 + torch.randn(8, 5, generator=g)])
    w = torch.cat([torch.ones(64), torch.zeros(8)])
    assert float(fedka.gaussian_mmd(padded, a, w)) == pytest.approx(0.0, abs=1e-6)


def test_mmd_gradient_flows_into_the_client_features():
    model = SmallCNN(width=4)
    f = fedka.feature_fn(model)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    z = f({n: p.detach() for n, p in params.items()}, -x).detach()  # target features: another domain
    loss = fedka.gaussian_mmd(f(params, x), z)
    loss.backward()
    assert loss > 0
    trunk = [n for n in params if not n.startswith("head")]
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in trunk[:1])
    assert all(params[n].grad is None or params[n].grad.abs().sum() == 0 for n in params if n.startswith("head"))
    # the features are the head's input
    assert f(params, x).shape == (16, model.head.in_features)


def test_vote_is_the_majority_of_predictions():
    # 3 clients, 2 samples, 3 classes: sample 0 votes (2, 2, 0) -> 2; sample 1 votes (1, 1, 1) -> 1
    logits = torch.tensor([[[0, 0, 5.0], [0, 5.0, 0]], [[0, 1, 2.0], [0, 3.0, 1]], [[9.0, 0, 0], [0, 1, 0.0]]])
    q = majority_vote(logits)
    assert q.argmax(-1).tolist() == [2, 1]
    assert torch.allclose(q.sum(-1), torch.ones(2))
    assert get_method("fedka_mmd").vote and get_method("fedka_mmd").client is fedka.WORKSPACE
    assert not get_method("fedavg_mmd").vote


@pytest.mark.parametrize("field, value, words", [
    ("targets", ("inverted",), "inverted"), ("domains", ("original", "original", "rotated"), "distinct"),
    ("lambda_mmd", -1.0, "-1"), ("rounds", 0, "0"), ("workspace_batch", 1, "1"), ("val_fraction", 1.5, "1.5"),
])
def test_config_refusals_name_the_value(field, value, words):
    with pytest.raises(ValueError, match=words):
        fedka.FedKAConfig(**{field: value})


def test_method_options_are_checked():
    cfg = fedka.FedKAConfig(lambda_mmd=0.5).rounds_config()
    assert fedka.options(cfg, "fedka_mmd")["lambda_mmd"] == 0.5
    cfg.method_options["fedka_mmd"]["bandwidth"] = 1.0
    with pytest.raises(ValueError, match="bandwidth"):
        fedka.options(cfg, "fedka_mmd")


def test_one_tiny_study_runs_every_method_and_counts_the_workspace():
    train, test = fdata.load_digits("train"), fdata.load_digits("test")
    train, test = train.subset(torch.arange(240)), test.subset(torch.arange(60))
    cfg = fedka.FedKAConfig(domains=("original", "rotated", "noisy"), targets=("noisy",), seeds=(0,), rounds=2,
                            distill_steps=2, workspace_batch=8, measure_n=32, width=4)
    ds = fedka.domain_setup(cfg, train, test, "noisy", 0)
    assert ds.sources == ("original", "rotated") and ds.setup.clients.n_clients == 2
    # the server holds the target's images without labels in the clients' data
    assert torch.equal(ds.setup.test_x, fdata.shift_domain(test.x, "noisy"))
    res = fedka.run_domain_study(cfg, train, test, methods=("fedavg", "fedka_mmd"))
    assert set(res.final.method) == {"fedavg", "fedka_mmd"} and len(res.rounds) == 2 * 2
    assert res.final.target_accuracy.between(0, 1).all() and (res.final.feature_mmd >= 0).all()
    # the workspace: 8 target feature vectors (the head's 128 inputs) and the weight, as float32, per client
    assert res.payload_bytes["workspace"] == fl.state_bytes({"f": torch.zeros(8, 128), "w": torch.tensor(1.0)})


@pytest.mark.slow  # a local Ray (about 40 s on this CPU): run with -m slow; CI covers Flower in test_flower.py
def test_the_workspace_methods_run_on_flower_as_in_process():
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from fedlib import backends
    from fedlib import flower as FW
    from fedlib.models import SmallCNN
    from fedlib.rounds import run_rounds

    train, test = fdata.load_digits("train"), fdata.load_digits("test")
    cfg = fedka.FedKAConfig(domains=("original", "rotated", "noisy"), targets=("noisy",), seeds=(0,), rounds=2,
                            distill_steps=5, workspace_batch=16)
    ds = fedka.domain_setup(cfg, train.subset(torch.arange(600)), test.subset(torch.arange(100)), "noisy", 0)
    torch.manual_seed(0)
    model = SmallCNN()
    init, methods = fl.get_params(model), ["fedavg", "fedavg_mmd", "fedka_mmd"]
    ref = run_rounds(model, [ds.setup], methods, cfg.rounds_config(), init=init, generator=torch.Generator().manual_seed(2))
    res = backends.run_rounds(model, [ds.setup], methods, cfg.rounds_config(), init=init, backend="flower",
                              generator=torch.Generator().manual_seed(2),
                              options=FW.FlowerOptions(ray_num_cpus=2, object_store_mb=256))
    assert torch.equal(res.accuracy, ref.accuracy)
    for n in ref.params:
        assert torch.allclose(res.params[n], ref.params[n], atol=1e-5, rtol=0), n
    assert res.report.ledger.total(item="mmd payload", round=2) == ref.ledger.total(item="mmd payload", round=2) > 0
