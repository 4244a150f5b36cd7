"""Ensemble weighting rules for server-side distillation (docs/methods.md §1.1 - 1.2).

Every rule is a pure function of tensors returning weights ``a`` of shape [K, N] (client k's weight
at server sample n), non-negative, each column summing to 1 over the K clients. The pseudo-label is
then ``q(y|x_n) = sum_k a[k, n] softmax(f_k(x_n))_y`` (:func:`fedlib.distill.pseudo_labels`).

=============  =============================================  ================================
name           a_k(x) proportional to                          inputs
=============  =============================================  ================================
uniform        1 (FedDF)                                       logits [K, N, C]
sample_count   n_k                                             logits, n_k [K]
entropy        exp(-H(softmax f_k(x)))                         logits
variance       Var_y softmax(f_k(x))_y                         logits
dafkd          D_k(x) = sigmoid(l_k(x)) (DaFKD)                disc_logits [K, N]
fedgo          n_k D_k/(1-D_k) = n_k exp(l_k(x)) (FedGO)       disc_logits [K, N], n_k
oracle         n_k p_k(x) (known densities only)               log_densities [K, N], n_k
=============  =============================================  ================================

FedGO is computed as ``softmax_k(l_k + log n_k)`` on the discriminators' pre-sigmoid logits: no
clamping of D near 0 or 1 is needed, and with exact logits ``l_k = log p_k - log p_G`` it equals the
oracle exactly (p_G cancels).

Rules live in one registry, ``RULES`` (:func:`register`): a rule's inputs are its function's
parameter names, and :mod:`fedlib.distill` derives one distillation method per rule from it (the
uniform rule's method is called ``feddf``; the oracle has none). :func:`compute_weights` dispatches
by name and checks the inputs. Adding a rule is one function and one ``@register("name")``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .utils import positive_counts

_EPS = 1e-12


def _check_finite(name: str, t: Tensor, fix: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf); allowed: finite values only. {fix}")


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"client logits must have shape [K, N, C], got {tuple(logits.shape)}; stack the "
                         "clients' outputs on the server data along dim 0")
    if logits.shape[0] == 0:
        # no client to weigh: the weights cannot sum to 1 over K = 0 (the uniform rule divided by K)
        raise ValueError(f"client logits have K=0 clients (shape {tuple(logits.shape)}); allowed: K >= 1. Skip "
                         "the distillation step in a round where no client replied")
    _check_finite("client logits", logits, "Check the client models (diverged local training?).")


def _check_kn(name: str, t: Tensor, K: int, N: int, fix: str) -> None:
    if t.dim() != 2 or tuple(t.shape) != (K, N):
        raise ValueError(f"{name} must have shape [K, N] = [{K}, {N}] to match the client logits, got "
                         f"{tuple(t.shape)}")
    _check_finite(name, t, fix)


def _log_n(n_k, K: int, like: Tensor) -> Tensor:
    n_k = positive_counts(n_k)
    if len(n_k) != K:
        raise ValueError(f"n_k has {len(n_k)} entries but there are K={K} clients; pass one count per client")
    return n_k.to(like.device, like.dtype).log()[:, None]


# ----------------------------------------------------------------------------------------------
# the registry: one entry per rule, from which every method list derives


@dataclass(frozen=True)
class Rule:
    """A registered weighting rule: its function, the inputs it takes (read from the function's
    parameter names: ``logits``, ``n_k``, ``disc_logits``, ``log_densities``), the server method that
    distils with it (``fedlib.distill``; None: analysis only, no method) and a one-line description."""

    name: str
    fn: Callable
    inputs: tuple
    method: str | None
    doc: str

    @property
    def needs(self) -> tuple:
        """The inputs besides the client logits."""
        return tuple(i for i in self.inputs if i != "logits")


RULES: dict[str, Rule] = {}
INPUTS = ("logits", "n_k", "disc_logits", "log_densities")


def register(name: str, method: str | None = "", doc: str = ""):
    """Decorator: add a weighting rule ``fn(<inputs>) -> a [K, N]`` to ``RULES`` under ``name``. Its
    inputs are its parameter names (any of ``INPUTS``). ``method``: the name of the distillation method
    in :mod:`fedlib.distill` that uses it (default: ``name``; None: no method, e.g. the oracle, whose
    densities no real run has). Registering is all a new rule needs to run in-process and on Flower."""

    def add(fn):
        inputs = tuple(inspect.signature(fn).parameters)
        unknown = [i for i in inputs if i not in INPUTS]
        if unknown:
            raise ValueError(f"weighting rule {name!r}: parameters {unknown} are not known inputs; allowed: "
                             f"{', '.join(INPUTS)}")
        RULES[name] = Rule(name, fn, inputs, name if method == "" else method,
                           doc or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return add


# ----------------------------------------------------------------------------------------------
# the rules


@register("uniform", method="feddf")
def uniform_weights(logits: Tensor) -> Tensor:
    """FedDF: a_k = 1/K."""
    K, N, _ = logits.shape
    return logits.new_full((K, N), 1.0 / K)


@register("sample_count")
def sample_count_weights(logits: Tensor, n_k) -> Tensor:
    """a_k = n_k / n, the same at every x."""
    K, N, _ = logits.shape
    return torch.softmax(_log_n(n_k, K, logits), dim=0).expand(K, N).contiguous()


@register("entropy")
def entropy_weights(logits: Tensor) -> Tensor:
    """a_k proportional to exp(-H(softmax f_k(x))): confident clients weigh more."""
    logp = torch.log_softmax(logits, -1)
    H = -(logp.exp() * logp).sum(-1)
    return torch.softmax(-H, dim=0)


@register("variance")
def variance_weights(logits: Tensor) -> Tensor:
    """a_k proportional to the variance of softmax f_k(x) over the classes (uniform where all are 0)."""
    v = torch.softmax(logits, -1).var(-1, unbiased=False) + _EPS
    return v / v.sum(0, keepdim=True)


@register("dafkd")
def dafkd_weights(disc_logits: Tensor) -> Tensor:
    """DaFKD: a_k = D_k(x) / sum_j D_j(x) with D_k = sigmoid(l_k)."""
    return torch.softmax(torch.nn.functional.logsigmoid(disc_logits), dim=0)


@register("fedgo")
def fedgo_weights(disc_logits: Tensor, n_k) -> Tensor:
    """FedGO: a_k = n_k D_k/(1-D_k) / sum_j n_j D_j/(1-D_j) = softmax_k(l_k + log n_k)."""
    return torch.softmax(disc_logits + _log_n(n_k, disc_logits.shape[0], disc_logits), dim=0)


@register("oracle", method=None)
def oracle_weights(log_densities: Tensor, n_k) -> Tensor:
    """The optimal ensemble (analysis only): a_k = n_k p_k(x) / sum_j n_j p_j(x)."""
    return torch.softmax(log_densities + _log_n(n_k, log_densities.shape[0], log_densities), dim=0)


def compute_weights(name: str, logits: Tensor, *, n_k=None, disc_logits: Tensor | None = None,
                    log_densities: Tensor | None = None) -> Tensor:
    """Weights [K, N] of rule ``name`` (one of ``RULES``), after checking names, shapes and NaNs."""
    if name not in RULES:
        raise ValueError(f"unknown weighting {name!r}; allowed: {', '.join(map(repr, RULES))}. "
                         "FedAvg/FedProx are aggregations, not weightings; majority vote (FedKA) is "
                         "fedlib.distill.majority_vote; add a rule with fedlib.weighting.register")
    rule = RULES[name]
    _check_logits(logits)
    K, N, _ = logits.shape
    given = {"logits": logits, "n_k": n_k, "disc_logits": disc_logits, "log_densities": log_densities}
    missing = [k for k in rule.needs if given[k] is None]
    if missing:
        raise ValueError(f"weighting {name!r} needs {', '.join(missing)}; pass them as keyword arguments")
    if "disc_logits" in rule.inputs:
        _check_kn("disc_logits", disc_logits, K, N,
                  "A discriminator produced NaN: retrain it with a smaller learning rate or check its input.")
    if "log_densities" in rule.inputs:
        _check_kn("log_densities", log_densities, K, N, "Use log-densities (logsumexp), not densities.")
    if "n_k" in rule.inputs:
        _log_n(n_k, K, logits)  # checks the counts once, here
    return rule.fn(**{i: given[i] for i in rule.inputs})


def weight_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean total-variation distance between two weightings [K, N]: mean_n 0.5 sum_k |a - b| (in [0, 1])."""
    if a.shape != b.shape:
        raise ValueError(f"weightings have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return 0.5 * (a - b).abs().sum(0).mean()
