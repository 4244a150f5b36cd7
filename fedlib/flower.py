"""fedlib's federated algorithms on Flower (Message API, flwr >= 1.20), run by Flower's simulation engine
(Ray) in-process, or on a Ray cluster across machines (``docs/flower_ray_cluster.md``).

Optional extra: ``pip install -e .[flower]`` (``flwr[simulation]``). Nothing here is a second
implementation: client training is :func:`fedlib.federated.local_train`, aggregation
:func:`fedlib.federated.fedavg`, weights :func:`fedlib.weighting.compute_weights`, pseudo-labels and
distillation :mod:`fedlib.distill`, quantised updates :mod:`fedlib.compression`. This module only moves
their inputs and outputs through Flower ``Message``s:

==========================  =====================================  ====================================
message type                server -> client (content)             client -> server (reply)
==========================  =====================================  ====================================
``query.info``              nothing                                partition-id, n_k (one-off)
``train.discriminator``     generator G (ArrayRecord, once)        D_k (ArrayRecord, once)  [FedGO]
``train``                   global model (ArrayRecord) + config    w_k (ArrayRecord), or the packed
                                                                   quantised update w_k - w (FedDM-quant:
                                                                   one uint8 Array, ``compression.encode``)
==========================  =====================================  ====================================

Drop-in drivers with the signature and return value of the in-process ones:

- :func:`run_rounds` = :func:`fedlib.distill.run_rounds` (FedAvg, FedProx, FedDF, FedGO, the other
  weightings, FedKA vote and the server-side DENSE baseline; notebook 01), plus
  ``exchange=FedGOExchange(D, G, ...)``: the one-off FedGO protocol (G down, D_k up) in the same simulation.
- :func:`run_feddm` = :func:`fedlib.feddm.run_feddm` (FedDM vanilla / prox / quant; notebook 02).

Seeds: the in-process drivers train K clients with ``local_train(..., generator=g)``, which gives client
k the k-th seed drawn from g (:func:`fedlib.federated.client_generators`). The server here sends every
client g's state and the client's row index i; the client skips i seeds of it with the same
``client_generators`` and calls ``local_train`` on its own data, so it draws exactly the random numbers it
would have drawn in-process; the server then advances its g as local_train would. The server-side random
numbers (distillation mini-batches) come from the same g in the same order. Result: the same global
model up to float round-off of vmap over 1 vs K clients (``tests/test_flower.py`` states the tolerance).

Faults: a reply with an error (the ClientApp raised, Flower's failures), no reply within
``FlowerOptions.round_timeout`` seconds, or a reply whose arrays have the wrong names / shapes / dtype or
non-finite values is left out and logged (``fedlib.flower`` logger, and ``FlowerReport.events``); the
FedAvg weights n_k / n and the FedGO weights renormalise over the clients that replied. A group whose
clients all failed keeps its global model.

Bytes: a :class:`fedlib.federated.CommLedger` of the payloads that crossed (tensor bytes numel x itemsize,
or ``len`` of the packed quantised payload), comparable to the in-process formulas; Flower's own
serialised size (``ArrayRecord.count_bytes``, numpy headers included) is kept beside it as ``wire``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import compression as C
from . import distill as DS
from . import federated as fl

# Keep Ray and Flower on this machine and quiet unless told otherwise: Ray's usage stats and Flower's
# telemetry would try the network; without RAY_ADDRESS Ray binds to loopback only (Ray reads this at
# import). On a cluster set RAY_ADDRESS (see docs/flower_ray_cluster.md) and the loopback pin is skipped.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
if "RAY_ADDRESS" not in os.environ:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType,  # noqa: E402
                      MetricRecord, RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

log = logging.getLogger("fedlib.flower")
Params = dict[str, Tensor]
FAULTS = ("raise", "nan", "shape", "sleep")


# ----------------------------------------------------------------------------------------------
# options and report
@dataclass
class FlowerOptions:
    """How the simulation runs. ``ray_address=None`` starts a private local Ray (``ray_num_cpus``
    cores, loopback only); ``"auto"`` or ``"head:6379"`` joins a running cluster. Each ClientApp
    instance (a Ray actor) holds ``num_cpus_per_client`` cores and ``num_gpus_per_client`` of a GPU
    (0.25 = four clients share one GPU). ``faults`` injects failures for tests:
    ``{partition_id or (round, partition_id): "raise" | "nan" | "shape" | "sleep"}`` (round
    ``fedlib.federated.SETUP`` = the FedGO exchange); ``keep_params`` keeps the global models after
    every round in ``FlowerReport.params``."""

    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    object_store_mb: int | None = None  # Ray's object store (client data live there); None: Ray's default
    round_timeout: float = 600.0
    faults: dict = field(default_factory=dict)
    sleep_s: float = 0.0
    keep_params: bool = False
    verbose: bool = False


@dataclass
class FlowerReport:
    """What the Flower run did besides the model: bytes, logged events, timings."""

    ledger: fl.CommLedger = field(default_factory=fl.CommLedger)
    wire: fl.CommLedger = field(default_factory=fl.CommLedger)  # Flower's serialised sizes
    events: list[dict] = field(default_factory=list)  # {"round", "row", "partition", "kind", "reason"}
    round_seconds: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0  # Ray start + node registration, before the first message
    params: list = field(default_factory=list)  # global models after every round (keep_params=True)

    def event(self, round_: int, kind: str, reason: str, row: int | None = None, partition: int | None = None):
        self.events.append({"round": round_, "row": row, "partition": partition, "kind": kind, "reason": reason})
        log.warning("round %s: client row %s (partition %s) %s: %s", round_, row, partition, kind, reason)


# ----------------------------------------------------------------------------------------------
# records
def to_record(params: Params) -> ArrayRecord:
    return ArrayRecord({n: Array(p.detach().cpu().contiguous()) for n, p in params.items()})


def from_record(record: ArrayRecord) -> Params:
    return {n: torch.from_numpy(np.array(a.numpy(), copy=True)) for n, a in record.items()}


def tensor_bytes(params: Params) -> int:
    """Payload bytes, as :func:`fedlib.federated.state_bytes` counts them (numel x itemsize)."""
    return fl.state_bytes(params)


def check_update(params: Params, template: Params) -> str | None:
    """Why a client's parameters must not be averaged in, or None: names, shapes, dtype, finiteness."""
    if set(params) != set(template):
        missing, extra = sorted(set(template) - set(params)), sorted(set(params) - set(template))
        return f"parameter names differ (missing {missing}, unexpected {extra})"
    for n, t in template.items():
        p = params[n]
        t = t.cpu() if t.device != p.device else t
        if tuple(p.shape) != tuple(t.shape):
            return f"{n} has shape {tuple(p.shape)}, expected {tuple(t.shape)}"
        if p.dtype != t.dtype:
            return f"{n} has dtype {p.dtype}, expected {t.dtype}"
        if not torch.isfinite(p).all():
            return f"{n} holds {int((~torch.isfinite(p)).sum())} non-finite values"
    return None


def _skip_seeds(state: bytes, skip: int) -> torch.Generator:
    """The round generator with the first ``skip`` client seeds drawn (see the module docstring)."""
    g = torch.Generator()
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    if skip:
        fl.client_generators(g, skip)
    return g


def _state(g: torch.Generator) -> bytes:
    return bytes(g.get_state().numpy().tobytes())


# ----------------------------------------------------------------------------------------------
# client side
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
    faults: dict = field(default_factory=dict)
    sleep_s: float = 0.0
    device: str = "cpu"  # "cuda" when the actors hold a GPU fraction


def _one_client(clients: fl.ClientData, row: int) -> fl.ClientData:
    n = int(clients.n_k[row])
    return fl.ClientData(clients.x[row:row + 1, :n], clients.y[row:row + 1, :n], clients.mask[row:row + 1, :n],
                         clients.n_k[row:row + 1])


def _inject(spec: ClientSpec, pid: int, params: Params, round_: int) -> Params:
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
    return params


def make_client_app(spec: ClientSpec, data_ref) -> ClientApp:
    """The ClientApp: local training, FedGO's discriminator, and an info query. ``data_ref`` is a Ray
    ObjectRef to the clients' :class:`~fedlib.federated.ClientData` (row i = one client's data)."""
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
                  batch_size=int(cfg["batch-size"]), generator=_skip_seeds(cfg["rng"], int(cfg["skip"])),
                  extras_fn=spec.extras_fn)
        if int(cfg["steps"]) > 0:
            kw["steps"] = int(cfg["steps"])
        else:
            kw["epochs"] = int(cfg["epochs"])
        w_k = fl.index_params(fl.local_train(model, start, clients, spec.loss_fn, **kw), 0)
        w_k = _inject(spec, pid, w_k, int(cfg["server-round"]))
        metrics = MetricRecord({"num-examples": int(clients.n_k[0]), "row": row})
        bits = int(cfg["bits"])
        if bits < 32:  # FedDM-quant: the packed quantised update is the payload
            q = C.quantize_params({n: w_k[n] - start[n] for n in start}, bits, str(cfg["scheme"]),
                                  str(cfg["rounding"]), _skip_seeds(cfg["rng"], int(cfg["skip"])))
            blob = C.encode(q)
            arrays = ArrayRecord({"payload": Array(np.frombuffer(blob, dtype=np.uint8).copy())})
        else:
            arrays = to_record(w_k)
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.train("discriminator")
    def discriminator(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        clients = _one_client(_get(data_ref), int(cfg["data-row"])).to(spec.device)
        G = fl.set_params(copy.deepcopy(spec.generator).to(spec.device), from_record(msg.content["generator"]))
        D = copy.deepcopy(spec.discriminator).to(spec.device)
        d = DS.train_discriminators(D, G, clients, epochs=int(cfg["epochs"]), lr=float(cfg["lr"]),
                                    momentum=float(cfg["momentum"]), batch_size=int(cfg["batch-size"]),
                                    generator=_skip_seeds(cfg["rng"], int(cfg["skip"])),
                                    init={n: p.to(spec.device) for n, p in from_record(msg.content["arrays"]).items()})
        d = _inject(spec, pid, fl.index_params(d, 0), fl.SETUP)
        return Message(RecordDict({"arrays": to_record(d), "metrics": MetricRecord({"row": int(cfg["row"])})}),
                       reply_to=msg)

    return app


# ----------------------------------------------------------------------------------------------
# server side: one federated exchange = one message per (row, client)
@dataclass
class Row:
    """One client task of a round: row index (its seed index too), the client's data row, the
    partition (node) that holds that data, and the model it starts from."""

    row: int
    data_row: int
    partition: int
    start: Params
    mu: float = 0.0  # FedProx's proximal weight for this task (0: FedAvg)
    quant: C.Quantizer | None = None  # FedDM-quant: the client sends w_k - w quantised and packed


class RowStrategy(Strategy):
    """A Flower Strategy whose round is a list of :class:`Row` tasks; ``aggregate_train`` validates the
    replies and hands the accepted client models to ``server_update`` (fedlib's pure functions).

    ``plan(round) -> (rows, config)`` says what to train; ``server_update(round, rows, local, accepted)``
    gets the client parameters stacked in row order (zeros where not accepted) and a bool mask."""

    def __init__(self, plan, server_update, template: Params, nodes: dict[int, int], report: FlowerReport,
                 generator: torch.Generator | None, message_type: str = MessageType.TRAIN,
                 ledger_item: str = "model"):
        self.plan, self.server_update, self.template = plan, server_update, template
        self.nodes = nodes  # partition-id -> node id
        self.report, self.generator = report, generator
        self.message_type, self.ledger_item = message_type, ledger_item
        self._rows: list[Row] = []
        self._sent: list[Message] = []
        self.updates: dict[int, Params] = {}  # quantised uplink: row -> the dequantised update, as received
        self.payload: dict[int, int] = {}     # quantised uplink: row -> bytes of the packed payload
        self._t0 = 0.0

    def summary(self) -> None:
        log.info("RowStrategy over %d nodes", len(self.nodes))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._t0 = time.perf_counter()
        rows, cfg = self.plan(server_round)
        self._rows = rows
        gen = self.generator if self.generator is not None else torch.Generator().manual_seed(server_round)
        rng = _state(gen)
        fl.client_generators(gen, len(rows))  # advance g exactly as local_train(generator=g) over all rows
        messages = []
        for r in rows:
            c = ConfigRecord({**cfg, "rng": rng, "skip": r.row, "row": r.row, "data-row": r.data_row,
                              "mu": float(r.mu), "server-round": server_round,
                              **({"bits": r.quant.bits, "scheme": r.quant.scheme, "rounding": r.quant.rounding}
                                 if r.quant is not None else {"bits": 32})})
            rec = to_record(r.start)
            messages.append(Message(RecordDict({"arrays": rec, "config": c}), message_type=self.message_type,
                                    dst_node_id=self.nodes[r.partition]))
            self.report.ledger.log(server_round, "down", self.ledger_item, tensor_bytes(r.start))
            self.report.wire.log(server_round, "down", self.ledger_item, rec.count_bytes())
        self._sent = messages
        return messages

    def _decode(self, msg: Message, row: Row, server_round: int) -> Params:
        rec = msg.content["arrays"]
        self.report.wire.log(server_round, "up", self.ledger_item, rec.count_bytes())
        if row.quant is not None:
            q = row.quant
            payload = rec["payload"].numpy()
            like = C.quantize_params({n: torch.zeros_like(p) for n, p in row.start.items()}, q.bits, q.scheme,
                                     q.rounding)
            blob = payload.tobytes()
            if payload.dtype != np.uint8 or len(blob) != C.payload_bytes(like):
                raise ValueError(f"quantised payload of {len(blob)} bytes ({payload.dtype}), expected "
                                 f"{C.payload_bytes(like)} uint8 bytes")
            self.report.ledger.log(server_round, "up", f"update {q.bits}-bit", len(blob))
            update = C.dequantize_params(C.decode(blob, like))
            self.updates[row.row], self.payload[row.row] = update, len(blob)
            return {n: row.start[n].cpu() + update[n] for n in row.start}
        params = from_record(rec)
        self.report.ledger.log(server_round, "up", self.ledger_item, tensor_bytes(params))
        return params

    def aggregate_train(self, server_round: int, replies):
        rows = {r.row: r for r in self._rows}
        self.updates, self.payload = {}, {}
        # the grid gives every sent message an id; an error reply names it (reply_to_message_id)
        row_of = {m.metadata.message_id: r.row for m, r in zip(self._sent, self._rows) if m.metadata.message_id}
        got: dict[int, Params] = {}
        for msg in replies:
            row = None
            if msg.has_error():
                row = row_of.get(msg.metadata.reply_to_message_id)
                self.report.event(server_round, "failed", _reason(msg.error.reason), row=row,
                                  partition=getattr(rows.get(row), "partition", None))
                continue
            try:
                row = int(msg.content["metrics"]["row"])
                if row not in rows or row in got:
                    raise ValueError(f"reply for row {row}, which was not asked for (or answered twice)")
                params = self._decode(msg, rows[row], server_round)
                bad = check_update(params, self.template)
                if bad is not None:
                    raise ValueError(bad)
            except Exception as ex:  # noqa: BLE001 - a malformed reply must never stop the round
                r = rows.get(row)
                self.report.event(server_round, "rejected", str(ex), row=row,
                                  partition=getattr(r, "partition", None))
                continue
            got[row] = params
        for r in self._rows:
            if r.row not in got and not any(e["row"] == r.row and e["round"] == server_round
                                            for e in self.report.events):
                self.report.event(server_round, "absent", "no valid reply (error or timeout); left out of "
                                  "the aggregation", row=r.row, partition=r.partition)
        order = [r.row for r in self._rows]
        accepted = torch.tensor([i in got for i in order])
        device = next(iter(self.template.values())).device
        local = fl.stack_params([{n: p.to(device) for n, p in got[i].items()} if i in got else
                                 {n: torch.zeros_like(p) for n, p in self.template.items()} for i in order])
        self.server_update(server_round, self._rows, local, accepted)
        self.report.round_seconds.append(time.perf_counter() - self._t0)
        return None, MetricRecord({"accepted": int(accepted.sum()), "rows": len(order)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def _reason(text: str, n: int = 300) -> str:
    """The useful part of a Flower error reason (Ray prefixes a long actor description)."""
    text = str(text)
    i = text.rfind("Message:")
    return (text[i:] if i >= 0 else text)[-n:].strip()


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 120.0) -> list[int]:
    t0 = time.time()
    while len(ids := list(grid.get_node_ids())) < n:
        if time.time() - t0 > timeout:
            raise TimeoutError(f"only {len(ids)} of {n} Flower nodes registered within {timeout}s")
        time.sleep(0.02)
    return ids


def _discover(grid: Grid, n: int, timeout: float) -> dict[int, int]:
    """partition-id -> node id, asked of every node (query.info)."""
    ids = _wait_for_nodes(grid, n)
    msgs = [Message(RecordDict(), message_type="query.info", dst_node_id=i) for i in ids]
    out = {}
    for m in grid.send_and_receive(msgs, timeout=timeout):
        if not m.has_error():
            out[int(m.content["info"]["partition-id"])] = m.metadata.src_node_id
    if len(out) != n:
        raise RuntimeError(f"{len(out)} of {n} Flower nodes answered the info query")
    return out


@contextmanager
def _ray(opts: FlowerOptions):
    import ray

    if not ray.is_initialized():
        from ray._private import ray_constants

        if opts.ray_address is None and "RAY_ADDRESS" not in os.environ and ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("ray was imported before fedlib.flower, so this local Ray may listen beyond loopback; "
                        "import fedlib.flower first or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray")
        kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=opts.verbose)
        address = opts.ray_address or os.environ.get("RAY_ADDRESS")
        if address is None:
            kw.update(num_cpus=opts.ray_num_cpus or os.cpu_count(), num_gpus=None if torch.cuda.is_available() else 0)
            if opts.object_store_mb:
                kw["object_store_memory"] = opts.object_store_mb * 2**20
        else:
            kw["address"] = address
        ray.init(**kw)
    try:
        yield ray
    finally:
        if ray.is_initialized():  # Flower's Ray backend normally shuts Ray down itself
            ray.shutdown()


def simulate(main: Callable[[Grid, dict[int, int]], None], spec: ClientSpec, clients: fl.ClientData, n_nodes: int,
             opts: FlowerOptions, report: FlowerReport) -> None:
    """Run ``main(grid, nodes)`` as a ServerApp against ``n_nodes`` ClientApps in Flower's simulation
    engine (Ray backend). ``clients`` go to Ray's object store once; node p serves partition p."""
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not opts.verbose:
        flwr_logger.setLevel(logging.ERROR)  # Flower logs every round at INFO; client errors stay
    t0 = time.perf_counter()
    errors: list[BaseException] = []
    try:
        with _ray(opts) as ray:
            ref = ray.put(clients.to("cpu"))
            server = ServerApp()

            @server.main()
            def _main(grid: Grid, context: Context) -> None:
                try:
                    nodes = _discover(grid, n_nodes, opts.round_timeout)
                    report.setup_seconds = time.perf_counter() - t0
                    main(grid, nodes)
                except BaseException as ex:  # surfaced below: Flower only logs ServerApp errors
                    errors.append(ex)
                    raise

            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                run_simulation(server, make_client_app(spec, ref), num_supernodes=n_nodes,
                               backend_config={"client_resources": {"num_cpus": opts.num_cpus_per_client,
                                                                    "num_gpus": opts.num_gpus_per_client}},
                               verbose_logging=opts.verbose)
    finally:
        flwr_logger.setLevel(level)
    if errors:
        raise errors[0]


def _rounds(grid: Grid, strategy: RowStrategy, rounds: int, timeout: float, progress=None) -> None:
    """Flower's own round loop (Strategy.start), with no client-side evaluation."""
    it = range(rounds) if progress is None else progress(range(rounds))
    for r in it:
        replies = grid.send_and_receive(strategy.configure_train(r + 1, ArrayRecord(), ConfigRecord(), grid),
                                        timeout=timeout)
        strategy.aggregate_train(r + 1, replies)


# ----------------------------------------------------------------------------------------------
# FedGO's one-off exchange and notebook 01's driver
@dataclass
class FedGOExchange:
    """FedGO protocol steps 1-2 over Flower: G (trained on the server) goes down to every client once,
    each client trains D_k from ``init`` for ``epochs`` epochs (:func:`fedlib.distill.train_discriminators`
    on its own data) and sends it up once; the server computes ``disc_logits`` on every setup's server
    data. Same arguments as ``train_discriminators``; ``generator`` is consumed as there, once per setup,
    before the rounds. ``G`` may be a list with one generator per setup (e.g. one GAN per seed, as
    :func:`fedlib.distill.build_setups` trains them)."""

    D: nn.Module
    G: nn.Module | list
    epochs: int
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    init: Params | None = None
    generator: torch.Generator | None = None


def run_rounds(model: nn.Module, setups: list, methods, *, rounds: int, local_epochs: int = 1, lr: float = 0.05,
               momentum: float = 0.9, batch_size: int = 32, mu: float = 0.01, distill_steps: int = 50,
               distill_lr: float = 1e-3, distill_batch: int = 64, temperature: float = 1.0,
               pseudo_label_mode: str = "prob", dense_steps: int | None = None,
               generator: torch.Generator | None = None, init: Params | None = None, progress=None,
               chunk_size: int | str | None = "auto", predict_batch: int = 1024,
               exchange: FedGOExchange | None = None, options: FlowerOptions | None = None) -> DS.RoundsResult:
    """:func:`fedlib.distill.run_rounds` on Flower: same arguments, same :class:`~fedlib.distill.RoundsResult`
    (with ``.flower``: a :class:`FlowerReport`; with ``exchange``, ``setups[s].disc_logits`` are set
    from the discriminators the clients uploaded). Node k is client k of every setup and method."""
    opts = options or FlowerOptions()
    st = DS.prepare_rounds(model, setups, methods, rounds, init)
    methods, S, M, K, call, init, glob = st.methods, st.S, st.M, st.K, st.call, st.init, st.glob
    n_classes, acc, tacc, distil = st.n_classes, st.acc, st.tacc, st.distil
    data = fl.concat_clients([s.clients for s in setups])  # data row s*K + k
    report = FlowerReport()
    disc_ok: dict[int, Tensor] = {}  # setup -> which clients' discriminators arrived (FedGO exchange)
    g_arch = (exchange.G[0] if isinstance(exchange.G, (list, tuple)) else exchange.G) if exchange else None
    spec = ClientSpec(model, discriminator=exchange.D if exchange else None, generator=g_arch,
                      faults=dict(opts.faults), sleep_s=opts.sleep_s,
                      device="cuda" if opts.num_gpus_per_client > 0 else "cpu")

    def plan(r):
        rows = [Row(e * K + k, (e // M) * K + k, k, fl.index_params(glob, e),
                    mu if methods[e % M] == "fedprox" else 0.0) for e in range(S * M) for k in range(K)]
        cfg = {"lr": lr, "momentum": momentum, "batch-size": batch_size, "epochs": local_epochs, "steps": 0}
        return rows, cfg

    def server_update(r, rows, local, accepted):
        n_k = torch.cat([data.n_k[(e // M) * K:(e // M + 1) * K] for e in range(S * M)])
        xs, qs, entries = [], [], []
        for e in range(S * M):
            sl = slice(e * K, (e + 1) * K)
            ok = accepted[sl]
            if not ok.any():
                report.event(r, "group-kept", f"no client of setup {e // M} method {methods[e % M]!r} replied; "
                             "its global model is unchanged")
                continue
            idx = torch.nonzero(ok).squeeze(1) + e * K
            k_params = fl.index_params(local, idx)
            new = fl.fedavg(k_params, n_k[idx])
            for n in glob:
                glob[n][e] = new[n]
            j, s = e % M, e // M
            if methods[j] == "dense":  # server-side, data-free (papers.md 1.3), as in-process
                setup = setups[s]
                if setup.dense_generator is None:
                    raise ValueError("method 'dense' needs Setup.dense_generator (a label-conditioned G)")
                new = DS.dense_distill(model, fl.index_params(glob, e), k_params, setup.dense_generator, n_classes,
                                       steps=dense_steps or distill_steps, batch_size=distill_batch, lr=distill_lr,
                                       temperature=temperature, generator=generator)
                for n in glob:
                    glob[n][e] = new[n]
            if j in distil:
                setup = setups[s]
                logits = fl.predict(call, k_params, setup.server_x, predict_batch, stacked=True)
                if methods[j] in ("fedgo", "dafkd") and s in disc_ok:
                    ok = ok & disc_ok[s]  # a client without a discriminator has no FedGO weight
                    k_params = fl.index_params(local, torch.nonzero(ok).squeeze(1) + e * K)
                    logits = fl.predict(call, k_params, setup.server_x, predict_batch, stacked=True)
                keep = torch.nonzero(ok).squeeze(1)
                dl = setup.disc_logits[keep] if setup.disc_logits is not None else None
                q = DS.ensemble_targets(methods[j], logits, setup.clients.n_k[keep], dl, pseudo_label_mode,
                                        temperature)
                if setup.server_y is not None:
                    tacc[s, j, r - 1] = (q.argmax(-1) == setup.server_y).float().mean().cpu()
                xs.append(setup.server_x)
                qs.append(q)
                entries.append(e)
        DS.distil_into(model, glob, entries, xs, qs, steps=distill_steps, lr=distill_lr, batch_size=distill_batch,
                       temperature=temperature, generator=generator, chunk_size=chunk_size)
        DS.record_test_accuracy(call, glob, setups, M, acc, r - 1, predict_batch)
        if opts.keep_params:
            report.params.append({n: p.clone() for n, p in glob.items()})

    def main(grid: Grid, nodes: dict[int, int]) -> None:
        if exchange is not None:
            disc_ok.update(_fedgo_exchange(grid, nodes, exchange, setups, data, K, report, opts))
        strategy = RowStrategy(plan, server_update, init, nodes, report, generator)
        _rounds(grid, strategy, rounds, opts.round_timeout, progress)

    simulate(main, spec, data, K, opts, report)
    res = DS.RoundsResult(methods, acc, tacc, glob)
    res.flower = report
    return res


def _fedgo_exchange(grid: Grid, nodes, ex: FedGOExchange, setups, data: fl.ClientData, K: int,
                    report: FlowerReport, opts: FlowerOptions) -> dict[int, Tensor]:
    """G down once, D_k up once, per setup; sets ``setups[s].disc_logits`` from the accepted D_k and
    returns, per setup, which clients' discriminators arrived."""
    d_init = ex.init if ex.init is not None else fl.get_params(ex.D)
    arrived = {}
    for s, setup in enumerate(setups):
        g_params = fl.get_params(ex.G[s] if isinstance(ex.G, (list, tuple)) else ex.G)
        g_rec = to_record(g_params)
        rng = _state(ex.generator) if ex.generator is not None else _state(torch.Generator().manual_seed(s))
        if ex.generator is not None:
            fl.client_generators(ex.generator, K)  # as train_discriminators(generator=g) over K clients
        msgs = []
        for k in range(K):
            cfg = ConfigRecord({"epochs": ex.epochs, "lr": ex.lr, "momentum": ex.momentum, "batch-size": ex.batch_size,
                                "rng": rng, "skip": k, "row": k, "data-row": s * K + k})
            msgs.append(Message(RecordDict({"arrays": to_record(d_init), "generator": g_rec, "config": cfg}),
                                message_type="train.discriminator", dst_node_id=nodes[k]))
            report.ledger.log(fl.SETUP, "down", "generator", tensor_bytes(g_params))
            report.wire.log(fl.SETUP, "down", "generator", g_rec.count_bytes())
        got = {}
        for m in grid.send_and_receive(msgs, timeout=opts.round_timeout):
            if m.has_error():
                report.event(fl.SETUP, "failed", _reason(m.error.reason))
                continue
            k = int(m.content["metrics"]["row"])
            p = from_record(m.content["arrays"])
            report.wire.log(fl.SETUP, "up", "discriminator", m.content["arrays"].count_bytes())
            report.ledger.log(fl.SETUP, "up", "discriminator", tensor_bytes(p))
            bad = check_update(p, d_init)
            if bad:
                report.event(fl.SETUP, "rejected", bad, row=k, partition=k)
                continue
            got[k] = p
        # a client without a discriminator is left out of the FedGO ensemble (its logits row is a
        # placeholder from D's init, never used)
        dev = next(iter(d_init.values())).device
        stacked = fl.stack_params([{n: v.to(dev) for n, v in got.get(k, d_init).items()} for k in range(K)])
        setup.disc_logits = DS.discriminator_logits(ex.D, stacked, setup.server_x)
        for k in range(K):
            if k not in got:
                report.event(fl.SETUP, "absent", "no discriminator: left out of the FedGO ensemble", row=k,
                             partition=k)
        arrived[s] = torch.tensor([k in got for k in range(K)])
    return arrived


# ----------------------------------------------------------------------------------------------
# notebook 02's driver: FedDM
def run_feddm(denoiser, groups: list, rounds: int, *, local_steps: int, batch_size: int, lr: float,
              momentum: float = 0.9, eval_rounds=(), evaluate=None, seed: int = 0, progress: bool = True,
              chunk_size: int | None = None, options: FlowerOptions | None = None) -> list[dict]:
    """:func:`fedlib.feddm.run_feddm` on Flower: same arguments, same history rows, groups updated in
    place (``params``, ``ledger``). Every federated group's client k is node k; quant variants send their
    update packed (:func:`fedlib.compression.encode`) and the server decodes it from those bytes alone.
    ``central`` groups train on the server, as in-process. Not here: quantised downlink
    (``down_bits < 32``). With ``rounding="nearest"`` the random numbers match the in-process run (with
    stochastic rounding each client draws its rounding noise from its own seed instead)."""
    from tqdm.auto import tqdm

    from . import feddm as FD

    opts = options or FlowerOptions()
    fed = [g for g in groups if not g.variant.central]
    central = [g for g in groups if g.variant.central]
    bad = [g.label for g in fed if g.variant.down_bits < 32]
    if bad:
        raise ValueError(f"groups {bad} quantise the downlink (down_bits < 32), which the Flower backend does not "
                         "send yet; allowed: down_bits=32. Use backend='inprocess' for them")
    if not fed:
        raise ValueError("no federated group to run on Flower; allowed: at least one non-central variant")
    K = fed[0].clients.n_clients
    if any(g.clients.n_clients != K for g in fed):
        raise ValueError("every federated group must have the same number of clients")
    # rows in the order in which feddm_round trains them: by mu (first appearance), then group, then client
    by_mu: dict[float, list] = {}
    for g in fed:
        by_mu.setdefault(g.variant.mu, []).append(g)
    order = [g for gs in by_mu.values() for g in gs]
    data = fl.concat_clients([g.clients for g in order])  # data row i*K + k: group order[i], client k
    gen = torch.Generator().manual_seed(seed)
    net = denoiser.net
    report = FlowerReport()
    spec = ClientSpec(net, loss_fn=FD.diffusion_client_loss(denoiser), extras_fn=FD.noise_extras(denoiser.process),
                      faults=dict(opts.faults), sleep_s=opts.sleep_s,
                      device="cuda" if opts.num_gpus_per_client > 0 else "cpu")
    history: list[dict] = []
    holder: dict = {}

    def plan(r):
        rows = []
        for i, g in enumerate(order):
            v = g.variant
            q = C.Quantizer(v.bits, v.scheme, v.rounding) if v.bits < 32 else None
            rows += [Row(i * K + k, i * K + k, k, g.params, float(v.mu), q) for k in range(K)]
        return rows, {"lr": lr, "momentum": momentum, "batch-size": batch_size, "epochs": 0, "steps": local_steps}

    def server_update(r, rows, local, accepted):
        st = holder["strategy"]
        for i, g in enumerate(order):
            v, sl = g.variant, slice(i * K, (i + 1) * K)
            ok = torch.nonzero(accepted[sl]).squeeze(1)
            model_bytes = C.float32_bytes(g.params)
            g.ledger.log(r, "down", "model", model_bytes, copies=K)
            if len(ok) == 0:
                report.event(r, "group-kept", f"no client of {g.label!r} replied; its model is unchanged")
                continue
            n_k = g.clients.n_k[ok]
            if v.bits < 32:
                rows_ok = [i * K + int(k) for k in ok]
                received = fl.stack_params([st.updates[j] for j in rows_ok])
                mean_update = fl.fedavg(received, n_k)
                g.params = {n: g.params[n] + mean_update[n].to(g.params[n].device) for n in g.params}
                for j in rows_ok:
                    g.ledger.log(r, "up", f"update {v.bits}-bit", st.payload[j])
            else:
                g.params = fl.fedavg(fl.index_params(local, ok + i * K), n_k)
                g.ledger.log(r, "up", "model", model_bytes, copies=len(ok))
        if central:  # the centrally trained reference, on the server, as in feddm_round
            w = fl.local_train(net, FD._stack([g.params for g in central]),
                               fl.concat_clients([g.clients for g in central]), FD.diffusion_client_loss(denoiser),
                               steps=local_steps, lr=lr, momentum=momentum,
                               batch_size=batch_size * central[0].batch_scale, generator=gen,
                               extras_fn=FD.noise_extras(denoiser.process), chunk_size=chunk_size)
            for j, g in enumerate(central):
                g.params = {n: p[j] for n, p in w.items()}
        if evaluate is not None and r in set(eval_rounds):
            for g, m in zip(groups, evaluate(groups)):
                history.append({"variant": g.variant.name, "kind": g.variant.kind, "partition": g.partition,
                                "seed": g.seed, "round": r, "bytes_up": g.ledger.total("up"),
                                "bytes_down": g.ledger.total("down"), **m})

    def main(grid: Grid, nodes: dict[int, int]) -> None:
        holder["strategy"] = st = RowStrategy(plan, server_update, fed[0].params, nodes, report, gen)
        _rounds(grid, st, rounds, opts.round_timeout,
                (lambda it: tqdm(it, desc="FedDM rounds (Flower)")) if progress else None)

    simulate(main, spec, data, K, opts, report)
    holder.clear()
    run_feddm.last_report = report  # the FlowerReport of the latest run (history rows keep their shape)
    return history
