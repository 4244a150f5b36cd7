"""Notebook 01's federated distillation under one name: the method registry and the distillation
maths (:mod:`fedlib.methods`) and the in-process rounds engine (:mod:`fedlib.rounds`), re-exported so
that a notebook reads ``distill.Setup``, ``distill.methods()``, ``distill.run_rounds``. It adds nothing
of its own and imports only those two; the same rounds on Flower go through
:func:`fedlib.backends.run_rounds` (``backend="flower"``).
"""

from __future__ import annotations

from .methods import (METHODS, PSEUDO_LABEL_MODES, ClientTerm, Method, adam_step, aggregation_only,  # noqa: F401
                      distil_in_place, ensemble_targets, get_method, kl_distill_params, kl_to_targets, majority_vote,
                      methods, predict_each, pseudo_labels, register_method)
from .rounds import (GroupContext, RoundsConfig, RoundsResult, RoundsState, ServerConfig, Setup, central_training,  # noqa: F401
                     client_extras, client_loss, client_mu, client_payloads, client_terms, group_context,
                     log_round_bytes, prepare_rounds, record_test_accuracy, run_rounds, server_step)
