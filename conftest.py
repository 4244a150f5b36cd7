"""Test-session settings for the whole repository (unit tests and nbval alike)."""

import os

import nbval.plugin

# nbval waits 5 s for a cell's last output after the kernel's reply (IPyNbCell.output_timeout, fixed in
# nbval 0.11): on a loaded 2-core machine notebook 04's ablation cell missed it once and every later cell
# was skipped as "timed out". A minute is still far below --nbval-cell-timeout.
_nbval_cell_init = nbval.plugin.IPyNbCell.__init__


def _patient_cell_init(self, *args, **kwargs):
    _nbval_cell_init(self, *args, **kwargs)
    self.output_timeout = 60


nbval.plugin.IPyNbCell.__init__ = _patient_cell_init



# Two workers share the suite (`make test`: -n 2 --dist loadgroup). xdist hands out groups in the order
# collected; with files ordered by their number of tests (its default) the notebooks and the smoke runs
# came last and one worker ran alone for minutes. Longest first (LPT) keeps both busy to the end:
#   - every nbval notebook is one group (its cells share one kernel);
#   - a module whose tests start their own runs (no module fixture) is split, one group per test;
#   - any other module is one group (its module fixtures are built once).
# Seconds are from `make test --durations=0` on this 2-core machine (tests/durations.json); a group not
# listed counts 0.5 s per test, so new tests go after the measured heavy ones.
import json as _json
from pathlib import Path as _Path

import pytest as _pytest

_SPLIT_MODULES = {"tests/test_repeatable.py", "tests/test_runner.py", "tests/test_recovery.py"}
_DURATIONS = _Path(__file__).resolve().parent / "tests" / "durations.json"


def _group_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return nodeid if path in _SPLIT_MODULES else path


@_pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    seconds = _json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    cost: dict[str, float] = {}
    for item in items:
        group = _group_of(item.nodeid)
        cost[group] = cost.get(group, 0.0) + seconds.get(item.nodeid, 0.5)
    if config.getoption("dist", "no") == "loadgroup":
        for item in items:
            item.add_marker(_pytest.mark.xdist_group(_group_of(item.nodeid)))
    # stable sort: the order inside a group (a notebook's cells) is kept
    order = {g: i for i, g in enumerate(sorted(cost, key=lambda g: -cost[g]))}
    items.sort(key=lambda item: order[_group_of(item.nodeid)])


# `make test` records every test's seconds (setup + call + teardown) in $FEDLIB_TEST_DURATIONS;
# `cp .test-output/durations.json tests/durations.json` refreshes the order above from a real run.
_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if os.environ.get("FEDLIB_TEST_DURATIONS"):
        nodeid = report.nodeid.split("@", 1)[0]  # loadgroup appends "@<group>" to the id
        _measured[nodeid] = round(_measured.get(nodeid, 0.0) + report.duration, 2)


def pytest_sessionfinish(session):
    out = os.environ.get("FEDLIB_TEST_DURATIONS")
    if out and _measured and not hasattr(session.config, "workerinput"):  # the controller writes, once
        _Path(out).write_text(_json.dumps(dict(sorted(_measured.items())), indent=0) + "\n")
