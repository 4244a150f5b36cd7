"""Faults lose nothing: cache files are written atomically, and a cache file that cannot be loaded
(what a kill during ``torch.save`` leaves) is reported once, removed and rebuilt to the same weights."""

import errno
import json
import os
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlib import ld3, metrics, utils
from fedlib.data import stand_in
from fedlib.diffusion import pretrained_teacher


def _truncate(path, keep: float = 0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _one_cache_warning(record, path) -> str:
    msgs = [str(w.message) for w in record if issubclass(w.category, utils.CacheWarning)]
    assert len(msgs) == 1, msgs
    assert str(path) in msgs[0]
    return msgs[0]


# ---------------------------------------------------------------------------------------------
# the shared mechanism


@settings(max_examples=30, deadline=None)
@given(old=st.binary(max_size=64), new=st.one_of(st.binary(max_size=4096), st.text(max_size=200)))
def test_atomic_write_replaces_whole_and_leaves_nothing_else(tmp_path_factory, old, new):
    folder = tmp_path_factory.mktemp("aw")
    path = folder / "entry.bin"
    path.write_bytes(old)
    assert utils.atomic_write(path, new) == path
    assert path.read_bytes() == (new.encode() if isinstance(new, str) else new)
    assert os.listdir(folder) == ["entry.bin"]


@pytest.mark.parametrize("had_old", [True, False])
def test_atomic_write_interrupted_by_an_exception_keeps_the_old_file(tmp_path, had_old):
    path = tmp_path / "sub" / "entry.pt"
    if had_old:
        utils.atomic_torch_save({"w": torch.arange(5)}, path)

    def writer(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what a Ctrl-C mid-save raises

    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write(path, writer)
    assert os.listdir(path.parent) == (["entry.pt"] if had_old else [])
    if had_old:
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))


@pytest.mark.parametrize("had_old", [True, False])
def test_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, had_old):
    path = tmp_path / "entry.pt"
    if had_old:
        path.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.os, "fsync", no_space)  # the data reached the file; fsync finds no room
    with pytest.raises(OSError) as info:
        utils.atomic_torch_save({"w": torch.randn(1000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == (["entry.pt"] if had_old else [])
    if had_old:
        assert path.read_bytes() == b"old"


def test_load_cache_entry_absent_good_and_bad(tmp_path):
    path = tmp_path / "entry.json"
    calls = []
    assert utils.load_cache_entry(path, calls.append) is None and calls == []  # absent: loader not called
    utils.atomic_write(path, json.dumps({"a": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.load_cache_entry(path, lambda p: json.loads(p.read_text())["a"]) == 1
    utils.atomic_write(path, '{"a": 1')  # truncated JSON
    with pytest.warns(utils.CacheWarning) as record:
        assert utils.load_cache_entry(path, lambda p: json.loads(p.read_text())["a"]) is None
    msg = _one_cache_warning(record, path)
    assert "JSONDecodeError" in msg and "7 bytes" in msg and "\n" not in msg
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# every cache that fedlib reads


def _teacher_weights(t):
    return {k: v.clone() for k, v in t.net.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong_keys"])
def test_a_damaged_teacher_cache_is_reported_and_rebuilt_to_the_cold_weights(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "cold"))
    cold = _teacher_weights(pretrained_teacher("ring", steps=5, seed=0, device="cpu", progress=False))
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "warm"))
    path = pretrained_teacher("ring", steps=5, seed=0, device="cpu", progress=False).cache_path
    if damage == "wrong_keys":
        # a readable file whose weights (of another seed) load half-way before the missing key is noticed:
        # the rebuild must not start from them
        other = pretrained_teacher("ring", steps=5, seed=1, device="cpu", progress=False)
        state = torch.load(other.cache_path, weights_only=True)
        state["ema"].pop(sorted(state["ema"])[-1])
        torch.save(state, path)
    else:
        _truncate(path, 0.5 if damage == "truncated" else 0.0)
    with pytest.warns(utils.CacheWarning) as record:
        rebuilt = pretrained_teacher("ring", steps=5, seed=0, device="cpu", progress=False)
    _one_cache_warning(record, path)
    assert rebuilt.history["cached"] is False and rebuilt.cache_path == path
    _assert_same_weights(_teacher_weights(rebuilt), cold)
    with warnings.catch_warnings():  # the rebuilt entry is whole: loaded silently next time
        warnings.simplefilter("error")
        again = pretrained_teacher("ring", steps=5, seed=0, device="cpu", progress=False)
    assert again.history["cached"] is True
    _assert_same_weights(_teacher_weights(again), cold)


def test_a_truncated_feature_classifier_cache_is_reported_and_rebuilt_to_the_cold_weights(tmp_path, monkeypatch):
    train = stand_in("digits", "train", n=64, seed=0)

    def build():
        net = metrics.feature_extractor(train, steps=3, batch_size=16, device="cpu")
        return net, {k: v.clone() for k, v in net.state_dict().items()}

    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "cold"))
    _, cold = build()
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "warm"))
    path = build()[0].cache_path
    _truncate(path)
    with pytest.warns(utils.CacheWarning) as record:
        net, rebuilt = build()
    msg = _one_cache_warning(record, path)
    assert re.search(r"\(\d+ bytes\)", msg)
    _assert_same_weights(rebuilt, cold)
    assert torch.load(path, weights_only=True)["net"].keys() == cold.keys()  # written whole this time


def test_a_truncated_learned_schedule_is_reported_and_learned_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    from fedlib.diffusion import EDM, Denoiser, MLPDenoiser

    torch.manual_seed(0)
    den = Denoiser(MLPDenoiser(2, 8, 1), EDM(), "edm").eval()
    pairs = ld3.teacher_pairs(den, 4, (2,), nfe=4, seed=0)
    kw = dict(model_name="tiny", rounds_theta=1, rounds_both=0)
    first = ld3.load_or_learn(den, 2, pairs, pairs, solver="euler", **kw)
    path = ld3.schedule_path("tiny", "euler", 2)
    _truncate(path)
    with pytest.warns(utils.CacheWarning) as record:
        again = ld3.load_or_learn(den, 2, pairs, pairs, solver="euler", **kw)
    _one_cache_warning(record, path)
    assert again.history["cached"] is False and again.times == first.times
    assert ld3.load_or_learn(den, 2, pairs, pairs, solver="euler", **kw).history["cached"] is True
