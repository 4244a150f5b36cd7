"""Parameters as Flower records, what a reply must satisfy, seeds across the wire, and the report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .. import federated as fl
from ..compression import Quantizer

log = logging.getLogger("fedlib.flower")
Params = dict[str, torch.Tensor]


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


def to_record(params: Params) -> ArrayRecord:
    return ArrayRecord({n: Array(p.detach().cpu().contiguous()) for n, p in params.items()})


def from_record(record: ArrayRecord) -> Params:
    return {n: torch.from_numpy(np.array(a.numpy(), copy=True)) for n, a in record.items()}


def prefixed(models: dict[str, Params]) -> Params:
    """{method: params} as one flat parameter dict ``method/name`` (one record, one validation)."""
    return {f"{m}/{n}": v for m, w in models.items() for n, v in w.items()}


def unprefixed(flat: Params) -> dict[str, Params]:
    """The inverse of :func:`prefixed`."""
    out: dict[str, Params] = {}
    for key, v in flat.items():
        m, n = key.split("/", 1)
        out.setdefault(m, {})[n] = v
    return out


def tensor_bytes(params: Params) -> int:
    """Payload bytes, as :func:`fedlib.federated.state_bytes` counts them (numel x itemsize)."""
    return fl.state_bytes(params)


def quantizer_record(q: Quantizer) -> ConfigRecord:
    """A quantiser travels as one record (absent: float32)."""
    return ConfigRecord({"bits": q.bits, "scheme": q.scheme, "rounding": q.rounding})


def quantizer_of(record: ConfigRecord | None) -> Quantizer | None:
    return None if record is None else Quantizer(int(record["bits"]), str(record["scheme"]), str(record["rounding"]))


# A reply's values may be at most this many times the template's largest magnitude (at least 1): a
# trained model or an update sits within a few times its initialisation; 1e30 is a blow-up that is still
# finite, and averaging it in would wipe out every other client (and overflow float32 norms).
MAGNITUDE_FACTOR = 1e6


def check_update(params: Params, template: Params) -> str | None:
    """Why a client's parameters must not be averaged in, or None: names, shapes, dtype, finiteness,
    and magnitude (at most ``MAGNITUDE_FACTOR`` times the template's largest, counted as at least 1)."""
    if set(params) != set(template):
        missing, extra = sorted(set(template) - set(params)), sorted(set(params) - set(template))
        return f"parameter names differ (missing {missing}, unexpected {extra})"
    scale = max([1.0] + [t.detach().abs().max().item() for t in template.values() if t.numel()])
    bound = MAGNITUDE_FACTOR * scale
    for n, t in template.items():
        p = params[n]
        t = t.cpu() if t.device != p.device else t
        if tuple(p.shape) != tuple(t.shape):
            return f"{n} has shape {tuple(p.shape)}, expected {tuple(t.shape)}"
        if p.dtype != t.dtype:
            return f"{n} has dtype {p.dtype}, expected {t.dtype}"
        if not torch.isfinite(p).all():
            return f"{n} holds {int((~torch.isfinite(p)).sum())} non-finite values"
        top = p.detach().abs().max().item() if p.numel() else 0.0
        if top > bound:
            return (f"{n} holds a value of magnitude {top:.3g}; allowed: at most {bound:.3g} ({MAGNITUDE_FACTOR:.0e} "
                    f"x the template's largest magnitude {scale:.3g}, counted as at least 1): a diverged client")
    return None


def rng_state(g: torch.Generator) -> bytes:
    return bytes(g.get_state().numpy().tobytes())


def skip_seeds(state: bytes, skip: int) -> torch.Generator:
    """The round generator with the first ``skip`` client seeds drawn (see the package docstring)."""
    g = torch.Generator()
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    if skip:
        fl.client_generators(g, skip)
    return g


def reason(text: str, n: int = 300) -> str:
    """The useful part of a Flower error reason (Ray prefixes a long actor description)."""
    text = str(text)
    i = text.rfind("Message:")
    return (text[i:] if i >= 0 else text)[-n:].strip()
