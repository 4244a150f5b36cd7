"""Sampling overhead: the time a sampler spends outside network evaluations, as a fraction of the
network time (the goal is zero), per solver.

Two measurements per solver, medians of ``--repeats`` interleaved repeats:

- ``direct``: within one solve, the time spent inside the denoiser calls is clocked around each call
  (synchronised on a GPU) and subtracted from the solve's wall time: overhead = outside / inside.
  Robust to a shared machine's changing load, since both parts come from the same run.
- ``vs_bare``: the full solve against a bare loop making the same NFE denoiser calls on the same
  batch and nothing else (each synchronised once at the end): (t_solve - t_bare) / t_bare. The
  peer is that bare loop: a sampler with zero overhead would match it. Noisy on a loaded CPU.

Configurations: ``digits`` (fedlib's digits teacher U-Net, 8x8, batch 500) and ``cifar`` (the
``paper`` set's 32x32x3 U-Net, batch 128). Untrained weights: timing does not depend on them.

    .venv/bin/python benchmarks/sampler_overhead.py                       # CPU: digits
    .venv/bin/python benchmarks/sampler_overhead.py --device cuda --configs digits cifar
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlib.diffusion import get_sampler, make_teacher, schedule
from fedlib.results import write_benchmark
from fedlib.utils import resolve_device

CONFIGS = {"digits": dict(teacher="digits", shape=(1, 8, 8), batch=500),
           "cifar": dict(teacher="cifar10", shape=(3, 32, 32), batch=128)}
SOLVERS = ["euler", "heun", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(cfg: dict, device, nfe: int, repeats: int) -> dict:
    den = make_teacher(cfg["teacher"]).to(device).eval()
    x_T = den.process.prior((cfg["batch"], *cfg["shape"]), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for solver in SOLVERS:
        steps = nfe // 2 if solver == "heun" else nfe
        times = schedule("edm", den.process, steps).to(device)
        fn = get_sampler(solver)
        _, used = fn(den, x_T, times)  # warm-up, and the exact NFE
        call_t = [times[min(i, steps - 1)] for i in range(used)]

        def bare():
            x = x_T
            for t in call_t:
                x = den(x, t, t)
            return x

        inside = [0.0]

        class Timed:  # the denoiser, clocked around each call
            process = den.process

            def __call__(self, x, t, tn=None):
                _sync(device)
                t0 = time.perf_counter()
                y = den(x, t, tn)
                _sync(device)
                inside[0] += time.perf_counter() - t0
                return y

        timed = Timed()

        direct = []
        for _ in range(repeats):
            inside[0] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            fn(timed, x_T, times)
            _sync(device)
            total = time.perf_counter() - t0
            direct.append(((total - inside[0]) / inside[0], total - inside[0]))
        t_solve, t_bare = [], []
        for _ in range(repeats):
            for which, f, acc in (("solve", lambda: fn(den, x_T, times), t_solve), ("bare", bare, t_bare)):
                _sync(device)
                t0 = time.perf_counter()
                f()
                _sync(device)
                acc.append(time.perf_counter() - t0)
        s, b = statistics.median(t_solve), statistics.median(t_bare)
        frac = statistics.median(d[0] for d in direct)
        outside = statistics.median(d[1] for d in direct)
        out[solver] = {"nfe": used, "overhead_fraction": frac, "outside_network_s": outside,
                       "solve_s": s, "bare_network_loop_s": b, "overhead_fraction_vs_bare": (s - b) / b}
        print(f"{solver:18s} NFE {used:2d}: outside the network {1e3 * outside:7.2f} ms = {100 * frac:5.2f}% of network "
              f"time | vs bare loop: solve {1e3 * s:8.2f} ms, bare {1e3 * b:8.2f} ms ({100 * (s - b) / b:+.1f}%)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", nargs="+", default=["digits"], choices=list(CONFIGS))
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    results = {c: measure(CONFIGS[c], device, args.nfe, args.repeats) for c in args.configs}
    write_benchmark("sampler_overhead", {"peer": "bare loop of the same NFE denoiser calls", "nfe": args.nfe,
                                         "repeats": args.repeats, "threads": args.threads, "results": results},
                    device, args.out)


if __name__ == "__main__":
    main()
