"""Small shared helpers: seeding, devices, the cache directory, crash-safe cache files, and helpful
errors.

Cache files (trained teachers, feature classifiers, learned schedules, checkpoints) are written with
:func:`atomic_write` / :func:`atomic_torch_save`, so a kill or a full disk mid-write leaves the old
file (or none), never a truncated one; and read with :func:`load_cache_entry`, which turns an entry
that cannot be loaded into one warning and a rebuild instead of an error on every later run.
:func:`load_or_build` adds a lock per entry, so that notebooks run at once (``reproduce --jobs``)
build a shared entry (a teacher, a feature classifier) once: the second waits and loads it.
"""

from __future__ import annotations

import numbers
import os
import random
import secrets
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

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


def check_number(name: str, value, *, at_least=None, above=None, below=None, at_most=None, integer: bool = False,
                 fix: str | None = None):
    """Return ``value`` if it is a number within the bounds given (``at_least`` <= value, ``above`` < value,
    value < ``below``, value <= ``at_most``; an integer where asked); else a ValueError naming the value, the
    allowed range and the fix (the configs' one check, so that every field is refused the same way)."""
    bounds = [(">=", at_least, lambda b: value >= b), (">", above, lambda b: value > b),
              ("<", below, lambda b: value < b), ("<=", at_most, lambda b: value <= b)]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # NaN fails here
    ok = ok and (not integer or float(value).is_integer()) and all(test(b) for _, b, test in bounds if b is not None)
    if ok:
        return value
    kind = "an integer" if integer else "a number"
    msg = f"{name}={value!r}; allowed: {' '.join([kind, ' and '.join(f'{op} {b}' for op, b, _ in bounds if b is not None)])}"
    if fix:
        msg += f". {fix}"
    raise ValueError(msg)


def build_config(cls, config, fields: dict, caller: str):
    """``config``, or one of class ``cls`` made of ``fields`` (a call written with keywords); not both.
    The one way a function that takes a config also takes its fields as keywords."""
    if config is not None and fields:
        raise ValueError(f"{caller} got a config and the settings {sorted(fields)}; pass one of them "
                         "(dataclasses.replace(config, ...) changes a config)")
    return config if config is not None else cls(**fields)


def positive_counts(n_k, name: str = "n_k", fix: str = "Drop empty clients first.") -> torch.Tensor:
    """``n_k`` (per-client sample counts) as a flat float64 tensor; a ValueError naming the first bad
    entries unless every entry is finite and > 0 (NaN compares False, so ``(n_k <= 0).any()`` alone
    lets it through, into NaN weights)."""
    n = torch.as_tensor(n_k, dtype=torch.float64).reshape(-1)
    bad = ~torch.isfinite(n) | (n <= 0)
    if bad.any():
        idx = torch.nonzero(bad).flatten()
        shown = ", ".join(f"{name}[{i}]={float(n[i])!r}" for i in idx[:4].tolist())
        raise ValueError(f"{shown} ({len(idx)} of {len(n)} entries bad); allowed: finite counts, each must be > 0. "
                         f"{fix}")
    return n


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


class CacheWarning(UserWarning):
    """A cache entry could not be loaded; it was removed and is being rebuilt."""


def atomic_write(path: str | Path, data: bytes | str | Callable) -> Path:
    """Write ``data`` to ``path`` so that readers only ever see the old file or the complete new one.

    ``data``: bytes, str (UTF-8), or a callable ``writer(binary_file)``. It goes to a hidden temporary
    file in the same folder (``os.replace`` is atomic only within one file system), is flushed and
    fsynced, then renamed over ``path``. On any failure (an exception in the writer, ENOSPC, Ctrl-C)
    the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name opened with "x" (not mkstemp): the file gets the usual umask permissions, not 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_cache_entry(path: str | Path, loader: Callable[[Path], object]):
    """``loader(path)``, or None when there is nothing usable to load.

    None when ``path`` does not exist. When it exists but ``loader`` raises (a truncated or corrupt
    file, keys or shapes written by other code), one :class:`CacheWarning` names the path and the
    reason, the file is removed and None is returned, so the caller rebuilds the entry instead of
    failing on every run until someone deletes the file by hand. ``loader`` should build what it
    loads into from scratch: a failed ``load_state_dict`` may have filled a model half-way.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return loader(path)
    except Exception as err:  # noqa: BLE001 - whatever the reason, the entry is unusable; say which
        # one line (state-dict errors span several); a truncated file often raises a bare EOFError
        reason = " ".join(f"{type(err).__name__}: {err}".split()).rstrip(": ")
        if len(reason) > 300:
            reason = reason[:297] + "..."
        try:
            size = f"{path.stat().st_size} bytes"
            path.unlink(missing_ok=True)
            action = "removed it; rebuilding"
        except OSError as rm_err:
            size, action = "size unknown", f"could not remove it ({rm_err}); rebuilding, delete it by hand"
        warnings.warn(f"cache entry {path} ({size}) could not be loaded ({reason}); {action}", CacheWarning,
                      stacklevel=2)
        return None


# how long a process waits for another to finish building a cache entry before it builds its own copy
# (longer than any stage fedlib caches at paper scale on a CPU; a waiting cell's own time limit may
# end the wait sooner)
CACHE_LOCK_TIMEOUT_S = float(os.environ.get("FEDLIB_CACHE_LOCK_TIMEOUT", 4 * 3600))


@contextmanager
def entry_lock(path: str | Path, timeout_s: float | None = None, poll_s: float = 0.5):
    """Hold an exclusive lock on the cache entry ``path`` (``flock`` on a ``.lock`` file beside it)
    for as long as the block runs. The lock dies with its holder (a kill leaves no stale lock). The
    wait is bounded: after ``timeout_s`` one :class:`CacheWarning` says so and the block runs without
    the lock (atomic writes keep two builders of one entry safe, only slower)."""
    import fcntl

    path = Path(path)
    timeout_s = CACHE_LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    held, deadline = False, time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except OSError:
                if time.monotonic() >= deadline:
                    warnings.warn(f"cache entry {path} has been being built by another process for over "
                                  f"{timeout_s:.0f} s; building it here too (FEDLIB_CACHE_LOCK_TIMEOUT sets "
                                  "the wait)", CacheWarning, stacklevel=3)
                    break
                time.sleep(poll_s)
        yield held
    finally:
        if held:
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextmanager
def preserved_random_state():
    """Python's, NumPy's and torch's (CPU) global random states as they were before the block. A cache
    entry is loaded or built inside it, so the caller's later draws are the same whether the entry was
    in the cache or not: otherwise a notebook's numbers would depend on what another notebook (run at
    once, sharing the cache) happened to build first."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def load_or_build(path: str | Path, loader: Callable[[Path], object], build: Callable[[], object]):
    """``(value, was_cached)``: ``loader(path)`` when the entry is there and loads (see
    :func:`load_cache_entry`), else ``build()``, which must save the entry at ``path`` atomically and
    return the value. The build runs under :func:`entry_lock`; an entry that appeared while this process
    waited for the lock (another notebook built it) is loaded, not built again. Either way the caller's
    global random state is left as it was (:func:`preserved_random_state`): loaders and builders seed
    what they make themselves."""
    with preserved_random_state():
        hit = load_cache_entry(path, loader)
        if hit is not None:
            return hit, True
        with entry_lock(path):
            hit = load_cache_entry(path, loader)
            if hit is not None:
                return hit, True
            return build(), False
