"""One command for a lent GPU: every benchmark with ``--device cuda`` and every notebook's ``paper``
set as a short smoke on stand-in data, each step's result kept even when another fails.

    python scripts/gpu_suite.py --device cuda            # make gpu: benchmarks -> benchmarks/results/<name>-<gpu>.json,
                                                         # notebooks (set paper_smoke) -> results/paper/
    python scripts/gpu_suite.py --device cpu --tiny --out /tmp/suite   # the same steps with tiny sizes (the test)

The notebooks' ``paper_smoke`` parameter set (``notebooks/params/*.yaml``) is the ``paper`` set (the
papers' model sizes) with few steps on stand-in data; with ``--tiny`` the ``smoke`` set runs instead.
A summary of every step (command, status, seconds) is written to ``<out>/gpu_suite-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

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

# benchmarks that measure this CPU machine and have no GPU form (why, for each)
CPU_ONLY = {"reproduce_time": "the quick reproduction a newcomer's `make reproduce` runs on the CPU, cold and warm"}


def script_of(name: str) -> Path:
    return REPO / "benchmarks" / f"{name.split('_resnet')[0]}.py"


def run_step(cmd: list[str], log: Path, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    return {"command": " ".join(cmd), "status": status, "seconds": round(time.perf_counter() - start, 1),
            "log": str(log)}


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
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = {}
    for name in args.benchmarks:
        full, tiny = BENCHMARKS[name]
        cmd = [sys.executable, str(script_of(name)), "--device", args.device, *(tiny if args.tiny else full)]
        if args.tiny:  # tiny numbers must never overwrite the committed benchmark results
            cmd += ["--out", str(out / f"{name}-tiny.json")]
        print(f"benchmark {name} ...", flush=True)
        steps[f"benchmark {name}"] = run_step(cmd, logs / f"{name}.log", args.timeout)
        print(f"  {steps[f'benchmark {name}']['status']} ({steps[f'benchmark {name}']['seconds']} s)", flush=True)
    if args.notebooks is None or args.notebooks:
        scale = "smoke" if args.tiny else "paper_smoke"
        cmd = [sys.executable, "-m", "fedlib", "reproduce", *(args.notebooks or []), "--scale", scale,
               "--device", args.device, "--out", str(out)]
        print(f"notebooks ({scale}) ...", flush=True)
        steps["notebooks"] = run_step(cmd, logs / "notebooks.log", args.timeout * 3)
        print(f"  {steps['notebooks']['status']} ({steps['notebooks']['seconds']} s)", flush=True)
    summary = out / f"gpu_suite-{args.device}.json"
    summary.write_text(json.dumps({"device": args.device, "tiny": args.tiny, "steps": steps}, indent=1) + "\n")
    failed = [k for k, v in steps.items() if v["status"] != "ok"]
    print(f"summary: {summary}" + (f"; failed: {', '.join(failed)} (see their logs)" if failed else "; all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
