"""Committed results are what main produces: every committed metrics.json comes from a clean tree at a
commit after which nothing it depends on changed; the README's claims tables are what
`python -m fedlib report` prints for them; the committed notebooks show the same claims."""

import json
import subprocess
from pathlib import Path

import nbformat
import pytest

from fedlib import runner
from fedlib.results import INPUT_PATHS, claims_markdown, validate_metrics

REPO = Path(__file__).resolve().parent.parent


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


if git("rev-parse", "--git-dir").returncode != 0:  # pragma: no cover - a source tarball, not a checkout
    pytest.skip("not a git checkout: provenance cannot be checked", allow_module_level=True)

COMMITTED = sorted(p for p in git("ls-files", "results/*/*/metrics.json").stdout.split() if p)


def test_every_notebook_has_committed_quick_results():
    names = set(runner.notebooks())
    have = {Path(p).parent.name for p in COMMITTED if p.startswith("results/quick/")}
    assert names <= have, f"no committed results/quick for {sorted(names - have)}: run `make notebooks`"


def inputs_of(name: str) -> list[str]:
    """What one notebook's results depend on: the library and the pins (INPUT_PATHS less the notebooks),
    and its own source and parameter sets; another notebook's prose or parameters cannot change them."""
    shared = [p for p in INPUT_PATHS if not p.startswith("notebooks")]
    return [*shared, f"notebooks/{name}.py", f"notebooks/params/{name}.yaml"]


def test_every_input_file_is_an_input_of_some_notebook():
    tracked = set(git("ls-files", "--", *INPUT_PATHS).stdout.split())
    covered = set(git("ls-files", "--", *{p for n in runner.notebooks() for p in inputs_of(n)}).stdout.split())
    assert tracked and tracked == covered, f"inputs no notebook's provenance check sees: {sorted(tracked - covered)}"
    assert "notebooks/01_fedgo_weighting.py" not in inputs_of("05_pipeline") and "fedlib" in inputs_of("05_pipeline")


@pytest.mark.parametrize("path", COMMITTED)
def test_committed_results_come_from_a_clean_tree_with_no_later_input_change(path):
    doc = json.loads((REPO / path).read_text())
    assert validate_metrics(doc) == [], f"{path} does not follow the schema"
    prov = doc["provenance"]
    assert prov["git_dirty"] is False, f"{path} was made from a dirty tree ({prov.get('dirty_paths')}); regenerate it"
    commit = prov["git_commit"]
    assert git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0, f"{path}: commit {commit} is not in history"
    later = git("log", "--format=%h %s", f"{commit}..HEAD", "--", *inputs_of(Path(path).parent.name)).stdout.strip()
    assert not later, f"{path} was made at {commit[:9]}, but later commits change its inputs:\n{later}\n" \
                      "regenerate the committed results (make notebooks) from a clean tree"


def _readme_blocks():
    text = (REPO / "README.md").read_text()
    scales = sorted({Path(p).parts[1] for p in COMMITTED})
    out = []
    for scale in scales:
        start, end = runner.readme_block(scale)
        if start in text:
            out.append((scale, text.split(start, 1)[1].split(end, 1)[0].strip()))
    return out


def test_the_readme_claims_are_what_report_prints():
    blocks = _readme_blocks()
    assert any(scale == "quick" for scale, _ in blocks), "README.md has no quick claims block"
    for scale, block in blocks:
        assert block == runner.report(scale).strip(), \
            f"README's {scale} claims differ from `python -m fedlib report --scale {scale}`; run it with --readme"


@pytest.mark.parametrize("name", list(runner.notebooks()))
def test_committed_notebooks_show_the_committed_claims(name):
    """The claims table a committed notebook displays is the one in its committed metrics.json."""
    path = REPO / "results" / "quick" / name / "metrics.json"
    if f"results/quick/{name}/metrics.json" not in COMMITTED:
        pytest.fail(f"no committed results for {name}")
    doc = json.loads(path.read_text())
    expect = claims_markdown([{"notebook": name, "ok": True, "error": None, "claims": doc["claims"]}], notes=True)
    nb = nbformat.read(runner.notebooks()[name], as_version=4)
    shown = [o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
    assert expect in shown, f"{name}.ipynb does not show the claims of its committed metrics.json"


def test_the_readme_times_are_what_the_reproduce_benchmark_measured():
    """The README's "Two commands" times come from benchmarks/results/reproduce_time-cpu.json (written by
    benchmarks/reproduce_time.py), never typed."""
    import runpy

    bench = runpy.run_path(str(REPO / "benchmarks" / "reproduce_time.py"))
    start, end = bench["README_BLOCK"]
    text = (REPO / "README.md").read_text()
    assert start in text and end in text, "README.md has no times block"
    block = text.split(start, 1)[1].split(end, 1)[0].strip()
    result = Path(bench["RESULT"])
    if not result.exists():
        assert block == "", "times in the README without the benchmark file behind them"
        return
    doc = json.loads(result.read_text())
    assert block == bench["render"](doc).strip(), "run `python benchmarks/reproduce_time.py --readme`"
    assert doc["cores"] >= 1 and all(r["wall_time_s"] > 0 for r in doc["runs"].values())
