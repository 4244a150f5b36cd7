"""Flower's simulation engine on Ray, and the drivers :mod:`fedlib.backends` hands the core for ``backend="flower"``:
:func:`run_rounds` (notebook 01's methods, with FedGO's one-off exchange), :func:`run_feddm` and
:func:`run_fedlgd`."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn

from .. import distill
from .. import federated as fl
from .. import feddm
from .. import fedgo
from .. import fedlgd as lgd
from .client import ClientSpec, make_client_app
from .records import FlowerReport, Params, from_record, log, rng_state, tensor_bytes, to_record
from .strategy import DistillStrategy, FedDMStrategy, FedLGDStrategy, RoundStrategy, collect_replies


@dataclass
class FlowerOptions:
    """How the simulation runs. ``ray_address=None`` starts a private local Ray (``ray_num_cpus``
    cores, loopback only); ``"auto"`` or ``"head:6379"`` joins a running cluster. Each ClientApp
    instance (a Ray actor) holds ``num_cpus_per_client`` cores and ``num_gpus_per_client`` of a GPU
    (0.25 = four clients share one GPU). ``faults`` injects failures for tests:
    ``{partition_id or (round, partition_id): one of fedlib.flower.FAULTS}`` (round
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

    def spec(self, model: nn.Module, **kw) -> ClientSpec:
        return ClientSpec(model, faults=dict(self.faults), sleep_s=self.sleep_s,
                          device="cuda" if self.num_gpus_per_client > 0 else "cpu", **kw)


# ----------------------------------------------------------------------------------------------
# Ray and the simulation
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


def _rounds(grid: Grid, strategy: RoundStrategy, rounds: int, timeout: float, progress=None) -> None:
    """Flower's own round loop (Strategy.start), with no client-side evaluation."""
    it = range(rounds) if progress is None else progress(range(rounds))
    for r in it:
        replies = grid.send_and_receive(strategy.configure_train(r + 1, ArrayRecord(), ConfigRecord(), grid),
                                        timeout=timeout)
        strategy.aggregate_train(r + 1, replies)
        strategy.finish_round(r + 1, grid, timeout)


# ----------------------------------------------------------------------------------------------
# FedGO's one-off exchange and notebook 01's driver
@dataclass
class FedGOExchange:
    """FedGO protocol steps 1-2 over Flower: G (trained on the server) goes down to every client once,
    each client trains D_k from ``init`` for ``epochs`` epochs (:func:`fedlib.fedgo.train_discriminators`
    on its own data) and sends it up once; the server computes ``disc_logits`` on every setup's server
    data. Same arguments as ``train_discriminators``; ``generator`` is consumed as there, once per setup,
    before the rounds. ``G`` may be a list with one generator per setup (e.g. one GAN per seed, as
    :func:`fedlib.studies.fedgo_setups` trains them)."""

    D: nn.Module
    G: nn.Module | list
    epochs: int
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    init: Params | None = None
    generator: torch.Generator | None = None


def _fedgo_exchange(grid: Grid, nodes, ex: FedGOExchange, setups, K: int, report: FlowerReport,
                    opts: FlowerOptions) -> dict[int, torch.Tensor]:
    """G down once, D_k up once, per setup; sets ``setups[s].disc_logits`` from the accepted D_k and
    returns, per setup, which clients' discriminators arrived."""
    from .strategy import Task

    d_init = ex.init if ex.init is not None else fl.get_params(ex.D)
    arrived = {}
    for s, setup in enumerate(setups):
        g_params = fl.get_params(ex.G[s] if isinstance(ex.G, (list, tuple)) else ex.G)
        g_rec = to_record(g_params)
        rng = rng_state(ex.generator) if ex.generator is not None else rng_state(torch.Generator().manual_seed(s))
        if ex.generator is not None:
            fl.client_generators(ex.generator, K)  # as train_discriminators(generator=g) over K clients
        tasks = [Task(k, s * K + k, k, d_init) for k in range(K)]
        msgs = []
        for t in tasks:
            cfg = ConfigRecord({"epochs": ex.epochs, "lr": ex.lr, "momentum": ex.momentum, "batch-size": ex.batch_size,
                                "rng": rng, "skip": t.row, "row": t.row, "data-row": t.data_row})
            msgs.append(Message(RecordDict({"arrays": to_record(d_init), "generator": g_rec, "config": cfg}),
                                message_type="train.discriminator", dst_node_id=nodes[t.partition]))
            report.ledger.log(fl.SETUP, "down", "generator", tensor_bytes(g_params))
            report.wire.log(fl.SETUP, "down", "generator", g_rec.count_bytes())
        replies = list(grid.send_and_receive(msgs, timeout=opts.round_timeout))

        def decode(msg, task):
            rec = msg.content["arrays"]
            report.wire.log(fl.SETUP, "up", "discriminator", rec.count_bytes())
            p = from_record(rec)
            report.ledger.log(fl.SETUP, "up", "discriminator", tensor_bytes(p))
            return p

        got = collect_replies(msgs, tasks, replies, decode, d_init, report, fl.SETUP)
        # a client without a discriminator is left out of the FedGO ensemble (its logits row is a
        # placeholder from D's init, never used)
        dev = next(iter(d_init.values())).device
        stacked = fl.stack_params([{n: v.to(dev) for n, v in got.get(k, d_init).items()} for k in range(K)])
        setup.disc_logits = fedgo.discriminator_logits(ex.D, stacked, setup.server_x)
        arrived[s] = torch.tensor([k in got for k in range(K)])
    return arrived


def run_rounds(model: nn.Module, setups: list, methods, config: distill.RoundsConfig, *,
               generator: torch.Generator | None = None, init: Params | None = None, progress=None,
               exchange: FedGOExchange | None = None, options: FlowerOptions | None = None) -> distill.RoundsResult:
    """:func:`fedlib.rounds.run_rounds` on Flower (call it as ``fedlib.backends.run_rounds(..., backend="flower")``): the
    same rounds, the same :class:`~fedlib.distill.RoundsResult` with its ``report`` (a
    :class:`FlowerReport`). With ``exchange``, ``setups[s].disc_logits`` are set from the discriminators
    the clients uploaded. Node k is client k of every setup and method. ``config`` and ``generator``: those of
    :func:`fedlib.rounds.run_rounds` (the clients draw from their own seeds, the server from ``generator``)."""
    opts = options or FlowerOptions()
    rounds, server = config.rounds, config.server(generator)
    st = distill.prepare_rounds(model, setups, methods, rounds, init, discriminators_later=exchange is not None)
    data = fl.concat_clients([s.clients for s in setups])  # data row s*K + k
    report = FlowerReport()
    g_arch = (exchange.G[0] if isinstance(exchange.G, (list, tuple)) else exchange.G) if exchange else None
    spec = opts.spec(model, discriminator=exchange.D if exchange else None, generator=g_arch,
                     terms={t.name: t for t in distill.client_terms(st.methods)})
    client = config.client()

    def main(grid: Grid, nodes: dict[int, int]) -> None:
        with_disc = _fedgo_exchange(grid, nodes, exchange, setups, st.K, report, opts) if exchange else {}
        strategy = DistillStrategy(model, st, setups, server, client, nodes, report, with_disc, opts.keep_params)
        _rounds(grid, strategy, rounds, opts.round_timeout, progress)

    simulate(main, spec, data, st.K, opts, report)
    return st.result(setups, report)


# ----------------------------------------------------------------------------------------------
# notebook 02's driver: FedDM
def run_feddm(denoiser, groups: list, config: feddm.FedDMConfig, *, eval_rounds=(), evaluate=None, seed: int = 0,
              progress: bool = True, options: FlowerOptions | None = None) -> feddm.FedDMRun:
    """:func:`fedlib.feddm.run_feddm` on Flower (call it as ``fedlib.backends.run_feddm(..., backend="flower")``): the
    same history rows, groups updated in place (``params``, ``ledger``), and the report. Every federated
    group's client k is node k; quantised variants send their update packed and the server decodes it
    from those bytes alone. ``central`` groups train on the server, as in-process. Not here: a quantised
    downlink. With ``rounding="nearest"`` the random numbers match the in-process run (with stochastic
    rounding each client draws its rounding noise from its own seed instead)."""
    from tqdm.auto import tqdm

    opts = options or FlowerOptions()
    fed = [g for g in groups if not g.variant.central]
    bad = [g.label for g in fed if g.variant.downlink is not None]
    if bad:
        raise ValueError(f"groups {bad} quantise the downlink, which the Flower backend does not send yet; allowed: "
                         "a float32 downlink (down_bits 32). Use backend='inprocess' for them")
    if not fed:
        raise ValueError("no federated group to run on Flower; allowed: at least one non-central variant")
    K = fed[0].clients.n_clients
    if any(g.clients.n_clients != K for g in fed):
        raise ValueError("every federated group must have the same number of clients")
    order = [g for gs in feddm.by_mu(groups).values() for g in gs]
    data = fl.concat_clients([g.clients for g in order])  # data row i*K + k: group order[i], client k
    report = FlowerReport()
    spec = opts.spec(denoiser.net, loss_fn=feddm.diffusion_client_loss(denoiser),
                     extras_fn=feddm.noise_extras(denoiser.process))
    history: list[dict] = []
    client = config.client()

    def main(grid: Grid, nodes: dict[int, int]) -> None:
        st = FedDMStrategy(denoiser, groups, order, client, nodes, report, torch.Generator().manual_seed(seed), history,
                           eval_rounds, evaluate, config.chunk_size)
        _rounds(grid, st, config.rounds, opts.round_timeout,
                (lambda it: tqdm(it, desc="FedDM rounds (Flower)")) if progress else None)

    simulate(main, spec, data, K, opts, report)
    return feddm.FedDMRun(history, report)


# ----------------------------------------------------------------------------------------------
# notebook 06's driver: FedLGD
def run_fedlgd(clients: list, tests: list, n_classes: int, cfg: lgd.FedLGDConfig, *, device=None, local_sets=None,
               progress: bool = False, options: FlowerOptions | None = None) -> dict:
    """:func:`fedlib.fedlgd.run_fedlgd` on Flower (call it as ``fedlib.backends.run_fedlgd(..., backend="flower")``):
    the same dict, plus ``report`` (a :class:`FlowerReport`). Node k is client k: it distils its local
    virtual set from its own data at its first message and keeps it in its node state (Flower's
    ``context.state``), written only by the server's ``train.fedlgd`` messages to that node; the server
    sees the sets only at the end, for the report. The seeds are the in-process run's (client k of round r
    skips k seeds of :func:`fedlib.fedlgd.round_generator`, FedProx's K + k)."""
    from tqdm.auto import tqdm

    if local_sets is not None:
        raise ValueError("local_sets were given, but on Flower every client distils its own local virtual set on "
                         "its node; allowed: local_sets=None. Use backend='inprocess' to start from given sets")
    opts = options or FlowerOptions()
    device = torch.device(device) if device is not None else clients[0][0].device
    server = lgd.FedLGDServer.start(tuple(clients[0][0].shape[1:]), n_classes, cfg, device)
    n_k = torch.tensor([len(y) for _, y in clients])
    bounds = [0] + torch.cumsum(n_k, 0).tolist()
    data = fl.pack_clients(torch.cat([x for x, _ in clients]).cpu(), torch.cat([y for _, y in clients]).cpu(),
                           [list(range(a, b)) for a, b in zip(bounds, bounds[1:])])  # data row k: client k
    report = FlowerReport()
    spec = opts.spec(server.model, fedlgd=(cfg, n_classes))
    sets: dict = {}

    def main(grid: Grid, nodes: dict[int, int]) -> None:
        strategy = FedLGDStrategy(server, cfg, n_k, tests, n_classes, nodes, report, opts.keep_params)
        _rounds(grid, strategy, cfg.rounds, opts.round_timeout,
                (lambda it: tqdm(it, desc=f"FedLGD seed {cfg.seed} (Flower)", leave=False)) if progress else None)
        sets["initial"], sets["current"] = strategy.local_sets(grid, opts.round_timeout)

    simulate(main, spec, data, len(clients), opts, report)
    return {**server.result(sets["initial"], sets["current"]), "report": report}
