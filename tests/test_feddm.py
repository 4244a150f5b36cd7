"""FedDM glue: a vectorised round equals the sequential reference, FedProx with mu=0 is FedAvg,
quantised variants count the bytes they encode, the quantised downlink keeps server and clients equal."""

import numpy as np
import pytest
import torch

from fedlib import compression as C
from fedlib import data as D
from fedlib import feddm as F
from fedlib.compression import Quantizer


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    ds = D.load_digits("train").subset(np.arange(120))
    den = F.make_denoiser(1, 4, (1, 2), process="edm", prediction="edm")
    init = {0: F.params_of(den)}
    # unequal client sizes: padding and masks are exercised
    parts = {"dirichlet": [D.dirichlet_partition(ds.y.numpy(), 3, 0.3, seed=0)]}
    return ds, den, init, parts


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
    for a, b in zip(vec, seq):
        for n in a.params:
            torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-4, atol=1e-5, msg=f"{a.label} {n}")
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
