"""Fashion-MNIST from Debian's dataset-fashion-mnist, offline (issue 8)."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlib import data as D

DEBIAN = D.DEBIAN_FASHION_MNIST
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN} missing); `apt-get install dataset-fashion-mnist`",
)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDLIB_DATA", raising=False)
    return tmp_path / "cache"


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@needs_debian
def test_loader_reads_the_debian_files_exactly(fresh_cache):
    tr = D.load_dataset("fashion_mnist", "train")
    te = D.load_dataset("fashion_mnist", "test")
    assert tr.x.shape == (60_000, 1, 28, 28) and te.x.shape == (10_000, 1, 28, 28)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.long
    assert int(tr.y.min()) == 0 and int(tr.y.max()) == 9 and tr.n_classes == 10
    assert tr.x.min() >= -1 and tr.x.max() <= 1
    # the same bytes as the original idx files (header: 16 bytes for images, 8 for labels)
    raw = _idx(DEBIAN / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    pixels = ((te.x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels, raw)
    assert np.array_equal(te.y.numpy(), _idx(DEBIAN / "t10k-labels-idx1-ubyte.gz", 8))
    # unpacked into the cache, never into the source tree
    assert (fresh_cache / "datasets" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


@needs_debian
def test_same_bytes_as_torchvision_reads(fresh_cache):
    from torchvision.datasets import FashionMNIST

    root = D.fashion_mnist_root()
    tv = FashionMNIST(root, train=False, download=False)
    ours = D.load_dataset("fashion_mnist", "test")
    assert torch.equal(((ours.x[:, 0] + 1) * 127.5).round().to(torch.uint8), tv.data)
    assert torch.equal(ours.y, tv.targets)


@needs_debian
def test_cache_is_reused_not_unpacked_again(fresh_cache):
    D.fashion_mnist_root()
    f = fresh_cache / "datasets" / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    before = f.stat().st_mtime_ns
    os.utime(f, ns=(before - 10**9, before - 10**9))
    D.fashion_mnist_root()
    assert f.stat().st_mtime_ns == before - 10**9


@needs_debian
def test_subset_is_stratified(fresh_cache):
    sub = D.load_dataset("fashion_mnist", "train", n=1000, seed=0)
    assert len(sub) == 1000 and (sub.label_counts() == 100).all()


def test_explicit_root_and_env_are_looked_at_first(tmp_path, fresh_cache, monkeypatch):
    # a folder holding the plain idx files (no torchvision layout) is accepted and unpacked
    src = tmp_path / "mine"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, header, n in [("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2, 3 * 784),
                            ("t10k-images-idx3-ubyte", b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2, 2 * 784),
                            ("train-labels-idx1-ubyte", b"\x00\x00\x08\x01" + (3).to_bytes(4, "big"), 3),
                            ("t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01" + (2).to_bytes(4, "big"), 2)]:
        body = rng.integers(0, 10 if "labels" in name else 256, n, dtype=np.uint8).tobytes()
        with gzip.open(src / f"{name}.gz", "wb") as f:
            f.write(header + body)
    ds = D.load_dataset("fashion_mnist", "train", root=src)
    assert ds.x.shape == (3, 1, 28, 28)
    monkeypatch.setenv("FEDLIB_DATA", str(src))
    assert len(D.load_dataset("fashion_mnist", "test")) == 2


def test_offline_error_names_apt_package_and_paths(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(D.DatasetUnavailable) as info:
        D.load_dataset("fashion_mnist", "train", root=tmp_path / "empty")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "empty") in msg and "digits" in msg
