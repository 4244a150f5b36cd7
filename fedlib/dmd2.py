"""DMD2: distribution matching distillation into a one- or few-step generator (papers.md section 5).

Three denoisers share one architecture and one process (:class:`fedlib.diffusion.denoiser.Denoiser`,
``D(x_t, t) -> x0_hat``): the frozen **teacher** (the "real score"), the **generator** G (initialised from
the teacher; one step maps pure noise x_T at t_max to a sample) and the **fake score** (initialised from
the teacher; keeps learning the distribution of G's current samples). Symbols follow the paper:

- generator loss (:func:`distribution_matching_loss`): x = G(z); t in the middle 2%..98% of the noise
  range (:func:`sample_dm_times`); x_t = alpha_t x + sigma_t eps; ``x_real`` = teacher(x_t),
  ``x_fake`` = fake_score(x_t); per-sample normaliser w = mean|x - x_real|; g = (x_fake - x_real) / w;
  loss 0.5 ||x - stopgrad(x - g)||^2, whose gradient with respect to x is g;
- fake-score loss (:func:`fake_score_loss`): the ordinary :func:`~fedlib.diffusion.denoiser.diffusion_loss`
  on *detached* G samples over the whole noise range;
- two time-scale update rule (:func:`ttur_schedule`): ``ratio`` fake-score updates per generator update;
- GAN term (:class:`GANHead`, :func:`gan_critic_loss`, :func:`gan_generator_loss`): a small classifier on
  the fake score's bottleneck features tells noised real data from noised G samples; non-saturating
  logistic losses;
- multi-step generator over fixed times (:func:`student_times`, :func:`sample_student`) trained with
  backward simulation (:func:`generator_input`);
- DMD1's regression loss (:func:`regression_loss`) on pairs (x_T, teacher ODE sample) as an ablation.

:func:`train_dmd2` puts them together (AdamW, gradient clipping, checkpoints, a progress bar logging every
loss, a divergence guard that stops on a non-finite loss and keeps the last good checkpoint).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion.denoiser import Denoiser, diffusion_loss, frozen
from .diffusion.process import EDM, Process, _bcast
from .diffusion.samplers import check_grid
from .diffusion.schedules import karras_sigmas
from .utils import atomic_torch_save, check_choice

DM_RANGE = (0.02, 0.98)  # the middle of the noise range the generator loss draws t from (DMD2 sec. 4)


# ---------------------------------------------------------------------------------------------
# Times


def t_from_noise_fraction(process: Process, u: torch.Tensor) -> torch.Tensor:
    """Map a noise fraction ``u`` in [0, 1] (0: the least noise, t_min; 1: the most, t_max) to the
    process's time. VP: linear in t (the DDPM step index / N); EDM: Karras' rho = 7 interpolation
    between sigma_min and sigma_max, the grid DMD2 discretises EDM teachers on."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if isinstance(process, EDM):
        return karras_sigmas(1 - u, process.t_min, process.t_max)
    if getattr(process, "discrete", False):  # land on the DDPM grid t = (n+1)/N, n = 0..N-1
        n = process.n_steps
        return torch.clamp(torch.round(u * n), 1, n) / n
    return process.t_min + u * (process.t_max - process.t_min)


def sample_dm_times(process: Process, n: int, dm_range: tuple[float, float] = DM_RANGE,
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[n] times for the distribution-matching loss, uniform in noise fraction over ``dm_range``
    (the paper's 2%..98%: the extremes carry no useful score difference)."""
    lo, hi = dm_range
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"dm_range={dm_range!r} must satisfy 0 <= lo < hi <= 1 (fractions of the noise range)")
    u = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return t_from_noise_fraction(process, u).float().to(device)


def student_times(process: Process, n_steps: int) -> torch.Tensor:
    """The fixed, decreasing input times of an ``n_steps`` generator: noise fractions
    1, (n-1)/n, ..., 1/n (DMD2's 4-step ImageNet student uses DDPM steps 999, 749, 499, 249)."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be >= 1 (1 = the one-step generator)")
    u = torch.arange(n_steps, 0, -1, dtype=torch.float64) / n_steps
    return t_from_noise_fraction(process, u).float()


# ---------------------------------------------------------------------------------------------
# Losses


def distribution_matching_loss(x: torch.Tensor, teacher: Denoiser, fake_score: Denoiser, t: torch.Tensor,
                               eps: torch.Tensor, reduction: str = "mean", return_direction: bool = False):
    """DMD's generator loss on generator samples ``x`` (with grad) at times ``t`` [B] and noise ``eps``.

    ``reduction="sum"``: 0.5 ||x - sg(x - g)||^2 summed, so d loss / d x = g exactly;
    ``"mean"`` (default, the scale DMD2's GAN weights are set against): the same averaged over every
    element, so d loss / d x = g / x.numel(). With ``return_direction`` also returns (g, w).
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    process = teacher.process
    with torch.no_grad():
        x_t = process.add_noise(x.detach(), eps, t)
        x_real = teacher(x_t, t)
        x_fake = fake_score(x_t, t)
        # per-sample normaliser: mean over the sample's own elements (not the batch)
        w = (x.detach() - x_real).abs().flatten(1).mean(1).clamp_min(1e-8)
        g = (x_fake - x_real) / _bcast(w, x)
    target = (x - g).detach()
    sq = (x - target) ** 2
    loss = 0.5 * (sq.sum() if reduction == "sum" else sq.mean())
    return (loss, g, w) if return_direction else loss


def fake_score_loss(fake_score: Denoiser, x_fake: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The fake score's ordinary denoising loss on *detached* generator samples (times from the
    process's full training distribution): it tracks the generator, never pushes it."""
    return diffusion_loss(fake_score, x_fake.detach(), eps, t)


def regression_loss(x: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """DMD1's regression term: G(x_T) against the teacher's ODE sample from the same x_T (DMD1 used
    LPIPS on images; we use the mean squared error, which also works on 2-D points)."""
    return ((x - x_ref) ** 2).flatten(1).sum(1).mean()


class GANHead(nn.Module):
    """Real-vs-fake logit from the fake score's bottleneck features: [B, C, h, w] (U-Net) or [B, C] (MLP)."""

    def __init__(self, feature_channels: int, hidden: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.GroupNorm(1, feature_channels), nn.SiLU(),
                                  nn.Conv2d(feature_channels, hidden, 3, padding=1), nn.SiLU())
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(feature_channels, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.conv(features).mean((2, 3)) if features.ndim == 4 else self.mlp(features)
        return self.out(h).squeeze(-1)


def _gan_logits(head: GANHead, fake_score: Denoiser, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    x_t = fake_score.process.add_noise(x, eps, t)
    _, feats = fake_score.features(x_t, t)
    return head(feats)


def gan_critic_loss(head: GANHead, fake_score: Denoiser, x_real: torch.Tensor, x_fake: torch.Tensor,
                    t_real: torch.Tensor, t_fake: torch.Tensor, eps_real: torch.Tensor,
                    eps_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic critic loss softplus(-D(real_t)) + softplus(D(fake_t)) on noised inputs;
    trains the head and the fake score's trunk (the generator's samples are detached)."""
    real = _gan_logits(head, fake_score, x_real, t_real, eps_real)
    fake = _gan_logits(head, fake_score, x_fake.detach(), t_fake, eps_fake)
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def gan_generator_loss(head: GANHead, fake_score: Denoiser, x_fake: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(fake_t)); gradients flow into x_fake only (the
    caller steps the generator's optimiser alone)."""
    return F.softplus(-_gan_logits(head, fake_score, x_fake, t, eps)).mean()


# ---------------------------------------------------------------------------------------------
# Update rule, generator inputs, sampling


def ttur_schedule(n_generator_updates: int, ratio: int = 5) -> list[str]:
    """The two time-scale update rule as a flat list of updates: ``ratio`` x "fake" then one
    "generator", repeated. ``ratio=1`` alternates (DMD1's rhythm)."""
    if ratio < 1 or int(ratio) != ratio:
        raise ValueError(f"ttur_ratio={ratio!r} must be a positive integer (fake-score updates per generator update)")
    return (["fake"] * int(ratio) + ["generator"]) * int(n_generator_updates)


def _step_input(process: Process, x0: torch.Tensor, t_next: torch.Tensor, noise_generator=None) -> torch.Tensor:
    eps = torch.randn(x0.shape, generator=noise_generator).to(x0.device, x0.dtype)
    return process.add_noise(x0, eps, t_next.to(x0.device).expand(x0.shape[0]))


def sample_student(generator: Denoiser, x_T: torch.Tensor, times: torch.Tensor, noise_generator=None):
    """Run the few-step generator: x0 = G(x_{t_i}, t_i), re-noised with fresh noise to t_{i+1}.
    Same signature as the diffusion samplers: returns (x0, nfe) with nfe = len(times)."""
    times = check_grid(times, device=x_T.device, min_points=1)[0]  # a NaN or negative t gives NaN samples
    x = x_T
    for i in range(len(times)):
        x0 = generator(x, times[i].expand(x.shape[0]))
        if i + 1 < len(times):
            x = _step_input(generator.process, x0, times[i + 1], noise_generator)
    return x0, len(times)


@torch.no_grad()
def backward_simulation(generator: Denoiser, times: torch.Tensor, k: int, x_T: torch.Tensor,
                        noise_generator=None) -> torch.Tensor:
    """The generator's own input at step ``k``: run it from pure noise for k steps without gradient
    and re-noise the result to t_k (k = 0 returns x_T). Training then sees what inference sees."""
    x = x_T
    for i in range(k):
        x0 = generator(x, times[i].to(x.device).expand(x.shape[0]))
        x = _step_input(generator.process, x0, times[i + 1], noise_generator)
    return x


def generator_input(generator: Denoiser, times: torch.Tensor, k: int, x_T: torch.Tensor, x_real: torch.Tensor,
                    backward: bool = True, noise_generator=None) -> torch.Tensor:
    """Input of step ``k`` during training: pure noise at k = 0; for k > 0 either backward simulation
    (``backward=True``) or, as without it, real data noised to t_k (the train/inference mismatch)."""
    if k == 0:
        return x_T
    if backward:
        return backward_simulation(generator, times, k, x_T, noise_generator)
    return _step_input(generator.process, x_real, times[k], noise_generator)


# ---------------------------------------------------------------------------------------------
# Training


class DivergenceError(RuntimeError):
    """A DMD2 loss became non-finite; the last good checkpoint is kept."""


@dataclass
class DMD2Config:
    """Everything :func:`train_dmd2` needs besides the networks and the data (DMD2 defaults in comments)."""

    steps: int = 500  # generator updates
    ttur_ratio: int = 5  # fake-score updates per generator update (paper: 5)
    batch_size: int = 128
    lr: float = 2e-4  # equal for G and the fake score (paper: 2e-6 / 5e-7 for its large nets)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    dm_range: tuple[float, float] = DM_RANGE
    gan_critic_weight: float = 1e-2  # paper: about 1e-2; 0 disables the GAN term
    gan_generator_weight: float = 3e-3  # paper: 3e-3
    n_student_steps: int = 1
    backward_simulation: bool = True
    regression_weight: float = 0.0  # > 0: DMD1's regression term (needs regression pairs)
    checkpoint_every: int = 50  # generator updates between checkpoints of the last good state
    eval_every: int = 0  # call eval_fn every this many generator updates (0: never)
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        ttur_schedule(1, self.ttur_ratio)  # validates the ratio
        if self.regression_weight < 0 or self.gan_critic_weight < 0 or self.gan_generator_weight < 0:
            raise ValueError("loss weights must be >= 0; set a weight to 0 to switch its term off")


@dataclass
class DMD2Result:
    generator: Denoiser
    fake_score: Denoiser
    gan_head: GANHead | None
    times: torch.Tensor
    history: dict = field(default_factory=dict)
    diverged: str | None = None  # the divergence message, None when training finished
    steps_done: int = 0
    seconds: float = 0.0

    def sample(self, n: int, seed: int = 0, device=None, batch_size: int = 2048):
        """``n`` samples from the trained generator (fixed seed)."""
        return generate(self.generator, self.times, n, seed=seed, device=device, batch_size=batch_size)


@torch.no_grad()
def generate(generator: Denoiser, times: torch.Tensor, n: int, shape=None, seed: int = 0, device=None,
             batch_size: int = 2048) -> torch.Tensor:
    """``n`` student samples from seeded prior noise, in batches. ``shape`` defaults to the shape the
    generator was trained on (stored as ``generator.sample_shape``)."""
    shape = tuple(shape or generator.sample_shape)
    g = torch.Generator().manual_seed(seed)
    device = device or next(generator.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x_T = generator.process.prior((b, *shape), generator=g, device=device)
        out.append(sample_student(generator, x_T, times, noise_generator=g)[0])
    return torch.cat(out)


def _trainable_copy(teacher: Denoiser) -> Denoiser:
    m = copy.deepcopy(teacher).train()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def _state(gen, fake, head, opt_g, opt_f, step) -> dict:
    return {"generator": gen.state_dict(), "fake_score": fake.state_dict(),
            "gan_head": head.state_dict() if head is not None else {},
            "opt_generator": opt_g.state_dict(), "opt_fake": opt_f.state_dict(), "step": step}


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train_dmd2` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_dmd2(teacher: Denoiser, data: torch.Tensor, config: DMD2Config | None = None, *,
               regression_pairs: tuple[torch.Tensor, torch.Tensor] | None = None, eval_fn=None,
               checkpoint_path: str | Path | None = None, on_divergence: str = "stop",
               progress: bool = True, desc: str = "DMD2", device=None,
               init_generator: Denoiser | None = None) -> DMD2Result:
    """Distil ``teacher`` into a ``config.n_student_steps``-step generator.

    ``data``: real samples [N, ...] (used by the GAN term and, without backward simulation, as the
    noised inputs of steps k > 0). ``regression_pairs``: (x_T, teacher sample) for DMD1's regression
    term. ``eval_fn(generator, times) -> dict`` is called every ``config.eval_every`` generator updates.
    Checkpoints (``torch.save``; read back with :func:`load_checkpoint`, weights_only) go to
    ``checkpoint_path`` or stay in memory. On a non-finite loss, ``on_divergence="stop"`` restores the
    last good checkpoint, warns, and returns with ``result.diverged`` set; ``"raise"`` raises
    :class:`DivergenceError` after restoring. ``init_generator`` (default: the teacher) starts G
    elsewhere, e.g. to resume.
    """
    from tqdm.auto import tqdm

    cfg = config or DMD2Config()
    check_choice("on_divergence", on_divergence, ("stop", "raise"))
    if cfg.regression_weight > 0 and regression_pairs is None:
        raise ValueError("regression_weight > 0 (DMD1's regression term) needs regression_pairs=(x_T, x_teacher); "
                         "draw them with a teacher sampler or set regression_weight=0")
    device = device or next(teacher.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    process = teacher.process
    teacher = frozen(teacher).to(device)
    generator = _trainable_copy(init_generator if init_generator is not None else teacher).to(device)
    fake_score = _trainable_copy(teacher).to(device)
    generator.sample_shape = tuple(data.shape[1:])
    use_gan = cfg.gan_critic_weight > 0 or cfg.gan_generator_weight > 0
    head = GANHead(teacher.net.feature_channels).to(device) if use_gan else None
    fake_params = list(fake_score.parameters()) + (list(head.parameters()) if head is not None else [])
    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_f = torch.optim.AdamW(fake_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    times = student_times(process, cfg.n_student_steps).to(device)
    data = data.to(device)
    shape = tuple(data.shape[1:])

    def randn(b):
        return torch.randn((b, *shape), generator=g).to(device)

    def real_batch(b):
        return data[torch.randint(0, len(data), (b,), generator=g).to(device)]

    def generator_batch(b, grad: bool):
        """(x, x_T, k): generator samples from a random step k (with or without grad)."""
        k = int(torch.randint(0, cfg.n_student_steps, (1,), generator=g))
        x_T = process.prior((b, *shape), generator=g, device=device)
        x_in = generator_input(generator, times, k, x_T, real_batch(b), cfg.backward_simulation, g)
        with torch.set_grad_enabled(grad):
            x = generator(x_in, times[k].expand(b))
        return x, x_T, k

    history = {k: [] for k in ("step", "loss_dm", "loss_fake", "loss_gan_critic", "loss_gan_generator",
                               "loss_regression", "grad_norm_generator", "grad_norm_fake")}
    history["eval"] = []
    last_good = {"state": copy.deepcopy(_state(generator, fake_score, head, opt_g, opt_f, 0))}
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(last_good["state"], checkpoint_path)

    def restore():
        state = load_checkpoint(checkpoint_path) if checkpoint_path is not None else last_good["state"]
        generator.load_state_dict(state["generator"])
        fake_score.load_state_dict(state["fake_score"])
        if head is not None:
            head.load_state_dict(state["gan_head"])
        return int(state["step"])

    B = cfg.batch_size
    diverged, step, t0 = None, 0, time.time()
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        # --- ratio fake-score (+ GAN critic) updates on the generator's current samples
        fake_losses, critic_losses = [], []
        for _ in range(cfg.ttur_ratio):
            with torch.no_grad():
                x_fake, _, _ = generator_batch(B, grad=False)
            t_f = process.sample_t(B, generator=g, device=device)
            loss_f = fake_score_loss(fake_score, x_fake, randn(B), t_f)
            loss = loss_f
            if head is not None and cfg.gan_critic_weight > 0:
                t_r = sample_dm_times(process, B, cfg.dm_range, g, device)
                t_g = sample_dm_times(process, B, cfg.dm_range, g, device)
                loss_c = gan_critic_loss(head, fake_score, real_batch(B), x_fake, t_r, t_g, randn(B), randn(B))
                loss = loss + cfg.gan_critic_weight * loss_c
                critic_losses.append(float(loss_c.detach()))
            opt_f.zero_grad(set_to_none=True)
            loss.backward()
            gn_f = float(torch.nn.utils.clip_grad_norm_(fake_params, cfg.grad_clip))
            fake_losses.append(float(loss_f.detach()))
            if not math.isfinite(float(loss.detach())):
                break
            opt_f.step()
        # --- one generator update
        x, x_T, k = generator_batch(B, grad=True)
        t = sample_dm_times(process, B, cfg.dm_range, g, device)
        loss_dm = distribution_matching_loss(x, teacher, fake_score, t, randn(B))
        loss = loss_dm
        loss_gg = loss_reg = float("nan")
        if head is not None and cfg.gan_generator_weight > 0:
            lg = gan_generator_loss(head, fake_score, x, sample_dm_times(process, B, cfg.dm_range, g, device), randn(B))
            loss = loss + cfg.gan_generator_weight * lg
            loss_gg = float(lg.detach())
        if cfg.regression_weight > 0:
            z_ref, x_ref = regression_pairs
            idx = torch.randint(0, len(z_ref), (B,), generator=g)
            x_reg, _ = sample_student(generator, z_ref[idx].to(device), times[:1])
            lr_ = regression_loss(x_reg, x_ref[idx].to(device))
            loss = loss + cfg.regression_weight * lr_
            loss_reg = float(lr_.detach())
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        gn_g = float(torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip))
        values = {"loss_dm": float(loss_dm.detach()), "loss_fake": sum(fake_losses) / len(fake_losses),
                  "loss_gan_critic": sum(critic_losses) / len(critic_losses) if critic_losses else float("nan"),
                  "loss_gan_generator": loss_gg, "loss_regression": loss_reg}
        bad = [n for n, v in values.items() if n in ("loss_dm", "loss_fake") and not math.isfinite(v)]
        bad += [n for n, v in values.items() if n not in ("loss_dm", "loss_fake") and math.isinf(v)]
        if bad or not math.isfinite(float(loss.detach())) or any(not math.isfinite(v) for v in critic_losses):
            good = restore()
            where = checkpoint_path if checkpoint_path is not None else "memory"
            diverged = (f"DMD2 diverged at generator update {step}: non-finite "
                        f"{', '.join(bad) or 'total loss'} ({values}); training stopped and the last good "
                        f"checkpoint (update {good}, {where}) was restored. Lower lr, raise ttur_ratio or "
                        f"grad_clip tighter.")
            if on_divergence == "raise":
                raise DivergenceError(diverged)
            warnings.warn(diverged, RuntimeWarning, stacklevel=2)
            step -= 1
            break
        opt_g.step()
        history["step"].append(step)
        for n, v in values.items():
            history[n].append(v)
        history["grad_norm_generator"].append(gn_g)
        history["grad_norm_fake"].append(gn_f)
        bar.set_postfix({n.replace("loss_", ""): f"{v:.3g}" for n, v in values.items() if math.isfinite(v)})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            state = _state(generator, fake_score, head, opt_g, opt_f, step)
            if checkpoint_path is not None:
                atomic_torch_save(state, checkpoint_path)
            else:
                last_good["state"] = copy.deepcopy(state)
        if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            generator.eval()
            history["eval"].append({"step": step, **eval_fn(generator, times)})
            generator.train()
    bar.close()
    generator.eval()
    fake_score.eval()
    return DMD2Result(generator, fake_score, head, times, history, diverged, step, time.time() - t0)


def config_dict(cfg: DMD2Config) -> dict:
    return asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers (the notebook's comparison table)


@torch.no_grad()
def teacher_baselines(teacher: Denoiser, x_T: torch.Tensor, nfes, samplers, score, schedule_name: str = "edm",
                      batch_size: int = 1000) -> list[dict]:
    """The teacher at each NFE with each sampler (``schedule_name`` grid, ``nfe`` steps; samplers
    whose NFE is one per step), all from the same noise ``x_T``. ``score(x) -> float`` (lower is
    better). Rows: nfe, sampler, score, seconds per 1000 samples, and ``best`` (the lowest score
    at that NFE: the teacher "with its best sampler")."""
    from .diffusion.samplers import nfe_for_steps, solve
    from .diffusion.schedules import schedule

    rows = []
    for nfe in nfes:
        times = schedule(schedule_name, teacher.process, int(nfe))
        for name in samplers:
            if nfe_for_steps(name, int(nfe)) != int(nfe):
                raise ValueError(f"sampler {name!r} does not take one network evaluation per step; "
                                 "use euler, dpm_solver_pp_2m/3m, ipndm or unipc here")
            start = time.perf_counter()
            x, used = solve(teacher, x_T, times, name, batch_size=batch_size)
            seconds = time.perf_counter() - start
            if used != nfe:
                raise RuntimeError(f"{name} used {used} network evaluations on a {nfe}-step grid")
            rows.append({"nfe": int(nfe), "sampler": name, "score": float(score(x)),
                         "s_per_1000": seconds / len(x_T) * 1000, "samples": x})
        best = min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["score"])
        for r in rows:
            if r["nfe"] == nfe:
                r["best"] = r is best
    return rows


def timed_sample(result: DMD2Result, n: int, seed: int = 0, device=None) -> tuple[torch.Tensor, float]:
    """(``n`` student samples, seconds per 1000 samples)."""
    start = time.perf_counter()
    x = result.sample(n, seed=seed, device=device)
    return x, (time.perf_counter() - start) / n * 1000
