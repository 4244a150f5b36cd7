"""Throughput of federated diffusion training (FedDM): client-steps/s and images/s of one FedDM round
(``fedlib.feddm.feddm_round``: local diffusion training of every client, FedAvg, byte accounting), with
all clients (and several variants' models) in one ``torch.func.vmap``, against the sequential reference
(one model and ``torch.optim.SGD`` per client, same code path with ``vectorised=False``).

Configurations (``--configs``), all on seeded data so no dataset is needed:

- ``digits``: 8x8, the notebook's default U-Net (channels 8, mults 1-2), K = 4 clients x 5 federated
  models (the quick run's vmap width: 20 models), batch 16;
- ``fashion``: 28x28 stand-in data, the ``fashion_mnist`` set's U-Net (channels 32, mults 1-2-2), K = 10 x 6
  models, batch 32;
- ``cifar``: 32x32x3 stand-in data, the ``paper`` set's U-Net (channels 64, mults 1-2-2-2), K = 10 x 1, batch 32.

Each measurement times ``--steps`` local steps after one warm-up round. On a shared CPU the numbers carry its
load (recorded as ``load_average``); ``--threads`` sets torch's intra-op threads (default 1: on this shared
2-core machine two threads oversubscribe).

    .venv/bin/python benchmarks/feddm_throughput.py                                  # CPU: digits
    .venv/bin/python benchmarks/feddm_throughput.py --device cuda --configs digits fashion cifar
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedlib import data as D
from fedlib import feddm as F
from fedlib.utils import resolve_device

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "digits": dict(data="digits", channels=8, mults=(1, 2), clients=4, models=5, batch=16),
    "fashion": dict(data="fashion_mnist", channels=32, mults=(1, 2, 2), clients=10, models=6, batch=32),
    "cifar": dict(data="cifar10", channels=64, mults=(1, 2, 2, 2), clients=10, models=1, batch=32),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: dict, device, steps: int, vectorised: bool) -> dict:
    ds = D.load_digits("train") if cfg["data"] == "digits" else D.stand_in(cfg["data"], "train", n=4096, seed=0)
    x, y = ds.x.to(device), ds.y.to(device)
    den = F.make_denoiser(x.shape[1], cfg["channels"], cfg["mults"], process="edm", prediction="edm").to(device)
    init = {0: {n: p.to(device) for n, p in F.params_of(den).items()}}
    parts = {"iid": [D.iid_partition(len(x), cfg["clients"], seed=0)]}
    variants = [F.Variant(f"m{i}") for i in range(cfg["models"])]
    groups = F.build_groups(den, x, y, parts, variants, [0], init)
    kw = dict(batch_size=cfg["batch"], lr=0.05, momentum=0.9, vectorised=vectorised)
    F.feddm_round(den, groups, 1, local_steps=1, generator=torch.Generator().manual_seed(0), **kw)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    F.feddm_round(den, groups, 2, local_steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    _sync(device)
    dt = time.perf_counter() - t0
    client_steps = steps * cfg["clients"] * cfg["models"]
    return {"vectorised": vectorised, "seconds": dt, "client_steps": client_steps,
            "client_steps_per_s": client_steps / dt, "images_per_s": client_steps * cfg["batch"] / dt,
            "parameters": sum(p.numel() for p in init[0].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--configs", nargs="+", default=["digits"], choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=10, help="local steps timed per configuration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-sequential", action="store_true", help="skip the sequential reference (the peer)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/feddm_throughput-<device>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = "cpu" if device.type == "cpu" else "cuda-" + torch.cuda.get_device_name(device).replace(" ", "_")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"feddm_throughput-{name}.json")
    results = {}
    for c in args.configs:
        cfg = CONFIGS[c]
        row = {"config": cfg, "vectorised": measure(cfg, device, args.steps, True)}
        if not args.no_sequential:
            row["sequential"] = measure(cfg, device, args.steps, False)
            row["speedup_vectorised_vs_sequential"] = (row["vectorised"]["client_steps_per_s"]
                                                       / row["sequential"]["client_steps_per_s"])
        results[c] = row
        print(c, json.dumps({k: v for k, v in row.items() if k != "config"}, indent=1))
    doc = {"benchmark": "feddm_throughput", "device": name, "threads": args.threads, "steps": args.steps,
           "peer": "sequential reference: one model + torch.optim.SGD per client (local_train vectorised=False)",
           "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
           "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
