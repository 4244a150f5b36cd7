"""Command-line values that used to be accepted and then ran without end, failed deep
inside a run, or ran silently wrong are refused up front: exit status 2, one line each naming the
value, what is allowed and the fix, before any kernel starts. In-process through ``runner.main``:
no kernels, seconds."""

import os
import re

import pytest

from fedlib import params as P
from fedlib import runner


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """A refusal that slips through would start a kernel: fail loudly instead of running a notebook."""
    def started(name, *args, **kw):
        raise AssertionError(f"a kernel started for {name}: the input should have been refused")

    monkeypatch.setattr(runner, "execute", started)


def refused(capsys, tmp_path, *args) -> str:
    """stderr of a refused `reproduce`; checks exit status 2, one 'error:' line each, nothing written."""
    out = tmp_path / "out"
    assert runner.main(["reproduce", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written when the input is refused"
    return err


# (arguments, what the one line must say: the value, the allowed values, the fix)
CASES = [
    # accepted, then a cell ran without end
    (["04", "--scale", "smoke", "-p", "toy_teacher_steps=1000000000"],
     ["toy_teacher_steps=1000000000 is not allowed (it is not at most 300000)", "max 300000",
      "e.g. -p toy_teacher_steps="]),
    (["00", "-p", "toy_points=1000000000000"], ["toy_points=1000000000000 is not allowed (it is not at most 500000)"]),
    (["01", "-p", "rounds=100000000"], ["rounds=100000000 is not allowed (it is not at most 10000)"]),
    (["03", "-p", "ld3_train=10000000"], ["ld3_train=10000000 is not allowed (it is not at most 5000)"]),
    (["04", "-p", "cpu_threads=100000"], ["cpu_threads=100000 is not allowed (it is not at most 256)"]),
    (["05", "-p", "seeds=[0, 1, 100000000000000000000]"], ["100000000000000000000 is not at most 2147483647"]),
    # accepted, then failed deep
    (["00", "-p", "alphas=[1e999]"], ["alphas=[inf]: element 0 is inf", "no inf or nan", "e.g. -p alphas=[0.05"]),
    (["00", "-p", "seed=1000000000000000000000000000000"],
     ["seed=1000000000000000000000000000000 is not allowed (it is not at most 2147483647)", "max 2**31 - 1"]),
    (["01", "-p", "lr=.inf"], ["lr=inf is not a finite number", "e.g. -p lr=0.05"]),
    (["01", "-p", "mu=.inf"], ["mu=inf is not a finite number"]),
    (["04", "-p", "lr=.inf"], ["lr=inf is not a finite number"]),
    (["05", "-p", "alpha=.inf"], ["alpha=inf is not a finite number"]),
    (["05", "-p", "alpha=-.inf"], ["alpha=-inf is not a finite number"]),
    (["02", "--scale", "smoke", "-p", "n_val=5000"],
     ["n_val=5000 is not allowed (it is not at most 718 (train_size(dataset) // 2 = 718))"]),
    (["04", "-p", "budget_multipliers=[1e-9]"],
     ["budget_multipliers=[1e-09] is not allowed (1e-09 is not at least 0.1 (toy_eval_every / toy_steps = 0.1))"]),
    (["03", "-p", "shrink_nfe=2"], ["shrink_nfe=2 is not allowed (it is not greater than 6 (max(ld3_nfes) = 6))"]),
    (["03", "-p", "shrink_nfe=5"], ["shrink_nfe=5 is not allowed (it is not greater than 6"]),
    # silently wrong: a grid finer than its reference
    (["05", "--scale", "smoke", "-p", "ld3_nfes=[30]"],
     ["ld3_nfes=[30] is not allowed (30 is not smaller than 8 (teacher_nfe = 8))", "each < teacher_nfe"]),
    (["05", "-p", "ld3_nfes=[4, 20]"], ["20 is not smaller than 20 (teacher_nfe = 20)"]),
    (["03", "-p", "teacher_nfe=8"], ["shrink_nfe=10 is not allowed (it is not smaller than 8 (teacher_nfe = 8))"]),
    # the element and its index, not "has type list but must be list"
    (["00", "-p", "alphas=[nan]"], ["alphas=['nan']: element 0 ('nan') has type str; alphas must be list of float"]),
    (["00", "-p", "alphas=[1, .nan]"], ["alphas=[1, nan]: element 1 is nan"]),
    (["01", "-p", "seeds=[0,true]"], ["seeds=[0, True]: element 1 (True) has type bool; seeds must be list of int",
                                       "e.g. -p seeds=[0, 1, 2]"]),
    # a value given twice kept the last without a word
    (["01", "-p", "lr=1", "-p", "lr=2"], ["-p lr is given 2 times (lr=1, lr=2); allowed: each parameter once"]),
    # --update-notebooks would replace the committed quick notebook and figures with another run
    (["00", "--scale", "smoke", "--update-notebooks"],
     ["--update-notebooks with --scale smoke", "allowed: --update-notebooks with --scale quick and no -p"]),
    (["00", "--scale", "paper", "--update-notebooks"], ["--update-notebooks with --scale paper"]),
    (["00", "-p", "toy_points=300", "--update-notebooks"], ["--update-notebooks with -p toy_points=300"]),
]


@pytest.mark.parametrize("args, says", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_is_refused_up_front_in_one_line(args, says, tmp_path, capsys):
    err = refused(capsys, tmp_path, *args)
    for text in says:
        assert text in err, err
    assert len(err.strip().splitlines()) == 1, "one line for one bad value"


def test_threads_are_bounded_by_the_cpus(tmp_path, capsys):
    cpus = os.cpu_count() or 1
    err = refused(capsys, tmp_path, "00", "--threads", str(cpus + 1))
    assert f"--threads {cpus + 1}: allowed: an integer >= 1 and at most {cpus}" in err and "os.cpu_count()" in err


@pytest.mark.parametrize("where", ["FILE", "/proc/fedlib-cache"])
def test_unwritable_cache_is_refused_up_front(where, tmp_path, monkeypatch, capsys):
    # a file, or a folder no one may create (root may write a chmod-ed folder, so none is used here)
    if where == "FILE":
        where = tmp_path / "a-file"
        where.write_text("x")
    monkeypatch.setenv("FEDLIB_CACHE", str(where))
    err = refused(capsys, tmp_path, "00", "--scale", "smoke")
    assert err.startswith(f"error: FEDLIB_CACHE={where}: cannot write fedlib's cache there ("), err
    assert "unset FEDLIB_CACHE or point it at a writable folder" in err
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "cache"))
    assert runner.check_cache_dir() == tmp_path / "cache", "a writable cache passes (and is created)"


def test_relative_cache_is_refused_up_front(tmp_path, monkeypatch, capsys):
    # the runner and its kernels (run in the notebooks' folder) would read it as two different folders
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDLIB_CACHE", "my-cache")
    err = refused(capsys, tmp_path, "00", "--scale", "smoke")
    assert "FEDLIB_CACHE=my-cache is relative" in err and f"e.g. export FEDLIB_CACHE={tmp_path / 'my-cache'}" in err
    assert not (tmp_path / "my-cache").exists() and not (runner.NOTEBOOKS_DIR / "my-cache").exists()


def test_update_notebooks_at_quick_without_overrides_is_not_refused(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(runner, "reproduce", lambda *a, **kw: seen.update(a=a, kw=kw) or 0)
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "cache"))
    assert runner.main(["reproduce", "00", "--update-notebooks", "--out", str(tmp_path)]) == 0
    asked = any(v is True for v in seen["a"]) or seen["kw"].get("update_notebooks") is True
    assert asked, "reproduce was asked to update the notebooks"


def test_duplicates_are_named_all_at_once():
    with pytest.raises(P.UsageError) as err:
        runner.build_plan(["01"], "quick", ["lr=1", "rounds=2", "lr=2", "rounds=3", "lr=3"], None)
    lines = str(err.value).splitlines()
    assert lines == ["-p lr is given 3 times (lr=1, lr=2, lr=3); allowed: each parameter once; e.g. -p lr=3",
                     "-p rounds is given 2 times (rounds=2, rounds=3); allowed: each parameter once; e.g. -p rounds=3"]


def test_non_finite_values_are_refused_wherever_they_sit():
    spec_float = {"default": 0.1, "type": "float"}
    spec_list = {"default": [0.1], "type": "list"}
    spec_free = {"default": None, "type": "NoneType"}  # no type to check: still no inf
    spec_empty = {"default": [], "type": "list"}  # an empty default list: no element type, still no inf
    for spec, value, text in [(spec_float, float("nan"), "x=nan is not a finite number"),
                              (spec_list, [1.0, 2.0, float("-inf")], "element 2 is -inf"),
                              (spec_free, {"a": [0, float("inf")]}, "element ['a'][1] is inf"),
                              (spec_empty, [float("inf")], "element 0 is inf"),
                              (spec_float, 10**400, "x=1" + "0" * 400 + " is beyond the float range")]:
        with pytest.raises(P.UsageError, match=re.escape(text)):
            P.coerce("x", value, spec, "nb")
    assert P.coerce("x", 3, spec_float, "nb") == 3.0 and P.coerce("x", [1, 2.5], spec_list, "nb") == [1.0, 2.5]


def test_a_bound_read_from_broken_parameters_defers_to_their_own_rules():
    specs = {"nfes": {"default": [4], "rules": "non-empty", "checks": P.parse_rules("non-empty")},
             "top": {"default": 10, "rules": "> max(nfes)", "checks": P.parse_rules("> max(nfes)")},
             "steps": {"default": 4, "rules": "min 4", "checks": P.parse_rules("min 4")},
             "ratio": {"default": [1.0], "rules": "each min 1 / steps", "checks": P.parse_rules("each min 1 / steps")}}
    lines = P.check("nb", {"nfes": [], "steps": 0}, specs)
    assert len(lines) == 2 and lines[0].startswith("nb: nfes=[] is not allowed (it is empty)") \
        and lines[1].startswith("nb: steps=0 is not allowed"), lines
    assert P.check("nb", {"nfes": [4, 12]}, specs)[0].startswith("nb: top=10 is not allowed (it is not greater than 12")
    # an unknown dataset has inf images, and inf // 2 is nan: the dataset's own rule speaks, not a bound of nan
    specs = {"dataset": {"default": "digits", "rules": "one of digits", "checks": P.parse_rules("one of digits")},
             "n": {"default": 2, "rules": "max train_size(dataset) // 2",
                   "checks": P.parse_rules("max train_size(dataset) // 2")}}
    assert P.check("nb", {"dataset": "nope", "n": 5}, specs) == [
        "nb: dataset='nope' is not allowed ('nope' is not one of digits); allowed: [one of digits]; "
        "e.g. -p dataset='digits'"]
    assert "it is not at most 718" in P.check("nb", {"n": 5000}, specs)[0]


# integer parameters that only cap, split or filter existing work (beyond the data they keep all of it;
# regime_min_client_data only marks which of the cells already measured may be picked, however large)
UNBOUNDED_BY_DESIGN = {"max_train", "max_test", "client_chunk", "vmap_chunk"}


@pytest.mark.parametrize("name", list(runner.notebooks()))
def test_every_work_sizing_number_has_a_maximum_and_every_seed_fits_32_bits(name):
    specs = runner.parameters(runner.notebooks()[name])
    for pname, spec in specs.items():
        kinds = {(r.kind, r.op, r.each) for r in spec["checks"]}
        default = spec["default"]
        if "seed" in pname:
            each = isinstance(default, list)
            assert ("compare", "min", each) in kinds and any(
                r.kind == "compare" and r.op == "max" and r.each == each and eval(r.expr) == 2**31 - 1  # noqa: S307
                for r in spec["checks"]), f"{name}: {pname} needs [min 0; max 2**31 - 1]"
        is_int = isinstance(default, int) and not isinstance(default, bool)
        is_int_list = isinstance(default, list) and default and all(type(v) is int for v in default)
        if (is_int or is_int_list) and pname not in UNBOUNDED_BY_DESIGN:
            bounded = any(r.kind in ("member", "within") or (r.kind == "compare" and r.op in ("max", "<"))
                          for r in spec["checks"])
            assert bounded, f"{name}: the integer parameter {pname} has no upper bound: [{spec['rules']}]"
