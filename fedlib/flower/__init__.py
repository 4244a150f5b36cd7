"""fedlib's federated algorithms on Flower (Message API, flwr >= 1.20), run by Flower's simulation engine
(Ray) in-process, or on a Ray cluster across machines (``docs/flower_ray_cluster.md``).

Optional extra: ``pip install -e .[flower]`` (``flwr[simulation]``). Nothing here is a second
implementation: client training is :func:`fedlib.federated.local_train`, the server step of notebook
01's methods :func:`fedlib.distill.server_step`, FedDM's uploads and server step
:func:`fedlib.feddm.upload` / :func:`~fedlib.feddm.receive` / :func:`~fedlib.feddm.aggregate`, the
FedGO discriminators :func:`fedlib.fedgo.train_discriminators`. This package only moves their inputs
and outputs through Flower ``Message``s:

==========================  =====================================  ====================================
message type                server -> client (content)             client -> server (reply)
==========================  =====================================  ====================================
``query.info``              nothing                                partition-id (once)
``train.discriminator``     generator G (ArrayRecord, once)        D_k (ArrayRecord, once)  [FedGO]
``train``                   global model (ArrayRecord) + config    w_k (ArrayRecord), or the packed
                            (+ a ``quantizer`` record: FedDM-quant) quantised update w_k - w (one uint8
                            (+ a ``payload`` record: a method's     Array, :func:`fedlib.feddm.upload`)
                            client term, e.g. FedGen's G_w)
``train.fedlgd``             FedAvg, FedProx, FedLGD models (one     the three client models (one
                            ArrayRecord) + G (``payload``)         ArrayRecord)  [FedLGD]
``query.fedlgd``            FedLGD's new global model              per-class gradients + class counts
==========================  =====================================  ====================================

FedLGD's clients keep their local virtual sets in their node state (``context.state``), written only by
``train.fedlgd`` messages to that node (:func:`run_fedlgd`; docs/methods.md §7.1).

Modules: :mod:`.records` (parameters as records, validation, the report), :mod:`.client` (the
ClientApp), :mod:`.strategy` (a strategy base that sends one message per client task and validates the
replies, and the two small strategies that differ only in their tasks and server step), and
:mod:`.simulation` (Ray, the simulation, the drivers). Use the drivers through the library:
``fedlib.backends.run_rounds(..., backend="flower")`` and ``fedlib.backends.run_feddm(..., backend="flower")``.

Seeds: the in-process drivers train K clients with ``local_train(..., generator=g)``, which gives client
k the k-th seed drawn from g (:func:`fedlib.federated.client_generators`). The server here sends every
client g's state and the client's task index i; the client skips i seeds of it and calls ``local_train``
on its own data, so it draws exactly the random numbers it would have drawn in-process; the server then
advances its g as local_train would. Result: the same global model up to float round-off of vmap over
1 vs K clients (``tests/test_flower.py`` states the tolerance).

Trust: a reply is matched to the message the server sent (its message id), never to what the client
says about itself; the sample counts are the server's own. A reply with an error, none within
``FlowerOptions.round_timeout`` seconds, a second reply to one message, a reply to no message of this
round, or one whose arrays have the wrong names / shapes / dtype or non-finite values is left out and
logged (``fedlib.flower`` logger and ``FlowerReport.events``); the weights renormalise over the clients
that replied, and the round goes on. The FedGO exchange is validated the same way.

Bytes: a :class:`fedlib.federated.CommLedger` of the payloads that crossed, comparable to the
in-process formulas; Flower's own serialised size (``ArrayRecord.count_bytes``) is kept beside it as
``wire``.
"""

import os

# Keep Ray and Flower on this machine and quiet unless told otherwise: Ray's usage stats and Flower's
# telemetry would try the network; without RAY_ADDRESS Ray binds to loopback only (Ray reads this at
# import). On a cluster set RAY_ADDRESS (see docs/flower_ray_cluster.md) and the loopback pin is skipped.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
if "RAY_ADDRESS" not in os.environ:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from .client import FAULTS, ClientSpec, make_client_app  # noqa: E402
from .records import FlowerReport, check_update, from_record, tensor_bytes, to_record  # noqa: E402
from .simulation import FedGOExchange, FlowerOptions, run_feddm, run_fedlgd, run_rounds, simulate  # noqa: E402
from .strategy import DistillStrategy, FedDMStrategy, FedLGDStrategy, RoundStrategy, Task, collect_replies  # noqa: E402

__all__ = ["FAULTS", "ClientSpec", "make_client_app", "FlowerReport", "check_update", "from_record", "tensor_bytes",
           "to_record", "FedGOExchange", "FlowerOptions", "run_feddm", "run_fedlgd", "run_rounds", "simulate", "DistillStrategy",
           "FedDMStrategy", "FedLGDStrategy", "RoundStrategy", "Task", "collect_replies"]
