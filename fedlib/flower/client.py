"""The ClientApp: local training (float32 models or FedDM's packed quantised updates), FedGO's
discriminator, an info query, and injected faults for tests."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from .. import distill
from .. import federated as fl
from .. import fedgo
from ..feddm import upload
from .records import Params, from_record, quantizer_of, skip_seeds, to_record

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

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"info": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        row, pid = int(cfg["row"]), int(context.node_config["partition-id"])
        clients = _one_client(_get(data_ref), int(cfg["data-row"])).to(spec.device)
        start = {n: p.to(spec.device) for n, p in from_record(msg.content["arrays"]).items()}
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
        cfg = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        clients = _one_client(_get(data_ref), int(cfg["data-row"])).to(spec.device)
        G = fl.set_params(copy.deepcopy(spec.generator).to(spec.device), from_record(msg.content["generator"]))
        D = copy.deepcopy(spec.discriminator).to(spec.device)
        d = fedgo.train_discriminators(D, G, clients, epochs=int(cfg["epochs"]), lr=float(cfg["lr"]),
                                       momentum=float(cfg["momentum"]), batch_size=int(cfg["batch-size"]),
                                       generator=skip_seeds(cfg["rng"], int(cfg["skip"])),
                                       init={n: p.to(spec.device) for n, p in from_record(msg.content["arrays"]).items()})
        d, offset = _inject(spec, pid, fl.index_params(d, 0), fl.SETUP)
        return Message(RecordDict({"arrays": to_record(d), "metrics": MetricRecord({"row": int(cfg["row"]) + offset})}),
                       reply_to=msg)

    return app
