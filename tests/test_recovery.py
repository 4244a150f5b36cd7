"""No run waits for ever: every cell has a time limit, and a request the kernel never received is
recovered by the runner itself (one more run of the whole notebook in a fresh kernel), never by a test.

The faults are injected as they happen: a kernel client that never sends the execute_request of a
chosen cell (ipykernel 7 now and then lost one: the kernel idle, the client waiting for a reply), and
a cell that sleeps past its limit. Every test runs under a hard outer limit, so that a regression
fails instead of hanging, and checks that no kernel process or socket folder is left behind."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
from jupyter_client.asynchronous import AsyncKernelClient

from fedlib import runner, utils
from test_runner import GOOD, _tiny_notebook


class OuterLimit(BaseException):
    """A BaseException, so that no ``except Exception`` of the runner swallows it."""


@contextmanager
def hard_limit(seconds: int):
    def fire(signum, frame):
        raise OuterLimit(f"the run did not end within {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def kernel_children() -> list[int]:
    """Kernel processes started by this process (or its workers) that are still alive."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
            ppid = int(rest.rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and b"ipykernel" in cmd:
            found.append(int(pid))
    return found


def socket_folders(root: Path) -> list:
    return sorted(root.glob("fedlib-kernel-*"))


@pytest.fixture
def clean_machine(tmp_path, monkeypatch):
    """Nothing the run started outlives it: no kernel process, no socket folder. The kernels' socket
    folders go to a temporary folder of this test's own (other runs on the machine have theirs)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setenv("TMPDIR", str(root))
    yield root
    deadline = time.time() + 20  # a kernel told to shut down gets a few seconds before it is killed
    while kernel_children() and time.time() < deadline:
        time.sleep(0.2)
    assert not kernel_children(), "a kernel process was left behind"
    assert not socket_folders(root), f"socket folders left behind: {socket_folders(root)}"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", nbdir)
    monkeypatch.setattr(runner, "LOST_AFTER_S", 3.0)  # the watch's patience, short for the test
    return nbdir


def drop_requests(monkeypatch, marker: str, times: int) -> list:
    """Make the kernel client lose the execute_request of the cell whose code contains ``marker``, the
    first ``times`` times it is sent: the message is built (it has an id the client waits on) and
    never sent, as when a request is swallowed on its way into the kernel."""
    real, dropped = AsyncKernelClient.execute, []

    def execute(self, code="", *args, **kwargs):
        if marker in code and len(dropped) < times:
            msg = self.session.msg("execute_request", {"code": code, "silent": False})
            dropped.append(msg["header"]["msg_id"])
            return msg["header"]["msg_id"]
        return real(self, code, *args, **kwargs)

    monkeypatch.setattr(AsyncKernelClient, "execute", execute)
    return dropped


MARKED = "print('the cell whose request is lost')"


def code_counts(path: Path) -> list:
    nb = nbformat.read(path, as_version=4)
    return [c.get("execution_count") for c in nb.cells if c.cell_type == "code"]


@pytest.fixture
def drop(monkeypatch):
    return lambda marker, times: drop_requests(monkeypatch, marker, times)


def test_a_lost_request_is_recovered_once_and_every_cell_runs_once(tiny, tmp_path, drop, clean_machine, capsys):
    _tiny_notebook(tiny, MARKED + "\n" + GOOD.format(name="10_lossy"), "10_lossy")
    dropped = drop(MARKED, 1)
    out = tmp_path / "results"
    with hard_limit(180):
        assert runner.reproduce([], "quick", [], out_root=out, jobs=1) == 0
    assert len(dropped) == 1, "the fault was injected"
    summary = json.loads((out / "quick" / "summary.json").read_text())
    assert summary[0]["ok"] and summary[0]["retries"] == 1 and "never reached the kernel" in summary[0]["retry_reason"]
    doc = json.loads((out / "quick" / "10_lossy" / "metrics.json").read_text())
    assert doc["runner"]["retries"] == 1 and "cell 1" in doc["runner"]["retry_reason"]
    counts = code_counts(out / "quick" / "10_lossy" / "10_lossy.ipynb")
    assert counts == list(range(1, len(counts) + 1)), f"every cell ran exactly once, in order: {counts}"
    assert (out / "quick" / "10_lossy" / "kernel-try1.log").exists(), "the first try's log is the evidence"
    assert "retried once" in capsys.readouterr().out


def test_a_request_lost_every_time_fails_clearly_after_exactly_two_tries(tiny, tmp_path, drop, clean_machine, capsys):
    _tiny_notebook(tiny, MARKED + "\n" + GOOD.format(name="10_lossy"), "10_lossy")
    _tiny_notebook(tiny, GOOD.format(name="11_fine"), "11_fine")
    dropped = drop(MARKED, 99)
    out = tmp_path / "results"
    t0 = time.time()
    with hard_limit(240):
        assert runner.reproduce([], "quick", [], out_root=out, jobs=1) == 1
    assert len(dropped) == 2, f"exactly two tries, not {len(dropped)}"
    assert time.time() - t0 < 120, "bounded: two watches of a few seconds, not a cell's limit"
    lossy, fine = json.loads((out / "quick" / "summary.json").read_text())
    assert not lossy["ok"] and "never reached the kernel" in lossy["error"] and "both tries" in lossy["error"]
    assert fine["ok"], "the other notebooks still run"
    assert "failed notebooks (partial outputs kept): 10_lossy" in capsys.readouterr().err


def test_a_cell_past_its_limit_fails_in_one_line_and_is_not_retried(tiny, tmp_path, clean_machine, capsys):
    _tiny_notebook(tiny, "import time\nprint('sleeping')\ntime.sleep(300)", "10_slow")
    # the notebook after it imports nothing heavy, so a short limit tests the same thing as a long one:
    # no cell of either notebook needs more than a fraction of a second (a cold `import torch` would)
    _tiny_notebook(tiny, "y = x + 1\nprint('fine', y)", "11_fine")
    out = tmp_path / "results"
    t0 = time.time()
    with hard_limit(180):
        assert runner.main(["reproduce", "--jobs", "1", "--cell-timeout", "6", "--out", str(out)]) == 1
    assert time.time() - t0 < 120
    slow, fine = json.loads((out / "quick" / "summary.json").read_text())
    assert slow["retries"] == 0, "a cell that started and is merely slow is not retried"
    assert "cell 1 ('import time') ran past its 6 s limit" in slow["error"]
    assert "--cell-timeout SECONDS or FEDLIB_CELL_TIMEOUT=SECONDS" in slow["error"]
    partial = nbformat.read(out / "quick" / "10_slow" / "10_slow.ipynb", as_version=4)
    assert any("sleeping" in str(o) for c in partial.cells for o in c.get("outputs", [])), "partial output kept"
    # the next notebook ran to its end in its own kernel (it writes no metrics.json: it imports no fedlib)
    assert "limit" not in fine["error"] and "metrics.json" in fine["error"]
    after = nbformat.read(out / "quick" / "11_fine" / "11_fine.ipynb", as_version=4)
    assert any("fine 2" in str(o) for c in after.cells for o in c.get("outputs", []))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("10_slow: FAILED")]
    assert len(line) == 1 and "6 s limit" in line[0]


def test_cell_limits_follow_the_scale_and_the_tags_and_one_override():
    assert runner.cell_limit([], "smoke") < runner.cell_limit([], "quick") < runner.cell_limit([], "long")
    assert runner.cell_limit(["explorer"], "long") == runner.EXPLORER_CELL_LIMIT_S
    assert runner.cell_limit(["explorer"], "long", 7) == runner.cell_limit([], "quick", 7) == 7


@pytest.mark.parametrize("value", ["0", "-3", "inf", "nan", "soon"])
def test_a_bad_cell_timeout_is_refused(value, tmp_path, capsys):
    assert runner.main(["reproduce", "00", "--cell-timeout", value, "--out", str(tmp_path)]) == 2
    assert "allowed: a number of seconds > 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_notebooks_run_at_once_with_jobs_and_the_summary_keeps_the_plan_order(tiny, tmp_path, clean_machine):
    for name in ("10_a", "11_b"):
        _tiny_notebook(tiny, "import time\ntime.sleep(4)\n" + GOOD.format(name=name), name)
    out = tmp_path / "results"
    with hard_limit(180):
        assert runner.reproduce([], "quick", [], out_root=out, jobs=2) == 0
    summary = json.loads((out / "quick" / "summary.json").read_text())
    assert [r["notebook"] for r in summary] == ["10_a", "11_b"] and all(r["ok"] for r in summary)
    starts = [json.loads((out / "quick" / n / "metrics.json").read_text()) for n in ("10_a", "11_b")]
    walls = [r["wall_time_s"] for r in summary]
    assert all(d["runner"]["retries"] == 0 for d in starts)
    # both ran at once: each took over 4 s, and neither waited for the other to start
    assert all(w >= 4 for w in walls)


def kernels_of(folder: Path) -> list:
    """Kernel processes whose environment points into ``folder`` (orphans of a killed runner included)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if str(folder).encode() in env.read_bytes() and b"ipykernel" in (env.parent / "cmdline").read_bytes():
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


def test_a_killed_run_leaves_a_marker_and_a_summary_that_say_so(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _tiny_notebook(nbdir, GOOD.format(name="10_fast"), "10_fast")
    _tiny_notebook(nbdir, "import time\nopen('started', 'w').close()\ntime.sleep(120)", "11_slow")
    _tiny_notebook(nbdir, GOOD.format(name="12_never"), "12_never")
    out = tmp_path / "results"
    env = {**os.environ, "FEDLIB_NOTEBOOKS_DIR": str(nbdir)}
    proc = subprocess.Popen([sys.executable, "-m", "fedlib", "reproduce", "--jobs", "1", "--out", str(out)],
                            cwd=nbdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not (nbdir / "started").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (nbdir / "started").exists(), "the slow notebook never started"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    summary = {r["notebook"]: r["status"] for r in json.loads((out / "quick" / "summary.json").read_text())}
    assert summary == {"10_fast": "ok", "11_slow": "running", "12_never": "pending"}
    assert (out / "quick" / "11_slow" / runner.RUNNING_MARKER).exists()
    assert not (out / "quick" / "10_fast" / runner.RUNNING_MARKER).exists()
    done = subprocess.run([sys.executable, "-m", "fedlib", "report", "--out", str(out)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert "11_slow: incomplete (its run was stopped before it ended" in done.stderr
    # the orphaned kernel of the killed runner sees its parent gone and exits on its own
    deadline = time.time() + 30
    while kernels_of(out) and time.time() < deadline:
        time.sleep(0.5)
    assert not kernels_of(out), "the killed runner's kernel outlived it"


def test_a_damaged_cache_entry_is_said_on_the_terminal_too(tiny, tmp_path, capsys, clean_machine):
    body = ("import warnings\nfrom fedlib.utils import CacheWarning\n"
            "warnings.warn('cache entry /x/teacher.pt (3 bytes) could not be loaded (EOFError); removed it; "
            "rebuilding', CacheWarning)\n" + GOOD.format(name="10_cache"))
    _tiny_notebook(tiny, body, "10_cache")
    with hard_limit(120):
        assert runner.reproduce([], "quick", [], out_root=tmp_path / "results", jobs=1) == 0
    out = capsys.readouterr().out
    assert "10_cache: " in out and "CacheWarning: cache entry /x/teacher.pt" in out


def _build_in_child(path, log, sleep):
    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(sleep)
        utils.atomic_write(path, b"entry")
        return b"entry"

    value, cached = utils.load_or_build(path, lambda p: Path(p).read_bytes(), build)
    os._exit(0 if value == b"entry" else 3)


def test_a_cache_entry_two_processes_need_at_once_is_built_once(tmp_path):
    path, log = tmp_path / "entry.pt", tmp_path / "builds.log"
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _build_in_child(path, log, 1.0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert log.read_text().count("built") == 1, "one process built it, the others waited and loaded it"
    assert path.read_bytes() == b"entry"


def test_the_wait_for_a_cache_lock_is_bounded(tmp_path):
    import fcntl

    path = tmp_path / "entry.pt"
    with utils.entry_lock(path):  # another holder that never lets go, seen from a second open file
        f = open(path.with_name(f".{path.name}.lock"), "a+")
        with pytest.raises(OSError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.close()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child waits 1 s, warns, builds on its own
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with utils.entry_lock(path, timeout_s=1.0) as held:
                    ok = (not held) and any("FEDLIB_CACHE_LOCK_TIMEOUT" in str(w.message) for w in seen)
            os._exit(0 if ok else 4)
        t0 = time.time()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and time.time() - t0 < 30


def test_a_cache_entry_leaves_the_callers_random_state_as_it_was_cold_or_warm(tmp_path):
    """The draws after a cached stage are the same whether it was built here or loaded: notebooks run at
    once share the cache, and which one builds an entry first must not change anyone's numbers."""
    import random

    import numpy as np
    import torch

    path = tmp_path / "entry.pt"

    def loader(p):
        utils.seed_everything(7)  # as the teacher's loader does (its initial weights are seeded)
        return Path(p).read_bytes()

    def build():
        utils.seed_everything(7)
        torch.randn(1000)  # training draws
        utils.atomic_write(path, b"entry")
        return b"entry"

    def after(expect_cached):
        utils.seed_everything(123)
        _, cached = utils.load_or_build(path, loader, build)
        assert cached is expect_cached
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    cold, warm = after(False), after(True)
    utils.seed_everything(123)
    untouched = random.random(), float(np.random.rand()), float(torch.rand(1))
    assert cold == warm == untouched


def test_a_reply_whose_wake_up_is_lost_is_read_within_seconds(tiny, tmp_path, monkeypatch, clean_machine):
    """Under load a reply can sit unread in the client's socket while its wake-up is lost: the client read
    it only when its one long wait ran out (a smoke cell took its whole 300 s limit; nbclient's IOPub
    wait has no limit at all). Simulated here: a wait longer than two seconds sees nothing until it
    ends. The runner waits in slices of a second, so the run is not slowed."""
    import asyncio

    from jupyter_client.channels import AsyncZMQSocketChannel

    real = AsyncZMQSocketChannel.get_msg
    long_waits = []

    async def lossy(self, timeout=None):
        if timeout is None or timeout > 2:
            long_waits.append(timeout)
            await asyncio.sleep(600 if timeout is None else timeout)
        return await real(self, timeout=timeout)

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", lossy)
    _tiny_notebook(tiny, "print('hello')\n" + GOOD.format(name="10_quiet"), "10_quiet")
    t0 = time.time()
    with hard_limit(300):
        assert runner.reproduce([], "quick", [], out_root=tmp_path / "results", jobs=1, cell_timeout=200) == 0
    assert time.time() - t0 < 120, "no wait ran to its end"
    assert not [w for w in long_waits if w is None or w > 30], f"the runner waited long on a channel: {long_waits}"
