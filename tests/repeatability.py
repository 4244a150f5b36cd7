"""Claims compared across runs of the same notebook with the same parameters: every number must be the
same except wall-clock ones. What makes that hold: every notebook seeds what it draws, and its kernel
runs with one CPU thread (the runner's ``--threads 1``; ``make test`` sets OMP/MKL to one thread), so
reductions run in the same order every time. Wall-clock times in a claim's measured text (e.g. "LD3
trains in minutes": "3.1 s per grid") are the one thing that cannot repeat: they are masked.

The same order of the same float32 kernels, that is: another CPU model runs other kernels (oneDNN and
the BLAS pick them by the instruction set), which round differently. The quick set made on an Intel Xeon
and re-run on an AMD EPYC (2026-12-07, one thread each, the same code) differed in the measured text of
39 of its 83 claims and in 3 verdicts, all at the noise rule's edge. So the numbers are compared only
between runs on the same CPU (:func:`same_cpu`); the parameters and the set of claims always."""

from __future__ import annotations

import re

# a number followed by a unit of time or of speed: "3.1 s", "12 ms", "2 min", "850 samples/s", "4.2 it/s"
TIMING = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?\s?(?:ms|s|min|h|samples/s|it/s|/s)\b")
# a claim that compares speeds names the unit once, before its numbers ("one-step samples/s 12784 ± 90
# vs LD3 NFE-4 3754 ± 40 (paired difference +9030 ...)"): every number in it is a wall-clock measurement
SPEED_CLAIM = re.compile(r"samples/s|it/s")
NUMBER = re.compile(r"(?<![\w.-])[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def masked(measured: str) -> str:
    """``measured`` with its wall-clock numbers replaced by ``<time>``."""
    if SPEED_CLAIM.search(measured):
        return NUMBER.sub("<time>", measured)
    return TIMING.sub("<time>", measured)


def claims_of(doc: dict) -> list[tuple[str, str, str]]:
    """(name, measured text with times masked, verdict) of every claim of a metrics.json document."""
    return [(c["name"], masked(c["measured"]), c["verdict"]) for c in doc["claims"]]


def differences(ran: dict, committed: dict, numbers: bool = True) -> list[str]:
    """What differs between two metrics.json documents of one notebook: the parameters, then every claim
    (missing, extra, or, with ``numbers``, with another measured text or verdict). Empty when the claims
    repeat."""
    out = [f"parameter {k}: this run {ran['params'].get(k)!r}, committed {committed['params'].get(k)!r}"
           for k in sorted(set(ran["params"]) | set(committed["params"]))
           if ran["params"].get(k) != committed["params"].get(k)]
    a, b = ({name: (text, verdict) for name, text, verdict in claims_of(d)} for d in (ran, committed))
    out += [f"claim {n!r} only in the committed run" for n in b if n not in a]
    out += [f"claim {n!r} only in this run" for n in a if n not in b]
    if numbers:
        out += [f"claim {n!r}:\n  this run:  {a[n][0]} -> {a[n][1]}\n  committed: {b[n][0]} -> {b[n][1]}"
                for n in a if n in b and a[n] != b[n]]
    return out


def cpu_of(doc: dict) -> dict | None:
    """The CPU a metrics.json document was made on (its provenance: model name and SIMD flags)."""
    return (doc.get("provenance") or {}).get("cpu")


def same_cpu(ran: dict, committed: dict) -> tuple[bool, str]:
    """Whether two runs' numbers can be compared bit for bit: the same CPU model and SIMD flags. Returns
    (same, a sentence naming both CPUs)."""
    a, b = cpu_of(ran), cpu_of(committed)
    name = lambda c: c.get("model", "unknown") if c else "an unrecorded CPU"  # noqa: E731
    return a is not None and a == b, f"this run: {name(a)}; committed: {name(b)}"
