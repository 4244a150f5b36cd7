"""The same command twice gives the same claims (smoke scale). What makes it so: every notebook seeds
what it draws, and the runner starts every kernel with one CPU thread (``--threads 1``: OMP, MKL and
torch), so reductions run in the same order every time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlib import runner

REPO = Path(__file__).resolve().parent.parent


def claims(out: Path, name: str) -> list:
    doc = json.loads((out / "smoke" / name / "metrics.json").read_text())
    return [(c["name"], c["measured"], c["verdict"]) for c in doc["claims"]]


@pytest.mark.parametrize("name", list(runner.notebooks()))
def test_the_same_command_twice_gives_the_same_claims(name, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        done = subprocess.run([sys.executable, "-m", "fedlib", "reproduce", name, "--scale", "smoke", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = (claims(out, name) for out in outs)
    assert first and first == second
