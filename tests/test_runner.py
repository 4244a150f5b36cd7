"""The papermill runner: `python -m fedlib list | reproduce | report`, its refusals, and the faults it
survives (a second run into the same folder, Ctrl-C, a full disk, missing results)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from fedlib import params as P
from fedlib import runner
from fedlib.results import SCHEMA, Run, validate_metrics

REPO = Path(__file__).resolve().parent.parent
NO_GPU = not P.cuda_available()


def cli(*args, cwd=REPO, env=None):
    """``python -m fedlib <args>`` under a hard outer limit: a run that hangs fails the test. The runner
    recovers from a lost kernel request itself (a test below injects one); no test retries."""
    return subprocess.run([sys.executable, "-m", "fedlib", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_list_shows_every_notebook_with_parameters_types_defaults_help_and_rules():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    for name in runner.notebooks():
        assert name in out.stdout
    assert "n_clients: int = 10" in out.stdout and "# K, the number of clients" in out.stdout
    assert "[allowed: min 1; max train_size(\"digits\") // 4]" in out.stdout


BAD_INPUT = [
    (["reproduce", "99_nope"], "valid names: 00_data_and_partitions"),
    (["reproduce", "00", "-p", "no_such=1"], "has no parameter 'no_such'"),
    (["reproduce", "00", "-p", "n_clients=ten"], "parameter n_clients='ten' has type str but must be int"),
    (["reproduce", "00", "-p", "seed=0.5"], "must be int"),
    (["reproduce", "00", "-p", "alphas=['a']"], "must be list"),
    (["reproduce", "00", "-p", "novalue"], "must look like KEY=VALUE"),
    (["reproduce", "00", "--scale", "huge"], "unknown scale 'huge'; allowed: fashion_mnist, paper, paper_smoke, quick, smoke"),
    (["reproduce", "00", "--device", "tpu"], "unknown device 'tpu'; allowed: auto, cpu, cuda"),
    # the declared rules: value, what is allowed, an example, in one line
    (["reproduce", "03", "--scale", "smoke", "-p", "shrink_datasets=['grid']"],
     "shrink_datasets=['grid'] is not allowed (['grid'] are not in datasets=['digits', 'ring']); allowed: [distinct; "
     "subset of datasets]; e.g."),
    (["reproduce", "02", "-p", "rounds=0"], "rounds=0 is not allowed (it is not at least 1)"),
    (["reproduce", "01", "-p", "seeds=[]"], "seeds=[] is not allowed (it is empty)"),
    (["reproduce", "00", "-p", "alphas=[]"], "alphas=[] is not allowed (it is empty)"),
    (["reproduce", "00", "-p", "n_clients=0"], "n_clients=0 is not allowed (it is not at least 1)"),
    (["reproduce", "01", "-p", "alphas=[-1]"], "alphas=[-1.0] is not allowed (-1.0 is not greater than 0)"),
    (["reproduce", "02", "-p", "alpha=-1"], "alpha=-1.0 is not allowed (it is not greater than 0)"),
    (["reproduce", "02", "-p", "bits=[3]"], "bits=[3] is not allowed (3 is not one of 2, 4, 8, 16, 32)"),
    (["reproduce", "03", "-p", "ld3_nfes=[0]"], "ld3_nfes=[0] is not allowed (0 is not at least 2)"),
    (["reproduce", "01", "-p", "client_counts=[10, 1000]"], "client_counts=[10, 1000] is not allowed (1000 is not at most 179"),
    (["reproduce", "02", "-p", "n_evals=99"], "n_evals=99 is not allowed (it is not at most 15 (rounds = 15))"),
    (["reproduce", "01", "-p", "methods=['nope']"], "'nope' is not one of fedavg, fedprox"),
    (["reproduce", "04", "-p", "samplers=['heun']"], "'heun' is not one of euler"),
    (["reproduce", "00", "--threads", "0"], "--threads 0: allowed: an integer >= 1"),
]
if NO_GPU:
    BAD_INPUT += [(["reproduce", "01", "--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
                  (["reproduce", "02", "-p", "device=cuda"], "device='cuda' is not available: this machine has no CUDA GPU")]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_refused_before_anything_runs(args, message, tmp_path, capsys):
    # in-process (main() is what `python -m fedlib` calls); the subprocess path is tested below
    assert runner.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert all(line.startswith("error: ") for line in err.strip().splitlines()), "one line per problem, no traceback"
    assert not any(tmp_path.iterdir()), "nothing may run when the input is refused"


def test_an_extra_set_without_names_selects_the_notebooks_that_have_it():
    plan = runner.build_plan([], "fashion_mnist", [], None)
    assert [n for n, _ in plan] == [n for n in runner.notebooks() if "fashion_mnist" in runner.parameter_sets(n)]
    with pytest.raises(runner.UsageError, match="no notebook has a parameter set 'nosuch'"):
        runner.build_plan([], "nosuch", [], None)


def test_all_problems_are_reported_at_once(capsys):
    assert runner.main(["reproduce", "01", "-p", "alphas=[]", "-p", "seeds=[]", "-p", "rounds=0"]) == 2
    err = capsys.readouterr().err
    assert "alphas=[]" in err and "seeds=[]" in err and "rounds=0" in err


@pytest.mark.parametrize("out", ["/proc/fedlib-results", "FILE", "/sys/fedlib-results"])
def test_unwritable_out_is_one_clear_line(out, tmp_path, capsys):
    if out == "FILE":
        out = tmp_path / "a-file"
        out.write_text("x")
    assert runner.main(["reproduce", "00", "--scale", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}: cannot write results into") and "allowed: a writable folder" in err
    assert len(err.splitlines()) == 1


def test_refusal_through_the_command_line(tmp_path):
    out = cli("reproduce", "99_nope", "--out", str(tmp_path))
    assert out.returncode == 2 and "valid names: 00_data_and_partitions" in out.stderr
    assert "Traceback" not in out.stderr


def test_parse_and_coerce_values():
    specs = runner.parameters(runner.notebooks()["00_data_and_partitions"])
    assert runner.coerce("alphas", runner.parse_value("0.5"), specs["alphas"], "nb") == [0.5]
    assert runner.coerce("alphas", runner.parse_value("[1, 2]"), specs["alphas"], "nb") == [1.0, 2.0]
    assert runner.coerce("show_fashion_mnist", runner.parse_value("false"), specs["show_fashion_mnist"], "nb") is False
    with pytest.raises(runner.UsageError):
        runner.coerce("seed", runner.parse_value("true"), specs["seed"], "nb")


def test_every_parameter_set_names_only_real_parameters_and_keeps_the_rules():
    for name, path in runner.notebooks().items():
        specs = runner.parameters(path)  # raises if a rule does not parse
        for scale, values in runner.parameter_sets(name).items():
            unknown = set(values) - set(specs)
            assert not unknown, f"{name}.yaml set {scale!r} names unknown parameters {unknown}"
            chosen = {k: runner.coerce(k, v, specs[k], name) for k, v in values.items()}  # raises on a wrong type
            broken = [line for line in P.check(name, chosen, specs) if "no CUDA GPU" not in line]
            assert not broken, f"{name} set {scale!r} breaks its own rules: {broken}"
        assert "smoke" in runner.parameter_sets(name), f"{name} needs a smoke set for the tests"


@pytest.mark.parametrize("text, value, ok", [
    ("min 1", 1, True), ("min 1", 0, False), ("> 0", 0.0, False), ("< 1", 0.5, True),
    ("each min 2", [2, 3], True), ("each min 2", [1, 3], False), ("non-empty", [], False),
    ("distinct", [1, 1], False), ("one of a, b", "c", False), ("each one of 2, 4", [4], True),
    ("max rounds // 2", 3, False), ("in sampler_names()", "euler", True), ("in sampler_names()", "x", False),
])
def test_rules(text, value, ok):
    specs = {"x": {"default": value, "rules": text, "checks": P.parse_rules(text)},
             "rounds": {"default": 5, "rules": "", "checks": ()}}
    assert (P.check("nb", {"x": value}, specs) == []) is ok


@pytest.mark.parametrize("text", ["at least 1", "min", "> import os", "max __import__('os')", "each in open('x')"])
def test_unreadable_or_unsafe_rules_are_refused(text):
    with pytest.raises(P.UsageError):
        P.parse_rules(text)


def test_reproduce_smoke_of_notebook_00_writes_notebook_metrics_and_figures(tmp_path):
    out = cli("reproduce", "00_data_and_partitions", "--scale", "smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "smoke" / "00_data_and_partitions"
    assert (run_dir / "00_data_and_partitions.ipynb").exists()
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert validate_metrics(doc) == [] and doc["scale"] == "smoke"
    assert doc["params"]["toy_points"] == 300  # the smoke set was applied
    assert doc["provenance"]["wall_time_s"] > 0 and doc["provenance"]["packages"]["torch"]
    assert doc["provenance"]["threads"] == 1, "kernels run with the runner's --threads"
    assert len(list((run_dir / "figures").glob("*.png"))) >= 4
    assert "| 00_data_and_partitions |" in out.stdout  # the claims table at the end


def _tiny_notebook(path: Path, body: str, name: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1  # a number [min -5]")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path / f"{name}.ipynb")


GOOD = ("from fedlib.results import Run\nr = Run('{name}', params={{'x': x}})\n"
        "r.claim('x is positive', 'x > 0', str(x), x > 0, required=True)\nr.finish()")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", nbdir)
    return nbdir


def test_a_failing_notebook_keeps_partial_output_and_others_results(tiny, tmp_path):
    _tiny_notebook(tiny, "print('started')\nraise RuntimeError('boom')", "10_bad")
    _tiny_notebook(tiny, GOOD.format(name="11_good"), "11_good")
    code = runner.reproduce([], "quick", ["x=3"], out_root=tmp_path / "results")
    assert code == 1
    summary = json.loads((tmp_path / "results" / "quick" / "summary.json").read_text())
    bad, ok = summary
    assert not bad["ok"] and "boom" in bad["error"]
    partial = nbformat.read(tmp_path / "results" / "quick" / "10_bad" / "10_bad.ipynb", as_version=4)
    assert any("started" in str(o) for c in partial.cells for o in c.get("outputs", []))
    assert ok["ok"] and ok["claims"][0]["verdict"] == "holds" and ok["claims"][0]["holds"] is True
    # a required claim that fails makes the exit status non-zero on its own
    (tiny / "10_bad.ipynb").unlink()
    assert runner.reproduce([], "quick", ["x=-1"], out_root=tmp_path / "r2") == 1
    assert runner.reproduce([], "quick", ["x=2"], out_root=tmp_path / "r3") == 0
    # the declared rule of the tiny notebook is enforced too
    with pytest.raises(runner.UsageError, match=r"x=-9 is not allowed \(it is not at least -5\)"):
        runner.build_plan([], "quick", ["x=-9"], None)


def test_a_second_run_into_the_same_results_folder_is_refused(tiny, tmp_path, capsys):
    _tiny_notebook(tiny, GOOD.format(name="11_good"), "11_good")
    out = tmp_path / "results"
    runner.check_out_dir(out, "quick")
    with runner.results_lock(out / "quick"):  # as if another run were using it
        assert runner.main(["reproduce", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is in use by another run (pid" in err and "choose another --out" in err
    assert not (out / "quick" / "11_good").exists(), "the other run's outputs were not touched"
    assert runner.main(["reproduce", "--out", str(out)]) == 0, "the lock is released with its holder"


def _sigint_as_in_a_terminal():
    """The runner's Ctrl-C as a terminal delivers it. A test run started in the background by a shell
    without job control (`make test &`, `(bash .ci/run &)`) inherits SIGINT *ignored*, and Python then
    leaves it ignored (no KeyboardInterrupt): the runner rightly sat through the signal and this test
    timed out in two such runs. A terminal's foreground job has SIGINT at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_with_one_line_and_the_summary_of_what_finished(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _tiny_notebook(nbdir, GOOD.format(name="10_fast"), "10_fast")
    _tiny_notebook(nbdir, "import time\nopen('started', 'w').close()\ntime.sleep(120)", "11_slow")
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "fedlib", "reproduce", "--jobs", "1", "--out", str(out)], cwd=nbdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEDLIB_NOTEBOOKS_DIR": str(nbdir)},
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 120
    while not (nbdir / "started").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (nbdir / "started").exists(), "the slow notebook never started"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted during 11_slow" in stderr and "finished: 10_fast" in stderr
    summary = json.loads((out / "quick" / "summary.json").read_text())
    assert [(r["notebook"], r["status"]) for r in summary] == [("10_fast", "ok"), ("11_slow", "interrupted")]
    assert summary[0]["ok"] and not summary[1]["ok"] and "interrupted" in summary[1]["error"]
    assert "| 10_fast | x is positive" in stdout, "the claims table of what finished"
    assert "11_slow" not in stdout.split("| notebook |", 1)[1], "an interrupted notebook has no claims row"


def test_a_full_disk_is_one_clear_line_and_leaves_no_partial_summary(tiny, tmp_path, monkeypatch, capsys):
    _tiny_notebook(tiny, GOOD.format(name="11_good"), "11_good")
    out = tmp_path / "results"
    from fedlib import utils

    real_fsync = os.fsync

    def full(fd):  # the summary write hits a full disk after the notebook itself finished
        if "summary.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(utils.os, "fsync", full)
    assert runner.main(["reproduce", "--out", str(out)]) == 1
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "the disk is full" in err[-1]
    assert "| 11_good | x is positive (required) |" in cap.out, "the finished notebooks' table is still printed"
    assert not (out / "quick" / "summary.json").exists(), "no 0-byte summary"
    assert not list((out / "quick").glob(".summary.json*")), "no temporary file left behind"
    assert (out / "quick" / "11_good" / "metrics.json").exists(), "finished work is kept"


def test_report_names_missing_and_incomplete_notebooks_and_refuses_nothing(tiny, tmp_path, capsys):
    _tiny_notebook(tiny, GOOD.format(name="10_a"), "10_a")
    _tiny_notebook(tiny, GOOD.format(name="11_b"), "11_b")
    _tiny_notebook(tiny, GOOD.format(name="12_c"), "12_c")
    out = tmp_path / "results"
    assert runner.main(["reproduce", "10_a", "11_b", "--out", str(out)]) == 0
    (out / "quick" / "11_b" / "metrics.json").write_text('{"schema": "fedlib.metrics/2", "claims": [')  # cut short
    capsys.readouterr()
    assert runner.main(["report", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "| 10_a | x is positive (required) | x > 0 | 3 | holds |" not in cap.out  # x=1 by default
    assert "| 10_a | x is positive (required) | x > 0 | 1 | holds |" in cap.out
    assert "11_b: incomplete" in cap.err and "12_c: missing" in cap.err
    assert runner.main(["report", "--scale", "nosuch", "--out", str(out)]) == 2
    assert "no results for scale 'nosuch'" in capsys.readouterr().err
    (out / "quick" / "10_a" / "metrics.json").unlink()
    assert runner.main(["report", "--out", str(out)]) == 2
    assert "nothing to report at scale 'quick'" in capsys.readouterr().err


def test_report_of_a_set_names_only_the_notebooks_that_have_it(tiny, tmp_path, capsys):
    for name in ("10_a", "11_b", "12_c"):
        _tiny_notebook(tiny, GOOD.format(name=name), name)
    for name in ("10_a", "11_b"):  # 12_c has no `long` set: it is not missing from `long`
        (tiny / "params").mkdir(exist_ok=True)
        (tiny / "params" / f"{name}.yaml").write_text("long:\n  x: 2\n")
    out = tmp_path / "results"
    assert runner.main(["reproduce", "10_a", "--scale", "long", "--out", str(out)]) == 0
    capsys.readouterr()
    assert runner.main(["report", "--scale", "long", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "11_b: missing" in err and "12_c" not in err


def test_metrics_schema_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_RUN_DIR", str(tmp_path / "quick" / "07_x"))
    run = Run("07_x", params={"seed": 3})
    run.metrics["acc"] = float("nan")
    run.claim("c", "1", "2", None, note="not testable here")
    run.claim("d", "p", "m", False)
    doc = json.loads(run.finish().read_text())
    assert doc["schema"] == SCHEMA and doc["seed"] == 3 and doc["metrics"]["acc"] is None
    assert validate_metrics(doc) == []
    monkeypatch.setattr(runner, "notebooks", lambda folder=None: {})
    table = runner.report("quick", out_root=tmp_path)
    assert "| 07_x | c | 1 | 2 | not applicable |" in table
    assert "| 07_x | d | p | m | does not hold at this scale |" in table
    assert validate_metrics({"schema": "x"})  # problems are reported


def test_runs_started_at_once_in_one_folder_each_talk_to_their_own_kernel(tmp_path):
    """Four runner processes start kernels at the same moment from one folder: each must finish (a
    shared socket name or port made one client wait for ever on a reply that another kernel got)."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _tiny_notebook(nbdir, GOOD.format(name="10_fast") + "\nimport time\ntime.sleep(1)", "10_fast")
    procs = [subprocess.Popen([sys.executable, "-m", "fedlib", "reproduce", "--out", str(tmp_path / f"r{i}")],
                              cwd=nbdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "FEDLIB_NOTEBOOKS_DIR": str(nbdir)}) for i in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    assert not list(nbdir.glob("kernel-*")), "no socket files left in the notebooks' folder"


def test_a_relative_out_folder_is_taken_from_where_the_command_runs(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _tiny_notebook(nbdir, GOOD.format(name="10_fast"), "10_fast")
    done = subprocess.run([sys.executable, "-m", "fedlib", "reproduce", "--out", "rel"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env={**os.environ, "FEDLIB_NOTEBOOKS_DIR": str(nbdir)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "rel" / "quick" / "10_fast" / "metrics.json").exists()
