"""The choice of backend, made above both: the same federated rounds in-process (the core:
:func:`fedlib.rounds.run_rounds`, :func:`fedlib.feddm.run_feddm`, :func:`fedlib.fedlgd.run_fedlgd`) or as Flower ServerApp and
ClientApps on Ray (:mod:`fedlib.flower`). The core never imports Flower; this module hands it Flower's
driver, so that ``flwr`` and ``ray`` load only when a run asks for them.
"""

from __future__ import annotations

from . import feddm, fedlgd
from . import rounds as engine
from .utils import check_choice

BACKENDS = ("inprocess", "flower")
_FIX = "Use backend='inprocess' unless you need real clients or a Ray cluster."


def run_rounds(model, setups, methods, config: engine.RoundsConfig | None = None, *, backend: str = "inprocess",
               **kw) -> engine.RoundsResult:
    """:func:`fedlib.rounds.run_rounds` with ``config`` (a :class:`fedlib.rounds.RoundsConfig`, or its
    fields in ``kw``) on ``backend``; on ``"flower"``, ``kw`` may add ``exchange`` and ``options``
    (:func:`fedlib.flower.run_rounds`)."""
    if check_choice("backend", backend, BACKENDS, fix=_FIX) == "flower":
        from .flower import run_rounds as driver

        kw["driver"] = driver
    return engine.run_rounds(model, setups, methods, config, **kw)


def run_feddm(denoiser, groups, config: feddm.FedDMConfig | None = None, *, backend: str = "inprocess",
              **kw) -> feddm.FedDMRun:
    """:func:`fedlib.feddm.run_feddm` with ``config`` (a :class:`fedlib.feddm.FedDMConfig`, or its fields in
    ``kw``) on ``backend``; on ``"flower"``, ``kw`` may add ``options`` (:func:`fedlib.flower.run_feddm`)."""
    if check_choice("backend", backend, BACKENDS, fix=_FIX) == "flower":
        from .flower import run_feddm as driver

        kw["driver"] = driver
    return feddm.run_feddm(denoiser, groups, config, **kw)


def run_fedlgd(clients, tests, n_classes: int, cfg: fedlgd.FedLGDConfig, *, backend: str = "inprocess", **kw) -> dict:
    """:func:`fedlib.fedlgd.run_fedlgd` (FedLGD with FedAvg and FedProx on the same local virtual sets) on
    ``backend``; on ``"flower"``, ``kw`` may add ``options`` (:func:`fedlib.flower.run_fedlgd`), and each
    client distils and keeps its local virtual sets on its own node."""
    if check_choice("backend", backend, BACKENDS, fix=_FIX) == "flower":
        from .flower import run_fedlgd as driver

        kw["driver"] = driver
    return fedlgd.run_fedlgd(clients, tests, n_classes, cfg, **kw)
