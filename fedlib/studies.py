"""Experiment set-ups and claim helpers shared by the notebooks (the analysis layer: above the papers'
modules and the choice of backend, below the notebook machinery; docs/DEVELOPING.md).

A notebook cell stays short when what it needs is built here once, as a dataclass with named fields:

- :func:`fedgo_setups` / :func:`toy_study`: the FedGO protocol's one-off part for every (alpha, seed) and the
  2-D comparison of the weighting rules (notebook 01);
- :func:`teacher_study`: the image dataset, fedlib's cached diffusion teacher for it, the cached
  feature classifier that defines the Fréchet distance, and the reference statistics (notebooks 03,
  04 and 05 load exactly the same objects through it); ``image_size`` and ``teacher_overrides`` make a
  cheaper study of the same data (notebook 03's quick Fashion-MNIST).
- :func:`ld3_case`: one dataset of notebook 03's held-out LD3 study (an image dataset through
  :func:`teacher_study`, or a 2-D mixture with its exact samples), and that study's claims on the rows
  of :func:`fedlib.ld3.held_out_study` (:func:`beats_every_grid`, :func:`relative_gain`,
  :func:`agreement`, :func:`summary_table`), decided by :mod:`fedlib.verdicts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import data as fdata
from . import metrics
from .diffusion import Denoiser, pretrained_teacher
from .utils import check_number


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

    def real_fd(self, n: int) -> float:
        """The floor a generator's :meth:`fd` is read against: the Fréchet distance of ``n`` real images that
        are not in the reference. The reference is every test image, so scoring test images would score
        the reference against (part of) itself (0 for digits' 360 test images at n >= 360): the images
        scored are training images, and a table must call them so."""
        return self.fd(self.train.x[:n])


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

# the three server-data scenarios of notebook 01, named by what the server actually holds
SCENARIOS = {
    "pre": "pre-existing server data (the real unlabeled server half)",
    "gan_samples": "GAN samples (server data = samples of a GAN trained on the real server half: not data-free)",
    "data_free": "data-free (server data = samples of a G trained against the clients' ensemble; no server data)",
}


@dataclass
class FedGOSetups:
    """The FedGO protocol's one-off part for every (K, alpha, seed) and scenario of :data:`SCENARIOS`:
    ``setups[scenario][K]`` is the list of :class:`fedlib.distill.Setup` (keys ``(K, alpha, seed)``, in
    the order of ``keys``; one list per client count because one run of rounds needs one K);
    ``generators[(scenario, key)]`` the G the discriminators were trained against (the server GAN is
    one per seed, shared by its keys), ``discriminator`` the D module, ``disc_params[(scenario, key)]``
    the stacked D_k, ``client_indices[key]``, ``server_indices[seed]``, and the seconds each part took."""

    keys: list
    setups: dict
    generators: dict
    discriminator: object
    disc_params: dict
    client_indices: dict
    server_indices: dict
    seconds: dict
    # what each scenario cost the clients beyond the rounds: its E_d, and the local epochs of a warm-up
    # round (data_free's; 0 elsewhere). Read by scenario_overhead, so that no caller can leave one out.
    disc_epochs: dict = field(default_factory=dict)
    warmup_epochs: dict = field(default_factory=dict)

    def all(self, scenario: str) -> list:
        """Every setup of ``scenario`` (all client counts)."""
        return [s for per_k in self.setups.get(scenario, {}).values() for s in per_k]


@dataclass(frozen=True)
class FedGOConfig:
    """The settings of FedGO's one-off protocol (:func:`fedgo_setups`), checked once here. Names are notebook
    01's where it has the parameter (``gan_steps``, ``warmup_epochs``); its chosen ``gan_width`` and
    ``disc_epochs_free`` fill ``gen_width`` and ``free_disc_epochs``, its ``free_gen_steps`` and ``lr`` fill
    ``free_steps`` and ``local_lr``."""

    gan_steps: int               # server GAN steps, once per seed (step 1)
    disc_epochs: int             # E_d: every client's discriminator epochs against G (step 2)
    disc_lr: float = 0.05        # the discriminators' SGD learning rate
    gan_lr: float = 2e-3         # the server GAN's Adam learning rate
    z_dim: int = 16              # G's noise dimension
    gen_width: int = 32          # G's width
    disc_width: int = 8          # D_k's width (image data; 2-D data uses 32)
    warmup_epochs: int = 1       # data-free: local epochs of the warm-up round whose ensemble G is trained against
    local_lr: float = 0.05       # data-free: the warm-up round's local SGD learning rate
    free_steps: int = 200        # data-free: G's steps against the warm-up ensemble
    free_lr: float = 1e-3        # data-free: G's Adam learning rate
    dense: bool = True           # data-free setups also get a DENSE generator
    free_disc_epochs: int | None = None  # data-free: E_d (None: disc_epochs)
    free_gen_width: int | None = None    # data-free: G's width (None: gen_width)

    def __post_init__(self):
        for name in ("gan_steps", "disc_epochs", "warmup_epochs", "free_steps"):
            check_number(name, getattr(self, name), at_least=0, integer=True)
        for name in ("z_dim", "gen_width", "disc_width"):
            check_number(name, getattr(self, name), at_least=1, integer=True)
        for name in ("disc_lr", "gan_lr", "local_lr", "free_lr"):
            check_number(name, getattr(self, name), above=0)
        if self.free_disc_epochs is not None:
            check_number("free_disc_epochs", self.free_disc_epochs, at_least=0, integer=True, fix="None: disc_epochs")
        if self.free_gen_width is not None:
            check_number("free_gen_width", self.free_gen_width, at_least=1, integer=True, fix="None: gen_width")

    @classmethod
    def build(cls, config: "FedGOConfig | None", fields: dict) -> "FedGOConfig":
        """``config``, or one made of ``fields`` (keywords of the same names); not both."""
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{unknown} are not FedGO settings; allowed: {', '.join(cls.__dataclass_fields__)}")
        if config is not None and fields:
            raise ValueError(f"got a FedGOConfig and the settings {sorted(fields)}; pass one of them "
                             "(dataclasses.replace(config, ...) changes a config)")
        return config if config is not None else cls(**fields)


def fedgo_setups(train, test, config: FedGOConfig | None = None, *, client_counts, alphas, seeds,
                 scenarios=("pre", "data_free"), model=None, init=None, generator: torch.Generator | None = None,
                 device="cpu", progress=None, server_generators: dict | None = None, **fields) -> FedGOSetups:
    """FedGO split of ``train`` (half of each class, unlabeled, to the server: the same half for every
    K and alpha of a seed) for every (K, alpha, seed), and per scenario of :data:`SCENARIOS`, with the
    settings of ``config`` (a :class:`FedGOConfig`, or its fields as keywords):

    - ``pre``: one GAN per seed on the real server half (docs/methods.md §1.2 step 1), every client's
      discriminator against it (step 2), the real server half as server data;
    - ``gan_samples``: the same G and discriminators, server data = as many G samples;
    - ``data_free``: no server data at all (our design): a warm-up round in which every client trains
      ``model`` from ``init`` for ``warmup_epochs`` local epochs and uploads it, a label-conditioned G
      trained against their ensemble (:func:`fedlib.fedgo.train_generator_data_free`, ``free_steps``),
      every client's discriminator against that G, server data = as many G samples.

    Data-free setups also get a DENSE generator (``dense``).

    ``server_generators`` ({scenario name: {seed: G}}) adds one scenario per name whose server G is
    given (e.g. notebook 05's one-step generator distilled from a federated diffusion model): every
    client's discriminator against that seed's G, server data = as many G samples, no DENSE generator.
    Nothing of the server half is read for them: they are data-free when their G is.

    ``free_disc_epochs``, ``free_gen_width``: E_d and G's width of the data-free scenario (None:
    ``disc_epochs``, ``gen_width``), so that a data-free run can use settings chosen without server data.
    The protocol's steps are :mod:`fedlib.fedgo`'s (``server_gan``, ``client_discriminators``,
    ``warmup_round``, ``data_free_generators``); this function only assembles them."""
    import time

    from . import distill
    from . import federated as fl
    from . import fedgo
    from . import models as fm

    c = FedGOConfig.build(config, fields)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; allowed: {', '.join(SCENARIOS)}")
    given = dict(server_generators or {})
    clash = [s for s in given if s in SCENARIOS]
    if clash:
        raise ValueError(f"server_generators names {clash} clash with the built-in scenarios; pick other names")
    missing = [(s, seed) for s, per_seed in given.items() for seed in seeds if seed not in per_seed]
    if missing:
        raise ValueError(f"server_generators lack a G for (scenario, seed) {missing}: give one G per seed")
    if "data_free" in scenarios and model is None:
        raise ValueError("the data-free scenario needs the classifier (model=...) for its warm-up round")
    shape = tuple(train.x.shape[1:])
    C = train.n_classes
    train, test = train.to(device), test.to(device)
    labels = train.y.cpu().numpy()
    out = FedGOSetups([], {s: {K: [] for K in client_counts} for s in [*scenarios, *given]}, {}, None, {}, {}, {},
                      {"gan": 0.0, "discriminators": 0.0, "warmup": 0.0, "free_generator": 0.0})
    out.discriminator = D = fm.make_discriminator(shape, width=c.disc_width if len(shape) == 3 else 32).to(device)
    d_init = fl.get_params(D)
    init = init if init is not None or model is None else fl.get_params(model)
    free_disc_epochs = c.disc_epochs if c.free_disc_epochs is None else c.free_disc_epochs

    def timed(part, fn, *args, **kw):
        t = time.perf_counter()
        result = fn(*args, **kw)
        out.seconds[part] += time.perf_counter() - t
        return result

    def add(scen, key, pack, G, dp, x, y, dense):
        """One Setup of ``scen``: the discriminators ``dp`` of ``key``'s clients against ``G``, server data ``x``."""
        out.generators[(scen, key)], out.disc_params[(scen, key)] = G, dp
        out.setups[scen][key[0]].append(distill.Setup(
            pack, x, test.x, test.y, y, fedgo.discriminator_logits(D, dp, x),
            dense_generator=_dense_generator(shape, c.z_dim, C, c.gen_width, device) if dense else None, key=key))

    for scen in [*scenarios, *given]:
        out.disc_epochs[scen] = free_disc_epochs if scen == "data_free" else c.disc_epochs
        out.warmup_epochs[scen] = c.warmup_epochs if scen == "data_free" else 0

    disc_kw = dict(epochs=c.disc_epochs, lr=c.disc_lr, init=d_init, generator=generator)
    for seed in (seeds if progress is None else progress(seeds)):
        grid = [(K, a) for K in client_counts for a in alphas]
        splits = {(K, a): fdata.fedgo_split(labels, K, a, seed=seed) for K, a in grid}
        server = splits[grid[0]][1]
        out.server_indices[seed] = server
        packs = [fl.pack_clients(train.x, train.y, splits[ka][0]) for ka in grid]
        keys = [(K, a, seed) for K, a in grid]
        for (K, a), key in zip(grid, keys):
            out.keys.append(key)
            out.client_indices[key] = splits[(K, a)][0]
        if {"pre", "gan_samples"} & set(scenarios):  # the only place the server half is read
            x_server = train.x[torch.as_tensor(server, device=device)]
            y_server = train.y[torch.as_tensor(server, device=device)]
            G = timed("gan", fedgo.server_gan, x_server, shape, seed=seed, z_dim=c.z_dim, width=c.gen_width,
                      steps=c.gan_steps, lr=c.gan_lr, generator=generator, device=device)
            dps = timed("discriminators", fedgo.client_discriminators, D, G, packs, **disc_kw)
            x_gan = fedgo.sample(G, len(server), generator) if "gan_samples" in scenarios else None
            for key, pack, dp in zip(keys, packs, dps):
                for scen, x, y in (("pre", x_server, y_server), ("gan_samples", x_gan, None)):
                    if scen in scenarios:
                        add(scen, key, pack, G, dp, x, y, dense=scen != "pre" and c.dense)
        for scen, per_seed in given.items():  # given generators: the clients' data against G, G samples
            G = per_seed[seed]
            dps = timed("discriminators", fedgo.client_discriminators, D, G, packs, **disc_kw)
            x_g = fedgo.sample(G, len(server), generator)
            for key, pack, dp in zip(keys, packs, dps):
                add(scen, key, pack, G, dp, x_g, None, dense=False)
    if "data_free" in scenarios:
        for K in client_counts:  # every (alpha, seed) of one client count at once
            keys = [k for k in out.keys if k[0] == K]
            packs = [fl.pack_clients(train.x, train.y, out.client_indices[k]) for k in keys]
            warm = timed("warmup", fedgo.warmup_round, model, init, packs, epochs=c.warmup_epochs, lr=c.local_lr,
                         generator=generator)
            gens = timed("free_generator", fedgo.data_free_generators, model, warm, len(keys), shape, C, seed=K,
                         z_dim=c.z_dim, width=c.free_gen_width or c.gen_width, steps=c.free_steps, lr=c.free_lr,
                         generator=generator, device=device)
            for part in _groups_of(range(len(keys)), K, limit=128):  # discriminators of <= 128 clients at once
                dps = timed("discriminators", fedgo.client_discriminators, D, [gens[i] for i in part],
                            [packs[i] for i in part], **dict(disc_kw, epochs=free_disc_epochs),
                            generator_of=torch.arange(len(part)).repeat_interleave(K))
                for i, dp in zip(part, dps):
                    x_free = fedgo.sample(gens[i], len(out.server_indices[keys[i][2]]), generator)
                    add("data_free", keys[i], packs[i], gens[i], dp, x_free, None, dense=c.dense)
    return out


def _groups_of(items, size: int, limit: int) -> list:
    """``items`` in consecutive groups of at most max(1, limit // size) (bounds the clients per vmap)."""
    items, per = list(items), max(1, limit // size)
    return [items[i:i + per] for i in range(0, len(items), per)]


def _dense_generator(shape, z_dim, n_classes, width, device):
    from . import models as fm

    return fm.make_generator(shape, z_dim=z_dim + n_classes, width=width).to(device)


KEY_NAMES = ("clients", "alpha", "seed")


def rounds_frame(results: dict):
    """One row per (scenario, K, alpha, seed, method, round) from ``{scenario: {K: RoundsResult}}``:
    the results indexed by their setup keys (:meth:`fedlib.distill.RoundsResult.frame`)."""
    import pandas as pd

    frames = [res.frame(KEY_NAMES).assign(scenario=scen) for scen, per_k in results.items() for res in per_k.values()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# analysis-only methods added to a frame (never baselines of a claim): FedGO with exact weights
ANALYSIS_METHODS = ("fedgo_exact",)


def exact_weight_setups(setups: list) -> list:
    """Analysis only (it reads the server data's true labels): copies of pre-existing set-ups whose
    discriminator logits are exact for label skew, l_k(x) = log pi_k,y(x) (pi_k,y: client k's share of
    class y), so FedGO's rule gives the posterior n_k,y / n_y, the oracle weights when classes do not
    overlap. FedGO run on them shows what the weighting could give with perfect discriminators."""
    import dataclasses

    out = []
    for s_ in setups:
        K, C = s_.clients.n_clients, int(s_.server_y.max()) + 1
        counts = torch.stack([torch.bincount(s_.clients.client(k)[1], minlength=C) for k in range(K)]).float()
        pi = counts / counts.sum(1, keepdim=True)
        out.append(dataclasses.replace(s_, disc_logits=pi.clamp_min(1e-6).log()[:, s_.server_y]))
    return out


def baselines_of(frame, scenario: str, method: str = "fedgo") -> list:
    """The methods ``method`` is compared with in ``scenario``: the scenario's other methods, plus the
    aggregation-only ones (FedAvg, FedProx: they use no server data) from the pre-existing scenario."""
    from .distill import aggregation_only

    own = list(dict.fromkeys(frame.loc[frame.scenario == scenario, "method"]))
    pre = set(frame.loc[frame.scenario == "pre", "method"])
    return ([m for m in own if m != method and m not in ANALYSIS_METHODS]
            + [m for m in aggregation_only() if m in pre and m not in own])


def _rows_of(frame, scenario, method):
    own = set(frame.loc[frame.scenario == scenario, "method"])
    return scenario if method in own else "pre"


def fedgo_comparisons(frame, scenario: str, alpha: float, client_counts, method: str = "fedgo",
                      value: str = "accuracy", last: bool = True, vs=None) -> dict:
    """Paired comparisons (:func:`fedlib.verdicts.compare`, over seeds) of ``method`` with every
    baseline (``vs``, default :func:`baselines_of`) at every client count: ``{"b, K=k": Comparison}``."""
    from .verdicts import compare, per_seed

    at = "round" if last else None
    out = {}
    for K in client_counts:
        a = per_seed(frame, value, last=at, scenario=scenario, clients=K, alpha=alpha, method=method)
        for b in (vs if vs is not None else baselines_of(frame, scenario, method)):
            other = per_seed(frame, value, last=at, scenario=_rows_of(frame, scenario, b), clients=K, alpha=alpha,
                             method=b).loc[a.index]
            out[f"{b}, K={K}"] = compare(a.values, other.values, a_name=method, b_name=b)
    return out


def gap_to_best(frame, scenario: str, method: str = "fedgo"):
    """Per (K, alpha, seed, round): ``method``'s accuracy minus the best baseline's (per seed), and
    which baseline that was: the gap the 'beats every baseline' claims are about."""
    import pandas as pd

    rows = []
    keys = ["clients", "alpha", "seed", "round"]
    own = frame[(frame.scenario == scenario) & (frame.method == method)].set_index(keys)["accuracy"]
    others = pd.concat([frame[(frame.scenario == _rows_of(frame, scenario, b)) & (frame.method == b)]
                        .set_index(keys)["accuracy"].rename(b) for b in baselines_of(frame, scenario, method)], axis=1)
    best = others.loc[own.index]
    for idx, v in own.items():
        rows.append({**dict(zip(keys, idx)), "gap": v - best.loc[idx].max(), "best": best.loc[idx].idxmax()})
    return pd.DataFrame(rows)


def data_free_sweep(train, test, model, init, *, steps_grid, client_counts, alphas, seeds, methods, run_kw: dict,
                    pre_frame=None, fd=None, known: dict | None = None, **setup_kw):
    """The data-free claim against the data-free G's training budget: for every number of G steps in
    ``steps_grid``, the data-free setups (:func:`fedgo_setups`), ``methods`` for ``run_kw['rounds']``
    rounds, and per seed FedGO's gap to the best baseline at the last round (mean over K and alpha;
    FedAvg/FedProx taken from ``pre_frame`` when given) and ``fd(samples)`` of the G samples (mean).
    ``known``: {steps: (frame, data-free setups)} already run (the main run), reused, not rerun.
    Returns a DataFrame (free_steps, seed, gap, fd)."""
    import pandas as pd

    from . import backends

    def rows_of(steps, frame, setups):
        if pre_frame is not None:
            frame = pd.concat([frame[frame.scenario == "data_free"], pre_frame[pre_frame.scenario == "pre"]],
                              ignore_index=True)
        frame = frame[frame.clients.isin(client_counts) & frame.alpha.isin(alphas)]
        gap = gap_to_best(frame, "data_free")
        gap = gap[gap["round"] == gap["round"].max()].groupby("seed")["gap"].mean()
        for seed in seeds:
            xs = [s_.server_x for s_ in setups if s_.key[2] == seed and s_.key[0] in client_counts]
            yield {"free_steps": steps, "seed": seed, "gap": float(gap[seed]),
                   "fd": float(sum(fd(x) for x in xs) / len(xs)) if fd is not None else float("nan")}

    rows = [r for steps, (frame, setups) in (known or {}).items() for r in rows_of(steps, frame, setups)]
    for steps in steps_grid:
        if steps in (known or {}):
            continue
        st = fedgo_setups(train, test, client_counts=client_counts, alphas=alphas, seeds=seeds, scenarios=("data_free",),
                          model=model, init=init, free_steps=steps, dense="dense" in methods, **setup_kw)
        res = {"data_free": {K: backends.run_rounds(model, st.setups["data_free"][K], methods, **run_kw)
                             for K in client_counts}}
        rows += list(rows_of(steps, rounds_frame(res), st.all("data_free")))
    return pd.DataFrame(rows).sort_values(["free_steps", "seed"], ignore_index=True)


def distill_lr_search(model, setups: list, lr_grid, **run_kw):
    """Choose the distillation learning rate on the held-out KL to the teacher (the server's own
    validation quantity: a held-out part of the server data, labelled by the teacher only) of FedGO's
    server models, mean over rounds and setups (use the setups of a search seed). Returns a
    DataFrame (lr, val_kl, epochs_run) and the chosen lr."""
    import pandas as pd

    from . import backends

    rows = []
    by_k = {}
    for s_ in setups:  # one run of rounds per client count
        by_k.setdefault(s_.clients.n_clients, []).append(s_)
    for lr in lr_grid:
        log = [e for group in by_k.values()
               for e in backends.run_rounds(model, group, ["fedgo"], distill_lr=lr, **run_kw).distill_log]
        rows.append({"lr": lr, "val_kl": float(torch.stack([e["val_kl"].mean() for e in log]).mean()),
                     "epochs_run": sum(e["epochs_run"] for e in log) / len(log)})
    table = pd.DataFrame(rows)
    return table, float(table.loc[table["val_kl"].idxmin(), "lr"])


def best_discriminator_setting(tables) -> tuple:
    """The (generator width, E_d) with the best mean FedGO-teacher held-out accuracy over the search tables
    ``tables``, pairs (generator width, the table :func:`discriminator_epoch_search` returned for it).
    Returns ``(search, gen_width, disc_epochs)``: ``search`` is every table with its ``gen_width`` column."""
    import pandas as pd

    search = pd.concat([table.assign(gen_width=w) for w, table in tables], ignore_index=True)
    best = search.groupby(["gen_width", "epochs"])["teacher_val_acc"].mean().idxmax()
    return search, int(best[0]), int(best[1])


def discriminator_epoch_search(train, model, config: FedGOConfig, *, client_counts, alphas, seed: int, grid, G=None,
                               local_epochs: int = 5, val_fraction: float = 0.2, generator=None, device="cpu"):
    """Choose the discriminator epochs E_d on a validation quantity: on the search ``seed`` (not a claim
    seed) every client holds out ``val_fraction`` of its data, trains ``model`` on the rest for
    ``local_epochs`` epochs and D_k against the server GAN for the epochs of ``grid`` (cumulatively: each
    value continues the previous one). Per value, three held-out quantities: each D_k's BCE
    (:func:`fedlib.fedgo.discriminator_val_loss`), the log-loss of the FedGO weights as the posterior of
    the source client (:func:`fedlib.fedgo.client_posterior_loss`) and the accuracy of the FedGO teacher
    on the pooled held-out client data (labels the clients own; never test data), on which E_d is chosen.

    ``config`` (a :class:`FedGOConfig`) gives the server GAN (``gan_steps``, ``gan_lr``, ``z_dim``,
    ``gen_width``; read only when ``G`` is None) and the discriminators (``disc_width``, ``disc_lr``); its
    ``disc_epochs`` is what ``grid`` searches, so it is not read.
    Returns a DataFrame (clients, alpha, epochs, val_bce, posterior_loss, teacher_val_acc), the epochs."""
    if not isinstance(config, FedGOConfig):
        raise TypeError(f"config={config!r} is not a FedGOConfig; build one with studies.FedGOConfig(...)")
    check_number("local_epochs", local_epochs, at_least=1, integer=True)
    check_number("val_fraction", val_fraction, above=0, below=1)
    import numpy as np
    import pandas as pd

    from . import distill
    from . import federated as fl
    from . import fedgo
    from . import models as fm

    shape = tuple(train.x.shape[1:])
    labels = train.y.cpu().numpy()
    rng = np.random.default_rng(seed)
    if G is None:
        server = fdata.fedgo_split(labels, client_counts[0], alphas[0], seed=seed)[1]
        G = fedgo.server_gan(train.x[torch.as_tensor(server)].to(device), shape, seed=seed, z_dim=config.z_dim,
                             width=config.gen_width, steps=config.gan_steps, lr=config.gan_lr, generator=generator,
                             device=device)
    D = fm.make_discriminator(shape, width=config.disc_width if len(shape) == 3 else 32).to(device)
    problems = []  # (K, alpha, fit clients, held-out clients)
    for K in client_counts:
        for a in alphas:
            fit_parts, val_parts = [], []
            for p in fdata.fedgo_split(labels, K, a, seed=seed)[0]:
                p = rng.permutation(p)
                n_val = min(max(int(round(val_fraction * len(p))), 1), len(p) - 1)
                val_parts.append(p[:n_val])
                fit_parts.append(p[n_val:])
            problems.append((K, a, fl.pack_clients(train.x, train.y, fit_parts).to(device),
                             fl.pack_clients(train.x, train.y, val_parts).to(device)))
    fit_all = fl.concat_clients([f for *_, f, _ in problems])
    experts = fl.local_train(model, fl.get_params(model), fit_all, epochs=local_epochs, lr=0.05, momentum=0.9,
                             batch_size=32, generator=generator)
    call = fl.functional(model)
    params, done, rows = fl.broadcast_params(fl.get_params(D), fit_all.n_clients), 0, []
    for e in sorted(grid):
        params = fedgo.train_discriminators(D, G, fit_all, epochs=e - done, lr=config.disc_lr, generator=generator,
                                           init=params)
        done, start = e, 0
        for K, a, fit, val in problems:
            mine = slice(start, start + K)
            dp = fl.index_params(params, mine)
            start += K
            x = torch.cat([val.client(k)[0] for k in range(K)])
            y = torch.cat([val.client(k)[1] for k in range(K)])
            logits = distill.predict_each(call, fl.index_params(experts, mine), x)
            q = distill.ensemble_targets("fedgo", logits, fit.n_k, fedgo.discriminator_logits(D, dp, x))
            rows.append({"clients": K, "alpha": a, "epochs": e,
                         "val_bce": float(fedgo.discriminator_val_loss(D, dp, G, val, generator).mean()),
                         "posterior_loss": float(fedgo.client_posterior_loss(D, dp, val, fit.n_k).mean()),
                         "teacher_val_acc": float((q.argmax(-1) == y).float().mean())})
    table = pd.DataFrame(rows)
    best = int(table.groupby("epochs")["teacher_val_acc"].mean().idxmax())
    return table, best


# FedGO's overhead at the paper's scale, computed from parameter and FLOP counts: CIFAR-10 (half of
# the 50,000 training images on the clients), a ResNet-18 classifier, a DCGAN-class generator and
# discriminator (docs/methods.md gives no sizes: ours, about 0.8 M and 0.4 M parameters), 100 rounds; the
# clients, local and discriminator epochs are those of notebook 01's `paper` set (our choices).
PAPER_SCALE = dict(shape=(3, 32, 32), n_classes=10, client_samples=25_000, n_clients=20, local_epochs=5,
                   disc_epochs=5, rounds=100, gen_z=100, gen_width=256, disc_width=32)


def paper_scale_costs(scale: dict = PAPER_SCALE) -> dict:
    """:func:`fedlib.fedgo.model_costs` of the paper-class models of ``scale``."""
    from . import fedgo
    from . import models as fm

    c, size = scale["shape"][0], scale["shape"][-1]
    torch.manual_seed(0)
    return fedgo.model_costs(fm.resnet18(c, scale["n_classes"]),
                             fm.ConvGenerator(scale["gen_z"], c, size, width=scale["gen_width"]),
                             fm.ConvDiscriminator(c, size, width=scale["disc_width"]), torch.randn(1, *scale["shape"]))


def overhead_curve(costs: dict, *, n_clients: int, n_k, local_epochs: int, disc_epochs: int, rounds,
                   warmup_epochs: int = 0):
    """FedGO's overhead (:func:`fedlib.fedgo.fedgo_overhead`) for every number of ``rounds``: a DataFrame
    (rounds, bytes_pct, flops_pct, ...)."""
    import pandas as pd

    from . import fedgo

    return pd.DataFrame([{"rounds": r, **fedgo.fedgo_overhead(**costs, n_clients=n_clients, n_k=n_k, rounds=r,
                                                              local_epochs=local_epochs, disc_epochs=disc_epochs,
                                                              warmup_epochs=warmup_epochs)} for r in rounds])


def scenario_overhead(setups: FedGOSetups, scenario: str, classifier, x, *, local_epochs: int, rounds: int) -> dict:
    """FedGO's overhead (:func:`fedlib.fedgo.fedgo_overhead`) of one scenario of ``setups`` as it ran: its
    first problem's G, D and clients, its E_d and its warm-up round (the data-free G's: one more round of
    local epochs and uploads), both read from ``setups``, against ``rounds`` rounds of ``classifier``."""
    from . import fedgo

    key = next(k for k in setups.keys if (scenario, k) in setups.generators)
    costs = fedgo.model_costs(classifier, setups.generators[(scenario, key)], setups.discriminator, x[:8])
    return fedgo.fedgo_overhead(**costs, n_clients=len(setups.client_indices[key]),
                                n_k=[len(i) for i in setups.client_indices[key]], rounds=rounds,
                                local_epochs=local_epochs, disc_epochs=setups.disc_epochs[scenario],
                                warmup_epochs=setups.warmup_epochs[scenario])


def overhead_study(classifier, G, D, x, *, n_k, local_epochs: int, disc_epochs: int, rounds: int,
                   warmup_epochs: int = 0, grid=(1, 2, 5, 10, 20, 50, 100, 200, 500)) -> dict:
    """FedGO's overhead for this run's models (``classifier``, ``G``, ``D`` on samples like ``x``, clients
    of sizes ``n_k``) and, at CIFAR-10 scale (:data:`PAPER_SCALE`: 20 clients, 25,000 images, 5 local and
    5 discriminator epochs), for two model sizes: a ResNet-20 (notebook 01's ``paper`` set) and the
    paper-class ResNet-18, with their G and D. Returns {"curves": {label: DataFrame over ``grid`` rounds},
    "this_run": {...}, "paper_scale": {...} (ResNet-18 at 100 rounds)}."""
    from . import fedgo
    from . import models as fm

    P = PAPER_SCALE
    c, size = P["shape"][0], P["shape"][-1]
    ours = fedgo.model_costs(classifier, G, D, x[:8])
    torch.manual_seed(0)
    resnet20 = fedgo.model_costs(fm.ResNet(c, P["n_classes"], width=16), fm.ConvGenerator(16, c, size, width=64),
                                 fm.make_discriminator(P["shape"], width=8), torch.randn(1, *P["shape"]))
    paper = paper_scale_costs()
    mine = dict(n_clients=len(n_k), n_k=n_k, local_epochs=local_epochs, disc_epochs=disc_epochs,
                warmup_epochs=warmup_epochs)
    cifar = dict(n_clients=P["n_clients"], n_k=[P["client_samples"] // P["n_clients"]] * P["n_clients"],
                 local_epochs=P["local_epochs"], disc_epochs=P["disc_epochs"])
    grid = sorted(set(grid) | {rounds})
    curves = {f"ours ({fm.n_params(classifier)} parameters, E_d = {disc_epochs})": overhead_curve(ours, rounds=grid,
                                                                                               **mine),
              "ResNet-20, CIFAR-10 (0.27 M)": overhead_curve(resnet20, rounds=grid, **cifar),
              "ResNet-18, CIFAR-10 (11.2 M, paper-class)": overhead_curve(paper, rounds=grid, **cifar)}
    return {"curves": curves, "this_run": overhead_curve(ours, rounds=[rounds], **mine).iloc[0].to_dict(),
            "paper_scale": overhead_curve(paper, rounds=[P["rounds"]], **cifar).iloc[0].to_dict(),
            "costs": {"ours": ours, "resnet20": resnet20, "paper": paper}}


# ---------------------------------------------------------------------------------------------
# the 2-D toy of notebook 01


@dataclass
class ToyStudy:
    """The 2-D comparison of the weighting rules over several seeds (see :func:`toy_study`). Per-seed
    numbers are dicts {rule: [one value per seed]}; the grids (figure) are those of the first seed."""

    rules: tuple
    seeds: tuple
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
    fedavg_test_accuracy: list

    def mean_table(self):
        """Seed means of every per-seed number, one row per rule."""
        import pandas as pd

        cols = {"weight TV to oracle": self.weight_tv_to_oracle, "pseudo-label error": self.pseudo_label_error,
                "disagreement with oracle teacher": self.disagreement_with_oracle,
                "distilled server acc": self.server_test_accuracy}
        return pd.DataFrame({c: {r: sum(v[r]) / len(v[r]) for r in v} for c, v in cols.items()})

    def weights_on_points(self, n_points: int = 5, rules=("oracle", "fedgo", "uniform")):
        """The teaching table: each rule's weight of every client at a handful of server points of the
        first seed (the points where the oracle is most sure of one client, spread over clients)."""
        import pandas as pd

        w = self.weights_server
        top, owner = w["oracle"].max(0)
        pick = []
        for k in range(w["oracle"].shape[0]):  # one confident point per client first, then the next ones
            idx = torch.nonzero(owner == k).squeeze(1)
            if len(idx):
                pick.append(int(idx[top[idx].argmax()]))
        pick = (pick + [i for i in top.argsort(descending=True).tolist() if i not in pick])[:n_points]
        rows = {}
        for i in pick:
            x = self.server_x[i]
            rows[f"({x[0]:+.1f}, {x[1]:+.1f}) class {int(self.server_y[i])}"] = {
                (r, f"client {k}"): float(w[r][k, i]) for r in rules for k in range(w[r].shape[0])}
        return pd.DataFrame(rows).T.round(2)


def toy_study(mixture: str = "ring", *, n_clients: int = 4, alpha: float = 0.1, n_train: int = 2000,
              n_server: int = 1000, local_epochs: int = 20, disc_epochs: int = 30, distill_steps: int = 300,
              rules=("uniform", "entropy", "variance", "dafkd", "fedgo", "oracle"), grid_size: int = 80,
              seeds=(0,)) -> ToyStudy:
    """The toy 2-D comparison of the weightings (docs/methods.md §1.2, the paper's toy figure), one
    problem per seed, all seeds in one vmap: mixture data labelled by component, Dirichlet(alpha) over
    the clients; clients train 2-D MLPs for one round; the server has unlabeled mixture samples; G is
    a known broad Gaussian (:class:`fedlib.fedgo.GaussianSource`); every client trains its
    discriminator; the oracle uses the exact client densities p_k(x) = sum_c pi_kc N(x; mu_c, s^2 I)
    (pi_kc the client's class proportions). Per seed: each rule's mean TV distance from the oracle's
    weights, pseudo-label errors (vs the true label and vs the oracle ensemble), and its distilled server
    model's test accuracy; for the first seed, weights and predictions on a grid."""
    from . import distill
    from . import federated as fl
    from . import fedgo
    from . import models as fm
    from . import weighting as W

    seeds = tuple(seeds)
    gm = fdata.mixture(mixture)
    C = gm.n_components
    torch.manual_seed(seeds[0])
    clf = fm.MLP(2, C, hidden=32)
    w0 = fl.get_params(clf)
    call = fl.functional(clf)
    G = fedgo.GaussianSource(2, scale=3.0)
    D = fm.MLPDiscriminator(2, hidden=32)
    g = torch.Generator().manual_seed(seeds[0])
    data = []
    for seed in seeds:
        gs = torch.Generator().manual_seed(seed)
        x, y = gm.sample(n_train, gs)
        parts = fdata.dirichlet_partition(y.numpy(), n_clients, alpha, seed=seed, min_size=5)
        xs, ys = gm.sample(n_server, gs)
        xt, yt = gm.sample(2000, gs)
        pi = torch.tensor(fdata.label_distribution(y.numpy(), parts, C), dtype=torch.float32)
        data.append(dict(x=x, y=y, parts=parts, clients=fl.pack_clients(x, y, parts), xs=xs, ys=ys, xt=xt, yt=yt,
                         pi=pi / pi.sum(1, keepdim=True)))
    clients = fl.concat_clients([d["clients"] for d in data])
    local = fl.local_train(clf, w0, clients, epochs=local_epochs, lr=0.05, momentum=0.9, batch_size=32, generator=g)
    d_params = fedgo.train_discriminators(D, G, clients, epochs=disc_epochs, lr=0.05, generator=g)
    lim = float(gm.means.abs().max()) + 1.0
    r = torch.linspace(-lim, lim, grid_size)
    grid = torch.cartesian_prod(r, r).flip(1)  # rows = y, cols = x
    K = n_clients

    def weights_at(i, pts):
        mine = slice(i * K, (i + 1) * K)
        logits = fl.predict(call, fl.index_params(local, mine), pts, stacked=True)
        disc = fedgo.discriminator_logits(D, fl.index_params(d_params, mine), pts)
        comp = gm.component_log_prob(pts)  # [N, C]
        log_p = torch.logsumexp(comp[None] + data[i]["pi"].clamp_min(1e-12).log()[:, None, :], -1)  # [K, N]
        n_k = data[i]["clients"].n_k
        return logits, {rule: W.compute_weights(rule, logits, n_k=n_k, disc_logits=disc, log_densities=log_p)
                        for rule in rules}

    per = {k: {rule: [] for rule in rules} for k in ("tv", "err", "dis")}
    targets, starts, w_first, fedavg_acc = [], [], None, []
    for i, d in enumerate(data):
        logits, w = weights_at(i, d["xs"])
        w_first = w_first or w
        q = {rule: distill.pseudo_labels(logits, w[rule]) for rule in rules}
        oracle_label = q["oracle"].argmax(-1) if "oracle" in q else None
        for rule in rules:
            per["err"][rule].append(float((q[rule].argmax(-1) != d["ys"]).float().mean()))
            if oracle_label is not None:
                per["dis"][rule].append(float((q[rule].argmax(-1) != oracle_label).float().mean()))
                per["tv"][rule].append(float(W.weight_distance(w[rule], w["oracle"])))
        avg = fl.fedavg(fl.index_params(local, slice(i * K, (i + 1) * K)), d["clients"].n_k)
        fedavg_acc.append(float(fl.accuracy(fl.predict(call, avg, d["xt"]), d["yt"])))
        starts.append(fl.broadcast_params(avg, len(rules)))
        targets += [q[rule] for rule in rules]
    start = {n: torch.cat([s_[n] for s_ in starts]) for n in w0}
    xs_all = torch.stack([d["xs"] for d in data for _ in rules])
    server = distill.kl_distill_params(clf, start, xs_all, torch.stack(targets), steps=distill_steps, lr=3e-3,
                                       batch_size=128, generator=g, per_model_x=True)
    R = len(rules)
    acc = {rule: [] for rule in rules}
    for i, d in enumerate(data):
        a = fl.accuracy(fl.predict(call, fl.index_params(server, slice(i * R, (i + 1) * R)), d["xt"], stacked=True),
                        d["yt"])
        for j, rule in enumerate(rules):
            acc[rule].append(float(a[j]))
    _, w_grid = weights_at(0, grid)
    grid_pred = fl.predict(call, fl.index_params(server, slice(0, R)), grid, stacked=True).argmax(-1)
    d0 = data[0]
    return ToyStudy(
        rules=tuple(rules), seeds=seeds, x=d0["x"], y=d0["y"], parts=d0["parts"], server_x=d0["xs"],
        server_y=d0["ys"], grid=grid, grid_extent=(-lim, lim, -lim, lim), grid_size=grid_size, weights_grid=w_grid,
        weights_server=w_first, n_classes=C, pseudo_label_error=per["err"],
        disagreement_with_oracle=per["dis"] if "oracle" in rules else {},
        weight_tv_to_oracle=per["tv"] if "oracle" in rules else {}, server_test_accuracy=acc,
        grid_prediction={rule: p for rule, p in zip(rules, grid_pred)}, fedavg_test_accuracy=fedavg_acc)


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


# ---------------------------------------------------------------------------------------------
# Notebook 03 (LD3): the claims on the held-out rows of fedlib.ld3.held_out_study, by the noise rule
def _grid_values(rows, dataset, solver, nfe, grid, key, seeds) -> list:
    """``key`` of the held-out rows of (dataset, solver, NFE, grid), one value per seed in ``seeds`` order."""
    from .verdicts import per_seed

    return per_seed(rows, key, seeds, dataset=dataset, solver=solver, nfe=nfe, grid=grid).tolist()


def beats_every_grid(rows, dataset, solvers, nfes, schedules, seeds, key: str = "teacher_distance",
                     fmt: str = ".4f") -> tuple[str, str, dict]:
    """'LD3 beats every hand-made grid' (i.e. the best one) on ``dataset`` at every (solver, NFE), by the
    noise rule paired over ``seeds``, lower ``key`` better: (verdict, deciding comparison, comparisons)."""
    from .verdicts import combine, compare

    comps = {f"{solver} NFE {nfe} vs {grid}": compare(
        _grid_values(rows, dataset, solver, nfe, "ld3", key, seeds),
        _grid_values(rows, dataset, solver, nfe, grid, key, seeds),
        a_name="LD3", b_name=grid, higher_is_better=False, fmt=fmt)
        for solver in solvers for nfe in nfes for grid in schedules}
    verdict, deciding = combine(comps)
    return verdict, deciding, comps


def relative_gain(rows, dataset, solver, nfe, schedules, seeds, key: str = "teacher_distance") -> list:
    """Per seed, (best hand-made - LD3) / best hand-made of ``key`` (the best grid of that seed)."""
    hand = [_grid_values(rows, dataset, solver, nfe, g, key, seeds) for g in schedules]
    best = [min(v) for v in zip(*hand)]
    ld3 = _grid_values(rows, dataset, solver, nfe, "ld3", key, seeds)
    return [(b - v) / b for b, v in zip(best, ld3)]


def agreement(rows, dataset, solvers, nfes, seeds) -> list:
    """Per seed, the Spearman rank correlation between the teacher distance and the distribution metric
    over the grids of one (solver, NFE) (hand-made and learned), averaged over the (solver, NFE):
    positive when the grid that LD3's validation quantity prefers is also the one the metric prefers."""
    import numpy as np

    def ranks(v):
        return np.argsort(np.argsort(v)).astype(float)

    out = []
    for seed in seeds:
        cs = []
        for solver in solvers:
            for nfe in nfes:
                sub = [r for r in rows if (r["dataset"], r["seed"], r["solver"], r["nfe"]) == (dataset, seed, solver, nfe)]
                a, b = ranks([r["teacher_distance"] for r in sub]), ranks([r["metric"] for r in sub])
                cs.append(float(np.corrcoef(a, b)[0, 1]))
        out.append(float(np.mean(cs)))
    return out


def summary_table(rows, datasets, solvers, nfes, schedules, seeds, metric_names: dict):
    """The per-dataset table: at each (dataset, solver, NFE) the best hand-made grid on held-out noise
    (smallest mean over seeds), its value and LD3's (mean ± SE over seeds), LD3's relative gain, and the
    verdict of 'LD3 beats every hand-made grid' by the noise rule; first for the teacher distance (the
    validated quantity), then for the distribution metric (``metric_names[dataset]``)."""
    import numpy as np
    import pandas as pd

    def ms(v):
        return f"{np.mean(v):.4g} ± {np.std(v, ddof=1) / np.sqrt(len(v)):.2g}" if len(v) > 1 else f"{v[0]:.4g}"

    out = []
    for ds in datasets:
        for solver in solvers:
            for nfe in nfes:
                row = {"dataset": ds, "solver": solver, "NFE": nfe}
                for key, label in (("teacher_distance", "teacher distance"), ("metric", "metric")):
                    hand = {g: _grid_values(rows, ds, solver, nfe, g, key, seeds) for g in schedules}
                    best = min(hand, key=lambda g: np.mean(hand[g]))
                    ld3 = _grid_values(rows, ds, solver, nfe, "ld3", key, seeds)
                    gain = 100 * (np.mean(hand[best]) - np.mean(ld3)) / np.mean(hand[best])
                    if key == "metric":
                        row["metric"] = metric_names[ds]
                    row.update({f"{label}: best hand-made": f"{best} {ms(hand[best])}", f"{label}: LD3": ms(ld3),
                                f"{label}: gain": f"{gain:+.0f}%",
                                f"{label}: LD3 beats every grid": beats_every_grid(rows, ds, [solver], [nfe], schedules,
                                                                                  seeds, key)[0]})
                out.append(row)
    return pd.DataFrame(out)
