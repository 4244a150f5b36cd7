"""LD3: learning to discretise the sampling ODE (Tong et al., ICLR 2025; papers.md section 4).

With the network frozen, learn the N+1 time points of one sampler at one NFE from a small teacher
set of (x_T, x_0*) pairs by backpropagating through the whole few-step solve.

- :func:`ld3_times` - the cumulative-softmax parameterisation: p = softmax(theta), c = cumsum(p),
  u_i = (c_i - c_0)/(c_N - c_0) in [0, 1] (papers.md writes 1 - c_0 for c_N - c_0; equal) (monotone for any logits, u_0 = 0 and u_N = 1 exactly);
  pixel-space models place lambda_i = lambda_min + u_i (lambda_max - lambda_min) (uniform in
  log-SNR at theta = 1), latent models place t the same way (``space="t"``).
- :func:`network_times` - the decoupled network time: phi shifts the *interior* points in the same
  variable, clamped to +-0.5 x the smallest gap; the end points never move.
- :func:`teacher_pairs` - x_T and a high-NFE solve (UniPC, NFE 20, EDM schedule by default).
- :func:`learned_timesteps` - the soft ball-relaxed objective with accept-if-better, two phases
  (theta alone, then theta and phi), validation after every step keeping the best, plateau decay.
- :class:`LearnedSchedule` - the result, saved / reloaded per (model, solver, NFE).

Losses: ``"l2"``; ``"features"`` (squared distance in the feature space of fedlib's own classifier,
:func:`fedlib.metrics.feature_extractor`, plus L2); ``"lpips"`` only when its weights are on disk
(clear error otherwise).

Choices the paper leaves open (ours): the movable noise x'_T takes a normalised gradient step of
length r, then is projected on the ball ||x'_T - x_T|| <= r sigma_T; acceptance compares the
per-sample loss at the old and the proposed x'_T under the updated schedule.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .diffusion.samplers import solve
from .diffusion.schedules import schedule as hand_schedule
from .utils import atomic_write, cache_dir, check_choice, load_cache_entry

LOSSES = ("l2", "features", "lpips")
LD3_SOLVERS = ("euler", "ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "unipc", "unipc_bh1")


def ld3_u(theta: torch.Tensor) -> torch.Tensor:
    """u in [0, 1], non-decreasing, u_0 = 0, u_N = 1 exactly, from N+1 logits.

    (c_i - c_0)/(c_N - c_0) with c = cumsum(softmax(theta)) equals cumsum(softmax(theta[1:])) (the
    normaliser cancels; theta_0 drops out), which is how it is computed: no 0/0 when theta_0
    dominates the softmax."""
    c = torch.cumsum(torch.softmax(theta[..., 1:], dim=-1), dim=-1)
    return torch.cat([torch.zeros_like(c[..., :1]), c / c[..., -1:]], dim=-1)


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


def learned_timesteps(denoiser, solver: str, nfe: int, train_pairs, val_pairs, loss: str = "l2",
                      feature_fn=None, space: str = "lambda", rounds_theta: int = 2, rounds_both: int = 5,
                      batch_size: int = 2, lr_theta: float = 5e-3, lr_phi: float | None = None,
                      momentum: float = 0.9, clip: float = 1.0, patience: int = 5, decay: float = 0.8,
                      ball_scale: float = 1e-3, soft: bool = True, validate_every: int = 1, seed: int = 0,
                      model_name: str = "model", progress: bool = False) -> LearnedSchedule:
    """Learn the N+1 times (N = ``nfe`` steps) of ``solver`` for the frozen ``denoiser``.

    ``train_pairs`` / ``val_pairs``: (x_T, x_0*) tensors from :func:`teacher_pairs`. Returns the
    best-on-validation :class:`LearnedSchedule` with ``history`` (val losses, the hand-made
    uniform-lambda start's val loss, acceptances, wall time).
    """
    check_choice("LD3 solver", solver, LD3_SOLVERS, fix="Heun uses 2 NFE per step; learn its times with 'euler' or a multistep solver.")
    dist = make_loss(loss, feature_fn)
    process = denoiser.process
    xT_tr, x0_tr = train_pairs
    xT_va, x0_va = val_pairs
    device = xT_tr.device
    theta = torch.ones(nfe + 1, dtype=torch.float64, device=device, requires_grad=True)
    phi = torch.zeros(nfe + 1, dtype=torch.float64, device=device, requires_grad=True)
    opt_theta = torch.optim.RMSprop([theta], lr=lr_theta, momentum=momentum)
    opt_phi = torch.optim.SGD([phi], lr=(0.1 / nfe) if lr_phi is None else lr_phi)
    d = xT_tr[0].numel()
    r = ball_scale * d / nfe**2 * float(process.sigma(torch.tensor(process.t_max)))  # unit-variance units
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
    def validate():
        return float(dist(solve_at(xT_va, theta, phi, grad=False), x0_va).mean())

    t0 = time.perf_counter()
    best = validate()
    hist = {"val_loss": [best], "start_val_loss": best, "accepted": 0, "proposed": 0, "steps": 0}
    best_state = (theta.detach().clone(), phi.detach().clone())
    stale, step = 0, 0
    phases = [("theta", rounds_theta), ("both", rounds_both)]
    for phase, rounds in phases:
        for _ in range(rounds):
            perm = torch.randperm(len(xT_tr), generator=g).to(device)
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                x_start = xT_soft[idx].clone().requires_grad_(soft)
                out = solve_at(x_start, theta, phi if phase == "both" else phi.detach())
                per = dist(out, x0_tr[idx])
                opt_theta.zero_grad(set_to_none=True)
                opt_phi.zero_grad(set_to_none=True)
                per.mean().backward()
                torch.nn.utils.clip_grad_norm_([theta, phi], clip)
                opt_theta.step()
                if phase == "both":
                    opt_phi.step()
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
                if step % validate_every:
                    continue
                v = validate()
                hist["val_loss"].append(v)
                if v < best:
                    best, stale = v, 0
                    best_state = (theta.detach().clone(), phi.detach().clone())
                else:
                    stale += 1
                    if stale >= patience:
                        for opt in (opt_theta, opt_phi):
                            for grp in opt.param_groups:
                                grp["lr"] *= decay
                        stale = 0
    for prm, flag in zip(denoiser.parameters(), was_trainable):
        prm.requires_grad_(flag)
    hist["steps"] = step
    hist["best_val_loss"] = best
    hist["wall_time_s"] = time.perf_counter() - t0
    th, ph = best_state
    return LearnedSchedule(model=model_name, solver=solver, nfe=nfe, space=space,
                           theta=th.tolist(), phi=ph.tolist(),
                           times=ld3_times(th, process, space).tolist(),
                           network_times=network_times(th, ph, process, space).tolist(), history=hist)


def load_or_learn(denoiser, solver: str, nfe: int, train_pairs, val_pairs, model_name: str,
                  retrain: bool = False, **kw) -> LearnedSchedule:
    """Reload the saved schedule of (model, solver, NFE) or learn and save it (also when the saved
    file cannot be read: it is reported, removed and learned again)."""
    path = schedule_path(model_name, solver, nfe)
    s = None if retrain else load_cache_entry(path, LearnedSchedule.load)
    if s is not None:
        s.history["cached"] = True
        return s
    s = learned_timesteps(denoiser, solver, nfe, train_pairs, val_pairs, model_name=model_name, **kw)
    s.save(path)
    s.history["cached"] = False
    return s


# ---------------------------------------------------------------------------------------------
# Comparing discretisations (notebook 03)


@torch.no_grad()
def compare_discretisations(denoiser, x_T: torch.Tensor, solvers, schedules, nfes, metric,
                            learned: dict | None = None, batch_size: int = 500) -> list[dict]:
    """One row per (solver, schedule, NFE) - and per learned schedule, ``learned[(solver, nfe)]`` -
    with ``metric(samples) -> dict`` evaluated on the samples from the same ``x_T``."""
    rows = []
    for solver in solvers:
        for nfe in nfes:
            for name in schedules:
                times = hand_schedule(name, denoiser.process, nfe).to(x_T.device)
                out, used = solve(denoiser, x_T, times, solver, batch_size=batch_size)
                rows.append({"solver": solver, "schedule": name, "nfe": used, **metric(out)})
            if learned and (solver, nfe) in learned:
                times, tn = learned[(solver, nfe)].tensors(x_T.device)
                out, used = solve(denoiser, x_T, times, solver, tn, batch_size=batch_size)
                rows.append({"solver": solver, "schedule": "ld3", "nfe": used, **metric(out)})
    return rows
