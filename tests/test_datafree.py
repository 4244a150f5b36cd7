"""fedlib.datafree: FedGen, FedFTG and Co-Boosting (issue 16). Each loss's gradient on a tiny case where
it is known in closed form; a round of each equals its sequential reference (clients one at a time,
FedAvg by hand, the server step called directly); the generators of FedGen and FedFTG improve their own
objective on a toy; the client term's payload is counted in the ledger."""

import pytest
import torch
import torch.nn.functional as F

from fedlib import datafree as DF
from fedlib import distill as D
from fedlib import federated as fl
from fedlib import models
from tolerance import float32_tolerance, training_terms


def _grad(f, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    return torch.autograd.grad(f(*xs), xs)


# ----------------------------------------------------------------------------------------------
# label counts, class-level weights, prior
def test_label_counts_class_weights_and_prior():
    x = torch.zeros(6, 2)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    clients = fl.pack_clients(x, y, [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])])
    n = DF.label_counts(clients, 4)
    assert torch.equal(n, torch.tensor([[2.0, 1, 0, 0], [0, 0, 3, 0]]))
    assert torch.equal(DF.label_counts(clients, 4, torch.tensor([1])), n[1:])
    a = DF.class_weights(n)
    assert torch.allclose(a, torch.tensor([[1.0, 1, 0, 0.5], [0, 0, 1, 0.5]]))  # class 3: nobody, uniform
    assert torch.allclose(DF.label_prior(n), torch.tensor([2.0, 1, 3, 0]) / 6)


# ----------------------------------------------------------------------------------------------
# gradients of every loss on tiny cases with closed forms
def test_fedgen_generator_loss_gradient():
    torch.manual_seed(0)
    K, B, C = 3, 5, 4
    g = torch.randn(K, B, C)
    y = torch.tensor([0, 1, 3, 3, 2])
    alpha = DF.class_weights(torch.rand(K, C) + 0.1)
    (grad,) = _grad(lambda t: DF.fedgen_generator_loss(t, y, alpha, "logits"), g)
    a = alpha[:, y]  # [K, B]
    mix = (a[..., None] * g).sum(0)
    expect = a[..., None] * (mix.softmax(-1) - F.one_hot(y, C)) / B
    assert torch.allclose(grad, expect, atol=1e-6)


def test_fedgen_client_term_gradient_on_a_zero_head():
    """CE(W z + b, y) with W = b = 0: dL/db = mean(1/C - onehot(y)), dL/dW = mean((1/C - onehot(y)) z^T)."""
    torch.manual_seed(0)
    C, d, B = 3, 4, 6
    model = models.MLP(2, C, hidden=d, depth=1)  # head "net.2": Linear(4, 3)
    assert models.head_name(model) == "net.2"
    params = {n: torch.zeros_like(p).requires_grad_(True) for n, p in fl.get_params(model).items()}
    z, y = torch.randn(B, d), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = DF.FEDGEN.loss(model)(fl.functional(model), params, {"fedgen_z": z, "fedgen_y": y})
    gw, gb = torch.autograd.grad(loss, [params["net.2.weight"], params["net.2.bias"]])
    r = torch.full((B, C), 1.0 / C) - F.one_hot(y, C)
    assert torch.allclose(gb, r.mean(0), atol=1e-6)
    assert torch.allclose(gw, r.T @ z / B, atol=1e-6)
    assert torch.allclose(loss, torch.tensor(C).float().log())


def test_fedftg_cls_and_md_loss_gradients():
    torch.manual_seed(1)
    K, B, C = 2, 4, 3
    f, s = torch.randn(K, B, C), torch.randn(B, C)
    y = torch.tensor([0, 2, 1, 2])
    alpha = DF.class_weights(torch.tensor([[5.0, 1, 2], [1.0, 3, 2]]))
    a = alpha[:, y]
    (gf,) = _grad(lambda t: DF.fedftg_cls_loss(t, y, alpha), f)
    assert torch.allclose(gf, a[..., None] * (f.softmax(-1) - F.one_hot(y, C)) / B, atol=1e-6)
    # for the global model, L_md's gradient is the KL's to the class-level mixture
    (gs,) = _grad(lambda t: DF.fedftg_md_loss(f, t, y, alpha, md="kl"), s)
    mixture = (a[..., None] * f.softmax(-1)).sum(0)
    assert torch.allclose(gs, (s.softmax(-1) - mixture) / B, atol=1e-6)
    # and its value is the alpha-weighted KL of every client from the global model
    kl = (f.softmax(-1) * (f.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    assert torch.allclose(DF.fedftg_md_loss(f, s, y, alpha, md="kl"), (a * kl).sum(0).mean())


def test_diversity_loss_value_and_gradient():
    """Two samples a apart and noises b apart: L = exp(-ab/2), dL/da = -(b/2) L (noise distance L1)."""
    a, b = 0.8, 1.5
    x = torch.tensor([[0.0], [a]], requires_grad=True)
    z = torch.tensor([[0.0], [b]])
    loss = DF.diversity_loss(x, z, "l1")
    assert torch.allclose(loss, torch.tensor(a * b / 2).neg().exp())
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.allclose(gx[1, 0], -(b / 2) * loss.detach()) and torch.allclose(gx[0, 0], (b / 2) * loss.detach())


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_hard_sample_loss_gradient(gamma):
    """L = -(1 - p)^g log p with p = softmax_y and the hardness (1 - p)^g a detached weight (the
    Co-Boosting authors'): dL/dl_j = dL/dp * p (delta_jy - p_j), dL/dp = -(1 - p)^g / p (no term from
    the weight: the old, undetached loss had g (1 - p)^(g - 1) log p besides)."""
    torch.manual_seed(2)
    B, C = 5, 4
    logits, y = torch.randn(B, C), torch.tensor([0, 1, 2, 3, 0])
    (g,) = _grad(lambda t: DF.hard_sample_loss(t, y, gamma), logits)
    p = logits.softmax(-1)
    py = p.gather(1, y[:, None])
    dldp = -(1 - py).pow(gamma) / py
    expect = dldp * py * (F.one_hot(y, C) - p) / B
    assert torch.allclose(g, expect, atol=1e-6)
    if gamma == 0:
        assert torch.allclose(DF.hard_sample_loss(logits, y, 0.0), F.cross_entropy(logits, y))


def test_ensemble_weight_gradient_and_sign_step():
    """dCE(A_w(x), y)/dw_k = mean_i sum_c (softmax(A_w)_c - onehot_c) f_k,c; the step moves weight to the
    client that is right."""
    y = torch.tensor([0, 1, 2])
    right = 4.0 * F.one_hot(y, 3).float()
    wrong = 4.0 * F.one_hot((y + 1) % 3, 3).float()
    logits = torch.stack([right, wrong])
    w = torch.tensor([0.5, 0.5])
    (gw,) = _grad(lambda t: F.cross_entropy(DF.ensemble_logits(logits, t), y), w)
    r = DF.ensemble_logits(logits, w).softmax(-1) - F.one_hot(y, 3)
    assert torch.allclose(gw, torch.einsum("bc,kbc->k", r, logits) / 3, atol=1e-6)
    assert gw[0] < 0 < gw[1]
    w1 = DF.coboosting_weight_step(w, gw, 0.1)
    assert torch.allclose(w1, torch.tensor([0.6, 0.4])) and torch.isclose(w1.sum(), torch.tensor(1.0))
    assert torch.allclose(DF.coboosting_weight_step(torch.tensor([0.05, 0.95]), torch.tensor([1.0, -1.0]), 0.1),
                          torch.tensor([0.0, 1.0]))  # clipped at 0, renormalised
    assert torch.allclose(DF.coboosting_weight_step(w, torch.tensor([1.0, 1.0]), 0.6), torch.full((2,), 0.5))


def test_diversify_steps_along_the_sign_and_stays_in_range():
    x = torch.tensor([[0.0, 0.95, -0.5]])
    out = DF.diversify(x, torch.tensor([[2.0, 3.0, -0.1]]), 0.1)
    assert torch.allclose(out, torch.tensor([[0.1, 1.0, -0.6]]))


# ----------------------------------------------------------------------------------------------
# the generators improve their own objectives (toy)
def test_fedgen_generator_improves_its_objective():
    torch.manual_seed(0)
    C, d, K = 3, 6, 2
    model = models.MLP(2, C, hidden=d, depth=1)
    heads = fl.stack_params([fl.get_params(models.MLP(2, C, hidden=d, depth=1)) for _ in range(K)])
    counts = torch.tensor([[10.0, 5, 0], [0.0, 5, 10]])
    _, h = DF.head_fn(model)
    G = models.FeatureGenerator(C, d, noise_dim=4, hidden=16)
    rng = torch.Generator().manual_seed(0)
    y, eps = torch.tensor([0, 1, 2] * 20), torch.randn(60, 4, generator=rng)
    alpha = DF.class_weights(counts)

    def objective():
        with torch.no_grad():
            return float(DF.fedgen_generator_loss(torch.vmap(h, in_dims=(0, None))(heads, G(eps, y)), y, alpha))

    before = objective()
    trace = DF.train_fedgen_generator(G, heads, h, counts, steps=150, batch_size=32, lr=1e-2, rng=rng)
    assert objective() < 0.5 * before and len(trace) == 150


def test_fedftg_generator_improves_its_objective():
    """With the global model held fixed (no student steps), the generator's objective L_cls + L_div -
    L_md on fixed noise and labels falls."""
    torch.manual_seed(0)
    C = 3
    model = models.MLP(2, C, hidden=16)
    clients = fl.stack_params([fl.get_params(models.MLP(2, C, hidden=16)) for _ in range(2)])
    start = fl.get_params(model)
    counts = torch.tensor([[10.0, 5, 0], [0.0, 5, 10]])
    G = models.make_generator((2,), z_dim=4 + C, hidden=32)
    rng = torch.Generator().manual_seed(1)
    z, y = torch.randn(60, 4, generator=rng), torch.tensor([0, 1, 2] * 20)
    alpha, call = DF.class_weights(counts), fl.functional(model)

    def objective():
        with torch.no_grad():
            x = G(models.conditional_noise(z, y, C))
            return float(DF.fedftg_generator_loss(torch.vmap(call, in_dims=(0, None))(clients, x), call(start, x), x,
                                                  z, y, alpha))

    before = objective()
    out = DF.fedftg_distill(model, start, clients, G, counts, C, steps=150, student_steps=0, batch_size=32,
                            lr_generator=1e-2, rng=rng)
    assert objective() < before - 0.3
    assert all(torch.equal(out[n], start[n]) for n in start), "no student steps: the global model is unchanged"


# ----------------------------------------------------------------------------------------------
# a round of each method equals its sequential reference
@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(150, 1, 8, 8, generator=g) * 2 - 1)
    y = torch.randint(0, 3, (150,), generator=g)
    clients = fl.pack_clients(x, y, [torch.arange(0, 40), torch.arange(40, 55), torch.arange(55, 100)])
    torch.manual_seed(0)
    return dict(setup=D.Setup(clients, x[100:], x[:30], y[:30], y[100:]), model=models.SmallCNN(1, 3, width=4))


def same_function(model, a, b, x):
    """max |f_a(x) - f_b(x)| of two parameter sets of ``model``."""
    call = fl.functional(model)
    with torch.no_grad():
        return (call(a, x) - call(b, x)).abs().max()


KW = dict(local_epochs=1, lr=0.05, momentum=0.9, batch_size=16, distill_steps=3, distill_batch=16)


@pytest.mark.parametrize("method", ["fedgen", "fedftg", "coboosting"])
def test_a_round_equals_its_sequential_reference(problem, method):
    setup, model = problem["setup"], problem["model"]
    init = fl.get_params(model)
    res = D.run_rounds(model, [setup], [method], rounds=2, init=init, generator=torch.Generator().manual_seed(3), **KW)
    # the reference: clients one at a time (torch.optim.SGD), FedAvg by hand, the server step called directly
    g = torch.Generator().manual_seed(3)
    cfg = D.ServerConfig(distill_steps=3, distill_batch=16, generator=g)
    st = D.prepare_rounds(model, [setup], [method], 2, init)
    m, w, K = D.get_method(method), init, setup.clients.n_clients
    for r in range(2):
        payload = m.client.payload(st.state[0], 3, cfg) if m.client else None
        assert (payload is not None) == (method == "fedgen" and r == 1), "FedGen's G_w goes down from round 2"
        kw = {}
        if m.client:
            kw = dict(loss_fn=D.client_loss(model, (m.client,)),
                      extras_fn=D.client_extras(model, (m.client,), m.client, payload, 3))
        local = fl.local_train(model, w, setup.clients, epochs=1, lr=0.05, momentum=0.9, batch_size=16, generator=g,
                               vectorised=False, **kw)
        w = fl.fedavg(local, setup.clients.n_k)
        w = m.server(model, w, local, setup, 3, cfg, D.group_context(st, 0, r, torch.arange(K), cfg))
    # compared through the function they compute: Adam turns the ~1e-9 noise in the gradient of a
    # parameter the model does not depend on (a conv bias under per-channel GroupNorm) into lr-sized steps
    x = torch.cat([setup.test_x, setup.server_x])
    with torch.no_grad():
        f = fl.functional(model)(w, x)
    # 2 rounds of ceil(45 / 16) local steps and 3 server steps (a generator and a student update each),
    # batch 16 on 8 x 8 images
    terms = training_terms(steps=2 * (3 + 2 * 3), batch=16, positions=8 * 8)
    assert same_function(model, fl.index_params(res.params, 0), w, x) < float32_tolerance(f.abs().max(), terms, f.numel())
    acc = fl.accuracy(fl.predict(fl.functional(model), w, setup.test_x), setup.test_y)
    assert torch.isclose(res.accuracy[0, 0, -1], acc)


def test_methods_train_side_by_side_and_fedgen_payload_is_counted(problem):
    """All data-free methods in one run: FedGen's client term weighs 0 in the other methods' vmapped tasks
    and every server method draws from its own stream, so the others' numbers are those of the same run
    with FedProx in FedGen's place; FedGen's payload (G_w, p(y), its weight) goes down to each client from
    round 2 on, in the ledger."""
    setup, model = problem["setup"], problem["model"]
    init = fl.get_params(model)
    names = ["fedavg", "fedgen", "fedftg", "coboosting", "feddf"]
    both = D.run_rounds(model, [setup], names, rounds=2, init=init, generator=torch.Generator().manual_seed(3), **KW)
    other = D.run_rounds(model, [setup], ["fedprox" if m == "fedgen" else m for m in names], rounds=2, init=init,
                         generator=torch.Generator().manual_seed(3), **KW)
    for j, m in enumerate(names):
        if m != "fedgen":
            x = setup.test_x
            assert same_function(model, fl.index_params(both.params, j), fl.index_params(other.params, j), x) < 1e-5, m
    G = models.FeatureGenerator(3, model.head.in_features, **{k: DF.OPTIONS["fedgen"][k] for k in ("noise_dim", "hidden")})
    payload = fl.state_bytes(G) + 3 * 4 + 3 * 4  # G_w, p(y), the weight, the latent weight, the label rule (float32)
    K, led = setup.clients.n_k.numel(), both.ledger
    assert led.total(item="fedgen payload", round=1) == 0
    assert led.total(item="fedgen payload", round=2) == K * payload
    assert led.total(item="model", round=2) == 2 * len(names) * K * fl.state_bytes(model)
    assert DF.extra_bytes("fedgen", model=model, n_clients=K, n_classes=3) == {"down": K * payload, "up": K * 3 * 8}
    assert DF.extra_bytes("fedftg", model=model, n_clients=K, n_classes=3) == {"down": 0, "up": K * 3 * 8}
    assert DF.extra_bytes("coboosting", model=model, n_clients=K, n_classes=3) == {"down": 0, "up": 0}


def test_unknown_option_is_refused(problem):
    with pytest.raises(ValueError, match=r"unknown fedftg options \['beta'\]; allowed: steps, student_steps"):
        D.run_rounds(problem["model"], [problem["setup"]], ["fedftg"], rounds=1, method_options={"fedftg": {"beta": 1}},
                     **KW)


def test_every_registered_method_keeps_one_distinct_colour_in_every_figure():
    from fedlib import distill, plots

    everyone = list(distill.methods())
    assert len(everyone) > 10, "the reason for a 20-colour palette"
    full = plots.method_colours(everyone)
    assert len(set(full.values())) == len(everyone)
    assert plots.method_colours(["fedgen", "fedgo"]) == {m: full[m] for m in ("fedgen", "fedgo")}


# ----------------------------------------------------------------------------------------------
# each method as its paper and authors run it (each test fails on the earlier code)
def test_fedgen_defaults_are_the_authors_and_the_old_setting_is_an_option(problem):
    """Diversity weighted 1, client term 10 x 0.98^round with a latent term, labels over the held ones,
    per-client CE; unknown choice values are refused with the allowed ones."""
    o = DF.OPTIONS["fedgen"]
    assert o["diversity"] == 1.0 and o["weight"] == 10.0 and o["decay"] == 0.98 and o["latent"] > 0
    assert o["labels"] == "held" and o["ensemble"] == "clients" and o["lr_generator"] == 3e-4
    assert [DF.fedgen_weight(10.0, 0.98, r) for r in (0, 1, 5)] == pytest.approx([10.0, 9.8, 10 * 0.98**5])
    with pytest.raises(ValueError, match=r"fedgen option labels='all' is not one of 'held', 'prior'"):
        D.run_rounds(problem["model"], [problem["setup"]], ["fedgen"], rounds=1,
                     method_options={"fedgen": {"labels": "all"}}, **KW)


def test_fedgen_payload_weight_decays_per_round(problem):
    """The weight the clients receive in round r (0-based) is 10 x 0.98^r."""
    setup, model = problem["setup"], problem["model"]
    cfg = D.ServerConfig(distill_steps=3, distill_batch=16, generator=torch.Generator().manual_seed(3),
                         method_options={"fedgen": {"steps": 2}})
    st = D.prepare_rounds(model, [setup], ["fedgen"], 4, fl.get_params(model))
    local = fl.broadcast_params(fl.get_params(model), 3)
    for r in range(3):
        DF.fedgen_server(model, fl.get_params(model), local, setup, 3, cfg, D.group_context(st, 0, r, torch.arange(3), cfg))
        payload = DF.FEDGEN.payload(st.state[0], 3, cfg)
        assert float(payload["weight"]) == pytest.approx(10 * 0.98 ** (r + 1))
        assert float(payload["latent"]) == 1.0 and float(payload["held"]) == 1.0


def test_fedgen_generator_loss_is_the_alpha_weighted_client_ce_and_diversity_counts():
    """ensemble "clients": sum_k alpha_{k,y} CE(h_k(z), y) (not the CE of the logit ensemble), and the
    generator's training moves with the diversity weight."""
    torch.manual_seed(0)
    K, B, C = 3, 5, 4
    g, y = torch.randn(K, B, C), torch.tensor([0, 1, 3, 3, 2])
    alpha = DF.class_weights(torch.rand(K, C) + 0.1)
    ce = torch.stack([F.cross_entropy(g[k], y, reduction="none") for k in range(K)])
    assert torch.allclose(DF.fedgen_generator_loss(g, y, alpha), (alpha[:, y] * ce).sum(0).mean())
    assert not torch.allclose(DF.fedgen_generator_loss(g, y, alpha), DF.fedgen_generator_loss(g, y, alpha, "logits"))
    model = models.MLP(2, C, hidden=6, depth=1)
    heads = fl.stack_params([fl.get_params(models.MLP(2, C, hidden=6, depth=1)) for _ in range(K)])
    _, h = DF.head_fn(model)
    counts = torch.rand(K, C) + 0.1
    traces = []
    for div in (0.0, 1.0):
        torch.manual_seed(1)
        G = models.FeatureGenerator(C, 6, noise_dim=4, hidden=8)
        traces.append(DF.train_fedgen_generator(G, heads, h, counts, steps=3, batch_size=8, diversity=div,
                                                rng=torch.Generator().manual_seed(0)))
    assert traces[1][0] > traces[0][0], "the diversity term (exp(-.) > 0) is in the objective"


def test_fedgen_latent_term_pulls_the_client_to_its_head_on_generated_features():
    """KL(softmax(h(G(y))) || softmax(f(x))) is 0 where they agree, positive otherwise, masked, and its
    target carries no gradient."""
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    t = f.detach().clone().requires_grad_(True)
    assert float(DF.fedgen_latent_loss(f, t)) == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[0.0, 2.0], [5.0, 0.0]], requires_grad=True)
    loss = DF.fedgen_latent_loss(f, other, torch.tensor([1.0, 0.0]))
    q = other.detach()[0].softmax(-1)
    assert float(loss) == pytest.approx(float((q * (q.log() - f.detach()[0].log_softmax(-1))).sum()), rel=1e-5)
    loss.backward()
    assert other.grad is None or torch.all(other.grad == 0)
    assert torch.all(f.grad[1] == 0), "the padded sample does not count"


def test_fedftg_md_loss_is_the_alpha_weighted_l1_between_logits():
    torch.manual_seed(3)
    K, B, C = 2, 4, 3
    f, s, y = torch.randn(K, B, C), torch.randn(B, C), torch.tensor([0, 2, 1, 1])
    alpha = DF.class_weights(torch.rand(K, C) + 0.1)
    expect = (alpha[:, y] * (f - s[None]).abs().mean(-1)).sum(0).mean()
    assert torch.allclose(DF.fedftg_md_loss(f, s, y, alpha), expect)
    (gs,) = _grad(lambda t: DF.fedftg_md_loss(f, t, y, alpha), s)
    assert torch.allclose(gs, -(alpha[:, y, None] * torch.sign(f - s[None])).sum(0) / (B * C), atol=1e-6)


def test_diversity_loss_noise_distance_is_l2_by_default():
    """Noises b apart: the default noise distance is b^2 (mean squared), L = exp(-a b^2 / 2)."""
    a, b = 0.8, 1.5
    x, z = torch.tensor([[0.0], [a]]), torch.tensor([[0.0], [b]])
    assert torch.allclose(DF.diversity_loss(x, z), torch.tensor(a * b * b / 2).neg().exp())


def test_fedftg_generator_steps_once_per_client_and_the_student_reuses_its_batch(monkeypatch):
    """Per client: K generator steps per iteration (1 when summed); the student's steps share one batch:
    the generator is called once for it (fresh_batches: once per student step)."""
    torch.manual_seed(0)
    C, K = 3, 4
    model = models.MLP(2, C, hidden=8)
    clients = fl.stack_params([fl.get_params(models.MLP(2, C, hidden=8)) for _ in range(K)])
    counts = torch.rand(K, C) + 0.1
    calls = {}
    for update, fresh in (("per_client", False), ("summed", False), ("per_client", True)):
        G = models.make_generator((2,), z_dim=4 + C, hidden=8)
        steps = []
        monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, _s=steps, _o=torch.optim.Adam.step, **k:
                            (_s.append(id(self)), _o(self, *a, **k))[1])
        n = [0]
        G.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        DF.fedftg_distill(model, fl.get_params(model), clients, G, counts, C, steps=2, student_steps=3,
                          batch_size=8, generator_update=update, fresh_batches=fresh,
                          rng=torch.Generator().manual_seed(0))
        monkeypatch.undo()
        calls[(update, fresh)] = (len(steps), n[0])
    # per iteration: generator steps (K or 1) + 3 student steps; G calls: 1 draw + K re-draws (per client) + student batches
    assert calls[("per_client", False)] == (2 * (K + 3), 2 * (1 + K + 1))
    assert calls[("summed", False)] == (2 * (1 + 3), 2 * (1 + 1))
    assert calls[("per_client", True)][1] == 2 * (1 + K + 1 + 3)


def test_coboosting_weights_persist_across_rounds(problem, monkeypatch):
    """Round 2 starts from round 1's w (its docstring's promise), mapped onto the accepted clients."""
    setup, model = problem["setup"], problem["model"]
    seen = []
    real = DF.coboosting_distill

    def spy(*a, **k):
        seen.append(None if k.get("w") is None else k["w"].clone())
        return real(*a, **k)

    monkeypatch.setattr(DF, "coboosting_distill", spy)
    cfg = D.ServerConfig(distill_steps=2, distill_batch=8, generator=torch.Generator().manual_seed(3),
                         method_options={"coboosting": {"mu": 0.2, "g_steps": 1}})
    st = D.prepare_rounds(model, [setup], ["coboosting"], 2, fl.get_params(model))
    local = fl.stack_params([fl.get_params(models.SmallCNN(1, 3, width=4)) for _ in range(3)])
    for r in range(2):
        DF.coboosting_server(model, fl.get_params(model), local, setup, 3, cfg,
                             D.group_context(st, 0, r, torch.arange(3), cfg))
        if r == 0:
            w1 = st.state[0]["w"].clone()
    assert seen[0] is None and not torch.allclose(w1, torch.full((3,), 1 / 3))
    assert torch.allclose(seen[1], w1)
    state = {"w": torch.tensor([0.5, 0.3, 0.2]), "clients": torch.tensor([0, 1, 2])}
    assert torch.allclose(DF.kept_weights(state, torch.tensor([2, 0])), torch.tensor([0.2, 0.5]) / 0.7)


def test_coboosting_hardness_weight_is_detached():
    """The gradient of L_H is the CE's times (1 - p)^gamma: on a sure sample (p -> 1) it vanishes like (1 - p)."""
    logits, y = torch.tensor([[3.0, 0.0]], requires_grad=True), torch.tensor([0])
    (g,) = torch.autograd.grad(DF.hard_sample_loss(logits, y, 1.0), logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    p = logits.detach().softmax(-1)[0, 0]
    assert torch.allclose(g, (1 - p) * g_ce)


def test_coboosting_pool_holds_clean_samples_perturbed_at_every_distillation_step(monkeypatch):
    """perturb "gradient": the pool stores the generator's samples, every student batch is perturbed
    afresh (one diversify per student step, none stored); the student distils at T=4 over the whole pool."""
    torch.manual_seed(0)
    C, K = 3, 2
    model = models.SmallCNN(1, C, width=4)
    clients = fl.stack_params([fl.get_params(models.SmallCNN(1, C, width=4)) for _ in range(K)])
    build = lambda: models.make_generator((1, 8, 8), z_dim=4 + C, width=4)  # noqa: E731
    n = {"div": 0, "kl": []}
    real_div, real_kl = DF.diversify, DF.kl_to_targets
    monkeypatch.setattr(DF, "diversify", lambda *a, **k: (n.__setitem__("div", n["div"] + 1), real_div(*a, **k))[1])
    monkeypatch.setattr(DF, "kl_to_targets", lambda s, q, t: (n["kl"].append((len(s), t)), real_kl(s, q, t))[1])
    DF.coboosting_distill(model, fl.get_params(model), clients, build(), C, steps=3, batch_size=8, g_steps=2,
                          build=build, rng=torch.Generator().manual_seed(0))
    assert all(t == 4.0 for _, t in n["kl"])
    # epochs of 2 generator steps each, then 1, 2, 3 student batches of 8 over the growing pool (pool size 8, 16, 24)
    assert len(n["kl"]) == 3 * 2 + (1 + 2 + 3) and n["div"] == 1 + 2 + 3


def test_fedgen_ablation_is_fedgen_with_the_client_term_weight_0(problem):
    """fedgen_noreg computes what FedGen with the client term's weight 0 does (the regulariser is the only
    difference), and FedGen with its weight computes something else."""
    setup, model = problem["setup"], problem["model"]
    init = fl.get_params(model)
    kw = dict(rounds=2, init=init, **KW)
    runs = {name: D.run_rounds(model, [setup], ["fedavg", method], generator=torch.Generator().manual_seed(3),
                               method_options={"fedgen": {"steps": 3, **opts}}, **kw)
            for name, method, opts in (("ablation", "fedgen_noreg", {}), ("weight 0", "fedgen", {"weight": 0.0}),
                                       ("fedgen", "fedgen", {}))}
    x = setup.test_x
    p = {n: fl.index_params(r.params, 1) for n, r in runs.items()}
    assert same_function(model, p["ablation"], p["weight 0"], x) < 1e-5
    assert same_function(model, p["ablation"], p["fedgen"], x) > 1e-3
