"""The same command gives the same claims. ``make test`` re-executes every committed notebook through
nbval: that is its quick run, with the parameters it was committed with, on a cold cache. After each
notebook's last cell, ``conftest.ClaimsRepeat`` compares the claims that run wrote with the committed
``results/quick/<notebook>/metrics.json`` (tests/repeatability.py: times masked, everything else equal).
So every claim of every notebook is checked for repeating at the scale the README reports, at no cost
beyond the nbval run itself (it replaced a test that ran every smoke set twice, six minutes of CI). This
file checks that comparison: what it masks, what it catches, and that it follows every notebook."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlib import runner
from repeatability import TIMING, differences, masked, same_cpu

REPO = Path(__file__).resolve().parent.parent


def test_the_timing_mask_hides_times_and_nothing_else():
    assert TIMING.sub("<time>", "3.1 s per grid, at most 12.0 s (4 grids, cpu)") == "<time> per grid, at most <time> (4 grids, cpu)"
    assert TIMING.sub("<time>", "FedGO 0.883 vs 0.882 (3 seeds), 2.6x") == "FedGO 0.883 vs 0.882 (3 seeds), 2.6x"
    assert masked("FedGO 0.883 vs 0.882 (3 seeds), 2.6x") == "FedGO 0.883 vs 0.882 (3 seeds), 2.6x"
    assert masked("one-step samples/s 12784 ± 9 vs LD3 NFE-4 3754 ± 4 (paired difference +9030 ± 8 SE, 3 seeds)") \
        == "one-step samples/s <time> ± <time> vs LD3 NFE-4 <time> ± <time> (paired difference <time> ± <time> SE, <time> seeds)"


@pytest.fixture
def committed():
    return json.loads((REPO / "results" / "quick" / "03_ld3_learned_timesteps" / "metrics.json").read_text())


def test_a_run_equal_but_for_its_times_repeats(committed):
    ran = copy.deepcopy(committed)
    for c in ran["claims"]:
        c["measured"] = TIMING.sub("99.9 s", c["measured"])
    ran["provenance"]["wall_time_s"] += 100
    assert any(TIMING.search(c["measured"]) for c in committed["claims"]), "the example has a timed claim"
    assert differences(ran, committed) == []


def test_a_changed_number_verdict_parameter_or_claim_is_named(committed):
    ran = copy.deepcopy(committed)
    first, second = ran["claims"][0], ran["claims"][1]
    first["measured"] = first["measured"].replace("0", "1", 1)
    second["verdict"] = "within noise" if second["verdict"] != "within noise" else "holds"
    ran["params"]["seeds"] = [7]
    ran["claims"].append(dict(first, name="a new claim"))
    del ran["claims"][2]
    found = differences(ran, committed)
    assert any(d.startswith("parameter seeds: this run [7]") for d in found)
    assert any(first["name"] in d and "this run:" in d for d in found)
    assert any(second["name"] in d and second["verdict"] in d for d in found)
    assert f"claim {committed['claims'][2]['name']!r} only in the committed run" in found
    assert "claim 'a new claim' only in this run" in found
    assert len(found) == 5


def test_every_notebook_gets_a_claims_check_right_after_its_last_cell():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--nbval-lax", "notebooks"], cwd=REPO, capture_output=True, text=True, timeout=300)
    ids = [line for line in done.stdout.splitlines() if line.startswith("notebooks/")]
    for name in runner.notebooks():
        mine = [i for i in ids if i.startswith(f"notebooks/{name}.ipynb::")]
        assert mine and mine[-1].endswith("::claims repeat the committed quick run"), name
        assert all("::Cell " in i for i in mine[:-1]), name


def test_numbers_are_compared_only_between_runs_on_the_same_cpu(committed):
    ran = copy.deepcopy(committed)
    assert same_cpu(ran, committed)[0]
    ran["provenance"]["cpu"] = dict(committed["provenance"]["cpu"], model="Another CPU")
    same, cpus = same_cpu(ran, committed)
    assert not same and "Another CPU" in cpus and committed["provenance"]["cpu"]["model"] in cpus
    ran["claims"][0]["measured"] = ran["claims"][0]["measured"].replace("0", "1", 1)
    assert differences(ran, committed, numbers=False) == [] and len(differences(ran, committed)) == 1
    ran["params"]["seeds"] = [7]  # the parameters and the claims' names are compared on any CPU
    del ran["claims"][1]
    assert len(differences(ran, committed, numbers=False)) == 2
    del ran["provenance"]["cpu"]
    assert not same_cpu(ran, committed)[0], "an unrecorded CPU is not the same CPU"
