"""The papermill driver: ``python -m fedlib list | reproduce | report``.

``reproduce`` executes notebooks with papermill (kernel ``python3``), each into
``<out>/<scale>/<name>/`` (the executed notebook, ``metrics.json``, ``figures/``, the explorer's
data), shows a progress bar over notebooks, and ends with one table of every notebook's claims.

Everything the user typed is checked before anything runs: names, scales, types, each parameter's
declared rules (:mod:`fedlib.params`), the device, and that ``--out`` is writable. A failing notebook
keeps its partial output and does not stop the others; one results folder is used by one run at a
time (a lock); Ctrl-C ends with one line and the table of the notebooks that finished; results and
the summary are written atomically. Exit status: 0 when every notebook ran and every *required*
claim holds; 1 otherwise; 2 for refused input; 130 when interrupted.

Repeatability: kernels run with ``--threads`` CPU threads (default 1: OMP/MKL and torch), and
every notebook seeds everything it draws, so the same command on the same machine gives the same
claims (``tests/test_runner.py`` checks this at smoke scale).

Parameter sets: ``quick`` is each notebook's own defaults (its tagged ``parameters`` cell); other
sets (``smoke``, ``paper``, ``long`` and extras such as ``fashion_mnist``) live in
``notebooks/params/<name>.yaml``; ``-p KEY=VALUE`` overrides any of them.

Refused before anything runs too: a ``-p`` key given twice, ``--threads`` outside 1..os.cpu_count(),
``--update-notebooks`` with anything but the quick defaults (it replaces the committed notebooks and
figures), and an unwritable fedlib cache (``$FEDLIB_CACHE``, checked like ``--out``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from . import params as P
from .params import UsageError, coerce, parameters, parse_value  # noqa: F401 - the runner's vocabulary
from .results import claims_markdown, validate_metrics, write_atomic
from .utils import DEVICES, REPO_ROOT

# the notebooks a run can choose from (another folder of notebooks for tests or users' own studies)
NOTEBOOKS_DIR = Path(os.environ.get("FEDLIB_NOTEBOOKS_DIR", REPO_ROOT / "notebooks"))
RESULTS_DIR = REPO_ROOT / "results"
FIGURES_DIR = REPO_ROOT / "figures"
SCALES = ("smoke", "quick", "paper")
KERNEL = "python3"


class Interrupted(Exception):
    """Ctrl-C during a run (turned into one line and the summary of what finished)."""


# ---------------------------------------------------------------------------------------------
# Notebooks and their parameters


def notebooks(folder: Path | None = None) -> dict[str, Path]:
    folder = folder if folder is not None else NOTEBOOKS_DIR
    return {p.stem: p for p in sorted(folder.glob("[0-9][0-9]_*.ipynb"))}


def resolve_names(names: list[str], available: dict[str, Path]) -> list[str]:
    """Full names or unique prefixes (``00`` -> ``00_data_and_partitions``); else UsageError."""
    if not names:
        return list(available)
    out = []
    for name in names:
        name = Path(name).stem
        if name in available:
            out.append(name)
            continue
        hits = [n for n in available if n.startswith(name)]
        if len(hits) == 1:
            out.append(hits[0])
            continue
        why = "matches several" if hits else "is not a notebook"
        raise UsageError(f"{name!r} {why}; valid names: {', '.join(available)}")
    return out


def parameter_sets(name: str) -> dict[str, dict]:
    """{scale: overrides} for a notebook: ``quick`` = {} plus the sets in its yaml file."""
    return P.parameter_sets(name, NOTEBOOKS_DIR)


def check_out_dir(out_root: Path, scale: str) -> Path:
    """``out_root/scale`` created and writable, or a UsageError in one line."""
    target = Path(out_root) / scale
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out_root}: cannot write results into {target} ({err.strerror or err}); "
                         "allowed: a writable folder; e.g. --out results") from None
    return target


def check_cache_dir() -> Path:
    """fedlib's cache (``$FEDLIB_CACHE`` or ``~/.cache/fedlib``) created and writable, or a UsageError in
    one line: an unwritable cache otherwise fails only when a notebook first saves a teacher, seconds into
    the run, and in every notebook after it."""
    from .utils import cache_dir

    env = os.environ.get("FEDLIB_CACHE")
    if env and not Path(env).expanduser().is_absolute():  # kernels run in the notebooks' folder
        raise UsageError(f"FEDLIB_CACHE={env} is relative: each kernel would read it from {NOTEBOOKS_DIR}, inside "
                         f"the source tree; allowed: an absolute path; e.g. export FEDLIB_CACHE={Path(env).resolve()}")
    try:
        root = cache_dir()
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        where = f"FEDLIB_CACHE={env}" if env else "fedlib's cache ~/.cache/fedlib (FEDLIB_CACHE is unset)"
        fix = ("unset FEDLIB_CACHE or point it at a writable folder" if env else
               "make it writable, or point FEDLIB_CACHE at a writable folder")
        raise UsageError(f"{where}: cannot write fedlib's cache there ({err.strerror or err}); allowed: a writable "
                         f"folder; {fix} (e.g. export FEDLIB_CACHE=/tmp/fedlib-cache)") from None
    return root


def build_plan(names: list[str], scale: str, overrides: list[str], device: str | None,
               available: dict[str, Path] | None = None) -> list[tuple[str, dict]]:
    """Check everything the user asked for and return [(notebook, parameters)]; UsageError if not
    (all problems at once, one line each)."""
    available = available if available is not None else notebooks()
    if not available:
        raise UsageError(f"no notebooks found in {NOTEBOOKS_DIR}")
    if not names and scale not in SCALES:  # an extra set (long, fashion_mnist): the notebooks that have it
        names = [n for n in available if scale in parameter_sets(n)]
        if not names:
            every = sorted(set(SCALES) | {s for n in available for s in parameter_sets(n)})
            raise UsageError(f"no notebook has a parameter set {scale!r}; allowed: {', '.join(every)}")
    names = resolve_names(names, available)
    if device is not None and device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    if device == "cuda" and not P.cuda_available():
        raise UsageError("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                         "allowed here: auto, cpu; e.g. --device auto")
    pairs, given = [], {}
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"-p {item!r} must look like KEY=VALUE (e.g. -p seeds=[0,1])")
        key, text = item.split("=", 1)
        given.setdefault(key.strip(), []).append(text)
        pairs.append((key.strip(), parse_value(text)))
    # the last of two values would win without a word, and the run would not be the one typed
    twice = [f"-p {key} is given {len(texts)} times ({', '.join(f'{key}={t}' for t in texts)}); allowed: each "
             f"parameter once; e.g. -p {key}={texts[-1]}" for key, texts in given.items() if len(texts) > 1]
    if twice:
        raise UsageError("\n".join(twice))
    plan, problems, specs_of = [], [], {}
    for name in names:
        specs = specs_of[name] = parameters(available[name])
        sets = parameter_sets(name)
        if scale not in sets:
            if scale in SCALES:  # a standard scale the notebook has no set for: use its defaults
                chosen = {}
            else:
                raise UsageError(f"{name}: unknown scale {scale!r}; allowed: {', '.join(sorted(set(SCALES) | set(sets)))}")
        else:
            chosen = dict(sets[scale])
        for key in chosen:
            if key not in specs:
                raise UsageError(f"{NOTEBOOKS_DIR / 'params' / (name + '.yaml')}: set {scale!r} names {key!r}, which is not a "
                                 f"parameter of {name}; parameters: {', '.join(specs)}")
        for key, value in pairs:
            if key not in specs:
                if len(names) > 1:
                    continue  # a shared override applies to the notebooks that have the parameter
                raise UsageError(f"{name} has no parameter {key!r}; its parameters: {', '.join(specs)} "
                                 f"(see `python -m fedlib list {name}`)")
            chosen[key] = value
        if device is not None and "device" in specs:
            chosen["device"] = device
        params = {k: coerce(k, v, specs[k], name) for k, v in chosen.items()}
        problems += P.check(name, params, specs)
        plan.append((name, params))
    unused = [k for k, _ in pairs if not any(k in specs_of[n] for n, _ in plan)]
    if unused:
        raise UsageError(f"no selected notebook has parameter(s) {', '.join(unused)}; see `python -m fedlib list`")
    if problems:
        raise UsageError("\n".join(problems))
    return plan


# ---------------------------------------------------------------------------------------------
# Execution


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_env(threads: int) -> dict:
    """What every kernel runs with: fixed CPU threads (repeatable numbers) and no progress-bar widgets
    in non-interactive runs (nobody watches them; the runner shows its own bar)."""
    t = str(int(threads))
    return {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "FEDLIB_THREADS": t,
            "TQDM_DISABLE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def _kernel_manager():
    """A KernelManager whose kernel writes its own log lines (warnings, shutdown noise) to
    ``$FEDLIB_KERNEL_LOG`` in the run's folder instead of the terminal: the runner's output stays one
    progress bar and one line per notebook."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            # Unix sockets named after the kernel's connection file, not TCP ports picked free and bound
            # later: two processes starting kernels at once (the tests' runner calls beside nbval, Ray)
            # can pick the same port, and the runner then waits for ever on a reply another kernel got
            kw.setdefault("transport", "ipc")
            # ... in a folder of their own: the default name ("kernel-ipc-<n>", relative to each process's
            # folder) is the same for every kernel started in one folder, which collides just the same
            kw.setdefault("ip", str(Path(tempfile.mkdtemp(prefix="fedlib-kernel-")) / "ipc"))
            super().__init__(**kw)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)  # removes the socket files
            if not restart:
                shutil.rmtree(Path(self.ip).parent, ignore_errors=True)

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            log = os.environ.get("FEDLIB_KERNEL_LOG")
            if log:
                f = open(log, "ab")
                kw.setdefault("stdout", f)
                kw.setdefault("stderr", f)
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


def clean_notebook(path: Path) -> None:
    """Drop volatile metadata (timings, papermill bookkeeping) so committed notebooks diff cleanly."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


# ---------------------------------------------------------------------------------------------
# Time limits and lost requests
#
# Every cell runs under a time limit, so that no run waits for ever. And the runner tells a *lost*
# request from a *slow* cell: the kernel answers every execute_request it receives at once on IOPub
# (``status: busy``, then ``execute_input``), whatever the cell then does. A request with no such
# message for LOST_AFTER_S never reached the kernel (seen with ipykernel 7: the kernel idle, the
# client in nbclient's poll for the reply, the cell never run). Re-sending it into the same kernel
# could run the cell twice (the protocol cannot tell a late request from a duplicate), so the runner
# runs the whole notebook again, once, in a fresh kernel, and records that it did and why. A cell that
# started and is merely slow is never retried: it fails at its limit with one line saying how to raise it.

# seconds per cell: by scale, and for the explorers (which load stored results and must stay quick)
CELL_LIMITS_S = {"smoke": 300, "quick": 900}
SET_CELL_LIMIT_S = 4 * 3600  # long, paper and the other sets: hours of training in one cell
EXPLORER_CELL_LIMIT_S = 300
LOST_AFTER_S = float(os.environ.get("FEDLIB_LOST_REQUEST_S", 60))  # no IOPub reply by then: never received
POLL_SLICE_S = 1.0  # the longest single wait on a kernel channel (see WatchedClient's polls)
CELL_TIMEOUT_ENV = "FEDLIB_CELL_TIMEOUT"


class RequestLost(Exception):
    """The kernel never received a cell's execute_request."""


def cell_limit(tags, scale: str, override: float | None = None) -> float:
    """The time limit of one cell in seconds: ``override`` (``--cell-timeout`` / ``$FEDLIB_CELL_TIMEOUT``)
    when given, else by the cell's tags and the scale."""
    if override:
        return float(override)
    tags = set(tags or ())
    if tags & {"explorer", "explorer-setup"} and "parameters" not in tags:
        return float(EXPLORER_CELL_LIMIT_S)
    return float(CELL_LIMITS_S.get(scale, SET_CELL_LIMIT_S))


def _first_line(source: str) -> str:
    line = next((ln.strip() for ln in (source or "").splitlines() if ln.strip()), "")
    return line if len(line) <= 80 else line[:77] + "..."


def _log(watch: dict, text: str) -> None:
    """One line of the runner's side of the conversation into the notebook's kernel.log, beside the
    kernel's own debug log: what was sent, what was heard, and when."""
    path = watch.get("log")
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"[runner {time.strftime('%H:%M:%S')}] {text}\n")
        except OSError:
            pass


_ENGINE = None


def _engine_name() -> str:
    """Register (once) the papermill engine whose notebook client keeps the per-cell time limits and
    watches each request for a sign of life; papermill's own engine otherwise."""
    global _ENGINE
    if _ENGINE is not None:
        return _ENGINE
    import asyncio

    from queue import Empty

    from nbclient.client import timestamp
    from nbclient.exceptions import CellExecutionComplete, CellTimeoutError, DeadKernelError
    from nbclient.util import ensure_async, run_sync
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines

    class WatchedClient(PapermillNotebookClient):
        def __init__(self, nb_man, watch: dict, **kw):
            super().__init__(nb_man, **kw)
            self.watch = watch

        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            try:  # the kernel's own versions, read inside it (a silent request: no execution count used)
                probe = {"ipykernel": "__import__('ipykernel').__version__",
                         "ipython": "__import__('IPython').__version__"}
                reply = await ensure_async(kc.execute("", silent=True, store_history=False, user_expressions=probe,
                                                      reply=True, timeout=10))
                got = reply["content"].get("user_expressions", {})
                self.watch["kernel"] = ", ".join(f"{k} {v.get('data', {}).get('text/plain', '?').strip(chr(39))}"
                                                 for k, v in got.items())
                _log(self.watch, f"kernel: {self.watch['kernel']}")
            except Exception as err:  # noqa: BLE001 - a diagnostic only
                _log(self.watch, f"kernel_info failed: {type(err).__name__}: {err}")
            return kc

        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            w = self.watch
            runs = cell.cell_type == "code" and cell.source.strip()
            if runs:
                w.update(cell=cell_index, source=cell.source, heard=False, sent=time.monotonic())
                _log(w, f"cell {cell_index}: execute_request sent ({_first_line(cell.source)!r})")
            dog = asyncio.ensure_future(self._watchdog(cell_index)) if runs else None
            try:
                out = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
                if runs:
                    _log(w, f"cell {cell_index}: reply after {time.monotonic() - w['sent']:.1f} s")
                return out
            except DeadKernelError:
                if w.get("lost") == cell_index:
                    # nbclient leaves its kernel-alive poll of this cell running when the reply poll is
                    # cancelled; it would outlive the kernel and fail on the closed client
                    for task in asyncio.all_tasks():
                        if getattr(task.get_coro(), "__name__", "") == "_async_poll_kernel_alive":
                            task.cancel()
                    raise RequestLost(cell_index) from None
                raise
            finally:
                if dog is not None:
                    dog.cancel()

        # papermill and nbclient call the blocking names, which the base class bound to its own coroutines
        execute_cell = run_sync(async_execute_cell)
        start_new_kernel_client = run_sync(async_start_new_kernel_client)

        async def _watchdog(self, cell_index):
            await asyncio.sleep(LOST_AFTER_S)
            if not self.watch["heard"]:
                self.watch["lost"] = cell_index
                _log(self.watch, f"cell {cell_index}: nothing heard on IOPub for {LOST_AFTER_S:.0f} s: "
                                 "the request never reached the kernel")
                task = getattr(self, "task_poll_for_reply", None)
                if task is not None:
                    task.cancel()  # nbclient turns this into DeadKernelError; async_execute_cell says why

        # Both polls below wait in slices of POLL_SLICE_S, never in one wait as long as the cell's limit (or
        # for ever, as nbclient's IOPub poll does): a reply can sit unread in the client's socket while its
        # wake-up is lost (seen under load: the kernel replied at once, the client read the reply only when
        # its one long wait ran out, 300 s later). A fresh short wait finds what is already there.
        async def _async_poll_for_reply(self, msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    msg = await ensure_async(self.kc.shell_channel.get_msg(
                        timeout=POLL_SLICE_S if left is None else max(0.0, min(POLL_SLICE_S, left))))
                except Empty:
                    if left is not None and left <= POLL_SLICE_S:  # the cell's limit has run out
                        task_poll_kernel_alive.cancel()
                        await self._async_check_alive()
                        await self._async_handle_timeout(timeout, cell)  # raises CellTimeoutError
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue  # a late reply to something else
                if self.record_timing:
                    cell["metadata"]["execution"]["shell.execute_reply"] = timestamp(msg)
                try:  # the outputs that belong to this reply: until the kernel says idle, a few seconds at most
                    await asyncio.wait_for(task_poll_output_msg, self.iopub_timeout)
                except asyncio.TimeoutError:
                    task_poll_kernel_alive.cancel()
                    task_poll_output_msg.cancel()
                    raise CellTimeoutError.error_from_timeout_and_cell(
                        "Timeout waiting for IOPub output", self.iopub_timeout, cell) from None
                task_poll_kernel_alive.cancel()
                return msg

        async def _async_poll_output_msg(self, parent_msg_id, cell, cell_index):
            while True:
                try:
                    msg = await ensure_async(self.kc.iopub_channel.get_msg(timeout=POLL_SLICE_S))
                except Empty:
                    continue
                if msg["parent_header"].get("msg_id") == parent_msg_id:
                    try:
                        self.process_message(msg, cell, cell_index)
                    except CellExecutionComplete:
                        return

        def process_message(self, msg, cell, cell_index):
            w = self.watch
            if not w.get("heard"):  # only messages answering the current request arrive here
                w["heard"] = True
                _log(w, f"cell {cell_index}: kernel {msg['msg_type']} "
                        f"{msg['content'].get('execution_state', '')} after {time.monotonic() - w['sent']:.2f} s")
            return super().process_message(msg, cell, cell_index)

    class WatchedEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, watch=None,
                                     **kwargs):
            kwargs.pop("input_path", None)
            return WatchedClient(nb_man, watch=watch if watch is not None else {}, timeout=execution_timeout,
                                 startup_timeout=start_timeout, kernel_name=kernel_name, log_output=log_output,
                                 stdout_file=stdout_file, stderr_file=stderr_file, **kwargs).execute()

    papermill_engines.register("fedlib-watched", WatchedEngine)
    _ENGINE = "fedlib-watched"
    return _ENGINE


def _attempt(name: str, params: dict, scale: str, out_dir: Path, source: Path, cell_timeout: float | None) -> tuple[str | None, str | None, dict]:
    """One papermill run of a notebook in a fresh kernel: (error or None, ``"lost"`` / ``"timeout"`` /
    ``"interrupted"`` / None, what the watch saw). KeyboardInterrupt is reported, not raised."""
    import papermill
    from nbclient.exceptions import CellTimeoutError

    output = out_dir / f"{name}.ipynb"
    watch = {"log": str(out_dir / "kernel.log")}
    kind = None
    try:
        papermill.execute_notebook(str(source), str(output), parameters=params, kernel_name=KERNEL,
                                   cwd=str(source.parent), progress_bar=False, report_mode=False,
                                   kernel_manager_class=_kernel_manager(), engine_name=_engine_name(),
                                   watch=watch, execution_timeout=cell_limit((), scale, cell_timeout),
                                   timeout_func=lambda cell: cell_limit(cell.metadata.get("tags"), scale, cell_timeout),
                                   extra_arguments=["--debug"])  # the kernel logs every request it handles
        return None, None, watch
    except KeyboardInterrupt:
        return "interrupted (Ctrl-C)", "interrupted", watch
    except RequestLost:
        kind = "lost"
    except CellTimeoutError:
        kind = "timeout" if watch.get("heard") else "lost"
    except Exception as err:  # the partial notebook stays in out_dir
        ename = getattr(err, "ename", type(err).__name__)
        evalue = getattr(err, "evalue", str(err))
        return f"{ename}: {evalue}".strip(), "interrupted" if ename == "KeyboardInterrupt" else None, watch
    cell, line = watch.get("cell"), _first_line(watch.get("source", ""))
    if kind == "lost":
        return (f"the request for cell {cell} ({line!r}) never reached the kernel (nothing on IOPub for "
                f"{LOST_AFTER_S:.0f} s)"), kind, watch
    limit = cell_limit(_cell_tags(output, cell), scale, cell_timeout)
    return (f"cell {cell} ({line!r}) ran past its {limit:.0f} s limit; raise it with --cell-timeout SECONDS "
            f"or {CELL_TIMEOUT_ENV}=SECONDS (partial output: {output})"), kind, watch


def _cell_tags(notebook: Path, index) -> list:
    try:
        import nbformat

        return nbformat.read(notebook, as_version=4).cells[index].metadata.get("tags", [])
    except Exception:  # noqa: BLE001 - the default limit then
        return []


def _cache_warnings(notebook: Path) -> list[str]:
    """The CacheWarning lines the notebook printed (a damaged cache entry rebuilt): said on the terminal
    too, not only inside the notebook."""
    try:
        import nbformat

        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # noqa: BLE001
        return []
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                lines += [ln.strip() for ln in out.get("text", "").splitlines() if "CacheWarning" in ln]
    return lines


def _cell_seconds(notebook: Path, top: int = 8) -> list[dict]:
    """The slowest cells of an executed notebook (papermill's per-cell durations): where its time went."""
    try:
        import nbformat

        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # noqa: BLE001
        return []
    cells = [{"cell": i, "first_line": _first_line(c.source), "seconds": round(float(c.metadata["papermill"]["duration"]), 1)}
             for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.metadata.get("papermill") or {}).get("duration") is not None]
    return sorted(cells, key=lambda c: -c["seconds"])[:top]


RUNNING_MARKER = "RUNNING"


def execute(name: str, params: dict, scale: str, out_root: Path = RESULTS_DIR,
            available: dict[str, Path] | None = None, threads: int = 1, cell_timeout: float | None = None,
            say=print) -> dict:
    """Run one notebook; never raises for a notebook failure (returns a record instead); Ctrl-C
    becomes :class:`Interrupted` carrying the record. A request that never reached the kernel is
    recovered by one more run of the whole notebook in a fresh kernel (``record["retries"]``)."""
    available = available if available is not None else notebooks()
    out_dir = out_root / scale / name
    output = out_dir / f"{name}.ipynb"
    record = {"notebook": name, "scale": scale, "params": params, "output": str(output), "ok": False,
              "error": None, "metrics": None, "claims": [], "retries": 0, "retry_reason": None}
    start = time.time()
    first_log = None
    for attempt in (1, 2):
        if attempt == 2:  # the first try's conversation is the evidence of the loss: kept beside the second's
            first_log = (out_dir / "kernel.log").read_bytes() if (out_dir / "kernel.log").exists() else b""
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (out_dir / "figures").mkdir(parents=True)
        if first_log is not None:
            (out_dir / "kernel-try1.log").write_bytes(first_log)
        # present while the notebook runs: a folder that still has it after the run was killed is incomplete
        write_atomic(out_dir / RUNNING_MARKER, json.dumps({"pid": os.getpid(), "attempt": attempt,
                                                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        with _env(FEDLIB_RUN_DIR=out_dir, FEDLIB_FIGURES_DIR=out_dir / "figures", FEDLIB_SCALE=scale,
                  FEDLIB_KERNEL_LOG=out_dir / "kernel.log", **kernel_env(threads)):
            error, kind, watch = _attempt(name, params, scale, out_dir, available[name], cell_timeout)
        record["kernel"] = watch.get("kernel")
        if kind != "lost" or attempt == 2:
            break
        record["retries"], record["retry_reason"] = 1, error
        say(f"{name}: {error}; running the notebook once more in a fresh kernel (the first try's kernel "
            f"log: {out_dir / 'kernel-try1.log'})")
    if kind == "lost" and record["retries"]:
        error = f"{error}, on both tries"
    record["error"] = error
    record["ok"] = error is None
    interrupted = kind == "interrupted"
    record["wall_time_s"] = round(time.time() - start, 1)
    for line in _cache_warnings(output):
        say(f"{name}: {line}")
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists() and not interrupted:
        try:
            doc = json.loads(metrics_path.read_text())
            problems = validate_metrics(doc)
        except (OSError, ValueError) as err:
            doc, problems = {}, [f"unreadable ({err})"]
        if problems:
            record["ok"] = False
            record["error"] = (record["error"] or "") + f" metrics.json invalid: {'; '.join(problems)}"
        else:  # how the run went, beside what it measured: retries, limits, where the time went
            doc["runner"] = {"retries": record["retries"], "retry_reason": record["retry_reason"],
                             "cell_limit_s": cell_limit((), scale, cell_timeout), "kernel": record["kernel"],
                             "wall_time_s": record["wall_time_s"], "slowest_cells": _cell_seconds(output)}
            write_atomic(metrics_path, json.dumps(doc, indent=2) + "\n")
        record["metrics"] = str(metrics_path)
        record["claims"] = doc.get("claims", [])
    elif record["ok"]:
        record["ok"] = False
        record["error"] = "the notebook finished without writing metrics.json (call run.finish())"
    if not interrupted:
        (out_dir / RUNNING_MARKER).unlink(missing_ok=True)
    if interrupted:
        raise Interrupted(record)
    return record


@contextmanager
def results_lock(folder: Path):
    """One run per results folder: a second run into the same folder is refused (it would replace
    the outputs of the first while the first reports them). The lock dies with its process."""
    import fcntl

    path = Path(folder) / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UsageError(f"{folder} is in use by another run ({holder}); wait for it to finish or choose "
                         "another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _write_or_explain(path: Path, text: str) -> None:
    """Write atomically; a full disk or an unwritable folder becomes one clear line (OSError kept)."""
    try:
        write_atomic(path, text)
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise OSError(err.errno, f"cannot write {path}: {why}; free space or choose another --out") from None


def default_jobs() -> int:
    """Notebooks run at once by default: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def expected_seconds(name: str, scale: str, out_root: Path) -> float:
    """How long a notebook took last time at this scale (the committed results, else the last run in
    ``out_root``): the longest start first, so that the last to finish is not a long one started late."""
    for root in (RESULTS_DIR, out_root):
        try:
            doc = json.loads((Path(root) / scale / name / "metrics.json").read_text())
            return float(doc["provenance"]["wall_time_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return float("inf")  # never measured: could be the longest


def _child(conn, name, params, scale, out_root, available, threads, cell_timeout):
    """A worker process of ``reproduce --jobs``: runs one notebook, sends back its record. One Ctrl-C
    ends the notebook (its partial output kept); a second one, forwarded by the parent, is ignored so
    that the clean-up finishes."""
    import signal

    hits = []

    def on_sigint(signum, frame):
        if not hits:
            hits.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    say = lambda text: conn.send(("say", text))  # noqa: E731 - the parent prints, above its progress bar
    try:
        conn.send(("done", execute(name, params, scale, out_root, available, threads, cell_timeout, say=say)))
    except Interrupted as stop:
        conn.send(("interrupted", stop.args[0]))
    except BaseException as err:  # noqa: BLE001 - reported as this notebook's failure, not a hang
        conn.send(("done", {"notebook": name, "scale": scale, "params": params, "ok": False, "claims": [],
                            "error": f"the runner failed: {type(err).__name__}: {err}", "retries": 0}))
    finally:
        conn.close()


def _run_parallel(plan, scale, out_root, available, threads, cell_timeout, jobs, on_record, bar):
    """Run ``plan`` with up to ``jobs`` notebooks at once, each in a forked worker process (its kernel
    keeps ``threads`` threads, so the numbers are those of a sequential run). Calls ``on_record`` as each
    finishes; returns the record of an interrupted notebook or None. Every wait is bounded."""
    import multiprocessing as mp
    import signal
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")  # the worker inherits the parsed plan and settings as they are
    todo = sorted(plan, key=lambda item: -expected_seconds(item[0], scale, out_root))
    live, interrupted = {}, None

    def start(name, params):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, name, params, scale, out_root, available, threads,
                                                cell_timeout), daemon=False)
        proc.start()
        child.close()
        live[parent] = (name, proc)

    def receive(conn):
        nonlocal interrupted
        name, proc = live[conn]
        try:
            kind, payload = conn.recv()
        except EOFError:  # the worker died without a word (killed, out of memory)
            proc.join(timeout=10)
            del live[conn]
            on_record({"notebook": name, "scale": scale, "ok": False, "claims": [], "retries": 0,
                       "error": f"its worker process died (exit code {proc.exitcode})"})
            return
        if kind == "say":
            tqdm_write(payload)
            return
        proc.join(timeout=60)
        del live[conn]
        if kind == "interrupted":
            interrupted = payload
        on_record(payload, interrupted=kind == "interrupted")

    try:
        while todo or live:
            while todo and len(live) < jobs and interrupted is None:
                name, params = todo.pop(0)
                bar.set_postfix_str(name)
                start(name, params)
            if not live:
                break
            for conn in wait(list(live), timeout=1.0):
                receive(conn)
    except KeyboardInterrupt:
        for conn, (name, proc) in list(live.items()):  # a SIGINT sent to the runner alone reaches them too
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        deadline = time.time() + 120
        while live and time.time() < deadline:
            for conn in wait(list(live), timeout=1.0):
                receive(conn)
        for conn, (name, proc) in list(live.items()):  # bounded: a worker that did not stop is ended
            proc.kill()
            proc.join(timeout=10)
            on_record({"notebook": name, "scale": scale, "ok": False, "claims": [], "retries": 0,
                       "error": "interrupted (Ctrl-C); its worker did not stop in 120 s and was killed"},
                      interrupted=True)
            interrupted = interrupted or {"notebook": name}
        if interrupted is None:
            interrupted = {"notebook": "?"}
    return interrupted


def tqdm_write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)


def reproduce(names, scale="quick", overrides=(), device=None, out_root: Path = RESULTS_DIR,
              update_notebooks: bool = False, threads: int = 1, jobs: int | None = None,
              cell_timeout: float | None = None) -> int:
    from tqdm.auto import tqdm

    available = notebooks()
    plan = build_plan(list(names), scale, list(overrides), device, available)
    folder = check_out_dir(out_root, scale)
    jobs = max(1, min(jobs or default_jobs(), len(plan)))
    order = [name for name, _ in plan]
    # the summary names every planned notebook from the start and is rewritten as each one ends, so a
    # killed run leaves a summary that says what finished, what was running and what never started
    status = {name: {"notebook": name, "scale": scale, "ok": False, "status": "pending", "claims": []} for name in order}
    summary_path = folder / "summary.json"
    summary_failed = []

    def write_summary(final: bool = False):
        text = json.dumps([status[n] for n in order], indent=2) + "\n"
        if final:
            _write_or_explain(summary_path, text)
            return
        try:
            write_atomic(summary_path, text)
        except OSError as err:
            if not summary_failed:
                summary_failed.append(err)
                tqdm.write(f"warning: cannot update {summary_path} ({err.strerror or err}); the run goes on")

    records, interrupted = [], None
    with results_lock(folder):
        bar = tqdm(total=len(plan), desc=f"notebooks ({scale}, {jobs} at once)", unit="nb")

        def on_record(record, interrupted: bool = False):
            record = {**record, "status": "interrupted" if interrupted else ("ok" if record.get("ok") else "failed")}
            status[record["notebook"]] = record
            records.append(record)
            bar.update(1)
            retried = f", retried once: {record['retry_reason']}" if record.get("retries") else ""
            state = "ok" if record["ok"] else f"FAILED: {record['error']}"
            tqdm.write(f"{record['notebook']}: {state} ({record.get('wall_time_s', '?')} s{retried}) -> "
                       f"{record.get('output', folder / record['notebook'])}")
            if record["ok"] and update_notebooks:
                _update_committed(record["notebook"], Path(record["output"]), available[record["notebook"]])
            write_summary()

        write_summary()
        if jobs == 1:
            for name, params in plan:
                bar.set_postfix_str(name)
                status[name]["status"] = "running"
                write_summary()
                try:
                    record = execute(name, params, scale, out_root, available, threads, cell_timeout, say=tqdm.write)
                except (Interrupted, KeyboardInterrupt) as stop:
                    interrupted = stop.args[0] if isinstance(stop, Interrupted) else \
                        {"notebook": name, "scale": scale, "ok": False, "claims": [], "error": "interrupted (Ctrl-C)"}
                    on_record(interrupted, interrupted=True)
                    break
                on_record(record)
        else:
            interrupted = _run_parallel(plan, scale, out_root, available, threads, cell_timeout, jobs, on_record, bar)
        bar.close()
        finished = [status[n] for n in order if status[n]["status"] in ("ok", "failed")]
        if finished:  # the table first: a summary that cannot be written must not hide what finished
            print("\n" + claims_markdown(finished))
        write_summary(final=True)
    if interrupted is not None:
        done = ", ".join(r["notebook"] for r in finished) or "none"
        print(f"\ninterrupted during {interrupted['notebook']} (its partial output is kept in "
              f"{folder / interrupted['notebook']}); finished: {done}", file=sys.stderr)
        return 130
    failed = [r["notebook"] for r in finished if not r["ok"]]
    broken = [f"{r['notebook']}: {c['name']} ({c['verdict']})" for r in finished for c in r["claims"]
              if c.get("required") and c["verdict"] != "holds"]
    if failed:
        print(f"\nfailed notebooks (partial outputs kept): {', '.join(failed)}", file=sys.stderr)
    if broken:
        print(f"\nrequired claims that do not hold: {'; '.join(broken)}", file=sys.stderr)
    return 1 if failed or broken else 0


def _update_committed(name: str, executed: Path, target: Path) -> None:
    """Copy a quick run's executed notebook and figures over the committed ones."""
    shutil.copyfile(executed, target)
    clean_notebook(target)
    FIGURES_DIR.mkdir(exist_ok=True)
    for fig in (executed.parent / "figures").iterdir():
        shutil.copyfile(fig, FIGURES_DIR / fig.name)


def collect(scale: str = "quick", out_root: Path = RESULTS_DIR) -> tuple[list[dict], list[str]]:
    """(records of the notebooks with valid results at ``scale``, one line per notebook that has the
    parameter set ``scale`` but whose results are missing or incomplete). UsageError when ``scale`` has no results folder at all."""
    folder = Path(out_root) / scale
    if not folder.is_dir():
        have = sorted(p.name for p in Path(out_root).iterdir() if p.is_dir()) if Path(out_root).is_dir() else []
        raise UsageError(f"no results for scale {scale!r} in {out_root}; allowed: {', '.join(have) or '(none yet)'}; "
                         f"e.g. `python -m fedlib reproduce --scale {scale}` first")
    records, problems = [], []
    # a notebook without this parameter set (no `long` for 00) is not missing from it
    expected = {n for n in notebooks() if scale in parameter_sets(n)}
    names = sorted(expected | {p.parent.name for p in folder.glob("*/metrics.json")})
    for name in names:
        path = folder / name / "metrics.json"
        if (folder / name / RUNNING_MARKER).exists():
            problems.append(f"{name}: incomplete (its run was stopped before it ended: "
                            f"{folder / name / RUNNING_MARKER} is still there); re-run it")
            continue
        if not path.exists():
            problems.append(f"{name}: missing (no {path})")
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{name}: incomplete ({path} unreadable: {err})")
            continue
        bad = validate_metrics(doc)
        if bad:
            more = f"; and {len(bad) - 2} more" if len(bad) > 2 else ""
            problems.append(f"{name}: incomplete ({path}: {'; '.join(bad[:2])}{more}); re-run it")
            continue
        records.append({"notebook": doc["notebook"], "ok": True, "claims": doc["claims"], "error": None})
    return records, problems


README_BLOCK = ("<!-- claims:start -->", "<!-- claims:end -->")


def readme_block(scale: str) -> tuple[str, str]:
    """The README markers between which the claims table of ``scale`` lives."""
    return README_BLOCK if scale == "quick" else (f"<!-- claims-{scale}:start -->", f"<!-- claims-{scale}:end -->")


def report(scale: str = "quick", readme: bool = False, out_root: Path = RESULTS_DIR) -> str:
    """The claims table from the last run at ``scale`` (optionally written into README.md).
    Missing or incomplete notebooks are named on stderr; nothing to report is a UsageError."""
    records, problems = collect(scale, out_root)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    if not records:
        raise UsageError(f"nothing to report at scale {scale!r}: every notebook is missing or incomplete "
                         f"(see above); run `python -m fedlib reproduce --scale {scale}` first")
    table = claims_markdown(records)
    if readme:
        path = REPO_ROOT / "README.md"
        text = path.read_text()
        start, end = readme_block(scale)
        if start not in text or end not in text:
            raise UsageError(f"README.md has no {start} ... {end} block to fill")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        _write_or_explain(path, f"{head}{start}\n{table}\n{end}{tail}")
    return table


# ---------------------------------------------------------------------------------------------
# CLI


def list_notebooks(names: list[str]) -> str:
    available = notebooks()
    lines = []
    for name in resolve_names(names, available):
        sets = ", ".join(parameter_sets(name))
        lines.append(f"{name}    (parameter sets: {sets})")
        for pname, p in parameters(available[name]).items():
            line = f"    {pname}: {p['type']} = {p['default']!r}" + (f"    # {p['help']}" if p["help"] else "")
            lines.append(line + (f"    [allowed: {p['rules']}]" if p["rules"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every notebook with its parameters, types, defaults, help and rules")
    p_list.add_argument("names", nargs="*")
    p_rep = sub.add_parser("reproduce", help="execute notebooks with papermill into <out>/<scale>/<name>/")
    p_rep.add_argument("names", nargs="*", metavar="NAME", help="notebooks (default: all); unique prefixes work")
    p_rep.add_argument("--scale", default="quick", help="smoke | quick (default) | paper | a set in notebooks/params")
    p_rep.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    p_rep.add_argument("--device", default=None, help="auto | cpu | cuda")
    p_rep.add_argument("--out", default=str(RESULTS_DIR), help="results root (default: results/)")
    p_rep.add_argument("--threads", type=int, default=1,
                       help="CPU threads per kernel, at most os.cpu_count() (default 1: fastest for fedlib's small "
                            "models, and the setting the committed results were made with)")
    p_rep.add_argument("--jobs", type=int, default=None, metavar="N",
                       help="notebooks run at once, each in its own kernel with --threads threads "
                            "(default: the number of cores, longest first)")
    p_rep.add_argument("--cell-timeout", default=os.environ.get(CELL_TIMEOUT_ENV), metavar="SECONDS",
                       help=f"time limit of every cell (default: by scale and cell: smoke {CELL_LIMITS_S['smoke']} s, "
                            f"quick {CELL_LIMITS_S['quick']} s, other sets {SET_CELL_LIMIT_S} s, explorers "
                            f"{EXPLORER_CELL_LIMIT_S} s; also ${CELL_TIMEOUT_ENV})")
    p_rep.add_argument("--update-notebooks", action="store_true",
                       help="copy the executed notebooks and figures over the committed ones (--scale quick "
                            "without -p only)")
    p_report = sub.add_parser("report", help="the claims table of the last run at a scale")
    p_report.add_argument("--scale", default="quick")
    p_report.add_argument("--out", default=str(RESULTS_DIR), help="results root (default: results/)")
    p_report.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(list_notebooks(args.names))
            return 0
        if args.command == "report":
            print(report(args.scale, args.readme, Path(args.out).resolve()))
            return 0
        cpus = os.cpu_count() or 1
        if not 1 <= args.threads <= cpus:
            raise UsageError(f"--threads {args.threads}: allowed: an integer >= 1 and at most {cpus} (this machine's "
                             "CPUs, os.cpu_count()); e.g. --threads 1")
        if args.jobs is not None and args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: allowed: an integer >= 1 (default: {default_jobs()}, the "
                             "cores here); e.g. --jobs 1 to run the notebooks one after another")
        timeout = args.cell_timeout
        try:
            timeout = None if timeout in (None, "") else float(timeout)
        except ValueError:
            timeout = float("nan")
        if timeout is not None and not (0 < timeout < float("inf")):
            raise UsageError(f"--cell-timeout / ${CELL_TIMEOUT_ENV} {args.cell_timeout!r}: allowed: a number of "
                             "seconds > 0; e.g. --cell-timeout 3600")
        if args.update_notebooks and (args.scale != "quick" or args.param):
            # the committed notebooks and figures are the quick defaults' run: anything else would replace them
            what = f"--scale {args.scale}" if args.scale != "quick" else " ".join(f"-p {p}" for p in args.param)
            raise UsageError(f"--update-notebooks with {what}: the committed notebooks and figures hold the quick "
                             "run with its defaults; allowed: --update-notebooks with --scale quick and no -p; e.g. "
                             "drop --update-notebooks (results still go to --out)")
        check_cache_dir()
        # absolute: papermill runs each notebook from the notebooks' folder, where a relative --out means nothing
        return reproduce(args.names, args.scale, args.param, args.device, Path(args.out).resolve(), args.update_notebooks,
                         args.threads, args.jobs, timeout)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or an unwritable folder mid-run: one line, not a traceback
        print(f"error: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before any notebook ran", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
