"""Datasets and client partitions, as tensors.

Everything here returns an :class:`ArrayDataset` (``x``, ``y`` tensors that can be moved to a GPU
once, so no step pays a host-to-device copy) or index arrays (partitions).

- ``load_digits``: scikit-learn's bundled 8x8 digits (1797 real images): the embedded default.
- ``load_dataset``: the paper datasets through torchvision (Fashion-MNIST, MNIST, CIFAR-10/100,
  CelebA); Fashion-MNIST is found offline in Debian's ``dataset-fashion-mnist`` package.
- ``stand_in``: seeded data with a paper dataset's shape, for smoke runs where the data is absent.
- ``toy_2d`` / ``GaussianMixture2D``: 2-D toys; mixtures know their exact log-density.
- partitions: ``iid_partition``, ``dirichlet_partition`` (papers.md 1.4), ``shard_partition``,
  ``fedgo_split`` (half of each class to the clients, half unlabeled to the server).
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .utils import atomic_write, cache_dir, check_choice

# ---------------------------------------------------------------------------------------------
# Containers


@dataclass
class ArrayDataset:
    """Images or points ``x`` [N, ...] (float32, images in [-1, 1]) with integer labels ``y`` [N]."""

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    name: str = "data"

    def __post_init__(self):
        _check_labels(self.y, "y")
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}; they must match")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device) -> "ArrayDataset":
        return ArrayDataset(self.x.to(device), self.y.to(device), self.n_classes, self.name)

    def subset(self, idx) -> "ArrayDataset":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.x.device)
        return ArrayDataset(self.x[idx], self.y[idx], self.n_classes, self.name)

    def split(self, parts: Sequence[np.ndarray]) -> list["ArrayDataset"]:
        return [self.subset(p) for p in parts]

    def label_counts(self) -> np.ndarray:
        return np.bincount(self.y.cpu().numpy(), minlength=self.n_classes)

    def stratified(self, n: int | None, seed: int = 0) -> "ArrayDataset":
        """A seeded class-stratified subset of ``n`` samples; the whole set when ``n`` is 0/None or
        not smaller than it (quick CPU runs cap Fashion-MNIST this way, digits stays whole)."""
        if not n or n >= len(self):
            return self
        return self.subset(stratified_subset(self.y.cpu().numpy(), n, seed))


def _check_labels(labels, name: str = "labels"):
    """``labels`` unless it is not 1-D: every partition indexes samples by ``labels == c``, which
    on one-hot [N, C] labels silently yields indices into the flattened array (out of range)."""
    if np.ndim(labels) != 1:
        raise ValueError(f"{name} must be 1-D class indices of shape [N], got shape {tuple(np.shape(labels))}; "
                         "for one-hot or per-class scores [N, C] pass y.argmax(1), for a column [N, 1] "
                         "pass y.reshape(-1)")
    return labels


def _check_class_indices(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """``labels`` unless an entry is not a finite integer >= 0: a partition finds class c's samples by
    ``labels == c``, and NaN equals nothing, so NaN-labelled samples reached no client, silently."""
    if labels.dtype.kind in "iub":
        bad = labels < 0
    elif labels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(labels) | (labels < 0) | (labels != np.floor(labels))
    else:
        raise ValueError(f"{name} have dtype {labels.dtype}; allowed: integer class indices >= 0. Map the "
                         "classes to 0..C-1 first (e.g. np.unique(y, return_inverse=True)[1])")
    if bad.any():
        idx = np.flatnonzero(bad)
        shown = ", ".join(f"{name}[{i}]={labels[i].item()!r}" for i in idx[:4])
        raise ValueError(f"{shown} ({len(idx)} of {len(labels)} entries bad); allowed: finite integer class "
                         "indices >= 0. Drop the unlabelled samples or map the classes to 0..C-1 first")
    return labels


# ---------------------------------------------------------------------------------------------
# Digits: the embedded default

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn (its import alone
    costs every process about 4 s, more than the rest of a small benchmark)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "datasets" / "data" / "digits.csv.gz" \
        if spec is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError("scikit-learn's bundled digits.csv.gz was not found: fedlib's default dataset ships "
                                "with scikit-learn; install it with `make venv` (or pip install scikit-learn)")
    return path


def load_digits(split: str = "train") -> ArrayDataset:
    """scikit-learn's 8x8 digits as [N, 1, 8, 8] in [-1, 1]; a fixed stratified 80/20 split
    (seed 0: 1437 train, 360 test; :mod:`fedlib._digits_split`). ``split``: "train", "test" or "all"."""
    from ._digits_split import TEST_INDICES

    check_choice("split", split, ("train", "test", "all"))
    table = np.loadtxt(_digits_file(), delimiter=",")  # 64 pixel values 0..16, then the label, per row
    x = torch.tensor(table[:, :-1], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0
    y = torch.tensor(table[:, -1].astype(np.int64), dtype=torch.long)
    if split == "all":
        return ArrayDataset(x, y, 10, "digits")
    test = np.zeros(len(y), dtype=bool)
    test[list(TEST_INDICES)] = True
    idx = np.flatnonzero(test if split == "test" else ~test)
    return ArrayDataset(x[idx], y[idx], 10, "digits")


# ---------------------------------------------------------------------------------------------
# Paper datasets (torchvision) and their seeded stand-ins

# name -> (channels, height, width, classes, torchvision class)
PAPER_DATASETS = {
    "digits": (1, 8, 8, 10, None),
    "fashion_mnist": (1, 28, 28, 10, "FashionMNIST"),
    "mnist": (1, 28, 28, 10, "MNIST"),
    "cifar10": (3, 32, 32, 10, "CIFAR10"),
    "cifar100": (3, 32, 32, 100, "CIFAR100"),
    "celeba": (3, 64, 64, 1, "CelebA"),
}
DATASET_NAMES = tuple(PAPER_DATASETS)
# training-split sizes (digits: fedlib's fixed 80/20 split), so parameter rules such as "no more
# clients than images" are checked before anything loads (fedlib.params.train_size)
TRAIN_SIZES = {"digits": 1437, "fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000,
               "celeba": 162770}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_ENV = "FEDLIB_DATA"


class DatasetUnavailable(FileNotFoundError):
    """A dataset is not on this machine and may not (or cannot) be downloaded."""


def _offline_error(name: str, looked_in: Sequence[Path | str], how: str) -> DatasetUnavailable:
    places = ", ".join(str(p) for p in looked_in)
    return DatasetUnavailable(
        f"dataset {name!r} is not available offline; looked in: {places}. To obtain it: {how}. "
        "The embedded dataset 'digits' (scikit-learn's 8x8 digits) always works offline, and "
        "stand_in(name, ...) gives seeded data of the same shape for smoke runs."
    )


def _has_fashion_files(folder: Path) -> bool:
    return all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in FASHION_FILES)


def fashion_mnist_root(root: str | Path | None = None, download: bool = False) -> Path:
    """Find Fashion-MNIST without the network and return a torchvision root holding
    ``FashionMNIST/raw/`` with the four unpacked idx files.

    Order: an explicit ``root``; then ``$FEDLIB_DATA``; then Debian's ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``). A folder may hold torchvision's layout
    (``FashionMNIST/raw``) or the plain (gzipped) idx files, which are unpacked once into the
    cache (never into the source tree) and reused. With nothing found and ``download`` true,
    torchvision downloads into the cache; otherwise a :class:`DatasetUnavailable` error.
    """
    candidates = []
    if root is not None:
        candidates.append(Path(root).expanduser())
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]).expanduser())
    candidates.append(DEBIAN_FASHION_MNIST)
    for base in candidates:
        for folder in (base / "FashionMNIST" / "raw", base / "fashion-mnist", base):
            if not _has_fashion_files(folder):
                continue
            if folder.name == "raw" and all((folder / f).exists() for f in FASHION_FILES):
                return folder.parent.parent
            return _unpack_fashion(folder)
    cache_root = cache_dir("datasets")
    if _has_fashion_files(cache_root / "FashionMNIST" / "raw"):
        return _unpack_fashion(cache_root / "FashionMNIST" / "raw")
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(cache_root, train=True, download=True)
        return cache_root
    raise _offline_error(
        "fashion_mnist", candidates + [cache_root / "FashionMNIST" / "raw"],
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, no network beyond the package "
        f"registry), or set ${DATA_ENV} / root= to a folder with the four idx files, or pass download=True",
    )


def _unpack_fashion(src: Path) -> Path:
    """Unpack (or copy) the idx files into ``<cache>/datasets/FashionMNIST/raw`` once."""
    root = cache_dir("datasets")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in FASHION_FILES:
        dst = raw / f
        if dst.exists() and dst.stat().st_size > 0:
            continue  # unpacked by an earlier call: reuse
        with (open(src / f, "rb") if (src / f).exists() else gzip.open(src / f"{f}.gz", "rb")) as fin:
            # atomic: an interrupted unpack never looks finished
            atomic_write(dst, lambda fout: shutil.copyfileobj(fin, fout))
    return root


def to_uint8(x):
    """Images in [-1, 1] (tensor [..., C, H, W]) -> uint8 0..255: the compact form explorers store."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x):
    """Inverse of :func:`to_uint8` (up to its rounding): uint8 -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def _to_dataset(images: torch.Tensor, labels: torch.Tensor, n_classes: int, name: str) -> ArrayDataset:
    """uint8 images [N, H, W] or [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float().div(127.5).sub(1.0).contiguous()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return ArrayDataset(x, y, n_classes, name)


def load_dataset(name: str, split: str = "train", root: str | Path | None = None,
                 download: bool = False, n: int | None = None, seed: int = 0) -> ArrayDataset:
    """A paper dataset as an :class:`ArrayDataset` in [-1, 1].

    ``name``: one of ``DATASET_NAMES``; ``split``: "train" or "test"; ``root``: where torchvision's
    files are (default: fedlib's cache); ``download``: allow torchvision to download (never in tests);
    ``n``: keep a seeded, class-stratified random subset of this size (quick CPU runs).
    """
    check_choice("dataset", name, DATASET_NAMES, fix="Use stand_in(name, ...) for seeded data of a paper dataset's shape.")
    check_choice("split", split, ("train", "test"))
    if name == "digits":
        data = load_digits(split)
    elif name == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(fashion_mnist_root(root, download), train=split == "train", download=False)
        data = _to_dataset(ds.data, ds.targets, 10, name)
    else:
        data = _torchvision_dataset(name, split, root, download)
    if n is not None:
        data = data.subset(stratified_subset(data.y.numpy(), n, seed))
    return data


def _torchvision_dataset(name: str, split: str, root, download: bool) -> ArrayDataset:
    import torchvision.datasets as tvd

    c, h, w, k, cls = PAPER_DATASETS[name]
    base = Path(root).expanduser() if root is not None else cache_dir("datasets")
    how = (f"pass download=True on a machine with internet (torchvision saves it under {base}), "
           f"or point root= at a folder that holds torchvision's {cls} files")
    try:
        if name == "celeba":
            import torchvision.transforms as T

            ds = tvd.CelebA(base, split="train" if split == "train" else "test", download=download,
                            transform=T.Compose([T.CenterCrop(178), T.Resize(h), T.PILToTensor()]))
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            return ArrayDataset(x.float().div(127.5).sub(1.0), torch.zeros(len(x), dtype=torch.long), 1, name)
        if name == "mnist":
            ds = tvd.MNIST(base, train=split == "train", download=download)
        else:
            ds = getattr(tvd, cls)(base, train=split == "train", download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        if download:
            raise
        raise _offline_error(name, [base], how) from err
    return _to_dataset(torch.as_tensor(np.asarray(ds.data)), ds.targets, k, name)


def load_train_test(name: str, stand_in_data: bool = False, stand_in_n: tuple[int, int] = (2048, 512),
                    root: str | Path | None = None, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) for a notebook: the real dataset, or its seeded :func:`stand_in` when asked
    (``stand_in_data``) or when the real one is not on this machine, which is then said out loud, so
    paper-scale parameter sets still smoke-run on a machine without the data."""
    if not stand_in_data:
        try:
            return load_dataset(name, "train", root=root), load_dataset(name, "test", root=root)
        except DatasetUnavailable as err:
            print(f"{name} is not on this machine; using fedlib's seeded stand-in of its shape instead.\n  ({err})")
    return (stand_in(name, "train", n=stand_in_n[0], seed=seed), stand_in(name, "test", n=stand_in_n[1], seed=seed))


def stand_in(name: str, split: str = "train", n: int = 512, seed: int = 0) -> ArrayDataset:
    """Seeded data with the shape, range and class count of a paper dataset, for smoke runs of
    paper-scale parameter sets where the real data is absent (e.g. a GPU machine without internet).

    Each class has its own smooth random template plus noise, so classifiers and generative
    models have something learnable; the numbers mean nothing about the real dataset.
    """
    check_choice("dataset", name, DATASET_NAMES)
    check_choice("split", split, ("train", "test"))
    c, h, w, k, _ = PAPER_DATASETS[name]
    g = torch.Generator().manual_seed(seed)
    # templates depend on the seed only, so train and test share classes
    low = torch.randn(k, c, max(2, h // 4), max(2, w // 4), generator=g)
    templates = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    g.manual_seed(seed * 2 + (0 if split == "train" else 1) + 1)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.tanh(1.5 * templates[y] + 0.5 * torch.randn(n, c, h, w, generator=g))
    return ArrayDataset(x.float(), y, k, f"stand_in_{name}")


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices with (as nearly as possible) the label proportions of ``labels``, sorted."""
    labels = np.asarray(_check_labels(labels))
    if not 0 < n <= len(labels):
        raise ValueError(f"subset size n={n} must be in 1..{len(labels)} (the dataset's size)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    classes = np.unique(labels)
    per_class = {c: perm[labels[perm] == c] for c in classes}
    quota = {c: int(math.floor(n * len(v) / len(labels))) for c, v in per_class.items()}
    rest = n - sum(quota.values())
    for c in sorted(classes, key=lambda c: -(n * len(per_class[c]) / len(labels) - quota[c]))[:rest]:
        quota[c] += 1
    return np.sort(np.concatenate([per_class[c][: quota[c]] for c in classes]))


# ---------------------------------------------------------------------------------------------
# Feature shift: domains built from one dataset by fixed transforms

# Each domain is a fixed, deterministic transform of images in [-1, 1] [N, C, H, W]. They stand in for the
# papers' multi-domain benchmarks (digits from MNIST / SVHN / USPS, Office-Caltech), which need downloads:
# the labels keep their meaning while the pixels' distribution moves, which is what "feature shift" means.
DOMAINS = ("original", "inverted", "rotated", "blurred", "low_contrast", "noisy")
DOMAIN_NOISE_SEED = 12345  # "noisy" adds the same noise every call, so a domain is a fixed function


def shift_domain(x: torch.Tensor, domain: str) -> torch.Tensor:
    """Images ``x`` [N, C, H, W] in [-1, 1] moved to ``domain`` (one of :data:`DOMAINS`), still in [-1, 1]."""
    check_choice("domain", domain, DOMAINS, "pick one of fedlib.data.DOMAINS")
    if x.dim() != 4:
        raise ValueError(f"shift_domain needs images [N, C, H, W]; got shape {tuple(x.shape)}")
    if domain == "original":
        return x.clone()
    if domain == "inverted":
        return -x
    if domain == "rotated":
        return torch.rot90(x, 1, dims=(2, 3)).contiguous()
    if domain == "blurred":
        # a 3x3 box blur that averages only the pixels inside the image, so borders keep their level
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if domain == "low_contrast":
        return 0.4 * x
    g = torch.Generator().manual_seed(DOMAIN_NOISE_SEED)
    noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    return (x + 0.5 * noise).clamp(-1, 1)


def domain_split(data: ArrayDataset, domains: Sequence[str], seed: int = 0) -> list[ArrayDataset]:
    """``data`` cut into ``len(domains)`` disjoint class-stratified parts of (nearly) equal size, part k moved
    to ``domains[k]`` by :func:`shift_domain`: one dataset per domain, the same label distribution in each."""
    if not domains:
        raise ValueError("domain_split needs at least one domain; pick from fedlib.data.DOMAINS")
    for d in domains:
        check_choice("domain", d, DOMAINS, "pick from fedlib.data.DOMAINS")
    labels = data.y.cpu().numpy()
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in domains]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in enumerate(np.array_split(idx, len(domains))):
            parts[k].extend(chunk.tolist())
    out = []
    for k, d in enumerate(domains):
        sub = data.subset(np.sort(np.asarray(parts[k], dtype=np.int64)))
        out.append(ArrayDataset(shift_domain(sub.x, d), sub.y, sub.n_classes, f"{data.name}:{d}"))
    return out


# ---------------------------------------------------------------------------------------------
# 2-D toy data

TOY_NAMES = ("grid", "ring", "moons", "swiss_roll", "checkerboard")


class GaussianMixture2D:
    """Isotropic 2-D Gaussian mixture with exact (log-)densities: for exact metrics and the
    oracle weighting (papers.md 1.1)."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float32)
        self.std = float(std)
        m = len(self.means)
        w = torch.full((m,), 1.0 / m) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.weights = w / w.sum()

    @property
    def n_components(self) -> int:
        return len(self.means)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` points and their component labels."""
        y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[y] + self.std * torch.randn(n, 2, generator=generator)
        return x, y

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; mu_m, std^2 I) for every component: [N, M] (without the mixture weight)."""
        x = x.to(self.means.device, torch.float32)
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        return -0.5 * d2 / self.std**2 - math.log(2 * math.pi * self.std**2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.component_log_prob(x) + self.weights.log()[None], dim=1)

    def score(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """grad_x log p(x) of the mixture convolved with N(0, sigma^2 I) (exact)."""
        var = self.std**2 + sigma**2
        d = x[:, None, :] - self.means[None]
        logw = self.weights.log()[None] - 0.5 * (d**2).sum(-1) / var
        r = torch.softmax(logw, dim=1)
        return -(r[..., None] * d).sum(1) / var


def mixture(name: str, **kw) -> GaussianMixture2D:
    """``grid``: n_side x n_side modes (default 5x5, spacing 1, std 0.05 x spacing...);
    ``ring``: n_modes on a circle (default 8, radius 2)."""
    check_choice("mixture", name, ("grid", "ring"), fix="Only 'grid' and 'ring' have exact densities.")
    if name == "grid":
        n_side, spacing = kw.get("n_side", 5), kw.get("spacing", 1.0)
        r = (torch.arange(n_side, dtype=torch.float32) - (n_side - 1) / 2) * spacing
        means = torch.cartesian_prod(r, r)
        return GaussianMixture2D(means, kw.get("std", 0.1 * spacing), kw.get("weights"))
    n_modes, radius = kw.get("n_modes", 8), kw.get("radius", 2.0)
    a = torch.arange(n_modes, dtype=torch.float32) * 2 * math.pi / n_modes
    means = radius * torch.stack([a.cos(), a.sin()], 1)
    return GaussianMixture2D(means, kw.get("std", 0.15), kw.get("weights"))


def toy_2d(name: str, n: int = 2000, seed: int = 0, **kw) -> ArrayDataset:
    """A 2-D toy dataset, each point labelled by its component (mixtures), moon, swiss-roll
    segment (4) or checkerboard cell (8). Mixture kwargs go to :func:`mixture`."""
    check_choice("toy dataset", name, TOY_NAMES)
    g = torch.Generator().manual_seed(seed)
    if name in ("grid", "ring"):
        gm = mixture(name, **kw)
        x, y = gm.sample(n, g)
        return ArrayDataset(x, y, gm.n_components, name)
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x, y = make_moons(n, noise=kw.get("noise", 0.08), random_state=seed)
        x = (x - np.array([0.5, 0.25])) * 1.5
        k = 2
    elif name == "swiss_roll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5.0 + kw.get("noise", 0.05) * rng.standard_normal((n, 2))
        k = 4
        y = np.minimum(((t - 1.5 * np.pi) / (3 * np.pi) * k).astype(int), k - 1)
    else:  # checkerboard: 8 black cells of a 4x4 board on [-2, 2]^2
        cell = rng.integers(0, 8, n)
        row = cell // 2
        col = 2 * (cell % 2) + (row % 2)
        x = np.stack([col + rng.random(n), row + rng.random(n)], 1) - 2.0
        y, k = cell, 8
    return ArrayDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long), k, name)


# ---------------------------------------------------------------------------------------------
# Partitions: lists of index arrays, reproducible from a seed

PARTITIONS = ("iid", "dirichlet", "shards")


def _check_clients(n_clients: int, n: int, min_size: int = 1) -> None:
    if not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients={n_clients!r} must be a positive integer")
    if n_clients * max(min_size, 1) > n:
        raise ValueError(
            f"n_clients={n_clients} clients with at least {max(min_size, 1)} samples each need "
            f"{n_clients * max(min_size, 1)} samples but only {n} are available; use at most "
            f"{n // max(min_size, 1)} clients (or a smaller min_size)"
        )


def _check_min_size(min_size) -> None:
    # >= 1, not >= 0: an empty client cannot train (fedlib.federated refuses it) nor be weighted (n_k > 0)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size={min_size!r}; allowed: an integer >= 1 (the fewest samples every client "
                         "must hold). Use min_size=1 for no constraint beyond non-empty clients")


def iid_partition(n: int, n_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``n_clients`` near-equal parts."""
    _check_clients(n_clients, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, n_clients)]


def dirichlet_partition(labels, n_clients: int, alpha: float, seed: int = 0, min_size: int = 2,
                        max_tries: int = 10_000) -> list[np.ndarray]:
    """Label skew (papers.md 1.4): every class c is split among the clients by proportions
    pi_c ~ Dirichlet(alpha * 1_K), redrawn until every client holds at least ``min_size`` samples."""
    labels = _check_class_indices(np.asarray(_check_labels(labels)))
    if not (isinstance(alpha, (int, float, np.floating)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0 (e.g. 0.05 strongly non-IID, 100 near IID)")
    _check_min_size(min_size)
    _check_clients(n_clients, len(labels), min_size)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            pi = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(pi)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} samples over {n_clients} clients gave every "
        f"client >= {min_size} samples in {max_tries} draws; use fewer clients, a larger alpha or a smaller min_size"
    )


def shard_partition(labels, n_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into n_clients * shards_per_client
    shards, give every client ``shards_per_client`` random shards."""
    labels = np.asarray(_check_labels(labels))
    n_shards = n_clients * shards_per_client
    _check_clients(n_shards, len(labels))
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n_shards)
    assign = rng.permutation(n_shards).reshape(n_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assign]


def partition(name: str, labels, n_clients: int, seed: int = 0, **kw) -> list[np.ndarray]:
    """Dispatch by name: "iid", "dirichlet" (needs ``alpha``), "shards"."""
    check_choice("partition", name, PARTITIONS)
    _check_labels(labels)  # "iid" only counts them, but a [N, C] array is still the wrong input
    if name == "iid":
        return iid_partition(len(labels), n_clients, seed)
    if name == "dirichlet":
        if "alpha" not in kw:
            raise ValueError("partition 'dirichlet' needs alpha=... (e.g. 0.1)")
        return dirichlet_partition(labels, n_clients, seed=seed, **kw)
    return shard_partition(labels, n_clients, seed=seed, **kw)


def fedgo_split(labels, n_clients: int, alpha: float, seed: int = 0, server_fraction: float = 0.5,
                min_size: int = 2) -> tuple[list[np.ndarray], np.ndarray]:
    """FedGO's setup (papers.md 1.2): ``server_fraction`` of every class goes, unlabeled, to the
    server; the rest is split over the clients by Dirichlet(alpha). Returns (client index arrays,
    server indices), all indices into ``labels``."""
    labels = _check_class_indices(np.asarray(_check_labels(labels)))
    _check_min_size(min_size)
    if not 0.0 < server_fraction < 1.0:
        raise ValueError(f"server_fraction={server_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    server, pool = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        m = int(round(server_fraction * len(idx)))
        server.append(idx[:m])
        pool.append(idx[m:])
    pool_idx = np.sort(np.concatenate(pool))
    parts = dirichlet_partition(labels[pool_idx], n_clients, alpha, seed=seed + 1, min_size=min_size)
    return [pool_idx[p] for p in parts], np.sort(np.concatenate(server))


def label_distribution(labels, parts: Sequence[np.ndarray], n_classes: int | None = None) -> np.ndarray:
    """[K, C] counts of every class on every client (for the heatmaps)."""
    labels = np.asarray(_check_labels(labels))
    n_classes = n_classes or int(labels.max()) + 1
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
