"""Strategies: one message per client task, replies validated against the messages sent, and the
library's own server step. As Flower's ``FedProx`` overrides only ``configure_train``, the strategies
here override only what differs: their tasks and their server step (FedLGD's also a second exchange per
round, in :meth:`RoundStrategy.finish_round`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import distill
from .. import federated as fl
from .. import feddm
from .. import fedlgd as lgd
from ..condense import SyntheticSet
from ..compression import Quantizer
from .records import FlowerReport, Params, check_update, from_record, log, prefixed, quantizer_record, reason, \
    rng_state, tensor_bytes, to_record, unprefixed


@dataclass
class Task:
    """One client task of a round: its row (also its seed index), the data row of the client, the
    partition (node) that holds that data, the model it starts from, FedProx's mu, the uplink
    quantiser (None: the float32 model comes back), and the payload of its method's client term
    (:class:`fedlib.distill.ClientTerm` named ``term``; None: nothing besides the model)."""

    row: int
    data_row: int
    partition: int
    start: Params
    mu: float = 0.0
    quantizer: Quantizer | None = None
    payload: Params | None = None
    term: str | None = None


# A reply whose update norm exceeds this many times the median of the round's accepted replies is refused.
# Healthy clients differ by their data sizes (epochs over 2 to hundreds of samples, with momentum): tens of
# times at most; a diverged one by many orders of magnitude.
NORM_FACTOR = 1000.0


def distance(params: Params, start: Params | None = None) -> float:
    """||params - start|| over every tensor (``start`` None: ||params||), in float64: a float32 sum of
    squares overflows at values of 1e20."""
    def sq(n, p):
        d = p.detach().cpu().double() - (0.0 if start is None else start[n].detach().cpu().double())
        return float((d * d).sum())
    return math.sqrt(sum(sq(n, p) for n, p in params.items()))


def collect_replies(sent: list[Message], tasks: list, replies, decode, template: Params, report: FlowerReport,
                    round_: int, update_norm=None) -> dict[int, Params]:
    """The accepted replies of one exchange, by task row. A reply is matched to the message it answers
    (its ``reply_to`` id), never to what the client says about itself, and each message counts once: its
    first reply, error or not, decides; later ones are logged as duplicates and ignored. A reply to no
    message sent here, an error, a row claim that contradicts the message, missing or malformed content,
    parameters that fail :func:`check_update`, and an update whose norm is not finite or beyond
    ``NORM_FACTOR`` times the median of the accepted replies' are rejected and logged (the aggregation
    then renormalises over the rest). ``update_norm(params, task)``: the norm of what the client changed
    (default: the distance of the returned model from ``task.start``). Tasks without an accepted reply
    are logged as absent. ``template`` None: ``decode`` checks the content itself (replies of varying shapes)."""
    task_of = {m.metadata.message_id: t for m, t in zip(sent, tasks) if m.metadata.message_id}
    got: dict[int, Params] = {}
    answered: set[int] = set()
    for msg in replies:
        task = task_of.get(msg.metadata.reply_to_message_id)
        if task is None:
            report.event(round_, "rejected", f"a reply to message {msg.metadata.reply_to_message_id!r}, which this "
                         "exchange did not send")
            continue
        if task.row in answered:
            report.event(round_, "rejected", "a second reply to the same message; the first one counts",
                         row=task.row, partition=task.partition)
            continue
        answered.add(task.row)
        if msg.has_error():
            report.event(round_, "failed", reason(msg.error.reason), row=task.row, partition=task.partition)
            continue
        try:
            if "arrays" not in msg.content or "metrics" not in msg.content:
                raise ValueError(f"the reply lacks {'arrays' if 'arrays' not in msg.content else 'metrics'}")
            claimed = msg.content["metrics"].get("row")
            if claimed is not None and int(claimed) != task.row:
                raise ValueError(f"the reply claims row {int(claimed)} but answers the message sent for row {task.row}")
            params = decode(msg, task)
            bad = check_update(params, template) if template is not None else None
            if bad is not None:
                raise ValueError(bad)
        except Exception as ex:  # noqa: BLE001 - a malformed reply must never stop the round
            report.event(round_, "rejected", str(ex), row=task.row, partition=task.partition)
            continue
        got[task.row] = params
    _refuse_outlying_norms(got, {t.row: t for t in tasks}, update_norm or (lambda p, t: distance(p, t.start)),
                           report, round_)
    for t in tasks:
        if t.row not in answered:
            report.event(round_, "absent", "no reply (error or timeout); left out of the aggregation", row=t.row,
                         partition=t.partition)
    return got


def _refuse_outlying_norms(got: dict[int, Params], task: dict, update_norm, report: FlowerReport, round_: int):
    """Drop from ``got`` the replies whose update norm is not finite or beyond ``NORM_FACTOR`` x the
    (lower) median of all accepted ones: finite values far beyond the others' would otherwise dominate
    the average. The lower median, so that of two replies the sane one is the reference."""
    norms = {r: update_norm(p, task[r]) for r, p in got.items()}
    finite = sorted(v for v in norms.values() if math.isfinite(v))
    median = finite[(len(finite) - 1) // 2] if finite else math.nan
    for r, v in norms.items():
        if not math.isfinite(v):
            why = f"its update norm is {v}; allowed: a finite norm"
        elif median > 0 and v > NORM_FACTOR * median:
            why = (f"its update norm {v:.3g} is {v / median:.3g} x the median {median:.3g} of this round's "
                   f"replies; allowed: at most {NORM_FACTOR:g} x (a diverged client)")
        else:
            continue
        del got[r]
        report.event(round_, "rejected", why, row=r, partition=task[r].partition)


class RoundStrategy(Strategy):
    """A round = one ``train`` message per client :class:`Task`; the replies are validated
    (:func:`collect_replies`) and the accepted client models, stacked in task order (zeros where not
    accepted) with a bool mask, go to :meth:`server_step`. Subclasses define :meth:`tasks` and
    :meth:`server_step` (and :meth:`decode` where the reply is not a float32 model)."""

    ledger_item = "model"
    message_type = MessageType.TRAIN

    def __init__(self, template: Params, nodes: dict[int, int], report: FlowerReport,
                 generator: torch.Generator | None):
        self.template, self.nodes, self.report, self.generator = template, nodes, report, generator
        self._tasks: list[Task] = []
        self._sent: list[Message] = []
        self._t0 = 0.0

    # -- what differs -----------------------------------------------------------------------------
    def tasks(self, server_round: int) -> tuple[list[Task], dict]:
        raise NotImplementedError

    def server_step(self, server_round: int, tasks: list[Task], local: Params, accepted: torch.Tensor) -> None:
        raise NotImplementedError

    def decode(self, msg: Message, task: Task) -> Params:
        rec = msg.content["arrays"]
        params = from_record(rec)
        self.report.ledger.log(self._round, "up", self.ledger_item, tensor_bytes(params))
        self.report.wire.log(self._round, "up", self.ledger_item, rec.count_bytes())
        return params

    def update_norm(self, params: Params, task: Task) -> float:
        """How far the client moved: the distance of its model from the one it started from."""
        return distance(params, task.start)

    def finish_round(self, server_round: int, grid: Grid, timeout: float) -> None:
        """What the round does after the server step (nothing; FedLGD asks for gradients here)."""

    # -- Flower's Strategy ------------------------------------------------------------------------
    def summary(self) -> None:
        log.info("%s over %d nodes", type(self).__name__, len(self.nodes))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._t0, self._round = time.perf_counter(), server_round
        tasks, cfg = self.tasks(server_round)
        self._tasks = tasks
        gen = self.generator if self.generator is not None else torch.Generator().manual_seed(server_round)
        rng = rng_state(gen)
        fl.client_generators(gen, len(tasks))  # advance g exactly as local_train(generator=g) over all tasks
        messages = []
        for t in tasks:
            c = ConfigRecord({**cfg, "rng": rng, "skip": t.row, "row": t.row, "data-row": t.data_row,
                              "mu": float(t.mu), "server-round": server_round})
            rec = to_record(t.start)
            content = {"arrays": rec, "config": c}
            if t.quantizer is not None:
                content["quantizer"] = quantizer_record(t.quantizer)
            if t.payload is not None:
                c["term"] = t.term
                content["payload"] = payload = to_record(t.payload)
                self.report.ledger.log(server_round, "down", f"{t.term} payload", tensor_bytes(t.payload))
                self.report.wire.log(server_round, "down", f"{t.term} payload", payload.count_bytes())
            messages.append(Message(RecordDict(content), message_type=self.message_type,
                                    dst_node_id=self.nodes[t.partition]))
            self.report.ledger.log(server_round, "down", self.ledger_item, tensor_bytes(t.start))
            self.report.wire.log(server_round, "down", self.ledger_item, rec.count_bytes())
        self._sent = messages
        return messages

    def aggregate_train(self, server_round: int, replies):
        got = collect_replies(self._sent, self._tasks, replies, self.decode, self.template, self.report, server_round,
                              self.update_norm)
        accepted = torch.tensor([t.row in got for t in self._tasks])
        device = next(iter(self.template.values())).device
        local = fl.stack_params([{n: p.to(device) for n, p in got[t.row].items()} if t.row in got else
                                 {n: torch.zeros_like(p) for n, p in self.template.items()} for t in self._tasks])
        self.server_step(server_round, self._tasks, local, accepted)
        self.report.round_seconds.append(time.perf_counter() - self._t0)
        return None, MetricRecord({"accepted": int(accepted.sum()), "rows": len(self._tasks)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


class DistillStrategy(RoundStrategy):
    """Notebook 01's methods: a task per (setup, method, client), node k = client k of every setup,
    with its method's client-term payload (:func:`fedlib.distill.client_payloads`); the server step is
    :func:`fedlib.distill.server_step`."""

    def __init__(self, model, st: distill.RoundsState, setups: list, server: distill.ServerConfig, client: dict,
                 nodes, report, with_disc: dict, keep_params: bool = False):
        super().__init__(st.init, nodes, report, server.generator)
        self.model, self.st, self.setups, self.server, self.client = model, st, setups, server, client
        self.with_disc, self.keep_params = with_disc, keep_params
        self.mu = distill.client_mu(st, client["mu"])

    def tasks(self, server_round):
        st = self.st
        payloads = distill.client_payloads(st, self.server)
        terms = [distill.get_method(st.methods[e % st.M]).client for e in range(st.S * st.M)]
        tasks = [Task(e * st.K + k, (e // st.M) * st.K + k, k, fl.index_params(st.glob, e), float(self.mu[e * st.K + k]),
                      payload=payloads[e], term=terms[e].name if payloads[e] is not None else None)
                 for e in range(st.S * st.M) for k in range(st.K)]
        c = self.client
        return tasks, {"lr": c["lr"], "momentum": c["momentum"], "batch-size": c["batch_size"],
                       "epochs": c["local_epochs"], "steps": 0}

    def server_step(self, server_round, tasks, local, accepted):
        distill.server_step(self.model, self.st, self.setups, server_round - 1, local, accepted, self.server,
                            self.with_disc, self.report.event)
        if self.keep_params:
            self.report.params.append({n: p.clone() for n, p in self.st.glob.items()})


class FedDMStrategy(RoundStrategy):
    """FedDM: a task per (federated group, client) in the order in which the in-process round trains
    them (by mu, then group, then client); quantised groups send their packed update, which
    :meth:`decode` turns back into the update with :func:`fedlib.feddm.receive`; the server step is
    :func:`fedlib.feddm.aggregate` per group, :func:`~fedlib.feddm.train_central`,
    :func:`~fedlib.feddm.record_history`."""

    def __init__(self, denoiser, groups: list, order: list, config: dict, nodes, report, generator, history: list,
                 eval_rounds, evaluate, chunk_size=None):
        super().__init__(order[0].params, nodes, report, generator)
        self.denoiser, self.groups, self.order, self.config = denoiser, groups, order, config
        self.history, self.eval_rounds, self.evaluate, self.chunk_size = history, eval_rounds, evaluate, chunk_size
        self.sizes: dict[int, int] = {}
        self.K = order[0].clients.n_clients

    def tasks(self, server_round):
        self.sizes = {}
        tasks = [Task(i * self.K + k, i * self.K + k, k, g.params, float(g.variant.mu), g.variant.uplink)
                 for i, g in enumerate(self.order) for k in range(self.K)]
        c = self.config
        return tasks, {"lr": c["lr"], "momentum": c["momentum"], "batch-size": c["batch_size"], "epochs": 0,
                       "steps": c["local_steps"]}

    def decode(self, msg, task):
        if task.quantizer is None:
            params = super().decode(msg, task)
            self.sizes[task.row] = tensor_bytes(params)
            return params
        rec = msg.content["arrays"]
        payload = rec["payload"].numpy()
        if payload.dtype != np.uint8:
            raise ValueError(f"quantised payload has dtype {payload.dtype}, expected uint8")
        self.report.wire.log(self._round, "up", f"update {task.quantizer.bits}-bit", rec.count_bytes())
        up = feddm.Upload(len(payload), blob=payload.tobytes())
        update = feddm.receive(up, task.start, task.quantizer)
        self.report.ledger.log(self._round, "up", f"update {task.quantizer.bits}-bit", up.n_bytes)
        self.sizes[task.row] = up.n_bytes
        return {n: v.cpu() for n, v in update.items()}

    def update_norm(self, params, task):
        # a quantised group's reply is already the update w_k - start
        return distance(params) if task.quantizer is not None else super().update_norm(params, task)

    def server_step(self, server_round, tasks, local, accepted):
        K = self.K
        for i, g in enumerate(self.order):
            rows = range(i * K, (i + 1) * K)
            received = [fl.index_params(local, r) if accepted[r] else None for r in rows]
            feddm.aggregate(g, server_round, received, [self.sizes.get(r, 0) for r in rows],
                            accepted[i * K:(i + 1) * K].tolist(), on_event=self.report.event)
        c = self.config
        feddm.train_central(self.denoiser, [g for g in self.groups if g.variant.central], local_steps=c["local_steps"],
                            batch_size=c["batch_size"], lr=c["lr"], momentum=c["momentum"], generator=self.generator,
                            chunk_size=self.chunk_size)
        feddm.record_history(self.history, self.groups, server_round, self.eval_rounds, self.evaluate)


class FedLGDStrategy(RoundStrategy):
    """FedLGD with FedAvg and FedProx on the same local virtual sets (:mod:`fedlib.fedlgd`); node k is client
    k. A round is two exchanges with every client: ``train.fedlgd`` sends the three global models (one record,
    ``method/name``) and the global virtual set G (payload ``anchors``) and takes back the three client
    models, validated together (a bad one leaves the client out of the round's three averages);
    ``query.fedlgd`` sends FedLGD's new global model and takes back the per-class gradients of the client's
    local virtual set with its class counts. The server side is :class:`fedlib.fedlgd.FedLGDServer`; the
    local virtual sets never leave the nodes (but for :meth:`local_sets`, the run's report)."""

    message_type = "train.fedlgd"

    def __init__(self, server: lgd.FedLGDServer, cfg: lgd.FedLGDConfig, n_k: torch.Tensor, tests, n_classes: int,
                 nodes, report, keep_params: bool = False):
        super().__init__(prefixed(server.w), nodes, report, None)
        self.server, self.cfg, self.n_k, self.tests, self.n_classes = server, cfg, n_k, tests, n_classes
        self.keep_params = keep_params
        self.K = len(n_k)
        self.grad_template = {**{f"grad/{n}": torch.zeros(n_classes, *v.shape) for n, v in server.w["FedLGD"].items()},
                              "counts": torch.zeros(n_classes)}

    def tasks(self, server_round):
        r = server_round - 1
        self.generator = lgd.round_generator(self.cfg, r)  # every client's seeds of this round (local_train's)
        start, anchors = prefixed(self.server.w), {"x": self.server.x_g, "y": self.server.y_g}
        return ([Task(k, k, k, start, payload=anchors, term="anchors") for k in range(self.K)],
                {"fedlgd-round": r, "clients": self.K})

    def server_step(self, server_round, tasks, local, accepted):
        rows = torch.nonzero(accepted).flatten()
        models = {m: {n: v[rows.to(v.device)] for n, v in w.items()} for m, w in unprefixed(local).items()}
        baselines = {n: torch.cat([models["FedAvg"][n], models["FedProx"][n]]) for n in models["FedAvg"]}
        self.server.aggregate(baselines, models["FedLGD"], self.n_k[rows])

    def _query(self, server_round: int, what: str, params: Params | None, item: str):
        """One ``query.fedlgd`` message per client; returns (messages, tasks)."""
        tasks = [Task(k, k, k, self.grad_template) for k in range(self.K)]
        messages = []
        for t in tasks:
            content = {"config": ConfigRecord({"what": what, "row": t.row, "data-row": t.data_row,
                                               "server-round": server_round})}
            if params is not None:
                content["arrays"] = rec = to_record(params)
                self.report.ledger.log(server_round, "down", item, tensor_bytes(params))
                self.report.wire.log(server_round, "down", item, rec.count_bytes())
            messages.append(Message(RecordDict(content), message_type="query.fedlgd", dst_node_id=self.nodes[t.partition]))
        return messages, tasks

    def _decode(self, server_round: int, item: str):
        def decode(msg, task):
            rec = msg.content["arrays"]
            params = from_record(rec)
            self.report.ledger.log(server_round, "up", item, tensor_bytes(params))
            self.report.wire.log(server_round, "up", item, rec.count_bytes())
            return params
        return decode

    def finish_round(self, server_round, grid, timeout):
        """Federated gradient matching: the clients' per-class gradients at the new FedLGD model, validated
        (a client whose reply fails is left out of G's update), then G's update and the test accuracy."""
        self._t0 = time.perf_counter()
        sent, tasks = self._query(server_round, "gradients", self.server.w["FedLGD"], "model (gradient query)")
        decode = self._decode(server_round, "class gradients")

        def checked(msg, task):
            params = decode(msg, task)
            counts = params.get("counts")
            if counts is not None and counts.shape == (self.n_classes,) and bool((counts < 0).any()):
                raise ValueError(f"class counts {counts.tolist()} hold a negative count; allowed: counts >= 0")
            return params

        got = collect_replies(sent, tasks, grid.send_and_receive(sent, timeout=timeout), checked, self.grad_template,
                              self.report, server_round)
        device = self.server.x_g.device
        parts = [({n[len("grad/"):]: v.to(device) for n, v in got[k].items() if n.startswith("grad/")},
                  got[k]["counts"].to(device)) for k in sorted(got)]
        self.server.gradient_matching(parts, self.n_classes, self.cfg)
        self.server.evaluate(self.tests)
        if self.keep_params:  # the three global models and G after every round
            self.report.params.append({**{m: dict(w) for m, w in self.server.w.items()}, "global": self.server.x_g.clone()})
        self.report.round_seconds[-1] += time.perf_counter() - self._t0

    def local_sets(self, grid: Grid, timeout: float) -> tuple[list, list]:
        """For the run's report only (not FedLGD's protocol): every client's initial and current local
        virtual set (None for a client that sent none), logged under their own ledger item."""
        last = len(self.report.round_seconds)
        sent, tasks = self._query(last, "sets", None, "")
        decode = self._decode(last, "local sets (report, not FedLGD's protocol)")

        def checked(msg, task):
            p = decode(msg, task)
            for w in ("initial", "current"):
                x, y = p[f"{w}.x"], p[f"{w}.y"]
                if x.shape[0] != y.shape[0] or not torch.isfinite(x).all() or y.dtype != torch.int64:
                    raise ValueError(f"{w} set: {tuple(x.shape)} images, {tuple(y.shape)} labels of {y.dtype}")
            return p

        got = collect_replies(sent, tasks, grid.send_and_receive(sent, timeout=timeout), checked, None, self.report,
                              last, update_norm=lambda p, t: 0.0)
        sets = {w: [SyntheticSet(got[k][f"{w}.x"], got[k][f"{w}.y"], "dm", self.cfg.seed) if k in got else None
                    for k in range(self.K)] for w in ("initial", "current")}
        return sets["initial"], sets["current"]
