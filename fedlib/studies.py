"""Experiment set-ups shared by the notebooks (the top floor: it may use every other module).

A notebook cell stays short when what it needs is built here once, as a dataclass with named fields:

- :func:`fedgo_setups` / :func:`toy_study`: the FedGO protocol's one-off part for every (alpha, seed) and the
  2-D comparison of the weighting rules (notebook 01);
- :func:`teacher_study`: the image dataset, fedlib's cached diffusion teacher for it, the cached
  feature classifier that defines the Fréchet distance, and the reference statistics (notebooks 03,
  04 and 05 load exactly the same objects through it); ``image_size`` and ``teacher_overrides`` make a
  cheaper study of the same data (notebook 03's quick Fashion-MNIST).
- :func:`ld3_case`: one dataset of notebook 03's held-out LD3 study (an image dataset through
  :func:`teacher_study`, or a 2-D mixture with its exact samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data as fdata
from . import metrics
from .diffusion import Denoiser, pretrained_teacher


@dataclass
class TeacherStudy:
    """What a notebook on a pretrained image teacher starts from."""

    train: fdata.ArrayDataset
    test: fdata.ArrayDataset
    teacher: Denoiser
    features: metrics.FeatureNet
    ref_stats: tuple  # (mu, Sigma) of the test images in the feature space

    @property
    def shape(self) -> tuple:
        return tuple(self.train.x.shape[1:])

    def fd(self, x: torch.Tensor) -> float:
        """Fréchet distance of images ``x`` to the test set in fedlib's classifier feature space (not
        comparable to published FID)."""
        return metrics.classifier_fd(self.features, x, self.ref_stats)


def pooled(ds: fdata.ArrayDataset, side: int) -> fdata.ArrayDataset:
    """``ds`` with its images average-pooled to ``side`` x ``side`` (unchanged when already that size)."""
    if ds.x.shape[-1] == side:
        return ds
    x = torch.nn.functional.adaptive_avg_pool2d(ds.x, side)
    return fdata.ArrayDataset(x, ds.y, ds.n_classes, f"{ds.name}_{side}px")


def teacher_study(dataset: str = "digits", *, use_stand_in: bool = False, teacher_steps: int = 1500,
                  teacher_seed: int = 0, feature_steps: int = 600, device="cpu", progress: bool = True,
                  image_size: int | None = None, teacher_overrides: dict | None = None) -> TeacherStudy:
    """The dataset (or its seeded stand-in), the teacher trained once per (dataset, steps, seed) and
    cached, the feature classifier (seed 0, cached) and the test set's feature statistics.

    ``image_size``: average-pool the images to this side first (a cheaper study of the same data; the
    teacher, the classifier and the reference statistics all see the pooled images);
    ``teacher_overrides``: changes to :func:`fedlib.diffusion.teacher_config` (e.g. ``channels=8``),
    part of the teacher's cache key."""
    train, test = fdata.load_train_test(dataset, use_stand_in)
    if image_size is not None:
        train, test = pooled(train, image_size), pooled(test, image_size)
    own_data = train.name.startswith("stand_in") or image_size is not None
    teacher = pretrained_teacher(dataset, steps=teacher_steps, seed=teacher_seed, device=device, progress=progress,
                                 data=train if own_data else None, **(teacher_overrides or {}))
    features = metrics.feature_extractor(train, test, steps=feature_steps, seed=0, device=device)
    ref = metrics.gaussian_stats(metrics.extract_features(features, test.x))
    return TeacherStudy(train, test, teacher, features, ref)


# ---------------------------------------------------------------------------------------------
# FedGO (notebook 01)


@dataclass
class FedGOSetups:
    """The FedGO protocol's one-off part for every (alpha, seed): ``pre`` and ``data_free`` are the
    two scenarios' :class:`fedlib.distill.Setup` lists (keys ``(alpha, seed)``, same order as ``keys``),
    ``generators`` {seed: G}, ``discriminator`` (the D module), ``disc_params`` {(alpha, seed): stacked
    D_k}, the client and server index arrays, and the seconds the GAN and the discriminators took."""

    keys: list
    pre: list
    data_free: list
    generators: dict
    discriminator: object
    disc_params: dict
    client_indices: dict
    server_indices: dict
    seconds: dict


def fedgo_setups(train, test, *, n_clients: int, alphas, seeds, gan_steps: int, disc_epochs: int,
                 disc_lr: float = 0.05, gan_lr: float = 2e-3, z_dim: int = 16, gen_width: int = 32,
                 dense: bool = True, generator: torch.Generator | None = None, device="cpu",
                 progress=None) -> FedGOSetups:
    """FedGO split of ``train`` (half of each class, unlabeled, to the server) for every (alpha, seed),
    one GAN per seed on the server data (the server half depends only on the seed), every client's
    discriminator against it (all alphas of a seed in one vmap), and the two scenarios' setups:
    pre-existing (the real unlabeled server data) and data-free (as many G samples instead)."""
    import time

    from . import distill
    from . import federated as fl
    from . import fedgo
    from . import models as fm

    shape = tuple(train.x.shape[1:])
    train, test = train.to(device), test.to(device)
    labels = train.y.cpu().numpy()
    out = FedGOSetups([], [], [], {}, None, {}, {}, {}, {"gan": 0.0, "discriminators": 0.0})
    out.discriminator = D = fm.make_discriminator(shape, width=8 if len(shape) == 3 else 32).to(device)
    d_init = fl.get_params(D)
    for seed in (seeds if progress is None else progress(seeds)):
        splits = {a: fdata.fedgo_split(labels, n_clients, a, seed=seed) for a in alphas}
        server = splits[alphas[0]][1]
        x_server = train.x[torch.as_tensor(server, device=device)]
        torch.manual_seed(seed)
        G = fm.make_generator(shape, z_dim=z_dim, width=gen_width).to(device)
        t = time.perf_counter()
        fedgo.train_gan(x_server, G, fm.make_discriminator(shape).to(device), steps=gan_steps, lr=gan_lr,
                        generator=generator)
        out.seconds["gan"] += time.perf_counter() - t
        out.generators[seed] = G
        x_free = fedgo.sample(G, len(server), generator)
        packs = [fl.pack_clients(train.x, train.y, splits[a][0]) for a in alphas]
        t = time.perf_counter()
        d_all = fedgo.train_discriminators(D, G, fl.concat_clients(packs), epochs=disc_epochs, lr=disc_lr,
                                           generator=generator, init=d_init)
        out.seconds["discriminators"] += time.perf_counter() - t
        for i, a in enumerate(alphas):
            dp = fl.index_params(d_all, slice(i * n_clients, (i + 1) * n_clients))
            key = (a, seed)
            out.keys.append(key)
            out.disc_params[key] = dp
            out.client_indices[key] = splits[a][0]
            out.server_indices[key] = server
            out.pre.append(distill.Setup(packs[i], x_server, test.x, test.y,
                                         train.y[torch.as_tensor(server, device=device)],
                                         fedgo.discriminator_logits(D, dp, x_server), key=key))
            dense_g = (fm.make_generator(shape, z_dim=z_dim + train.n_classes, width=gen_width).to(device)
                       if dense else None)
            out.data_free.append(distill.Setup(packs[i], x_free, test.x, test.y, None,
                                               fedgo.discriminator_logits(D, dp, x_free), dense_generator=dense_g,
                                               key=key))
    return out


@dataclass
class ToyStudy:
    """The 2-D comparison of the weighting rules (see :func:`toy_study`)."""

    rules: tuple
    x: torch.Tensor
    y: torch.Tensor
    parts: list
    server_x: torch.Tensor
    server_y: torch.Tensor
    grid: torch.Tensor
    grid_extent: tuple
    grid_size: int
    weights_grid: dict
    weights_server: dict
    n_classes: int
    pseudo_label_error: dict
    disagreement_with_oracle: dict
    weight_tv_to_oracle: dict
    server_test_accuracy: dict
    grid_prediction: dict
    fedavg_test_accuracy: float


def toy_study(mixture: str = "ring", *, n_clients: int = 4, alpha: float = 0.1, n_train: int = 2000,
              n_server: int = 1000, local_epochs: int = 20, disc_epochs: int = 30, distill_steps: int = 300,
              rules=("uniform", "entropy", "variance", "dafkd", "fedgo", "oracle"), grid_size: int = 80,
              seed: int = 0) -> ToyStudy:
    """The toy 2-D comparison of the weightings (docs/methods.md §1.2, the paper's toy figure): mixture
    data labelled by component, Dirichlet(alpha) over the clients; clients train 2-D MLPs for one round;
    the server has unlabeled mixture samples; G is a known broad Gaussian
    (:class:`fedlib.fedgo.GaussianSource`); every client trains its discriminator; the oracle uses the
    exact client densities p_k(x) = sum_c pi_kc N(x; mu_c, s^2 I) (pi_kc the client's class
    proportions). Weights on the server data and on a grid, pseudo-label errors (vs the true label and
    vs the oracle ensemble), each rule's mean TV distance from the oracle's weights, and each rule's
    distilled server model's predictions on the grid and accuracy."""
    from . import distill
    from . import federated as fl
    from . import fedgo
    from . import models as fm
    from . import weighting as W

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gm = fdata.mixture(mixture)
    C = gm.n_components
    x, y = gm.sample(n_train, g)
    parts = fdata.dirichlet_partition(y.numpy(), n_clients, alpha, seed=seed, min_size=5)
    clients = fl.pack_clients(x, y, parts)
    clf = fm.MLP(2, C, hidden=32)
    w0 = fl.get_params(clf)
    local = fl.local_train(clf, w0, clients, epochs=local_epochs, lr=0.05, momentum=0.9, batch_size=32, generator=g)
    G = fedgo.GaussianSource(2, scale=3.0)
    D = fm.MLPDiscriminator(2, hidden=32)
    d_params = fedgo.train_discriminators(D, G, clients, epochs=disc_epochs, lr=0.05, generator=g)
    xs, ys = gm.sample(n_server, g)
    lim = float(gm.means.abs().max()) + 1.0
    r = torch.linspace(-lim, lim, grid_size)
    grid = torch.cartesian_prod(r, r).flip(1)  # rows = y, cols = x
    pi = torch.tensor(fdata.label_distribution(y.numpy(), parts, C), dtype=torch.float32)
    pi = pi / pi.sum(1, keepdim=True)
    n_k = clients.n_k
    call = fl.functional(clf)

    def weights_at(pts):
        logits = fl.predict(call, local, pts, stacked=True)
        disc = fedgo.discriminator_logits(D, d_params, pts)
        comp = gm.component_log_prob(pts)  # [N, C]
        log_p = torch.logsumexp(comp[None] + pi.clamp_min(1e-12).log()[:, None, :], -1)  # [K, N]
        return logits, {rule: W.compute_weights(rule, logits, n_k=n_k, disc_logits=disc, log_densities=log_p)
                        for rule in rules}

    logits, w_server = weights_at(xs)
    _, w_grid = weights_at(grid)
    q = {rule: distill.pseudo_labels(logits, w_server[rule]) for rule in rules}
    oracle_label = q["oracle"].argmax(-1) if "oracle" in q else None
    fedavg_params = fl.fedavg(local, n_k)
    targets = torch.stack([q[rule] for rule in rules])
    server = distill.kl_distill_params(clf, fl.broadcast_params(fedavg_params, len(rules)), xs, targets,
                                       steps=distill_steps, lr=3e-3, batch_size=128, generator=g)
    xt, yt = gm.sample(2000, g)
    test_acc = fl.accuracy(fl.predict(call, server, xt, stacked=True), yt)
    grid_pred = fl.predict(call, server, grid, stacked=True).argmax(-1)
    return ToyStudy(
        rules=tuple(rules), x=x, y=y, parts=parts, server_x=xs, server_y=ys, grid=grid,
        grid_extent=(-lim, lim, -lim, lim), grid_size=grid_size, weights_grid=w_grid, weights_server=w_server,
        n_classes=C,
        pseudo_label_error={rule: float((q[rule].argmax(-1) != ys).float().mean()) for rule in rules},
        disagreement_with_oracle={rule: float((q[rule].argmax(-1) != oracle_label).float().mean())
                                  for rule in rules} if oracle_label is not None else {},
        weight_tv_to_oracle={rule: float(W.weight_distance(w_server[rule], w_server["oracle"]))
                             for rule in rules} if "oracle" in rules else {},
        server_test_accuracy={rule: float(a) for rule, a in zip(rules, test_acc)},
        grid_prediction={rule: p for rule, p in zip(rules, grid_pred)},
        fedavg_test_accuracy=float(fl.accuracy(fl.predict(call, fedavg_params, xt), yt)))


# ---------------------------------------------------------------------------------------------
# Notebook 03 (LD3): one dataset of the held-out study

SMALL_TEACHER = dict(channels=8, channel_mults=(1, 2), batch_size=32, lr=3e-3, ema_decay=0.995)
"""A cheap image teacher (U-Net with 8 base channels and two levels): the quick set's Fashion-MNIST teacher."""


@dataclass
class LD3Case:
    """One dataset of notebook 03: the frozen teacher, the shape of a sample, LD3's loss there (the
    quantity it validates and the table reports) and the distribution metric reported beside it."""

    dataset: str
    teacher: Denoiser
    shape: tuple
    loss: str                 # "features" / "l2" / "lpips" (images), "l2" (2-D points)
    feature_fn: object        # the classifier's feature map (loss "features"), else None
    metric: object            # samples -> float, lower is better
    metric_name: str
    n_eval: int               # held-out noise draws per seed
    model_name: str           # names the teacher in LD3's cache of learned grids
    info: dict                # teacher facts for run.metrics


def ld3_case(dataset: str, *, teacher_steps: int, n_eval: int, teacher_seed: int = 0, feature_steps: int = 600,
             image_size: int | None = None, teacher: str = "default", loss: str = "features",
             use_stand_in: bool = False, device="cpu", progress: bool = False) -> LD3Case:
    """``"grid"`` / ``"ring"``: fedlib's MLP teacher on the 2-D mixture, LD3's L2 loss, and the sliced
    Wasserstein distance to ``n_eval`` exact samples of the mixture; an image dataset: :func:`teacher_study`
    (``image_size`` pools the images, ``teacher="small"`` trains :data:`SMALL_TEACHER`), LD3's ``loss``
    and the Fréchet distance in the classifier's feature space (not comparable to FID)."""
    if dataset in ("grid", "ring"):
        gm = fdata.mixture(dataset)
        t = pretrained_teacher(dataset, steps=teacher_steps, seed=teacher_seed, device=device, progress=progress)
        ref = gm.sample(n_eval, torch.Generator().manual_seed(7))[0]
        info = {"n_params": sum(p.numel() for p in t.parameters()), "final_loss": t.history["loss"][-1],
                "cached": t.history.get("cached"), "train_wall_time_s": t.history["wall_time_s"]}
        return LD3Case(dataset, t, (2,), "l2", None, lambda x: metrics.sliced_wasserstein(x, ref), "sliced W2",
                       n_eval, t.cache_path.stem, info)
    st = teacher_study(dataset, use_stand_in=use_stand_in, teacher_steps=teacher_steps, teacher_seed=teacher_seed,
                       feature_steps=feature_steps, device=device, progress=progress, image_size=image_size,
                       teacher_overrides=SMALL_TEACHER if teacher == "small" else None)
    t = st.teacher
    info = {"n_params": sum(p.numel() for p in t.parameters()), "final_loss": t.history["loss"][-1],
            "cached": t.history.get("cached"), "train_wall_time_s": t.history["wall_time_s"],
            "image_side": st.shape[-1], "feature_classifier_test_accuracy": st.features.test_accuracy}
    return LD3Case(dataset, t, st.shape, loss, st.features.features if loss == "features" else None, st.fd, "FD",
                   n_eval, t.cache_path.stem, info)
