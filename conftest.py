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


# The committed notebooks hold the quick run (`reproduce --update-notebooks`), and nbval re-executes them
# with the parameters they hold. So after a notebook's last cell one more item compares the claims that
# run wrote with the committed results/quick/<notebook>/metrics.json, wall-clock times masked: the same
# command gives the same claims, at the scale the README reports, on a cold cache, at no extra cost. Its
# node id starts with the notebook's path, so --dist loadfile keeps it on the notebook's worker.
import sys as _sys

_sys.path.insert(0, str(_Path(__file__).resolve().parent / "tests"))
from repeatability import differences as _differences  # noqa: E402
from repeatability import same_cpu as _same_cpu  # noqa: E402

_REPO = _Path(__file__).resolve().parent


class ClaimsDiffer(AssertionError):
    pass


class ClaimsRepeat(_pytest.Item):
    """The claims of the notebook nbval just ran equal the committed quick run's (times masked)."""

    def runtest(self):
        from fedlib.results import _run_path

        name = self.path.stem
        ran, committed = _run_path(name) / "metrics.json", _REPO / "results" / "quick" / name / "metrics.json"
        if not ran.exists():
            raise ClaimsDiffer(f"{name} wrote no {ran}: a cell failed or was skipped (see its cells above)")
        if not committed.exists():
            raise ClaimsDiffer(f"{name} has no committed {committed}; make it with: make notebook NB={name}")
        ran_doc, committed_doc = _json.loads(ran.read_text()), _json.loads(committed.read_text())
        diff = _differences(ran_doc, committed_doc)
        same, cpus = _same_cpu(ran_doc, committed_doc)
        if diff and not same:
            # numbers made by another CPU's float kernels (tests/repeatability.py): comparing them would test
            # the CPU, not the code; the parameters and the set of claims must still be the committed ones
            moved, diff = len(diff), _differences(ran_doc, committed_doc, numbers=False)
            if not diff:
                _pytest.skip(f"{name}: the committed parameters and claims, but {moved} claims' numbers differ, and "
                             f"numbers are compared only on the CPU the committed run was made on ({cpus})")
        if diff:
            raise ClaimsDiffer(
                f"{name}: this run's claims differ from the committed quick run's ({len(diff)} found):\n"
                + "\n".join(diff) + "\nIf an input of the notebook changed on purpose (fedlib/, constraints.txt, its "
                f"source or parameter sets), regenerate it (make notebook NB={name}); otherwise a number no longer "
                "repeats: find what draws without a seed or depends on the thread count.")

    def repr_failure(self, excinfo):
        return str(excinfo.value) if isinstance(excinfo.value, ClaimsDiffer) else super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}: its claims repeat the committed quick run"


def _with_claims_repeat(items):
    """``items`` with a ClaimsRepeat after the last cell of every collected notebook."""
    last = {}
    for i, item in enumerate(items):
        if isinstance(item, nbval.plugin.IPyNbCell):
            last[item.parent] = i
    out = []
    ends = {i: parent for parent, i in last.items()}
    for i, item in enumerate(items):
        out.append(item)
        if i in ends:
            out.append(ClaimsRepeat.from_parent(ends[i], name="claims repeat the committed quick run"))
    return out


_started: set = set()


def pytest_runtest_setup(item):
    # a notebook's first cell removes the metrics.json of an earlier run, so ClaimsRepeat reads this one's
    if isinstance(item, nbval.plugin.IPyNbCell) and item.parent not in _started:
        _started.add(item.parent)
        from fedlib.results import _run_path

        (_run_path(item.path.stem) / "metrics.json").unlink(missing_ok=True)


@_pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    items[:] = _with_claims_repeat(items)
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
