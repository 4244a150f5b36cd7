"""Server-side ensemble distillation: pseudo-labels, KL distillation, the FedGO protocol, data-free
baselines, and the vectorised multi-method round loop used by notebook 01 (papers.md section 1).

Pieces (pure functions where possible):

- ``pseudo_labels(client_logits [K, N, C], weights [K, N], mode="prob"|"logit", temperature)`` ->
  q [N, C]: the weighted ensemble (papers.md 1.1; averaging logits is the documented option).
- ``majority_vote(client_logits)`` -> one-hot q [N, C] (FedKA-style hard vote; ties share the mass).
- ``kl_distill(model, start, x, targets, steps=..., lr=..., batch_size=..., temperature=...)``: Adam on
  T^2 KL(q || softmax(f(x)/T)) for a fixed number of steps, from ``start`` (the FedAvg model). ``start``
  may be stacked [M, ...] with ``x`` [N, ...] or [M, N, ...] and ``targets`` [M, N, C]: M server models
  (methods, seeds) distil in one vmap with the same mini-batch indices.
- FedGO protocol: ``train_gan`` (the server's generator G on its unlabeled data), ``train_discriminators``
  (every client's D_k against G samples, all clients in one vmap through
  :func:`fedlib.federated.local_train`), ``discriminator_logits``; the weights then come from
  :func:`fedlib.weighting.fedgo_weights`. ``fedgo_overhead`` counts the extra bytes and FLOPs.
- Data-free: the server data is ``sample(G, n)``; ``dense_distill`` is the DENSE-style baseline (a
  label-conditioned generator trained against the uniform logit ensemble with cross-entropy plus an
  adversarial disagreement term, the student distilled on its samples, alternating).
- ``run_rounds(model, setups, methods, ...)``: R federated rounds of several methods on several
  problems (alphas, seeds) at once: one vmapped local-training call for all (problem, method, client)
  triples per round, one vmapped distillation for all distilling (problem, method) pairs.

Method names (``METHODS``): ``fedavg``, ``fedprox`` (aggregation only), ``feddf`` (uniform weights),
``sample_count``, ``entropy``, ``variance``, ``dafkd``, ``fedgo`` (weighted-ensemble distillation),
``fedka`` (majority vote), ``dense`` (data-free generator baseline).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from . import federated as fl
from . import weighting as W
from .utils import check_choice

METHODS = ("fedavg", "fedprox", "feddf", "sample_count", "entropy", "variance", "dafkd", "fedgo", "fedka",
           "dense")
WEIGHTING_OF = {"feddf": "uniform", "sample_count": "sample_count", "entropy": "entropy",
                "variance": "variance", "dafkd": "dafkd", "fedgo": "fedgo"}
AGGREGATION_ONLY = ("fedavg", "fedprox")
PSEUDO_LABEL_MODES = ("prob", "logit")


# ----------------------------------------------------------------------------------------------
# pseudo-labels
def pseudo_labels(client_logits: Tensor, weights: Tensor, mode: str = "prob", temperature: float = 1.0) -> Tensor:
    """q(y|x) = sum_k a_k(x) softmax(f_k(x)/T)_y (``mode="prob"``), or softmax(sum_k a_k f_k(x) / T)
    (``mode="logit"``). client_logits [K, N, C], weights [K, N] -> q [N, C]."""
    check_choice("pseudo-label mode", mode, PSEUDO_LABEL_MODES)
    if client_logits.dim() != 3 or weights.shape != client_logits.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} must be [K, N] of client_logits "
                         f"{tuple(client_logits.shape)} ([K, N, C])")
    if mode == "prob":
        return (weights[..., None] * torch.softmax(client_logits / temperature, -1)).sum(0)
    return torch.softmax((weights[..., None] * client_logits).sum(0) / temperature, -1)


def majority_vote(client_logits: Tensor) -> Tensor:
    """FedKA-style hard pseudo-labels: the class most clients predict (ties split evenly) [N, C]."""
    K, N, C = client_logits.shape
    votes = F.one_hot(client_logits.argmax(-1), C).sum(0).float()  # [N, C]
    top = (votes == votes.max(-1, keepdim=True).values).float()
    return top / top.sum(-1, keepdim=True)


def kl_to_targets(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample T^2 KL(q || softmax(logits / T)) [N]."""
    logq = torch.log(targets.clamp_min(1e-12))
    return temperature**2 * (targets * (logq - torch.log_softmax(logits / temperature, -1))).sum(-1)


# ----------------------------------------------------------------------------------------------
# KL distillation (vectorised over server models) with a functional Adam
def _adam(params, grads, state, t, lr, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.Adam's update (bias-corrected, eps outside the root of the corrected v)."""
    b1, b2 = betas
    for n, p in params.items():
        m, v = state[n]
        m.mul_(b1).add_(grads[n], alpha=1 - b1)
        v.mul_(b2).addcmul_(grads[n], grads[n], value=1 - b2)
        denom = (v / (1 - b2**t)).sqrt().add_(eps)
        p.sub_(lr / (1 - b1**t) * m / denom)


def kl_distill(model: nn.Module, start: fl.Params, x: Tensor, targets: Tensor, *, steps: int, lr: float = 1e-3,
               batch_size: int = 64, temperature: float = 1.0, generator: torch.Generator | None = None,
               per_model_x: bool = False, chunk_size: int | None = None) -> fl.Params:
    """Distil ``targets`` (soft labels [N, C], or [M, N, C] with a stacked ``start``) into the server
    model(s) starting at ``start`` (the FedAvg model): Adam, ``steps`` steps on mini-batches of the
    server data ``x`` ([N, ...] shared, or [M, N, ...] one set per model with ``per_model_x=True``)."""
    template = dict(model.named_parameters())
    stacked = fl._is_stacked(start, template)
    params = {n: p.detach().clone() for n, p in (start if stacked else fl.broadcast_params(start, 1)).items()}
    M = fl.n_stacked(params)
    targets = targets if targets.dim() == 3 else targets.unsqueeze(0).expand(M, -1, -1)
    if per_model_x and tuple(x.shape[:2]) != tuple(targets.shape[:2]):
        raise ValueError(f"per-model server data x {tuple(x.shape)} must start with [M, N] = {tuple(targets.shape[:2])}")
    N = targets.shape[1]
    if targets.shape[0] != M:
        raise ValueError(f"targets hold {targets.shape[0]} label sets for {M} server models")
    call = fl.functional(model)

    def loss(p, xb, qb):
        return kl_to_targets(call(p, xb), qb, temperature).mean()

    step = vmap(grad_and_value(loss), in_dims=(0, 0 if per_model_x else None, 0), chunk_size=chunk_size)
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    b = min(batch_size, N)
    for t in range(1, steps + 1):
        i = torch.randint(0, N, (b,), generator=generator).to(targets.device)
        xb = x[:, i] if per_model_x else x[i]
        grads, _ = step(params, xb, targets[:, i])
        with torch.no_grad():
            _adam(params, grads, state, t, lr)
    return params if stacked else fl.index_params(params, 0)


# ----------------------------------------------------------------------------------------------
# FedGO protocol: generator on the server, one discriminator per client
def sample(G: nn.Module, n: int, generator: torch.Generator | None = None, batch_size: int = 4096) -> Tensor:
    """n samples of G (noise drawn on CPU from ``generator``)."""
    device = next(G.parameters()).device
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=generator)
        return torch.cat([G(zb.to(device)) for zb in z.split(batch_size)])


def train_gan(x: Tensor, G: nn.Module, D: nn.Module, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
              generator: torch.Generator | None = None) -> nn.Module:
    """Non-saturating GAN on the server's unlabeled data ``x`` (Adam, betas (0.5, 0.999)); returns G
    trained in place. Any GAN will do for FedGO (papers.md 1.2); this is the small one we use."""
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    device = x.device
    for _ in range(steps):
        real = x[torch.randint(0, len(x), (batch_size,), generator=generator).to(device)]
        fake = G(torch.randn(batch_size, G.z_dim, generator=generator).to(device))
        loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-D(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return G


def discriminator_loss(call, params, batch) -> Tensor:
    """Binary cross-entropy, real = the client's data, fake = G samples (``batch["fake"]``), masked."""
    loss = F.softplus(-call(params, batch["x"])) + F.softplus(call(params, batch["fake"]))
    return fl.masked_mean(loss, batch["mask"])


def generator_extras(G: nn.Module):
    """An ``extras_fn`` for :func:`fedlib.federated.local_train` drawing one G sample per real sample
    from the client's own generator (outside vmap)."""
    device = next(G.parameters()).device

    def extras(x, y, g):
        with torch.no_grad():
            return {"fake": G(torch.randn(len(x), G.z_dim, generator=g).to(device))}

    return extras


def train_discriminators(D: nn.Module, G: nn.Module, clients: fl.ClientData, *, epochs: int, lr: float = 0.05,
                         momentum: float = 0.9, batch_size: int = 32, weight_decay: float = 0.0,
                         generator: torch.Generator | None = None, vectorised: bool = True,
                         init: fl.Params | None = None) -> fl.Params:
    """Step 2 of the FedGO protocol: every client trains D_k (from the same init) for ``epochs`` epochs
    on its data vs G samples; all clients in one vmap. Returns stacked D params [K, ...]."""
    init = init if init is not None else fl.get_params(D)
    return fl.local_train(D, init, clients, discriminator_loss, epochs=epochs, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, batch_size=batch_size, generator=generator,
                          extras_fn=generator_extras(G), vectorised=vectorised)


def discriminator_logits(D: nn.Module, stacked_params: fl.Params, x: Tensor) -> Tensor:
    """Pre-sigmoid logits l_k(x) of every client's discriminator on ``x``: [K, N]. Raises on NaN."""
    out = fl.predict(fl.functional(D), stacked_params, x, stacked=True)
    if not torch.isfinite(out).all():
        raise ValueError("a discriminator produced NaN/inf logits on the server data; allowed: finite logits. "
                         "Retrain the discriminators with a smaller lr or weight decay")
    return out


def fedgo_overhead(*, classifier_bytes: int, generator_bytes: int, discriminator_bytes: int, n_clients: int,
                   rounds: int, n_k, local_epochs: int, disc_epochs: int, clf_flops: float, disc_flops: float,
                   gen_forward_flops: float) -> dict:
    """FedGO's one-off extra cost next to the whole run (papers.md 1.2 claim c).

    Bytes: G down to every client once + D_k up once, vs the classifier down and up every round.
    Client FLOPs per sample: D training sees a real and a G sample (2 x disc_flops) and draws the G
    sample (gen_forward_flops), for ``disc_epochs`` epochs; local training costs clf_flops per sample
    for ``local_epochs`` epochs every round."""
    n = float(sum(int(v) for v in n_k))
    extra_bytes = n_clients * (generator_bytes + discriminator_bytes)
    base_bytes = fl.rounds_bytes(classifier_bytes, n_clients, rounds)
    extra_flops = n * disc_epochs * (2 * disc_flops + gen_forward_flops)
    base_flops = n * local_epochs * rounds * clf_flops
    return {"extra_bytes": extra_bytes, "training_bytes": base_bytes,
            "bytes_pct": 100.0 * extra_bytes / (base_bytes + extra_bytes),
            "extra_client_flops": extra_flops, "training_client_flops": base_flops,
            "flops_pct": 100.0 * extra_flops / (base_flops + extra_flops)}


# ----------------------------------------------------------------------------------------------
# data-free baseline: DENSE-style generator against the ensemble
def dense_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, n_classes: int, *,
                  steps: int, batch_size: int = 64, lr: float = 1e-3, lr_generator: float = 1e-3,
                  adv_weight: float = 1.0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> fl.Params:
    """DENSE-style data-free distillation (papers.md 1.3), alternating per step:
    generator G(z, y) (``G.z_dim`` = noise + n_classes; y one-hot appended, our choice) minimises
    CE(uniform logit ensemble(G(z, y)), y) - adv_weight * KL(ensemble || student) (hard-to-mimic samples
    the ensemble is sure about); then the student minimises the KL on fresh G samples. G is updated
    in place (keep it across rounds); returns the student's params."""
    call = fl.functional(model)
    teacher = vmap(call, in_dims=(0, None))
    student = fl.set_params(copy.deepcopy(model), start)
    opt_s = torch.optim.Adam(student.parameters(), lr=lr)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_generator, betas=(0.5, 0.999))
    device = next(G.parameters()).device
    noise = G.z_dim - n_classes

    def draw():
        y = torch.randint(0, n_classes, (batch_size,), generator=generator)
        z = torch.randn(batch_size, noise, generator=generator)
        return torch.cat([z, F.one_hot(y, n_classes).float()], 1).to(device), y.to(device)

    for _ in range(steps):
        zin, y = draw()
        x = G(zin)
        t_logits = teacher(client_params, x).mean(0)
        q = torch.softmax(t_logits / temperature, -1)
        disagreement = kl_to_targets(student(x), q, temperature).mean()
        loss_g = F.cross_entropy(t_logits, y) - adv_weight * disagreement
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            zin, _ = draw()
            x = G(zin)
            q = torch.softmax(teacher(client_params, x).mean(0) / temperature, -1)
        loss_s = kl_to_targets(student(x), q, temperature).mean()
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        opt_s.step()
    return fl.get_params(student)


# ----------------------------------------------------------------------------------------------
# the multi-method, multi-problem round loop
@dataclass
class Setup:
    """One federated problem (e.g. one alpha and seed): the clients, the server's unlabeled data (real
    or G samples), its true labels (only to measure teacher accuracy), FedGO/DaFKD discriminator
    logits on it [K, N] (None if unused), and the test set."""

    clients: fl.ClientData
    server_x: Tensor
    test_x: Tensor
    test_y: Tensor
    server_y: Tensor | None = None
    disc_logits: Tensor | None = None
    dense_generator: nn.Module | None = None


@dataclass
class RoundsResult:
    methods: tuple
    accuracy: Tensor          # [S, M, R] server-model test accuracy after every round
    teacher_accuracy: Tensor  # [S, M, R] weighted-ensemble accuracy on the server data (NaN if n/a)
    params: fl.Params         # final global models, stacked [S * M, ...] (problem-major)


@dataclass
class RoundsState:
    """What every round driver (in-process here, Flower in :mod:`fedlib.flower`) starts from."""

    methods: tuple
    S: int          # setups
    M: int          # methods
    K: int          # clients per setup
    call: object    # functional model
    init: fl.Params
    glob: fl.Params  # one global model per (setup, method): [S*M, ...]
    n_classes: int
    acc: Tensor     # [S, M, rounds] server test accuracy
    tacc: Tensor    # [S, M, rounds] teacher accuracy on the server data
    distil: list    # indices of the methods that distil


def prepare_rounds(model: nn.Module, setups: list, methods, rounds: int, init: fl.Params | None) -> RoundsState:
    """Check the methods and setups and lay out the state of :func:`run_rounds` (shared with Flower)."""
    methods = tuple(methods)
    for m in methods:
        check_choice("method", m, METHODS, fix="See fedlib.distill.METHODS.")
    S, M = len(setups), len(methods)
    K = setups[0].clients.n_clients
    if any(s.clients.n_clients != K for s in setups):
        raise ValueError("every setup must have the same number of clients")
    call = fl.functional(model)
    init = init if init is not None else fl.get_params(model)
    with torch.no_grad():
        n_classes = call(init, setups[0].test_x[:1]).shape[-1]
    return RoundsState(methods, S, M, K, call, init, fl.broadcast_params(init, S * M), n_classes,
                       torch.full((S, M, rounds), float("nan")), torch.full((S, M, rounds), float("nan")),
                       [j for j, m in enumerate(methods) if m not in AGGREGATION_ONLY and m != "dense"])


def ensemble_targets(method: str, logits: Tensor, n_k: Tensor, disc_logits: Tensor | None = None,
                     mode: str = "prob", temperature: float = 1.0) -> Tensor:
    """The server's pseudo-labels [N, C] for ``method`` from client logits [K, N, C] (papers.md 1.1, 1.3)."""
    if method == "fedka":
        return majority_vote(logits)
    a = W.compute_weights(WEIGHTING_OF[method], logits, n_k=n_k, disc_logits=disc_logits)
    return pseudo_labels(logits, a, mode, temperature)


def distil_into(model: nn.Module, glob: fl.Params, entries: list[int], xs: list[Tensor], qs: list[Tensor], *,
                steps: int, lr: float, batch_size: int, temperature: float, generator,
                chunk_size: int | str | None = "auto") -> None:
    """Distil the pseudo-labels ``qs`` on ``xs`` into the global models ``glob[entries]``, all in one vmap
    (in place)."""
    if not entries:
        return
    if any(x.shape != xs[0].shape for x in xs):
        raise ValueError("server datasets of all setups must have the same size to distil in one vmap")
    idx = torch.tensor(entries)
    new = kl_distill(model, fl.index_params(glob, idx), torch.stack(xs), torch.stack(qs), steps=steps, lr=lr,
                     batch_size=batch_size, temperature=temperature, generator=generator, per_model_x=True,
                     chunk_size=None if chunk_size == "auto" else chunk_size)
    for n in glob:
        glob[n][idx] = new[n]


def record_test_accuracy(call, glob: fl.Params, setups: list, M: int, acc: Tensor, r: int,
                         predict_batch: int = 1024) -> None:
    """acc[s, :, r] = test accuracy of the M global models of every setup s."""
    for s, setup in enumerate(setups):
        out = fl.predict(call, fl.index_params(glob, slice(s * M, (s + 1) * M)), setup.test_x, predict_batch,
                         stacked=True)
        acc[s, :, r] = fl.accuracy(out, setup.test_y).cpu()


def run_rounds(model: nn.Module, setups: list[Setup], methods, *, rounds: int, local_epochs: int = 1,
               lr: float = 0.05, momentum: float = 0.9, batch_size: int = 32, mu: float = 0.01,
               distill_steps: int = 50, distill_lr: float = 1e-3, distill_batch: int = 64,
               temperature: float = 1.0, pseudo_label_mode: str = "prob", dense_steps: int | None = None,
               generator: torch.Generator | None = None, init: fl.Params | None = None,
               progress=None, chunk_size: int | str | None = "auto", predict_batch: int = 1024) -> RoundsResult:
    """Run ``rounds`` rounds of every method on every setup, vectorised (see the module docstring).
    All global models start from ``init`` (default: the model's parameters), as in the papers.
    ``chunk_size``: models per vmap chunk in local training and distillation ("auto": see
    :func:`fedlib.federated.local_train`); lower it for big models (ResNet at paper scale) to bound memory."""
    st = prepare_rounds(model, setups, methods, rounds, init)
    methods, S, M, K, call, init, glob = st.methods, st.S, st.M, st.K, st.call, st.init, st.glob
    n_classes, acc, tacc, distil = st.n_classes, st.acc, st.tacc, st.distil
    clients = fl.concat_clients([s.clients.repeat(M) for s in setups])  # [S*M*K]
    mu_k = torch.tensor([mu if m == "fedprox" else 0.0 for _ in setups for m in methods for _ in range(K)])
    it = range(rounds) if progress is None else progress(range(rounds))
    for r in it:
        start = {n: p.repeat_interleave(K, dim=0) for n, p in glob.items()}
        local = fl.local_train(model, start, clients, epochs=local_epochs, lr=lr, momentum=momentum, mu=mu_k,
                               batch_size=batch_size, generator=generator, chunk_size=chunk_size)
        glob = fl.fedavg(local, clients.n_k, groups=S * M)
        if distil or "dense" in methods:
            xs, qs, entries = [], [], []
            for s, setup in enumerate(setups):
                for j in distil:
                    e = s * M + j
                    k_params = fl.index_params(local, slice(e * K, (e + 1) * K))
                    logits = fl.predict(call, k_params, setup.server_x, predict_batch, stacked=True)  # [K, N, C]
                    q = ensemble_targets(methods[j], logits, setup.clients.n_k, setup.disc_logits,
                                         pseudo_label_mode, temperature)
                    if setup.server_y is not None:
                        tacc[s, j, r] = (q.argmax(-1) == setup.server_y).float().mean().cpu()
                    xs.append(setup.server_x)
                    qs.append(q)
                    entries.append(e)
                if "dense" in methods:
                    j = methods.index("dense")
                    e = s * M + j
                    if setup.dense_generator is None:
                        raise ValueError("method 'dense' needs Setup.dense_generator (a label-conditioned G)")
                    new = dense_distill(model, fl.index_params(glob, e), fl.index_params(local, slice(e * K, (e + 1) * K)),
                                        setup.dense_generator, n_classes,
                                        steps=dense_steps or distill_steps, batch_size=distill_batch, lr=distill_lr,
                                        temperature=temperature, generator=generator)
                    for n in glob:
                        glob[n][e] = new[n]
            distil_into(model, glob, entries, xs, qs, steps=distill_steps, lr=distill_lr, batch_size=distill_batch,
                        temperature=temperature, generator=generator, chunk_size=chunk_size)
        record_test_accuracy(call, glob, setups, M, acc, r, predict_batch)
    return RoundsResult(methods, acc, tacc, glob)


def central_training(model: nn.Module, x_list: list[Tensor], y_list: list[Tensor], *, epochs: int, lr: float = 0.05,
                     momentum: float = 0.9, batch_size: int = 32, generator=None, init: fl.Params | None = None,
                     chunk_size: int | str | None = "auto") -> fl.Params:
    """The upper reference: one model per dataset in ``x_list`` (e.g. one per seed) trained centrally on
    all of it, all in one vmap (each dataset is one 'client'). Returns stacked params."""
    x = torch.cat(x_list)
    y = torch.cat(y_list)
    cuts = [0] + list(torch.tensor([len(v) for v in x_list]).cumsum(0).tolist())
    idx = [torch.arange(cuts[i], cuts[i + 1]) for i in range(len(x_list))]
    clients = fl.pack_clients(x, y, idx)
    init = init if init is not None else fl.get_params(model)
    return fl.local_train(model, init, clients, epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size,
                          generator=generator, chunk_size=chunk_size)



# ----------------------------------------------------------------------------------------------
# experiment builders used by notebook 01 (kept here so the notebook cells stay short)
class GaussianSource(nn.Module):
    """An 'off-the-shelf' generator with a known density N(0, scale^2 I) in ``dim`` dimensions
    (the FedGO protocol allows a given G; on 2-D toys this keeps the toy figure exact and fast)."""

    def __init__(self, dim: int = 2, scale: float = 3.0):
        super().__init__()
        self.z_dim = dim
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def forward(self, z):
        return self.scale * z


def build_setups(train, test, *, n_clients: int, alphas, seeds, gan_steps: int, disc_epochs: int,
                 disc_lr: float = 0.05, gan_lr: float = 2e-3, z_dim: int = 16, gen_width: int = 32, dense: bool = True,
                 generator: torch.Generator | None = None, device="cpu", progress=None) -> dict:
    """The FedGO protocol's one-off part for every (alpha, seed): FedGO split of ``train`` (half of each
    class, unlabeled, to the server), one GAN per seed on the server data (the split of the server
    half depends only on the seed), every client's discriminator against it (all alphas of a seed in
    one vmap), and the two scenarios' :class:`Setup` lists: ``"pre"`` (the real unlabeled server data)
    and ``"data_free"`` (as many G samples instead). Returns a dict with ``keys`` [(alpha, seed)],
    ``pre``, ``data_free``, ``generators`` {seed: G}, ``discriminator`` (the D module),
    ``disc_params`` {(alpha, seed): stacked}, ``client_indices``, ``server_indices`` and ``seconds``."""
    import time

    from . import data as fdata
    from . import models as fm

    shape = tuple(train.x.shape[1:])
    train, test = train.to(device), test.to(device)
    labels = train.y.cpu().numpy()
    out = {"keys": [], "pre": [], "data_free": [], "generators": {}, "disc_params": {}, "client_indices": {},
           "server_indices": {}, "seconds": {"gan": 0.0, "discriminators": 0.0}}
    out["discriminator"] = D = fm.make_discriminator(shape, width=8 if len(shape) == 3 else 32).to(device)
    d_init = fl.get_params(D)
    it = seeds if progress is None else progress(seeds)
    for seed in it:
        splits = {a: fdata.fedgo_split(labels, n_clients, a, seed=seed) for a in alphas}
        server = splits[alphas[0]][1]
        x_server = train.x[torch.as_tensor(server, device=device)]
        torch.manual_seed(seed)
        G = fm.make_generator(shape, z_dim=z_dim, width=gen_width).to(device)
        t = time.perf_counter()
        train_gan(x_server, G, fm.make_discriminator(shape).to(device), steps=gan_steps, lr=gan_lr,
                  generator=generator)
        out["seconds"]["gan"] += time.perf_counter() - t
        out["generators"][seed] = G
        x_free = sample(G, len(server), generator)
        packs = [fl.pack_clients(train.x, train.y, splits[a][0]) for a in alphas]
        t = time.perf_counter()
        d_all = train_discriminators(D, G, fl.concat_clients(packs), epochs=disc_epochs, lr=disc_lr,
                                     generator=generator, init=d_init)
        out["seconds"]["discriminators"] += time.perf_counter() - t
        for i, a in enumerate(alphas):
            dp = fl.index_params(d_all, slice(i * n_clients, (i + 1) * n_clients))
            out["keys"].append((a, seed))
            out["disc_params"][(a, seed)] = dp
            out["client_indices"][(a, seed)] = splits[a][0]
            out["server_indices"][(a, seed)] = server
            out["pre"].append(Setup(packs[i], x_server, test.x, test.y, train.y[torch.as_tensor(server, device=device)],
                                    discriminator_logits(D, dp, x_server)))
            dense_g = (fm.make_generator(shape, z_dim=z_dim + train.n_classes, width=gen_width).to(device)
                       if dense else None)
            out["data_free"].append(Setup(packs[i], x_free, test.x, test.y, None, discriminator_logits(D, dp, x_free),
                                          dense_generator=dense_g))
    return out


def toy_study(mixture: str = "ring", *, n_clients: int = 4, alpha: float = 0.1, n_train: int = 2000,
              n_server: int = 1000, local_epochs: int = 20, disc_epochs: int = 30, distill_steps: int = 300,
              rules=("uniform", "entropy", "variance", "dafkd", "fedgo", "oracle"), grid_size: int = 80,
              seed: int = 0) -> dict:
    """The toy 2-D comparison of the weightings (papers.md 1.2, the paper's toy figure): mixture data
    labelled by component, Dirichlet(alpha) over the clients; clients train 2-D MLPs for one round; the
    server has unlabeled mixture samples; G is a known broad Gaussian (:class:`GaussianSource`); every
    client trains its discriminator; the oracle uses the exact client densities
    p_k(x) = sum_c pi_kc N(x; mu_c, s^2 I) (pi_kc the client's class proportions). Returns weights on the
    server data and on a grid, pseudo-label errors (vs the true label and vs the oracle ensemble),
    mean TV distance of each rule's weights from the oracle's, and each rule's distilled server model's
    predictions on the grid and accuracy."""
    from . import data as fdata
    from . import models as fm

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
    G = GaussianSource(2, scale=3.0)
    D = fm.MLPDiscriminator(2, hidden=32)
    d_params = train_discriminators(D, G, clients, epochs=disc_epochs, lr=0.05, generator=g)
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
        disc = discriminator_logits(D, d_params, pts)
        comp = gm.component_log_prob(pts)  # [N, C]
        log_p = torch.logsumexp(comp[None] + pi.clamp_min(1e-12).log()[:, None, :], -1)  # [K, N]
        return logits, {rule: W.compute_weights(rule, logits, n_k=n_k, disc_logits=disc, log_densities=log_p)
                        for rule in rules}

    logits, w_server = weights_at(xs)
    _, w_grid = weights_at(grid)
    q = {rule: pseudo_labels(logits, w_server[rule]) for rule in rules}
    oracle_label = q["oracle"].argmax(-1) if "oracle" in q else None
    fedavg_params = fl.fedavg(local, n_k)
    targets = torch.stack([q[rule] for rule in rules])
    server = kl_distill(clf, fl.broadcast_params(fedavg_params, len(rules)), xs, targets, steps=distill_steps,
                        lr=3e-3, batch_size=128, generator=g)
    xt, yt = gm.sample(2000, g)
    test_acc = fl.accuracy(fl.predict(call, server, xt, stacked=True), yt)
    grid_pred = fl.predict(call, server, grid, stacked=True).argmax(-1)
    return {
        "rules": tuple(rules), "x": x, "y": y, "parts": parts, "server_x": xs, "server_y": ys, "grid": grid,
        "grid_extent": (-lim, lim, -lim, lim), "grid_size": grid_size, "weights_grid": w_grid,
        "weights_server": w_server, "n_classes": C,
        "pseudo_label_error": {rule: float((q[rule].argmax(-1) != ys).float().mean()) for rule in rules},
        "disagreement_with_oracle": {rule: float((q[rule].argmax(-1) != oracle_label).float().mean())
                                     for rule in rules} if oracle_label is not None else {},
        "weight_tv_to_oracle": {rule: float(W.weight_distance(w_server[rule], w_server["oracle"]))
                                for rule in rules} if "oracle" in rules else {},
        "server_test_accuracy": {rule: float(a) for rule, a in zip(rules, test_acc)},
        "grid_prediction": {rule: p for rule, p in zip(rules, grid_pred)},
        "fedavg_test_accuracy": float(fl.accuracy(fl.predict(call, fedavg_params, xt), yt)),
    }
