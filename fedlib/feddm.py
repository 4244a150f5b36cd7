"""FedDM (``../shared/papers.md`` section 2): federated training of a diffusion model, as thin glue.

Client training is :func:`fedlib.federated.local_train` with the loss
:func:`fedlib.diffusion.denoiser.diffusion_loss`; the noise and times are drawn outside ``vmap`` by
:func:`noise_extras` (so vectorised == sequential); aggregation is :func:`fedlib.federated.fedavg`;
quantised updates are :mod:`fedlib.compression`. Nothing here trains a client or defines a loss.

Variants (one :class:`Variant` each, all trained side by side):

- ``vanilla``: FedAvg of the client models (every client, every round).
- ``prox``: each client adds (mu/2)||w - w_global||^2 (``local_train(mu=...)``).
- ``quant``: each client sends ``w_k - w_global`` through the variant's ``uplink``
  :class:`~fedlib.compression.Quantizer` (bits, scheme, rounding; ``None`` = float32 models); the
  server dequantises from the bytes and applies the n_k-weighted mean update. A ``downlink`` quantiser
  also quantises the downlink: the server sends the change of the global model, quantised, and sets
  the global model to what the clients reconstruct, so server and clients agree.
- ``central``: one model trained on the union of the data by the same SGD code (one "client"),
  the same number of steps per round with a batch of K * B (the same samples per round as the K
  clients together).

Byte accounting (``CommLedger``, per group): round 1 sends the float32 model down to every client
(all variants; a shared-seed initialisation would save it, we count it); later rounds send the float32
model, or the quantised change with a downlink quantiser. Up: float32 client models, or the length of
the encoded quantised update. Central training sends nothing.

One round = the clients' uploads (:func:`upload`: what travels) and the server's step per group
(:func:`aggregate`: bytes, FedAvg over the accepted clients, downlink), plus :func:`train_central`
and :func:`record_history`; the in-process driver (:func:`run_feddm`) and the Flower one
(:func:`fedlib.flower.run_feddm`, chosen by :func:`fedlib.backends.run_feddm`) share all of them.
In-process, everything that shares a proximal weight ``mu`` (variants x partitions x seeds) trains in
one vmap: one ``local_train`` call per distinct ``mu`` per round, plus one for ``central``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .compression import (Quantizer, decode, dequantize_params, encode, float32_bytes, layout, layout_bytes,
                          payload_bytes,
                          quantize_params)
from .diffusion.denoiser import Denoiser, diffusion_loss, draw_noise_and_time
from .diffusion.networks import UNet
from .diffusion.process import make_process
from .federated import (CPU_CHUNK, CommLedger, ClientData, concat_clients, fedavg, get_params, local_train,
                        masked_mean, pack_clients, stack_params)
from .utils import build_config, check_number

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
    """One FedDM variant: ``mu`` (FedProx's proximal weight; 0 = none), ``uplink`` / ``downlink``
    quantisers (None: float32), or ``central`` training on the union."""

    name: str
    mu: float = 0.0
    uplink: Quantizer | None = None
    downlink: Quantizer | None = None
    central: bool = False

    @property
    def kind(self) -> str:
        return "central" if self.central else "quant" if self.uplink or self.downlink else (
            "prox" if self.mu else "vanilla")


def make_variants(mu=(0.01,), bits=(8, 4), scheme: str = "tensor", rounding: str = "nearest",
                  down_bits: int = 32, central: bool = True) -> list[Variant]:
    """vanilla, one prox per mu > 0, one quant per bits (< 32; a downlink quantiser too when
    ``down_bits`` < 32), and central."""
    down = Quantizer(int(down_bits), scheme, rounding) if down_bits < 32 else None
    out = [Variant("vanilla")]
    out += [Variant(f"prox mu={m:g}", mu=float(m)) for m in mu if m > 0]
    out += [Variant(f"quant {b}-bit" + (f" (down {down_bits})" if down else ""),
                    uplink=Quantizer(int(b), scheme, rounding), downlink=down) for b in bits if b < 32]
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


def _repeat_each(params_list: list[Params], k: int) -> Params:
    """[G] Params -> stacked [G * K] with group g's copy repeated K times (block-major)."""
    return {n: torch.stack([p[n] for p in params_list]).repeat_interleave(k, dim=0) for n in params_list[0]}


@dataclass
class Upload:
    """What one client sends: its float32 model (``params``) or its packed quantised update (``blob``)."""

    n_bytes: int
    params: Params | None = None
    blob: bytes | None = None


def upload(w_k: Params, start: Params, quantizer: Quantizer | None, generator=None) -> Upload:
    """Client side: the model as float32, or ``w_k - start`` quantised and packed (the real payload)."""
    if quantizer is None:
        return Upload(float32_bytes(w_k), params=w_k)
    q = quantize_params({n: w_k[n] - start[n] for n in start}, quantizer.bits, quantizer.scheme,
                        quantizer.rounding, generator)
    blob = encode(q)
    return Upload(len(blob), blob=blob)


def receive(up: Upload, start: Params, quantizer: Quantizer | None) -> Params:
    """Server side: the client model, or the dequantised update decoded from the bytes alone (the
    receiver knows only the architecture: names, shapes, bits)."""
    if quantizer is None:
        return up.params
    like = layout(start, quantizer.bits, quantizer.scheme)
    if len(up.blob) != layout_bytes(like):
        raise ValueError(f"quantised payload of {len(up.blob)} bytes, expected {layout_bytes(like)} for "
                         f"{quantizer.bits}-bit updates of this model")
    update = dequantize_params(decode(up.blob, like))
    return {n: update[n].to(start[n].device) for n in start}


def aggregate(g: Group, round_: int, received: list, sizes: list[int], accepted, generator=None,
              on_event=None) -> None:
    """The server's step for one group at ``round_`` (1-based), in place: log what went down, FedAvg of
    the accepted clients (their models, or their dequantised updates applied to the global model),
    log what came up, and the quantised downlink. ``received[k]`` is client k's :func:`receive` result
    (None when not accepted)."""
    v, k = g.variant, g.clients.n_clients
    model_bytes = float32_bytes(g.params)
    quantised_down = round_ > 1 and v.downlink is not None
    g.ledger.log(round_, "down", f"update {v.downlink.bits}-bit" if quantised_down else "model",
                 g.next_down_bytes if quantised_down else model_bytes, copies=k)
    ok = [i for i in range(k) if accepted[i]]
    if not ok:
        if on_event is not None:
            on_event(round_, "group-kept", f"no client of {g.label!r} replied; its model is unchanged")
        return
    n_k = g.clients.n_k[torch.tensor(ok, device=g.clients.n_k.device)]
    mean = fedavg(stack_params([received[i] for i in ok]), n_k)
    new = {n: g.params[n] + mean[n].to(g.params[n].device) for n in g.params} if v.uplink else mean
    for i in ok:
        g.ledger.log(round_, "up", f"update {v.uplink.bits}-bit" if v.uplink else "model", sizes[i])
    if v.downlink is not None:
        # the clients hold the previous global model; they get the change, quantised, and the server
        # adopts what they reconstruct. Its bytes are logged at the start of the next round.
        change = {n: new[n] - g.params[n] for n in new}
        got, n_bytes = v.downlink.roundtrip(change, generator)
        new = {n: g.params[n] + got[n].to(g.params[n].device) for n in new}
        g.next_down_bytes = n_bytes
    g.params = new


def train_central(denoiser: Denoiser, central: list[Group], *, local_steps: int, batch_size: int, lr: float,
                  momentum: float, generator, chunk_size=None, vectorised: bool = True, cache: dict | None = None):
    """The central reference groups' round, on the server: the same SGD for ``local_steps`` steps on the
    union, batch K * B (all central groups in one vmap)."""
    if not central:
        return
    data, batch = _joined(central, cache, central), batch_size * central[0].batch_scale
    w = local_train(denoiser.net, stack_params([g.params for g in central]), data,
                    diffusion_client_loss(denoiser), steps=local_steps, lr=lr, momentum=momentum,
                    batch_size=batch, generator=generator, extras_fn=noise_extras(denoiser.process),
                    vectorised=vectorised, chunk_size=chunk_size or auto_chunk(data, batch))
    for j, g in enumerate(central):
        g.params = {n: p[j] for n, p in w.items()}


def record_history(history: list, groups: list[Group], round_: int, eval_rounds, evaluate) -> None:
    """Append one row per group (variant, kind, mu, uplink bits, partition, seed, round, cumulative
    bytes, metrics) when ``round_`` is evaluated."""
    if evaluate is None or round_ not in set(eval_rounds):
        return
    for g, m in zip(groups, evaluate(groups)):
        history.append({"variant": g.variant.name, "kind": g.variant.kind, "mu": g.variant.mu,
                        "bits": g.variant.uplink.bits if g.variant.uplink else 32, "partition": g.partition,
                        "seed": g.seed, "round": round_, "bytes_up": g.ledger.total("up"),
                        "bytes_down": g.ledger.total("down"), **m})


def by_mu(groups: list[Group]) -> dict[float, list[Group]]:
    """The federated groups by proximal weight, in order of first appearance: each trains in one vmap."""
    out: dict[float, list[Group]] = {}
    for g in groups:
        if not g.variant.central:
            out.setdefault(g.variant.mu, []).append(g)
    return out


class RowView:
    """Rows of a padded client tensor ``base`` [U, N, ...] seen as [len(rows), N, ...] without copying:
    ``view[a, b] == base[rows[a], b]``. Groups on the same (partition, seed) share one ClientData, so
    the clients of all models trained in one vmap read one copy of each partition's data instead of one
    copy per model (Fashion-MNIST at quick, 33 models on 6 (partition, seed) pairs: about 0.5 GB less;
    the rest of the old 7 GB were activations, bounded by :func:`auto_chunk`)."""

    def __init__(self, base: Tensor, rows: Tensor):
        self.base, self.rows = base, rows.to(base.device)
        self.shape = (len(rows), *base.shape[1:])
        self.device, self.dtype = base.device, base.dtype

    def dim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return self.base[(self.rows[key[0]], *key[1:])]

    def materialize(self) -> Tensor:
        return self.base[self.rows]


@dataclass
class ClientStore:
    """Each distinct ClientData (by identity) padded and stored once: ``data`` [U, N, ...] and the first
    row of each part (``offset[id(part)]``)."""

    data: ClientData
    offset: dict

    @classmethod
    def of(cls, parts: list[ClientData]) -> "ClientStore":
        unique = list({id(p): p for p in parts}.values())
        starts = np.concatenate([[0], np.cumsum([p.n_clients for p in unique])[:-1]]).astype(int).tolist()
        return cls(concat_clients(unique), {id(p): o for p, o in zip(unique, starts)})

    def holds(self, parts: list[ClientData]) -> bool:
        return all(id(p) in self.offset for p in parts)

    def view(self, parts: list[ClientData]) -> ClientData:
        """``concat_clients(parts)`` as :class:`RowView` s over the store: nothing is copied."""
        rows = torch.cat([torch.arange(p.n_clients) + self.offset[id(p)] for p in parts])
        d = self.data
        return ClientData(RowView(d.x, rows), RowView(d.y, rows), RowView(d.mask, rows), d.n_k[rows.to(d.n_k.device)])


def shared_clients(parts: list[ClientData]) -> ClientData:
    """``concat_clients(parts)`` with each distinct part stored once (see :class:`RowView`)."""
    return ClientStore.of(parts).view(parts)


def _joined(gs: list[Group], cache: dict | None, everyone: list[Group] | None = None):
    """The clients of ``gs`` as one ClientData for one vmap. With ``cache`` (kept across rounds) one
    :class:`ClientStore` of every group's data (``everyone``) serves every vmap of the run."""
    parts = [g.clients for g in gs]
    if cache is None:
        return shared_clients(parts)
    key = tuple(id(g) for g in gs)
    if key not in cache:
        store = cache.get("store")
        if store is None or not store.holds(parts):
            store = cache["store"] = ClientStore.of([g.clients for g in (everyone or [])] + parts)
        cache[key] = store.view(parts)
    return cache[key]


CHUNK_PIXELS = 2**17  # CPU: image pixels (clients x batch x pixels per image) per vmap chunk of local training


def auto_chunk(clients: ClientData, batch_size: int) -> int | None:
    """Clients per vmap chunk when none is given: on CPU, as many as keep ``CHUNK_PIXELS`` pixels of
    images in one chunk (8x8 digits at batch 16: 128 clients; 28x28 Fashion-MNIST: 10), at most
    ``CPU_CHUNK``; on GPU, all at once (None). This bounds the activations of the backward pass: one
    Fashion-MNIST quick round peaked at 7.4 GB unchunked, 2.7 GB with 16 clients per chunk."""
    if clients.x.device.type != "cpu":
        return None
    pixels = int(np.prod(clients.x.shape[2:])) * int(batch_size)
    return max(1, min(CPU_CHUNK, CHUNK_PIXELS // max(1, pixels)))


def feddm_round(denoiser: Denoiser, groups: list[Group], round_: int, *, local_steps: int, batch_size: int,
                lr: float, momentum: float = 0.9, generator: torch.Generator | None = None,
                vectorised: bool = True, chunk_size: int | None = None, cache: dict | None = None) -> None:
    """One in-process round for every group, in place: local training (one vmap per distinct mu, one for
    central), the clients' uploads, the server's :func:`aggregate`. ``cache`` (a dict kept across
    rounds) holds one :class:`ClientStore` of the federated groups' data (each (partition, seed) once,
    however many variants train on it) and each vmap's view of it, so they are built once, not every
    round."""
    net, loss_fn, extras = denoiser.net, diffusion_client_loss(denoiser), noise_extras(denoiser.process)
    federated = [g for g in groups if not g.variant.central]  # the union (central) is stored apart: no padding to it
    for mu, gs in by_mu(groups).items():
        k = gs[0].clients.n_clients
        start = _repeat_each([g.params for g in gs], k)
        data = _joined(gs, cache, federated)
        w_k = local_train(net, start, data, loss_fn, steps=local_steps, lr=lr, momentum=momentum,
                          mu=mu, batch_size=batch_size, generator=generator, extras_fn=extras,
                          vectorised=vectorised, chunk_size=chunk_size or auto_chunk(data, batch_size))
        for j, g in enumerate(gs):
            ups = [upload({n: p[j * k + i] for n, p in w_k.items()}, g.params, g.variant.uplink, generator)
                   for i in range(k)]
            aggregate(g, round_, [receive(u, g.params, g.variant.uplink) for u in ups], [u.n_bytes for u in ups],
                      [True] * k, generator)
    train_central(denoiser, [g for g in groups if g.variant.central], local_steps=local_steps, batch_size=batch_size,
                  lr=lr, momentum=momentum, generator=generator, chunk_size=chunk_size, vectorised=vectorised,
                  cache=cache)


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


@dataclass
class FedDMRun:
    """What :func:`run_feddm` returns: the history rows and, on Flower, its report (bytes, events)."""

    history: list
    report: object = None


@dataclass(kw_only=True)
class FedDMConfig:
    """Every setting of a run of FedDM rounds, under notebook 02's parameter names, checked once here:
    the rounds and every client's local SGD (central training takes a batch of K * ``batch_size``)."""

    rounds: int  # communication rounds (no default: every study says how many)
    local_steps: int = 5  # SGD steps per client per round
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9  # reset every round (a client keeps no optimiser state)
    vmap_chunk: int = 0  # models per vmap chunk in local training, to bound GPU memory; 0 trains all at once

    def __post_init__(self):
        for name in ("rounds", "local_steps", "batch_size"):
            check_number(name, getattr(self, name), at_least=1, integer=True)
        check_number("lr", self.lr, above=0)
        check_number("momentum", self.momentum, at_least=0, below=1)
        check_number("vmap_chunk", self.vmap_chunk, at_least=0, integer=True, fix="0 trains all models at once")

    @property
    def chunk_size(self) -> int | None:
        """``vmap_chunk`` as local training takes it (None: the automatic chunk)."""
        return self.vmap_chunk or None

    def client(self) -> dict:
        """The client side, as :func:`feddm_round` and :func:`train_central` take it."""
        return dict(local_steps=self.local_steps, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum)


def run_feddm(denoiser: Denoiser, groups: list[Group], config: FedDMConfig | None = None, *, eval_rounds=(),
              evaluate=None, seed: int = 0, progress: bool = True, driver=None, **kw) -> FedDMRun:
    """Train every group for ``config.rounds`` rounds with the settings of ``config`` (a :class:`FedDMConfig`;
    or its fields as keywords, e.g. ``rounds=5, local_steps=5``). At each round in ``eval_rounds``,
    ``evaluate(groups)`` returns one dict of metrics per group; rows with the cumulative bytes go into the
    history. ``seed``: the run's random stream. ``driver``: another engine for the same rounds, given the
    same config and the keywords that are not settings (:func:`fedlib.backends.run_feddm` with
    ``backend="flower"`` passes :func:`fedlib.flower.run_feddm`)."""
    names = FedDMConfig.__dataclass_fields__
    config = build_config(FedDMConfig, config, {k: kw.pop(k) for k in list(kw) if k in names}, "run_feddm")
    driver_kw = kw
    if driver is not None:
        return driver(denoiser, groups, config, eval_rounds=eval_rounds, evaluate=evaluate, seed=seed,
                      progress=progress, **driver_kw)
    if driver_kw:  # backend= here is a call written before the backend was chosen above the core
        raise ValueError(f"{sorted(driver_kw)} only apply to backend='flower'; choose the backend with "
                         "fedlib.backends.run_feddm(..., backend=...)")
    gen = torch.Generator().manual_seed(seed)
    history, cache = [], {}
    for r in tqdm(range(1, config.rounds + 1), desc="FedDM rounds", disable=not progress):
        feddm_round(denoiser, groups, r, **config.client(), generator=gen, chunk_size=config.chunk_size, cache=cache)
        record_history(history, groups, r, eval_rounds, evaluate)
    return FedDMRun(history)


def params_of(denoiser: Denoiser) -> Params:
    return get_params(denoiser.net)



# ----------------------------------------------------------------------------------------------
# evaluation and the notebook's table
def fd_evaluator(denoiser: Denoiser, feature_net, reference, n: int, steps: int, sampler: str, image_shape,
                 seed: int = 0, max_images: int | None = None, keep: dict | None = None, keep_n: int = 64,
                 extra_references: dict | None = None, metric: str = "fd"):
    """``evaluate(groups) -> [{"fd": ..., "nfe": ...}]`` for :func:`run_feddm`: ``n`` samples per model
    (the same initial noise, sampler and NFE for every model), Frechet distance in ``feature_net``'s
    space to ``reference`` (images or (mu, Sigma)), under the key ``metric``; NOT comparable to Inception
    FID. ``extra_references`` ({metric name: images or (mu, Sigma)}, e.g. ``{"fd_val": validation}``) adds
    one more distance per name from the same samples. At most ``max_images`` images are denoised at
    once (models x samples; default 2**18 pixels' worth, at most 4096 images, so 28x28 data does not hold
    gigabytes of activations). The first ``keep_n`` samples of each group at each evaluation are
    appended to ``keep[label]`` (a list, one entry per evaluation)."""
    from .metrics import extract_features, frechet_distance, gaussian_stats

    def stats(ref):
        return ref if isinstance(ref, tuple) else gaussian_stats(extract_features(feature_net, ref))

    refs = {metric: stats(reference), **{k: stats(v) for k, v in (extra_references or {}).items()}}
    if max_images is None:
        max_images = int(min(4096, max(64, 2**18 // int(np.prod(image_shape)))))
    per_call = min(n, max_images)
    models_per_call = max(1, max_images // per_call)

    def evaluate(groups):
        out = []
        for i in range(0, len(groups), models_per_call):
            chunk = groups[i:i + models_per_call]
            params = stack_params([g.params for g in chunk])
            parts = []
            for j, start in enumerate(range(0, n, per_call)):
                x, nfe = sample_stacked(denoiser, params, min(per_call, n - start), steps, sampler, seed + j, image_shape)
                parts.append(x.cpu())
            x = torch.cat(parts, dim=1)
            for g, xg in zip(chunk, x):
                feats = gaussian_stats(extract_features(feature_net, xg.clamp(-1, 1)))
                out.append({**{k: frechet_distance(*feats, *r) for k, r in refs.items()}, "nfe": nfe})
                if keep is not None:
                    keep.setdefault(g.label, []).append(xg[:keep_n].clone())
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


# ----------------------------------------------------------------------------------------------
# reading the history: paired gaps, the mu search (per-seed values: fedlib.verdicts.per_seed)
def _frame(history):
    import pandas as pd

    return history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)


PENALTY = "non-IID penalty (vanilla)"


def paired_gaps(history, iid: str = "iid", baseline: str = "vanilla", kind: str = "prox",
                metric: str = "fd") -> "pd.DataFrame":
    """The budget sweep's quantity, per (partition, series, round, seed): ``gap`` = metric(variant) -
    metric(``baseline``) on the same partition, round and seed for every variant of ``kind`` (positive:
    the variant is worse, for a distance), and the series :data:`PENALTY` = metric(baseline on a non-IID
    partition) - metric(baseline on ``iid``): how much the label skew costs FedAvg, the drift a proximal
    term could at best remove."""
    import pandas as pd

    h = _frame(history)
    h = h[h["partition"] != "union"]
    base = h[h["variant"] == baseline].set_index(["partition", "round", "seed"])[metric]
    rows = []
    for (p, v), sub in h[h["kind"] == kind].groupby(["partition", "variant"], sort=False):
        s = sub.set_index(["partition", "round", "seed"])[metric]
        d = (s - base.reindex(s.index)).dropna()
        rows += [{"partition": p, "series": v, "round": r, "seed": sd, "gap": float(x)} for (_, r, sd), x in d.items()]
    if iid in set(h["partition"]):
        ref = base.xs(iid, level="partition")
        for p in [p for p in h["partition"].unique() if p != iid]:
            d = (base.xs(p, level="partition") - ref).dropna()
            rows += [{"partition": p, "series": PENALTY, "round": r, "seed": sd, "gap": float(x)} for (r, sd), x in d.items()]
    return pd.DataFrame(rows, columns=["partition", "series", "round", "seed", "gap"])


def band(df, by, value: str = "gap") -> "pd.DataFrame":
    """Mean, standard error over seeds and seed count of ``value`` per ``by`` (the figures' bands)."""
    g = df.groupby(by, sort=False)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["se"] = out["std"] / np.sqrt(out["count"])
    return out


def mu_search(history, partition: str, metric: str = "fd_val", baseline: str = "vanilla") -> tuple[float, "pd.DataFrame"]:
    """The proximal weight chosen on a validation quantity: at the last evaluated round on ``partition``,
    the mean over seeds of ``metric`` per variant (vanilla and every prox), and mu* = the prox variant
    with the lowest mean (a distance). Returns (mu*, the table, with a ``chosen`` column)."""
    h = _frame(history)
    last = h[(h["partition"] == partition) & (h["round"] == h["round"].max())]
    t = last.groupby(["variant", "kind", "mu"], sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    t["se"] = t["std"] / np.sqrt(t["count"])
    prox = t[t["kind"] == "prox"]
    if prox.empty:
        raise ValueError(f"no prox variant on {partition!r} to choose mu from")
    best = prox["mean"].idxmin()
    t["chosen"] = t.index == best
    mu = float(t.loc[best, "mu"])
    return mu, t.rename(columns={"mean": f"{metric} mean", "std": f"{metric} std", "se": f"{metric} se",
                                 "count": "seeds"})
