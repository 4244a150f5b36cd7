"""Properties of fedlib.data: datasets and partitions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedlib import data as D

labels_strategy = st.integers(2, 12).flatmap(
    lambda c: st.lists(st.integers(0, c - 1), min_size=40, max_size=400).map(np.array)
)


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n, "some index assigned twice or not at all"
    assert np.array_equal(np.sort(joined), np.arange(n))


# --- digits ---------------------------------------------------------------------------------

def test_digits_shapes_range_and_fixed_split():
    tr, te = D.load_digits("train"), D.load_digits("test")
    assert tr.x.shape == (1437, 1, 8, 8) and te.x.shape == (360, 1, 8, 8)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.long
    assert tr.x.min() == -1.0 and tr.x.max() == 1.0
    assert len(tr) + len(te) == 1797 and tr.n_classes == 10
    # same split every call; train and test disjoint (compare rows)
    assert torch.equal(D.load_digits("train").x, tr.x)
    all_rows = {tuple(r) for r in D.load_digits("all").x.reshape(1797, -1).tolist()}
    assert len(all_rows) <= 1797
    # stratified: every class in both splits in near-equal proportion
    assert (te.label_counts() >= 34).all()


def test_arraydataset_checks_and_subsets():
    ds = D.load_digits("test")
    sub = ds.subset([0, 5, 7])
    assert torch.equal(sub.x[1], ds.x[5]) and len(sub) == 3
    with pytest.raises(ValueError, match="rows"):
        D.ArrayDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), 2)


# --- partitions -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(labels=labels_strategy, k=st.integers(1, 8), alpha=st.floats(0.05, 100.0), seed=st.integers(0, 2**16))
def test_dirichlet_exact_cover_min_size_and_determinism(labels, k, alpha, seed):
    try:
        parts = D.dirichlet_partition(labels, k, alpha, seed=seed, min_size=2, max_tries=200)
    except ValueError as err:  # allowed only with the helpful message
        assert "use fewer clients" in str(err)
        return
    assert len(parts) == k
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 2
    again = D.dirichlet_partition(labels, k, alpha, seed=seed, min_size=2, max_tries=200)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 30), seed=st.integers(0, 1000))
def test_iid_partition_cover_and_balance(n, k, seed):
    if k > n:
        with pytest.raises(ValueError, match="at most"):
            D.iid_partition(n, k, seed)
        return
    parts = D.iid_partition(n, k, seed)
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_large_alpha_is_close_to_iid_and_small_alpha_is_not():
    y = D.load_digits("train").y.numpy()
    glob = np.bincount(y, minlength=10) / len(y)

    def mean_tv(alpha):
        counts = D.label_distribution(y, D.dirichlet_partition(y, 10, alpha, seed=1), 10).astype(float)
        return 0.5 * np.abs(counts / counts.sum(1, keepdims=True) - glob).sum(1).mean()

    assert mean_tv(1000.0) < 0.06
    assert mean_tv(0.05) > 0.5


def test_shards_cover_and_label_count():
    y = D.load_digits("train").y.numpy()
    parts = D.shard_partition(y, 10, shards_per_client=2, seed=3)
    assert_exact_cover(parts, len(y))
    assert max(len(np.unique(y[p])) for p in parts) <= 4


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), alpha=st.sampled_from([0.05, 0.1, 1.0]))
def test_fedgo_split_disjoint_from_clients_and_test(seed, alpha):
    tr = D.load_digits("train")
    y = tr.y.numpy()
    clients, server = D.fedgo_split(y, 10, alpha, seed=seed)
    client_all = np.concatenate(clients)
    assert len(np.intersect1d(client_all, server)) == 0
    assert_exact_cover(clients + [server], len(y))
    # half of every class on the server (rounding aside)
    per_class = np.bincount(y, minlength=10)
    assert np.all(np.abs(np.bincount(y[server], minlength=10) - per_class / 2) <= 1)
    # the test split is a different set of images: no training index can point into it
    assert client_all.max() < len(tr)


@pytest.mark.parametrize("call, match", [
    (lambda y: D.dirichlet_partition(y, 5, 0.0), "alpha=0.0 must be"),
    (lambda y: D.dirichlet_partition(y, 5, -1), "alpha=-1"),
    (lambda y: D.dirichlet_partition(y, 5000, 1.0), "use at most"),
    (lambda y: D.partition("zipf", y, 5), "allowed: 'iid', 'dirichlet', 'shards'"),
    (lambda y: D.partition("dirichlet", y, 5), "needs alpha"),
    (lambda y: D.iid_partition(len(y), 0), "positive integer"),
    (lambda y: D.fedgo_split(y, 5, 0.1, server_fraction=1.0), "strictly between"),
    (lambda y: D.dirichlet_partition(y, 5, 0.5, min_size=-5), r"min_size=-5; allowed: an integer >= 1"),
    (lambda y: D.dirichlet_partition(y, 5, 0.5, min_size=0), r"min_size=0; allowed: an integer >= 1"),
    (lambda y: D.dirichlet_partition(y, 5, 0.5, min_size=1.5), r"min_size=1.5; allowed: an integer >= 1"),
    (lambda y: D.fedgo_split(y, 5, 0.5, min_size=-5), r"min_size=-5; allowed: an integer >= 1"),
])
def test_bad_partition_arguments_are_explained(call, match):
    y = D.load_digits("train").y.numpy()
    with pytest.raises(ValueError, match=match):
        call(y)


# --- 2-D toys -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", D.TOY_NAMES)
def test_toy_datasets_are_labelled_and_seeded(name):
    a, b = D.toy_2d(name, 500, seed=4), D.toy_2d(name, 500, seed=4)
    assert a.x.shape == (500, 2) and torch.equal(a.x, b.x)
    assert a.y.min() >= 0 and a.y.max() < a.n_classes
    assert len(a.y.unique()) > 1


@pytest.mark.parametrize("name", ["grid", "ring"])
def test_mixture_density_is_normalised_and_matches_components(name):
    gm = D.mixture(name)
    xs = torch.linspace(-4, 4, 400)
    pts = torch.cartesian_prod(xs, xs)
    mass = gm.log_prob(pts).exp().sum() * (xs[1] - xs[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-2
    # log p = logsumexp(log w_m + log N_m)
    x, y = gm.sample(100, torch.Generator().manual_seed(0))
    manual = torch.logsumexp(gm.component_log_prob(x) + gm.weights.log(), 1)
    assert torch.allclose(manual, gm.log_prob(x))
    # samples are most likely under their own component
    assert (gm.component_log_prob(x).argmax(1) == y).float().mean() > 0.95


def test_mixture_score_matches_autograd():
    gm = D.mixture("ring")
    x = torch.randn(50, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(gm.log_prob(x).sum(), x)
    assert torch.allclose(gm.score(x.detach()), grad, atol=1e-4)


# --- paper datasets -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "celeba"])
def test_absent_paper_dataset_gives_clear_offline_error(name, tmp_path):
    with pytest.raises(D.DatasetUnavailable) as info:
        D.load_dataset(name, "train", root=tmp_path, download=False)
    msg = str(info.value)
    assert name in msg and str(tmp_path) in msg and "digits" in msg and "on a machine with internet" in msg


def test_unknown_dataset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: 'digits', 'fashion_mnist'"):
        D.load_dataset("imagenet")


@pytest.mark.parametrize("name", D.DATASET_NAMES)
def test_stand_in_has_the_paper_shape_and_is_seeded(name):
    c, h, w, k, _ = D.PAPER_DATASETS[name]
    a = D.stand_in(name, "train", n=64, seed=1)
    assert a.x.shape == (64, c, h, w) and a.n_classes == k
    assert a.x.min() >= -1 and a.x.max() <= 1
    assert torch.equal(a.x, D.stand_in(name, "train", n=64, seed=1).x)
    assert not torch.equal(a.x, D.stand_in(name, "test", n=64, seed=1).x)


def test_stratified_subset_keeps_proportions():
    y = D.load_digits("train").y.numpy()
    idx = D.stratified_subset(y, 200, seed=0)
    assert len(idx) == 200 and len(np.unique(idx)) == 200
    assert np.abs(np.bincount(y[idx], minlength=10) - 20).max() <= 2


def test_load_train_test_falls_back_to_the_stand_in_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    train, test = D.load_train_test("cifar10", stand_in_n=(64, 16))
    assert train.name == "stand_in_cifar10" and train.x.shape == (64, 3, 32, 32) and len(test) == 16
    assert "not on this machine" in capsys.readouterr().out
    train, test = D.load_train_test("digits")
    assert (len(train), len(test)) == (1437, 360)
    assert D.load_train_test("digits", stand_in_data=True, stand_in_n=(10, 5))[0].name == "stand_in_digits"


def test_stratified_cap_keeps_small_sets_whole():
    tr = D.load_digits("train")
    assert tr.stratified(0) is tr and tr.stratified(5000) is tr
    assert len(tr.stratified(100)) == 100


LABEL_TAKERS = {
    "dirichlet_partition": lambda y: D.dirichlet_partition(y, 3, 0.5),
    "shard_partition": lambda y: D.shard_partition(y, 3),
    "partition_iid": lambda y: D.partition("iid", y, 3),
    "partition_dirichlet": lambda y: D.partition("dirichlet", y, 3, alpha=0.5),
    "fedgo_split": lambda y: D.fedgo_split(y, 3, 0.5),
    "stratified_subset": lambda y: D.stratified_subset(y, 10),
    "label_distribution": lambda y: D.label_distribution(y, [np.arange(5)]),
    "ArrayDataset": lambda y: D.ArrayDataset(torch.zeros(60, 2), torch.as_tensor(y), 4),
}


@pytest.mark.parametrize("fn", sorted(LABEL_TAKERS))
@pytest.mark.parametrize("shape", ["one_hot", "column", "scalar"])
def test_labels_that_are_not_1d_are_refused(fn, shape):
    y = np.arange(60) % 4
    bad = {"one_hot": np.eye(4, dtype=np.int64)[y], "column": y[:, None], "scalar": np.array(3)}[shape]
    with pytest.raises(ValueError) as info:
        LABEL_TAKERS[fn](bad)
    msg = str(info.value)
    assert f"got shape {bad.shape}" in msg and "1-D class indices of shape [N]" in msg and "y.argmax(1)" in msg
    LABEL_TAKERS[fn](y)  # the same labels as a 1-D array are fine


@pytest.mark.parametrize("fn", ["dirichlet_partition", "fedgo_split", "partition_dirichlet"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 2.5, -1])
def test_labels_that_are_not_class_indices_are_refused(fn, bad):
    # NaN equals no class: those samples used to reach no client (nor the server), silently
    y = (np.arange(60) % 4).astype(np.float64 if isinstance(bad, float) else np.int64)
    y[7] = bad
    with pytest.raises(ValueError) as info:
        LABEL_TAKERS[fn](y)
    msg = str(info.value)
    assert f"labels[7]={y[7].item()!r} (1 of 60 entries bad)" in msg
    assert "allowed: finite integer class indices >= 0" in msg
    y[7] = 3
    parts = LABEL_TAKERS[fn](y)  # integer-valued float labels are class indices too
    parts = parts[0] + [parts[1]] if fn == "fedgo_split" else parts
    assert sorted(np.concatenate(parts).tolist()) == list(range(60))


def test_uint8_conversion_is_the_one_every_call_site_wrote():
    """``to_uint8`` / ``from_uint8`` (written once, used by plots and ld3) give the arrays the call
    sites' own expressions gave: ld3's explorer samples (float32) and the explorers' uint8 grids."""
    from fedlib.data import from_uint8, to_uint8

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, 1, 8, 8, generator=g) * 1.2,  # beyond [-1, 1] too
                   (torch.arange(0, 256, dtype=torch.float32) / 127.5 - 1).reshape(4, 1, 8, 8)])  # every level
    u = to_uint8(x)
    assert u.dtype == torch.uint8
    assert torch.equal(u, ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    assert torch.equal(from_uint8(u), u.float() / 127.5 - 1.0)
    assert torch.equal(from_uint8(u), u.float() / 127.5 - 1)
    assert torch.equal(to_uint8(from_uint8(u)), u)


def test_label_tv_lives_in_metrics_and_plots_still_names_it():
    from fedlib import metrics, plots

    assert plots.label_tv is metrics.label_tv
    assert metrics.label_tv([[5, 5], [5, 5]]) == 0.0
    assert metrics.label_tv([[10, 0], [0, 10]]) == 0.5


def test_every_domain_is_a_fixed_transform_that_keeps_the_range_and_moves_the_pixels():
    from fedlib.data import DOMAINS, domain_split, load_digits, shift_domain
    x = load_digits("train").x[:64]
    for d in DOMAINS:
        a, b = shift_domain(x, d), shift_domain(x, d)
        assert a.shape == x.shape and torch.equal(a, b), d
        assert a.min() >= -1 and a.max() <= 1, d
        assert (d == "original") == torch.equal(a, x), d
    with pytest.raises(ValueError, match="sepia"):
        shift_domain(x, "sepia")


def test_domain_split_is_disjoint_stratified_and_shifted():
    from fedlib.data import domain_split, load_digits, shift_domain
    data = load_digits("train")
    parts = domain_split(data, ["original", "inverted", "rotated"], seed=0)
    assert sum(len(p) for p in parts) == len(data)
    counts = np.stack([p.label_counts() for p in parts])
    assert (counts.max(0) - counts.min(0) <= 1).all()
    # part 1 is the inverse of some originals: inverting it back finds rows of the data
    back = -parts[1].x[:5]
    assert all((data.x == row).flatten(1).all(1).any() for row in back)


def test_digits_are_scikit_learns_with_its_stratified_split():
    # fedlib reads the bundled file and a stored split so that loading the digits imports no scikit-learn;
    # both must be exactly what scikit-learn gives
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0
    tr, te = train_test_split(np.arange(len(bunch.target)), test_size=D.DIGITS_TEST_FRACTION,
                              random_state=D.DIGITS_SPLIT_SEED, stratify=bunch.target)
    for split, idx in (("train", np.sort(tr)), ("test", np.sort(te)), ("all", np.arange(len(bunch.target)))):
        ds = D.load_digits(split)
        assert torch.equal(ds.x, x[idx]) and torch.equal(ds.y, torch.tensor(bunch.target[idx])), split


def test_loading_the_digits_imports_no_scikit_learn():
    import subprocess
    import sys

    code = "import sys, fedlib.data as D; D.load_digits('train'); print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
