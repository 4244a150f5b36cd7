"""FedDM glue: a vectorised round equals the sequential reference, FedProx with mu=0 is FedAvg,
quantised variants count the bytes they encode, the quantised downlink keeps server and clients equal."""

import numpy as np
import pytest
import torch

from fedlib import compression as C
from fedlib import data as D
from fedlib import feddm as F
from fedlib.compression import Quantizer
from fedlib.verdicts import per_seed
from tolerance import params_tolerance, training_terms


@pytest.fixture(scope="module")
def setup():
    # one thread for speed only (these tiny vmapped U-Nets run several times slower at two on a 2-core
    # machine); the tolerances below do not depend on it, and the count is restored for later modules
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = D.load_digits("train").subset(np.arange(120))
    den = F.make_denoiser(1, 4, (1, 2), process="edm", prediction="edm")
    init = {0: F.params_of(den)}
    # unequal client sizes: padding and masks are exercised
    parts = {"dirichlet": [D.dirichlet_partition(ds.y.numpy(), 3, 0.3, seed=0)]}
    yield ds, den, init, parts
    torch.set_num_threads(threads)


def _groups(setup, variants):
    ds, den, init, parts = setup
    return F.build_groups(den, ds.x, ds.y, parts, variants, [0], init)


def _round(setup, variants, vectorised=True, r=1, groups=None):
    groups = groups or _groups(setup, variants)
    F.feddm_round(setup[1], groups, r, local_steps=3, batch_size=8, lr=0.05, momentum=0.9,
                  generator=torch.Generator().manual_seed(7), vectorised=vectorised)
    return groups


def test_vectorised_round_equals_sequential_reference(setup):
    variants = [F.Variant("vanilla"), F.Variant("prox", mu=0.1), F.Variant("q8", uplink=Quantizer(8)), F.Variant("central", central=True)]
    sizes = [len(p) for p in setup[3]["dirichlet"][0]]
    assert len(set(sizes)) > 1
    vec, seq = _round(setup, variants, True), _round(setup, variants, False)
    # 3 local steps of batch 8 (the central group: K x 8) on 8 x 8 images: a conv gradient entry sums
    # batch x 64 products per step
    terms = training_terms(steps=3, batch=8 * len(sizes), positions=8 * 8)
    for a, b in zip(vec, seq):
        tol = params_tolerance(b.params, terms)
        for n in a.params:
            torch.testing.assert_close(a.params[n], b.params[n], rtol=0, atol=tol, msg=f"{a.label} {n}")
        assert a.ledger.total("up") == b.ledger.total("up")


def test_prox_with_mu_zero_is_fedavg_and_mu_pulls_towards_global(setup):
    # each run draws the same random numbers (same generator seed, one group per run)
    groups = [_round(setup, [v])[0] for v in (F.Variant("vanilla"), F.Variant("prox0", mu=0.0),
                                               F.Variant("prox", mu=50.0))]
    w0 = setup[2][0]
    for n in w0:
        assert torch.equal(groups[0].params[n], groups[1].params[n])
    dist = [sum(((g.params[n] - w0[n]) ** 2).sum() for n in w0).sqrt() for g in groups]
    assert dist[2] < 0.5 * dist[0]


def test_quantised_uplink_counts_its_payload_and_stays_close_to_vanilla(setup):
    # one run per variant so that all draw the same noise and the differences are the quantisation's
    groups = [_round(setup, [v])[0] for v in (F.Variant("vanilla"), F.Variant("q16", uplink=Quantizer(16)),
                                               F.Variant("q8", uplink=Quantizer(8)), F.Variant("q4", uplink=Quantizer(4, "channel")))]
    w0 = setup[2][0]
    n_params = sum(p.numel() for p in w0.values())
    n_tensors = len(w0)
    model_bytes = 4 * n_params
    assert groups[0].ledger.total("up") == 3 * model_bytes
    q8_up = groups[2].ledger.total("up")
    sizes = [C.packed_size(p.numel(), 8) + 8 for p in w0.values()]
    assert q8_up == 3 * sum(sizes) == 3 * (n_params + 8 * n_tensors)
    # this 10k-parameter net has 8 bytes of scale + zero point on each of its tensors: below 4x
    assert 3.6 < model_bytes * 3 / q8_up < 4.0
    err = {g.variant.name: max((g.params[n] - groups[0].params[n]).abs().max().item() for n in w0) for g in groups}
    assert err["q16"] < err["q8"] < err["q4"]
    assert err["q16"] < 1e-3
    for g in groups:  # first round: the float32 model goes down to every client
        assert g.ledger.total("down") == 3 * model_bytes


def test_quantised_downlink_server_equals_client_reconstruction(setup):
    v = F.Variant("q8 down8", uplink=Quantizer(8), downlink=Quantizer(8))
    groups = _groups(setup, [v])
    g = groups[0]
    start = {n: p.clone() for n, p in g.params.items()}
    _round(setup, [v], groups=groups, r=1)
    after1 = {n: p.clone() for n, p in g.params.items()}
    change = {n: after1[n] - start[n] for n in start}
    # the server's model is on the client's grid: start + (lo + scale * q) for every tensor
    for n in change:
        q = C.quantize_tensor(change[n], 8)
        torch.testing.assert_close(C.dequantize_tensor(q), change[n], rtol=0, atol=1e-6)
    sent = g.next_down_bytes
    assert sent == sum(C.packed_size(p.numel(), 8) + 8 for p in start.values())
    _round(setup, [v], groups=groups, r=2)
    assert g.ledger.total("down", round=2) == 3 * sent
    assert 3.6 < g.ledger.total("down", round=1) / g.ledger.total("down", round=2) < 4.0


def test_sample_stacked_shapes_and_same_noise(setup):
    _, den, init, _ = setup
    params = {n: torch.stack([p, p]) for n, p in init[0].items()}
    x, nfe = F.sample_stacked(den, params, 5, steps=3, image_shape=(1, 8, 8))
    assert x.shape == (2, 5, 1, 8, 8) and nfe == 3
    torch.testing.assert_close(x[0], x[1])


def test_make_variants_names_and_kinds():
    vs = F.make_variants(mu=(0.0, 0.01, 0.1), bits=(32, 8, 4), down_bits=8)
    assert [v.kind for v in vs] == ["vanilla", "prox", "prox", "quant", "quant", "central"]
    assert vs[3].name == "quant 8-bit (down 8)"
    assert vs[3].uplink == Quantizer(8) and vs[3].downlink == Quantizer(8) and vs[0].uplink is None


def test_upload_and_receive_are_the_wire_format(setup):
    """The payload a client sends decodes, from its bytes alone, to what the server aggregates."""
    w0 = setup[2][0]
    w_k = {n: p + 0.01 * torch.randn_like(p) for n, p in w0.items()}
    plain = F.upload(w_k, w0, None)
    assert plain.n_bytes == C.float32_bytes(w0) and F.receive(plain, w0, None) is w_k
    up = F.upload(w_k, w0, Quantizer(8))
    assert up.n_bytes == len(up.blob) < plain.n_bytes / 3.5
    update = F.receive(up, w0, Quantizer(8))
    for n in w0:
        torch.testing.assert_close(update[n], w_k[n] - w0[n], rtol=0, atol=0.02 * float((w_k[n] - w0[n]).abs().max()) + 1e-8)
    with pytest.raises(ValueError, match="expected"):
        F.receive(F.Upload(up.n_bytes - 1, blob=up.blob[:-1]), w0, Quantizer(8))


def test_aggregate_leaves_out_clients_not_accepted_and_keeps_a_group_with_none(setup):
    g = _groups(setup, [F.Variant("vanilla")])[0]
    w0 = {n: p.clone() for n, p in g.params.items()}
    received = [{n: p + k for n, p in w0.items()} for k in range(3)]
    n_k = g.clients.n_k.double()
    events = []
    F.aggregate(g, 1, received, [4] * 3, [True, False, True], on_event=lambda *a: events.append(a))
    w = (n_k[0] * 0 + n_k[2] * 2) / (n_k[0] + n_k[2])
    for n in w0:
        torch.testing.assert_close(g.params[n], w0[n] + float(w))
    assert g.ledger.total("up", round=1) == 8 and not events
    before = {n: p.clone() for n, p in g.params.items()}
    F.aggregate(g, 2, [None] * 3, [0] * 3, [False] * 3, on_event=lambda *a: events.append(a))
    assert all(torch.equal(before[n], g.params[n]) for n in before) and events[0][1] == "group-kept"


# ----------------------------------------------------------------------------------------------
# the proximal term, point by point against docs/methods.md section 2 (issue 14: defect or scale?)
def _quadratic_loss(target):
    """0.5 ||w - target||^2 summed over all tensors: its gradient is w - target."""
    def loss_fn(call, params, batch):
        return 0.5 * sum(((params[n] - target[n]) ** 2).sum() for n in params) + 0.0 * batch["mask"].sum()
    return loss_fn


@pytest.mark.parametrize("vectorised", [True, False])
def test_prox_gradient_is_mu_times_the_distance_to_the_global_model_through_momentum(vectorised):
    """Two SGD steps with momentum m on loss + (mu/2)||w - w_g||^2, by hand: g_t = (w_t - c) + mu (w_t - w_g),
    b_t = m b_{t-1} + g_t, w_{t+1} = w_t - lr b_t (torch.optim.SGD's convention: the proximal gradient
    goes through the momentum buffer, which starts at zero every round)."""
    from fedlib import federated as fl

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    w_g = fl.get_params(net)
    c = {n: torch.randn_like(p) for n, p in w_g.items()}
    clients = fl.pack_clients(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), [np.arange(2), np.arange(2, 4)])
    lr, m, mu = 0.1, 0.9, 3.0
    got = fl.local_train(net, w_g, clients, _quadratic_loss(c), steps=2, lr=lr, momentum=m, mu=mu, batch_size=2,
                         generator=torch.Generator().manual_seed(0), vectorised=vectorised)
    for n in w_g:
        w, b = w_g[n].clone(), torch.zeros_like(w_g[n])
        for _ in range(2):
            g = (w - c[n]) + mu * (w - w_g[n])
            b = m * b + g
            w = w - lr * b
        for k in range(2):
            torch.testing.assert_close(got[n][k], w, rtol=1e-5, atol=1e-6)


def test_prox_fixed_point_is_between_the_local_optimum_and_the_global_model():
    """Run to convergence, the client lands on argmin 0.5||w - c||^2 + (mu/2)||w - w_g||^2 = (c + mu w_g)/(1 + mu)."""
    from fedlib import federated as fl

    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2)
    w_g = fl.get_params(net)
    c = {n: torch.randn_like(p) for n, p in w_g.items()}
    clients = fl.pack_clients(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), [np.arange(2)])
    for mu in (0.0, 1.0, 9.0):
        got = fl.local_train(net, w_g, clients, _quadratic_loss(c), steps=300, lr=0.05, momentum=0.9, mu=mu, batch_size=2)
        for n in w_g:
            torch.testing.assert_close(got[n][0], (c[n] + mu * w_g[n]) / (1 + mu), rtol=1e-4, atol=1e-5)


class _Spy:
    """Records what feddm hands to local_train (start, mu, number of clients) and calls it."""

    def __init__(self, monkeypatch):
        from fedlib import federated as fl

        self.calls, self._real = [], fl.local_train
        monkeypatch.setattr(F, "local_train", self)

    def __call__(self, model, start, clients, *a, **kw):
        self.calls.append({"start": {n: p.clone() for n, p in start.items()}, "mu": kw.get("mu", 0.0),
                           "clients": clients.n_clients})
        return self._real(model, start, clients, *a, **kw)


def test_prox_anchor_is_the_rounds_global_model_and_only_prox_clients_use_mu(setup, monkeypatch):
    """Round 2's proximal reference is the global model the server formed in round 1 (not the
    initialisation, not a client's own last model); every client of a prox variant trains with its mu,
    and no client of vanilla, quant or central does."""
    spy = _Spy(monkeypatch)
    variants = [F.Variant("vanilla"), F.Variant("prox", mu=0.5), F.Variant("q8", uplink=Quantizer(8)),
                F.Variant("central", central=True)]
    groups = _groups(setup, variants)
    k = groups[0].clients.n_clients
    _round(setup, variants, groups=groups, r=1)
    after1 = {g.variant.name: {n: p.clone() for n, p in g.params.items()} for g in groups}
    spy.calls.clear()
    _round(setup, variants, groups=groups, r=2)
    by_mu = {float(c["mu"]): c for c in spy.calls if c["clients"] > 1}
    assert set(by_mu) == {0.0, 0.5}
    assert by_mu[0.5]["clients"] == k  # the prox group's K clients, all with mu
    assert by_mu[0.0]["clients"] == 2 * k  # vanilla + quant, mu 0
    central_call = [c for c in spy.calls if c["clients"] == 1]
    assert len(central_call) == 1 and float(central_call[0]["mu"]) == 0.0
    prox_start = by_mu[0.5]["start"]
    w_init = setup[2][0]
    for n in w_init:
        for i in range(k):
            torch.testing.assert_close(prox_start[n][i], after1["prox"][n], rtol=0, atol=0)
        assert not torch.equal(after1["prox"][n], w_init[n]) or n.endswith("bias")


def test_a_strong_proximal_term_keeps_round_two_near_round_ones_global_model(setup):
    """Behaviour, not bookkeeping: the server's global model after round 1 is moved away from the
    initialisation; in round 2 a strong proximal term (mu 30, lr * mu = 1.5: stable) keeps the clients
    near that model, far nearer than vanilla clients drift, and nowhere near the initialisation."""
    drift = {}
    w_init = setup[2][0]
    for v in (F.Variant("vanilla"), F.Variant("prox", mu=30.0)):
        g = _groups(setup, [v])[0]
        F.feddm_round(setup[1], [g], 1, local_steps=3, batch_size=8, lr=0.05, momentum=0.0,
                      generator=torch.Generator().manual_seed(7))
        g.params = {n: p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in g.params.items()}
        anchor = {n: p.clone() for n, p in g.params.items()}
        F.feddm_round(setup[1], [g], 2, local_steps=10, batch_size=8, lr=0.05, momentum=0.0,
                      generator=torch.Generator().manual_seed(8))
        dist = lambda a, b: float(sum(((a[n] - b[n]) ** 2).sum() for n in a).sqrt())  # noqa: E731
        drift[v.name] = (dist(g.params, anchor), dist(anchor, w_init))
    assert drift["prox"][0] < 0.2 * drift["vanilla"][0]
    assert drift["prox"][0] < 0.1 * drift["prox"][1]


def test_shared_client_store_holds_each_partition_once_and_trains_identically(setup):
    """The vmap's data view reads one copy of each (partition, seed) however many variants train on
    it, and gives local training exactly the batches the copied concatenation gave."""
    from fedlib import federated as fl

    variants = [F.Variant(f"v{i}") for i in range(4)]
    groups = _groups(setup, variants)
    view = F.shared_clients([g.clients for g in groups])
    copied = fl.concat_clients([g.clients for g in groups])
    assert view.x.base.shape[0] == groups[0].clients.n_clients  # one partition, one seed: stored once
    assert view.n_clients == copied.n_clients == 4 * groups[0].clients.n_clients
    torch.testing.assert_close(view.x.materialize(), copied.x)
    torch.testing.assert_close(view.n_k, copied.n_k)
    den = setup[1]
    kw = dict(steps=2, lr=0.05, momentum=0.9, batch_size=8, extras_fn=F.noise_extras(den.process))
    start = F._repeat_each([g.params for g in groups], groups[0].clients.n_clients)
    for vectorised in (True, False):
        a = fl.local_train(den.net, start, view, F.diffusion_client_loss(den), generator=torch.Generator().manual_seed(3),
                           vectorised=vectorised, **kw)
        b = fl.local_train(den.net, start, copied, F.diffusion_client_loss(den), generator=torch.Generator().manual_seed(3),
                           vectorised=vectorised, **kw)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_history_readers_pair_seeds_and_pick_mu_on_the_named_metric():
    rows = []
    for seed, (van, p1, p2, iid, val1, val2) in enumerate([(5.0, 4.0, 6.0, 3.0, 9.0, 1.0), (5.5, 4.4, 6.1, 3.2, 9.0, 1.0),
                                                           (5.2, 4.1, 6.3, 3.1, 9.0, 1.0)]):
        for v, kind, mu, f, fv in (("vanilla", "vanilla", 0.0, van, 5), ("prox mu=0.1", "prox", 0.1, p1, val1),
                                   ("prox mu=1", "prox", 1.0, p2, val2)):
            rows.append({"variant": v, "kind": kind, "mu": mu, "partition": "dirichlet 0.1", "seed": seed, "round": 3,
                         "fd": f, "fd_val": fv})
        rows.append({"variant": "vanilla", "kind": "vanilla", "mu": 0.0, "partition": "iid", "seed": seed, "round": 3,
                     "fd": iid, "fd_val": 0})
    np.testing.assert_allclose(per_seed(rows, "fd", [2, 0], last="round", variant="prox mu=0.1", partition="dirichlet 0.1"),
                               [4.1, 4.0])
    with pytest.raises(ValueError, match="seeds"):
        per_seed(rows, "fd", [0, 7], last="round", variant="prox mu=0.1", partition="dirichlet 0.1")
    mu, table = F.mu_search(rows, "dirichlet 0.1", metric="fd_val")
    assert mu == 1.0 and table.loc[table["chosen"], "variant"].item() == "prox mu=1"  # the validation metric, not fd
    gaps = F.paired_gaps(rows)
    g = gaps[(gaps["series"] == "prox mu=0.1")].sort_values("seed")["gap"].to_numpy()
    np.testing.assert_allclose(g, [-1.0, -1.1, -1.1])
    pen = gaps[gaps["series"] == F.PENALTY].sort_values("seed")["gap"].to_numpy()
    np.testing.assert_allclose(pen, [2.0, 2.3, 2.1])
