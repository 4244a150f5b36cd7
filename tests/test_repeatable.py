"""The same command twice gives the same claims (smoke scale). What makes it so: every notebook seeds
what it draws, and the runner starts every kernel with one CPU thread (``--threads 1``: OMP, MKL and
torch), so reductions run in the same order every time. Wall-clock times in a claim's measured text
(e.g. "LD3 trains in minutes": "3.1 s per grid") are the one thing that cannot repeat: they are masked."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedlib import runner

REPO = Path(__file__).resolve().parent.parent


# a number followed by a unit of time or of speed: "3.1 s", "12 ms", "2 min", "850 samples/s", "4.2 it/s"
TIMING = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?\s?(?:ms|s|min|h|samples/s|it/s|/s)\b")
# a claim that compares speeds names the unit once, before its numbers ("one-step samples/s 12784 ± 90
# vs LD3 NFE-4 3754 ± 40 (paired difference +9030 ...)"): every number in it is a wall-clock measurement
SPEED_CLAIM = re.compile(r"samples/s|it/s")
NUMBER = re.compile(r"(?<![\w.-])[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def masked(measured: str) -> str:
    """``measured`` with its wall-clock numbers replaced by ``<time>``."""
    if SPEED_CLAIM.search(measured):
        return NUMBER.sub("<time>", measured)
    return TIMING.sub("<time>", measured)


def run_runner(args: list, timeout: int = 600, cwd=REPO, env=None):
    """``python -m fedlib <args>`` under a hard outer limit: a run that hangs fails the test. The runner
    recovers from a lost kernel request itself (tests/test_runner.py injects one); no test retries."""
    cmd = [sys.executable, "-m", "fedlib", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def claims(out: Path, name: str) -> list:
    doc = json.loads((out / "smoke" / name / "metrics.json").read_text())
    return [(c["name"], masked(c["measured"]), c["verdict"]) for c in doc["claims"]]


def test_the_timing_mask_hides_times_and_nothing_else():
    assert TIMING.sub("<time>", "3.1 s per grid, at most 12.0 s (4 grids, cpu)") == "<time> per grid, at most <time> (4 grids, cpu)"
    assert TIMING.sub("<time>", "FedGO 0.883 vs 0.882 (3 seeds), 2.6x") == "FedGO 0.883 vs 0.882 (3 seeds), 2.6x"
    assert masked("FedGO 0.883 vs 0.882 (3 seeds), 2.6x") == "FedGO 0.883 vs 0.882 (3 seeds), 2.6x"
    assert masked("one-step samples/s 12784 ± 9 vs LD3 NFE-4 3754 ± 4 (paired difference +9030 ± 8 SE, 3 seeds)") \
        == "one-step samples/s <time> ± <time> vs LD3 NFE-4 <time> ± <time> (paired difference <time> ± <time> SE, <time> seeds)"


NAMES = list(runner.notebooks())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Every notebook's smoke set, run twice by the same command into two folders. One command per run
    (one notebook after another, one at a time) rather than one per notebook: the runner's own start-up
    (Python, torch, papermill) is paid twice instead of twice per notebook. Each notebook still runs in
    a fresh kernel, as it would alone."""
    root = tmp_path_factory.mktemp("repeat")
    outs = [root / "a", root / "b"]
    logs = []
    for out in outs:
        done = run_runner(["reproduce", *NAMES, "--scale", "smoke", "--jobs", "1", "--out", str(out)], timeout=1800)
        logs.append(done.stdout[-3000:] + done.stderr[-3000:])
    return outs, logs


@pytest.mark.parametrize("name", NAMES)
def test_the_same_command_twice_gives_the_same_claims(name, two_runs):
    outs, logs = two_runs
    for out, log in zip(outs, logs):
        assert (out / "smoke" / name / "metrics.json").exists(), f"{name} wrote no metrics.json:\n{log}"
    first, second = (claims(out, name) for out in outs)
    assert first and first == second
