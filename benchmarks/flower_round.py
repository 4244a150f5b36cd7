"""Wall time of one federated round (FedAvg, digits, SmallCNN, 1 local epoch, batch 32, momentum 0.9, IID
split of the digits training set) for K clients, three ways, in one run:

- ``inprocess``: fedlib in-process, all K clients in one ``torch.func.vmap`` (:func:`fedlib.distill.run_rounds`);
- ``flower``: fedlib on Flower's simulation engine (Ray), one ClientApp per client
  (``fedlib.backends.run_rounds(..., backend="flower")``); the round is timed from the first message sent to the aggregate, and
  the one-off start-up (Ray, actors, node discovery) is reported beside it;
- ``sequential``: a plain PyTorch loop, one ``nn.Module`` and ``torch.optim.SGD`` per client, then a
  state-dict average (no fedlib).

Each round also evaluates the global model on the test set (all three). The in-process and sequential
rounds are timed once after one warm-up round; Flower runs two rounds and the second (warm actors) is
"the round"; the first is reported too. One run each: on a shared machine the numbers carry its load
(recorded as ``load_average``). The in-process and sequential paths use ``--threads`` intra-op threads
(default 1: on this shared 2-core machine two threads oversubscribe and ran 10-40x slower); each Flower
actor uses one thread, with as many actors as Ray has CPUs (2 here), so Flower gets twice the cores.

    .venv/bin/python benchmarks/flower_round.py                       # CPU, K = 10 50 100
    .venv/bin/python benchmarks/flower_round.py --device cuda --gpu-fraction 0.1 --cpus-per-client 1
    (figures/flower_round_benchmark.png on CPU, figures/flower_round_benchmark-cuda.png on a GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

from fedlib import flower as FW  # first: keeps the local Ray on loopback

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fedlib import backends  # noqa: E402
from fedlib import data as D  # noqa: E402
from fedlib import distill as DS  # noqa: E402
from fedlib import federated as fl  # noqa: E402
from fedlib import models as Mo  # noqa: E402
from fedlib.utils import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM, BATCH, EPOCHS = 0.05, 0.9, 32, 1


def sequential_round(model, x, y, parts, test_x, test_y, seed: int) -> float:
    """The plain PyTorch baseline: train each client's copy in turn, average the state dicts."""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    states, n_k = [], []
    for idx in parts:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)
        xk, yk = x[idx], y[idx]
        for _ in range(EPOCHS):
            for b in torch.randperm(len(idx), generator=g).split(BATCH):
                b = b.to(x.device)
                loss = F.cross_entropy(m(xk[b]), yk[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        states.append(m.state_dict())
        n_k.append(len(idx))
    w = torch.tensor(n_k, dtype=torch.float32) / sum(n_k)
    avg = {n: sum(w[k] * states[k][n] for k in range(len(states))) for n in states[0]}
    m = copy.deepcopy(model)
    m.load_state_dict(avg)
    with torch.no_grad():
        (m(test_x).argmax(-1) == test_y).float().mean().item()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def inprocess_round(model, setup, init, seed: int) -> float:
    t0 = time.perf_counter()
    DS.run_rounds(model, [setup], ("fedavg",), rounds=1, local_epochs=EPOCHS, lr=LR, momentum=MOMENTUM,
                  batch_size=BATCH, init=init, generator=torch.Generator().manual_seed(seed))
    if setup.test_x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per ClientApp actor")
    ap.add_argument("--gpu-fraction", type=float, default=0.0, help="GPU share per ClientApp actor (cuda)")
    ap.add_argument("--ray-address", default=None, help="join a running Ray cluster ('auto' or head:6379)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/flower_round-<device>.json)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of the in-process and sequential paths (Flower's actors use 1 each)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON at --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    tag = "cpu" if device.type == "cpu" else "cuda-" + name
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"flower_round-{tag}.json")
    figure = "flower_round_benchmark" + ("" if device.type == "cpu" else "-cuda")
    if args.plot_only:
        plot(json.loads(out.read_text())["rows"], name, figure)
        return

    torch.manual_seed(0)
    train, test = D.load_digits("train").to(device), D.load_digits("test").to(device)
    model = Mo.make_classifier("small_cnn", train.shape, train.n_classes).to(device)
    init = fl.get_params(model)
    opts = FW.FlowerOptions(num_cpus_per_client=args.cpus_per_client, num_gpus_per_client=args.gpu_fraction,
                            ray_address=args.ray_address)
    rows = []
    # warm-up of the in-process and sequential paths (first vmap / autograd calls)
    warm = D.iid_partition(len(train), 10, seed=0)
    inprocess_round(model, DS.Setup(fl.pack_clients(train.x, train.y, warm), train.x[:64], test.x, test.y), init, 0)
    sequential_round(model, train.x, train.y, warm, test.x, test.y, 0)
    for K in args.clients:
        parts = D.iid_partition(len(train), K, seed=0)
        setup = DS.Setup(fl.pack_clients(train.x, train.y, parts), train.x[:64], test.x, test.y)
        t_in = inprocess_round(model, setup, init, 1)
        t_seq = sequential_round(model, train.x, train.y, parts, test.x, test.y, 1)
        t0 = time.perf_counter()
        res = backends.run_rounds(model, [setup], ("fedavg",), rounds=2, local_epochs=EPOCHS, lr=LR,
                                  momentum=MOMENTUM, batch_size=BATCH, init=init,
                                  generator=torch.Generator().manual_seed(1), backend="flower", options=opts)
        t_total = time.perf_counter() - t0
        rep = res.report
        row = {"K": K, "samples_per_client": float(np.mean([len(p) for p in parts])),
               "inprocess_vectorised_s": t_in, "sequential_pytorch_s": t_seq,
               "flower_round_s": rep.round_seconds[1], "flower_first_round_s": rep.round_seconds[0],
               "flower_startup_s": rep.setup_seconds, "flower_total_s": t_total,
               "flower_failures": len(rep.events),
               "ratio_flower_over_inprocess": rep.round_seconds[1] / t_in,
               "ratio_sequential_over_inprocess": t_seq / t_in,
               "ratio_flower_over_sequential": rep.round_seconds[1] / t_seq,
               "bytes_per_round": rep.ledger.total(round=2), "flower_wire_bytes_per_round": rep.wire.total(round=2)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    at50 = next((r for r in rows if r["K"] == 50), None)
    result = {
        "benchmark": "flower_round", "device": str(device), "device_name": name,
        "setup": {"data": "digits train (IID)", "model": "small_cnn", "params": fl.state_bytes(model) // 4,
                  "local_epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "momentum": MOMENTUM,
                  "inprocess_threads": args.threads, "flower_cpus_per_client": args.cpus_per_client,
                  "flower_gpu_fraction": args.gpu_fraction,
                  "ray_address": args.ray_address,
                  "ray_actors_local": int((os.cpu_count() or 1) // max(args.cpus_per_client, 1e-9))},
        "peer": "Flower simulation (Ray) and a plain sequential PyTorch loop, vs fedlib in-process vectorised",
        "rows": rows,
        "floor": {"claim": "in-process vectorised >= 3x faster than Flower simulation at K = 50 (CPU)",
                  "ratio": at50["ratio_flower_over_inprocess"] if at50 else None,
                  "holds": (at50["ratio_flower_over_inprocess"] >= 3.0) if at50 else None},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "flwr": __import__("flwr").__version__,
                    "ray": __import__("ray").__version__},
        "note": "one run; Flower's round excludes its start-up (flower_startup_s, paid once per run)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)
    if not args.no_plot:
        plot(rows, name, figure)


def plot(rows, name: str, figure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedlib.plots import savefig, use_style

    use_style()
    K = [r["K"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 4.0))
    for key, label, mk in (("inprocess_vectorised_s", "fedlib in-process (vmap)", "o"),
                           ("sequential_pytorch_s", "plain PyTorch loop", "s"),
                           ("flower_round_s", "fedlib on Flower sim. (Ray)", "^"),
                           ("flower_startup_s", "Flower start-up (once)", "x")):
        ax[0].plot(K, [r[key] for r in rows], marker=mk, label=label, ls=":" if key == "flower_startup_s" else "-")
    ax[0].set(xlabel="clients K", ylabel="seconds per round", yscale="log", title=f"one FedAvg round ({name})")
    ax[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    w = 0.38
    x = np.arange(len(K))
    ax[1].bar(x - w / 2, [r["ratio_flower_over_inprocess"] for r in rows], w, label="Flower / in-process")
    ax[1].bar(x + w / 2, [r["ratio_sequential_over_inprocess"] for r in rows], w, label="sequential / in-process")
    ax[1].axhline(3.0, color="k", lw=0.8, ls="--", label="floor 3x at K=50")
    ax[1].set(xticks=x, xticklabels=[str(k) for k in K], xlabel="clients K", ylabel="slowdown vs in-process")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    print("figure", savefig(fig, figure))


if __name__ == "__main__":
    main()
