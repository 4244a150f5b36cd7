"""Sample-quality metrics that work offline (papers.md section 6).

- :func:`frechet_distance` - Frechet distance between Gaussians fitted to two feature sets, in
  float64, with the matrix square root taken from symmetric eigendecompositions
  (tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), clamped at 0), so it never goes complex.
- :func:`feature_extractor` - a small CNN classifier fedlib trains once per dataset (any
  :class:`~fedlib.data.ArrayDataset` of images: digits 8x8, Fashion-MNIST 28x28, ...) with a fixed
  seed and caches under ``cache_dir("metrics")`` (an unreadable cache file is reported and
  retrained); ``.features(x)`` gives its penultimate layer,
  ``.test_accuracy`` how good it is. Frechet distances in this space are NOT comparable to
  published (Inception) FID; every table must say so.
- :func:`classifier_fd` - Frechet distance of two image sets in that feature space.
- :func:`sliced_wasserstein` - sliced 2-Wasserstein distance between point clouds.
- :func:`mixture_log_likelihood`, :func:`mode_coverage` - exact 2-D metrics against a known
  :class:`~fedlib.data.GaussianMixture2D`.
- :func:`inception_fid` - the real Inception FID via torchmetrics for users who have the weights;
  a clear error (never a hang on a download) when they are absent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .utils import atomic_torch_save, cache_dir, load_or_build, resolve_device

# ---------------------------------------------------------------------------------------------
# Frechet distance


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.detach().double().reshape(len(features), -1)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), float64."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def frechet_distance_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


# ---------------------------------------------------------------------------------------------
# fedlib's classifier feature space


class FeatureNet(nn.Module):
    """conv(w)-GN-SiLU-conv(2w, /2)-GN-SiLU-conv(4w, /2)-GN-SiLU-avgpool -> features [4w] -> logits."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(4, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(4, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)
        self.test_accuracy = float("nan")
        self.n_features = 4 * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _digest(ds) -> str:
    h = hashlib.sha1()
    h.update(ds.x.detach().cpu().float().numpy().tobytes()[: 1 << 22])
    h.update(str((tuple(ds.x.shape), ds.n_classes)).encode())
    return h.hexdigest()[:12]


def feature_extractor(train, test=None, steps: int = 600, batch_size: int = 128, lr: float = 3e-3,
                      width: int = 16, seed: int = 0, device="auto", augment: bool = True) -> FeatureNet:
    """fedlib's classifier for the image dataset ``train`` (an ArrayDataset), trained once with
    ``seed`` and cached under ``cache_dir("metrics")`` (key: data checksum, shape, settings);
    ``test_accuracy`` is measured on ``test`` (when given). Returned frozen, in eval mode."""
    device = resolve_device(device)
    # v: bumped whenever the training code changes what a key produces (2: seeded initial weights)
    key = json.dumps(dict(data=_digest(train), test=None if test is None else _digest(test), steps=steps,
                          bs=batch_size, lr=lr, width=width, seed=seed, augment=augment, v=2), sort_keys=True)
    path = cache_dir("metrics") / f"features-{train.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"

    def untrained():
        torch.manual_seed(seed)  # initial weights too: the feature space is fixed by the seed
        return FeatureNet(train.x.shape[1], train.n_classes, width)

    def load(p):
        state = torch.load(p, map_location="cpu", weights_only=True)
        cached = untrained()
        cached.load_state_dict(state["net"])
        cached.test_accuracy = float(state["test_accuracy"])
        return cached

    def build():
        net = untrained()  # not load()'s model: a failed load may have filled it half-way
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y = train.x.to(device), train.y.to(device)
        net.to(device).train()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=g).to(device)
            xb = x[idx]
            if augment:  # small random shifts (1 pixel per 8) so features are not brittle
                s = max(1, x.shape[-1] // 8)
                dx, dy = (torch.randint(-s, s + 1, (2,), generator=g)).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        if test is not None:
            net.test_accuracy = classifier_accuracy(net, test)
        atomic_torch_save({"net": {k: v.cpu() for k, v in net.state_dict().items()},
                           "test_accuracy": torch.tensor(net.test_accuracy)}, path)
        return net

    net, _ = load_or_build(path, load, build)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.cache_path = path
    return net


@torch.no_grad()
def classifier_accuracy(net: nn.Module, data, batch_size: int = 1024) -> float:
    dev = next(net.parameters()).device
    correct = 0
    for i in range(0, len(data), batch_size):
        correct += int((net(data.x[i:i + batch_size].to(dev)).argmax(1).cpu() == data.y[i:i + batch_size].cpu()).sum())
    return correct / len(data)


@torch.no_grad()
def extract_features(net: FeatureNet, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    dev = next(net.parameters()).device
    return torch.cat([net.features(x[i:i + batch_size].to(dev).float()).cpu() for i in range(0, len(x), batch_size)])


def classifier_fd(net: FeatureNet, x: torch.Tensor, reference) -> float:
    """Frechet distance in ``net``'s feature space between images ``x`` and ``reference`` (images, or
    precomputed ``(mu, sigma)``). Not comparable to published FID."""
    if isinstance(reference, tuple):
        mu2, s2 = reference
    else:
        mu2, s2 = gaussian_stats(extract_features(net, reference))
    return frechet_distance(*gaussian_stats(extract_features(net, x.clamp(-1, 1))), mu2, s2)


# ---------------------------------------------------------------------------------------------
# 2-D exact metrics


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (sqrt of the mean over random directions of W2^2 of the 1-D
    projections); unequal sizes are compared through matched quantiles."""
    x, y = x.detach().double().flatten(1).cpu(), y.detach().double().flatten(1).cpu()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    if len(px) != len(py):
        q = torch.linspace(0, 1, max(len(px), len(py)), dtype=torch.float64)
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mixture_log_likelihood(mixture, x: torch.Tensor) -> float:
    """Mean exact log-density of the true mixture at generated points (higher = on the modes)."""
    return float(mixture.log_prob(x.detach().cpu()).mean())


def mode_coverage(mixture, x: torch.Tensor, n_std: float = 3.0, min_fraction: float = 0.2) -> dict:
    """``covered``: fraction of modes holding at least ``min_fraction`` x their expected share of
    the points; ``high_quality``: fraction of points within ``n_std`` std of their nearest mode."""
    x = x.detach().cpu().float()
    d = torch.cdist(x, mixture.means)
    dmin, nearest = d.min(1)
    good = dmin <= n_std * mixture.std
    counts = torch.bincount(nearest[good], minlength=mixture.n_components).float()
    expected = mixture.weights * len(x)
    return {"covered": float((counts >= min_fraction * expected).float().mean()),
            "high_quality": float(good.float().mean())}


# ---------------------------------------------------------------------------------------------
# Inception FID (users with the weights)

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def inception_fid(x: torch.Tensor, reference: torch.Tensor, device="auto", feature: int = 2048) -> float:
    """The published FID (torchmetrics / torch-fidelity Inception-v3). Images in [-1, 1]. Raises
    FileNotFoundError at once when the weights are not on disk (nothing is downloaded)."""
    path = inception_weights_path()
    if not path.exists():
        raise FileNotFoundError(
            f"Inception-FID needs {INCEPTION_WEIGHTS} in {path.parent} (torch-fidelity's FID Inception "
            "weights); this machine has none and fedlib never downloads at run time. Use "
            "fedlib.metrics.classifier_fd (not comparable to published FID) or copy the file there.")
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = resolve_device(device)
    fid = FrechetInceptionDistance(feature=feature, normalize=True).to(device)
    for imgs, real in ((reference, True), (x, False)):
        for i in range(0, len(imgs), 256):
            b = ((imgs[i:i + 256].to(device).clamp(-1, 1) + 1) / 2)
            fid.update(b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b, real=real)
    return float(fid.compute())


def label_tv(counts) -> float:
    """Mean over clients of the total-variation distance between a client's label mix and the global
    one, from label counts [K, C] (0: IID; 1: clients with disjoint classes)."""
    counts = np.asarray(counts, dtype=float)
    local = counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)
    glob = counts.sum(0) / counts.sum()
    return float(0.5 * np.abs(local - glob).sum(1).mean())
