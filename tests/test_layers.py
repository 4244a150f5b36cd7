"""fedlib is a house in layers (docs/DEVELOPING.md): a module imports only from its own layer or the
layers below, and no set of modules imports itself round in a circle. Checked on the source's
``ast``, so that imports inside function bodies count as much as those at the top of a file: a lazy
import hides a circle from Python's import machinery, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedlib"

# Lowest first. The same number: the modules may import one another (circles are still refused).
LAYERS = {
    # ground: no fedlib imports but these
    "fedlib.utils": 0, "fedlib.verdicts": 0, "fedlib._digits_split": 0,
    # basics: data, models, the federated primitives, the weighting rules, diffusion's building blocks
    "fedlib.data": 1, "fedlib.models": 1, "fedlib.metrics": 1, "fedlib.compression": 1, "fedlib.federated": 1,
    "fedlib.weighting": 1,
    "fedlib.diffusion": 1, "fedlib.diffusion.process": 1, "fedlib.diffusion.schedules": 1,
    "fedlib.diffusion.samplers": 1, "fedlib.diffusion.networks": 1, "fedlib.diffusion.denoiser": 1,
    "fedlib.diffusion.interop": 1, "fedlib.diffusion.train": 1,
    # the method registry and the distillation maths every method uses
    "fedlib.methods": 2,
    # per paper: the methods, the in-process rounds engine, the diffusion papers
    "fedlib.fedgo": 3, "fedlib.datafree": 3, "fedlib.rounds": 3, "fedlib.feddm": 3, "fedlib.ld3": 3,
    "fedlib.dmd2": 3, "fedlib.dmd2.losses": 3, "fedlib.dmd2.training": 3, "fedlib.dmd2.evaluate": 3,
    "fedlib.condense": 3, "fedlib.fedlgd": 3,
    "fedlib.fedka": 3,
    "fedlib.lpn": 3,
    "fedlib.distill": 4,  # the notebooks' name for methods + rounds
    # the Flower backend, then the choice of backend above both
    "fedlib.flower": 5, "fedlib.flower.records": 5, "fedlib.flower.client": 5, "fedlib.flower.strategy": 5,
    "fedlib.flower.simulation": 5,
    "fedlib.backends": 6,
    # analysis shared by notebooks
    "fedlib.studies": 7, "fedlib.pipeline": 7,
    # figures: the style, then one module per notebook's paper
    "fedlib.plots": 7, "fedlib.plots.style": 7, "fedlib.plots.data": 7, "fedlib.plots.fedgo": 7,
    "fedlib.plots.feddm": 7, "fedlib.plots.ld3": 7, "fedlib.plots.dmd2": 7, "fedlib.plots.pipeline": 7,
    "fedlib.plots.condense": 7,
    "fedlib.plots.fedka": 7,
    "fedlib.plots.lpn": 7,
    # notebook machinery
    "fedlib.params": 8, "fedlib.results": 9, "fedlib.runner": 10, "fedlib.__main__": 11,
    # the package itself: importing fedlib registers every plug-in
    "fedlib": 11,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, known: set) -> list[tuple[str, int]]:
    """(module, line) of every import of a module of the package in ``path``, wherever it stands.
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``. The
    package a module sits in is not counted: Python runs its __init__ first, but the module's code does
    not depend on it."""
    name = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    top = root.name
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != top:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in known else target, node.lineno))
    return out


def import_graph(root: Path) -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, "file:line")]."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): list(dict.fromkeys((m, f"{f.relative_to(root.parent)}:{line}")
                                                     for m, line in imports_of(f, root, known)
                                                     if m != module_name(f, root)))
            for f in files}


def upward_imports(graph: dict, layers: dict) -> list[str]:
    bad = []
    for mod, edges in graph.items():
        for dep, where in edges:
            if layers[dep] > layers[mod]:
                bad.append(f"{where}: {mod} (layer {layers[mod]}) imports {dep} (layer {layers[dep]})")
    return bad


def circles(graph: dict) -> list[str]:
    """One line per circle found by a depth-first search, each import of it named by file:line."""
    found, state, stack = [], {}, []

    def visit(mod):
        state[mod] = "open"
        for dep, where in graph.get(mod, ()):
            stack.append((mod, dep, where))
            if state.get(dep) == "open":
                start = next(i for i, (m, _, _) in enumerate(stack) if m == dep)
                found.append(" -> ".join(f"{m} ({w}: imports {d})" for m, d, w in stack[start:]))
            elif dep not in state:
                visit(dep)
            stack.pop()
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


def test_every_module_has_a_layer(graph):
    missing = sorted(set(graph) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py (and docs/DEVELOPING.md): {missing}"
    gone = sorted(set(LAYERS) - set(graph))
    assert not gone, f"layers declared for modules that do not exist: {gone}"


def test_no_module_imports_a_higher_layer(graph):
    bad = upward_imports(graph, LAYERS)
    assert not bad, "imports upwards (move the code down or register it from above):\n" + "\n".join(bad)


def test_no_import_circle(graph):
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_checker_finds_a_synthetic_circle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n\n\ndef late():\n    from .high import thing\n    return thing\n")
    (pkg / "high.py").write_text("from toy import low\nthing = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from .. import low\nfrom ..high import thing\n")
    g = import_graph(pkg)
    assert ("toy.high", "toy/low.py:5") in g["toy.low"]  # a function-level relative import counts
    assert ("toy.low", "toy/high.py:1") in g["toy.high"]  # an absolute one too
    assert {d for d, _ in g["toy.sub.leaf"]} == {"toy.low", "toy.high"}  # two dots reach the package
    found = circles(g)
    assert len(found) == 1 and "toy/low.py:5" in found[0] and "toy/high.py:1" in found[0]
    layers = {"toy": 0, "toy.low": 0, "toy.high": 1, "toy.sub": 2, "toy.sub.leaf": 2}
    assert upward_imports(g, layers) == ["toy/low.py:5: toy.low (layer 0) imports toy.high (layer 1)"]
    assert not circles({m: [e for e in edges if e[0] != "toy.high"] for m, edges in g.items()})


def test_params_names_ld3s_solvers_without_importing_ld3():
    from fedlib import ld3, params

    assert params.ld3_solver_names() == tuple(ld3.LD3_SOLVERS)


def test_the_core_points_a_backend_choice_to_the_layer_that_makes_it():
    from fedlib import backends, distill, feddm

    with pytest.raises(ValueError, match="fedlib.backends.run_rounds"):
        distill.run_rounds(None, [], ["fedavg"], rounds=1, backend="flower")
    with pytest.raises(ValueError, match="fedlib.backends.run_feddm"):
        feddm.run_feddm(None, [], rounds=1, local_steps=1, batch_size=1, lr=0.1, backend="inprocess")
    with pytest.raises(ValueError, match="inprocess"):
        backends.run_rounds(None, [], ["fedavg"], rounds=1, backend="ray")
