"""DMD2's evaluation: the 2-D metrics (``off_mode_fraction``, ``mode_weight_tv``, :class:`ToyEvaluator`),
the hyper-parameter search (:func:`coordinate_search`) and the comparison table's teacher baselines and
timings (notebook 04)."""

from __future__ import annotations

import time

import torch

from ..diffusion.denoiser import Denoiser
from .losses import generate
from .training import DMD2Result


# ---------------------------------------------------------------------------------------------
# 2-D evaluation and the hyper-parameter search (notebook 04)


def stratified_sample(mixture, n: int, seed: int) -> torch.Tensor:
    """``n`` points of a 2-D mixture with the exact share of points per mode (largest remainders), so a
    reference sample carries no mode-count noise into a sliced Wasserstein distance."""
    g = torch.Generator().manual_seed(seed)
    share = mixture.weights * n
    counts = share.floor().long()
    counts[torch.argsort(share - counts, descending=True)[: n - int(counts.sum())]] += 1
    means = mixture.means.repeat_interleave(counts, 0)
    return means + mixture.std * torch.randn(n, 2, generator=g)


def off_mode_fraction(mixture, x: torch.Tensor, n_std: float = 3.0) -> float:
    """Fraction of the points farther than ``n_std`` standard deviations from every mode: the mass a
    continuous one-step map must leave on the seams between separated modes."""
    d = torch.cdist(x.detach().float().cpu(), mixture.means).min(1).values
    return float((d > n_std * mixture.std).float().mean())


def mode_weight_tv(mixture, x: torch.Tensor, n_std: float = 3.0) -> float:
    """Total variation between the shares of the on-mode points per mode (nearest mode, within ``n_std``
    standard deviations) and the mixture's weights: how unevenly the generator splits its mass."""
    d = torch.cdist(x.detach().float().cpu(), mixture.means)
    near, idx = d.min(1)
    on = near <= n_std * mixture.std
    if not bool(on.any()):
        return 1.0
    share = torch.bincount(idx[on], minlength=mixture.n_components).float()
    return float(0.5 * (share / share.sum() - mixture.weights).abs().sum())


class ToyEvaluator:
    """``eval_fn`` of :func:`train_dmd2` on a 2-D mixture: sliced W2 of ``n`` generator samples to a
    *validation* reference (generator noise seed ``noise_seed``) and, from fresh generator noise, to a
    held-out *test* reference; the two references are independent stratified samples. The
    hyper-parameter search reads ``sw_val`` only, the claims ``sw_test`` (and ``off_mode_test``, the
    share of test samples off every mode, :func:`off_mode_fraction`, and ``mode_tv_test``, how unevenly
    the on-mode ones split over the modes, :func:`mode_weight_tv`). ``keep`` > 0 also returns
    that many test samples (float16) under ``"samples"`` for the explorer."""

    def __init__(self, mixture, n: int = 2000, seed: int = 0, noise_seed: int = 7, keep: int = 0,
                 n_projections: int = 256):
        self.val = stratified_sample(mixture, n, seed + 1)
        self.test = stratified_sample(mixture, n, seed + 2)
        self.n, self.noise_seed, self.keep, self.mixture = n, noise_seed, keep, mixture
        # the projections of fedlib.metrics.sliced_wasserstein (seed 0), the references' sorted once
        g = torch.Generator().manual_seed(0)
        dirs = torch.randn(2, n_projections, generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        self._sorted = {id(self.val): (self.val.double() @ self.dirs).sort(0).values,
                        id(self.test): (self.test.double() @ self.dirs).sort(0).values}

    def sw(self, x: torch.Tensor, reference: torch.Tensor) -> float:
        """Sliced W2 of ``x`` (n points) to ``self.val`` or ``self.test``: the value of
        :func:`fedlib.metrics.sliced_wasserstein`, with the reference's projections sorted once."""
        ref = self._sorted[id(reference)]
        px = (x.detach().double().cpu() @ self.dirs).sort(0).values
        if len(px) != len(ref):
            raise ValueError(f"ToyEvaluator compares {len(ref)} points with {len(ref)}; got {len(px)}")
        return float(((px - ref) ** 2).mean().sqrt())

    def __call__(self, generator: Denoiser, times: torch.Tensor) -> dict:
        x_val = generate(generator, times, self.n, shape=(2,), seed=self.noise_seed)
        x_test = generate(generator, times, self.n, shape=(2,), seed=self.noise_seed + 1)
        out = {"sw_val": self.sw(x_val, self.val), "sw_test": self.sw(x_test, self.test),
               "off_mode_test": off_mode_fraction(self.mixture, x_test),
               "mode_tv_test": mode_weight_tv(self.mixture, x_test)}
        if self.keep:
            out["samples"] = x_test[: self.keep].half().cpu()
        return out


def coordinate_search(evaluate, grids: dict, start: dict) -> tuple[dict, list[dict]]:
    """Search one hyper-parameter at a time, in the order of ``grids``, over its grid with the others
    at their best so far. ``evaluate(params) -> per-seed scores`` (lower is better; called once per
    distinct ``params``). Returns (best params, records [{"param", "value", "seed", "score"}])."""
    best, cache, records = dict(start), {}, []
    for name, values in grids.items():
        means = {}
        for v in values:
            params = {**best, name: v}
            key = tuple(sorted(params.items()))
            if key not in cache:
                cache[key] = [float(s) for s in evaluate(params)]
            records += [{"param": name, "value": v, "seed": i, "score": s} for i, s in enumerate(cache[key])]
            means[v] = sum(cache[key]) / len(cache[key])
        best[name] = min(means, key=means.get)
    return best, records


# ---------------------------------------------------------------------------------------------
# Evaluation helpers (the notebook's comparison table)


@torch.no_grad()
def teacher_baselines(teacher: Denoiser, x_T: torch.Tensor, nfes, samplers, score, schedule_name: str = "edm",
                      batch_size: int = 1000) -> list[dict]:
    """The teacher at each NFE with each sampler (``schedule_name`` grid, ``nfe`` steps; samplers
    whose NFE is one per step), all from the same noise ``x_T``. ``score(x) -> float`` (lower is
    better). Rows: nfe, sampler, score, seconds per 1000 samples, and ``best`` (the lowest score
    at that NFE: the teacher "with its best sampler")."""
    from ..diffusion.samplers import nfe_for_steps, solve
    from ..diffusion.schedules import schedule

    rows = []
    for nfe in nfes:
        times = schedule(schedule_name, teacher.process, int(nfe))
        for name in samplers:
            if nfe_for_steps(name, int(nfe)) != int(nfe):
                raise ValueError(f"sampler {name!r} does not take one network evaluation per step; "
                                 "use euler, dpm_solver_pp_2m/3m, ipndm or unipc here")
            start = time.perf_counter()
            x, used = solve(teacher, x_T, times, name, batch_size=batch_size)
            seconds = time.perf_counter() - start
            if used != nfe:
                raise RuntimeError(f"{name} used {used} network evaluations on a {nfe}-step grid")
            rows.append({"nfe": int(nfe), "sampler": name, "score": float(score(x)),
                         "s_per_1000": seconds / len(x_T) * 1000, "samples": x})
        best = min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["score"])
        for r in rows:
            if r["nfe"] == nfe:
                r["best"] = r is best
    return rows


def timed_sample(result: DMD2Result, n: int, seed: int = 0, device=None) -> tuple[torch.Tensor, float]:
    """(``n`` student samples, seconds per 1000 samples)."""
    start = time.perf_counter()
    x = result.sample(n, seed=seed, device=device)
    return x, (time.perf_counter() - start) / n * 1000
