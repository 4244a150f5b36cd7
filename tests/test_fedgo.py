"""fedlib.fedgo and the FedGO studies: the protocol checked against docs/methods.md §1.2 point by point
(the discriminators' labels, which samples they see, the weights' normalisation), the truly data-free
generator, the validation quantities, the overhead accounting, and the notebook-01 set-ups."""

import math

import pandas as pd
import pytest
import torch

from fedlib import data as fdata
from fedlib import distill
from fedlib import federated as fl
from fedlib import fedgo, models, studies
from fedlib import weighting as W
from fedlib.verdicts import as_verdict, beats_every, compare, per_seed


def _gauss_logpdf(x, mean, std):
    return (-0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_discriminator_labels_give_the_log_density_ratio():
    """§1.2 step 2: real = the client's data (label 1), fake = G samples (label 0), so the optimal logit
    is log p_k - log p_G. Flipped labels would give the negative ratio."""
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([1.0, -0.5]), 0.7
    x = mean + std * torch.randn(600, 2, generator=g)
    clients = fl.pack_clients(x, torch.zeros(600, dtype=torch.long), [torch.arange(600)])
    G = fedgo.GaussianSource(2, scale=2.0)
    D = models.MLPDiscriminator(2, hidden=32)
    torch.manual_seed(0)
    dp = fedgo.train_discriminators(D, G, clients, epochs=40, lr=0.05, generator=g)
    probe = mean + 1.2 * torch.randn(300, 2, generator=g)  # where both densities have mass
    est = fedgo.discriminator_logits(D, dp, probe)[0]
    exact = _gauss_logpdf(probe, mean, std) - _gauss_logpdf(probe, torch.zeros(2), 2.0)
    assert torch.corrcoef(torch.stack([est, exact]))[0, 1] > 0.9
    assert (est[exact > 1] > 0).float().mean() > 0.9 and (est[exact < -1] < 0).float().mean() > 0.9


def test_discriminator_loss_sees_one_g_sample_per_real_sample_and_ignores_padding():
    """§1.2 step 2, which samples D_k sees: its own data and as many G samples, both masked alike, so a
    client padded to a larger one trains exactly as it would alone."""
    torch.manual_seed(0)
    D = models.MLPDiscriminator(2, hidden=8)
    G = fedgo.GaussianSource(2, scale=3.0)
    call, p = fl.functional(D), fl.get_params(D)
    x, z = torch.randn(6, 2), torch.randn(6, 2)
    loss = fedgo.discriminator_loss(G)
    padded = loss(call, p, {"x": torch.cat([x, torch.randn(4, 2)]), "z": torch.cat([z, torch.randn(4, 2)]),
                            "mask": torch.cat([torch.ones(6), torch.zeros(4)])})
    alone = loss(call, p, {"x": x, "z": z, "mask": torch.ones(6)})
    manual = (torch.nn.functional.softplus(-call(p, x)) + torch.nn.functional.softplus(call(p, G(z)))).mean()
    assert torch.allclose(padded, alone) and torch.allclose(alone, manual)
    # end to end: a small client trained beside a large one equals the vectorised run's sequential reference
    xs = torch.randn(70, 2)
    clients = fl.pack_clients(xs, torch.zeros(70, dtype=torch.long), [torch.arange(10), torch.arange(10, 70)])
    vec = fedgo.train_discriminators(D, G, clients, epochs=2, generator=torch.Generator().manual_seed(3))
    seq = fedgo.train_discriminators(D, G, clients, epochs=2, generator=torch.Generator().manual_seed(3),
                                     vectorised=False)
    assert max((vec[n] - seq[n]).abs().max().item() for n in vec) < 1e-5


def test_fedgo_weights_normalise_over_clients_with_counts_and_cancel_p_g():
    """§1.2: a_k = n_k D_k/(1-D_k) / sum_j n_j D_j/(1-D_j): a distribution over clients at every x; a
    shift of every logit (a different p_G) and a common factor on n_k change nothing; equal odds give
    the sample-count weights."""
    torch.manual_seed(0)
    logits, n_k = torch.randn(5, 40), torch.tensor([3, 10, 1, 7, 20])
    a = W.fedgo_weights(logits, n_k)
    assert torch.allclose(a.sum(0), torch.ones(40), atol=1e-6) and (a >= 0).all()
    odds = torch.sigmoid(logits) / (1 - torch.sigmoid(logits))
    assert torch.allclose(a, n_k[:, None] * odds / (n_k[:, None] * odds).sum(0), atol=1e-5)
    assert torch.allclose(W.fedgo_weights(logits + torch.randn(40), n_k), a, atol=1e-5)  # log p_G cancels
    assert torch.allclose(W.fedgo_weights(logits, 4 * n_k), a, atol=1e-6)
    flat = W.fedgo_weights(torch.zeros(5, 3), n_k)
    assert torch.allclose(flat, (n_k / n_k.sum()).float()[:, None].expand(5, 3))


def test_label_conditioned_generator_draws_uniform_labels_from_its_last_input():
    G = fedgo.LabelConditioned(models.make_generator((1, 8, 8), z_dim=4 + 10, width=8), 10)
    assert G.z_dim == 5
    z = torch.randn(20_000, G.z_dim, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(G.labels(z), minlength=10).float()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.01
    assert fedgo.sample(G, 7, torch.Generator().manual_seed(1)).shape == (7, 1, 8, 8)


def test_data_free_generator_learns_the_ensembles_labels_and_vectorises():
    """The truly data-free G: trained against the client models only, its samples of label y are
    classified y by their ensemble; S generators in one vmap equal S separate runs."""
    torch.manual_seed(0)
    clf = models.MLP(2, 3, hidden=16)
    x = torch.randn(300, 2) * 2
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    parts = [torch.arange(150), torch.arange(150, 300)]
    local = fl.local_train(clf, fl.get_params(clf), fl.pack_clients(x, y, parts), epochs=20, lr=0.1,
                           generator=torch.Generator().manual_seed(0))
    G = fedgo.LabelConditioned(models.MLPGenerator(z_dim=4 + 3, out_features=2, hidden=32), 3)
    call = fl.functional(clf)

    def agreement(gp):
        Gt = fl.set_params(models.MLPGenerator(z_dim=7, out_features=2, hidden=32), {n[2:]: p for n, p in gp.items()})
        Gl = fedgo.LabelConditioned(Gt, 3)
        z = torch.randn(500, Gl.z_dim, generator=torch.Generator().manual_seed(9))
        ens = torch.stack([call(fl.index_params(local, k), Gl(z)) for k in range(2)]).mean(0)
        return (ens.argmax(-1) == Gl.labels(z)).float().mean()

    before = agreement(fl.get_params(G))
    one = fedgo.train_generator_data_free(G, clf, local, steps=150, lr=3e-3, diversity=0.0,
                                          generator=torch.Generator().manual_seed(2))
    assert agreement(one) > max(0.9, before)
    both = fedgo.train_generator_data_free(G, clf, {n: torch.stack([p, p.flip(0)]) for n, p in local.items()}, steps=5,
                                           n_generators=2, generator=torch.Generator().manual_seed(4))
    alone = fedgo.train_generator_data_free(G, clf, {n: p.flip(0) for n, p in local.items()}, steps=5,
                                            generator=torch.Generator().manual_seed(4))
    assert max((both[n][1] - alone[n]).abs().max().item() for n in alone) < 1e-5


def test_client_posterior_loss_is_low_for_separated_clients():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    x = torch.cat([centres[0] + 0.3 * torch.randn(200, 2, generator=g), centres[1] + 0.3 * torch.randn(200, 2, generator=g)])
    y = torch.zeros(400, dtype=torch.long)
    fit = fl.pack_clients(x, y, [torch.arange(150), torch.arange(200, 350)])
    val = fl.pack_clients(x, y, [torch.arange(150, 200), torch.arange(350, 400)])
    D = models.MLPDiscriminator(2, hidden=32)
    G = fedgo.GaussianSource(2, scale=3.0)
    dp = fedgo.train_discriminators(D, G, fit, epochs=30, generator=g)
    assert fedgo.client_posterior_loss(D, dp, val, fit.n_k).max() < 0.1  # uniform weights: log 2 = 0.69
    assert fedgo.discriminator_val_loss(D, dp, G, val, g).max() < math.log(2)


def test_overhead_counts_the_data_free_warm_up_and_paper_scale_sizes():
    kw = dict(classifier_bytes=1000, generator_bytes=3000, discriminator_bytes=500, n_clients=10, n_k=[50] * 10,
              rounds=5, local_epochs=1, disc_epochs=2, clf_flops=100.0, disc_flops=40.0, gen_forward_flops=10.0)
    plain, warm = fedgo.fedgo_overhead(**kw), fedgo.fedgo_overhead(**kw, warmup_epochs=1)
    assert warm["extra_bytes"] - plain["extra_bytes"] == 10 * 1000
    assert warm["extra_client_flops"] - plain["extra_client_flops"] == 500 * 100
    costs = studies.paper_scale_costs()
    assert costs["classifier_bytes"] == 4 * 11_173_962  # the CIFAR ResNet-18's parameters, float32
    assert costs["clf_flops"] > 50 * costs["disc_flops"] > 0
    curve = studies.overhead_curve(costs, n_clients=20, n_k=[1250] * 20, local_epochs=5, disc_epochs=5,
                                   rounds=[1, 100])
    assert curve["bytes_pct"].is_monotonic_decreasing and curve["bytes_pct"].iloc[-1] < 1


def test_resnet18_has_the_cifar_resnet18_parameter_count():
    assert models.n_params(models.resnet18()) == 11_173_962


@pytest.fixture(scope="module")
def small_setups():
    train, test = fdata.load_train_test("digits")
    train, test = train.stratified(300), test.stratified(60)
    clf = models.make_classifier("small_cnn", (1, 8, 8), 10, width=4)
    st = studies.fedgo_setups(train, test, client_counts=[3, 5], alphas=[0.1, 1.0], seeds=[0, 1],
                              scenarios=("pre", "gan_samples", "data_free"), gan_steps=2, disc_epochs=1, gen_width=8,
                              model=clf, free_steps=2, generator=torch.Generator().manual_seed(0))
    return train, test, clf, st


def test_fedgo_setups_keys_scenarios_and_the_shared_server_half(small_setups):
    train, _, _, st = small_setups
    assert st.keys == [(K, a, s) for s in (0, 1) for K in (3, 5) for a in (0.1, 1.0)]
    for scen in ("pre", "gan_samples", "data_free"):
        for K in (3, 5):
            keys = [s.key for s in st.setups[scen][K]]
            assert keys == [k for k in st.keys if k[0] == K]
            for s in st.setups[scen][K]:
                assert s.clients.n_clients == K and s.disc_logits.shape == (K, len(s.server_x))
    for s in st.all("pre"):  # the real server half, the same for every K and alpha of a seed
        server = st.server_indices[s.key[2]]
        assert torch.equal(s.server_x, train.x[torch.as_tensor(server)])
        assert not set(server) & set(int(i) for part in st.client_indices[s.key] for i in part)
    assert all(s.server_y is None for s in st.all("gan_samples") + st.all("data_free"))
    assert all(s.dense_generator is not None for s in st.all("data_free"))


def test_the_data_free_scenario_never_reads_the_server_half():
    """Issue 18: data-free means no server data: with the server half replaced by NaN, the data-free
    set-ups are still finite (the GAN-sample scenario, which trains on it, is not)."""
    train, test = fdata.load_train_test("digits")
    train, test = train.stratified(300), test.stratified(60)
    server = fdata.fedgo_split(train.y.numpy(), 3, 0.1, seed=0)[1]
    poisoned = fdata.ArrayDataset(train.x.clone(), train.y, train.n_classes, train.name)
    poisoned.x[torch.as_tensor(server)] = float("nan")
    clf = models.make_classifier("small_cnn", (1, 8, 8), 10, width=4)
    st = studies.fedgo_setups(poisoned, test, client_counts=[3], alphas=[0.1], seeds=[0], scenarios=("data_free",),
                              gan_steps=2, disc_epochs=1, gen_width=8, model=clf, free_steps=3,
                              generator=torch.Generator().manual_seed(0))
    (s,) = st.all("data_free")
    assert torch.isfinite(s.server_x).all() and torch.isfinite(s.disc_logits).all()
    with pytest.raises(ValueError, match="NaN"):
        studies.fedgo_setups(poisoned, test, client_counts=[3], alphas=[0.1], seeds=[0], scenarios=("gan_samples",),
                             gan_steps=2, disc_epochs=1, gen_width=8, generator=torch.Generator().manual_seed(0))


def test_frame_claims_and_gaps_are_indexed_by_setup_keys(small_setups):
    _, _, clf, st = small_setups
    res = {"pre": {K: distill.run_rounds(clf, st.setups["pre"][K], ["fedavg", "feddf", "fedgo"], rounds=2,
                                         distill_epochs=1, generator=torch.Generator().manual_seed(0))
                   for K in (3, 5)},
           "data_free": {K: distill.run_rounds(clf, st.setups["data_free"][K], ["feddf", "fedgo"], rounds=2,
                                               distill_steps=2, generator=torch.Generator().manual_seed(0))
                         for K in (3, 5)}}
    frame = studies.rounds_frame(res)
    assert len(frame) == 8 * 2 * 3 + 8 * 2 * 2  # (K, alpha, seed) x rounds x methods
    row = frame[(frame.scenario == "pre") & (frame.clients == 5) & (frame.alpha == 1.0) & (frame.seed == 1)
                & (frame.method == "fedgo") & (frame["round"] == 2)]
    j = res["pre"][5].keys.index((5, 1.0, 1))
    assert float(row.accuracy.iloc[0]) == pytest.approx(float(res["pre"][5].accuracy[j, 2, 1]))
    assert studies.baselines_of(frame, "data_free") == ["feddf", "fedavg"]
    comps = studies.fedgo_comparisons(frame, "data_free", 0.1, [3, 5])
    assert set(comps) == {"feddf, K=3", "fedavg, K=3", "feddf, K=5", "fedavg, K=5"}
    fedavg = per_seed(frame, "accuracy", last="round", scenario="pre", clients=3, alpha=0.1, method="fedavg")
    assert comps["fedavg, K=3"].b == fedavg.tolist()
    gap = studies.gap_to_best(frame, "data_free")
    fedgo_acc = per_seed(frame, "accuracy", last="round", scenario="data_free", clients=3, alpha=0.1, method="fedgo")
    best = pd.concat([per_seed(frame, "accuracy", last="round", scenario=sc, clients=3, alpha=0.1, method=m)
                      for sc, m in (("data_free", "feddf"), ("pre", "fedavg"))], axis=1).max(axis=1)
    last = gap[(gap.clients == 3) & (gap.alpha == 0.1) & (gap["round"] == 2)].set_index("seed")["gap"]
    assert torch.allclose(torch.tensor(last.values), torch.tensor((fedgo_acc - best).values), atol=1e-6)


def test_beats_every_keeps_the_deciding_evidence():
    good = compare([0.9, 0.8, 0.85], [0.5, 0.4, 0.45], a_name="fedgo", b_name="a")
    noisy = compare([0.9, 0.4, 0.85], [0.5, 0.8, 0.45], a_name="fedgo", b_name="b")
    bad = compare([0.1, 0.2, 0.15], [0.5, 0.4, 0.45], a_name="fedgo", b_name="c")
    verdict, text = beats_every({"a": good, "b": noisy})
    assert verdict is noisy and as_verdict(verdict) == "within noise" and "1/2 comparisons hold" in text
    # within noise: the comparison shown is one that keeps the claim from holding, even if another is closer
    noisier = compare([0.9, 0.1, 0.95], [0.5, 0.8, 0.45], a_name="fedgo", b_name="d")
    verdict, text = beats_every({"a": compare([0.5, 0.6, 0.55], [0.45, 0.56, 0.5]), "d": noisier})
    assert verdict is noisier and "deciding (d)" in text
    verdict, text = beats_every({"a": good, "c": bad})
    assert verdict is bad and "deciding (c)" in text
    assert beats_every({"a": good})[0] is good


def test_toy_study_over_seeds():
    toy = studies.toy_study("ring", local_epochs=2, disc_epochs=2, distill_steps=5, grid_size=8, seeds=(0, 1, 2))
    assert all(len(v) == 3 for v in toy.weight_tv_to_oracle.values())
    assert toy.weight_tv_to_oracle["oracle"] == [0.0, 0.0, 0.0]
    table = toy.weights_on_points(4)
    assert table.shape == (4, 3 * 4) and ((table.T.groupby(level=0).sum() - 1).abs() < 0.02).all().all()


def test_distill_lr_search_runs_each_client_count_and_picks_the_lowest_held_out_kl(small_setups):
    _, _, clf, st = small_setups
    table, lr = studies.distill_lr_search(clf, st.all("pre")[:4], [1e-4, 3e-3], rounds=1, distill_epochs=2,
                                          generator=torch.Generator().manual_seed(0))
    assert list(table["lr"]) == [1e-4, 3e-3] and lr == table.loc[table["val_kl"].idxmin(), "lr"]


def test_exact_weight_setups_give_the_label_posterior_and_are_no_baseline(small_setups):
    _, _, _, st = small_setups
    (s,) = studies.exact_weight_setups(st.all("pre")[:1])
    a = W.fedgo_weights(s.disc_logits, s.clients.n_k)
    y = s.server_y
    n_ky = torch.stack([torch.bincount(s.clients.client(k)[1], minlength=10) for k in range(3)]).float()
    expected = n_ky[:, y] / n_ky[:, y].sum(0)
    assert torch.allclose(a, expected, atol=1e-4)
    frame = pd.DataFrame({"scenario": ["pre"] * 3, "method": ["fedavg", "fedgo", "fedgo_exact"]})
    assert studies.baselines_of(frame, "pre") == ["fedavg"]


def test_scenario_overhead_counts_the_data_free_warm_up_round_and_its_own_e_d():
    """The overhead of a run is read from its set-ups: the data-free scenario's warm-up round (local epochs
    and one upload per client) and its E_d are counted without the caller stating them."""
    train, test = fdata.load_train_test("digits")
    train, test = train.stratified(200), test.stratified(50)
    clf = models.make_classifier("small_cnn", (1, 8, 8), 10, width=4)
    st = studies.fedgo_setups(train, test, client_counts=[3], alphas=[0.5], seeds=[0], scenarios=("pre", "data_free"),
                              gan_steps=2, disc_epochs=2, free_disc_epochs=5, warmup_epochs=3, free_steps=2,
                              gen_width=16, free_gen_width=8, dense=False, model=clf,
                              generator=torch.Generator().manual_seed(0))
    assert st.disc_epochs == {"pre": 2, "data_free": 5} and st.warmup_epochs == {"pre": 0, "data_free": 3}
    key = st.keys[0]
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(st.generators[("data_free", key)]) == n_params(models.make_generator((1, 8, 8), z_dim=26, width=8))
    assert n_params(st.generators[("pre", key)]) == n_params(models.make_generator((1, 8, 8), z_dim=16, width=16))
    n_k = [len(i) for i in st.client_indices[key]]
    for scen, warm, e_d in (("pre", 0, 2), ("data_free", 3, 5)):
        got = studies.scenario_overhead(st, scen, clf, train.x, local_epochs=1, rounds=4)
        costs = fedgo.model_costs(clf, st.generators[(scen, key)], st.discriminator, train.x[:8])
        bare = fedgo.fedgo_overhead(**costs, n_clients=3, n_k=n_k, rounds=4, local_epochs=1, disc_epochs=e_d)
        warm_flops = sum(n_k) * warm * costs["clf_flops"]
        assert got["extra_client_flops"] - bare["extra_client_flops"] == pytest.approx(warm_flops)
        assert got["extra_bytes"] - bare["extra_bytes"] == (3 * costs["classifier_bytes"] if warm else 0)
    free = studies.scenario_overhead(st, "data_free", clf, train.x, local_epochs=1, rounds=4)
    assert free["extra_client_flops"] > 0 and free["training_client_flops"] > 0


# --- FedGO's settings as one config; its protocol one function per step ---------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("gan_steps", -1, ">= 0"), ("disc_epochs", 2.5, "an integer"), ("disc_lr", 0.0, "> 0"), ("gan_lr", float("nan"), "> 0"),
    ("z_dim", 0, ">= 1"), ("gen_width", 0, ">= 1"), ("free_steps", -3, ">= 0"), ("free_disc_epochs", -1, ">= 0"),
    ("free_gen_width", 0, ">= 1"), ("local_lr", -0.1, "> 0")])
def test_fedgo_config_refuses_a_bad_value_naming_it_and_what_is_allowed(field, value, allowed):
    import re

    kw = dict(gan_steps=1, disc_epochs=1)
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}") + ".*" + re.escape(allowed)):
        studies.FedGOConfig(**{**kw, field: value})


def test_fedgo_setups_refuses_an_unknown_setting_and_a_config_with_settings():
    train, test = fdata.load_train_test("digits")
    with pytest.raises(ValueError, match="free_gen_steps.*allowed: gan_steps"):
        studies.fedgo_setups(train, test, client_counts=[3], alphas=[0.1], seeds=[0], scenarios=(), gan_steps=1,
                             disc_epochs=1, free_gen_steps=3)
    with pytest.raises(ValueError, match="FedGOConfig and the settings"):
        studies.fedgo_setups(train, test, studies.FedGOConfig(1, 1), client_counts=[3], alphas=[0.1], seeds=[0],
                             disc_lr=0.1)


def test_the_discriminator_block_is_written_once():
    """Training the clients' D_k and slicing them per federation lives in fedgo.client_discriminators;
    fedgo_setups builds every scenario's Setup in one place."""
    import inspect

    assembler = inspect.getsource(studies.fedgo_setups)
    assert "train_discriminators" not in assembler and "index_params" not in assembler
    assert assembler.count("distill.Setup(") == 1 and assembler.count("torch.manual_seed") == 0
    assert inspect.getsource(fedgo).count("fl.index_params(d_all") == 1
    for step in ("server_gan", "client_discriminators", "warmup_round", "data_free_generators"):
        assert f"fedgo.{step}" in assembler


def test_client_discriminators_slice_one_stacked_training_per_federation():
    torch.manual_seed(0)
    D, G = models.make_discriminator((1, 8, 8), width=4), models.make_generator((1, 8, 8), z_dim=4, width=4)
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))
    packs = [fl.pack_clients(x, y, [torch.arange(0, 5), torch.arange(5, 12)]),
             fl.pack_clients(x, y, [torch.arange(12, 20), torch.arange(20, 24), torch.arange(24, 30)])]
    init = fl.get_params(D)
    dps = fedgo.client_discriminators(D, G, packs, epochs=1, lr=0.05, init=init,
                                      generator=torch.Generator().manual_seed(1))
    ref = fedgo.train_discriminators(D, G, fl.concat_clients(packs), epochs=1, lr=0.05, init=init,
                                     generator=torch.Generator().manual_seed(1))
    assert [next(iter(d.values())).shape[0] for d in dps] == [2, 3]
    for n in ref:
        assert torch.equal(torch.cat([d[n] for d in dps]), ref[n])


def test_best_discriminator_setting_picks_the_best_mean_teacher_accuracy():
    import pandas as pd

    t = lambda accs: pd.DataFrame({"clients": [3] * 4, "alpha": [0.1, 0.1, 1.0, 1.0], "epochs": [1, 3, 1, 3],  # noqa: E731
                                   "teacher_val_acc": accs})
    search, width, epochs = studies.best_discriminator_setting([(8, t([0.5, 0.6, 0.5, 0.6])),
                                                                 (16, t([0.7, 0.4, 0.6, 0.5]))])
    assert (width, epochs) == (16, 1) and len(search) == 8 and list(search.gen_width.unique()) == [8, 16]
