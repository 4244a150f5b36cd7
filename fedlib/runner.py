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


def execute(name: str, params: dict, scale: str, out_root: Path = RESULTS_DIR,
            available: dict[str, Path] | None = None, threads: int = 1) -> dict:
    """Run one notebook; never raises for a notebook failure (returns a record instead); Ctrl-C
    becomes :class:`Interrupted` carrying the record."""
    import papermill

    available = available if available is not None else notebooks()
    out_dir = out_root / scale / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "figures").mkdir(parents=True)
    output = out_dir / f"{name}.ipynb"
    record = {"notebook": name, "scale": scale, "params": params, "output": str(output), "ok": False,
              "error": None, "metrics": None, "claims": []}
    start = time.time()
    interrupted = False
    with _env(FEDLIB_RUN_DIR=out_dir, FEDLIB_FIGURES_DIR=out_dir / "figures", FEDLIB_SCALE=scale,
              FEDLIB_KERNEL_LOG=out_dir / "kernel.log", **kernel_env(threads)):
        try:
            papermill.execute_notebook(str(available[name]), str(output), parameters=params,
                                       kernel_name=KERNEL, cwd=str(available[name].parent),
                                       progress_bar=False, report_mode=False,
                                       kernel_manager_class=_kernel_manager())
            record["ok"] = True
        except KeyboardInterrupt:
            interrupted = True
            record["error"] = "interrupted (Ctrl-C)"
        except Exception as err:  # the partial notebook stays in out_dir
            ename = getattr(err, "ename", type(err).__name__)
            evalue = getattr(err, "evalue", str(err))
            record["error"] = f"{ename}: {evalue}".strip()
            interrupted = ename == "KeyboardInterrupt"  # SIGINT reached the kernel's cell first
    record["wall_time_s"] = round(time.time() - start, 1)
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
        record["metrics"] = str(metrics_path)
        record["claims"] = doc.get("claims", [])
    elif record["ok"]:
        record["ok"] = False
        record["error"] = "the notebook finished without writing metrics.json (call run.finish())"
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


def reproduce(names, scale="quick", overrides=(), device=None, out_root: Path = RESULTS_DIR,
              update_notebooks: bool = False, threads: int = 1) -> int:
    from tqdm.auto import tqdm

    available = notebooks()
    plan = build_plan(list(names), scale, list(overrides), device, available)
    folder = check_out_dir(out_root, scale)
    records, interrupted = [], None
    with results_lock(folder):
        bar = tqdm(plan, desc=f"notebooks ({scale})", unit="nb")
        for name, params in bar:
            bar.set_postfix_str(name)
            try:
                record = execute(name, params, scale, out_root, available, threads)
            except (Interrupted, KeyboardInterrupt) as stop:
                interrupted = stop.args[0] if isinstance(stop, Interrupted) else {"notebook": name}
                break
            records.append(record)
            status = "ok" if record["ok"] else f"FAILED: {record['error']}"
            tqdm.write(f"{name}: {status} ({record['wall_time_s']} s) -> {record['output']}")
            if record["ok"] and update_notebooks:
                _update_committed(name, Path(record["output"]), available[name])
        bar.close()
        _write_or_explain(folder / "summary.json", json.dumps(records, indent=2) + "\n")
    if records:
        print("\n" + claims_markdown(records))
    if interrupted is not None:
        done = ", ".join(r["notebook"] for r in records) or "none"
        print(f"\ninterrupted during {interrupted['notebook']} (its partial output is kept in "
              f"{folder / interrupted['notebook']}); finished: {done}", file=sys.stderr)
        return 130
    failed = [r["notebook"] for r in records if not r["ok"]]
    broken = [f"{r['notebook']}: {c['name']} ({c['verdict']})" for r in records for c in r["claims"]
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
        if args.update_notebooks and (args.scale != "quick" or args.param):
            # the committed notebooks and figures are the quick defaults' run: anything else would replace them
            what = f"--scale {args.scale}" if args.scale != "quick" else " ".join(f"-p {p}" for p in args.param)
            raise UsageError(f"--update-notebooks with {what}: the committed notebooks and figures hold the quick "
                             "run with its defaults; allowed: --update-notebooks with --scale quick and no -p; e.g. "
                             "drop --update-notebooks (results still go to --out)")
        check_cache_dir()
        # absolute: papermill runs each notebook from the notebooks' folder, where a relative --out means nothing
        return reproduce(args.names, args.scale, args.param, args.device, Path(args.out).resolve(), args.update_notebooks,
                         args.threads)
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
