"""The ClientApp: local training (float32 models or FedDM's packed quantised updates), FedGO's
discriminator, FedLGD's round (its local virtual sets kept in the node's state) and gradient query, an
info query, and injected faults for tests."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from .. import distill
from .. import federated as fl
from .. import fedgo
from .. import fedlgd as lgd
from ..condense import SyntheticSet
from ..feddm import upload
from .records import Params, from_record, prefixed, quantizer_of, skip_seeds, to_record, unprefixed

FAULTS = ("raise", "nan", "shape", "sleep", "impersonate")
_DATA_CACHE: dict[str, object] = {}


def _get(ref):
    """The shared object behind a Ray ObjectRef, fetched once per actor process."""
    import ray

    key = ref.hex()
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = ray.get(ref)
    return _DATA_CACHE[key]


@dataclass
class ClientSpec:
    """Everything a ClientApp needs besides its data (pickled to the actors with every message, so keep
    models small; data travel once through Ray's object store)."""

    model: nn.Module
    loss_fn: Callable | None = None
    extras_fn: Callable | None = None
    discriminator: nn.Module | None = None   # FedGO: D architecture (init sent in the message)
    generator: nn.Module | None = None       # FedGO: G architecture (weights arrive once, by message)
    terms: dict = field(default_factory=dict)  # client terms by name (fedlib.distill.ClientTerm), e.g. FedGen's
    faults: dict = field(default_factory=dict)
    sleep_s: float = 0.0
    device: str = "cpu"  # "cuda" when the actors hold a GPU fraction
    fedlgd: tuple | None = None  # FedLGD: (FedLGDConfig, n_classes)


@dataclass
class _Task:
    """What every handler reads first from the server's message: its config, the task's row, the node's
    partition, the client's data and the parameters it starts from (None where the message carries none)."""

    cfg: object
    row: int
    pid: int
    data_row: int
    clients: fl.ClientData
    start: Params | None


# Node state (Flower's context.state) of FedLGD: the client's local virtual sets, and whose they are.
SETS, OWNER = "fedlgd.sets", "fedlgd.owner"


def _one_client(clients: fl.ClientData, row: int) -> fl.ClientData:
    n = int(clients.n_k[row])
    return fl.ClientData(clients.x[row:row + 1, :n], clients.y[row:row + 1, :n], clients.mask[row:row + 1, :n],
                         clients.n_k[row:row + 1])


def _inject(spec: ClientSpec, pid: int, params: Params, round_: int) -> tuple[Params, int]:
    """Apply an injected fault; returns the (possibly damaged) parameters and a row offset that an
    impersonating client claims (0: none)."""
    fault = spec.faults.get((round_, pid), spec.faults.get(pid))
    if fault == "raise":
        raise RuntimeError(f"injected failure on partition {pid}")
    if fault == "sleep":
        time.sleep(spec.sleep_s)
    if fault == "nan":
        params = {n: p.clone() for n, p in params.items()}
        next(iter(params.values())).view(-1)[0] = float("nan")
    if fault == "shape":
        params = dict(params)
        n0 = next(iter(params))
        params[n0] = params[n0].reshape(-1)[:-1].clone()
    return params, (-1 if fault == "impersonate" else 0)


def make_client_app(spec: ClientSpec, data_ref) -> ClientApp:
    """The ClientApp. ``data_ref`` is a Ray ObjectRef to the clients' :class:`~fedlib.federated.ClientData`
    (row i = one client's data)."""
    app = ClientApp()

    def set_task(msg: Message, context: Context) -> _Task:
        cfg = msg.content["config"]
        data_row = int(cfg["data-row"])
        start = ({n: p.to(spec.device) for n, p in from_record(msg.content["arrays"]).items()}
                 if "arrays" in msg.content else None)
        return _Task(cfg, int(cfg.get("row", data_row)), int(context.node_config["partition-id"]), data_row,
                     _one_client(_get(data_ref), data_row).to(spec.device), start)

    def reply(t: _Task, params: Params, round_: int | None) -> RecordDict:
        """The reply's content: ``params`` (damaged where a test injects a fault at ``round_``) and the row."""
        params, offset = _inject(spec, t.pid, params, round_) if round_ is not None else (params, 0)
        return RecordDict({"arrays": to_record(params), "metrics": MetricRecord({"row": t.row + offset})})

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"info": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t = set_task(msg, context)
        cfg, row, pid, clients, start = t.cfg, t.row, t.pid, t.clients, t.start
        model = copy.deepcopy(spec.model).to(spec.device)
        kw = dict(lr=float(cfg["lr"]), momentum=float(cfg["momentum"]), mu=float(cfg["mu"]),
                  batch_size=int(cfg["batch-size"]), generator=skip_seeds(cfg["rng"], int(cfg["skip"])),
                  extras_fn=spec.extras_fn)
        loss_fn = spec.loss_fn
        if "payload" in msg.content:  # a method's client term: its loss and per-step draws from the payload
            term = spec.terms[str(cfg["term"])]
            payload = {n: p.to(spec.device) for n, p in from_record(msg.content["payload"]).items()}
            with torch.no_grad():
                n_classes = model(clients.x[0, :1]).shape[-1]
            loss_fn = distill.client_loss(model, (term,), spec.loss_fn)
            kw["extras_fn"] = distill.client_extras(model, (term,), term, payload, n_classes)
        if int(cfg["steps"]) > 0:
            kw["steps"] = int(cfg["steps"])
        else:
            kw["epochs"] = int(cfg["epochs"])
        w_k = fl.index_params(fl.local_train(model, start, clients, loss_fn, **kw), 0)
        w_k, offset = _inject(spec, pid, w_k, int(cfg["server-round"]))
        quantizer = quantizer_of(msg.content["quantizer"] if "quantizer" in msg.content else None)
        up = upload(w_k, start, quantizer, skip_seeds(cfg["rng"], int(cfg["skip"])))
        arrays = to_record(w_k) if quantizer is None else ArrayRecord(
            {"payload": Array(np.frombuffer(up.blob, dtype=np.uint8).copy())})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"row": row + offset})}), reply_to=msg)

    @app.train("discriminator")
    def discriminator(msg: Message, context: Context) -> Message:
        t = set_task(msg, context)
        cfg = t.cfg
        G = fl.set_params(copy.deepcopy(spec.generator).to(spec.device), from_record(msg.content["generator"]))
        D = copy.deepcopy(spec.discriminator).to(spec.device)
        d = fedgo.train_discriminators(D, G, t.clients, epochs=int(cfg["epochs"]), lr=float(cfg["lr"]),
                                       momentum=float(cfg["momentum"]), batch_size=int(cfg["batch-size"]),
                                       generator=skip_seeds(cfg["rng"], int(cfg["skip"])), init=t.start)
        return Message(reply(t, fl.index_params(d, 0), fl.SETUP), reply_to=msg)

    @app.train("fedlgd")
    def fedlgd_round(msg: Message, context: Context) -> Message:
        """Round r of FedLGD and its baselines for this node's client (fedlib.fedlgd's client side): FedAvg
        and FedProx on its initial local virtual set, FedLGD on its current one (refreshed here every
        ``refresh_every`` rounds) anchored on the global virtual set the message carries."""
        t = set_task(msg, context)
        cfg, n_classes = spec.fedlgd
        if msg.metadata.dst_node_id != context.node_id:
            raise PermissionError(f"a message for node {msg.metadata.dst_node_id} reached node {context.node_id}; "
                                  "only the server's messages to this node may change its local virtual sets")
        real = [(t.clients.x[0], t.clients.y[0])]
        initial, current = _load_sets(context, t.data_row, cfg)
        if initial is None:  # the first round: the client distils its own set (nothing of it leaves the node)
            initial = current = lgd.local_virtual_sets(real, n_classes, cfg, spec.device, first=t.data_row)[0]
        starts = unprefixed(t.start)
        model = copy.deepcopy(spec.model).to(spec.device)
        r, K, rng = int(t.cfg["fedlgd-round"]), int(t.cfg["clients"]), t.cfg["rng"]
        base = lgd._pack([initial])
        out = {"FedAvg": lgd.train_baselines(model, starts["FedAvg"], base, 0.0, cfg, skip_seeds(rng, t.row)),
               "FedProx": lgd.train_baselines(model, starts["FedProx"], base, cfg.mu, cfg, skip_seeds(rng, K + t.row))}
        anchors = {n: v.to(spec.device) for n, v in from_record(msg.content["payload"]).items()}
        out["FedLGD"], (current,) = lgd.client_step(model, starts["FedLGD"], real, [current], (anchors["x"], anchors["y"]),
                                                    n_classes, cfg, r, skip_seeds(rng, t.row), spec.device, t.data_row)
        _save_sets(context, t.data_row, cfg, initial, current)
        return Message(reply(t, prefixed({m: fl.index_params(w, 0) for m, w in out.items()}),
                             int(t.cfg["server-round"])), reply_to=msg)

    @app.query("fedlgd")
    def fedlgd_query(msg: Message, context: Context) -> Message:
        """Read-only: the per-class gradients of the client's current local virtual set at the global model
        the message carries (``what="gradients"``), or, for the run's report, its sets (``what="sets"``)."""
        t = set_task(msg, context)
        cfg, n_classes = spec.fedlgd
        initial, current = _load_sets(context, t.data_row, cfg)
        if initial is None:
            raise RuntimeError(f"node of partition {t.pid} holds no local virtual set yet: a train.fedlgd message "
                               "must come first")
        if str(t.cfg["what"]) == "sets":
            return Message(reply(t, {"initial.x": initial.x, "initial.y": initial.y, "current.x": current.x,
                                     "current.y": current.y}, None), reply_to=msg)
        model = copy.deepcopy(spec.model).to(spec.device)
        ((grads, counts),) = lgd.client_gradients(fl.functional(model), t.start, [current], n_classes)
        return Message(reply(t, {**{f"grad/{n}": g for n, g in grads.items()}, "counts": counts},
                             int(t.cfg["server-round"])), reply_to=msg)

    return app


# ----------------------------------------------------------------------------------------------
# FedLGD's node state
def _load_sets(context: Context, data_row: int, cfg):
    """(initial, current) local virtual sets from the node state, or (None, None) where this node holds none
    for this client and run seed."""
    state = context.state
    if SETS not in state or OWNER not in state:
        return None, None
    owner = state[OWNER]
    if int(owner["data-row"]) != data_row or int(owner["seed"]) != cfg.seed:
        return None, None
    sets = from_record(state[SETS])
    return tuple(SyntheticSet(sets[f"{w}.x"], sets[f"{w}.y"], "dm", cfg.seed) for w in ("initial", "current"))


def _save_sets(context: Context, data_row: int, cfg, initial, current) -> None:
    context.state[SETS] = to_record({"initial.x": initial.x, "initial.y": initial.y, "current.x": current.x,
                                     "current.y": current.y})
    context.state[OWNER] = ConfigRecord({"data-row": data_row, "seed": cfg.seed})
