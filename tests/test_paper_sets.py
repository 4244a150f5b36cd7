"""Every notebook's paper set through `scripts/gpu_suite.py --tiny` (what `make gpu` runs on a lent GPU):
the paper_smoke set's datasets, image shapes and models, with the few steps of ``gpu_suite.PAPER_TINY``,
on the CPU. A file apart from tests/test_gpu_suite.py, so the two slow files go to different workers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gpu_suite  # noqa: E402


NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py"))


def test_every_notebook_has_tiny_overrides_of_its_paper_smoke_set():
    assert sorted(gpu_suite.PAPER_TINY) == NOTEBOOKS
    for nb, tiny in gpu_suite.PAPER_TINY.items():
        sets = yaml.safe_load((REPO / "notebooks" / "params" / f"{nb}.yaml").read_text())
        assert "paper_smoke" in sets, nb
        # the overrides shrink budgets only; what a GPU run exercises (data, shapes, models) is the set's own
        assert not {"dataset", "use_stand_in", "stand_in_data", "device", "classifier", "width_mult"} & set(tiny), nb


@pytest.mark.parametrize("nb", [n for n in NOTEBOOKS if n != "00_data_and_partitions"])  # 00: test_gpu_suite.py
def test_the_paper_set_of_every_notebook_goes_through_at_tiny_steps(nb, tmp_path):
    """Every cell of the paper path (the paper_smoke set's dataset, image shape and models) on the CPU with
    few steps: a shape or device error shows here, not in a lent GPU's few minutes."""
    done = subprocess.run([sys.executable, "scripts/gpu_suite.py", "--device", "cpu", "--tiny", "--benchmarks",
                           "--notebooks", nb, "--timeout", "600", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    log = tmp_path / "logs" / f"{nb}.log"
    assert done.returncode == 0, done.stdout + done.stderr + (log.read_text()[-3000:] if log.exists() else "")
    metrics = json.loads((tmp_path / "paper_smoke" / nb / "metrics.json").read_text())
    sets = yaml.safe_load((REPO / "notebooks" / "params" / f"{nb}.yaml").read_text())
    for key, value in sets["paper_smoke"].items():  # the run used the set, with only the tiny budgets changed
        if key not in ("device", "cpu_threads"):
            assert metrics["params"][key] == gpu_suite.PAPER_TINY[nb].get(key, value), key
    assert metrics["claims"] and all(c["verdict"] for c in metrics["claims"])
    assert list((tmp_path / "paper_smoke" / nb / "figures").glob("*.png")), "every result has a figure"

