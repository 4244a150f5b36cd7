"""LD3 training time for one (solver, NFE) at the paper's protocol (papers.md section 4: 50 train +
50 validation teacher pairs, 2 rounds on theta then 5 on theta and phi, batch 2, validation after
every step, soft ball-relaxed objective), against the paper's 5-10 minutes on one GPU for CIFAR-10.

Configurations: ``digits`` (fedlib's digits teacher U-Net, 8x8) and ``cifar`` (the ``paper`` set's
32x32x3 U-Net on seeded stand-in noise pairs). Untrained weights: the time does not depend on them
(the teacher pairs come from the same network at NFE 20).

    .venv/bin/python benchmarks/ld3_train_time.py                         # CPU: digits
    .venv/bin/python benchmarks/ld3_train_time.py --device cuda --configs digits cifar
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlib import ld3
from fedlib.diffusion import make_teacher
from fedlib.results import write_benchmark
from fedlib.utils import resolve_device

CONFIGS = {"digits": dict(teacher="digits", shape=(1, 8, 8)), "cifar": dict(teacher="cifar10", shape=(3, 32, 32))}
PAPER_MINUTES = (5, 10)


def measure(cfg, device, solver, nfe, n_pairs, loss):
    den = make_teacher(cfg["teacher"]).to(device).eval()
    tr = ld3.teacher_pairs(den, n_pairs, cfg["shape"], seed=1, device=device)
    va = ld3.teacher_pairs(den, n_pairs, cfg["shape"], seed=2, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    s = ld3.learned_timesteps(den, nfe, tr, va, ld3.LD3Config(solver=solver, rounds_theta=2, rounds_both=5, batch=2),
                              loss=loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"{cfg['teacher']}: LD3 {solver} NFE {nfe}: {wall:.1f} s ({s.history['steps']} steps)")
    return {"solver": solver, "nfe": nfe, "pairs": n_pairs, "steps": s.history["steps"], "wall_time_s": wall,
            "ratio_to_paper_5min": wall / (PAPER_MINUTES[0] * 60)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", nargs="+", default=["digits"], choices=list(CONFIGS))
    ap.add_argument("--solver", default="ipndm")
    ap.add_argument("--nfe", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--loss", default="l2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    results = {c: measure(CONFIGS[c], device, args.solver, args.nfe, args.pairs, args.loss) for c in args.configs}
    write_benchmark("ld3_train_time", {"peer": "LD3 paper: 5-10 min on one GPU (CIFAR-10)", "results": results,
                                       "threads": args.threads}, device, args.out)


if __name__ == "__main__":
    main()
