"""How long the quick reproduction takes on this machine: ``python -m fedlib reproduce`` from a cold
cache (a fresh ``$FEDLIB_CACHE``: every teacher, classifier and stage trained), then again with that
cache warm, each notebook's wall time and the whole command's, with the cores and jobs it ran on.
The peer is the same command with ``--jobs 1`` (one notebook after another, as fedlib ran before
``--jobs``), timed from the same cold start when ``--peer`` is given.

    .venv/bin/python benchmarks/reproduce_time.py                        # cold, then warm, --jobs = cores
    .venv/bin/python benchmarks/reproduce_time.py --out results --update-notebooks   # the cold run is the regeneration
    .venv/bin/python benchmarks/reproduce_time.py --readme               # README's times block from the JSON

Writes ``benchmarks/results/reproduce_time-cpu.json``; ``--readme`` fills README.md's block between
``<!-- times:start -->`` and ``<!-- times:end -->`` from that file (never typed by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "reproduce_time-cpu.json"
README_BLOCK = ("<!-- times:start -->", "<!-- times:end -->")


def timed_run(out: Path, cache: Path, jobs: int | None, scale: str, extra: list[str]) -> dict:
    """One ``reproduce`` command: its wall time, exit code and each notebook's wall time and retries."""
    cmd = [sys.executable, "-m", "fedlib", "reproduce", "--scale", scale, "--out", str(out), *extra]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    env = {**os.environ, "FEDLIB_CACHE": str(cache)}
    print("$", " ".join(cmd), f"(FEDLIB_CACHE={cache})", flush=True)
    t0 = time.perf_counter()
    # bounded like every command of fedlib: the runner's own cell limits end a hung cell long before this
    done = subprocess.run(cmd, cwd=REPO, env=env, timeout=4 * 3600)
    wall = time.perf_counter() - t0
    summary = json.loads((out / scale / "summary.json").read_text())
    return {"command": " ".join(cmd[1:]), "exit_code": done.returncode, "wall_time_s": round(wall, 1),
            "notebooks": {r["notebook"]: {"wall_time_s": r.get("wall_time_s"), "ok": r.get("ok"),
                                          "retries": r.get("retries", 0)} for r in summary}}


def render(doc: dict) -> str:
    """The README's times block: a table of the measured runs."""
    runs = doc["runs"]
    names = sorted({n for r in runs.values() for n in r["notebooks"]})
    head = "| run | jobs | whole run | " + " | ".join(names) + " |"
    rows = [head, "|" + "---|" * (3 + len(names))]
    for label, r in runs.items():
        cells = [f"{r['notebooks'].get(n, {}).get('wall_time_s', '-')} s" for n in names]
        rows.append(f"| {label} | {r['jobs']} | **{r['wall_time_s'] / 60:.1f} min** | " + " | ".join(cells) + " |")
    when = doc.get("date", "?")
    # the same code runs at different speeds on the CPU models these machines are given: name it
    cpu = f" ({doc['cpu']['model']})" if doc.get("cpu") else ""
    return (f"Measured by `benchmarks/reproduce_time.py` on {when}: {doc['cores']} cores{cpu}, one thread per "
            f"kernel, scale `{doc['scale']}` (per-notebook times overlap when notebooks run at once).\n\n"
            + "\n".join(rows))


def write_readme(doc: dict) -> None:
    path = REPO / "README.md"
    text = path.read_text()
    start, end = README_BLOCK
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{render(doc)}\n{end}{tail}")
    print("wrote the times block of", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="quick")
    ap.add_argument("--jobs", type=int, default=None, help="notebooks at once (default: the runner's, the cores)")
    ap.add_argument("--out", default=None, help="results root of the cold run (default: a temporary folder)")
    ap.add_argument("--update-notebooks", action="store_true", help="pass --update-notebooks to the cold run")
    ap.add_argument("--cache", default=None, help="the cache folder to fill (must not exist yet: the run is cold)")
    ap.add_argument("--peer", action="store_true", help="also time the cold run with --jobs 1")
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--readme", action="store_true", help="only write README's times block from the JSON")
    args = ap.parse_args(argv)
    if args.readme:
        write_readme(json.loads(RESULT.read_text()))
        return 0
    from fedlib.results import cpu_model, write_benchmark
    from fedlib.runner import default_jobs

    jobs = args.jobs or default_jobs()
    work = Path(tempfile.mkdtemp(prefix="fedlib-reproduce-time-"))
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"--cache {cache} is not empty: a cold run needs an empty cache; allowed: a new folder")
    runs = {}
    cold_out = Path(args.out).resolve() if args.out else work / "cold"
    extra = ["--update-notebooks"] if args.update_notebooks else []
    runs["cold cache"] = {**timed_run(cold_out, cache, jobs, args.scale, extra), "jobs": jobs}
    if not args.no_warm:
        runs["warm cache"] = {**timed_run(work / "warm", cache, jobs, args.scale, []), "jobs": jobs}
    if args.peer:
        runs["cold cache, one at a time (peer)"] = {**timed_run(work / "peer", work / "peer-cache", 1, args.scale, []),
                                                   "jobs": 1}
    doc = {"peer": "the same command with --jobs 1 (when run with --peer)", "scale": args.scale,
           "cores": default_jobs(), "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"), "runs": runs}
    write_benchmark("reproduce_time", doc, "cpu", out=RESULT)
    return 0 if all(r["exit_code"] in (0, 1) for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
