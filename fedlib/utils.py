"""Small shared helpers: seeding, devices, the cache directory, and helpful errors."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("auto", "cpu", "cuda")


def check_choice(name: str, value, allowed: Iterable, fix: str | None = None):
    """Return ``value`` if it is one of ``allowed``; else raise a ValueError that names the bad
    value, every allowed value and what to do instead (the project's error convention)."""
    allowed = list(allowed)
    if value in allowed:
        return value
    msg = f"unknown {name} {value!r}; allowed: {', '.join(repr(a) for a in allowed)}"
    if fix:
        msg += f". {fix}"
    raise ValueError(msg)


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) and return a torch.Generator seeded the same.

    With ``deterministic`` the algorithms PyTorch has deterministic versions of are selected
    (``warn_only`` so that ops without one still run, e.g. some CUDA scatter kernels).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``; ``"cuda"`` (errors if absent)."""
    if isinstance(device, torch.device):
        return device
    base = str(device).split(":")[0]
    check_choice("device", base, DEVICES, fix="Pass device='auto' to use a GPU when one is present.")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was requested but torch.cuda.is_available() is False on this machine; "
            "use device='auto' or 'cpu'."
        )
    return torch.device(device)


def cache_dir(*parts: str) -> Path:
    """fedlib's cache (trained teachers, feature extractors, unpacked datasets):
    ``$FEDLIB_CACHE`` or ``~/.cache/fedlib``. Never inside the source tree."""
    root = Path(os.environ.get("FEDLIB_CACHE", Path.home() / ".cache" / "fedlib")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: a
    kill, a full disk or an unwritable folder never leaves a partial file (the old one stays whole)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
