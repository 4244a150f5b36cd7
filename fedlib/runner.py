"""The papermill driver: ``python -m fedlib list | reproduce | report``.

``reproduce`` executes notebooks with papermill (kernel ``python3``), each into
``results/<scale>/<name>/`` (the executed notebook, ``metrics.json``, ``figures/``), shows a
progress bar over notebooks, and ends with one table of every notebook's claims. Everything the
user typed is checked before anything runs; a failing notebook keeps its partial output and does
not stop the others. Exit status: 0 when every notebook ran and every *required* claim holds.

Parameter sets: ``quick`` is each notebook's own defaults (its tagged ``parameters`` cell); other
sets (``smoke``, ``paper``, and extras such as ``fashion_mnist``) live in
``notebooks/params/<name>.yaml``; ``-p KEY=VALUE`` overrides any of them.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from .results import validate_metrics
from .utils import DEVICES, REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
RESULTS_DIR = REPO_ROOT / "results"
FIGURES_DIR = REPO_ROOT / "figures"
SCALES = ("smoke", "quick", "paper")
KERNEL = "python3"


class UsageError(ValueError):
    """Bad input from the command line: reported before anything runs."""


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


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parameters(path: Path) -> dict[str, dict]:
    """name -> {type, default (a Python value), help}, read from the tagged parameters cell."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    if not found:
        raise UsageError(f"{path.name} has no cell tagged 'parameters'")
    out = {}
    for name, p in found.items():
        default = _literal(p["default"])
        out[name] = {"type": type(default).__name__ if default is not None else p["inferred_type_name"],
                     "default": default, "help": (p.get("help") or "").strip()}
    return out


def parameter_sets(name: str) -> dict[str, dict]:
    """{scale: overrides} for a notebook: ``quick`` = {} plus the sets in its yaml file."""
    sets = {"quick": {}}
    path = NOTEBOOKS_DIR / "params" / f"{name}.yaml"
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) for v in loaded.values()):
            raise UsageError(f"{path} must map set names (smoke, paper, ...) to parameter dicts")
        sets.update({k: v or {} for k, v in loaded.items()})
    return sets


def parse_value(text: str):
    """A command-line value: a Python/YAML literal where it parses as one, else the string."""
    value = _literal(text)
    if isinstance(value, str) and value == text:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if not isinstance(value, (bool, int, float, list, dict)) and value is not None:
            value = text
    return value


def coerce(name: str, value, spec: dict, notebook: str):
    """``value`` converted to the type of the parameter's default, or a UsageError."""
    default, want = spec["default"], spec["type"]
    if default is None or want in ("None", "NoneType"):
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            value = [value]  # -p seeds=3 means [3]
        ok = True
        if default:
            elem = type(default[0])
            if elem is float:
                ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                value = [float(v) for v in value] if ok else value
            else:
                ok = all(isinstance(v, elem) and not (elem is int and isinstance(v, bool)) for v in value)
        value = list(value)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise UsageError(
            f"{notebook}: parameter {name}={value!r} has type {type(value).__name__} but must be "
            f"{want} (default {default!r}); e.g. -p {name}={default!r}"
        )
    return value


def build_plan(names: list[str], scale: str, overrides: list[str], device: str | None,
               available: dict[str, Path] | None = None) -> list[tuple[str, dict]]:
    """Check everything the user asked for and return [(notebook, parameters)]; UsageError if not."""
    available = available if available is not None else notebooks()
    if not available:
        raise UsageError(f"no notebooks found in {NOTEBOOKS_DIR}")
    names = resolve_names(names, available)
    if device is not None and device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"-p {item!r} must look like KEY=VALUE (e.g. -p seeds=[0,1])")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), parse_value(text)))
    plan = []
    all_sets = set()
    for name in names:
        specs = parameters(available[name])
        sets = parameter_sets(name)
        all_sets.update(sets)
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
        plan.append((name, params))
    unused = [k for k, _ in pairs if not any(k in parameters(available[n]) for n, _ in plan)]
    if unused:
        raise UsageError(f"no selected notebook has parameter(s) {', '.join(unused)}; see `python -m fedlib list`")
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
            available: dict[str, Path] | None = None) -> dict:
    """Run one notebook; never raises for a notebook failure: returns a record instead."""
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
    with _env(FEDLIB_RUN_DIR=out_dir, FEDLIB_FIGURES_DIR=out_dir / "figures", FEDLIB_SCALE=scale):
        try:
            papermill.execute_notebook(str(available[name]), str(output), parameters=params,
                                       kernel_name=KERNEL, cwd=str(available[name].parent),
                                       progress_bar=False, report_mode=False)
            record["ok"] = True
        except Exception as err:  # the partial notebook stays in out_dir
            ename = getattr(err, "ename", type(err).__name__)
            evalue = getattr(err, "evalue", str(err))
            record["error"] = f"{ename}: {evalue}".strip()
    record["wall_time_s"] = round(time.time() - start, 1)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        doc = json.loads(metrics_path.read_text())
        problems = validate_metrics(doc)
        if problems:
            record["ok"] = False
            record["error"] = (record["error"] or "") + f" metrics.json invalid: {'; '.join(problems)}"
        record["metrics"] = str(metrics_path)
        record["claims"] = doc.get("claims", [])
    elif record["ok"]:
        record["ok"] = False
        record["error"] = "the notebook finished without writing metrics.json (call run.finish())"
    return record


def claims_markdown(records: list[dict]) -> str:
    lines = ["| notebook | claim | paper | measured | holds |", "|---|---|---|---|---|"]
    for r in records:
        if not r["ok"]:
            lines.append(f"| {r['notebook']} | (notebook failed) | | {r['error'][:120]} | no |")
        for c in r["claims"]:
            holds = {True: "yes", False: "no", None: "n/a"}[c["holds"]]
            req = " (required)" if c.get("required") else ""
            cells = [r["notebook"], c["name"] + req, c["paper"], c["measured"], holds]
            lines.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in cells) + " |")
    return "\n".join(lines)


def reproduce(names, scale="quick", overrides=(), device=None, out_root: Path = RESULTS_DIR,
              update_notebooks: bool = False) -> int:
    from tqdm.auto import tqdm

    available = notebooks()
    plan = build_plan(list(names), scale, list(overrides), device, available)
    records = []
    bar = tqdm(plan, desc=f"notebooks ({scale})", unit="nb")
    for name, params in bar:
        bar.set_postfix_str(name)
        record = execute(name, params, scale, out_root, available)
        records.append(record)
        status = "ok" if record["ok"] else f"FAILED: {record['error']}"
        tqdm.write(f"{name}: {status} ({record['wall_time_s']} s) -> {record['output']}")
        if record["ok"] and update_notebooks:
            _update_committed(name, Path(record["output"]), available[name])
    (out_root / scale).mkdir(parents=True, exist_ok=True)
    (out_root / scale / "summary.json").write_text(json.dumps(records, indent=2) + "\n")
    print("\n" + claims_markdown(records))
    failed = [r["notebook"] for r in records if not r["ok"]]
    broken = [f"{r['notebook']}: {c['name']}" for r in records for c in r["claims"]
              if c.get("required") and c["holds"] is False]
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


def report(scale: str = "quick", readme: bool = False, out_root: Path = RESULTS_DIR) -> str:
    """The claims table from the last run at ``scale`` (optionally written into README.md)."""
    records = []
    for path in sorted((out_root / scale).glob("*/metrics.json")):
        doc = json.loads(path.read_text())
        records.append({"notebook": doc["notebook"], "ok": True, "claims": doc["claims"], "error": None})
    table = claims_markdown(records)
    if readme:
        path = REPO_ROOT / "README.md"
        text = path.read_text()
        start, end = "<!-- claims:start -->", "<!-- claims:end -->"
        if start not in text or end not in text:
            raise UsageError(f"README.md has no {start} ... {end} block to fill")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        path.write_text(f"{head}{start}\n{table}\n{end}{tail}")
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
            lines.append(f"    {pname}: {p['type']} = {p['default']!r}" + (f"    # {p['help']}" if p["help"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every notebook with its parameters, types, defaults and help")
    p_list.add_argument("names", nargs="*")
    p_rep = sub.add_parser("reproduce", help="execute notebooks with papermill into results/<scale>/<name>/")
    p_rep.add_argument("names", nargs="*", metavar="NAME", help="notebooks (default: all); unique prefixes work")
    p_rep.add_argument("--scale", default="quick", help="smoke | quick (default) | paper | a set in notebooks/params")
    p_rep.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    p_rep.add_argument("--device", default=None, help="auto | cpu | cuda")
    p_rep.add_argument("--out", default=str(RESULTS_DIR), help="results root (default: results/)")
    p_rep.add_argument("--update-notebooks", action="store_true",
                       help="copy the executed notebooks and figures over the committed ones (quick scale)")
    p_report = sub.add_parser("report", help="the claims table of the last run at a scale")
    p_report.add_argument("--scale", default="quick")
    p_report.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(list_notebooks(args.names))
            return 0
        if args.command == "report":
            print(report(args.scale, args.readme))
            return 0
        return reproduce(args.names, args.scale, args.param, args.device, Path(args.out), args.update_notebooks)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
