"""The in-process engine of the federated rounds of notebook 01's methods (docs/methods.md §1).

- ``server_step``: one round's server update of every (setup, method) group from the client models
  and a mask of the replies accepted; used by both round drivers, :func:`run_rounds` in-process
  (everything accepted) and :mod:`fedlib.flower` (replies validated). A server method sees its
  group through a :class:`GroupContext` (accepted clients, state kept across rounds, its own random
  stream).
- Both drivers build the clients' loss and inputs with :func:`client_loss` / :func:`client_extras`
  and the payloads of a :class:`fedlib.methods.ClientTerm` with :func:`client_payloads`, and count
  the payload's bytes.
- ``run_rounds(model, setups, methods, ...)``: R federated rounds of several methods on several
  problems (alphas, seeds) at once: one vmapped local-training call for all (problem, method, client)
  triples per round, one vmapped distillation for every distilling pair. Its ``ledger`` counts the
  bytes every round would send. The same rounds on Flower: :func:`fedlib.backends.run_rounds` with
  ``backend="flower"``, which hands this function Flower's driver (the core never imports Flower).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from . import federated as fl
from .methods import (ClientTerm, ServerConfig, ServerSettings, distil_in_place, ensemble_targets,  # noqa: F401
                      get_method, predict_each)
from .utils import build_config, check_number


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


@dataclass(kw_only=True)
class RoundsConfig(ServerSettings):
    """Every setting of a run of rounds: the rounds and the client side (local SGD; FedProx's ``mu``, used
    by proximal methods only), declared and checked here, and the server side, whose fields
    :class:`fedlib.methods.ServerSettings` declares and checks (:meth:`server` adds the run's random
    stream, which :func:`run_rounds` takes apart). Notebook 01's parameters of the same names fill it."""

    rounds: int  # communication rounds (no default: every study says how many)
    # the client side: local SGD of every client model
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    mu: float = 0.01  # FedProx's proximal weight (FedProx, Li et al. 2020, tune in {0.001, 0.01, 0.1, 1})

    def __post_init__(self):
        for name in ("rounds", "batch_size"):
            check_number(name, getattr(self, name), at_least=1, integer=True)
        check_number("local_epochs", self.local_epochs, at_least=0, integer=True, fix="0 switches it off")
        check_number("lr", self.lr, above=0)
        check_number("momentum", self.momentum, at_least=0, below=1)
        check_number("mu", self.mu, at_least=0, fix="0 makes FedProx FedAvg")
        super().__post_init__()

    def client(self) -> dict:
        """The client side, as both drivers' local training takes it."""
        return dict(local_epochs=self.local_epochs, lr=self.lr, momentum=self.momentum, batch_size=self.batch_size,
                    mu=self.mu)

    def server(self, generator: torch.Generator | None = None) -> ServerConfig:
        """The server side of every round, with the run's random stream."""
        return ServerConfig(**{n: getattr(self, n) for n in ServerConfig.settings() if n != "method_options"},
                            generator=generator, method_options=dict(self.method_options))

    @classmethod
    def build(cls, config: "RoundsConfig | None", fields: dict) -> "RoundsConfig":
        """``config``, or one made of ``fields`` (a call written with keywords); not both."""
        return build_config(cls, config, fields, "run_rounds")


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
    distil_in_place(model, st.glob, entries, xs, qs, cfg, report=report)
    if "epochs_run" in report:  # which (setup, method) groups distilled, for how long, how well (held out)
        st.distill_log.append({"round": r + 1, "groups": entries, **report})
    record_test_accuracy(st.call, st.glob, setups, M, st.acc, r, cfg.predict_batch)


def record_test_accuracy(call, glob: fl.Params, setups: list, M: int, acc: Tensor, r: int,
                         predict_batch: int = 1024) -> None:
    """acc[s, :, r] = test accuracy of the M global models of every setup s."""
    for s, setup in enumerate(setups):
        out = predict_each(call, fl.index_params(glob, slice(s * M, (s + 1) * M)), setup.test_x, predict_batch)
        acc[s, :, r] = fl.accuracy(out, setup.test_y).cpu()


def run_rounds(model: nn.Module, setups: list[Setup], methods, config: RoundsConfig | None = None, *,
               generator: torch.Generator | None = None, init: fl.Params | None = None, progress=None,
               driver: Callable | None = None, **kw) -> RoundsResult:
    """Run ``config.rounds`` rounds of every method on every setup (see the module docstring), with the
    settings of ``config`` (a :class:`RoundsConfig`; or its fields as keywords, e.g. ``rounds=5, lr=0.05``).
    All global models start from ``init`` (default: the model's parameters), as in the papers.
    ``generator``: the run's random stream (local batches, distillation batches, the server methods' seeds).
    ``driver``: another engine for the same rounds, given the same ``config`` and ``generator`` and the
    keywords that are not settings (:func:`fedlib.backends.run_rounds`
    passes Flower's, :func:`fedlib.flower.run_rounds`, whose numbers agree with in-process to float
    tolerance; its keywords: ``exchange``, ``options``). ``chunk_size``: models per vmap chunk in local
    training and distillation ("auto": see :func:`fedlib.federated.local_train`); lower it for big models
    to bound memory. ``distill_epochs`` > 0 replaces the ``distill_steps`` budget by epochs over the
    server data with early stopping on a held-out part labelled by the teacher (:class:`ServerConfig`).
    ``method_options``: per-method settings of the data-free methods, e.g.
    ``{"fedgen": {"weight": 1.0}, "coboosting": {"steps": 40}}`` (see :mod:`fedlib.datafree`)."""
    names = RoundsConfig.__dataclass_fields__
    config = RoundsConfig.build(config, {k: kw.pop(k) for k in list(kw) if k in names})
    driver_kw = kw
    cfg = config.server(generator)
    rounds = config.rounds
    if driver is not None:
        return driver(model, setups, methods, config, generator=generator, init=init, progress=progress, **driver_kw)
    if driver_kw:  # backend= here is a call written before the backend was chosen above the core
        raise ValueError(f"{sorted(driver_kw)} are not settings of run_rounds (allowed: {', '.join(sorted(names, key=lambda n: n in ServerConfig.settings()))}); "
                         "exchange, options and backend apply to backend='flower' only: choose the backend with "
                         "fedlib.backends.run_rounds(..., backend=...)")
    st = prepare_rounds(model, setups, methods, rounds, init)
    clients = fl.concat_clients([s.clients.repeat(st.M) for s in setups])  # [S*M*K]
    mu_k = client_mu(st, config.mu)
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
        local = fl.local_train(model, start, clients, loss_fn, epochs=config.local_epochs, lr=config.lr,
                               momentum=config.momentum, mu=mu_k, batch_size=config.batch_size, generator=generator,
                               chunk_size=config.chunk_size, extras_fn=extras)
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
