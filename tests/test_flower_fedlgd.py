"""FedLGD on Flower (fedlib.flower.run_fedlgd) gives what it gives in-process, keeps the local virtual sets on
the nodes, leaves bad clients out of their round, and counts its bytes.

One Flower simulation (Ray's start-up is about 20 s on the 2-core CI machine) of three clients for three
rounds: rounds 1-2 are compared with the in-process run, in round 3 client 1 sends NaN and client 2 a wrongly
shaped tensor. The drivers differ only in vmap over 1 client on a node vs over K in-process, that is in the
order of float32 additions; the bounds are tests/tolerance.py's for the size of the computation.
"""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
    pytest.skip("the optional extra 'flower' (flwr[simulation]) is not installed", allow_module_level=True)
from fedlib import flower as FW  # noqa: E402  (first: it keeps the local Ray on loopback)

from fedlib import backends  # noqa: E402
from fedlib import federated as fl  # noqa: E402
from fedlib import fedlgd as lgd  # noqa: E402
from tolerance import float32_tolerance, params_tolerance, training_terms  # noqa: E402

K, C = 3, 3
CFG = lgd.FedLGDConfig(rounds=3, local_steps=3, ipc=2, dm_iterations=2, batch_real=8, refresh_every=1,
                       refresh_iterations=2, global_ipc=1, server_steps=2, width=4, feature_width=4)
FAULTS = {(3, 1): "nan", (3, 2): "shape"}  # round 3 only: rounds 1-2 are the equivalence


def federation():
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(C, 1, 8, 8, generator=g)
    y = torch.arange(C).repeat(20)
    x = torch.tanh(2 * templates[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g))
    return [(x[20 * k:20 * (k + 1)], y[20 * k:20 * (k + 1)]) for k in range(K)], [(x, y)]


@pytest.fixture(scope="module")
def both():
    clients, tests = federation()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray actors (one core each); the Flower run too: its server (the gradient
    # matching on G) runs in this process, and with 2 threads its sums round differently (G 0.13 apart, measured)
    try:
        # one model per vmap, as on each node (FedLGDConfig.vmap_chunk)
        ref = {r: lgd.run_fedlgd(clients, tests, C, lgd.FedLGDConfig(**{**CFG.__dict__, "rounds": r, "vmap_chunk": 1}))
               for r in (1, 2)}
        res = backends.run_fedlgd(clients, tests, C, CFG, backend="flower",
                                  options=FW.FlowerOptions(ray_num_cpus=2, object_store_mb=256, faults=FAULTS,
                                                           keep_params=True))
    finally:
        torch.set_num_threads(threads)
    return ref, res


# per round: 3 local steps of batch <= 6 (the local set) and 2 x 2 DM / gradient-matching updates, on 8 x 8
def terms_after(rounds):
    return training_terms(steps=rounds * (3 + 4), batch=32, positions=8 * 8)


def test_flower_equals_inprocess_models_and_global_virtual_data(both):
    """Every model and the global virtual set G after rounds 1 and 2, to the float32 bound. The in-process
    reference trains one model per vmap, as each node does (``vmap_chunk=1``): with K models stacked, conv2d's
    backward rounds differently (1e-8), and Adam's first steps on G's pixels, nearly sign steps of size
    ``lr_global``, turn that into pixel changes of ~0.2 (measured), which FedLGD then trains on."""
    ref, res = both
    assert [e for e in res["report"].events if e["round"] != 3] == []
    gaps = {}
    for r in (1, 2):
        got = res["report"].params[r - 1]
        for m in lgd.METHODS:
            tol = params_tolerance(ref[r]["params"][m], terms_after(r))
            gaps[m, r] = max(float((got[m][n] - v).abs().max()) for n, v in ref[r]["params"][m].items())
            assert gaps[m, r] <= tol, (m, r, gaps[m, r], tol)
        x_ref, y_ref = ref[r]["global"]
        gaps["G", r] = float((got["global"].cpu() - x_ref).abs().max())
        tol = float32_tolerance(x_ref.abs().max(), terms_after(r), x_ref.numel())
        assert got["global"].shape == x_ref.shape and gaps["G", r] <= tol, (r, gaps["G", r], tol)
    print("Flower - in-process:", gaps)
    assert torch.equal(res["global"][1], ref[2]["global"][1])
    # the initial sets, distilled on each node alone, are the in-process ones exactly
    for a, b in zip(ref[2]["local_sets"], res["local_sets"]):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert [len(v) for v in res["accuracy"].values()] == [3, 3, 3]
    assert {m: v[:2] for m, v in res["accuracy"].items()} == ref[2]["accuracy"]


def test_a_nan_client_and_a_wrong_shape_client_are_left_out_of_their_round(both):
    _, res = both
    ev = [e for e in res["report"].events if e["round"] == 3]
    # each is refused twice: its three models, then its gradients
    assert sorted((e["kind"], e["partition"]) for e in ev) == [("rejected", 1)] * 2 + [("rejected", 2)] * 2, ev
    reasons = {(e["partition"], "grad/" in e["reason"]) : e["reason"] for e in ev}
    assert "non-finite" in reasons[1, False] and "non-finite" in reasons[1, True]
    assert "shape" in reasons[2, False] and "shape" in reasons[2, True]
    # round 3 averaged client 0 alone: FedAvg's global model is client 0's model, trained from round 2's on its
    # initial set with the round's seed 0
    after2, after3 = res["report"].params[1], res["report"].params[2]
    model = lgd.FedLGDServer.start((1, 8, 8), C, CFG, "cpu").model
    own = lgd.train_baselines(model, after2["FedAvg"], lgd._pack(res["local_sets"][:1]), 0.0, CFG,
                              lgd.round_generator(CFG, 2))
    for n, v in after3["FedAvg"].items():
        torch.testing.assert_close(v, own[n][0], atol=params_tolerance(own, terms_after(3)), rtol=0)
    assert not torch.equal(after3["global"], after2["global"]), "G moved on client 0's gradients"


def test_the_byte_ledger_counts_what_was_encoded(both):
    ref, res = both
    ref = ref[2]
    led, wire = res["report"].ledger, res["report"].wire
    model = fl.state_bytes(ref["params"]["FedAvg"])
    x_g, y_g = ref["global"]
    anchors = x_g.numel() * 4 + y_g.numel() * 8
    grads = C * model + C * 4  # per-class gradients [C, ...] of every parameter and the class counts
    for r in (1, 2):
        assert led.total(round=r, item="model", direction="down") == K * 3 * model
        assert led.total(round=r, item="anchors payload") == K * anchors
        assert led.total(round=r, item="model (gradient query)") == K * model
        assert led.total(round=r, item="model", direction="up") == K * 3 * model
        assert led.total(round=r, item="class gradients") == K * grads
    # round 3: all went down; up, every reply that parsed (the NaN one too; the wrong shape is 4 bytes short)
    assert led.total(round=3, direction="up", item="model") == 2 * 3 * model + 3 * model - 4
    assert led.total(round=3, direction="up", item="class gradients") == 2 * grads + grads - 4
    sets = sum(fl.state_bytes({"x": s.x, "y": s.y}) for w in ("local_sets", "refreshed") for s in res[w])
    assert led.total(item="local sets (report, not FedLGD's protocol)") == sets
    assert led.total() > 0 and wire.total() > led.total()  # Flower's records add a header per array
