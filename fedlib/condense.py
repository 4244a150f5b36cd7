"""Dataset distillation: learn a small synthetic set S (``ipc`` images per class) that stands in for the
real training set (docs/methods.md, NCFM). Two matching objectives on the features f(x) of randomly
initialised ConvNets (a fresh one drawn every iteration, :func:`random_feature_net`), and a baseline:

- **DM** (distribution matching, Zhao & Bilen): per class c, ||mean_{x in X_c} f(x) - mean_{s in S_c} f(s)||^2,
  summed over classes (:func:`dm_loss`, :func:`distill_dm`; FedLGD's local virtual sets reuse it).
- **NCFM** (Wang et al., CVPR 2025): the neural characteristic function discrepancy. For a set X and a
  frequency t, phi_X(t) = mean_x exp(i t^T f(x)) = |phi_X| exp(i theta_X). With

      amplitude(t) = (|phi_X| - |phi_S|)^2,   phase(t) = 2 |phi_X| |phi_S| (1 - cos(theta_X - theta_S)),

  amplitude + phase = |phi_X - phi_S|^2 exactly, and NCFD = mean_t [alpha amplitude + (1 - alpha) phase]
  (:func:`ncfd_terms`, :func:`ncfd`; alpha = 1/2 is half the plain CF distance). The frequencies come from a
  sampling network psi (:class:`FrequencySampler`: Gaussian noise -> t) that takes an ascent step on NCFD
  while S takes a descent step (min-max, alternating; :func:`distill_ncfm`), per class, summed over classes.
- **random real subset** of the same size (:func:`random_subset`).

A set is judged by the test accuracy of a fresh classifier trained on it (:func:`evaluate_sets`: every
set, every seed, in one vectorised :func:`fedlib.federated.local_train`).

Costs: :func:`distill_ncfm` / :func:`distill_dm` time every iteration (``history["seconds"]``) and count
the bytes autograd keeps for the backward pass of one iteration (``saved_bytes``, through
``torch.autograd.graph.saved_tensors_hooks``): a deterministic stand-in for the activation memory that
dominates a GPU's peak memory in the paper's comparison; and the floating-point operations of the first
iteration (``flops``, through ``torch.utils.flop_counter``: matrix products and convolutions), the time
cost that repeats exactly from run to run where seconds do not.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .federated import functional, get_params, local_train, pack_clients, predict, stack_params
from .models import SmallCNN
from .utils import check_choice

INITS = ("real", "noise")


def _check(name: str, value, ok: bool, rule: str, fix: str):
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {rule}. {fix}")


@dataclass
class CondenseConfig:
    """Settings of one distillation run (the notebook's parameter names; the paper's values in comments)."""

    ipc: int = 10  # synthetic images per class (paper: 1, 10, 50)
    iterations: int = 200  # updates of S (paper: 20000 on CIFAR-10)
    batch_real: int = 64  # real images per class per iteration (paper: 256 on CIFAR-10 as in DM)
    lr_images: float = 0.05  # Adam on the synthetic pixels (ours; the same for DM and NCFM)
    lr_sampler: float = 1e-4  # Adam on the sampling network psi (ascent); ours, see FrequencySampler
    alpha: float = 0.5  # weight of the amplitude term; 1 - alpha weighs the phase term
    n_freqs: int = 64  # frequencies t drawn per iteration (shared by the classes)
    freq_scale: float = 1.0  # initial spread of t, in units of 1 / sqrt(feature dim)
    feature_width: int = 8  # width of the random feature ConvNets (fedlib's SmallCNN)
    init: str = "real"  # start S from random real images of its class, or from noise
    seed: int = 0

    def __post_init__(self):
        _check("ipc", self.ipc, isinstance(self.ipc, int) and self.ipc >= 1, "an integer >= 1",
               "Give the number of synthetic images per class, e.g. 1 or 10.")
        _check("iterations", self.iterations, isinstance(self.iterations, int) and self.iterations >= 1,
               "an integer >= 1", "Give the number of updates of the synthetic set.")
        _check("batch_real", self.batch_real, isinstance(self.batch_real, int) and self.batch_real >= 1,
               "an integer >= 1", "Give the number of real images per class per iteration.")
        for name in ("lr_images", "lr_sampler", "freq_scale"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a finite number > 0",
                   "Learning rates and the frequency scale must be positive.")
        _check("alpha", self.alpha, isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0,
               "a number in [0, 1]", "alpha weighs the amplitude term, 1 - alpha the phase term.")
        _check("n_freqs", self.n_freqs, isinstance(self.n_freqs, int) and self.n_freqs >= 1, "an integer >= 1",
               "Give how many frequencies t to draw per iteration, e.g. 64.")
        _check("feature_width", self.feature_width, isinstance(self.feature_width, int) and self.feature_width >= 1,
               "an integer >= 1", "Give the channel width of the random feature ConvNets, e.g. 8.")
        check_choice("init", self.init, INITS, fix="'real' starts from real images (the papers' default).")


# ----------------------------------------------------------------------------------------------
# the discrepancies
def characteristic_function(feat: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None):
    """(Re, Im) of the empirical characteristic function of features ``feat`` [N, d] at frequencies ``t``
    [T, d]: [T] each, or [C, T] with ``weights`` [C, N] (rows: one class's averaging weights)."""
    arg = feat @ t.T  # [N, T]
    if weights is None:
        return torch.cos(arg).mean(0), torch.sin(arg).mean(0)
    return weights @ torch.cos(arg), weights @ torch.sin(arg)


def _terms(re_x, im_x, re_s, im_s, eps: float = 0.0):
    amp_x = torch.sqrt(re_x**2 + im_x**2 + eps)
    amp_s = torch.sqrt(re_s**2 + im_s**2 + eps)
    # 2|phi_X||phi_S|(1 - cos(theta_X - theta_S)) with |phi_X||phi_S| cos(dtheta) = Re(phi_X conj phi_S):
    # no angle is taken, so the term is smooth where an amplitude is 0
    amplitude = (amp_x - amp_s) ** 2
    phase = 2.0 * (amp_x * amp_s - (re_x * re_s + im_x * im_s))
    return amplitude, phase


def ncfd_terms(feat_real: torch.Tensor, feat_syn: torch.Tensor, t: torch.Tensor, eps: float = 0.0):
    """The amplitude and phase terms of NCFD per frequency ([T] each); their sum is |phi_X(t) - phi_S(t)|^2."""
    return _terms(*characteristic_function(feat_real, t), *characteristic_function(feat_syn, t), eps=eps)


def ncfd(feat_real: torch.Tensor, feat_syn: torch.Tensor, t: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """NCFD(X, S) = mean_t [alpha amplitude(t) + (1 - alpha) phase(t)] (a scalar)."""
    amplitude, phase = ncfd_terms(feat_real, feat_syn, t, eps=1e-12)
    return (alpha * amplitude + (1.0 - alpha) * phase).mean()


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[C, N] averaging weights: row c is 1/n_c on the samples of class c."""
    onehot = torch.nn.functional.one_hot(y, n_classes).T.float()
    return onehot / onehot.sum(1, keepdim=True).clamp_min(1.0)


def ncfd_per_class(feat_real, y_real, feat_syn, y_syn, t, n_classes: int, alpha: float = 0.5) -> torch.Tensor:
    """sum_c NCFD(X_c, S_c), every class at the same frequencies ``t``."""
    re_x, im_x = characteristic_function(feat_real, t, class_weights(y_real, n_classes))
    re_s, im_s = characteristic_function(feat_syn, t, class_weights(y_syn, n_classes))
    amplitude, phase = _terms(re_x, im_x, re_s, im_s, eps=1e-12)
    return (alpha * amplitude + (1.0 - alpha) * phase).mean(1).sum()


def dm_loss(feat_real, y_real, feat_syn, y_syn, n_classes: int) -> torch.Tensor:
    """DM: sum_c ||mean f(X_c) - mean f(S_c)||^2."""
    diff = class_weights(y_real, n_classes) @ feat_real - class_weights(y_syn, n_classes) @ feat_syn
    return (diff**2).sum()


# ----------------------------------------------------------------------------------------------
# networks
def random_feature_net(sample_shape: tuple, width: int, generator: torch.Generator, device=None) -> nn.Module:
    """A freshly initialised SmallCNN's feature trunk (frozen), drawn from ``generator`` (so DM and NCFM
    runs of one seed see the same sequence of networks). Kaiming-normal convolutions, zero biases."""
    net = SmallCNN(sample_shape[0], 2, width=width, image_size=sample_shape[-1]).features
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                m.bias.zero_()
    net.requires_grad_(False)
    return net.to(device) if device is not None else net


def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x).flatten(1)


def feature_dim(sample_shape: tuple, width: int) -> int:
    net = SmallCNN(sample_shape[0], 2, width=width, image_size=sample_shape[-1])
    return net.head.in_features


class FrequencySampler(nn.Module):
    """psi: Gaussian noise z [n, d] -> frequencies t = scale (z + MLP(z)). The MLP's last layer starts at
    zero, so at initialisation t ~ N(0, scale^2 I) (scale = freq_scale / sqrt(d)); ascent on NCFD then
    moves the distribution of t to where the two characteristic functions differ most.

    With ``fixed_norm`` (the default) the drawn frequencies are rescaled so that their mean squared norm
    stays freq_scale^2 (its value at initialisation): psi chooses the directions and the relative spread
    of t, not its overall size. Without it the ascent runs off to high frequencies, where a set of a few
    points keeps |phi_S| near 1 while the real set's |phi_X| decays, so NCFD is large whatever S does and
    the synthetic step follows noise (our choice; the runaway was seen on a validation split of
    digits' training set, docs/methods.md §7)."""

    def __init__(self, dim: int, hidden: int = 64, freq_scale: float = 1.0, fixed_norm: bool = True):
        super().__init__()
        self.dim, self.scale, self.freq_scale, self.fixed_norm = dim, freq_scale / math.sqrt(dim), freq_scale, fixed_norm
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=generator).to(self.mlp[0].weight.device)
        t = self.scale * (z + self.mlp(z))
        if self.fixed_norm:
            t = t * (self.freq_scale / t.pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
        return t


# ----------------------------------------------------------------------------------------------
# the synthetic sets
@dataclass
class SyntheticSet:
    x: torch.Tensor  # [C * ipc, ...] in [-1, 1], class-major
    y: torch.Tensor  # [C * ipc]
    method: str
    seed: int
    history: dict = field(default_factory=dict)  # per iteration: "loss", "seconds"; "saved_bytes" (one number)


def _class_indices(y: torch.Tensor, n_classes: int) -> list[torch.Tensor]:
    idx = [torch.nonzero(y == c).flatten() for c in range(n_classes)]
    empty = [c for c, i in enumerate(idx) if len(i) == 0]
    if empty:
        raise ValueError(f"classes {empty} have no real images; allowed: every class present. Distil a dataset "
                         "whose training split holds every class")
    return idx


def _present_indices(y: torch.Tensor, n_classes: int, ipc: int) -> list[tuple[int, torch.Tensor]]:
    """(class, indices) of the classes a client holds at least ``ipc`` images of: a client of a label-skewed
    partition distils only those (FedLGD's local virtual sets), so a class it barely holds is left out."""
    idx = [(c, torch.nonzero(y == c).flatten()) for c in range(n_classes)]
    kept = [(c, i) for c, i in idx if len(i) >= ipc]
    if not kept:
        raise ValueError(f"ipc={ipc} is larger than every class of this client holds; allowed: ipc <= its "
                         f"largest class ({max(len(i) for _, i in idx)}). Use a smaller ipc")
    return kept


def random_subset(x: torch.Tensor, y: torch.Tensor, n_classes: int, ipc: int, seed: int = 0,
                  present_only: bool = False) -> SyntheticSet:
    """``ipc`` distinct random real images of every class (class-major), seeded. With ``present_only``
    only the classes holding at least ``ipc`` images (a client's local set under label skew)."""
    g = torch.Generator().manual_seed(seed)
    if present_only:
        pairs = _present_indices(y.cpu(), n_classes, ipc)
        pick = torch.cat([i[torch.randperm(len(i), generator=g)[:ipc]] for _, i in pairs])
        return SyntheticSet(x[pick.to(x.device)].clone(), y[pick.to(y.device)].clone(), "random", seed)
    idx = _class_indices(y.cpu(), n_classes)
    small = [c for c, i in enumerate(idx) if len(i) < ipc]
    if small:
        raise ValueError(f"ipc={ipc} is larger than classes {small} hold; allowed: ipc <= the smallest class "
                         f"({min(len(i) for i in idx)}). Use a smaller ipc")
    pick = torch.cat([i[torch.randperm(len(i), generator=g)[:ipc]] for i in idx])
    return SyntheticSet(x[pick.to(x.device)].clone(), y[pick.to(y.device)].clone(), "random", seed)


def _real_batch(x, idx, batch, g, classes=None):
    picks = [i[torch.randint(len(i), (min(batch, len(i)),), generator=g)] for i in idx]
    sizes = [len(p) for p in picks]
    classes = range(len(idx)) if classes is None else classes
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in zip(classes, sizes)])
    return x[torch.cat(picks).to(x.device)], labels.to(x.device)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` builds its graph (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _distil(method: str, x_real, y_real, n_classes: int, cfg: CondenseConfig, device=None, progress: bool = False,
            present_only: bool = False, start: SyntheticSet | None = None, feature_net=None):
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else x_real.device
    x_real, y_real = x_real.to(device), y_real.to(device)
    shape = tuple(x_real.shape[1:])
    classes = None
    if present_only or start is not None:
        held = sorted(set(start.y.tolist())) if start is not None else [c for c, _ in
                                                                         _present_indices(y_real.cpu(), n_classes, cfg.ipc)]
        classes = held
        idx = [torch.nonzero(y_real.cpu() == c).flatten() for c in held]
    else:
        idx = _class_indices(y_real.cpu(), n_classes)
    g = torch.Generator().manual_seed(cfg.seed)
    init = start if start is not None else random_subset(x_real, y_real, n_classes, cfg.ipc, seed=cfg.seed,
                                                         present_only=present_only)
    init_x = init.x.to(device)
    syn = init_x.clone() if cfg.init == "real" or start is not None else torch.randn(init_x.shape, generator=g).clamp(-1, 1).to(device)
    syn.requires_grad_(True)
    y_syn = init.y.to(device)
    opt = torch.optim.Adam([syn], lr=cfg.lr_images)
    sampler = opt_psi = None
    if method == "ncfm":
        g_psi = torch.Generator().manual_seed(cfg.seed + 1)  # the sampler's own stream: nets and batches match DM's
        torch.manual_seed(cfg.seed)
        sampler = FrequencySampler(feature_dim(shape, cfg.feature_width), freq_scale=cfg.freq_scale).to(device)
        opt_psi = torch.optim.Adam(sampler.parameters(), lr=cfg.lr_sampler)
    history = {"loss": [], "seconds": [], "saved_bytes": 0, "flops": 0}
    for it in tqdm(range(cfg.iterations), desc=f"{method} ipc {cfg.ipc} seed {cfg.seed}", disable=not progress,
                   leave=False):
        start = time.perf_counter()  # the whole iteration, drawing the network and the batch included
        # the first iteration's floating-point operations, counted: a cost that repeats exactly, unlike seconds
        counter = FlopCounterMode(display=False) if it == 0 else contextlib.nullcontext()
        counter.__enter__()
        # FedLGD's iterative DM matches through the current global model's features instead of a random net
        net = feature_net if feature_net is not None else random_feature_net(shape, cfg.feature_width, g, device)
        xb, yb = _real_batch(x_real, idx, cfg.batch_real, g, classes)
        with torch.no_grad():
            f_real = features(net, xb)
        if method == "ncfm":
            # ascent step of psi on the current S (detached), then descent step of S at fresh frequencies
            f_syn = features(net, syn.detach())
            t = sampler(cfg.n_freqs, g_psi)
            gain = -ncfd_per_class(f_real, yb, f_syn, y_syn, t, n_classes, cfg.alpha)
            opt_psi.zero_grad(set_to_none=True)
            gain.backward()
            opt_psi.step()
            with torch.no_grad():
                t = sampler(cfg.n_freqs, g_psi)

            def objective():
                return ncfd_per_class(f_real, yb, features(net, syn), y_syn, t, n_classes, cfg.alpha)
        else:
            def objective():
                return dm_loss(f_real, yb, features(net, syn), y_syn, n_classes)
        if it == 0:
            loss, history["saved_bytes"] = _saved_bytes(objective)
        else:
            loss = objective()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            syn.clamp_(-1.0, 1.0)
        counter.__exit__(None, None, None)
        if it == 0:
            history["flops"] = int(counter.get_total_flops())
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: time them, not their launch
        history["seconds"].append(time.perf_counter() - start)
        history["loss"].append(float(loss.detach()))
    return SyntheticSet(syn.detach().clone(), y_syn.clone(), method, cfg.seed, history)


def distill_dm(x_real, y_real, n_classes: int, cfg: CondenseConfig, device=None, progress: bool = False, *,
               present_only: bool = False, start: SyntheticSet | None = None, feature_net=None) -> SyntheticSet:
    """DM: S learned to match each class's mean feature under a fresh random ConvNet every iteration.

    For FedLGD's clients: ``present_only`` distils only the classes the client holds at least ``ipc`` images
    of (label skew); ``start`` continues from an existing set (its classes) instead of a random real subset;
    ``feature_net`` (a frozen module, images -> features) replaces the random ConvNets by one fixed network,
    the current global model's trunk in FedLGD's iterative distribution matching."""
    return _distil("dm", x_real, y_real, n_classes, cfg, device, progress, present_only, start, feature_net)


def distill_ncfm(x_real, y_real, n_classes: int, cfg: CondenseConfig, device=None, progress: bool = False) -> SyntheticSet:
    """NCFM: S minimises the per-class NCFD at frequencies from psi, which maximises it (one ascent step of
    psi, then one descent step of S, per iteration); same networks and real batches as :func:`distill_dm`."""
    return _distil("ncfm", x_real, y_real, n_classes, cfg, device, progress)


@torch.no_grad()
def measure_ncfd(x_real, y_real, sets: list[SyntheticSet], n_classes: int, *, n_nets: int = 4, n_freqs: int = 256,
                 width: int = 8, freq_scale: float = 1.0, alpha: float = 0.5, seed: int = 12345) -> list[float]:
    """NCFD of each synthetic set to the whole real set at fixed Gaussian frequencies, averaged over ``n_nets``
    fixed random networks: a yardstick that does not move during training (psi's frequencies do)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(x_real.shape[1:])
    d = feature_dim(shape, width)
    total = [0.0] * len(sets)
    for _ in range(n_nets):
        net = random_feature_net(shape, width, g, x_real.device)
        t = (torch.randn(n_freqs, d, generator=g) * freq_scale / math.sqrt(d)).to(x_real.device)
        f_real = features(net, x_real)
        for k, s in enumerate(sets):
            total[k] += float(ncfd_per_class(f_real, y_real, features(net, s.x.to(x_real.device)), s.y.to(x_real.device),
                                             t, n_classes, alpha))
    return [v / n_nets for v in total]


# ----------------------------------------------------------------------------------------------
# evaluation: a fresh classifier trained on each set
@dataclass
class EvalConfig:
    steps: int = 300  # SGD steps on the synthetic set
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 256
    width: int = 8  # the classifier's width (fedlib's SmallCNN)

    def __post_init__(self):
        for name in ("steps", "batch_size", "width"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, int) and v >= 1, "an integer >= 1", f"Give a positive {name}.")
        _check("lr", self.lr, self.lr > 0, "a number > 0", "Give a positive learning rate.")
        _check("momentum", self.momentum, 0 <= self.momentum < 1, "a number in [0, 1)", "Use 0.9 or 0.")


def evaluate_sets(sets: list[SyntheticSet], x_test, y_test, n_classes: int, cfg: EvalConfig = EvalConfig()):
    """Test accuracy of a SmallCNN trained from scratch on each set ([len(sets)] floats). The classifier of
    a set of seed s starts from the same weights whatever its method, and sets of one size train together
    in one vectorised :func:`fedlib.federated.local_train` (batches of min(batch_size, set size): a group
    never computes on padding)."""
    if not sets:
        raise ValueError("no sets to evaluate; pass at least one SyntheticSet")
    device = x_test.device
    shape = tuple(sets[0].x.shape[1:])
    model = SmallCNN(shape[0], n_classes, width=cfg.width, image_size=shape[-1]).to(device)
    call = functional(model)
    out = [None] * len(sets)
    for size in sorted({len(s.y) for s in sets}):
        members = [k for k, s in enumerate(sets) if len(s.y) == size]
        x = torch.cat([sets[k].x.to(device) for k in members])
        y = torch.cat([sets[k].y.to(device) for k in members])
        clients = pack_clients(x, y, [list(range(j * size, (j + 1) * size)) for j in range(len(members))])
        starts = []
        for k in members:
            torch.manual_seed(10_000 + sets[k].seed)
            starts.append(get_params(SmallCNN(shape[0], n_classes, width=cfg.width, image_size=shape[-1]).to(device)))
        trained = local_train(model, stack_params(starts), clients, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum,
                              batch_size=min(cfg.batch_size, size), generator=torch.Generator().manual_seed(size))
        acc = (predict(call, trained, x_test, stacked=True).argmax(-1) == y_test).float().mean(-1)
        for k, a in zip(members, acc.tolist()):
            out[k] = a
    return out
