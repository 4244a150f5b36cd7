"""The papermill runner: `python -m fedlib list | reproduce | report` and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fedlib import runner
from fedlib.results import SCHEMA, Run, validate_metrics

REPO = Path(__file__).resolve().parent.parent


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fedlib", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_list_shows_every_notebook_with_parameters_types_defaults_help():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    for name in runner.notebooks():
        assert name in out.stdout
    assert "n_clients: int = 10" in out.stdout and "# K, the number of clients" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["reproduce", "99_nope"], "valid names: 00_data_and_partitions"),
    (["reproduce", "00", "-p", "no_such=1"], "has no parameter 'no_such'"),
    (["reproduce", "00", "-p", "n_clients=ten"], "parameter n_clients='ten' has type str but must be int"),
    (["reproduce", "00", "-p", "seed=0.5"], "must be int"),
    (["reproduce", "00", "-p", "alphas=['a']"], "must be list"),
    (["reproduce", "00", "-p", "novalue"], "must look like KEY=VALUE"),
    (["reproduce", "00", "--scale", "huge"], "unknown scale 'huge'; allowed: fashion_mnist, paper, quick, smoke"),
    (["reproduce", "00", "--device", "tpu"], "unknown device 'tpu'; allowed: auto, cpu, cuda"),
])
def test_bad_input_is_refused_before_anything_runs(args, message, tmp_path, capsys):
    # in-process (main() is what `python -m fedlib` calls); the subprocess path is tested below
    assert runner.main([*args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may run when the input is refused"


def test_refusal_through_the_command_line(tmp_path):
    out = cli("reproduce", "99_nope", "--out", str(tmp_path))
    assert out.returncode == 2 and "valid names: 00_data_and_partitions" in out.stderr


def test_parse_and_coerce_values():
    specs = runner.parameters(runner.notebooks()["00_data_and_partitions"])
    assert runner.coerce("alphas", runner.parse_value("0.5"), specs["alphas"], "nb") == [0.5]
    assert runner.coerce("alphas", runner.parse_value("[1, 2]"), specs["alphas"], "nb") == [1.0, 2.0]
    assert runner.coerce("show_fashion_mnist", runner.parse_value("false"), specs["show_fashion_mnist"], "nb") is False
    with pytest.raises(runner.UsageError):
        runner.coerce("seed", runner.parse_value("true"), specs["seed"], "nb")


def test_every_parameter_set_names_only_real_parameters():
    for name, path in runner.notebooks().items():
        specs = runner.parameters(path)
        for scale, values in runner.parameter_sets(name).items():
            unknown = set(values) - set(specs)
            assert not unknown, f"{name}.yaml set {scale!r} names unknown parameters {unknown}"
            for key, value in values.items():
                runner.coerce(key, value, specs[key], name)  # raises on a wrong type
        assert "smoke" in runner.parameter_sets(name), f"{name} needs a smoke set for the tests"


def test_reproduce_smoke_of_notebook_00_writes_notebook_metrics_and_figures(tmp_path):
    out = cli("reproduce", "00_data_and_partitions", "--scale", "smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "smoke" / "00_data_and_partitions"
    assert (run_dir / "00_data_and_partitions.ipynb").exists()
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert validate_metrics(doc) == [] and doc["scale"] == "smoke"
    assert doc["params"]["toy_points"] == 300  # the smoke set was applied
    assert doc["provenance"]["wall_time_s"] > 0 and doc["provenance"]["packages"]["torch"]
    assert len(list((run_dir / "figures").glob("*.png"))) >= 4
    assert "| 00_data_and_partitions |" in out.stdout  # the claims table at the end


def _tiny_notebook(path: Path, body: str, name: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1  # a number")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path / f"{name}.ipynb")


def test_a_failing_notebook_keeps_partial_output_and_others_results(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    good = ("from fedlib.results import Run\nr = Run('10_good', params={'x': x})\n"
            "r.claim('x is positive', 'x > 0', str(x), x > 0, required=True)\nr.finish()")
    _tiny_notebook(nbdir, "print('started')\nraise RuntimeError('boom')", "10_bad")
    _tiny_notebook(nbdir, good, "11_good")
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", nbdir)
    code = runner.reproduce([], "quick", ["x=3"], out_root=tmp_path / "results")
    assert code == 1
    summary = json.loads((tmp_path / "results" / "quick" / "summary.json").read_text())
    bad, ok = summary
    assert not bad["ok"] and "boom" in bad["error"]
    partial = nbformat.read(tmp_path / "results" / "quick" / "10_bad" / "10_bad.ipynb", as_version=4)
    assert any("started" in str(o) for c in partial.cells for o in c.get("outputs", []))
    assert ok["ok"] and ok["claims"][0]["holds"] is True
    # a required claim that fails makes the exit status non-zero on its own
    (nbdir / "10_bad.ipynb").unlink()
    assert runner.reproduce([], "quick", ["x=-1"], out_root=tmp_path / "r2") == 1
    assert runner.reproduce([], "quick", ["x=2"], out_root=tmp_path / "r3") == 0


def test_metrics_schema_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_RUN_DIR", str(tmp_path / "quick" / "07_x"))
    run = Run("07_x", params={"seed": 3})
    run.metrics["acc"] = float("nan")
    run.claim("c", "1", "2", None, note="not testable here")
    doc = json.loads(run.finish().read_text())
    assert doc["schema"] == SCHEMA and doc["seed"] == 3 and doc["metrics"]["acc"] is None
    assert validate_metrics(doc) == []
    assert "| 07_x | c | 1 | 2 | n/a |" in runner.report("quick", out_root=tmp_path)
    assert validate_metrics({"schema": "x"})  # problems are reported
