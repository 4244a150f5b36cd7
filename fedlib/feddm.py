"""FedDM (``../shared/papers.md`` section 2): federated training of a diffusion model, as thin glue.

Client training is :func:`fedlib.federated.local_train` with the loss
:func:`fedlib.diffusion.denoiser.diffusion_loss`; the noise and times are drawn outside ``vmap`` by
:func:`noise_extras` (so vectorised == sequential); aggregation is :func:`fedlib.federated.fedavg`;
quantised updates are :mod:`fedlib.compression`. Nothing here trains a client or defines a loss.

Variants (one :class:`Variant` each, all trained side by side):

- ``vanilla``: FedAvg of the client models (every client, every round).
- ``prox``: each client adds (mu/2)||w - w_global||^2 (``local_train(mu=...)``).
- ``quant``: each client sends ``w_k - w_global`` through a :class:`~fedlib.compression.Quantizer`
  (``bits``, ``scheme``, ``rounding``); the server dequantises from the bytes and applies the
  n_k-weighted mean update. ``down_bits < 32`` also quantises the downlink: the server sends the
  change of the global model, quantised, and sets the global model to what the clients reconstruct,
  so server and clients agree.
- ``central``: one model trained on the union of the data by the same SGD code (one "client"),
  the same number of steps per round with a batch of K * B (the same samples per round as the K
  clients together).

Byte accounting (``CommLedger``, per group): round 1 sends the float32 model down to every client
(all variants; a shared-seed initialisation would save it, we count it); later rounds send the float32
model, or the quantised change when ``down_bits < 32``. Up: float32 client models, or the length of
the encoded quantised update. Central training sends nothing.

Everything that shares a proximal weight ``mu`` (variants x partitions x seeds) trains in one vmap:
``run_feddm`` makes one ``local_train`` call per distinct ``mu`` per round, plus one for ``central``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .compression import Quantizer, compress_stacked, float32_bytes
from .diffusion.denoiser import Denoiser, diffusion_loss, draw_noise_and_time
from .diffusion.networks import UNet
from .diffusion.process import make_process
from .federated import (CommLedger, ClientData, concat_clients, fedavg, get_params, local_train, masked_mean,
                        pack_clients)

Params = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# the model and the loss, as local_train wants them
def make_denoiser(in_channels: int = 1, channels: int = 16, channel_mults=(1, 2), blocks: int = 1,
                  process: str = "vp_linear", prediction: str = "eps", seed: int = 0) -> Denoiser:
    """FedDM's denoiser: a small U-Net with the DDPM objective (VP linear, eps-prediction) by default.
    The initialisation is seeded (every client of a run starts from the same weights)."""
    torch.manual_seed(seed)
    return Denoiser(UNet(in_channels, channels, tuple(channel_mults), blocks), make_process(process), prediction)


def diffusion_client_loss(denoiser: Denoiser):
    """``loss_fn`` for :func:`local_train` (called with ``model=denoiser.net``): the masked mean of
    :func:`diffusion_loss` at the batch's own ``eps`` and ``t`` (from :func:`noise_extras`)."""

    def loss_fn(call, params, batch):
        per_sample = diffusion_loss(denoiser, batch["x"], batch["eps"], batch["t"], params=params, reduction="none")
        return masked_mean(per_sample, batch["mask"])

    return loss_fn


def noise_extras(process):
    """``extras_fn`` for :func:`local_train`: eps and t drawn from the client's own generator."""

    def extras_fn(x, y, generator):
        eps, t = draw_noise_and_time(process, x, generator)
        return {"eps": eps, "t": t}

    return extras_fn


# ----------------------------------------------------------------------------------------------
# variants
@dataclass(frozen=True)
class Variant:
    name: str
    mu: float = 0.0
    bits: int = 32  # uplink; 32 = float32 models
    down_bits: int = 32
    scheme: str = "tensor"
    rounding: str = "nearest"
    central: bool = False

    @property
    def kind(self) -> str:
        return "central" if self.central else "quant" if self.bits < 32 or self.down_bits < 32 else (
            "prox" if self.mu else "vanilla")


def make_variants(mu=(0.01,), bits=(8, 4), scheme: str = "tensor", rounding: str = "nearest",
                  down_bits: int = 32, central: bool = True) -> list[Variant]:
    """vanilla, one prox per mu > 0, one quant per bits (< 32), and central."""
    out = [Variant("vanilla")]
    out += [Variant(f"prox mu={m:g}", mu=float(m)) for m in mu if m > 0]
    out += [Variant(f"quant {b}-bit" + (f" (down {down_bits})" if down_bits < 32 else ""), bits=int(b),
                    down_bits=int(down_bits), scheme=scheme, rounding=rounding) for b in bits if b < 32]
    if central:
        out.append(Variant("central", central=True))
    return out


# ----------------------------------------------------------------------------------------------
# sampling from many models at once
class StackedDenoiser:
    """G denoisers sharing one architecture (stacked params [G, ...]) as one callable for the
    samplers: ``x`` is [G * N, ...], group g's N samples contiguous."""

    def __init__(self, denoiser: Denoiser, params: Params):
        self.denoiser, self.params = denoiser, params
        self.process = denoiser.process
        self.groups = next(iter(params.values())).shape[0]

    def __call__(self, x, t, t_net=None):
        xg = x.reshape(self.groups, -1, *x.shape[1:])
        f = torch.func.vmap(lambda p, xi: self.denoiser(xi, t, t_net, params=p))
        return f(self.params, xg).reshape(x.shape)


@torch.no_grad()
def sample_stacked(denoiser: Denoiser, params: Params, n: int, steps: int = 20, sampler: str = "dpm_solver_pp_2m",
                   seed: int = 0, image_shape=None) -> tuple[Tensor, int]:
    """``n`` samples from each of G models (the same initial noise for every model): [G, n, ...], NFE.
    Grid: uniform in t from the process's t_max down to 0 (our choice; the same for every variant)."""
    from .diffusion.samplers import solve
    from .diffusion.schedules import karras_sigmas

    g_count = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    p = denoiser.process
    x_T = p.prior((n, *image_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    x_T = x_T.repeat(g_count, *([1] * len(image_shape)))
    times = torch.linspace(p.t_max, 0.0, steps + 1, dtype=torch.float64, device=device)
    if p.name == "edm":  # EDM: sigma grid with rho = 7 (Karras et al.), then 0
        sig = karras_sigmas(torch.linspace(0, 1, steps, dtype=torch.float64), p.t_min, p.t_max).to(device)
        times = torch.cat([sig, sig.new_zeros(1)])
    x0, nfe = solve(StackedDenoiser(denoiser, params), x_T, times, sampler)
    return x0.clamp(-1, 1).reshape(g_count, n, *image_shape), nfe


# ----------------------------------------------------------------------------------------------
# the federated run
@dataclass
class Group:
    """One trained model: a variant on one partition with one seed."""

    variant: Variant
    partition: str
    seed: int
    clients: ClientData
    params: Params
    ledger: CommLedger = field(default_factory=CommLedger)
    batch_scale: int = 1  # central: batch K * B, K the federated groups' client count
    next_down_bytes: int = 0  # quantised downlink: size of the change sent at the next round's start

    @property
    def label(self) -> str:
        return f"{self.variant.name} | {self.partition} | seed {self.seed}"


def _stack(params_list: list[Params]) -> Params:
    return {n: torch.stack([p[n] for p in params_list]) for n in params_list[0]}


def _repeat_each(params_list: list[Params], k: int) -> Params:
    """[G] Params -> stacked [G * K] with group g's copy repeated K times (block-major)."""
    return {n: torch.stack([p[n] for p in params_list]).repeat_interleave(k, dim=0) for n in params_list[0]}


def feddm_round(denoiser: Denoiser, groups: list[Group], round_: int, *, local_steps: int, batch_size: int,
                lr: float, momentum: float = 0.9, generator: torch.Generator | None = None,
                vectorised: bool = True, chunk_size: int | None = None, cache: dict | None = None) -> None:
    """One round for every group, in place: local training (one vmap per distinct mu, one for central),
    uplink (float32 or quantised), FedAvg, downlink, byte accounting. ``cache`` (a dict kept across
    rounds) holds the concatenated client data of each vmap, so it is built once, not every round."""

    def joined(gs):
        key = tuple(id(g) for g in gs)
        if cache is None:
            return concat_clients([g.clients for g in gs])
        if key not in cache:
            cache[key] = concat_clients([g.clients for g in gs])
        return cache[key]

    net, loss_fn, extras = denoiser.net, diffusion_client_loss(denoiser), noise_extras(denoiser.process)
    fed = [g for g in groups if not g.variant.central]
    by_mu: dict[float, list[Group]] = {}
    for g in fed:
        by_mu.setdefault(g.variant.mu, []).append(g)
    for mu, gs in by_mu.items():
        k = gs[0].clients.n_clients
        start = _repeat_each([g.params for g in gs], k)
        clients = joined(gs)
        w_k = local_train(net, start, clients, loss_fn, steps=local_steps, lr=lr, momentum=momentum, mu=mu,
                          batch_size=batch_size, generator=generator, extras_fn=extras, vectorised=vectorised,
                          chunk_size=chunk_size)
        for j, g in enumerate(gs):
            _aggregate(g, {n: p[j * k:(j + 1) * k] for n, p in w_k.items()}, round_, generator)
    central = [g for g in groups if g.variant.central]
    if central:
        w = local_train(net, _stack([g.params for g in central]), joined(central),
                        loss_fn, steps=local_steps, lr=lr, momentum=momentum, batch_size=batch_size * central[0].batch_scale,
                        generator=generator, extras_fn=extras, vectorised=vectorised, chunk_size=chunk_size)
        for j, g in enumerate(central):
            g.params = {n: p[j] for n, p in w.items()}


def _aggregate(g: Group, w_k: Params, round_: int, generator) -> None:
    v, k = g.variant, g.clients.n_clients
    model_bytes = float32_bytes(g.params)
    g.ledger.log(round_, "down", "model" if round_ == 1 or v.down_bits == 32 else f"update {v.down_bits}-bit",
                 model_bytes if round_ == 1 or v.down_bits == 32 else g.next_down_bytes, copies=k)
    if v.bits < 32:
        updates = {n: w_k[n] - g.params[n].unsqueeze(0) for n in w_k}
        received, sizes = compress_stacked(updates, Quantizer(v.bits, v.scheme, v.rounding), generator)
        mean_update = fedavg(received, g.clients.n_k)
        new = {n: g.params[n] + mean_update[n] for n in g.params}
        for s in sizes:
            g.ledger.log(round_, "up", f"update {v.bits}-bit", s)
    else:
        new = fedavg(w_k, g.clients.n_k)
        g.ledger.log(round_, "up", "model", model_bytes, copies=k)
    if v.down_bits < 32:
        # the clients hold the previous global model; they get the change, quantised, and the server
        # adopts what they reconstruct. Its bytes are logged at the start of the next round.
        change = {n: new[n] - g.params[n] for n in new}
        received, n_bytes = Quantizer(v.down_bits, v.scheme, v.rounding).roundtrip(change, generator)
        new = {n: g.params[n] + received[n] for n in new}
        g.next_down_bytes = n_bytes
    g.params = new


def build_groups(denoiser: Denoiser, x: Tensor, y: Tensor, partitions: dict[str, list], variants: list[Variant],
                 seeds, init: dict[int, Params]) -> list[Group]:
    """One Group per (variant, partition, seed); ``partitions[name][i]`` is seed i's list of client
    index arrays. Central groups ignore the partition (one per seed, labelled 'union'). Groups on the
    same (partition, seed) share one ClientData (read only)."""
    groups = []
    packed = {(pname, i): pack_clients(x, y, parts[i]) for pname, parts in partitions.items() for i in range(len(seeds))}
    union = pack_clients(x, y, [np.arange(len(x))]) if any(v.central for v in variants) else None
    for i, seed in enumerate(seeds):
        for v in variants:
            if v.central:
                k = len(next(iter(partitions.values()))[i])
                groups.append(Group(v, "union", seed, union, {n: p.clone() for n, p in init[seed].items()},
                                    batch_scale=k))
                continue
            for pname in partitions:
                groups.append(Group(v, pname, seed, packed[(pname, i)], {n: p.clone() for n, p in init[seed].items()}))
    return groups


def run_feddm(denoiser: Denoiser, groups: list[Group], rounds: int, *, local_steps: int, batch_size: int, lr: float,
              momentum: float = 0.9, eval_rounds=(), evaluate=None, seed: int = 0, progress: bool = True,
              chunk_size: int | None = None) -> list[dict]:
    """Train every group for ``rounds`` rounds. At each round in ``eval_rounds``, ``evaluate(groups)``
    returns one dict of metrics per group; rows with the cumulative bytes are returned."""
    gen = torch.Generator().manual_seed(seed)
    history, cache = [], {}
    for r in tqdm(range(1, rounds + 1), desc="FedDM rounds", disable=not progress):
        feddm_round(denoiser, groups, r, local_steps=local_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                    generator=gen, chunk_size=chunk_size, cache=cache)
        if evaluate is not None and r in set(eval_rounds):
            for g, m in zip(groups, evaluate(groups)):
                history.append({"variant": g.variant.name, "kind": g.variant.kind, "partition": g.partition,
                                "seed": g.seed, "round": r, "bytes_up": g.ledger.total("up"),
                                "bytes_down": g.ledger.total("down"), **m})
    return history


def params_of(denoiser: Denoiser) -> Params:
    return get_params(denoiser.net)



# ----------------------------------------------------------------------------------------------
# evaluation and the notebook's table
def fd_evaluator(denoiser: Denoiser, feature_net, reference, n: int, steps: int, sampler: str, image_shape,
                 seed: int = 0, max_images: int = 4096, keep: dict | None = None):
    """``evaluate(groups) -> [{"fd": ..., "nfe": ...}]`` for :func:`run_feddm`: ``n`` samples per model
    (the same initial noise, sampler and NFE for every model), Frechet distance in ``feature_net``'s
    space to ``reference`` (images or (mu, Sigma)); NOT comparable to Inception FID. At most
    ``max_images`` images are denoised at once (models x samples). The first 64 samples of each group
    are stored in ``keep[label]``."""
    from .metrics import classifier_fd, extract_features, gaussian_stats

    if not isinstance(reference, tuple):
        reference = gaussian_stats(extract_features(feature_net, reference))
    per_call = min(n, max_images)
    models_per_call = max(1, max_images // per_call)

    def evaluate(groups):
        out = []
        for i in range(0, len(groups), models_per_call):
            chunk = groups[i:i + models_per_call]
            params = _stack([g.params for g in chunk])
            parts = []
            for j, start in enumerate(range(0, n, per_call)):
                x, nfe = sample_stacked(denoiser, params, min(per_call, n - start), steps, sampler, seed + j, image_shape)
                parts.append(x.cpu())
            x = torch.cat(parts, dim=1)
            for g, xg in zip(chunk, x):
                out.append({"fd": classifier_fd(feature_net, xg, reference), "nfe": nfe})
                if keep is not None:
                    keep[g.label] = xg[:64]
        return out

    return evaluate


def summary_table(history: list[dict], model_bytes: int):
    """Per (variant, partition), the last evaluated round, mean over seeds: bytes up/down, uplink
    reduction vs float32, final FD (mean and std), FD ratio to vanilla on the same partition."""
    import pandas as pd

    h = pd.DataFrame(history)
    last = h[h["round"] == h["round"].max()]
    t = last.groupby(["partition", "variant"], sort=False).agg(
        kind=("kind", "first"), bytes_up=("bytes_up", "mean"), bytes_down=("bytes_down", "mean"),
        fd=("fd", "mean"), fd_std=("fd", "std"), seeds=("seed", "nunique")).reset_index()
    fed_up = t[t["kind"] == "vanilla"].set_index("partition")["bytes_up"]
    t["up_reduction"] = [fed_up.get(p, float("nan")) / u if u > 0 else float("nan")
                         for p, u in zip(t["partition"], t["bytes_up"])]
    van = t[t["kind"] == "vanilla"].set_index("partition")["fd"]
    t["fd_ratio_vs_vanilla"] = [f / van[p] if p in van else float("nan") for p, f in zip(t["partition"], t["fd"])]
    return t
