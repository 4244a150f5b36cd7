"""The noise rule: how every comparative claim in fedlib is decided (:data:`NOISE_RULE`), and the
helpers every notebook's claims share. The ground floor: it imports nothing of fedlib, so that any
layer may decide a claim and :mod:`fedlib.results` (the run record) re-uses it.

- ``decide(diffs)``: (verdict, mean, SE) of per-seed differences;
- ``compare(a, b)`` / ``compare_to(values, threshold)``: a paired :class:`Comparison` over seeds;
- ``combine(comparisons)`` and ``beats_every(comparisons)``: the claim 'A beats every B';
- ``as_verdict(value)``: a verdict from a bool, None, a string or a Comparison;
- ``per_seed(rows, value, seeds, **where)``: one value per seed from a frame or rows, the input of them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VERDICTS = ("holds", "does not hold", "within noise", "not applicable")

MIN_SEEDS = 3
K_SE = 2.0
NOISE_RULE = (f"paired over seeds: a claim 'A beats B' holds when the mean of the per-seed differences "
              f"A - B (signed so that positive favours A) exceeds {K_SE:g} standard errors (SE = sample std / "
              f"sqrt(n)), does not hold when it is below -{K_SE:g} SE, and is 'within noise' otherwise or "
              f"with fewer than {MIN_SEEDS} seeds")


@dataclass
class Comparison:
    """A paired comparison over seeds, decided by :data:`NOISE_RULE`. ``diffs`` are the per-seed
    differences signed so that positive supports the claim."""

    a_name: str
    b_name: str
    a: list
    b: list
    diffs: list
    mean: float
    se: float
    verdict: str
    fmt: str = ".3f"

    @property
    def n(self) -> int:
        return len(self.diffs)

    def measured(self) -> str:
        f = self.fmt
        sd = lambda v: (float(_np().std(v, ddof=1)) if len(v) > 1 else float("nan"))  # noqa: E731
        mean = lambda v: float(_np().mean(v))  # noqa: E731
        side = (f"{self.a_name} {mean(self.a):{f}} ± {sd(self.a):{f}} vs {self.b_name} "
                f"{mean(self.b):{f}} ± {sd(self.b):{f}}" if len(self.b) else f"{self.a_name} {mean(self.a):{f}}")
        return f"{side} (paired difference {self.mean:+{f}} ± {self.se:{f}} SE, {self.n} seeds)"

    def evidence(self) -> dict:
        return {"rule": "paired", "diffs": self.diffs, "mean": self.mean, "se": self.se, "n": self.n}


def _np():
    import numpy as np

    return np


def decide(diffs) -> tuple[str, float, float]:
    """(verdict, mean, SE) of per-seed differences (positive supports the claim) by :data:`NOISE_RULE`."""
    np = _np()
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if not np.isfinite(d).all():
        raise ValueError(f"per-seed differences {d.tolist()} hold NaN or inf; a claim cannot be decided on "
                         "them (did a run diverge?)")
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if n < MIN_SEEDS:
        return "within noise", mean, se
    if mean > K_SE * se:
        return "holds", mean, se
    if mean < -K_SE * se:
        return "does not hold", mean, se
    return "within noise", mean, se


def compare(a, b, *, a_name: str = "A", b_name: str = "B", higher_is_better: bool = True,
            margin: float = 0.0, fmt: str = ".3f") -> Comparison:
    """The claim 'A is better than B by more than ``margin``', paired over seeds (``a[i]`` and
    ``b[i]`` come from the same seed)."""
    np = _np()
    a, b = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs one value per seed on both sides, got {len(a)} and {len(b)}")
    diffs = (a - b if higher_is_better else b - a) - margin
    verdict, mean, se = decide(diffs)
    return Comparison(a_name, b_name, a.tolist(), b.tolist(), diffs.tolist(), mean, se, verdict, fmt)


def compare_to(values, threshold: float, *, name: str = "value", below: bool = True,
               fmt: str = ".3f") -> Comparison:
    """The claim 'the value is below (or above) ``threshold``', over seeds: per-seed differences to
    the threshold, decided by the same rule."""
    np = _np()
    v = np.asarray(values, dtype=float).reshape(-1)
    diffs = threshold - v if below else v - threshold
    verdict, mean, se = decide(diffs)
    return Comparison(name, f"{'<' if below else '>'} {threshold:g}", v.tolist(), [], diffs.tolist(), mean, se,
                      verdict, fmt)


def combine(comparisons: dict) -> tuple[str, str]:
    """(verdict, key of the deciding comparison) of 'A beats every B': holds when every comparison holds,
    does not hold when any does not, within noise otherwise. The deciding one is the first that does
    not hold, else the closest (smallest mean difference)."""
    if not comparisons:
        raise ValueError("nothing to compare against")
    losing = [k for k, c in comparisons.items() if c.verdict == "does not hold"]
    closest = min(comparisons, key=lambda k: comparisons[k].mean)
    if losing:
        return "does not hold", losing[0]
    if all(c.verdict == "holds" for c in comparisons.values()):
        return "holds", closest
    return "within noise", closest


def as_verdict(value) -> str:
    """A verdict from a bool (holds / does not hold), None ("not applicable"), a verdict string or a
    :class:`Comparison`."""
    if isinstance(value, Comparison):
        return value.verdict
    if value is None:
        return "not applicable"
    if isinstance(value, str):
        if value not in VERDICTS:
            raise ValueError(f"unknown verdict {value!r}; allowed: {', '.join(map(repr, VERDICTS))}")
        return value
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            value = bool(value)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, bool):
        return "holds" if value else "does not hold"
    raise TypeError(f"a claim's verdict must be a bool, None, a verdict string or a Comparison, got {value!r}")


class MissingSeeds(KeyError, ValueError):
    """No value for a seed a comparison pairs (a KeyError of a lookup, a ValueError of the argument)."""


def per_seed(rows, value: str, seeds=None, *, last: str | None = None, **where):
    """``value`` per seed, a Series indexed by seed, of the rows (a DataFrame or a list of dicts) matching
    ``where`` (column=value, e.g. method="fedgo"): the mean over a seed's rows (over rounds, say), or over
    those at the largest value of the column ``last`` (``last="round"``: the last round). In ``seeds``
    order (default: sorted); a seed without rows raises, so that a comparison is never silently unpaired."""
    import pandas as pd

    f = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for k, v in where.items():
        f = f[f[k] == v]
    if f.empty:
        raise MissingSeeds(f"no rows for {where}; allowed: values that occur in the rows' columns {sorted(where)}")
    if last is not None:
        f = f[f[last] == f[last].max()]
    out = f.groupby("seed")[value].mean().sort_index()
    if seeds is None:
        return out
    missing = [s for s in seeds if s not in out.index]
    if missing:
        raise MissingSeeds(f"no {value!r} for {where} at seeds {missing}; allowed seeds: {out.index.tolist()}")
    return out.loc[list(seeds)]


def beats_every(comparisons: dict):
    """The claim 'A beats every B' from paired comparisons ``{label: Comparison}`` (one per baseline
    and client count), by :func:`combine`: (verdict or the deciding Comparison when its
    verdict is the combined one, so its per-seed evidence is kept; the measured text)."""
    verdict, key = combine(comparisons)
    if verdict == "within noise":  # show a comparison that keeps it from holding, not merely the closest
        key = min((k for k, v in comparisons.items() if v.verdict != "holds"), key=lambda k: comparisons[k].mean)
    c = comparisons[key]
    n_hold = sum(v.verdict == "holds" for v in comparisons.values())
    text = f"{n_hold}/{len(comparisons)} comparisons hold; deciding ({key}): {c.measured()}"
    return (c if c.verdict == verdict else verdict), text
