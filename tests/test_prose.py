"""No measured number typed into a notebook's prose.

A wall time or a measured value written into a markdown cell or a params comment goes stale the next
time the notebook runs (notebook 01's "about 4 min" against a 658 s run, notebook 04's "late FD 1.03"
against a long run's 1.06). Numbers a run measures are printed by the run; the prose may quote only the
notebook's own parameter values and the papers' reported values (papers.md, labelled as the paper's).
Integers are not checked (counts, sizes and seeds are set, not measured); decimals and times are.
"""

import ast
import math
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("0*.py"))
# CI lays the shared folder out beside the repository; FEDLIB_PAPERS points elsewhere (a git worktree)
PAPERS = Path(os.environ.get("FEDLIB_PAPERS", REPO.parent / "shared" / "papers.md"))

_WORDS = ("one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|"
          "sixty|a few|a couple of|several|half an?|a quarter of an?")
_DIGITS = r"\d+(?:[.,]\d+)?"
# a number (or a range of them), an optional resource word, a unit of time: "about 4 min", "532 s",
# "four CPU minutes", "3 CPU-minutes", "5-10 GPU minutes", "half an hour"
# (a word needs a space before its unit, "ones" is no time; a number glued to a name is no time, "ResNet-18s")
WALL_TIME = re.compile(rf"(?<![-\w])(?P<n>{_DIGITS}(?:\s*(?:-|–|to)\s*{_DIGITS})?[\s-]*|\b(?:{_WORDS})[\s-]+)"
                       r"(?:(?:CPU|GPU|wall)[\s-]*)?"
                       r"(?:s|secs?|seconds?|min|mins|minutes?|h|hrs?|hours?)\b", re.IGNORECASE)
# decimals and scientific notation; not a section number (§1.2) or a part of a name or version (v2.1, a.b)
DECIMAL = re.compile(r"(?<![\w.§])(\d*\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+)(?![\w.]*\d)", re.IGNORECASE)
ISSUE = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)


def wall_times(text, allowed=frozenset()):
    """Time phrases in ``text`` whose numbers are not one of the ``allowed`` (papers') phrases."""
    return [m.group(0) for m in WALL_TIME.finditer(text) if _numbers_of(m.group("n")) not in allowed]


def _numbers_of(phrase):
    return tuple(re.findall(r"\d+(?:\.\d+)?|[a-z]+(?: [a-z]+)*", phrase.lower().replace("to", " ")))


def decimals(text, allowed=()):
    """Decimal numbers in ``text`` that equal none of ``allowed`` (by value: 0.10 is 0.1)."""
    out = []
    for m in DECIMAL.finditer(text):
        value = float(m.group(1))
        if not any(math.isclose(value, a, rel_tol=1e-9) for a in allowed):
            out.append(m.group(1))
    return out


def markdown_cells(path):
    """The markdown cells of a jupytext percent source, as (first line number, text without '# ')."""
    cells, current = [], None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("# %%"):
            current = [i + 1, []] if "[markdown]" in line else None
            if current:
                cells.append(current)
        elif current is not None:
            current[1].append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    return [(i, "\n".join(lines)) for i, lines in cells]


def yaml_comments(path):
    """The comments of a params yaml, as (line number, text)."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r"(?:^|\s)#(.*)$", line)
        if m:
            out.append((i, m.group(1)))
    return out


def _numbers_in(value):
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [abs(float(value))]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers_in(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers_in(v)]
    return []


def parameter_values(notebook):
    """Every number the notebook's parameters take: the tagged cell's defaults and every yaml set."""
    head = re.search(r'^# %% tags=\[[^\]]*"parameters"[^\]]*\]\n', notebook.read_text(), re.MULTILINE)
    assert head, f"{notebook.name}: no cell tagged 'parameters'"
    cell = notebook.read_text()[head.end():].split("\n# %%", 1)[0]
    values = []
    for node in ast.parse(cell).body:
        if isinstance(node, ast.Assign):
            try:
                values += _numbers_in(ast.literal_eval(node.value))
            except ValueError:
                pass
    sets = REPO / "notebooks" / "params" / f"{notebook.stem}.yaml"
    if sets.exists():
        values += _numbers_in(yaml.safe_load(sets.read_text()))
    return frozenset(values)


def paper_values():
    """The papers' numbers (papers.md beside the repository, as CI lays it out), or None where it is absent."""
    if not PAPERS.exists():
        return None
    text = PAPERS.read_text()
    return (frozenset(abs(float(x)) for x in re.findall(r"\d*\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+|\d+", text, re.I)),
            frozenset(_numbers_of(m.group("n")) for m in WALL_TIME.finditer(text)))


def _prose(notebook):
    yield from ((f"{notebook.name}:{i} (markdown)", t) for i, t in markdown_cells(notebook))
    sets = REPO / "notebooks" / "params" / f"{notebook.stem}.yaml"
    if sets.exists():
        yield from ((f"{sets.name}:{i} (comment)", t) for i, t in yaml_comments(sets))


# ---- the detector itself, on the sentences that went stale -------------------------------------------

@pytest.mark.parametrize("sentence", [
    "alpha 0.05 / 0.1, 3 seeds, 5 rounds; about 4 min on a 2-core CPU from a cold cache",  # params 01
    "the whole notebook takes about four CPU minutes",  # notebook 03
    "the committed run took 658 s",
    "532 s on the CPU",
    "one seed took about 8 minutes on an H100",
    "the long set (<= 25 min on a 2-core CPU)", "it took 532s",
    "about 17 CPU-minutes",
    "budget about half an hour",
    "after 5–10 GPU minutes",
])
def test_the_detector_finds_wall_times(sentence):
    assert wall_times(sentence), sentence


@pytest.mark.parametrize("sentence", [
    "3 seeds, 5 rounds", "a 2-core CPU", "5 local epochs", "the seeds' spread", "8x8 digits", "10 samples",
    "E_d searched over 5 / 10 / 20", "a 3-layer MLP", "16 rounds of 40 client steps", "§ 7",
    "the paper's ResNet-18s", "the ones that remain", "on 2 cores",
])
def test_the_detector_leaves_counts_alone(sentence):
    assert wall_times(sentence) == [] and decimals(sentence) == []


def test_the_detector_finds_measured_decimals_but_not_parameters_papers_or_sections():
    digits = "in the long set it flattens near 1.4–1.7 (late average FD 1.03 against the teacher's 0.69)"
    assert decimals(digits) == ["1.4", "1.7", "1.03", "0.69"]  # notebook 04, section 8
    assert decimals("validation FD 2.53 vanilla; the gap is −0.04 ± 0.11 (SE)") == ["2.53", "0.04", "0.11"]
    assert decimals("FedProx μ = 0.01, lr 5e-4, Dirichlet(0.05 / 0.1)", allowed={0.01, 5e-4, 0.05, 0.1}) == []
    assert decimals("FID up to 1.75× worse; docs/methods.md §1.2 and §4; v2.1", allowed={1.75}) == []
    assert wall_times("after 5–10 GPU minutes", allowed={("5", "10")}) == []


def test_the_detector_finds_issue_numbers():
    assert ISSUE.search("beats EDM's log-normal times (issue 18)") and not ISSUE.search("an issue of scale")


# ---- the notebooks ------------------------------------------------------------------------------------

def test_the_notebooks_and_their_parameters_are_found():
    assert len(NOTEBOOKS) >= 6 and all(markdown_cells(nb) for nb in NOTEBOOKS)
    # notebook 04's defaults (AdamW lr 5e-4, DMD1 regression weight 0.25) and a long-set value (GAN ratio 1e-4)
    assert {5e-4, 0.25, 1e-4} <= parameter_values(REPO / "notebooks" / "04_dmd2_one_step.py")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_wall_time_in_prose(notebook):
    papers = paper_values()
    found = [(where, t) for where, text in _prose(notebook) for t in wall_times(text, papers[1] if papers else ())]
    if found and papers is None:
        pytest.skip(f"{PAPERS} is absent: the papers' times cannot be told from measured ones in {found}")
    assert found == [], f"wall times typed into prose go stale: let the run print them, or drop them: {found}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_issue_number_in_prose(notebook):
    found = [(where, m.group(0)) for where, text in _prose(notebook) for m in ISSUE.finditer(text)]
    assert found == [], f"prose names the project's findings, not the issues that asked for them: {found}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_measured_decimal_in_prose(notebook):
    papers = paper_values()
    if papers is None:
        pytest.skip(f"{PAPERS} is absent: the papers' values cannot be told from measured ones")
    allowed = parameter_values(notebook) | papers[0]
    found = [(where, d) for where, text in _prose(notebook) for d in decimals(text, allowed)]
    assert found == [], ("decimals that are neither a parameter value nor a value of papers.md: a measured "
                         "number goes stale, so print it from the run (IPython.display.Markdown) or drop it: "
                         f"{found}")


def test_no_claim_name_cites_an_issue():
    for notebook in NOTEBOOKS:
        for name in re.findall(r"run\.claim\(\s*(?:f?\"([^\"]*)\"|f?'([^']*)')", notebook.read_text()):
            assert not ISSUE.search("".join(name)), f"{notebook.name}: claim {name!r} cites an issue; name the finding"
