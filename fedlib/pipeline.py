"""The four papers as one pipeline (notebook 05): each stage is the library's own, and each caches its output.

FedGO's data-free scenario needs a generator on the server. The pipeline makes one without any raw data
leaving a client:

1. :func:`federated_diffusion`: FedDM (quantised uplink, :mod:`fedlib.feddm`) trains an unconditional
   diffusion model on the clients' data only (the client partition FedGO uses), bytes counted;
2. :func:`learn_grids`: LD3 (:mod:`fedlib.ld3`) learns a few-step time grid for it, from the model's own
   samples only (pairs of prior noise and the model's many-step solution);
3. :func:`distil_one_step`: DMD2 (:mod:`fedlib.dmd2`) distils it into a one-step generator, from the
   model's own samples only (no GAN term: it would need real data on the server);
4. FedGO (:func:`fedlib.studies.fedgo_setups` with ``server_generators``, :func:`fedlib.distill.run_rounds`)
   with that generator as the server's G (:class:`fedlib.dmd2.SamplerGenerator`).

Every stage's output is cached under ``cache_dir("pipeline", stage)`` by a key of everything it was built
from (:func:`cached`; the upstream stage's key included), so re-runs and the explorer reload in seconds.

That no stage reads server data is measured, not assumed (:func:`server_data_check`): the stages run twice,
uncached, the second time with every server image replaced by NaN, and every output must be bit-identical
and finite.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dmd2, feddm, ld3
from . import federated as fl
from .diffusion import schedule as hand_schedule
from .diffusion import SAMPLERS, solve
from .diffusion.denoiser import Denoiser, frozen
from .utils import atomic_torch_save, cache_dir, check_choice, check_number, load_cache_entry, load_or_build

VERSION = 1  # bump when a stage's code changes what a key produces


def key_of(**parts) -> str:
    """A short stable hash of ``parts`` (JSON, sorted keys; tensors and arrays by their bytes)."""
    def enc(v):
        if isinstance(v, torch.Tensor):
            return hashlib.sha1(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if isinstance(v, np.ndarray):
            return hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):  # a config: by its fields
            return enc(dataclasses.asdict(v))
        if isinstance(v, dict):
            return {str(k): enc(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        return v

    text = json.dumps({"version": VERSION, **enc(parts)}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def plain(obj):
    """``obj`` with numpy scalars and arrays turned into Python numbers and tensors (what
    ``torch.load(weights_only=True)`` reads back), through dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


def cached(stage: str, key: str, build) -> tuple[dict, bool]:
    """``(entry, was_cached)``: the stage's entry (a dict of tensors, numbers, strings, lists) from
    ``cache_dir("pipeline", stage)/<key>.pt``, or ``build()`` saved there (atomically) with the seconds
    it took under ``"seconds"``. An unreadable entry is reported, removed and rebuilt."""
    path = cache_dir("pipeline", stage) / f"{key}.pt"

    def timed_build():
        t0 = time.perf_counter()
        entry = plain(dict(build()))
        entry["seconds"] = time.perf_counter() - t0
        atomic_torch_save(entry, path)
        return entry

    return load_or_build(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), timed_build)


# ---------------------------------------------------------------------------------------------
# Stage 1: FedDM-quant on the clients' data


@dataclass
class DiffusionStage:
    """One federated diffusion model per seed (frozen), what each sent, how long it took."""

    denoisers: dict            # {seed: Denoiser}
    bytes_up: dict             # {seed: bytes the clients sent}
    bytes_down: dict           # {seed: bytes the server sent}
    model_bytes: int           # float32 bytes of one model
    seconds: float             # wall time of the build (of the cached build when cached)
    key: str
    cached: bool
    indices_read: dict = field(default_factory=dict)  # {seed: sorted indices into x the stage trained on}


def federated_diffusion(x: torch.Tensor, client_indices: dict, *, rounds: int, local_steps: int, batch_size: int,
                        lr: float, bits: int = 8, channels: int = 8, channel_mults=(1, 2), momentum: float = 0.9,
                        device="cpu", progress: bool = True) -> DiffusionStage:
    """FedDM with ``bits``-bit uplink updates (32: float32 models, FedDM vanilla) on the clients of each
    seed (``client_indices[seed]``: one index array per client, into ``x``), all seeds in one vmap
    (:func:`fedlib.feddm.run_feddm`). Unconditional EDM-preconditioned U-Net, seeded initialisation.
    Only the rows of ``x`` in ``client_indices`` are read (``indices_read``)."""
    seeds = sorted(client_indices)
    read = {s: np.unique(np.concatenate([np.asarray(i) for i in client_indices[s]])) for s in seeds}
    in_ch = x.shape[1]
    cfg = dict(rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr, bits=bits, channels=channels,
               channel_mults=list(channel_mults), momentum=momentum)
    key = key_of(stage="feddm", cfg=cfg, data={s: x[torch.as_tensor(read[s])] for s in seeds},
                 parts={s: [np.asarray(i) for i in client_indices[s]] for s in seeds})

    def new(seed):
        return feddm.make_denoiser(in_ch, channels, channel_mults, process="edm", prediction="edm", seed=seed)

    def build():
        den = new(seeds[0]).to(device)
        init = {s: {n: p.to(device) for n, p in feddm.params_of(new(s)).items()} for s in seeds}
        variant = [v for v in feddm.make_variants(mu=(), bits=(bits,) if bits < 32 else (), central=False)
                   if v.kind == ("quant" if bits < 32 else "vanilla")]
        xs = x.to(device)
        ys = torch.zeros(len(x), dtype=torch.long, device=device)  # unconditional: labels never read
        groups = feddm.build_groups(den, xs, ys, {"fedgo": [client_indices[s] for s in seeds]}, variant, seeds, init)
        feddm.run_feddm(den, groups, rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
                        momentum=momentum, seed=seeds[0], progress=progress)
        return {"params": {g.seed: {n: p.cpu() for n, p in g.params.items()} for g in groups},
                "up": {g.seed: g.ledger.total("up") for g in groups},
                "down": {g.seed: g.ledger.total("down") for g in groups}}

    entry, hit = cached("feddm", key, build)
    dens = {}
    for s in seeds:
        d = new(s)
        fl.set_params(d.net, {n: p.to(torch.float32) for n, p in entry["params"][s].items()})
        dens[s] = frozen(d).to(device)
    model_bytes = fl.state_bytes(entry["params"][seeds[0]])
    return DiffusionStage(dens, dict(entry["up"]), dict(entry["down"]), model_bytes, float(entry["seconds"]), key,
                          hit, read)


# ---------------------------------------------------------------------------------------------
# Stage 2: LD3 on the federated model's own samples


def learn_grids(teacher: Denoiser, tag: str, nfes, *, shape, config: ld3.LD3Config | None = None, n_train: int = 24,
                n_val: int = 48, teacher_solver: str = "unipc", teacher_nfe: int = 20,
                seed: int = 0) -> tuple[dict, float, bool]:
    """``({nfe: LearnedSchedule}, seconds, cached)``: LD3 grids of ``config.solver`` for ``teacher`` (cached by
    :func:`fedlib.ld3.load_or_learn` under a model name made of ``tag`` and these settings), learned from
    pairs of prior noise and the teacher's own ``teacher_nfe``-step solution: no data at all. ``config``:
    LD3's settings (:class:`fedlib.ld3.LD3Config`; default: its defaults)."""
    config = config if config is not None else ld3.LD3Config()
    solver = config.solver
    device = next(teacher.parameters()).device
    name = f"pipeline-{tag}-" + key_of(n_train=n_train, n_val=n_val, teacher=[teacher_solver, teacher_nfe], seed=seed,
                                       config=config)
    t0 = time.perf_counter()
    pairs = {}

    def pairs_of(which):  # drawn only when a grid has to be learned
        if which not in pairs:
            n, off = (n_train, 100) if which == "train" else (n_val, 200)
            pairs[which] = ld3.teacher_pairs(teacher, n, shape, solver=teacher_solver, nfe=teacher_nfe,
                                             seed=1000 * seed + off, device=device)
        return pairs[which]

    out, hit = {}, True
    for nfe in nfes:
        path = ld3.schedule_path(name, solver, nfe)
        s = load_cache_entry(path, ld3.LearnedSchedule.load)
        if s is None or not ld3.learned_under(s, teacher):
            hit = False
            s = ld3.load_or_learn(teacher, nfe, pairs_of("train"), pairs_of("val"), name, config, seed=seed)
        out[nfe] = s
    return out, time.perf_counter() - t0, hit


@torch.no_grad()
def grid_rows(teacher: Denoiser, learned, solver: str, x_T: torch.Tensor, x_ref: torch.Tensor, metric,
              schedules=None) -> list[dict]:
    """One row per grid at ``learned.nfe`` steps (every hand-made schedule and LD3's) on held-out noise
    ``x_T``: ``teacher_distance`` (mean squared distance to ``x_ref``, the teacher's many-step solution
    from the same noise: what LD3 optimises) and ``metric(samples)`` (e.g. a Fréchet distance)."""
    from .diffusion.schedules import SCHEDULES

    nfe = learned.nfe
    grids = {name: (hand_schedule(name, teacher.process, nfe), None) for name in (schedules or SCHEDULES)}
    grids["ld3"] = learned.tensors()
    rows = []
    for name, (times, tn) in grids.items():
        x, _ = solve(teacher, x_T, times.to(x_T.device), solver, None if tn is None else tn.to(x_T.device))
        rows.append({"grid": name, "nfe": nfe, "teacher_distance": float(((x - x_ref) ** 2).flatten(1).mean(1).mean()),
                     "metric": float(metric(x.clamp(-1, 1)))})
    return rows


# ---------------------------------------------------------------------------------------------
# Stage 3: DMD2 on the federated model's own samples


@dataclass(frozen=True)
class DistilConfig:
    """The settings of the DMD2 stage (:func:`distil_one_step`), checked once here. ``steps``, ``batch_size``,
    ``lr`` and ``ttur_ratio`` are :class:`fedlib.dmd2.DMD2Config`'s (notebook 05's ``dmd2_steps``,
    ``dmd2_batch``, ``dmd2_lr``) under this stage's defaults; the rest are what DMD2Config has no field for:
    the teacher's own samples the stage trains from and the trace of quality against the updates. The stage
    fixes the remainder of DMD2Config (no GAN term: it needs real data; one student step)."""

    steps: int                          # DMD2 generator updates
    batch_size: int = 32                # DMD2 batch size
    lr: float = 5e-4                    # AdamW learning rate of the generator and the fake score
    ttur_ratio: int = 5                 # fake-score updates per generator update (the paper's TTUR)
    n_data: int = 512                   # teacher samples in ``data`` (the one-step DM loss reads their shape only)
    data_nfe: int = 20                  # the teacher's steps per such sample
    data_solver: str = "dpm_solver_pp_2m"  # the solver of those samples
    trace_points: int = 0               # generator updates traced, evenly spaced, the last included (0: none)
    trace_samples: int = 256            # one-step samples of one fixed noise per traced update

    def __post_init__(self):
        for name in ("steps", "batch_size", "ttur_ratio", "n_data", "data_nfe", "trace_samples"):
            check_number(name, getattr(self, name), at_least=1, integer=True)
        check_number("lr", self.lr, above=0)
        check_number("trace_points", self.trace_points, at_least=0, integer=True, fix="0: no trace")
        check_choice("data_solver", self.data_solver, SAMPLERS)


def distil_one_step(teacher: Denoiser, tag: str, config: DistilConfig, *, shape, seed: int = 0,
                    progress: bool = True) -> tuple[Denoiser, dict, bool]:
    """``(generator, info, cached)``: DMD2 distils ``teacher`` into a one-step generator (the paper's TTUR;
    no GAN term, which would need real data; ``data`` = ``n_data`` of the teacher's own ``data_nfe``-step
    samples, which the one-step DM loss does not read beyond their shape), with the settings of ``config``
    (a :class:`DistilConfig`) and the seed ``seed``. ``info``: seconds, DM-loss curve, ``diverged`` and
    ``trace``: with ``trace_points`` > 0, ``trace_samples`` one-step samples of one fixed noise at about that
    many evenly spaced generator updates (the last included), as ``[{"step", "samples"}]``, so that quality
    against the DMD2 budget is measured within one run."""
    if not isinstance(config, DistilConfig):
        raise TypeError(f"config={config!r} is not a DistilConfig; build one with pipeline.DistilConfig(steps=...)")
    steps, n_data, data_nfe, data_solver = config.steps, config.n_data, config.data_nfe, config.data_solver
    trace_points, trace_samples = config.trace_points, config.trace_samples
    device = next(teacher.parameters()).device
    cfg = dmd2.DMD2Config(steps=steps, batch_size=config.batch_size, lr=config.lr, ttur_ratio=config.ttur_ratio,
                          gan_critic_weight=0.0, gan_generator_weight=0.0, n_student_steps=1, seed=seed,
                          checkpoint_every=max(1, steps // 4),
                          eval_every=max(1, steps // trace_points) if trace_points > 0 else 0)
    key = key_of(stage="dmd2", teacher=tag, cfg=dmd2.config_dict(cfg), n_data=n_data, data=[data_solver, data_nfe],
                 trace_samples=trace_samples if trace_points > 0 else 0)
    # one fixed noise for every point of the trace: the curve then moves with the generator only
    z_trace = torch.randn((trace_samples, *shape), generator=torch.Generator().manual_seed(20_000 + seed))

    def trace(generator, times):
        return {"samples": dmd2.SamplerGenerator(generator, times, shape)(z_trace.to(device)).cpu()}

    def build():
        g = torch.Generator().manual_seed(10_000 + seed)
        x_T = teacher.process.prior((n_data, *shape), generator=g, device=device)
        times = hand_schedule("edm", teacher.process, data_nfe).to(device)
        with torch.no_grad():
            data = solve(teacher, x_T, times, data_solver, batch_size=256)[0].clamp(-1, 1)
        res = dmd2.train_dmd2(teacher, data, cfg, eval_fn=trace if trace_points > 0 else None, progress=progress,
                              desc=f"DMD2 seed {seed}", device=device)
        return {"params": {n: p.detach().cpu() for n, p in fl.get_params(res.generator.net).items()},
                "times": res.times.detach().cpu(), "loss_dm": [float(v) for v in res.history["loss_dm"]],
                "diverged": res.diverged or "", "trace": res.history["eval"]}

    entry, hit = cached("dmd2", key, build)
    gen = copy.deepcopy(teacher)
    fl.set_params(gen.net, {n: p.to(device) for n, p in entry["params"].items()})
    gen = frozen(gen).to(device)
    gen.sample_shape = tuple(shape)
    info = {"seconds": float(entry["seconds"]), "loss_dm": list(entry["loss_dm"]), "diverged": entry["diverged"] or None,
            "times": entry["times"], "key": key, "trace": list(entry.get("trace", []))}
    return gen, info, hit


# ---------------------------------------------------------------------------------------------
# Costs


@torch.no_grad()
def samples_per_second(G, n: int = 512, repeats: int = 3, seed: int = 0) -> float:
    """Samples per second of the generator ``G`` (z -> x), best of ``repeats`` timed runs of ``n`` samples
    (one warm-up run first)."""
    from . import fedgo

    g = torch.Generator().manual_seed(seed)
    fedgo.sample(G, min(n, 16), g)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fedgo.sample(G, n, g)
        best = min(best, time.perf_counter() - t0)
    return n / best


def reads_no_server_data(indices_read, server_indices) -> bool:
    """True when none of the training rows a stage read (``indices_read``) is a server row."""
    return not bool(np.intersect1d(np.asarray(indices_read), np.asarray(server_indices)).size)


# ---------------------------------------------------------------------------------------------
# The no-server-data check, measured


@contextlib.contextmanager
def _own_cache():
    """Every stage built afresh in a throw-away cache: stage 1's key covers the client rows only, so a
    cached entry would be reloaded whatever the server rows hold, and the check would measure nothing."""
    old = os.environ.get("FEDLIB_CACHE")
    with tempfile.TemporaryDirectory(prefix="fedlib-server-check-") as tmp:
        os.environ["FEDLIB_CACHE"] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("FEDLIB_CACHE", None)
            else:
                os.environ["FEDLIB_CACHE"] = old


def _whole_pipeline(train, test, n_clients: int, alpha: float, seed: int, *, feddm_kw: dict, ld3_kw: dict,
                    dmd2_kw: dict, fedgo_kw: dict, device) -> dict:
    """Stages 1-4 of one seed, uncached: what each stage hands on (flat tensors, for comparison)."""
    from . import data as fdata
    from . import distill, models, studies
    from .utils import seed_everything

    seed_everything(seed)
    shape = tuple(train.x.shape[1:])
    parts = fdata.fedgo_split(train.y.numpy(), n_clients, alpha, seed=seed)[0]
    diff = federated_diffusion(train.x, {seed: parts}, device=device, progress=False, **feddm_kw)
    teacher = diff.denoisers[seed]
    nfe = ld3_kw["nfes"][0]
    grids, _, _ = learn_grids(teacher, f"check-s{seed}", [nfe], shape=shape, seed=seed,
                              **{k: v for k, v in ld3_kw.items() if k != "nfes"})
    student, info, _ = distil_one_step(teacher, f"check-s{seed}", DistilConfig(**dmd2_kw), shape=shape, seed=seed,
                                       progress=False)
    G = dmd2.SamplerGenerator(student, info["times"], shape)
    clf = models.make_classifier("small_cnn", shape, train.n_classes, width=8).to(device)
    g = seed_everything(seed)
    st = studies.fedgo_setups(train, test, client_counts=[n_clients], alphas=[alpha], seeds=[seed], scenarios=(),
                              dense=False, generator=g, device=device, server_generators={"pipeline": {seed: G}},
                              gan_steps=0, disc_epochs=fedgo_kw["disc_epochs"])
    res = distill.run_rounds(clf, st.setups["pipeline"][n_clients], ["fedgo"], rounds=fedgo_kw["rounds"],
                             distill_epochs=fedgo_kw["distill_epochs"], generator=g, init=fl.get_params(clf))
    flat = lambda params: torch.cat([p.detach().float().cpu().flatten() for p in params])  # noqa: E731
    (setup,) = st.setups["pipeline"][n_clients]
    return {"1 FedDM model": flat(teacher.parameters()),
            "2 LD3 grid": torch.cat([t.detach().cpu().flatten() for t in grids[nfe].tensors() if t is not None]),
            "3 DMD2 generator": flat(student.parameters()),
            "4 FedGO discriminators and server model": torch.cat([setup.disc_logits.float().cpu().flatten(),
                                                                  flat(res.params.values())])}


def server_data_check(train, test, n_clients: int, alpha: float, seed: int, *, feddm_kw: dict, ld3_kw: dict,
                      dmd2_kw: dict, fedgo_kw: dict, device="cpu", sentinel: float = float("nan")) -> dict:
    """Whether the pipeline reads server data, measured rather than assumed: stages 1-4 of one seed run twice,
    each in its own empty cache, on ``train`` and on ``train`` with every server image (the server half of
    :func:`fedlib.data.fedgo_split`) replaced by ``sentinel`` (NaN poisons whatever reads it). Returns
    ``{"stages": {stage: {"identical", "finite"}}, "server_rows", "client_rows", "seconds", "reads_none"}``;
    ``reads_none`` holds when every stage's output (model parameters, the grid, the FedGO discriminators'
    logits and server model) is bit-identical across the two runs and finite. The server labels are kept:
    the split itself is drawn per class, before any stage runs. ``dmd2_kw``: the fields of the DMD2 stage's
    :class:`DistilConfig`."""
    from . import data as fdata

    t0 = time.perf_counter()
    parts, server = fdata.fedgo_split(train.y.numpy(), n_clients, alpha, seed=seed)
    poisoned = fdata.ArrayDataset(train.x.clone(), train.y, train.n_classes, train.name)
    poisoned.x[torch.as_tensor(server)] = sentinel
    kw = dict(feddm_kw=feddm_kw, ld3_kw=ld3_kw, dmd2_kw=dmd2_kw, fedgo_kw=fedgo_kw, device=device)
    outs = []
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=cuda):  # the caller's random streams are left as they were
        for ds in (train, poisoned):
            with _own_cache():
                outs.append(_whole_pipeline(ds, test, n_clients, alpha, seed, **kw))
    random.setstate(py_state)
    np.random.set_state(np_state)
    stages = {name: {"identical": bool(torch.equal(outs[0][name], outs[1][name])),
                     "finite": bool(torch.isfinite(outs[1][name]).all())} for name in outs[0]}
    return {"stages": stages, "server_rows": int(len(server)), "client_rows": int(sum(len(p) for p in parts)),
            "seconds": time.perf_counter() - t0,
            "reads_none": all(v["identical"] and v["finite"] for v in stages.values())}
