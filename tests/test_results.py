"""fedlib.results: the one noise rule every comparative claim is decided by, claims, explorer data."""

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedlib import results as R
from fedlib.results import Run, compare, compare_to, combine, decide


def test_fewer_than_three_seeds_is_never_a_verdict_beyond_noise():
    assert decide([0.5])[0] == "within noise"
    assert decide([0.5, 0.6])[0] == "within noise"
    assert decide([0.5, 0.6, 0.55])[0] == "holds"


def test_the_rule_is_twice_the_standard_error_of_the_paired_difference():
    d = np.array([0.10, 0.02, 0.06])  # mean 0.06, sd 0.04, SE 0.0231
    verdict, mean, se = decide(d)
    assert mean == pytest.approx(0.06) and se == pytest.approx(0.04 / np.sqrt(3))
    assert verdict == "holds"  # 0.06 > 2 * 0.0231
    assert decide(d - 0.02)[0] == "within noise"  # 0.04 < 0.0462
    assert decide(-d)[0] == "does not hold"
    assert decide([0.0, 0.0, 0.0])[0] == "within noise"
    assert decide([1e-6, 1e-6, 1e-6])[0] == "holds"  # no spread at all: any consistent gain counts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=3, max_size=8), st.floats(0.1, 10))
def test_the_verdict_does_not_depend_on_units_and_flips_with_the_sign(d, scale):
    # away from the two places where rounding, not the rule, decides: values that underflow when scaled,
    # and a mean that sits on the 2 SE boundary to the last bits
    assume(all(x == 0 or abs(x) > 1e-9 for x in d))
    n, m = len(d), sum(d) / len(d)
    sd = (sum((x - m) ** 2 for x in d) / (n - 1)) ** 0.5
    assume(sd == 0 or abs(abs(m) / (2 * sd / n ** 0.5) - 1) > 1e-6)
    v, _, _ = decide(d)
    assert decide([x * scale for x in d])[0] == v
    flipped = {"holds": "does not hold", "does not hold": "holds", "within noise": "within noise"}[v]
    assert decide([-x for x in d])[0] == flipped


def test_compare_is_paired_and_respects_the_direction():
    a, b = [0.90, 0.80, 0.70], [0.85, 0.75, 0.65]  # seed spread 0.1, paired difference exactly 0.05
    c = compare(a, b, a_name="FedGO", b_name="FedDF")
    assert c.verdict == "holds" and c.mean == pytest.approx(0.05) and c.n == 3
    assert "FedGO 0.800 ± 0.100 vs FedDF 0.750 ± 0.100" in c.measured() and "3 seeds" in c.measured()
    assert compare(a, b, higher_is_better=False).verdict == "does not hold"  # e.g. a distance
    assert compare(a, b, margin=0.1).verdict == "does not hold"
    with pytest.raises(ValueError, match="one value per seed"):
        compare([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        compare([1, float("nan"), 3], [1, 2, 3])


def test_threshold_claims_use_the_same_rule():
    assert compare_to([1.2, 1.3, 1.25], 1.75).verdict == "holds"
    assert compare_to([1.7, 1.8, 1.76], 1.75).verdict == "within noise"
    assert compare_to([2.5, 2.6, 2.4], 1.75).verdict == "does not hold"
    assert compare_to([0.9, 0.95, 0.92], 0.5, below=False).verdict == "holds"


def test_beating_every_baseline_needs_every_comparison():
    win = compare([0.9, 0.8, 0.85], [0.7, 0.6, 0.65])
    tie = compare([0.9, 0.8, 0.85], [0.9, 0.79, 0.86])
    lose = compare([0.5, 0.4, 0.45], [0.9, 0.8, 0.85])
    assert combine({"x": win, "y": win})[0] == "holds"
    assert combine({"x": win, "y": tie}) == ("within noise", "y")
    assert combine({"x": win, "y": tie, "z": lose}) == ("does not hold", "z")


def test_claims_record_verdict_holds_and_evidence(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_RUN_DIR", str(tmp_path))
    run = Run("09_t", params={"seeds": [0, 1, 2]})
    c = run.claim("A beats B", "yes", None, compare([3, 4, 5], [1, 2, 3.5], a_name="A", b_name="B"))
    assert c.verdict == "holds" and c.holds is True and c.evidence["n"] == 3 and "A 4.000" in c.measured
    assert run.claim("sanity", "-", "ok", True, required=True).verdict == "holds"
    assert run.claim("one client", "-", "-", "not applicable").holds is None
    assert run.claim("noise", "-", "-", "within noise").holds is None
    with pytest.raises(ValueError, match="unknown verdict"):
        run.claim("x", "-", "-", "holds at this scale")
    with pytest.raises(ValueError, match="needs a Comparison"):
        run.claim("x", "-", None, True)
    doc = json.loads(run.finish().read_text())
    assert R.validate_metrics(doc) == []
    doc["claims"][0]["holds"] = False
    assert any("contradicts" in p for p in R.validate_metrics(doc))
    table = run.claims_table().data
    assert "| 09_t | A beats B | yes | A 4.000" in table and "| holds |" in table


def test_run_start_reads_the_notebooks_own_parameters():
    namespace = {"seed": 1, "n_clients": 4, "alphas": [0.1], "toy_points": 50, "show_fashion_mnist": False, "other": 9}
    run = Run.start("00_data_and_partitions", namespace)
    assert run.params == {k: v for k, v in namespace.items() if k != "other"}
    with pytest.raises(ValueError, match="lacks the parameters"):
        Run.start("00_data_and_partitions", {"seed": 1})


def test_explorer_data_round_trip(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("FEDLIB_RUN_DIR", str(tmp_path))
    data = {"acc": torch.rand(2, 3), "methods": ["a", "b"], "rounds": 3, "nested": {"x": [1.5, 2.5]}}
    R.save_explorer("09_t", data)
    back = R.load_explorer("09_t")
    assert torch.equal(back["acc"], data["acc"]) and back["methods"] == ["a", "b"] and back["nested"] == data["nested"]
    monkeypatch.setenv("FEDLIB_RUN_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="no explorer data for 09_t"):
        R.load_explorer("09_t")


def test_provenance_counts_only_inputs_as_dirty():
    prov = R.provenance("cpu")
    for path in prov["dirty_paths"] or []:
        assert path.startswith(("fedlib/", "notebooks/", "constraints.txt")), path
        assert not path.startswith("notebooks/") or path.endswith(".py") or "/params/" in path, path
    assert prov["git_dirty"] == bool(prov["dirty_paths"])
    assert prov["threads"] >= 1 and len(prov["git_commit"]) == 40


def test_provenance_names_the_processor_that_computed_the_numbers(monkeypatch, tmp_path):
    prov = R.provenance("cpu")
    assert prov["cpu"]["model"] and prov["cpu_count"] >= 1
    assert set(prov["cpu"]["simd"]) <= set(R.SIMD_FLAGS)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9\nflags\t\t: fpu avx2 fma sse4_2\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512f\n")
    real = R.Path

    def fake(p, *a):
        return real(info) if str(p) == "/proc/cpuinfo" else real(p, *a)

    monkeypatch.setattr(R, "Path", fake)
    assert R.cpu_model() == {"model": "Test CPU 9", "simd": ["sse4_2", "avx2", "fma"]}


def test_run_root_gives_each_notebook_its_own_folder(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("FEDLIB_RUN_DIR", raising=False)
    monkeypatch.setenv("FEDLIB_RUN_ROOT", str(tmp_path))
    assert R.run_dir("09_a") == tmp_path / "09_a" and R.run_dir("09_b") == tmp_path / "09_b"
    R.save_explorer("09_a", {"x": torch.ones(2)})
    assert (tmp_path / "09_a" / R.EXPLORER_FILE).exists() and not (tmp_path / "09_b" / R.EXPLORER_FILE).exists()
    assert torch.equal(R.load_explorer("09_a")["x"], torch.ones(2))
    monkeypatch.setenv("FEDLIB_RUN_DIR", str(tmp_path / "one"))  # the runner's own folder wins
    assert R.run_dir("09_a") == tmp_path / "one"


def test_the_run_record_reuses_the_one_noise_rule():
    from fedlib import verdicts as V

    assert (R.compare, R.compare_to, R.combine, R.decide, R.as_verdict, R.Comparison) == \
        (V.compare, V.compare_to, V.combine, V.decide, V.as_verdict, V.Comparison)
    assert R.NOISE_RULE == V.NOISE_RULE and R.VERDICTS == V.VERDICTS


def test_per_seed_pairs_by_seed_in_the_order_asked_and_never_silently():
    from fedlib.verdicts import per_seed

    rows = [{"seed": s, "method": m, "round": r, "acc": 10 * s + r + (0.5 if m == "b" else 0.0)}
            for s in (2, 0, 1) for m in ("a", "b") for r in (1, 2)]
    assert per_seed(rows, "acc", method="a").tolist() == [1.5, 11.5, 21.5]  # sorted, mean over rounds
    assert per_seed(rows, "acc", [2, 0], last="round", method="b").tolist() == [22.5, 2.5]
    assert per_seed(rows, "acc", [1], method="a", round=1).index.tolist() == [1]
    for bad in (dict(seeds=[0, 7]), dict(seeds=[0], method="c")):
        with pytest.raises(KeyError, match="seeds|no rows"):
            per_seed(rows, "acc", **{"method": "a", **bad})
        with pytest.raises(ValueError):
            per_seed(rows, "acc", **{"method": "a", **bad})
