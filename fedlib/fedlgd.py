"""FedLGD: federated learning on virtual data with local-global distillation (Huang et al., CVPR 2024;
docs/methods.md §7.1). Every client trains on a small *local virtual set* instead of its real data; the
server keeps a *global virtual set* G that no client owns and uses it as an anchor of local training.

- **Local virtual sets** (:func:`local_virtual_sets`): distribution matching (DM,
  :func:`fedlib.condense.distill_dm`) of each client's real data, ``ipc`` images per class it holds.
- **Iterative DM** (:func:`refresh_local_sets`): every ``refresh_every`` rounds each client continues DM
  from its current virtual set, with features from the current global model's trunk instead of random
  ConvNets, so the local sets carry the global model's view of the data.
- **Federated gradient matching** (:func:`server_gradient_matching`): at the new global model w, client k
  sends per-class gradients g_{k,c} = grad_w mean_{(x,y) in S_k, y=c} CE(f_w(x), y) of its virtual set S_k;
  the server averages them over clients, weighted by the number of images of class c each holds (that is
  the gradient on the union of the virtual sets, :func:`aggregate_class_gradients`), and updates G's pixels
  to minimise

      D(G) = sum_c sum_l [1 - cos(grad_{w_l} CE(G_c), gbar_{c,l})]          (:func:`gradient_distance`)

  over the classes c some client holds and the parameter tensors l of the model (layer-wise cosine).
- **Anchored local training** (:func:`anchored_loss`): client loss CE(S_k) + lambda * L_anchor with the
  supervised contrastive loss of each local virtual image's normalised feature z_i against the global
  virtual images' features a_j (temperature tau):

      L_anchor(i) = -log [ sum_{j: y_j = y_i} exp(z_i.a_j / tau) / sum_j exp(z_i.a_j / tau) ]

  (:func:`anchor_contrastive`; 0 exactly when every anchor shares the image's class, and near 0 when the
  features sit on their class's anchors and away from the others).

Baselines on the same local virtual sets (the initial DM sets, never refreshed): FedAvg and FedProx
(:func:`fedlib.federated.local_train` with ``mu``). :func:`run_fedlgd` runs all three for one seed and one
set of clients; :func:`client_spread` measures how far client models trained from one start drift apart
(the paper's observation that local virtual data amplify heterogeneity).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from . import condense as cd
from . import data as fdata
from .federated import (ClientData, Params, classification_loss, fedavg, functional, get_params, local_train, masked_mean,
                        pack_clients, predict, set_params)
from .models import SmallCNN
from .utils import check_number

METHODS = ("FedLGD", "FedAvg", "FedProx")


@dataclass
class FedLGDConfig:
    """Settings of one FedLGD run and its baselines; notebook 06 names them ``fedlgd_<field>`` (the paper's
    values in comments; see docs/methods.md §7.1 for which are ours)."""

    rounds: int = 10  # communication rounds (paper: 100)
    local_steps: int = 10  # SGD steps per client per round (paper: 1 local epoch)
    lr: float = 0.05  # client SGD learning rate (paper: 0.01)
    batch_size: int = 32  # client mini-batch (paper: 32)
    ipc: int = 2  # local virtual images per class (paper: 10 on digits, 50 on others)
    dm_iterations: int = 50  # DM updates of each local virtual set at the start (ours; paper: thousands)
    lr_images: float = 0.05  # Adam on the local virtual pixels (ours)
    batch_real: int = 32  # real images per class per DM iteration
    refresh_every: int = 5  # rounds between iterative-DM refreshes of the local sets (ours)
    refresh_iterations: int = 10  # DM updates per refresh, through the global model's features (ours)
    global_ipc: int = 2  # global virtual images per class (paper: 10)
    server_steps: int = 5  # gradient-matching updates of the global virtual set per round (ours)
    lr_global: float = 0.05  # Adam on the global virtual pixels (ours)
    lam: float = 1.0  # weight lambda of the anchor regulariser (ours; the paper tunes it)
    tau: float = 0.5  # temperature of the contrastive anchor loss (ours)
    mu: float = 0.01  # FedProx's proximal weight for the baseline (paper's FedProx: 0.01)
    width: int = 8  # channel width of the classifier (fedlib's SmallCNN)
    feature_width: int = 8  # width of DM's random feature ConvNets
    seed: int = 0
    # models per vmap chunk in local training; 0: local_train's "auto". 1 trains each model alone, as a Flower
    # node does: conv2d's backward rounds differently with the number of stacked models, and the server's Adam
    # on G's pixels amplifies that, so the two backends agree bitwise only with the same layout
    vmap_chunk: int = 0

    def __post_init__(self):
        for name in ("rounds", "local_steps", "batch_size", "ipc", "dm_iterations", "batch_real", "refresh_every",
                     "global_ipc", "width", "feature_width"):
            check_number(name, getattr(self, name), at_least=1, integer=True,
                         fix=f"Give a positive whole number of {name.replace('_', ' ')}.")
        for name in ("refresh_iterations", "server_steps", "seed", "vmap_chunk"):
            check_number(name, getattr(self, name), at_least=0, integer=True,
                         fix="Give a whole number >= 0 (0 switches the step off).")
        for name in ("lr", "lr_images", "lr_global", "tau"):
            check_number(name, getattr(self, name), above=0, fix="Learning rates and the temperature must be > 0.")
        for name in ("lam", "mu"):
            check_number(name, getattr(self, name), at_least=0,
                         fix="A weight >= 0; 0 removes the term (lam 0 is FedAvg on refreshed sets).")

    def condense(self, **changes) -> cd.CondenseConfig:
        """The DM settings of a client's local virtual set."""
        base = dict(ipc=self.ipc, iterations=self.dm_iterations, batch_real=self.batch_real,
                    lr_images=self.lr_images, feature_width=self.feature_width, init="real", seed=self.seed)
        return cd.CondenseConfig(**{**base, **changes})


# ----------------------------------------------------------------------------------------------
# local virtual sets
def local_virtual_sets(clients: list[tuple[torch.Tensor, torch.Tensor]], n_classes: int, cfg: FedLGDConfig,
                       device=None, first: int = 0) -> list[cd.SyntheticSet]:
    """One DM set per client (``ipc`` images of every class it holds at least ``ipc`` images of); client k
    draws its own networks and batches (seed ``cfg.seed * 1000 + k``; ``clients`` are clients ``first``,
    ``first + 1``, ...: a Flower node distils its own client alone)."""
    return [cd.distill_dm(x, y, n_classes, cfg.condense(seed=cfg.seed * 1000 + k), device=device, present_only=True)
            for k, (x, y) in enumerate(clients, start=first)]


def trunk(model: SmallCNN, params) -> torch.nn.Module:
    """A frozen copy of the model's feature trunk at ``params`` (for iterative DM)."""
    net = set_params(copy.deepcopy(model), params).features
    net.requires_grad_(False)
    return net


def refresh_local_sets(model, params, clients, sets: list[cd.SyntheticSet], n_classes: int, cfg: FedLGDConfig,
                       round_: int, device=None, first: int = 0) -> list[cd.SyntheticSet]:
    """Iterative DM: each client continues DM from its current virtual set for ``refresh_iterations``
    updates, matching class means of the global model's trunk features (global information); ``first``: the
    index of the first client given (its seed)."""
    if cfg.refresh_iterations == 0:
        return sets
    net = trunk(model, params)
    return [cd.distill_dm(x, y, n_classes, cfg.condense(iterations=cfg.refresh_iterations,
                                                        seed=cfg.seed * 1000 + k + 100_000 * round_),
                          device=device, start=s, feature_net=net)
            for k, ((x, y), s) in enumerate(zip(clients, sets), start=first)]


# ----------------------------------------------------------------------------------------------
# federated gradient matching
def class_gradients(call, params, x: torch.Tensor, y: torch.Tensor, n_classes: int):
    """Per-class gradients of the mean cross-entropy at ``params``: ({name: [C, ...]}, counts [C]); a class
    with no images has a zero gradient and count 0."""
    weights = cd.class_weights(y, n_classes)  # [C, N], row c: 1/n_c on class c

    def loss(p, w):
        return (w * F.cross_entropy(call(p, x), y, reduction="none")).sum()

    grads = vmap(grad(loss), in_dims=(None, 0))({n: v.detach() for n, v in params.items()}, weights)
    return grads, torch.bincount(y, minlength=n_classes).float()


def aggregate_class_gradients(parts: list[tuple[dict, torch.Tensor]]):
    """The server's average of the clients' per-class gradients, class c weighted by each client's count
    of class c: ({name: [C, ...]}, total counts [C])."""
    counts = torch.stack([c for _, c in parts])  # [K, C]
    total = counts.sum(0)
    w = counts / total.clamp_min(1.0)  # [K, C]
    agg = {n: torch.einsum("kc,kc...->c...", w, torch.stack([g[n] for g, _ in parts])) for n in parts[0][0]}
    return agg, total


def gradient_distance(g_a: dict, g_b: dict, classes) -> torch.Tensor:
    """sum over ``classes`` c and parameter tensors l of 1 - cos(g_a[l][c], g_b[l][c]) (flattened)."""
    total = 0.0
    for n in g_a:
        a = g_a[n][classes].flatten(1)
        b = g_b[n][classes].flatten(1)
        total = total + (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).sum()
    return total


def gradient_matching_loss(call, params, x_syn: torch.Tensor, y_syn: torch.Tensor, target: dict,
                           counts: torch.Tensor, n_classes: int) -> torch.Tensor:
    """D(G): the layer-wise cosine distance between G's per-class gradients (differentiable in ``x_syn``) and
    the aggregated client gradients, over the classes some client holds and G holds."""
    weights = cd.class_weights(y_syn, n_classes)
    p = {n: v.detach() for n, v in params.items()}

    def loss(p_, w, x_):
        return (w * F.cross_entropy(call(p_, x_), y_syn, reduction="none")).sum()

    g_syn = vmap(grad(loss), in_dims=(None, 0, None))(p, weights, x_syn)
    held = torch.bincount(y_syn, minlength=n_classes) > 0
    classes = torch.nonzero((counts > 0) & held.to(counts.device)).flatten()
    return gradient_distance(g_syn, target, classes)


def server_gradient_matching(call, params, x_global: torch.Tensor, y_global: torch.Tensor, target: dict,
                             counts: torch.Tensor, n_classes: int, cfg: FedLGDConfig) -> tuple[torch.Tensor, list]:
    """``server_steps`` Adam updates of the global virtual pixels on D(G); returns (new pixels, D per step)."""
    x = x_global.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr_global)
    history = []
    for _ in range(cfg.server_steps):
        d = gradient_matching_loss(call, params, x, y_global, target, counts, n_classes)
        opt.zero_grad(set_to_none=True)
        d.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)
        history.append(float(d.detach()))
    return x.detach(), history


# ----------------------------------------------------------------------------------------------
# anchored local training
def anchor_contrastive(z: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, y_anchor: torch.Tensor,
                       tau: float) -> torch.Tensor:
    """Per-sample supervised contrastive loss of features ``z`` [B, d] against ``anchors`` [M, d] (both
    normalised here): -log of the softmax mass on the anchors of the sample's class; [B] (0 for a sample
    whose class has no anchor)."""
    z, a = F.normalize(z, dim=1), F.normalize(anchors, dim=1)
    logits = z @ a.T / tau  # [B, M]
    same = (y[:, None] == y_anchor[None, :]).to(logits.dtype)
    has = same.sum(1) > 0
    log_all = torch.logsumexp(logits, 1)
    log_pos = torch.logsumexp(logits + torch.log(same.clamp_min(1e-30)), 1)
    return torch.where(has, log_all - log_pos, torch.zeros_like(log_all))


def trunk_call(model: SmallCNN):
    """``feat(params, x)``: the model's trunk features (flattened) as a pure function of its parameters."""

    def feat(params, x):
        sub = {n[len("features."):]: v for n, v in params.items() if n.startswith("features.")}
        return functional_call(model.features, sub, (x,)).flatten(1)

    return feat


def anchored_loss(model: SmallCNN, x_anchor: torch.Tensor, y_anchor: torch.Tensor, lam: float, tau: float):
    """A ``local_train`` loss: masked cross-entropy + lam * the masked mean contrastive anchor loss."""
    feat = trunk_call(model)

    def loss_fn(call, params, batch):
        ce = classification_loss(call, params, batch)
        if lam == 0:
            return ce
        reg = anchor_contrastive(feat(params, batch["x"]), batch["y"], feat(params, x_anchor), y_anchor, tau)
        return ce + lam * masked_mean(reg, batch["mask"])

    return loss_fn


# ----------------------------------------------------------------------------------------------
# the runs
def _offsets(sizes) -> list[list[int]]:
    bounds = torch.tensor([0] + list(sizes)).cumsum(0).tolist()
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def _pack(sets: list[cd.SyntheticSet]) -> ClientData:
    return pack_clients(torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]), _offsets([len(s.y) for s in sets]))


def _accuracy(call, params, tests) -> float:
    return float(sum((predict(call, params, x).argmax(-1) == y).float().mean() for x, y in tests) / len(tests))


# One round of FedLGD and its baselines, split where the messages go: the client side (``train_baselines``,
# ``client_step``, then ``client_gradients`` at the new global model) and the server side
# (:class:`FedLGDServer`). :func:`run_fedlgd` calls them over all K clients at once (one vmap); the Flower
# backend (fedlib.flower) calls the client side on each node for its own client and the server side on the
# ServerApp.
def round_generator(cfg: FedLGDConfig, round_: int) -> torch.Generator:
    """Round ``round_``'s stream of local training: client k of a block of K draws the k-th seed of it
    (FedAvg clients 0..K-1, FedProx K..2K-1; FedLGD 0..K-1 of a second copy)."""
    return torch.Generator().manual_seed(cfg.seed * 7919 + round_)


def train_baselines(model, start: Params, data: ClientData, mu, cfg: FedLGDConfig, generator) -> Params:
    """FedAvg / FedProx local training on the initial local virtual sets (``mu`` per client)."""
    return local_train(model, start, data, steps=cfg.local_steps, lr=cfg.lr, mu=mu, batch_size=cfg.batch_size,
                       generator=generator, chunk_size=cfg.vmap_chunk or "auto")


def client_step(model, start: Params, clients, sets: list[cd.SyntheticSet], anchors, n_classes: int,
                cfg: FedLGDConfig, round_: int, generator, device=None, first: int = 0):
    """FedLGD's client side of round ``round_`` for ``clients`` (real (x, y), clients ``first``, ...) holding
    the local virtual ``sets``: iterative DM through ``start``'s trunk every ``refresh_every`` rounds, then
    local training anchored on the global virtual set ``anchors`` (x, y). Returns (the client models
    stacked, the sets after the refresh)."""
    if round_ > 0 and round_ % cfg.refresh_every == 0:
        sets = refresh_local_sets(model, start, clients, sets, n_classes, cfg, round_, device, first)
    lam = cfg.lam if round_ > 0 else 0.0  # G is still noise before the first server step
    x_g, y_g = anchors
    out = local_train(model, start, _pack(sets), anchored_loss(model, x_g, y_g, lam, cfg.tau),
                      steps=cfg.local_steps, lr=cfg.lr, batch_size=cfg.batch_size, generator=generator,
                      chunk_size=cfg.vmap_chunk or "auto")
    return out, sets


def client_gradients(call, params: Params, sets: list[cd.SyntheticSet], n_classes: int) -> list:
    """Each client's per-class gradients of its local virtual set at the new global model ``params``: what
    it sends for federated gradient matching, [(grads, counts)]."""
    return [class_gradients(call, params, s.x, s.y, n_classes) for s in sets]


@dataclass
class FedLGDServer:
    """The server of FedLGD and its baselines: the three global models ``w`` {method: params}, the global
    virtual set G (``x_g``, ``y_g``), and per round the test accuracy and D per server step."""

    model: SmallCNN
    w: dict
    x_g: torch.Tensor
    y_g: torch.Tensor
    accuracy: dict
    server_distance: list

    @classmethod
    def start(cls, shape: tuple, n_classes: int, cfg: FedLGDConfig, device) -> "FedLGDServer":
        """Every method from the same initial model (seed ``cfg.seed``); G from noise (the server holds no data)."""
        torch.manual_seed(cfg.seed)
        model = SmallCNN(shape[0], n_classes, width=cfg.width, image_size=shape[-1]).to(device)
        start = get_params(model)
        g = torch.Generator().manual_seed(cfg.seed)
        y_g = torch.arange(n_classes).repeat_interleave(cfg.global_ipc).to(device)
        x_g = (0.5 * torch.randn((len(y_g), *shape), generator=g)).clamp(-1, 1).to(device)
        return cls(model, {m: start for m in ("FedAvg", "FedProx", "FedLGD")}, x_g, y_g, {m: [] for m in METHODS}, [])

    @property
    def call(self):
        return functional(self.model)

    def baseline_starts(self, K: int, cfg: FedLGDConfig) -> tuple[Params, torch.Tensor]:
        """The baselines train together in one vmap: FedAvg's block of K (mu 0), then FedProx's."""
        start = {n: torch.cat([self.w["FedAvg"][n].expand(K, *v.shape), self.w["FedProx"][n].expand(K, *v.shape)])
                 for n, v in self.w["FedAvg"].items()}
        return start, torch.tensor([0.0] * K + [cfg.mu] * K)

    def aggregate(self, baselines: Params, lgd: Params, n_k: torch.Tensor) -> None:
        """FedAvg of the client models that arrived: ``baselines`` [2K'] (FedAvg's block, then FedProx's),
        ``lgd`` [K'], weighted by their clients' ``n_k`` [K'] (none arrived: the models stay)."""
        if len(n_k) == 0:
            return
        both = fedavg(baselines, n_k.repeat(2), groups=2)
        self.w["FedAvg"] = {n: v[0] for n, v in both.items()}
        self.w["FedProx"] = {n: v[1] for n, v in both.items()}
        self.w["FedLGD"] = fedavg(lgd, n_k)

    def gradient_matching(self, parts: list, n_classes: int, cfg: FedLGDConfig) -> None:
        """Federated gradient matching: G's pixels follow the clients' per-class gradients ``parts``
        [(grads, counts)] aggregated (none arrived: G stays)."""
        if not parts:
            return
        target, counts = aggregate_class_gradients(parts)
        if cfg.server_steps:
            self.x_g, d = server_gradient_matching(self.call, self.w["FedLGD"], self.x_g, self.y_g, target, counts,
                                                   n_classes, cfg)
            self.server_distance += d

    def evaluate(self, tests) -> None:
        for m in METHODS:
            self.accuracy[m].append(_accuracy(self.call, self.w[m], tests))

    def result(self, local_sets, refreshed) -> dict:
        return {"accuracy": self.accuracy, "local_sets": local_sets, "refreshed": refreshed,
                "global": (self.x_g.cpu(), self.y_g.cpu()), "server_distance": self.server_distance, "params": self.w}


def run_fedlgd(clients: list[tuple[torch.Tensor, torch.Tensor]], tests: list[tuple[torch.Tensor, torch.Tensor]],
               n_classes: int, cfg: FedLGDConfig, device=None, local_sets: list[cd.SyntheticSet] | None = None,
               progress: bool = False, driver=None, **kw) -> dict:
    """FedLGD, FedAvg and FedProx from the same start on the same initial local virtual sets. ``clients``: each
    client's real (x, y); ``tests``: one or more (x, y) test sets (accuracy is their mean). Returns
    ``accuracy`` {method: [rounds]}, ``local_sets`` (initial), ``refreshed`` (FedLGD's last local sets),
    ``global`` (G's pixels and labels), ``server_distance`` (D per server step), ``params`` {method: final}.
    ``driver``: another engine for the same rounds, given the same arguments and ``kw``
    (:func:`fedlib.backends.run_fedlgd` with ``backend="flower"`` passes :func:`fedlib.flower.run_fedlgd`)."""
    from tqdm.auto import tqdm

    if driver is not None:
        return driver(clients, tests, n_classes, cfg, device=device, local_sets=local_sets, progress=progress, **kw)
    if kw:  # backend= here is a call written before the backend was chosen above the core
        raise ValueError(f"{sorted(kw)} only apply to backend='flower'; choose the backend with "
                         "fedlib.backends.run_fedlgd(..., backend=...)")
    device = torch.device(device) if device is not None else clients[0][0].device
    server = FedLGDServer.start(tuple(clients[0][0].shape[1:]), n_classes, cfg, device)
    model = server.model
    sets = local_sets if local_sets is not None else local_virtual_sets(clients, n_classes, cfg, device)
    n_k = torch.tensor([len(y) for _, y in clients])
    base = _pack(sets)
    K = len(clients)
    current = list(sets)
    for r in tqdm(range(cfg.rounds), desc=f"FedLGD seed {cfg.seed}", disable=not progress, leave=False):
        start_b, mu = server.baseline_starts(K, cfg)
        out_b = train_baselines(model, start_b, base.repeat(2), mu, cfg, round_generator(cfg, r))
        out, current = client_step(model, server.w["FedLGD"], clients, current, (server.x_g, server.y_g), n_classes,
                                   cfg, r, round_generator(cfg, r), device)
        server.aggregate(out_b, out, n_k)
        server.gradient_matching(client_gradients(server.call, server.w["FedLGD"], current, n_classes), n_classes, cfg)
        server.evaluate(tests)
    return server.result(sets, current)


def client_spread(model, start, data: ClientData, cfg: FedLGDConfig) -> float:
    """Mean squared distance of the client models to their mean after one round of ``local_steps`` SGD
    steps from ``start`` on ``data``: how far the clients' data pull the models apart."""
    out = local_train(model, start, data, steps=cfg.local_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                      generator=torch.Generator().manual_seed(cfg.seed))
    flat = torch.cat([v.flatten(1) for v in out.values()], 1)  # [K, P]
    return float(((flat - flat.mean(0)) ** 2).sum(1).mean())


def heterogeneity(clients, sets: list[cd.SyntheticSet], n_classes: int, cfg: FedLGDConfig) -> dict:
    """:func:`client_spread` of one round from the same start on the local virtual sets and on the real
    local data (same steps, learning rate and batch size)."""
    shape = tuple(clients[0][0].shape[1:])
    torch.manual_seed(cfg.seed)
    model = SmallCNN(shape[0], n_classes, width=cfg.width, image_size=shape[-1]).to(clients[0][0].device)
    start = get_params(model)
    real = pack_clients(torch.cat([x for x, _ in clients]), torch.cat([y for _, y in clients]),
                        _offsets([len(y) for _, y in clients]))
    return {"virtual": client_spread(model, start, _pack(sets), cfg), "real": client_spread(model, start, real, cfg)}


def federations(train, test, n_clients: int, alpha: float, seed: int) -> dict:
    """Notebook 06's two federations of ``n_clients``, as {setting: (clients [(x, y)], tests [(x, y)])}:
    "label skew" (:func:`fedlib.data.dirichlet_partition` of ``train`` at ``alpha``; the test split as it
    is) and "feature shift" (:func:`fedlib.data.domain_split`: client k holds a class-stratified share of
    ``train`` moved to domain k of :data:`fedlib.data.DOMAINS`; tested on every domain's copy of the test split)."""
    check_number("n_clients", n_clients, at_least=2, at_most=len(fdata.DOMAINS), integer=True,
                 fix=f"Feature shift gives each client a domain of its own: use 2 to {len(fdata.DOMAINS)} clients.")
    domains = list(fdata.DOMAINS[:n_clients])
    parts = fdata.dirichlet_partition(train.y.cpu().numpy(), n_clients, alpha, seed=seed)
    label = [(s.x, s.y) for s in train.split(parts)]
    shift = [(d.x, d.y) for d in fdata.domain_split(train, domains, seed=seed)]
    return {"label skew": (label, [(test.x, test.y)]),
            "feature shift": (shift, [(fdata.shift_domain(test.x, d), test.y) for d in domains])}
