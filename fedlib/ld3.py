"""LD3: learning to discretise the sampling ODE (Tong et al., ICLR 2025; docs/methods.md section 4).

With the network frozen, learn the N+1 time points of one sampler at one NFE from a small teacher
set of (x_T, x_0*) pairs by backpropagating through the whole few-step solve.

- :func:`ld3_times` - the cumulative-softmax parameterisation: p = softmax(theta), c = cumsum(p),
  u_i = (c_i - c_0)/(c_N - c_0) in [0, 1] (papers.md writes 1 - c_0 for c_N - c_0; equal) (monotone for
  any logits, u_0 = 0 and u_N = 1 exactly); pixel-space models place
  lambda_i = lambda_min + u_i (lambda_max - lambda_min) (uniform in log-SNR at theta = 1), latent models
  place t the same way (``space="t"``).
- :func:`ld3_theta` / :func:`theta_of_times` - the exact inverse: the logits of a given grid
  (theta_{1:} = log diff(u) + c, theta_0 free), so that any hand-made schedule is a point of LD3's space.
- :func:`network_times` - the decoupled network time: phi shifts the *interior* points in the same
  variable, clamped to +-0.5 x the smallest gap; the end points never move.
- :func:`teacher_pairs` - x_T and a high-NFE solve (UniPC, NFE 20, EDM schedule by default).
- :func:`learned_timesteps` - starts from the best hand-made grid on the validation pairs (phi = 0),
  then the soft ball-relaxed objective with accept-if-better, two phases (theta alone, then theta and
  phi), validation keeping the best, plateau decay with a reload of the best state. Never worse on
  validation than every hand-made grid. The network time moves the whole data prediction
  (:class:`fedlib.diffusion.denoiser.Denoiser` ``time_shift``).
- :class:`LearnedSchedule` - the result, saved / reloaded per (model, solver, NFE).
- :func:`held_out_study` - notebook 03: learned against hand-made grids, per seed, on held-out noise,
  reporting the validated quantity (its claims and summaries: :mod:`fedlib.studies`).

The validation quantity is the mean over the validation pairs of the loss d(solve(x_T), x_0*).
Losses: ``"l2"``; ``"features"`` (squared distance in the feature space of fedlib's own classifier,
:func:`fedlib.metrics.feature_extractor`, plus L2); ``"lpips"`` only when its weights are on disk
(clear error otherwise).

Choices the paper leaves open (ours): the start (the best hand-made grid on validation, where the paper
starts from theta = 1, i.e. uniform lambda: ``start="uniform_lambda"`` reproduces it); the movable noise
x'_T takes a normalised gradient step of length r, then is projected on the ball ||x'_T - x_T|| <= r
sigma_T; acceptance compares the per-sample loss at the old and the proposed x'_T under the updated
schedule; a step that merges two time points (in float64) is undone and the learning rates decayed;
an optional significance check (``significance`` > 0) keeps the learned grid only when its per-sample
validation gain over the start exceeds that many standard errors.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data import to_uint8
from .diffusion.samplers import solve
from .diffusion.schedules import SCHEDULES
from .diffusion.schedules import schedule as hand_schedule
from .utils import atomic_write, cache_dir, check_choice, check_number, load_or_build

LOSSES = ("l2", "features", "lpips")
LD3_SOLVERS = ("euler", "ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc", "unipc_bh1")


def ld3_u(theta: torch.Tensor) -> torch.Tensor:
    """u in [0, 1], non-decreasing, u_0 = 0, u_N = 1 exactly, from N+1 logits.

    (c_i - c_0)/(c_N - c_0) with c = cumsum(softmax(theta)) equals cumsum(softmax(theta[1:])) (the
    normaliser cancels; theta_0 drops out), which is how it is computed: no 0/0 when theta_0
    dominates the softmax."""
    c = torch.cumsum(torch.softmax(theta[..., 1:], dim=-1), dim=-1)
    return torch.cat([torch.zeros_like(c[..., :1]), c / c[..., -1:]], dim=-1)


def ld3_theta(u: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`ld3_u`: logits theta (N+1 entries) with ``ld3_u(theta) == u`` (to
    float64 rounding) for a grid ``u`` strictly increasing from 0 to 1. theta_0 drops out of the map
    and is set to 0; theta_{1:} = log(diff(u)) + c for any constant c, chosen so that they average 0
    (the scale RMSprop starts from is then the same for every grid)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    d = u[..., 1:] - u[..., :-1]
    if u.shape[-1] < 2 or not (d > 0).all():
        raise ValueError(f"ld3_theta needs a grid strictly increasing from 0 to 1, got {u.tolist()}")
    logd = d.log()
    logd = logd - logd.mean(dim=-1, keepdim=True)
    return torch.cat([torch.zeros_like(u[..., :1]), logd], dim=-1)


def theta_of_times(times: torch.Tensor, process, space: str = "lambda") -> torch.Tensor:
    """The logits whose grid is ``times`` (decreasing process times from t_max to t_min): the inverse
    of :func:`ld3_times`, e.g. to start LD3 from a hand-made schedule."""
    check_choice("LD3 space", space, ("lambda", "t"), fix="'lambda' for pixel-space models, 't' for latent ones.")
    t = torch.as_tensor(times, dtype=torch.float64)
    lo, hi = _bounds(process, space)
    v = process.lambda_(t) if space == "lambda" else t
    u = ((v - lo) / (hi - lo)).clone()
    u[0], u[-1] = 0.0, 1.0  # the end points are t_max and t_min by definition
    return ld3_theta(u)


def _bounds(process, space: str):
    t_max = torch.tensor(process.t_max, dtype=torch.float64)
    t_min = torch.tensor(process.t_min, dtype=torch.float64)
    if space == "lambda":
        return process.lambda_(t_max), process.lambda_(t_min)
    return t_max, t_min


def ld3_grid(theta: torch.Tensor, process, space: str = "lambda") -> torch.Tensor:
    """The grid variable (lambda increasing, or t decreasing) of logits ``theta``."""
    check_choice("LD3 space", space, ("lambda", "t"), fix="'lambda' for pixel-space models, 't' for latent ones.")
    lo, hi = _bounds(process, space)
    return lo + ld3_u(theta.double()) * (hi - lo)


def _to_times(v: torch.Tensor, process, space: str) -> torch.Tensor:
    t = process.t_of_lambda(v) if space == "lambda" else v
    t_max = torch.tensor([process.t_max], dtype=torch.float64, device=t.device)
    t_min = torch.tensor([process.t_min], dtype=torch.float64, device=t.device)
    return torch.cat([t_max, t[1:-1].double(), t_min])  # end points exactly


def ld3_times(theta: torch.Tensor, process, space: str = "lambda") -> torch.Tensor:
    """Decreasing process times t_0 = t_max > ... > t_N = t_min (float64) of logits ``theta``."""
    return _to_times(ld3_grid(theta, process, space), process, space)


def network_times(theta: torch.Tensor, phi: torch.Tensor, process, space: str = "lambda") -> torch.Tensor:
    """Times fed to the network: interior grid points shifted by phi, clamped to +-0.5 x the
    smallest gap of the grid; end points unshifted."""
    v = ld3_grid(theta, process, space)
    gap = (v[1:] - v[:-1]).abs().min()
    shift = torch.maximum(torch.minimum(phi.double(), 0.5 * gap), -0.5 * gap)
    mask = torch.ones_like(v)
    mask[0] = mask[-1] = 0
    return _to_times(v + mask * shift, process, space)


@dataclass
class LearnedSchedule:
    """A learned discretisation for one (model, solver, NFE)."""

    model: str
    solver: str
    nfe: int
    space: str
    theta: list
    phi: list
    times: list
    network_times: list
    history: dict = field(default_factory=dict)

    def tensors(self, device=None):
        return (torch.tensor(self.times, dtype=torch.float64, device=device),
                torch.tensor(self.network_times, dtype=torch.float64, device=device))

    def sample(self, denoiser, x_T):
        times, tn = self.tensors(x_T.device)
        return solve(denoiser, x_T, times, self.solver, tn)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else schedule_path(self.model, self.solver, self.nfe)
        return atomic_write(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LearnedSchedule":
        return cls(**json.loads(Path(path).read_text()))


def schedule_path(model: str, solver: str, nfe: int) -> Path:
    """Where the schedule of (model, solver, NFE) lives: ``cache_dir("ld3", model)/<solver>-nfe<N>.json``."""
    return cache_dir("ld3", model) / f"{solver}-nfe{nfe}.json"


@torch.no_grad()
def teacher_pairs(denoiser, n: int, shape: tuple, solver: str = "unipc", nfe: int = 20, schedule: str = "edm",
                  seed: int = 0, device="cpu", batch_size: int = 256):
    """(x_T, x_0*): prior noise and the teacher solve at high NFE."""
    g = torch.Generator().manual_seed(seed)
    p = denoiser.process
    x_T = p.prior((n, *shape), generator=g).to(device)
    times = hand_schedule(schedule, p, nfe).to(device)
    return x_T, solve(denoiser, x_T, times, solver, batch_size=batch_size)[0]


def lpips_distance(device="cpu"):
    """LPIPS (torchmetrics, AlexNet) when its weights are already on disk; otherwise a clear error
    (nothing is downloaded)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    weights = list(hub.glob("alexnet-*.pth"))
    if not weights:
        raise FileNotFoundError(
            f"LPIPS needs AlexNet weights in {hub} (alexnet-owt-7be5be79.pth) and torchmetrics' LPIPS head; "
            "none are on this machine and fedlib does not download at run time. Use loss='features' "
            "(fedlib's own classifier) or 'l2', or copy the weights there first.")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    m = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none").to(device).eval()

    def dist(a, b):
        a3, b3 = (a.expand(-1, 3, -1, -1) if a.shape[1] == 1 else a), (b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b)
        return m(a3.clamp(-1, 1), b3.clamp(-1, 1))
    return dist


def make_loss(loss: str, feature_fn=None, feature_weight: float = 1.0, device="cpu"):
    """Per-sample distance d(x, y) -> [B]."""
    check_choice("LD3 loss", loss, LOSSES)
    if loss == "l2":
        return lambda a, b: ((a - b) ** 2).flatten(1).mean(1)
    if loss == "lpips":
        return lpips_distance(device)
    if feature_fn is None:
        raise ValueError("loss='features' needs feature_fn (e.g. fedlib.metrics.feature_extractor(...).features)")
    return lambda a, b: ((a - b) ** 2).flatten(1).mean(1) + feature_weight * (
        (feature_fn(a) - feature_fn(b)) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class LD3Config:
    """LD3's training settings for one grid, checked once here (paper values in the comments).

    The names are notebook 03's parameters without their ``ld3_`` prefix: ``ld3_rounds_theta`` ->
    ``rounds_theta``, ``ld3_rounds_both`` -> ``rounds_both``, ``ld3_batch`` -> ``batch``,
    ``ld3_validate_every`` -> ``validate_every``, ``ld3_lr`` -> ``lr``, ``ld3_soft`` -> ``soft``; notebook 05's
    ``ld3_solver`` -> ``solver`` and ``ld3_rounds`` -> ``rounds_both``. The pair counts (``ld3_train``,
    ``ld3_val``, ``ld3_pairs``), the NFEs and the loss belong to the study around it
    (:func:`held_out_study`, :func:`fedlib.pipeline.learn_grids`, the case), not to the learning."""

    solver: str = "dpm_solver_pp_2m"  # the sampler whose times are learned (one network evaluation per step)
    space: str = "lambda"       # where u is placed: "lambda" (pixel-space models) or "t" (latent models)
    rounds_theta: int = 2       # rounds over the training pairs on theta alone (paper: 2)
    rounds_both: int = 5        # then rounds on theta and phi (paper: 5)
    batch: int = 2              # pairs per step (paper: 2)
    lr: float = 5e-3            # RMSprop learning rate of theta (paper: 5e-3)
    lr_phi: float | None = None  # SGD learning rate of phi (None: 0.1 / NFE)
    momentum: float = 0.9       # RMSprop momentum of theta
    clip: float = 1.0           # gradient-norm clip of theta and phi together
    patience: int = 5           # steps without a better validation loss before a plateau decay
    decay: float = 0.8          # learning-rate factor at a plateau or an undone step
    ball_scale: float = 1e-3    # radius of the soft objective's ball around x_T (in units of d / NFE^2 sigma_T)
    soft: bool = True           # the soft ball-relaxed objective (paper: on)
    validate_every: int = 1     # steps between validations (paper: 1; patience still counts steps)
    start: str = "best"         # "best" hand-made grid on validation, or a schedule name ("uniform_lambda": the paper's)
    significance: float = 0.0   # > 0: keep the learned grid only if its validation gain exceeds this many s.e.
    reload_best: bool = True    # at a plateau, resume from the best state (the paper's)

    def __post_init__(self):
        check_choice("LD3 solver", self.solver, LD3_SOLVERS,
                     fix="Heun uses 2 NFE per step; learn its times with 'euler' or a multistep solver.")
        check_choice("LD3 space", self.space, ("lambda", "t"), fix="'lambda' for pixel-space models, 't' for latent ones.")
        check_choice("LD3 start", self.start, SCHEDULES + ("best",),
                     fix="'best' starts from the best hand-made grid on validation.")
        for name in ("rounds_theta", "rounds_both"):
            check_number(name, getattr(self, name), at_least=0, integer=True, fix="0 skips that phase")
        for name in ("batch", "patience", "validate_every"):
            check_number(name, getattr(self, name), at_least=1, integer=True)
        for name in ("lr", "clip"):
            check_number(name, getattr(self, name), above=0)
        if self.lr_phi is not None:
            check_number("lr_phi", self.lr_phi, above=0, fix="None: 0.1 / NFE")
        check_number("momentum", self.momentum, at_least=0, below=1)
        check_number("decay", self.decay, above=0, at_most=1, fix="1 keeps the learning rates")
        check_number("ball_scale", self.ball_scale, at_least=0)
        check_number("significance", self.significance, at_least=0, fix="0 keeps any better grid")

    @classmethod
    def build(cls, config: "LD3Config | None", fields: dict) -> "LD3Config":
        """``config``, or one made of ``fields`` (keywords of the same names); not both."""
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{unknown} are not LD3 settings; allowed: {', '.join(cls.__dataclass_fields__)} "
                             "(see LD3Config: ld3_lr is lr, batch_size is batch)")
        if config is not None and fields:
            raise ValueError(f"got an LD3Config and the settings {sorted(fields)}; pass one of them "
                             "(dataclasses.replace(config, ...) changes a config)")
        return config if config is not None else cls(**fields)


def learned_timesteps(denoiser, nfe: int, train_pairs, val_pairs, config: LD3Config | None = None, *,
                      loss: str = "l2", feature_fn=None, seed: int = 0, model_name: str = "model", callback=None,
                      progress: bool = False, **fields) -> LearnedSchedule:
    """Learn the N+1 times (N = ``nfe`` steps) of ``config.solver`` for the frozen ``denoiser``, with the
    settings of ``config`` (an :class:`LD3Config`, or its fields as keywords). ``seed``: the order of the
    training pairs.

    ``train_pairs`` / ``val_pairs``: (x_T, x_0*) tensors from :func:`teacher_pairs`. ``start``:
    ``"best"`` (default) evaluates every hand-made schedule (``SCHEDULES``) on the validation pairs and
    starts from the best one (phi = 0); a schedule name starts from that one (``"uniform_lambda"`` is
    the paper's theta = 1). The validation quantity is the mean of the loss ``d(solve(x_T), x_0*)``
    over the validation pairs. Returns the best-on-validation :class:`LearnedSchedule`, never worse
    on validation than its start; ``history``: ``start`` (its name), ``start_val_loss``,
    ``hand_made_val_loss`` (every candidate), ``val_loss`` (after every validation),
    ``best_val_loss``, soft-move acceptances, steps, wall time, ``reloads`` and ``time_shift`` (the
    denoiser's convention for the network time, :mod:`fedlib.diffusion.denoiser`: a grid is sampled
    under the convention it was learned with).

    At a plateau (``patience`` steps without a better validation loss) the learning rates are
    multiplied by ``decay`` and, with ``reload_best`` (the paper's), theta and phi are reset to the best
    state so far: training resumes from the best grid with smaller steps rather than from wherever the
    stale steps wandered. ``callback(info)``, if given, is called after every validation with
    ``{"step", "val_loss", "theta", "phi"`` (the state just validated), ``"reloaded"``, ``"theta_next"``,
    ``"phi_next"`` (the state the next step starts from)``}`` and once before the first step (step 0).
    """
    c = LD3Config.build(config, fields)
    solver, space, decay, soft = c.solver, c.space, c.decay, c.soft
    starts = SCHEDULES if c.start == "best" else (c.start,)
    dist = make_loss(loss, feature_fn)
    process = denoiser.process
    xT_tr, x0_tr = train_pairs
    xT_va, x0_va = val_pairs
    device = xT_tr.device
    theta = torch.ones(nfe + 1, dtype=torch.float64, device=device, requires_grad=True)
    phi = torch.zeros(nfe + 1, dtype=torch.float64, device=device, requires_grad=True)
    opt_theta = torch.optim.RMSprop([theta], lr=c.lr, momentum=c.momentum)
    opt_phi = torch.optim.SGD([phi], lr=(0.1 / nfe) if c.lr_phi is None else c.lr_phi)
    d = xT_tr[0].numel()
    r = c.ball_scale * d / nfe**2 * float(process.sigma(torch.tensor(process.t_max)))  # unit-variance units
    xT_soft = xT_tr.clone()
    g = torch.Generator().manual_seed(seed)
    was_trainable = [prm.requires_grad for prm in denoiser.parameters()]
    for prm in denoiser.parameters():  # the network is frozen while its times are learned
        prm.requires_grad_(False)

    def solve_at(xT, th, ph, grad=True):
        times = ld3_times(th, process, space).to(device)
        tn = network_times(th, ph, process, space).to(device)
        with torch.set_grad_enabled(grad):
            return solve(denoiser, xT, times, solver, tn)[0]

    @torch.no_grad()
    def validate():  # per-sample losses on the validation pairs
        return dist(solve_at(xT_va, theta, phi, grad=False), x0_va).double()

    t0 = time.perf_counter()
    # the start: every candidate hand-made grid, expressed in LD3's logits and validated through the
    # very same solve as the learned states, so that the result is never worse than the best of them
    # on validation (accept-if-better keeps it otherwise)
    hand = {}
    for name in starts:
        th = theta_of_times(hand_schedule(name, process, nfe), process, space).to(device)
        with torch.no_grad():
            theta.copy_(th)
        hand[name] = (validate(), th)
    start_name = min(hand, key=lambda k: float(hand[k][0].mean()))
    start_per, th = hand[start_name]
    with torch.no_grad():
        theta.copy_(th)
    best, best_per = float(start_per.mean()), start_per
    hist = {"val_loss": [best], "start": start_name, "start_val_loss": best,
            "hand_made_val_loss": {k: float(v[0].mean()) for k, v in hand.items()}, "accepted": 0, "proposed": 0,
            "steps": 0, "reloads": 0, "time_shift": getattr(denoiser, "time_shift", "prediction")}
    start_state = best_state = (theta.detach().clone(), phi.detach().clone())

    def report(step_, v, validated, reloaded):
        if callback is not None:
            callback({"step": step_, "val_loss": v, "theta": validated[0], "phi": validated[1], "reloaded": reloaded,
                      "theta_next": theta.detach().clone(), "phi_next": phi.detach().clone()})

    report(0, best, start_state, False)
    stale, step = 0, 0
    phases = [("theta", c.rounds_theta), ("both", c.rounds_both)]
    for phase, rounds in phases:
        for _ in range(rounds):
            perm = torch.randperm(len(xT_tr), generator=g).to(device)
            for i in range(0, len(perm), c.batch):
                idx = perm[i:i + c.batch]
                x_start = xT_soft[idx].clone().requires_grad_(soft)
                out = solve_at(x_start, theta, phi if phase == "both" else phi.detach())
                per = dist(out, x0_tr[idx])
                opt_theta.zero_grad(set_to_none=True)
                opt_phi.zero_grad(set_to_none=True)
                per.mean().backward()
                torch.nn.utils.clip_grad_norm_([theta, phi], c.clip)
                opt_theta.step()
                if phase == "both":
                    opt_phi.step()
                t_new = ld3_times(theta.detach(), process, space)
                if not bool((t_new[1:] < t_new[:-1]).all()):  # two points merged (in float64): undo, slow down
                    with torch.no_grad():
                        theta.copy_(best_state[0])
                        phi.copy_(best_state[1])
                    for opt in (opt_theta, opt_phi):
                        for grp in opt.param_groups:
                            grp["lr"] *= decay
                    hist["undone"] = hist.get("undone", 0) + 1
                if soft:  # ball-relaxed noise: step, project, keep only if the sample's loss fell
                    with torch.no_grad():
                        gr = x_start.grad.flatten(1)
                        prop = x_start.flatten(1) - r * gr / gr.norm(dim=1, keepdim=True).clamp_min(1e-12)
                        delta = prop - xT_tr[idx].flatten(1)
                        norm = delta.norm(dim=1, keepdim=True)
                        prop = xT_tr[idx].flatten(1) + delta * torch.clamp(r / norm.clamp_min(1e-12), max=1.0)
                        both = torch.cat([x_start.detach(), prop.view_as(x_start)])
                        l2 = dist(solve_at(both, theta, phi, grad=False), torch.cat([x0_tr[idx], x0_tr[idx]]))
                        keep = l2[len(idx):] < l2[: len(idx)]
                        xT_soft[idx[keep]] = prop.view_as(x_start)[keep]
                        hist["accepted"] += int(keep.sum())
                        hist["proposed"] += len(idx)
                step += 1
                if step % c.validate_every:
                    continue
                per_v = validate()
                v = float(per_v.mean())
                hist["val_loss"].append(v)
                validated = (theta.detach().clone(), phi.detach().clone())
                reloaded = False
                if v < best:
                    best, best_per, stale = v, per_v, 0
                    best_state = validated
                else:
                    stale += c.validate_every  # patience counts steps, as in the paper, whatever the validation interval
                    if stale >= c.patience:
                        for opt in (opt_theta, opt_phi):
                            for grp in opt.param_groups:
                                grp["lr"] *= decay
                        if c.reload_best:  # LD3: a plateau resumes from the best state, with smaller steps
                            with torch.no_grad():
                                theta.copy_(best_state[0])
                                phi.copy_(best_state[1])
                            hist["reloads"] += 1
                            reloaded = True
                        stale = 0
                report(step, v, validated, reloaded)
    for prm, flag in zip(denoiser.parameters(), was_trainable):
        prm.requires_grad_(flag)
    hist["steps"] = step
    # the significance check (ours): keep the learned state only when its per-sample gain over the start
    # on the validation pairs exceeds `significance` standard errors; a smaller gain is validation noise
    gain = start_per - best_per
    se = float(gain.std() / len(gain) ** 0.5) if len(gain) > 1 else float("inf")
    hist["val_gain"], hist["val_gain_se"] = float(gain.mean()), se
    hist["significant"] = bool(best_state is not start_state and (c.significance <= 0
                                                                   or float(gain.mean()) > c.significance * se))
    if best_state is not start_state and not hist["significant"]:
        best_state, best = start_state, hist["start_val_loss"]
    hist["kept"] = "learned" if best_state is not start_state else "start"
    hist["best_val_loss"] = best
    hist["wall_time_s"] = time.perf_counter() - t0
    th, ph = best_state
    return LearnedSchedule(model=model_name, solver=solver, nfe=nfe, space=space,
                           theta=th.tolist(), phi=ph.tolist(),
                           times=ld3_times(th, process, space).tolist(),
                           network_times=network_times(th, ph, process, space).tolist(), history=hist)


def learned_under(schedule: LearnedSchedule, denoiser) -> bool:
    """Whether ``schedule`` was learned under ``denoiser``'s network-time convention (``time_shift``;
    schedules saved before it was recorded moved c_noise only)."""
    return schedule.history.get("time_shift", "c_noise") == getattr(denoiser, "time_shift", "prediction")


def load_or_learn(denoiser, nfe: int, train_pairs, val_pairs, model_name: str, config: LD3Config | None = None,
                  retrain: bool = False, **kw) -> LearnedSchedule:
    """Reload the saved schedule of (model, ``config.solver``, NFE) or learn and save it (also when the saved
    file cannot be read: it is reported, removed and learned again). ``kw``: :func:`learned_timesteps`'s
    keywords (``loss``, ``seed``, ...) or, without ``config``, the fields of an :class:`LD3Config`."""
    settings = {k: kw.pop(k) for k in list(kw) if k in LD3Config.__dataclass_fields__}
    config = LD3Config.build(config, settings)
    path = schedule_path(model_name, config.solver, nfe)

    def learn():
        s = learned_timesteps(denoiser, nfe, train_pairs, val_pairs, config, model_name=model_name, **kw)
        s.save(path)
        return s

    if retrain:
        s, was_cached = learn(), False
    else:
        s, was_cached = load_or_build(path, LearnedSchedule.load, learn)
        if not learned_under(s, denoiser):  # learned under the other network-time convention: stale
            s, was_cached = learn(), False
    s.history["cached"] = was_cached
    return s


# ---------------------------------------------------------------------------------------------
# The held-out study (notebook 03): learned against hand-made grids, per seed, on noise LD3 never saw


@dataclass
class StudyResult:
    """What :func:`held_out_study` measured on one dataset."""

    rows: list            # one dict per (seed, solver, NFE, grid): teacher_distance, metric, val_loss
    learned: dict         # (seed, solver, NFE) -> LearnedSchedule
    samples: dict         # (solver, grid, NFE) -> the first samples of the first seed (for the explorer)
    teacher_metric: list  # the distribution metric of the teacher's own samples, per seed


def held_out_study(case, solvers, nfes, seeds, schedules=SCHEDULES, config: LD3Config | None = None, *,
                   n_train: int = 24, n_val: int = 48, teacher_solver: str = "unipc", teacher_nfe: int = 20,
                   keep: int = 16, eval_batch: int = 500) -> StudyResult:
    """Per seed: draw LD3's own training and validation pairs and a held-out set of noise with its teacher
    solution, learn every (solver, NFE) (saved and reloaded by :func:`load_or_learn`), then solve the
    held-out noise with every hand-made grid and the learned one. Each row reports the quantity LD3
    validates, the mean loss d(solve(x_T), x_0*) to the teacher's solution from the same noise
    (``teacher_distance``), and the case's distribution metric (``metric``, lower is better).

    ``case``: anything with ``dataset``, ``teacher``, ``shape``, ``loss``, ``feature_fn``, ``metric``,
    ``n_eval`` and ``model_name`` (:func:`fedlib.studies.ld3_case`). Seed s draws its training pairs
    from 1000 s + 100, validation from 1000 s + 200 and held-out noise from 1000 s + 300. ``config``: LD3's
    settings (:class:`LD3Config`), its ``solver`` replaced by each of ``solvers``."""
    config = config if config is not None else LD3Config()
    per_solver = {solver: replace(config, solver=solver) for solver in solvers}  # each name checked by LD3Config
    T = case.teacher
    dist = make_loss(case.loss, case.feature_fn)
    weight = next(T.parameters(), None)
    pairs_kw = dict(solver=teacher_solver, nfe=teacher_nfe, device="cpu" if weight is None else weight.device)
    key = json.dumps({"n_train": n_train, "n_val": n_val, "teacher": [teacher_solver, teacher_nfe], "loss": case.loss,
                      # the solver is in each schedule's own path
                      **{k: v for k, v in asdict(config).items() if k != "solver"}}, sort_keys=True, default=str)
    tag = f"{case.model_name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    res = StudyResult([], {}, {}, [])
    for seed in seeds:
        train = teacher_pairs(T, n_train, case.shape, seed=1000 * seed + 100, **pairs_kw)
        val = teacher_pairs(T, n_val, case.shape, seed=1000 * seed + 200, **pairs_kw)
        x_T, x_ref = teacher_pairs(T, case.n_eval, case.shape, seed=1000 * seed + 300, **pairs_kw)
        res.teacher_metric.append(case.metric(x_ref))
        for solver in solvers:
            for nfe in nfes:
                s = load_or_learn(T, nfe, train, val, f"{tag}-s{seed}", per_solver[solver], loss=case.loss,
                                  feature_fn=case.feature_fn, seed=seed)
                res.learned[(seed, solver, nfe)] = s
                grids = {name: (hand_schedule(name, T.process, nfe), None) for name in schedules}
                grids["ld3"] = s.tensors()
                for name, (times, tn) in grids.items():
                    with torch.no_grad():
                        out = solve(T, x_T, times.to(x_T.device), solver,
                                    None if tn is None else tn.to(x_T.device), batch_size=eval_batch)[0]
                        td = float(dist(out, x_ref).mean())
                    val_loss = s.history["best_val_loss"] if name == "ld3" else s.history["hand_made_val_loss"].get(name)
                    res.rows.append({"dataset": case.dataset, "seed": seed, "solver": solver, "nfe": nfe, "grid": name,
                                     "teacher_distance": td, "metric": case.metric(out), "val_loss": val_loss})
                    if seed == seeds[0]:
                        res.samples[(solver, name, nfe)] = out[:keep].detach().cpu()
    return res


def explorer_data(results: dict, cases: dict, solvers, schedules) -> dict:
    """What notebook 03's explorer draws, compact: per (dataset, solver, grid, NFE) the first seed's
    samples (uint8 images, float16 points) and sigmas (LD3: the first seed's learned grid), every
    held-out row, and the names of the metrics."""
    samples, sigmas = {}, {}
    for name, res in results.items():
        process = cases[name].teacher.process
        for (solver, grid, nfe), x in res.samples.items():
            k = f"{name}|{solver}|{grid}|{nfe}"
            samples[k] = (to_uint8(x) if x.ndim == 4 else x.half())
            if grid == "ld3":
                seed = min(s for s, so, n in res.learned if (so, n) == (solver, nfe))
                t = torch.tensor(res.learned[(seed, solver, nfe)].times, dtype=torch.float64)
            else:
                t = hand_schedule(grid, process, nfe)
            sigmas[k] = process.sigma_bar(t).float()
    nfes = sorted({r["nfe"] for res in results.values() for r in res.rows})
    return {"datasets": list(results), "solvers": list(solvers), "grids": list(schedules) + ["ld3"], "nfes": nfes,
            "samples": samples, "sigmas": sigmas, "rows": [r for res in results.values() for r in res.rows],
            "metric_names": {name: c.metric_name for name, c in cases.items()}}

