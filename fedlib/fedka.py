"""FedKA: feature distribution matching for federated domain generalisation (Sun, Chong & Ochiai,
ACML 2022; docs/methods.md §9), on the feature-shift domains of :mod:`fedlib.data`.

Every source client holds one domain; the target domain is held by no client, and only its unlabelled
training images reach the server. Two parts, each a registered method so that both round drivers
(in-process and Flower) run them:

- the **global workspace** (client side, :data:`WORKSPACE`, a :class:`fedlib.methods.ClientTerm`): each
  round the server sends every client ``workspace_batch`` target feature vectors, the head inputs of the
  current global model on target images it drew (``workspace_batch x d`` floats down per client and round,
  counted by both ledgers as the ``mmd payload``; no target image leaves the server). The client adds
  ``lambda_mmd * MMD^2(f(x_client), z_target)`` to its cross-entropy: a multi-kernel Gaussian MMD (the
  biased estimator; bandwidths ``KERNEL_SCALES`` times the mean squared pairwise distance of the pooled
  batch, held fixed in the gradient, so shrinking every feature cannot lower it);
- the **federated vote** (server side): FedAvg, then the clients' hard majority vote on the target's
  images (:func:`fedlib.methods.majority_vote`) as pseudo-labels to fine-tune the global model.

Methods: ``fedka_mmd`` (both: FedKA), ``fedavg_mmd`` (the workspace only) and, registered already by
:mod:`fedlib.methods`, ``fedka`` (the vote only) and ``fedavg``. The workspace's features come from the
FedAvg model of the round (before the vote's fine-tune: a server method runs before the distillation in
:func:`fedlib.rounds.server_step`), so round 1 trains without the term (the server has no model yet).

``run_domain_study(cfg, train, test)``: leave-one-domain-out over ``cfg.targets`` and ``cfg.seeds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import data as fdata
from . import federated as fl
from . import models as fm
from .methods import ClientTerm, Method, register_method
from .rounds import RoundsConfig, Setup, run_rounds
from .utils import check_choice, check_number

KERNEL_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # Gaussian bandwidths (times the mean squared distance); DAN-style
MMD_METHODS = ("fedavg_mmd", "fedka_mmd")
STUDY_METHODS = ("fedavg", "fedka", "fedavg_mmd", "fedka_mmd")  # FedAvg, + vote, + workspace, both (FedKA)


# ----------------------------------------------------------------------------------------------
# the discrepancy and the features it reads
def gaussian_mmd(a: Tensor, b: Tensor, weights: Tensor | None = None, scales=KERNEL_SCALES) -> Tensor:
    """Biased MMD^2 between feature sets ``a`` [N, d] (optionally weighted per row, e.g. a padding mask)
    and ``b`` [M, d], summed over Gaussian kernels k(u, v) = exp(-|u - v|^2 / (s * h)), s in ``scales``,
    h the mean squared pairwise distance of the pooled sets (detached: the bandwidth adapts to the
    features' scale without being a way to lower the loss). Vmap-safe; 0 for identical sets."""
    w = a.new_ones(len(a)) if weights is None else weights.to(a.dtype)
    w = w / w.sum().clamp_min(1e-12)
    v = b.new_full((len(b),), 1.0 / len(b))
    z = torch.cat([a, b])
    p = torch.cat([w, -v])  # MMD^2 = p^T K p with signed weights
    d2 = (z[:, None] - z[None]).pow(2).sum(-1)
    pair = torch.cat([w, v])
    h = ((pair[:, None] * pair[None] * d2).sum() / (pair.sum() ** 2)).detach().clamp_min(1e-6)
    k = sum(torch.exp(-d2 / (s * h)) for s in scales)
    return (p[:, None] * p[None] * k).sum().clamp_min(0.0)


def feature_fn(model: nn.Module):
    """``f(params, x)``: the input of the classifier's head (:func:`fedlib.models.head_name`), flattened,
    from the full parameters (pure; vmap-safe: a forward pre-hook on the head reads it during the call)."""
    head = model.get_submodule(fm.head_name(model))
    call = fl.functional(model)

    def f(params, x):
        seen = []
        handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            call(params, x)
        finally:
            handle.remove()
        return seen[-1].flatten(1)

    return f


# ----------------------------------------------------------------------------------------------
# the methods: the workspace term (client) and the server's feature draw
OPTIONS = {"lambda_mmd": 1.0, "workspace_batch": 64}  # defaults of method_options[m], m in MMD_METHODS


def options(cfg, name: str) -> dict:
    """The workspace settings of method ``name``: :data:`OPTIONS` updated by ``cfg.method_options[name]``."""
    given = dict(getattr(cfg, "method_options", {}).get(name, {}))
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown {name} options {unknown}; allowed: {', '.join(OPTIONS)}")
    out = {**OPTIONS, **given}
    check_number("lambda_mmd", out["lambda_mmd"], at_least=0, fix="0 switches the workspace term off")
    check_number("workspace_batch", out["workspace_batch"], at_least=2, integer=True)
    return out


def _workspace_server(name: str):
    def server(model, start, client_params, setup, n_classes, cfg, ctx):
        """After FedAvg: draw ``workspace_batch`` target images (the server's unlabelled ``server_x``) with
        the group's own stream and keep their features under the FedAvg model for next round's payload."""
        o = options(cfg, name)
        n = len(setup.server_x)
        i = torch.randperm(n, generator=ctx.rng)[: min(o["workspace_batch"], n)].to(setup.server_x.device)
        with torch.no_grad():
            ctx.state["workspace"] = feature_fn(model)(start, setup.server_x[i]).detach().clone()
        ctx.state["lambda_mmd"] = float(o["lambda_mmd"])
        return start

    return server


def _payload(state: dict, n_classes: int, cfg):
    """The target features and the term's weight; None before the server's first draw (round 1)."""
    if "workspace" not in state:
        return None
    return {"features": state["workspace"], "weight": torch.tensor(state["lambda_mmd"])}


def _extras(model: nn.Module, payload, n_classes: int):
    """Per step: as many target feature vectors as the batch has images, drawn from the payload with the
    client's generator (zeros and weight 0 for tasks without the term, so every task of a vmap agrees)."""
    d = model.get_submodule(fm.head_name(model)).in_features
    if payload is None:
        def none(x, y, g):
            return {"mmd_target": x.new_zeros(len(x), d), "mmd_weight": torch.tensor(0.0)}

        return none
    z, weight = payload["features"], payload["weight"].float().reshape(())

    def draw(x, y, g):
        i = torch.randint(0, len(z), (len(x),), generator=g).to(z.device)
        return {"mmd_target": z[i], "mmd_weight": weight}

    return draw


def _loss(model: nn.Module):
    f = feature_fn(model)

    def loss(call, params, batch):
        return gaussian_mmd(f(params, batch["x"]), batch["mmd_target"], batch.get("mask"))

    return loss


WORKSPACE = ClientTerm("mmd", payload=_payload, extras=_extras, loss=_loss)
register_method(Method("fedavg_mmd", server=_workspace_server("fedavg_mmd"), client=WORKSPACE,
                       doc="FedAvg with FedKA's global workspace: MMD to target features in local training"))
register_method(Method("fedka_mmd", server=_workspace_server("fedka_mmd"), client=WORKSPACE, vote=True,
                       doc="FedKA: the global workspace (MMD to target features) plus the vote's fine-tune"))


# ----------------------------------------------------------------------------------------------
# the leave-one-domain-out study
@dataclass
class FedKAConfig:
    """Every setting of notebook 08's study, under its names (the paper's values in comments)."""

    domains: tuple = ("original", "rotated", "blurred", "noisy")  # the pool; each target is left out of it
    targets: tuple = ("noisy", "blurred")  # leave-one-domain-out targets (the paper: every domain in turn)
    seeds: tuple = (0, 1, 2)
    rounds: int = 3  # communication rounds (the paper: 100 on Digit-Five)
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    width: int = 8  # SmallCNN channels (the paper: a digit CNN / ResNet)
    lambda_mmd: float = 0.1  # weight of the workspace's MMD (at 1 the sources' validation accuracy fell; set there)
    workspace_batch: int = 64  # target feature vectors sent down per client and round
    distill_steps: int = 50  # Adam steps of the vote's fine-tune per round
    distill_lr: float = 1e-3
    val_fraction: float = 0.2  # of every source domain held out to select settings (never the target's labels)
    measure_n: int = 256  # images per side for the source-target feature MMD
    n_train: int = 0  # a class-stratified subset of the training split (0: all of it; smoke runs)

    def __post_init__(self):
        self.domains, self.targets, self.seeds = tuple(self.domains), tuple(self.targets), tuple(self.seeds)
        for d in self.domains:
            check_choice("domain", d, fdata.DOMAINS, "pick from fedlib.data.DOMAINS")
        if len(set(self.domains)) != len(self.domains) or len(self.domains) < 3:
            raise ValueError(f"domains={self.domains!r}; allowed: at least 3 distinct domains (two sources and a "
                             "target); pick from fedlib.data.DOMAINS")
        if not self.targets:
            raise ValueError("targets=(); allowed: at least one of the domains")
        for t in self.targets:
            check_choice("target", t, self.domains, "a target must be one of the domains")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r}; allowed: distinct seeds, at least one")
        for name in ("rounds", "batch_size", "width", "workspace_batch", "measure_n"):
            check_number(name, getattr(self, name), at_least=2 if name == "workspace_batch" else 1, integer=True)
        for name in ("local_epochs", "distill_steps", "n_train"):
            check_number(name, getattr(self, name), at_least=0, integer=True, fix="0 switches it off")
        for name in ("lr", "distill_lr"):
            check_number(name, getattr(self, name), above=0)
        check_number("lambda_mmd", self.lambda_mmd, at_least=0, fix="0 switches the workspace term off")
        check_number("val_fraction", self.val_fraction, above=0, below=1)

    def rounds_config(self) -> RoundsConfig:
        o = {"lambda_mmd": self.lambda_mmd, "workspace_batch": self.workspace_batch}
        return RoundsConfig(rounds=self.rounds, local_epochs=self.local_epochs, lr=self.lr,
                            batch_size=self.batch_size, distill_steps=self.distill_steps, distill_lr=self.distill_lr,
                            method_options={m: dict(o) for m in MMD_METHODS})


@dataclass
class DomainSetup:
    """One (target, seed): the rounds' :class:`fedlib.rounds.Setup` (clients = source domains, server_x =
    the target's unlabelled training images, test = the target's test split) and the sources' held-out
    validation images."""

    target: str
    seed: int
    sources: tuple
    setup: Setup
    val_x: Tensor
    val_y: Tensor


def domain_setup(cfg: FedKAConfig, train: fdata.ArrayDataset, test: fdata.ArrayDataset, target: str,
                 seed: int, n_server: int | None = None) -> DomainSetup:
    """The training split cut into one part per domain (:func:`fedlib.data.domain_split`): the sources'
    parts go to one client each (less ``val_fraction``, held out), the target's part to the server
    without labels (``n_server``: trimmed to that size, so setups distil in one vmap)."""
    parts = fdata.domain_split(train, cfg.domains, seed=seed)
    sources = tuple(d for d in cfg.domains if d != target)
    rng = np.random.default_rng(seed)
    xs, ys, idx, vx, vy = [], [], [], [], []
    start = 0
    for d, part in zip(cfg.domains, parts):
        if d == target:
            server = part
            continue
        perm = rng.permutation(len(part))
        n_val = max(1, int(round(cfg.val_fraction * len(part))))
        keep, val = perm[n_val:], perm[:n_val]
        xs.append(part.x[keep]), ys.append(part.y[keep]), vx.append(part.x[val]), vy.append(part.y[val])
        idx.append(np.arange(start, start + len(keep)))
        start += len(keep)
    clients = fl.pack_clients(torch.cat(xs), torch.cat(ys), idx)
    n = len(server) if n_server is None else n_server
    test_t = fdata.shift_domain(test.x, target)
    setup = Setup(clients, server.x[:n], test_t, test.y, server_y=server.y[:n], key=(target, seed))
    return DomainSetup(target, seed, sources, setup, torch.cat(vx), torch.cat(vy))


@dataclass
class StudyResult:
    rounds: object   # DataFrame: target, seed, method, round, accuracy (target test), teacher_accuracy
    final: object    # DataFrame: target, seed, method, target_accuracy, source_val_accuracy, feature_mmd
    payload_bytes: dict = field(default_factory=dict)  # per round and client: model down, workspace down
    models: dict = field(default_factory=dict)  # (target, seed, method) -> final global params


def run_domain_study(cfg: FedKAConfig, train: fdata.ArrayDataset, test: fdata.ArrayDataset,
                     methods=STUDY_METHODS, device: torch.device | str = "cpu", progress=None) -> StudyResult:
    """Every method on every (target, seed): one run of rounds per seed (every target's setup and every
    method in one vmap; the seed sets the split, the initial model and the run's random stream). Measures
    the final global models' target test accuracy, their accuracy on the sources' held-out images, and
    the MMD between their features of source training images and of target images."""
    import pandas as pd

    for m in methods:
        check_choice("method", m, STUDY_METHODS + ("fedprox",))
    rows, final, models = [], [], {}
    if cfg.n_train and cfg.n_train < len(train):
        train = train.subset(fdata.stratified_subset(train.y.cpu().numpy(), cfg.n_train, seed=0))
    n_server = min(min(len(p) for p in fdata.domain_split(train, cfg.domains, seed=s)) for s in cfg.seeds)
    rc = cfg.rounds_config()
    payload = {}
    seeds = cfg.seeds if progress is None else progress(cfg.seeds)
    for seed in seeds:
        dsets = [domain_setup(cfg, train, test, t, seed, n_server) for t in cfg.targets]
        for ds in dsets:
            s = ds.setup
            s.clients, s.server_x, s.test_x, s.test_y = s.clients.to(device), s.server_x.to(device), \
                s.test_x.to(device), s.test_y.to(device)
            s.server_y = s.server_y.to(device)
            ds.val_x, ds.val_y = ds.val_x.to(device), ds.val_y.to(device)
        torch.manual_seed(seed)  # the initial model of this seed
        model = fm.SmallCNN(train.x.shape[1], train.n_classes, cfg.width, train.x.shape[-1]).to(device)
        g = torch.Generator().manual_seed(seed)
        res = run_rounds(model, [d.setup for d in dsets], list(methods), rc, generator=g)
        call, f = fl.functional(model), feature_fn(model)
        M = len(methods)
        frame = res.frame(("target", "seed"))
        rows.append(frame)
        gm = torch.Generator().manual_seed(10_000 + seed)
        for si, ds in enumerate(dsets):
            src = ds.setup.clients
            src_x = torch.cat([src.client(k)[0] for k in range(src.n_clients)])
            i_s = torch.randperm(len(src_x), generator=gm)[: cfg.measure_n].to(src_x.device)
            i_t = torch.randperm(len(ds.setup.server_x), generator=gm)[: cfg.measure_n].to(src_x.device)
            for j, m in enumerate(methods):
                p = fl.index_params(res.params, si * M + j)
                models[ds.target, seed, m] = p
                with torch.no_grad():
                    mmd = float(gaussian_mmd(f(p, src_x[i_s]), f(p, ds.setup.server_x[i_t])))
                    val = float(fl.accuracy(fl.predict(call, p, ds.val_x), ds.val_y))
                final.append({"target": ds.target, "seed": seed, "method": m,
                              "target_accuracy": float(res.accuracy[si, j, -1]), "source_val_accuracy": val,
                              "feature_mmd": mmd})
        if not payload:  # per client and round, read off the rounds' ledger (round 2: the first with a workspace)
            users = len(dsets) * sum(m in MMD_METHODS for m in methods) * dsets[0].setup.clients.n_clients
            payload = {"model": fl.state_bytes(fl.index_params(res.params, 0)),
                       "workspace": res.ledger.total(item="mmd payload", round=2) // max(users, 1)}
    return StudyResult(pd.concat(rows, ignore_index=True), pd.DataFrame(final), payload, models)
