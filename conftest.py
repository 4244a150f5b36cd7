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



# Two workers share the suite (`make test`: -n 2 --dist loadfile --no-loadscope-reorder). xdist hands out
# files in the order collected; by default it orders them by their number of tests, so the notebooks and
# the smoke runs came last and one worker ran alone for minutes. Longest file first (LPT) keeps both busy
# to the end; a file stays on one worker (an nbval notebook's cells share one kernel, a module its
# fixtures). (loadgroup could split a file further, but it marks tests by rewriting their ids, which
# nbval's cells ignore: their cells were spread over both workers.)
# Seconds are every test's, from a fresh clone's `make test` on this 2-core machine (tests/durations.json);
# a test not listed counts 0.5 s, so new files go after the measured heavy ones.
import json as _json
from pathlib import Path as _Path

import pytest as _pytest

_DURATIONS = _Path(__file__).resolve().parent / "tests" / "durations.json"


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@_pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    seconds = _json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    cost: dict[str, float] = {}
    for item in items:
        cost[_file_of(item.nodeid)] = cost.get(_file_of(item.nodeid), 0.0) + seconds.get(item.nodeid, 0.5)
    # stable sort: the order inside a file (a notebook's cells) is kept
    order = {f: i for i, f in enumerate(sorted(cost, key=lambda f: -cost[f]))}
    items.sort(key=lambda item: order[_file_of(item.nodeid)])


# `make test` records every test's seconds (setup + call + teardown) in $FEDLIB_TEST_DURATIONS;
# `cp .test-output/durations.json tests/durations.json` refreshes the order above from a real run.
_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if os.environ.get("FEDLIB_TEST_DURATIONS"):
        _measured[report.nodeid] = round(_measured.get(report.nodeid, 0.0) + report.duration, 2)


def pytest_sessionfinish(session):
    out = os.environ.get("FEDLIB_TEST_DURATIONS")
    if out and _measured and not hasattr(session.config, "workerinput"):  # the controller writes, once
        _Path(out).write_text(_json.dumps(dict(sorted(_measured.items())), indent=0) + "\n")
