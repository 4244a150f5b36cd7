"""One federated round of K small-CNN clients on digits-sized data: vectorised (torch.func vmap) vs
the sequential reference (one model per client, torch.optim.SGD), timed in the same run.

    python benchmarks/federated_round.py --device cpu            # -> benchmarks/results/federated_round-cpu.json
    python benchmarks/federated_round.py --device cuda           # -> ...-cuda.json (GPU name recorded)
    python benchmarks/federated_round.py --device cuda --arch resnet --chunk 25   # paper-scale ResNet throughput

The data are the real 8x8 digits training images repeated to K clients of a Dirichlet(0.5) split's
sizes (each client keeps its own samples; clients are not truncated). A round = 1 local epoch of SGD
(batch 32, momentum 0.9) on every client + FedAvg. Times are the median of ``--repeats`` runs after
one warm-up. The issue's floor: vectorised >= 5x faster for K = 50 on a GPU, not slower on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedlib import data as fdata
from fedlib import federated as fl
from fedlib import models
from fedlib.utils import resolve_device

ROOT = Path(__file__).resolve().parent


def one_round(model, w, clients, vectorised, seed=0, chunk="auto"):
    local = fl.local_train(model, w, clients, epochs=1, lr=0.05, momentum=0.9, batch_size=32,
                           generator=torch.Generator().manual_seed(seed), vectorised=vectorised, chunk_size=chunk)
    out = fl.fedavg(local, clients.n_k)
    if clients.x.is_cuda:
        torch.cuda.synchronize()
    return out


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    p.add_argument("--clients", default="10,50,100", help="comma-separated K values")
    p.add_argument("--samples-per-client", type=int, default=72, help="mean client size (digits FedGO split: ~72)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet"],
                   help="small_cnn on digits (default) or the paper-scale ResNet on CIFAR-10-shaped stand-in data")
    p.add_argument("--chunk", type=int, default=0, help="clients per vmap chunk (0: local_train's auto)")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/federated_round-<device>.json)")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    if args.arch == "resnet":
        train = fdata.stand_in("cifar10", "train", n=4096, seed=0).to(dev)
        model = models.ResNet(3, 10, width=16).to(dev)
    else:
        train = fdata.load_digits("train").to(dev)
        model = models.SmallCNN(1, 10, width=8).to(dev)
    chunk = args.chunk or "auto"
    w = fl.get_params(model)
    rows = []
    for K in [int(k) for k in args.clients.split(",")]:
        n = K * args.samples_per_client
        idx = np.arange(n) % len(train)  # repeat the digits when K * n_k exceeds them
        parts = fdata.dirichlet_partition(train.y.cpu().numpy()[idx], K, 0.5, seed=0, min_size=2)
        clients = fl.pack_clients(train.x[torch.as_tensor(idx, device=dev)], train.y[torch.as_tensor(idx, device=dev)],
                                  [torch.as_tensor(q) for q in parts])
        vec, vec_all = timed(lambda: one_round(model, w, clients, True, chunk=chunk), args.repeats)
        seq, seq_all = timed(lambda: one_round(model, w, clients, False), args.repeats)
        a, b = one_round(model, w, clients, True, chunk=chunk), one_round(model, w, clients, False)
        diff = max((a[n_] - b[n_]).abs().max().item() for n_ in a)
        row = {"K": K, "samples": n, "max_client": int(clients.n_k.max()), "vectorised_s": vec, "sequential_s": seq,
               "speedup": seq / vec, "vectorised_all_s": vec_all, "sequential_all_s": seq_all,
               "max_abs_diff_after_fedavg": diff, "samples_per_s_vectorised": n / vec,
               "samples_per_s_sequential": n / seq}
        rows.append(row)
        print(f"K={K:4d}  vectorised {vec:7.3f} s  sequential {seq:7.3f} s  speedup x{seq / vec:5.2f}  (diff {diff:.1e})",
              flush=True)
    name = ("cuda" if dev.type == "cuda" else "cpu") if args.arch == "small_cnn" else f"resnet-{dev.type}"
    out = Path(args.out) if args.out else ROOT / "results" / f"federated_round-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "federated_round",
        "what": f"one round (1 local epoch, SGD batch 32, + FedAvg) of K {type(model).__name__} clients "
                f"({models.n_params(model)} parameters) on {train.name} {tuple(train.x.shape[1:])}",
        "chunk": args.chunk or "auto",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "peer": "sequential reference (fedlib.federated.local_train(vectorised=False))",
        "floor": "vectorised >= 5x faster than sequential at K=50 on GPU; not slower on CPU",
        "rows": rows,
        "ratios": {f"K={r['K']}": r["speedup"] for r in rows},
    }
    out.write_text(json.dumps(result, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
