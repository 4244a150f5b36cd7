"""Server-side ensemble distillation and the federated round of every method of notebook 01
(docs/methods.md §1).

Pieces (pure functions where possible):

- ``pseudo_labels(client_logits [K, N, C], weights [K, N], mode="prob"|"logit", temperature)`` ->
  q [N, C]: the weighted ensemble (averaging logits is the documented option); ``majority_vote``
  (FedKA-style hard vote).
- ``kl_distill_params(model, start, x, targets, steps=...)``: Adam on T^2 KL(q || softmax(f(x)/T)) from
  ``start`` (the FedAvg model), returning the distilled parameters; M stacked server models distil in
  one vmap. ``distil_in_place(model, glob, entries, xs, qs, ...)`` writes the distilled models of
  several (setup, method) pairs into the stacked global models.
- The methods (``METHODS`` registry, :class:`Method`): how each differs from FedAvg. The
  distillation methods are derived from :data:`fedlib.weighting.RULES` (one per rule: ``feddf`` for
  the uniform rule, ``entropy``, ``variance``, ``dafkd``, ``fedgo``, ...), plus ``fedavg``, ``fedprox``
  (aggregation only), ``fedka`` (majority vote) and the data-free methods of :mod:`fedlib.datafree`
  (``dense``, ``fedgen``, ``fedftg``, ``coboosting``). Registering a weighting rule is all a new
  method needs.
- A method's client-side change that needs something from the server every round (FedGen's
  regulariser on generated features) is one :class:`ClientTerm` on its :class:`Method`: the server
  sends its ``payload`` down with the model, the client draws per-step inputs from it and adds its
  loss. Both drivers build the clients' loss and inputs with :func:`client_loss` /
  :func:`client_extras` and the payloads with :func:`client_payloads`, and count the payload's bytes.
- ``server_step``: one round's server update of every (setup, method) group from the client models
  and a mask of the replies accepted; used by both round drivers, :func:`run_rounds` in-process
  (everything accepted) and :mod:`fedlib.flower` (replies validated). A server method sees its
  group through a :class:`GroupContext` (accepted clients, state kept across rounds, its own random
  stream).
- ``run_rounds(model, setups, methods, ..., backend="inprocess"|"flower")``: R federated rounds of
  several methods on several problems (alphas, seeds) at once: one vmapped local-training call for all
  (problem, method, client) triples per round, one vmapped distillation for every distilling pair.
  Its ``ledger`` counts the bytes every round would send (the Flower backend's counts what did).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from . import federated as fl
from . import weighting as W
from .utils import check_choice

PSEUDO_LABEL_MODES = ("prob", "logit")
BACKENDS = ("inprocess", "flower")


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


def kl_distill_params(model: nn.Module, start: fl.Params, x: Tensor, targets: Tensor, *, steps: int = 0,
                      epochs: int = 0, lr: float = 1e-3, batch_size: int = 64, temperature: float = 1.0,
                      val_fraction: float = 0.0, patience: int = 0, cosine: bool = False,
                      generator: torch.Generator | None = None, per_model_x: bool = False,
                      chunk_size: int | None = None, report: dict | None = None) -> fl.Params:
    """The parameters distilled from ``targets`` (soft labels [N, C], or [M, N, C] with a stacked
    ``start``) into the server model(s) starting at ``start`` (the FedAvg model), by Adam on mini-batches
    of the server data ``x`` ([N, ...] shared, or [M, N, ...] one set per model with ``per_model_x=True``).
    Pure: ``start`` is not modified.

    Two budgets: ``steps`` mini-batches drawn with replacement (the FedDF-style fixed budget), or
    ``epochs`` passes over the server data (docs/methods.md §1.1: the FedGO paper distils for epochs
    every round). In epoch mode ``val_fraction`` of the server data is held out, still labelled only by
    the teacher (never by true labels): after every epoch each model's held-out KL to the teacher is
    measured and each model keeps its best parameters (the FedAvg start included); ``patience`` > 0
    stops once no model improved for that many epochs. ``cosine`` anneals the learning rate to 0 over
    the budget. ``report`` (a dict) receives ``epochs_run``, ``best_epoch`` [M] and ``val_kl`` [M]."""
    if (steps > 0) == (epochs > 0):
        raise ValueError(f"give exactly one distillation budget: steps={steps!r} or epochs={epochs!r} (one > 0)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in [0, 1)")
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

    x_dim = 0 if per_model_x else None
    step = vmap(grad_and_value(loss), in_dims=(0, x_dim, 0), chunk_size=chunk_size)
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    dev = targets.device
    take = (lambda i: x[:, i]) if per_model_x else (lambda i: x[i])  # noqa: E731

    if steps > 0:  # the fixed budget of mini-batches drawn with replacement
        b = min(batch_size, N)
        for t in range(1, steps + 1):
            i = torch.randint(0, N, (b,), generator=generator).to(dev)
            grads, _ = step(params, take(i), targets[:, i])
            with torch.no_grad():
                _adam(params, grads, state, t, _lr_at(lr, t, steps, cosine))
        return params if stacked else fl.index_params(params, 0)

    perm = torch.randperm(N, generator=generator)
    n_val = int(round(val_fraction * N)) if N > 1 else 0
    val, fit = perm[:n_val].to(dev), perm[n_val:]
    b = min(batch_size, len(fit))
    per_epoch = math.ceil(len(fit) / b)
    total = epochs * per_epoch
    val_kl = vmap(loss, in_dims=(0, x_dim, 0), chunk_size=chunk_size)
    best = {n: p.clone() for n, p in params.items()}
    with torch.no_grad():
        best_kl = val_kl(params, take(val), targets[:, val]) if n_val else None
    best_epoch = torch.zeros(M, dtype=torch.long)
    t, epoch = 0, 0
    for epoch in range(1, epochs + 1):
        for i in fit[torch.randperm(len(fit), generator=generator)].split(b):
            t += 1
            i = i.to(dev)
            grads, _ = step(params, take(i), targets[:, i])
            with torch.no_grad():
                _adam(params, grads, state, t, _lr_at(lr, t, total, cosine))
        if not n_val:
            continue
        with torch.no_grad():
            kl = val_kl(params, take(val), targets[:, val])
            better = kl < best_kl
            for n in params:
                best[n][better] = params[n][better]
            best_kl = torch.where(better, kl, best_kl)
            best_epoch[better.cpu()] = epoch
        if patience and bool((epoch - best_epoch >= patience).all()):
            break
    out = best if n_val else params
    if report is not None:
        report.update(epochs_run=epoch, best_epoch=best_epoch if n_val else torch.full((M,), epoch),
                      val_kl=best_kl.cpu() if n_val else None)
    return out if stacked else fl.index_params(out, 0)


def _lr_at(lr: float, t: int, total: int, cosine: bool) -> float:
    """The learning rate of step t (1-based) of ``total``: constant, or cosine-annealed towards 0."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * (t - 1) / total)) if cosine else lr


def distil_in_place(model: nn.Module, glob: fl.Params, entries: list[int], xs: list[Tensor], qs: list[Tensor], *,
                    steps: int, lr: float, batch_size: int, temperature: float, generator,
                    chunk_size: int | str | None = "auto", epochs: int = 0, val_fraction: float = 0.0,
                    patience: int = 0, cosine: bool = False, report: dict | None = None) -> None:
    """Distil the pseudo-labels ``qs`` on ``xs`` into the stacked global models ``glob[entries]``, all in
    one vmap, writing the results into ``glob`` (``epochs`` > 0: the epoch budget of
    :func:`kl_distill_params`, else ``steps``)."""
    if not entries:
        return
    if any(x.shape != xs[0].shape for x in xs):
        raise ValueError("server datasets of all setups must have the same size to distil in one vmap")
    idx = torch.tensor(entries)
    budget = dict(epochs=epochs, val_fraction=val_fraction, patience=patience) if epochs > 0 else dict(steps=steps)
    new = kl_distill_params(model, fl.index_params(glob, idx), torch.stack(xs), torch.stack(qs), lr=lr,
                            batch_size=batch_size, temperature=temperature, generator=generator, cosine=cosine,
                            per_model_x=True, chunk_size=None if chunk_size == "auto" else chunk_size,
                            report=report, **budget)
    for n in glob:
        glob[n][idx] = new[n]


# ----------------------------------------------------------------------------------------------
# the methods
@dataclass(frozen=True)
class ClientTerm:
    """A client-side change of a method that needs something from the server every round (FedGen's
    regulariser). The same three functions serve both round drivers:

    - ``payload(state, n_classes, cfg) -> Params | None``: the tensors the server sends down with the
      model, from the group's server state (:attr:`GroupContext.state`); None: nothing this round (plain
      local training);
    - ``extras(model, payload, n_classes) -> extras_fn(x, y, g) -> dict``: what the client draws every
      step from the payload, with its own generator ``g`` (names start with ``name``); with
      ``payload=None``, zeros of the same names and shapes, drawing no random numbers, and a weight
      ``f"{name}_weight"`` of 0;
    - ``loss(model) -> fn(call, params, batch) -> scalar``: the term added to the client's loss, times
      ``batch[f"{name}_weight"]``."""

    name: str
    payload: Callable
    extras: Callable
    loss: Callable


@dataclass(frozen=True)
class Method:
    """How a federated method differs from FedAvg (which every method starts each round with):

    - ``proximal``: clients add FedProx's (mu/2)||w - w_global||^2;
    - ``rule``: the server distils the ensemble of the client models, weighted by this rule of
      :data:`fedlib.weighting.RULES`, into the FedAvg model (``vote``: FedKA's hard majority vote);
    - ``server``: a server-side update of its own after FedAvg,
      ``server(model, start, client_params, setup, n_classes, cfg, ctx) -> params`` (``ctx`` a
      :class:`GroupContext`; data-free generators, :mod:`fedlib.datafree`);
    - ``client``: a :class:`ClientTerm` (a client-side change with a payload from the server)."""

    name: str
    proximal: bool = False
    rule: str | None = None
    vote: bool = False
    server: Callable | None = None
    client: ClientTerm | None = None
    setup_needs: tuple = ()  # Setup fields a server method reads (e.g. "dense_generator")
    doc: str = ""

    @property
    def distils(self) -> bool:
        return self.rule is not None or self.vote

    @property
    def needs(self) -> tuple:
        """Setup fields the method reads besides the clients and the server data (its rule's inputs
        that a Setup holds, e.g. ``disc_logits``, and its server method's)."""
        rule = tuple(n for n in W.RULES[self.rule].needs if n != "n_k") if self.rule else ()
        return rule + tuple(self.setup_needs)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method that is not a weighting rule (rules register through :func:`fedlib.weighting.register`)."""
    _METHODS[method.name] = method
    return method


register_method(Method("fedavg", doc="FedAvg: the n_k-weighted average of the client models"))
register_method(Method("fedprox", proximal=True, doc="FedProx: FedAvg with a proximal term in local training"))
register_method(Method("fedka", vote=True, doc="FedKA-style: distil the clients' hard majority vote"))


def methods() -> dict[str, Method]:
    """Every method by name: the aggregation-only ones, one per weighting rule with a method name,
    FedKA's vote and the data-free server methods (in that order)."""
    out = {n: _METHODS[n] for n in ("fedavg", "fedprox")}
    out.update({r.method: Method(r.method, rule=r.name, doc=r.doc) for r in W.RULES.values() if r.method})
    out.update({n: m for n, m in _METHODS.items() if n not in out})
    return out


def get_method(name: str) -> Method:
    return methods()[check_choice("method", name, methods(), fix="See fedlib.distill.methods().")]


class _Names:
    """``METHODS``: the method names, always current (a rule registered later is in it)."""

    def __iter__(self):
        return iter(methods())

    def __contains__(self, name):
        return name in methods()

    def __len__(self):
        return len(methods())

    def __repr__(self):
        return repr(tuple(methods()))


METHODS = _Names()


def aggregation_only() -> tuple:
    """The methods that only average (FedAvg, FedProx): they use no server data."""
    return tuple(n for n, m in methods().items() if not m.distils and m.server is None)


def ensemble_targets(method: str | Method, logits: Tensor, n_k: Tensor, disc_logits: Tensor | None = None,
                     mode: str = "prob", temperature: float = 1.0) -> Tensor:
    """The server's pseudo-labels [N, C] for ``method`` from client logits [K, N, C] (docs/methods.md §1.1, 1.3)."""
    m = get_method(method) if isinstance(method, str) else method
    if m.vote:
        return majority_vote(logits)
    if m.rule is None:
        raise ValueError(f"method {m.name!r} does not distil an ensemble; allowed: methods with a weighting rule "
                         "or the vote")
    a = W.compute_weights(m.rule, logits, n_k=n_k, disc_logits=disc_logits)
    return pseudo_labels(logits, a, mode, temperature)


# ----------------------------------------------------------------------------------------------
# one round's server step, shared by the in-process and the Flower driver
@dataclass
class Setup:
    """One federated problem (e.g. one alpha and seed): the clients, the server's unlabeled data (real
    or G samples), its true labels (only to measure teacher accuracy), FedGO/DaFKD discriminator
    logits on it [K, N] (None if unused), the test set, and ``key`` (e.g. ``(alpha, seed)``) by which
    results are indexed."""

    clients: fl.ClientData
    server_x: Tensor
    test_x: Tensor
    test_y: Tensor
    server_y: Tensor | None = None
    disc_logits: Tensor | None = None
    dense_generator: nn.Module | None = None
    key: tuple = ()


@dataclass
class ServerConfig:
    """The server side of a round (the same for every method and setup)."""

    distill_steps: int = 50
    distill_lr: float = 1e-3
    distill_batch: int = 64
    temperature: float = 1.0
    pseudo_label_mode: str = "prob"
    dense_steps: int | None = None
    generator: torch.Generator | None = None
    chunk_size: int | str | None = "auto"
    predict_batch: int = 1024
    # the epoch budget (used when distill_epochs > 0; see kl_distill_params): passes over the server
    # data, a held-out part labelled by the teacher for early stopping, a cosine learning-rate schedule
    distill_epochs: int = 0
    distill_val: float = 0.2
    distill_patience: int = 3
    distill_cosine: bool = True
    method_options: dict = field(default_factory=dict)  # {method: {option: value}} (fedlib.datafree's options)


@dataclass
class RoundsResult:
    methods: tuple
    accuracy: Tensor          # [S, M, R] server-model test accuracy after every round
    teacher_accuracy: Tensor  # [S, M, R] weighted-ensemble accuracy on the server data (NaN if n/a)
    params: fl.Params         # final global models, stacked [S * M, ...] (problem-major)
    keys: list = field(default_factory=list)  # setup keys, e.g. [(alpha, seed), ...]
    report: object = None     # the Flower backend's FlowerReport (bytes, events, timings); None in-process
    ledger: fl.CommLedger = field(default_factory=fl.CommLedger)  # bytes per round (Flower: what crossed)
    distill_log: list = field(default_factory=list)  # per round (epoch budget): epochs run, held-out KL per model

    def frame(self, key_names: tuple = ("alpha", "seed")):
        """One row per (setup, method, round): the setup's key fields, method, round (1-based),
        accuracy, teacher_accuracy."""
        import pandas as pd

        rows = []
        S, M, R = self.accuracy.shape
        for s in range(S):
            key = self.keys[s] if s < len(self.keys) and self.keys[s] else (s,)
            names = key_names if len(key_names) == len(key) else tuple(f"key{i}" for i in range(len(key)))
            for j, m in enumerate(self.methods):
                for r in range(R):
                    rows.append({**dict(zip(names, key)), "method": m, "round": r + 1,
                                 "accuracy": float(self.accuracy[s, j, r]),
                                 "teacher_accuracy": float(self.teacher_accuracy[s, j, r])})
        return pd.DataFrame(rows)


@dataclass
class RoundsState:
    """What every round driver starts from and updates (:func:`prepare_rounds`)."""

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
    distill_log: list = field(default_factory=list)

    state: list = field(default_factory=list)  # one dict per (setup, method) group: a server method's state
    ledger: fl.CommLedger = field(default_factory=fl.CommLedger)

    def result(self, setups, report=None) -> RoundsResult:
        return RoundsResult(self.methods, self.acc, self.tacc, self.glob, [s.key for s in setups], report,
                            ledger=report.ledger if report is not None else self.ledger,
                            distill_log=self.distill_log)


def prepare_rounds(model: nn.Module, setups: list, methods_: tuple, rounds: int, init: fl.Params | None,
                   discriminators_later: bool = False) -> RoundsState:
    """Check the methods and setups and lay out the state of a run of rounds (shared with Flower, whose
    FedGO exchange brings the discriminators later)."""
    methods_ = tuple(methods_)
    for m in methods_:
        for need in get_method(m).needs:
            if need == "disc_logits" and discriminators_later:
                continue
            if any(getattr(s, need, None) is None for s in setups):
                raise ValueError(f"method {m!r} needs Setup.{need} on every setup; build the setups with "
                                 "fedlib.studies.fedgo_setups (on Flower, exchange=FedGOExchange(...) brings the "
                                 "discriminators)")
    if not setups:
        raise ValueError("no setups to run; allowed: at least one fedlib.distill.Setup")
    S, M = len(setups), len(methods_)
    K = setups[0].clients.n_clients
    if any(s.clients.n_clients != K for s in setups):
        raise ValueError("every setup must have the same number of clients")
    call = fl.functional(model)
    init = init if init is not None else fl.get_params(model)
    with torch.no_grad():
        n_classes = call(init, setups[0].test_x[:1]).shape[-1]
    return RoundsState(methods_, S, M, K, call, init, fl.broadcast_params(init, S * M), n_classes,
                       torch.full((S, M, rounds), float("nan")), torch.full((S, M, rounds), float("nan")),
                       state=[{} for _ in range(S * M)])


def client_mu(st: RoundsState, mu: float) -> Tensor:
    """FedProx's mu of every client task [S*M*K], in (setup, method, client) order (0 for non-proximal methods)."""
    return torch.tensor([mu if get_method(m).proximal else 0.0 for _ in range(st.S) for m in st.methods
                         for _ in range(st.K)])


def client_terms(methods_) -> tuple:
    """The distinct :class:`ClientTerm` of the methods (empty when none has a client-side term)."""
    out = []
    for m in methods_:
        term = get_method(m).client
        if term is not None and term not in out:
            out.append(term)
    return tuple(out)


def client_payloads(st: RoundsState, cfg: ServerConfig) -> list:
    """What the server sends down besides the model this round, per (setup, method) group: its client
    term's payload (Params) or None. Both drivers call it before every round."""
    out = []
    for e in range(st.S * st.M):
        term = get_method(st.methods[e % st.M]).client
        out.append(None if term is None else term.payload(st.state[e], st.n_classes, cfg))
    return out


def client_loss(model: nn.Module, terms: tuple, base: Callable | None = None) -> Callable:
    """A client's ``loss_fn``: ``base`` (default: cross-entropy) plus every term's loss times its
    per-task weight in the batch (0 where the task's method does not use that term, or has no payload
    yet). The in-process driver trains every task with it in one vmap; a Flower client uses it with
    the one term of its task."""
    base = base or fl.classification_loss
    if not terms:
        return base
    parts = [(t.name, t.loss(model)) for t in terms]

    def loss(call, params, batch):
        out = base(call, params, batch)
        for name, fn in parts:
            out = out + batch[f"{name}_weight"] * fn(call, params, batch)
        return out

    return loss


def client_extras(model: nn.Module, terms: tuple, term: ClientTerm | None, payload, n_classes: int) -> Callable | None:
    """A client task's ``extras_fn``: ``term``'s draws from ``payload`` and zeros for the run's other
    terms (so that every task of one vmap returns the same names). None when the run has no term."""
    if not terms:
        return None
    fns = [t.extras(model, payload if t == term else None, n_classes) for t in terms]

    def extras(x, y, g):
        out = {}
        for fn in fns:
            out.update(fn(x, y, g))
        return out

    return extras


def log_round_bytes(ledger: fl.CommLedger, st: RoundsState, r: int, payloads: list) -> None:
    """In-process: what round ``r`` (1-based) sends, every reply accepted: the model down and up for
    every client task, and every group's payload down to each of its clients (the Flower strategy logs
    the same items as they cross)."""
    one = fl.state_bytes(fl.index_params(st.glob, 0))
    n = st.S * st.M * st.K
    ledger.log(r, "down", "model", one, copies=n)
    for e, p in enumerate(payloads):
        if p is not None:
            ledger.log(r, "down", f"{get_method(st.methods[e % st.M]).client.name} payload", fl.state_bytes(p),
                       copies=st.K)
    ledger.log(r, "up", "model", one, copies=n)


@dataclass
class GroupContext:
    """What a server method sees of its (setup, method) group besides the models: the round (0-based),
    the accepted clients (indices into ``setup.clients``, in the order of ``client_params``), its state
    kept across the rounds of this run (e.g. its generator), and its own random stream (seeded from the
    run's generator seed, the setup and the method, so adding a method never changes another's numbers,
    and both drivers draw the same)."""

    round: int
    accepted: Tensor
    state: dict
    rng: torch.Generator


def group_context(st: RoundsState, e: int, r: int, accepted: Tensor, cfg: ServerConfig) -> GroupContext:
    state = st.state[e]
    if "rng" not in state:
        base = cfg.generator.initial_seed() if cfg.generator is not None else 0
        state["rng"] = torch.Generator().manual_seed(zlib.crc32(f"{base}/{e // st.M}/{st.methods[e % st.M]}".encode()))
    return GroupContext(r, accepted, state, state["rng"])


def server_step(model: nn.Module, st: RoundsState, setups: list, r: int, local: fl.Params, accepted: Tensor,
                cfg: ServerConfig, with_disc: dict | None = None, on_event: Callable | None = None) -> None:
    """Round ``r`` (0-based) on the server, in place on ``st.glob``: for every (setup, method) group, the
    FedAvg of its accepted client models (``local`` stacked [S*M*K] in (setup, method, client) order,
    ``accepted`` [S*M*K] bool; a group with none keeps its model), then the method's own server update
    (data-free generators), then its pseudo-labels on the server data from the accepted clients (those
    that also have a discriminator, ``with_disc[s]`` [K] bool, where the rule needs one), all distilled
    in one vmap; records the teacher and test accuracy."""
    K, M = st.K, st.M
    xs, qs, entries = [], [], []
    for e in range(st.S * M):
        s, j = divmod(e, M)
        setup, method = setups[s], get_method(st.methods[j])
        ok = accepted[e * K:(e + 1) * K].clone()
        if not ok.any():
            if on_event is not None:
                on_event(r + 1, "group-kept", f"no client of setup {s} method {method.name!r} replied; its global "
                         "model is unchanged")
            continue
        n_k = setup.clients.n_k
        keep = torch.nonzero(ok).squeeze(1)
        k_params = fl.index_params(local, keep + e * K)
        new = fl.fedavg(k_params, n_k[keep.to(n_k.device)])
        for n in st.glob:
            st.glob[n][e] = new[n]
        if method.server is not None:
            ctx = group_context(st, e, r, keep, cfg)
            new = method.server(model, fl.index_params(st.glob, e), k_params, setup, st.n_classes, cfg, ctx)
            for n in st.glob:
                st.glob[n][e] = new[n]
        if not method.distils:
            continue
        if "disc_logits" in method.needs and with_disc is not None and s in with_disc:
            ok &= with_disc[s]  # a client without a discriminator has no FedGO weight
            keep = torch.nonzero(ok).squeeze(1)
            k_params = fl.index_params(local, keep + e * K)
        logits = predict_each(st.call, k_params, setup.server_x, cfg.predict_batch)  # [K', N, C]
        dl = setup.disc_logits[keep.to(setup.disc_logits.device)] if setup.disc_logits is not None else None
        q = ensemble_targets(method, logits, n_k[keep.to(n_k.device)], dl, cfg.pseudo_label_mode, cfg.temperature)
        if setup.server_y is not None:
            st.tacc[s, j, r] = (q.argmax(-1) == setup.server_y).float().mean().cpu()
        xs.append(setup.server_x)
        qs.append(q)
        entries.append(e)
    report = {}
    distil_in_place(model, st.glob, entries, xs, qs, steps=cfg.distill_steps, lr=cfg.distill_lr,
                    batch_size=cfg.distill_batch, temperature=cfg.temperature, generator=cfg.generator,
                    chunk_size=cfg.chunk_size, epochs=cfg.distill_epochs, val_fraction=cfg.distill_val,
                    patience=cfg.distill_patience, cosine=cfg.distill_cosine and cfg.distill_epochs > 0,
                    report=report)
    if "epochs_run" in report:  # which (setup, method) groups distilled, for how long, how well (held out)
        st.distill_log.append({"round": r + 1, "groups": entries, **report})
    record_test_accuracy(st.call, st.glob, setups, M, st.acc, r, cfg.predict_batch)


def predict_each(call, stacked: fl.Params, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Outputs [K, N, ...] of K stacked models on ``x``: one vmap on GPU; on CPU one model at a time,
    about 4x faster there for small CNNs (vmap over conv weights becomes a grouped convolution;
    measured: 20 digits CNNs on 720 images, 0.12 s looped vs 0.47 s vmapped)."""
    if x.device.type != "cpu":
        return fl.predict(call, stacked, x, batch_size, stacked=True)
    return torch.stack([fl.predict(call, fl.index_params(stacked, k), x, batch_size) for k in range(fl.n_stacked(stacked))])


def record_test_accuracy(call, glob: fl.Params, setups: list, M: int, acc: Tensor, r: int,
                         predict_batch: int = 1024) -> None:
    """acc[s, :, r] = test accuracy of the M global models of every setup s."""
    for s, setup in enumerate(setups):
        out = predict_each(call, fl.index_params(glob, slice(s * M, (s + 1) * M)), setup.test_x, predict_batch)
        acc[s, :, r] = fl.accuracy(out, setup.test_y).cpu()


def run_rounds(model: nn.Module, setups: list[Setup], methods, *, rounds: int, local_epochs: int = 1,
               lr: float = 0.05, momentum: float = 0.9, batch_size: int = 32, mu: float = 0.01,
               distill_steps: int = 50, distill_lr: float = 1e-3, distill_batch: int = 64,
               temperature: float = 1.0, pseudo_label_mode: str = "prob", dense_steps: int | None = None,
               generator: torch.Generator | None = None, init: fl.Params | None = None,
               progress=None, chunk_size: int | str | None = "auto", predict_batch: int = 1024,
               distill_epochs: int = 0, distill_val: float = 0.2, distill_patience: int = 3,
               distill_cosine: bool = True, method_options: dict | None = None, backend: str = "inprocess",
               **flower_kw) -> RoundsResult:
    """Run ``rounds`` rounds of every method on every setup (see the module docstring). All global
    models start from ``init`` (default: the model's parameters), as in the papers. ``chunk_size``:
    models per vmap chunk in local training and distillation ("auto": see
    :func:`fedlib.federated.local_train`); lower it for big models to bound memory. ``backend="flower"``
    runs the same rounds as Flower ServerApp and ClientApps on Ray (:func:`fedlib.flower.run_rounds`;
    ``flower_kw``: ``exchange``, ``options``); the numbers agree with in-process to float tolerance.
    ``distill_epochs`` > 0 replaces the ``distill_steps`` budget by epochs over the server data with
    early stopping on a held-out part labelled by the teacher (:class:`ServerConfig`).
    ``method_options``: per-method settings of the data-free methods, e.g.
    ``{"fedgen": {"weight": 1.0}, "coboosting": {"steps": 40}}`` (see :mod:`fedlib.datafree`)."""
    check_choice("backend", backend, BACKENDS, fix="Use backend='inprocess' unless you need real clients or a Ray cluster.")
    cfg = ServerConfig(distill_steps, distill_lr, distill_batch, temperature, pseudo_label_mode, dense_steps, generator,
                       chunk_size, predict_batch, distill_epochs, distill_val, distill_patience, distill_cosine,
                       method_options=dict(method_options or {}))
    client = dict(local_epochs=local_epochs, lr=lr, momentum=momentum, batch_size=batch_size, mu=mu)
    if backend == "flower":
        from .flower import run_rounds as flower_rounds

        return flower_rounds(model, setups, methods, rounds=rounds, server=cfg, init=init, progress=progress,
                             **client, **flower_kw)
    if flower_kw:
        raise ValueError(f"{sorted(flower_kw)} only apply to backend='flower'")
    st = prepare_rounds(model, setups, methods, rounds, init)
    clients = fl.concat_clients([s.clients.repeat(st.M) for s in setups])  # [S*M*K]
    mu_k = client_mu(st, mu)
    terms = client_terms(st.methods)
    loss_fn = client_loss(model, terms) if terms else None
    accepted = torch.ones(st.S * st.M * st.K, dtype=torch.bool)
    for r in range(rounds) if progress is None else progress(range(rounds)):
        start = {n: p.repeat_interleave(st.K, dim=0) for n, p in st.glob.items()}
        payloads = client_payloads(st, cfg)
        extras = None
        if terms:
            per_group = [client_extras(model, terms, get_method(st.methods[e % st.M]).client, payloads[e], st.n_classes)
                         for e in range(st.S * st.M)]
            extras = [fn for fn in per_group for _ in range(st.K)]
        log_round_bytes(st.ledger, st, r + 1, payloads)
        local = fl.local_train(model, start, clients, loss_fn, epochs=local_epochs, lr=lr, momentum=momentum, mu=mu_k,
                               batch_size=batch_size, generator=generator, chunk_size=chunk_size, extras_fn=extras)
        server_step(model, st, setups, r, local, accepted, cfg)
    return st.result(setups)


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


# the data-free server methods register themselves (fedlib.datafree imports this module's pieces)
from . import datafree as _datafree  # noqa: E402,F401
