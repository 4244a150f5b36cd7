"""`make gpu` (scripts/gpu_suite.py): the one command a lent GPU runs. Here it runs with tiny sizes on
the CPU, which checks that every benchmark and the notebooks' paper sets still go through it (each
notebook's paper set on its own: tests/test_paper_sets.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gpu_suite  # noqa: E402


def test_every_benchmark_is_in_the_suite():
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    suite = {gpu_suite.script_of(name).stem for name in gpu_suite.BENCHMARKS}
    assert scripts == suite | set(gpu_suite.CPU_ONLY), "a benchmark is in the GPU suite or declared CPU-only"
    assert not suite & set(gpu_suite.CPU_ONLY) and all(gpu_suite.CPU_ONLY.values()), "each CPU-only one says why"


def test_the_suite_runs_every_step_with_tiny_sizes(tmp_path):
    theirs = tmp_path / "the caller's cache"  # a real run's cache: --tiny must leave it as it was
    done = subprocess.run([sys.executable, "scripts/gpu_suite.py", "--device", "cpu", "--tiny", "--out", str(tmp_path),
                           "--notebooks", "00_data_and_partitions"], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "FEDLIB_CACHE": str(theirs)})
    summary = json.loads((tmp_path / "gpu_suite-cpu.json").read_text())
    assert done.returncode == 0, done.stdout + "".join(
        (tmp_path / "logs" / f"{k.split()[-1]}.log").read_text()[-2000:] for k, v in summary["steps"].items()
        if v["status"] != "ok")
    notebook = {"notebook 00_data_and_partitions"}  # its paper_smoke set at PAPER_TINY's budgets
    assert set(summary["steps"]) == {f"benchmark {b}" for b in gpu_suite.BENCHMARKS} | notebook
    for name in gpu_suite.BENCHMARKS:  # tiny numbers go to --out, never over the committed results
        assert (tmp_path / f"{name}-tiny.json").exists(), name
    assert (tmp_path / "paper_smoke" / "00_data_and_partitions" / "metrics.json").exists()
    assert not theirs.exists() or not any(theirs.rglob("*.pt")), "tiny models went into the caller's cache"
    assert any((tmp_path / "cache").rglob("*.pt")), "the tiny runs trained their models in <out>/cache"


def test_the_suite_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, "scripts/gpu_suite.py", "--device", "cuda", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
