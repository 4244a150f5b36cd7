"""DMD2's training loop: :func:`train_dmd2` / :func:`train_dmd2_seeds` drive :func:`fake_score_losses` and
:func:`generator_losses` by the two time-scale update rule, with AdamW, gradient clipping, a
:class:`Checkpointer` of the last good state and the divergence guard (:class:`DivergenceError`); its
configuration (:class:`DMD2Config`) and result (:class:`DMD2Result`)."""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.denoiser import Denoiser, frozen
from ..diffusion.process import Process
from ..federated import (_clip_per_member, _member_cat, _member_mean, _member_split, can_stack, stack_members,
                         unstack_member)
from ..utils import atomic_torch_save, check_choice
from .losses import (DM_RANGE, FULL_RANGE, PAPER_SAMPLE_DIM, GANHead, _check_range, _per_sample_dm,
                     backward_simulation, dm_direction, gan_weight_scale, generate, generator_input, regression_loss,
                     sample_dm_times, student_times, ttur_schedule, warmup_factor)


# ---------------------------------------------------------------------------------------------
# Training


class DivergenceError(RuntimeError):
    """A DMD2 loss became non-finite, or the generator's samples blew up; the last good checkpoint is kept."""


# The generator's samples may reach this many times the data's scale (its RMS, counted as at least 1),
# in RMS and in mean distance to the teacher's denoised estimate. Healthy runs stay within a few times
# (G starts as the teacher); a finite blow-up (lr 10 on the 2-D ring: samples at 1e10) goes far beyond,
# and its losses stay finite because DMD's direction is normalised.
BLOW_UP_FACTOR = 100.0


def _blown_up(scales: dict, limit: float) -> dict:
    """{name: members whose scale exceeds ``limit``} (a non-finite one counts too)."""
    bad = {}
    for name, v in scales.items():
        idx = torch.nonzero(~(v.detach() <= limit)).flatten().tolist()
        if idx:
            bad[name] = idx
    return bad


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
    dm_range: tuple[float, float] = DM_RANGE  # noise fractions of the DM loss (paper: 2%..98%)
    fake_range: tuple[float, float] = FULL_RANGE  # noise fractions of the fake score's loss (paper: all)
    fake_times: str = "uniform"  # "uniform" in noise fraction over fake_range (paper); "process": its training law
    gan_range: tuple[float, float] = FULL_RANGE  # noise fractions of the GAN term (paper: all)
    gan_critic_weight: float = 1e-2  # paper: about 1e-2 (at PAPER_SAMPLE_DIM); 0 disables the critic
    gan_generator_weight: float = 3e-3  # paper: 3e-3 (at PAPER_SAMPLE_DIM); 0 disables the GAN term in G
    gan_reference_dim: int = PAPER_SAMPLE_DIM  # generator's GAN weight x reference / d (gan_weight_scale); 0: as given
    warmup_steps: int = 0  # linear lr warm-up over this many generator updates (warmup_factor); paper: none stated,
    #                        the authors' code: 500 iterations = 100 generator updates at ttur_ratio 5
    n_student_steps: int = 1
    backward_simulation: bool = True
    regression_weight: float = 0.0  # > 0: DMD1's regression term (one-step generator; needs regression pairs)
    checkpoint_every: int = 50  # generator updates between checkpoints of the last good state
    eval_every: int = 0  # call eval_fn every this many generator updates (0: never)
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        ttur_schedule(1, self.ttur_ratio)  # validates the ratio
        warmup_factor(0, self.warmup_steps)  # validates the warm-up
        if self.regression_weight < 0 or self.gan_critic_weight < 0 or self.gan_generator_weight < 0:
            raise ValueError("loss weights must be >= 0; set a weight to 0 to switch its term off")
        if self.regression_weight > 0 and self.n_student_steps > 1:
            raise ValueError(f"regression_weight={self.regression_weight} with n_student_steps={self.n_student_steps}: "
                             "DMD1's regression loss pairs one noise x_T with one teacher sample, which only a one-step "
                             "generator maps deterministically; use n_student_steps=1 or regression_weight=0")
        for name in ("dm_range", "fake_range", "gan_range"):
            _check_range(name, getattr(self, name))
        check_choice("fake_times", self.fake_times, ("uniform", "process"))

    @property
    def use_gan(self) -> bool:
        return self.gan_critic_weight > 0 or self.gan_generator_weight > 0


@dataclass
class DMD2Result:
    generator: Denoiser
    fake_score: Denoiser
    gan_head: GANHead | None
    times: torch.Tensor
    history: dict = field(default_factory=dict)
    diverged: str | None = None  # the divergence message, None when training finished
    steps_done: int = 0
    seconds: float = 0.0  # wall time of the run (of the whole vectorised run when seeds were stacked)
    seed: int = 0

    def sample(self, n: int, seed: int = 0, device=None, batch_size: int = 2048):
        """``n`` samples from the trained generator (fixed seed)."""
        return generate(self.generator, self.times, n, seed=seed, device=device, batch_size=batch_size)


def _trainable_copy(teacher: Denoiser) -> Denoiser:
    m = copy.deepcopy(teacher).train()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train_dmd2` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    """The last good state of a run (modules and optimisers by name, plus the generator update it was
    taken at), in memory or at ``path`` (``torch.save``; read back with :func:`load_checkpoint`)."""

    def __init__(self, path: str | Path | None = None, **objects):
        self.path = Path(path) if path is not None else None
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self._memory = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, step: int) -> None:
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["step"] = int(step)
        if self.path is not None:
            atomic_torch_save(state, self.path)
        else:
            self._memory = copy.deepcopy(state)

    def restore(self) -> int:
        """Load the last saved state back (modules only) and return its generator update."""
        state = load_checkpoint(self.path) if self.path is not None else self._memory
        for name, obj in self.objects.items():
            if isinstance(obj, nn.Module):
                obj.load_state_dict(state[name])
        return int(state["step"])

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "memory"


class _Draws:
    """The random draws of a run with S members: one ``torch.Generator`` per member seed, so member s
    draws exactly what a single run with that seed draws; results are member-major [S*b, ...]."""

    def __init__(self, seeds: list[int], device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def _cat(self, fn) -> torch.Tensor:
        return torch.cat([fn(g) for g in self.gens]).to(self.device)

    def randn(self, shape) -> torch.Tensor:
        return self._cat(lambda g: torch.randn(shape, generator=g))

    def index(self, high: int, b: int) -> torch.Tensor:
        return self._cat(lambda g: torch.randint(0, high, (b,), generator=g))

    def times(self, process: Process, b: int, rng: tuple[float, float]) -> torch.Tensor:
        return self._cat(lambda g: sample_dm_times(process, b, rng, g))

    def process_times(self, process: Process, b: int) -> torch.Tensor:
        return self._cat(lambda g: process.sample_t(b, generator=g))

    def prior(self, process: Process, shape) -> torch.Tensor:
        return self._cat(lambda g: process.prior(shape, generator=g))


@dataclass
class DMD2Nets:
    """What one DMD2 update reads and writes. ``members`` > 1: generator, fake score and head are
    :func:`stack_members` networks holding one copy per seed; every batch is member-major."""

    teacher: Denoiser
    generator: Denoiser
    fake_score: Denoiser
    head: GANHead | None
    times: torch.Tensor
    data: torch.Tensor
    members: int = 1

    @property
    def process(self) -> Process:
        return self.teacher.process

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[1:])


@contextmanager
def _no_param_grads(*modules):
    """Gradients flow through these modules to their inputs only (the generator step must not train
    the fake score or the GAN head, nor pay for their parameter gradients)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_samples(nets: DMD2Nets, cfg: DMD2Config, draws: _Draws, b: int, grad: bool):
    """(x, k): ``b`` generator samples per member from a random step k per member (backward
    simulation or noised real data below it), with or without gradient."""
    n = nets.members * b
    k = draws._cat(lambda g: torch.randint(0, cfg.n_student_steps, (1,), generator=g).expand(b))
    x_T = draws.prior(nets.process, (b, *nets.shape))
    x_real = nets.data[draws.index(len(nets.data), b)] if not cfg.backward_simulation and cfg.n_student_steps > 1 else x_T
    # the re-noising noise is drawn whatever k is, so that each member's stream is its single run's
    noises = iter([draws.randn((b, *nets.shape)) for _ in range(cfg.n_student_steps - 1)])
    x_in = generator_input(nets.generator, nets.times, k, x_T, x_real, cfg.backward_simulation,
                           noise=lambda: next(noises))
    with torch.set_grad_enabled(grad):
        x = nets.generator(x_in, nets.times[k])
    assert x.shape[0] == n
    return x, k


def fake_score_losses(nets: DMD2Nets, cfg: DMD2Config, draws: _Draws, gan_scale: float = 1.0) -> tuple:
    """One fake-score update's losses: (total to backpropagate, {name: per-member values}).

    The fake score's denoising loss on detached generator samples at times over ``cfg.fake_range``
    (or the process's own training law, ``fake_times="process"``), plus ``gan_critic_weight x gan_scale``
    (:func:`train_dmd2` passes the critic's factor, 1: :func:`gan_weight_scale`) x the critic loss on noised real and generator samples at times over ``cfg.gan_range``: one forward
    pass of the fake score on the three batches together."""
    S, b, p = nets.members, cfg.batch_size, nets.process
    with torch.no_grad():
        x, _ = generator_samples(nets, cfg, draws, b, grad=False)
    t_f = draws.times(p, b, cfg.fake_range) if cfg.fake_times == "uniform" else draws.process_times(p, b)
    eps_f = draws.randn((b, *nets.shape))
    x_tf = p.add_noise(x, eps_f, t_f)
    critic = nets.head is not None and cfg.gan_critic_weight > 0
    if not critic:
        out = nets.fake_score.raw(x_tf, t_f)
    else:
        x_r = nets.data[draws.index(len(nets.data), b)]
        t_r, t_g = draws.times(p, b, cfg.gan_range), draws.times(p, b, cfg.gan_range)
        x_rt = p.add_noise(x_r, draws.randn((b, *nets.shape)), t_r)
        x_gt = p.add_noise(x, draws.randn((b, *nets.shape)), t_g)
        out, feats = nets.fake_score.raw(_member_cat([x_tf, x_rt, x_gt], S), _member_cat([t_f, t_r, t_g], S),
                                         return_features=True)
        out = _member_split(out, S, [b, 2 * b])[0]
        logits = nets.head(_member_split(feats, S, [b, 2 * b])[1])
        real, fake = _member_split(logits, S, [b, b])
    per_sample = ((out - nets.fake_score.target(x, eps_f, t_f)) ** 2).flatten(1).mean(1)
    losses = {"loss_fake": _member_mean(per_sample, S)}
    total = losses["loss_fake"]
    if critic:
        losses["loss_gan_critic"] = _member_mean(F.softplus(-real), S) + _member_mean(F.softplus(fake), S)
        total = total + cfg.gan_critic_weight * gan_scale * losses["loss_gan_critic"]
    return total.sum(), losses


def generator_losses(nets: DMD2Nets, cfg: DMD2Config, draws: _Draws, gan_scale: float = 1.0,
                     regression_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                     scales: dict | None = None) -> tuple:
    """One generator update's losses: (total to backpropagate, {name: per-member values}).

    The DM loss (:func:`dm_direction` at times over ``cfg.dm_range``), plus ``gan_generator_weight x
    gan_scale`` x the non-saturating GAN loss through the fake score's trunk and the head (their
    parameters get no gradient), plus ``regression_weight`` x DMD1's regression loss. A ``scales`` dict
    is filled with per-member ``sample_rms`` (of G's samples x) and ``teacher_distance`` (mean |x -
    x_real|, DMD's normaliser w): what the divergence guard watches besides finiteness."""
    S, b, p = nets.members, cfg.batch_size, nets.process
    x, _ = generator_samples(nets, cfg, draws, b, grad=True)
    t = draws.times(p, b, cfg.dm_range)
    x_t = p.add_noise(x.detach(), draws.randn((b, *nets.shape)), t)
    with torch.no_grad():
        x_real = nets.teacher(x_t, t)
        g, w = dm_direction(x.detach(), x_real, nets.fake_score(x_t, t))
        if scales is not None:
            scales["sample_rms"] = _member_mean(x.detach().flatten(1).pow(2).mean(1), S).sqrt()
            scales["teacher_distance"] = _member_mean(w, S)
    losses = {"loss_dm": _member_mean(_per_sample_dm(x, g), S)}
    total = losses["loss_dm"]
    if nets.head is not None and cfg.gan_generator_weight > 0:
        t_g = draws.times(p, b, cfg.gan_range)
        x_gt = p.add_noise(x, draws.randn((b, *nets.shape)), t_g)
        with _no_param_grads(nets.fake_score, nets.head):
            _, feats = nets.fake_score.features(x_gt, t_g)
            losses["loss_gan_generator"] = _member_mean(F.softplus(-nets.head(feats)), S)
        total = total + cfg.gan_generator_weight * gan_scale * losses["loss_gan_generator"]
    if cfg.regression_weight > 0:
        z_ref, x_ref = regression_pairs
        idx = draws.index(len(z_ref), b)
        x_reg = nets.generator(z_ref[idx].to(x.device), nets.times[0].expand(len(idx)))
        losses["loss_regression"] = _member_mean(regression_loss(x_reg, x_ref[idx].to(x.device), "none"), S)
        total = total + cfg.regression_weight * losses["loss_regression"]
    return total.sum(), losses


def _gan_head(teacher: Denoiser, data: torch.Tensor, seed: int, device) -> GANHead:
    with torch.no_grad():
        _, feats = teacher.features(data[:2].to(device), teacher.process.sample_t(2).to(device))
    torch.manual_seed(seed)
    return GANHead(teacher.net.feature_channels, kind="conv" if feats.ndim == 4 else "mlp").to(device)


def _check_finite(losses: dict) -> dict:
    """{name: members whose value is not finite}."""
    bad = {}
    for name, v in losses.items():
        idx = torch.nonzero(~torch.isfinite(v.detach())).flatten().tolist()
        if idx:
            bad[name] = idx
    return bad


def train_dmd2(teacher: Denoiser, data: torch.Tensor, config: DMD2Config | None = None, *,
               regression_pairs: tuple[torch.Tensor, torch.Tensor] | None = None, eval_fn=None,
               checkpoint_path: str | Path | None = None, on_divergence: str = "stop",
               progress: bool = True, desc: str = "DMD2", device=None,
               init_generator: Denoiser | None = None) -> DMD2Result:
    """Distil ``teacher`` into a ``config.n_student_steps``-step generator (seed ``config.seed``).

    ``data``: real samples [N, ...] (used by the GAN term and, without backward simulation, as the
    noised inputs of steps k > 0). ``regression_pairs``: (x_T, teacher sample) for DMD1's regression
    term. ``eval_fn(generator, times) -> dict`` is called every ``config.eval_every`` generator updates.
    Checkpoints (``torch.save``; read back with :func:`load_checkpoint`, weights_only) go to
    ``checkpoint_path`` or stay in memory. On a non-finite loss, ``on_divergence="stop"`` restores the
    last good checkpoint, warns, and returns with ``result.diverged`` set (the history keeps only the
    updates up to that checkpoint); ``"raise"`` raises :class:`DivergenceError` after restoring. Samples
    whose RMS, or mean distance to the teacher's estimate, exceeds ``BLOW_UP_FACTOR`` x the data's RMS
    (at least 1) count as a divergence too: their losses stay finite. ``init_generator`` (default: the teacher) starts G
    elsewhere, e.g. to resume.
    """
    return _train(teacher, data, config or DMD2Config(), [(config or DMD2Config()).seed], regression_pairs, eval_fn,
                  checkpoint_path, on_divergence, progress, desc, device, init_generator, stack=False)[0]


def train_dmd2_seeds(teacher: Denoiser, data: torch.Tensor, config: DMD2Config, seeds: list[int], *,
                     regression_pairs=None, eval_fn=None, on_divergence: str = "stop", progress: bool = True,
                     desc: str = "DMD2", device=None, vectorise: bool = True) -> list[DMD2Result]:
    """:func:`train_dmd2` for each of ``seeds`` (``config.seed`` is ignored), one result per seed.

    With ``vectorise`` and a teacher whose parameters all live in linear layers (the 2-D MLPs), the
    seeds train together in one stacked network (:func:`stack_members`): member s draws exactly the
    random numbers of a single run with seed s, clips its own gradient, and its losses are summed with
    the others' (each member's gradient is its own), so it follows the single run up to floating-point
    rounding, at a fraction of the cost. A non-finite loss in any member stops all of them at the last
    good checkpoint. Other teachers train one seed after the other.
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of distinct integers")
    if vectorise and len(seeds) > 1 and can_stack(teacher.net):
        return _train(teacher, data, config, seeds, regression_pairs, eval_fn, None, on_divergence, progress, desc,
                      device, None, stack=True)
    return [train_dmd2(teacher, data, DMD2Config(**{**asdict(config), "seed": s}), regression_pairs=regression_pairs,
                       eval_fn=eval_fn, on_divergence=on_divergence, progress=progress, desc=f"{desc} seed {s}",
                       device=device) for s in seeds]


def _train(teacher, data, cfg: DMD2Config, seeds, regression_pairs, eval_fn, checkpoint_path, on_divergence,
           progress, desc, device, init_generator, stack: bool) -> list[DMD2Result]:
    from tqdm.auto import tqdm

    check_choice("on_divergence", on_divergence, ("stop", "raise"))
    if cfg.regression_weight > 0 and regression_pairs is None:
        raise ValueError("regression_weight > 0 (DMD1's regression term) needs regression_pairs=(x_T, x_teacher); "
                         "draw them with a teacher sampler or set regression_weight=0")
    device = device or next(teacher.parameters()).device
    S = len(seeds)
    torch.manual_seed(seeds[0])
    teacher = frozen(teacher).to(device)
    data = data.to(device)
    start = init_generator if init_generator is not None else teacher
    heads = [_gan_head(teacher, data, s, device) for s in seeds] if cfg.use_gan else None
    if stack:
        generator = Denoiser(stack_members([start.net] * S), teacher.process, teacher.prediction)
        fake_score = Denoiser(stack_members([teacher.net] * S), teacher.process, teacher.prediction)
        head = stack_members(heads) if heads else None
        generator, fake_score = _trainable_copy(generator).to(device), _trainable_copy(fake_score).to(device)
    else:
        generator, fake_score = _trainable_copy(start).to(device), _trainable_copy(teacher).to(device)
        head = heads[0] if heads else None
    times = student_times(teacher.process, cfg.n_student_steps).to(device)
    nets = DMD2Nets(teacher, generator, fake_score, head, times, data, S)
    fake_params = list(fake_score.parameters()) + (list(head.parameters()) if head is not None else [])
    adamw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    opt_g = torch.optim.AdamW(generator.parameters(), **adamw)
    opt_f = torch.optim.AdamW(fake_params, **adamw)
    draws = _Draws(seeds, device)
    d = math.prod(nets.shape)
    critic_scale = gan_weight_scale(d, cfg.gan_reference_dim, role="critic")
    generator_scale = gan_weight_scale(d, cfg.gan_reference_dim, role="generator")
    ckpt = Checkpointer(checkpoint_path, generator=generator, fake_score=fake_score, gan_head=head,
                        opt_generator=opt_g, opt_fake=opt_f)
    ckpt.save(0)
    keys = ("loss_dm", "loss_fake", "loss_gan_critic", "loss_gan_generator", "loss_regression",
            "grad_norm_generator", "grad_norm_fake")
    histories = [{"step": [], **{k: [] for k in keys}, "eval": []} for _ in seeds]

    def member(module, i):
        return module if not stack else unstack_member(module, i)

    data_scale = max(1.0, float(data.float().pow(2).mean().sqrt()))
    limit = BLOW_UP_FACTOR * data_scale
    diverged, step, t0, fake_log = None, 0, time.time(), []
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False)
    for update in ttur_schedule(cfg.steps, cfg.ttur_ratio):
        scales = {}
        if update == "fake":
            total, losses = fake_score_losses(nets, cfg, draws, critic_scale)
            params, opt = fake_params, opt_f
        else:
            total, losses = generator_losses(nets, cfg, draws, generator_scale, regression_pairs, scales)
            params, opt = list(generator.parameters()), opt_g
        for grp in opt.param_groups:  # step counts the generator updates done: this round's is update `step`
            grp["lr"] = cfg.lr * warmup_factor(step, cfg.warmup_steps)
        bad, big = _check_finite(losses), _blown_up(scales, limit)
        if bad or big or not math.isfinite(float(total.detach())):
            good = ckpt.restore()
            members = sorted({seeds[i] for v in (*bad.values(), *big.values()) for i in v})
            who = "" if S == 1 else f" in seed(s) {members}"
            if bad or not big:
                what = f"non-finite {', '.join(bad) or 'total loss'}"
            else:
                name = next(iter(big))
                top = float(scales[name].max())
                what = (f"the generator's samples blew up: {name} = {top:.3g}; allowed: at most {limit:.3g} "
                        f"({BLOW_UP_FACTOR:g} x the data's RMS {data_scale:.3g}, counted as at least 1)")
            diverged = (f"DMD2 diverged at generator update {step + 1}{who}: {what} in the {update} update; training "
                        f"stopped and the last good checkpoint (update {good}, {ckpt.where}) was restored. Lower lr, "
                        f"raise ttur_ratio or clip gradients tighter (grad_clip).")
            # the updates after the checkpoint were discarded: so are their records
            for h in histories:
                kept = sum(1 for s_ in h["step"] if s_ <= good)
                for k in ("step", *keys):
                    del h[k][kept:]
                h["eval"] = [e for e in h["eval"] if e["step"] <= good]
            if on_divergence == "raise":
                raise DivergenceError(diverged)
            warnings.warn(diverged, RuntimeWarning, stacklevel=3)
            step = good
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        norms = _clip_per_member(params, cfg.grad_clip, S)
        opt.step()
        if update == "fake":
            fake_log.append({**losses, "grad_norm_fake": norms})
            continue
        step += 1
        values = {**{k: torch.stack([f[k] for f in fake_log]).mean(0) for k in fake_log[0]}, **losses,
                  "grad_norm_generator": norms}
        fake_log = []
        for i, h in enumerate(histories):
            h["step"].append(step)
            for k in keys:
                h[k].append(float(values[k][i].detach()) if k in values else float("nan"))
        bar.update(1)
        bar.set_postfix({k.replace("loss_", ""): f"{float(v.detach().mean()):.3g}" for k, v in values.items() if "loss" in k})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            ckpt.save(step)
        if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            for i, h in enumerate(histories):
                gen_i = member(generator, i)
                gen_i.eval()
                h["eval"].append({"step": step, **eval_fn(gen_i, times)})
                gen_i.train()
    bar.close()
    seconds = time.time() - t0
    results = []
    for i, s in enumerate(seeds):
        gen_i, fake_i = member(generator, i).eval(), member(fake_score, i).eval()
        gen_i.sample_shape = nets.shape
        results.append(DMD2Result(gen_i, fake_i, member(head, i) if head is not None else None, times, histories[i],
                                  diverged, step, seconds, s))
    return results


def config_dict(cfg: DMD2Config) -> dict:
    return asdict(cfg)


def late_average(history: dict, key: str, upto: int | None = None, fraction: float = 0.5) -> float:
    """Mean of the evaluated ``key`` over the last ``fraction`` of training up to generator update
    ``upto`` (default: the end): the late-training average the notebook's verdicts use instead of the
    last iterate."""
    evals = history["eval"]
    upto = upto if upto is not None else (evals[-1]["step"] if evals else 0)
    window = [e[key] for e in evals if upto * (1 - fraction) < e["step"] <= upto]
    if not window:
        raise ValueError(f"no evaluation of {key!r} in ({upto * (1 - fraction):g}, {upto}]; evaluate more often "
                         "(eval_every) or widen the fraction")
    return float(sum(window) / len(window))
