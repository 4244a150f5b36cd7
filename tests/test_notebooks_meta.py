"""Every committed notebook follows the project's conventions (docs/DEVELOPING.md)."""

import re

import jupytext
import nbformat
import pytest

from fedlib import runner

NOTEBOOKS = runner.notebooks()


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_conventions(name):
    path = NOTEBOOKS[name]
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    for line in params[0].source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.search(r"#\s*\S", line), f"parameter line without a help comment: {line!r}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "committed with the outputs of the default run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert "run.finish(" in "".join(c.source for c in code), "writes metrics.json"
    assert "savefig(" in "".join(c.source for c in code), "every result has a figure"
    assert nb.cells[0].cell_type == "markdown", "opens with the paper's claim"
    assert "papermill" not in nb.metadata, "volatile metadata stripped"


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_paired_source_is_in_sync(name):
    source = NOTEBOOKS[name].with_suffix(".py")
    assert source.exists(), f"{source.name}: the jupytext source must be committed beside the notebook"
    from_py = jupytext.read(source)
    from_nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    strip = lambda cells: [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", [])))  # noqa: E731
                           for c in cells]
    assert strip(from_py.cells) == strip(from_nb.cells), \
        "the .ipynb is not the .py's inputs and tags: run `make notebook NB=...` (it converts the .py afresh)"


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_parameters_are_read_as_papermill_reads_them(name):
    # fedlib reads the tagged cell itself (papermill's import costs every kernel seconds); the runner
    # injects values through papermill, so both readers must see the same names, defaults and help
    import papermill

    from fedlib import params

    theirs = papermill.inspect_notebook(str(NOTEBOOKS[name]))
    ours = params._inspect_parameters_cell(NOTEBOOKS[name])
    assert list(ours) == list(theirs)
    for pname, p in theirs.items():
        assert ours[pname]["default"] == p["default"], pname
        assert ours[pname]["help"] == (p["help"] or "").strip(), pname
        assert ours[pname]["inferred_type_name"] == p["inferred_type_name"], pname


@pytest.mark.parametrize("scale", ["smoke", "quick", "long"])
def test_notebook_04_loads_the_teachers_notebook_03_trained(scale):
    # the teachers are cached by (dataset, steps, seed, config): 04 trains none of its own only when its
    # step counts equal 03's at every CPU scale (the runner and nbval start 03 first, the longer one)
    from fedlib import params

    def resolved(name):
        spec = params.parameters(NOTEBOOKS[name])
        sets = params.parameter_sets(name, NOTEBOOKS[name].parent)
        values = {k: v["default"] for k, v in spec.items()}
        values.update(sets.get(scale, {}))
        return values

    ld3, dmd2 = resolved("03_ld3_learned_timesteps"), resolved("04_dmd2_one_step")
    for key in ("teacher_steps", "toy_teacher_steps", "teacher_seed"):
        assert dmd2[key] == ld3[key], f"{scale}: {key} is {dmd2[key]} in 04 and {ld3[key]} in 03"
    assert {dmd2["dataset"], dmd2["toy"]} <= set(ld3["datasets"]), "03 trains both of 04's teachers"
