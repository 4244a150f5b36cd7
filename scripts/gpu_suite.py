"""One command for a lent GPU: every benchmark with ``--device cuda`` and every notebook's ``paper``
set as a short smoke on stand-in data, each step's result kept even when another fails.

    python scripts/gpu_suite.py --device cuda            # make gpu: benchmarks -> benchmarks/results/<name>-<gpu>.json,
                                                         # notebooks (set paper_smoke) -> results/paper/
    python scripts/gpu_suite.py --device cpu --tiny --out /tmp/suite   # the same steps with tiny sizes (the test)

The notebooks' ``paper_smoke`` parameter set (``notebooks/params/*.yaml``) is the ``paper`` set (the
papers' model sizes) with few steps on stand-in data. With ``--tiny`` each notebook runs that same set, at
the paper's shapes and model sizes, with the step counts and sample sizes of :data:`PAPER_TINY` (one
notebook at a time, each its own step): it checks on the CPU that every cell of the paper path goes
through, so a lent GPU's few minutes are not lost to a shape error.
A summary of every step (command, status, seconds) is written to ``<out>/gpu_suite-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a clone: fedlib is the checkout's
from fedlib import runner  # noqa: E402  (the notebooks' names and prefixes, as `python -m fedlib reproduce` reads them)

# benchmark -> (arguments at full size, arguments at tiny size); "--device" and "--out" are added
BENCHMARKS = {
    "federated_round": (["--clients", "10,50,100"], ["--clients", "3", "--samples-per-client", "8", "--repeats", "1"]),
    "federated_round_resnet": (["--arch", "resnet", "--chunk", "25", "--clients", "10,50,100"],
                               ["--arch", "resnet", "--clients", "2", "--samples-per-client", "4", "--repeats", "1"]),
    "flower_round": (["--clients", "10", "50", "100", "--gpu-fraction", "0.1", "--no-plot"],
                     ["--clients", "2", "--no-plot"]),
    "feddm_throughput": (["--configs", "digits", "fashion", "cifar", "--steps", "20"],
                         ["--configs", "digits", "--steps", "1", "--no-sequential"]),
    "sampler_overhead": (["--configs", "digits", "cifar"], ["--configs", "digits", "--nfe", "2", "--repeats", "1"]),
    "ld3_train_time": (["--configs", "digits", "cifar"], ["--configs", "digits", "--pairs", "2", "--nfe", "2"]),
    "dmd2_speed": (["--batch", "256"], ["--batch", "8", "--teacher-steps", "5", "--nfe", "2", "--repeats", "1"]),
}

# --tiny: the overrides that shrink each notebook's paper_smoke set to CPU seconds (steps, samples, seeds,
# rounds) and keep what the GPU would exercise: its dataset and image shape, its models and their widths,
# its scenarios, methods and samplers. Each value must still pass the set's declared ranges. Where a set
# asks for a GPU machine's 16 CPU threads, the CPU check runs at one, as every CPU run here does.
PAPER_TINY = {
    "00_data_and_partitions": {"toy_points": 500},
    "01_fedgo_weighting": {"max_train": 400, "max_test": 100, "client_counts": [4], "rounds": 1, "gan_steps": 2,
                           "free_gen_steps": 2, "dense_steps": 1, "toy_epochs": 1, "toy_disc_epochs": 1,
                           "toy_distill_steps": 2, "distill_batch": 32, "batch_size": 32, "client_chunk": 4},
    "02_feddm": {"n_train": 200, "n_val": 50, "n_clients": 2, "rounds": 1, "local_steps": 1, "batch_size": 8,
                 "n_eval": 50, "n_reference": 100, "sample_steps": 2, "feature_steps": 5, "vmap_chunk": 2},
    "03_ld3_learned_timesteps": {"teacher_steps": 5, "fashion_teacher_steps": 5, "toy_teacher_steps": 5,
                                 "feature_steps": 5, "fashion_feature_steps": 5, "ld3_nfes": [4], "ld3_train": 4,
                                 "ld3_val": 2, "n_eval": 50, "toy_eval": 100},
    "04_dmd2_one_step": {"cpu_threads": 1, "seeds": [0], "teacher_steps": 5, "toy_teacher_steps": 20, "steps": 2,
                         "batch_size": 8, "n_eval": 32, "feature_steps": 5, "toy_steps": 20, "toy_eval_every": 5,
                         "toy_eval": 500, "teacher_nfes": [1, 2, 4]},
    "05_pipeline": {"max_train": 300, "max_test": 100, "n_clients": 2, "feddm_local_steps": 1, "feddm_batch": 8,
                    "ld3_nfes": [4], "ld3_pairs": 2, "teacher_nfe": 6, "dmd2_steps": 2, "dmd2_batch": 8,
                    "gan_steps": 2, "n_eval": 50, "feature_steps": 5},
    "06_dataset_distillation": {"cpu_threads": 1, "ipcs": [1, 10], "seeds": [0], "iterations": 3, "eval_steps": 5,
                                "n_freqs": 64, "batch_real": 64, "fedlgd_clients": 2, "fedlgd_rounds": 1,
                                "fedlgd_local_steps": 2, "fedlgd_dm_iterations": 1, "fedlgd_server_steps": 1,
                                "fedlgd_refresh_iterations": 1},
    "07_learned_proximal_networks": {"cpu_threads": 1, "seeds": [0], "prior_steps": 3, "prior_batch": 256,
                                     "prior_hidden": 32, "val_size": 200, "steps": 3, "batch": 32, "pnp_iters": 3,
                                     "n_test": 50},
    "08_fedka_domain_generalisation": {"cpu_threads": 1, "rounds": 1, "width": 8, "workspace_batch": 32,
                                       "domains": ["original", "inverted", "noisy"], "targets": ["noisy"]},
}


def tiny_params(notebook: str) -> list[str]:
    """``-p KEY=VALUE`` arguments of :data:`PAPER_TINY` for one notebook (JSON values, which YAML reads)."""
    return [a for k, v in PAPER_TINY[notebook].items() for a in ("-p", f"{k}={json.dumps(v)}")]


# benchmarks that measure this CPU machine and have no GPU form (why, for each)
CPU_ONLY = {"reproduce_time": "the quick reproduction a newcomer's `make reproduce` runs on the CPU, cold and warm"}


def script_of(name: str) -> Path:
    return REPO / "benchmarks" / f"{name.split('_resnet')[0]}.py"


def run_step(name: str, cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one step to its log, bounded by ``timeout``; print and return its command, status and seconds."""
    print(f"{name} ...", flush=True)
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    step = {"command": " ".join(cmd), "status": status, "seconds": round(time.perf_counter() - start, 1),
            "log": str(log)}
    print(f"  {status} ({step['seconds']} s)", flush=True)
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (a lent GPU) | cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: checks the command, measures nothing")
    ap.add_argument("--out", default=str(REPO / "results" / "paper"), help="notebook results and logs")
    ap.add_argument("--benchmarks", nargs="*", default=list(BENCHMARKS), help="benchmarks to run (default all)")
    ap.add_argument("--notebooks", nargs="*", default=None, help="notebooks to run (default all; none: skip)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per step")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {args.device}: this machine has no CUDA GPU; allowed here: cpu (with --tiny)",
                  file=sys.stderr)
            return 2
    unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
    if unknown:
        print(f"error: unknown benchmarks {unknown}; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:  # None: every notebook; []: none
        names = [] if args.notebooks == [] else runner.resolve_names(args.notebooks or [], runner.notebooks())
    except runner.UsageError as e:
        print(f"error: --notebooks: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = {}
    # --tiny trains its teachers and feature nets in a cache of its own (<out>/cache): the cache keys name
    # steps, seed and data but not the thread count or device a model was trained with, so a tiny run's
    # models must never be read by a real run (a test's 16-thread 2-D teacher once changed notebook 04's
    # quick numbers in CI)
    env = {**os.environ, "FEDLIB_CACHE": str((out / "cache").resolve())} if args.tiny else None
    for name in args.benchmarks:
        full, tiny = BENCHMARKS[name]
        cmd = [sys.executable, str(script_of(name)), "--device", args.device, *(tiny if args.tiny else full)]
        if args.tiny:  # tiny numbers must never overwrite the committed benchmark results
            cmd += ["--out", str(out / f"{name}-tiny.json")]
        steps[f"benchmark {name}"] = run_step(f"benchmark {name}", cmd, logs / f"{name}.log", args.timeout, env)
    reproduce = [sys.executable, "-m", "fedlib", "reproduce", "--scale", "paper_smoke", "--device", args.device,
                 "--out", str(out)]
    if args.tiny:  # one step per notebook: each with its own overrides, and one failure names its notebook
        for nb in names:
            steps[f"notebook {nb}"] = run_step(f"notebook {nb} (paper_smoke, tiny)",
                                               [*reproduce, nb, "--jobs", "1", *tiny_params(nb)], logs / f"{nb}.log",
                                               args.timeout, env)
    elif names:
        steps["notebooks"] = run_step("notebooks (paper_smoke)", [*reproduce, *names], logs / "notebooks.log",
                                      args.timeout * 3)
    summary = out / f"gpu_suite-{args.device}.json"
    summary.write_text(json.dumps({"device": args.device, "tiny": args.tiny, "steps": steps}, indent=1) + "\n")
    failed = [k for k, v in steps.items() if v["status"] != "ok"]
    print(f"summary: {summary}" + (f"; failed: {', '.join(failed)} (see their logs)" if failed else "; all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
