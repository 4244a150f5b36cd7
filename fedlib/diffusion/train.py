"""Training loop with EMA and checkpoints, and cached pretrained teachers.

``train_diffusion(denoiser, data, steps, ...)`` trains ``denoiser.net`` on :func:`diffusion_loss`
with Adam, keeps an EMA copy, shows a tqdm bar, and (optionally) writes a checkpoint with
``torch.save`` of plain state dicts (atomically: a kill mid-write never leaves a truncated file), read
back with ``torch.load(weights_only=True)``.

``pretrained_teacher(dataset, steps, seed, device)`` builds fedlib's standard teacher for
``"digits"`` (EDM-preconditioned small U-Net on 8x8 digits), ``"fashion_mnist"`` (28x28) or a 2-D
mixture (``"grid"``, ``"ring"``: MLP, EDM), trains it once and caches the EMA weights under
``fedlib.utils.cache_dir("teachers")``; later calls (LD3 notebook 03, DMD2 notebook 04) load it. A
cache file that cannot be loaded is reported once, removed and retrained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..utils import atomic_torch_save, cache_dir, check_choice, load_or_build, resolve_device, seed_everything
from .denoiser import Denoiser, diffusion_loss, draw_noise_and_time, frozen
from .networks import MLPDenoiser, UNet
from .process import EDM


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)


def _as_tensor(data) -> torch.Tensor:
    return data.x if hasattr(data, "x") else torch.as_tensor(data)


def train_diffusion(denoiser: Denoiser, data, steps: int = 1000, batch_size: int = 128, lr: float = 2e-3,
                    ema_decay: float = 0.999, seed: int = 0, device="auto", warmup: int = 100,
                    checkpoint: str | Path | None = None, progress: bool = True, log_every: int = 50):
    """Train ``denoiser`` in place; returns ``(ema_denoiser, history)``.

    ``data``: an ArrayDataset or a tensor [N, ...]. ``history``: dict of lists ``step``, ``loss``
    (running mean over ``log_every`` steps) and ``wall_time_s``.
    """
    device = resolve_device(device)
    g = seed_everything(seed)
    x = _as_tensor(data).to(device)
    denoiser.to(device).train()
    ema = copy.deepcopy(denoiser).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(denoiser.net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    history = {"step": [], "loss": [], "wall_time_s": 0.0}
    t0, running = time.perf_counter(), []
    bar = tqdm(range(steps), desc=f"train {denoiser.process.name}", disable=not progress, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=g).to(device)
        x0 = x[idx]
        eps, t = draw_noise_and_time(denoiser.process, x0, g)
        loss = diffusion_loss(denoiser, x0, eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, denoiser, min(ema_decay, (1 + step) / (10 + step)))
        running.append(loss.detach())
        if (step + 1) % log_every == 0 or step == steps - 1:
            history["step"].append(step + 1)
            history["loss"].append(float(torch.stack(running).mean()))
            running = []
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    history["wall_time_s"] = time.perf_counter() - t0
    if checkpoint is not None:
        save_checkpoint(checkpoint, denoiser, ema, history)
    return ema, history


def save_checkpoint(path: str | Path, denoiser: Denoiser, ema: Denoiser | None = None, history=None) -> Path:
    return atomic_torch_save({"net": denoiser.net.state_dict(),
                              "ema": None if ema is None else ema.net.state_dict(),
                              "history": json.dumps(history or {})}, path)


def load_checkpoint(path: str | Path, denoiser: Denoiser, use_ema: bool = True, map_location="cpu"):
    """Load weights saved by :func:`save_checkpoint` into ``denoiser.net`` (weights_only=True);
    returns the training history."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    denoiser.net.load_state_dict(state["ema"] if use_ema and state["ema"] is not None else state["net"])
    return json.loads(state["history"])


# ---------------------------------------------------------------------------------------------
# Standard teachers, shared by notebooks 03 (LD3) and 04 (DMD2)

TEACHERS = ("digits", "fashion_mnist", "cifar10", "grid", "ring")


def teacher_config(dataset: str) -> dict:
    """Architecture and training defaults of fedlib's teacher for ``dataset`` (our choices)."""
    check_choice("teacher dataset", dataset, TEACHERS)
    if dataset == "digits":
        return dict(net="unet", channels=16, channel_mults=(1, 2), blocks=1, batch_size=128, lr=3e-3, ema_decay=0.995)
    if dataset == "fashion_mnist":
        return dict(net="unet", channels=32, channel_mults=(1, 2, 2), blocks=1, batch_size=64, lr=1e-3, ema_decay=0.999)
    if dataset == "cifar10":  # a small EDM-style U-Net (the paper uses EDM's 56M-parameter DDPM++)
        return dict(net="unet", channels=64, channel_mults=(1, 2, 2, 2), blocks=2, attention=True, batch_size=128,
                    lr=2e-4, ema_decay=0.9999)
    return dict(net="mlp", hidden=128, depth=3, batch_size=256, lr=3e-3, ema_decay=0.995, n=4000)


def make_teacher(dataset: str, in_channels: int | None = None, **overrides) -> Denoiser:
    """An untrained teacher denoiser (EDM process, EDM preconditioning)."""
    cfg = {**teacher_config(dataset), **overrides}
    if cfg["net"] == "unet":
        c = in_channels or (3 if dataset == "cifar10" else 1)
        net = UNet(c, cfg["channels"], tuple(cfg["channel_mults"]), cfg["blocks"], cfg.get("attention", False))
    else:
        net = MLPDenoiser(2, cfg["hidden"], cfg["depth"])
    return Denoiser(net, EDM(), "edm")


def teacher_data(dataset: str, seed: int = 0):
    from .. import data as fdata

    if dataset == "digits":
        return fdata.load_digits("train")
    if dataset in ("fashion_mnist", "cifar10"):
        return fdata.load_dataset(dataset, "train")
    return fdata.toy_2d(dataset, n=teacher_config(dataset)["n"], seed=seed)


def pretrained_teacher(dataset: str = "digits", steps: int = 2000, seed: int = 0, device="auto",
                       data=None, progress: bool = True, **overrides) -> Denoiser:
    """fedlib's teacher for ``dataset``, trained for ``steps`` with ``seed`` or loaded from the cache.

    Returns the frozen EMA denoiser (eval mode, no grads) on ``device`` with attributes
    ``history`` (training loss curve and wall time; ``cached=True`` when loaded) and
    ``cache_path``. ``data`` overrides the training data (e.g. a ``stand_in`` set); it is part of the
    cache key through its name, shape and a checksum.
    """
    device = resolve_device(device)
    cfg = {**teacher_config(dataset), **overrides}
    train = teacher_data(dataset, seed) if data is None else data
    x = _as_tensor(train)
    digest = hashlib.sha1(x.detach().cpu().float().numpy().tobytes()).hexdigest()[:10]
    # bump "version" whenever the training code changes what a key produces (2: seeded initial weights),
    # so that a cache written by older code is never silently reused
    key = json.dumps({"dataset": dataset, "steps": steps, "seed": seed, "cfg": cfg, "data": digest,
                      "version": 2}, sort_keys=True)
    path = cache_dir("teachers") / f"{dataset}-{steps}-{seed}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"

    def untrained():
        seed_everything(seed)  # the initial weights are part of what the seed (and the cache key) fixes
        return make_teacher(dataset, in_channels=x.shape[1] if x.ndim == 4 else None, **overrides)

    def load(p):
        den = untrained()
        return den, load_checkpoint(p, den)

    def build():
        denoiser = untrained()  # not load()'s model: a failed load may have filled it half-way
        ema, history = train_diffusion(denoiser, x, steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                       ema_decay=cfg["ema_decay"], seed=seed, device=device, progress=progress)
        denoiser.net.load_state_dict(ema.net.state_dict())
        save_checkpoint(path, denoiser, ema, history)
        return denoiser, history

    (denoiser, history), was_cached = load_or_build(path, load, build)
    history["cached"] = was_cached
    teacher = frozen(denoiser).to(device)
    teacher.history, teacher.cache_path = history, path
    return teacher
