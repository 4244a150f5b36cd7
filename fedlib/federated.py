"""Federated learning core: vectorised client training, FedAvg / FedProx, byte accounting.

Generic over the model and the loss: FedGO (classification), FedDM (diffusion) and the Flower backend
all train clients through :func:`local_train`.

Parameters are plain dicts ``{name: Tensor}`` (``Params``). A *stacked* dict holds one entry per client
along a new leading axis: ``{name: Tensor[K, ...]}``. Models must be pure functions of
(parameters, input): use GroupNorm, not BatchNorm (no running buffers to update under ``vmap``, and it
does not mix samples of one non-IID client batch), and no dropout (or draw its mask through
``extras_fn``). Every model in :mod:`fedlib.models` qualifies.

Typical round::

    call = functional(model)                              # call(params, x) -> output
    clients = pack_clients(x, y, client_indices)          # padded [K, N_max, ...] + mask, n_k
    w = get_params(model)                                 # global model
    w_k = local_train(model, w, clients, epochs=2, lr=0.05, batch_size=32, generator=g)  # stacked
    w = fedavg(w_k, clients.n_k)                          # sum_k n_k/n w_k

``local_train`` arguments
    loss_fn(call, params, batch) -> scalar. ``batch`` is a dict of tensors for ONE client and one step:
        ``x`` [B, ...], ``y`` [B], ``mask`` [B] (1 real sample, 0 padding) plus whatever ``extras_fn``
        returned. Use :func:`masked_mean` so padding never counts. Default: :func:`classification_loss`.
    extras_fn(x, y, generator) -> dict of per-sample tensors (e.g. diffusion noise and times). It is
        called OUTSIDE vmap, once per client and step, with that client's own ``torch.Generator`` (on
        CPU; move the result with ``.to(x.device)``). The mini-batch indices come from the same
        per-client generators, so the vectorised and the sequential path consume identical random
        numbers and agree to float tolerance. A list of K functions gives client k its own (e.g. one
        drawing from the generator its server sent it); they must return the same names and shapes.
    epochs / steps: E local epochs over each client's own n_k samples (client k takes
        E * ceil(n_k / B) steps; finished clients sit idle, masked, while others go on) or a fixed
        number of steps for every client (batch min(B, n_k)). Clients of different sizes are padded and
        masked, never truncated.
    mu: FedProx proximal term (mu / 2) ||w - w_start||^2, w_start the client's starting point; a float
        or a tensor [K] (one mu per client, so FedProx and FedAvg models can train in one vmap).
    vectorised: True -> one ``torch.func.vmap(grad(...))`` over all clients per step (SGD in place on
        the stacked tensors; ``chunk_size="auto"`` vmaps chunks of 128 clients on CPU, all at once on
        GPU); False -> the sequential reference (one model per client, ``torch.optim.SGD``), kept for
        tests and benchmarks.
    The starting point may be one Params (broadcast to all K clients) or a stacked Params with K
        entries: this is how several methods' global models (or seeds, or alphas) train in ONE vmap
        (see :meth:`ClientData.repeat` and :func:`concat_clients`).

Byte accounting: :func:`state_bytes` and :class:`CommLedger` (bytes per direction per round, with
one-off items such as a generator sent down once logged at round ``SETUP``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .utils import check_choice, positive_counts

Params = dict[str, Tensor]
CPU_CHUNK = 128  # clients per vmap chunk on CPU (chunk_size="auto")
SETUP = -1  # the "round" of one-off transfers (generator down, discriminators up)
DIRECTIONS = ("down", "up")


# ----------------------------------------------------------------------------------------------
# parameters as dicts of tensors
def get_params(model: nn.Module) -> Params:
    """A detached copy of the model's parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def set_params(model: nn.Module, params: Params) -> nn.Module:
    """Copy ``params`` (unstacked) into ``model`` in place and return it."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model


def functional(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``call(params, x)``: the model as a pure function of its parameters (buffers held fixed)."""
    buffers = dict(model.named_buffers())

    def call(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, {**params, **buffers}, (x,))

    return call


def stack_params(params_list: list[Params]) -> Params:
    return {n: torch.stack([p[n] for p in params_list]) for n in params_list[0]}


def unstack_params(stacked: Params) -> list[Params]:
    return [index_params(stacked, k) for k in range(n_stacked(stacked))]


def index_params(stacked: Params, k) -> Params:
    """Entry ``k`` (an int, a slice or an index tensor) of a stacked Params."""
    return {n: p[k] for n, p in stacked.items()}


def broadcast_params(params: Params, k: int) -> Params:
    """K independent copies of one Params, stacked."""
    return {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in params.items()}


def n_stacked(stacked: Params) -> int:
    return next(iter(stacked.values())).shape[0]


def _is_stacked(params: Params, template: Params) -> bool:
    return all(params[n].dim() == template[n].dim() + 1 for n in template)


# ----------------------------------------------------------------------------------------------
# client data
@dataclass
class ClientData:
    """K clients' data, padded to the largest client: ``x`` [K, N_max, ...], ``y`` [K, N_max],
    ``mask`` [K, N_max] (1.0 for real samples), ``n_k`` [K] (int64)."""

    x: Tensor
    y: Tensor
    mask: Tensor
    n_k: Tensor

    @property
    def n_clients(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "ClientData":
        return ClientData(self.x.to(device), self.y.to(device), self.mask.to(device), self.n_k.to(device))

    def repeat(self, m: int) -> "ClientData":
        """The same K clients m times (block-major: copy j holds clients j*K ... j*K+K-1), to train m
        methods' models on the same data in one vmap."""
        r = lambda t: t.repeat(m, *([1] * (t.dim() - 1)))  # noqa: E731
        return ClientData(r(self.x), r(self.y), r(self.mask), r(self.n_k))

    def client(self, k: int) -> tuple[Tensor, Tensor]:
        n = int(self.n_k[k])
        return self.x[k, :n], self.y[k, :n]


def pack_clients(x: Tensor, y: Tensor, indices: list) -> ClientData:
    """Pad the clients' samples ``x[indices[k]]`` into one tensor. Raises when there are more clients
    than samples or a client is empty (nothing to train on)."""
    if len(indices) > len(x):
        raise ValueError(f"n_clients={len(indices)} is larger than the number of samples ({len(x)}); "
                         "use fewer clients or more data")
    sizes = [len(i) for i in indices]
    empty = [k for k, s in enumerate(sizes) if s == 0]
    if empty:
        raise ValueError(f"clients {empty} have no samples; allowed: every client >= 1 sample. Use a "
                         "partition with min_size >= 1 (e.g. dirichlet_partition(..., min_size=2))")
    n_max = max(sizes)
    xs = x.new_zeros((len(indices), n_max, *x.shape[1:]))
    ys = y.new_zeros((len(indices), n_max))
    mask = torch.zeros(len(indices), n_max, device=x.device)
    for k, idx in enumerate(indices):
        idx = torch.as_tensor(idx, dtype=torch.long, device=x.device)
        xs[k, : len(idx)], ys[k, : len(idx)], mask[k, : len(idx)] = x[idx], y[idx], 1.0
    return ClientData(xs, ys, mask, torch.tensor(sizes, dtype=torch.long, device=x.device))


def concat_clients(parts: list[ClientData]) -> ClientData:
    """Several ClientData (e.g. one per seed or alpha) as one, padded to the largest client."""
    n_max = max(p.x.shape[1] for p in parts)

    def pad(t, n):
        return F.pad(t, [0] * 2 * (t.dim() - 2) + [0, n - t.shape[1]]) if t.shape[1] < n else t

    return ClientData(torch.cat([pad(p.x, n_max) for p in parts]), torch.cat([pad(p.y, n_max) for p in parts]),
                      torch.cat([pad(p.mask, n_max) for p in parts]), torch.cat([p.n_k for p in parts]))


# ----------------------------------------------------------------------------------------------
# losses
def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real samples only (padding has mask 0); 0 for an all-padding batch."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def classification_loss(call, params: Params, batch: dict) -> Tensor:
    """Masked mean cross-entropy: the default ``loss_fn``."""
    logits = call(params, batch["x"])
    return masked_mean(F.cross_entropy(logits, batch["y"], reduction="none"), batch["mask"])


# ----------------------------------------------------------------------------------------------
# local training
def client_generators(generator: torch.Generator | None, k: int) -> list[torch.Generator]:
    """One generator per client, seeded from ``generator`` (so client k's random numbers do not depend
    on the order in which clients are processed)."""
    seeds = torch.randint(0, 2**62, (k,), generator=generator).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


def batch_schedule(n_k, batch_size: int, *, epochs: int | None = None, steps: int | None = None,
                   generators: list[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """Mini-batch indices for every client: ``idx`` [K, T, B] (long), ``bmask`` [K, T, B] (1.0 where
    the slot holds a sample), ``active`` [K, T] (bool; a prefix of True per client). Epoch mode walks a
    fresh permutation of each client's n_k samples per epoch (last batch partial); step mode takes
    ``steps`` batches of min(B, n_k) from consecutive permutations."""
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs={epochs!r} or steps={steps!r}")
    n_k = [int(n) for n in n_k]
    B = int(batch_size)
    per_client = []
    for n, g in zip(n_k, generators):
        batches = []
        if epochs is not None:
            for _ in range(int(epochs)):
                perm = torch.randperm(n, generator=g)
                batches += list(perm.split(B))
        else:
            b, stream = min(B, n), torch.empty(0, dtype=torch.long)
            for _ in range(int(steps)):
                while len(stream) < b:
                    stream = torch.cat([stream, torch.randperm(n, generator=g)])
                batches.append(stream[:b])
                stream = stream[b:]
        per_client.append(batches)
    T = max(len(b) for b in per_client)
    K = len(n_k)
    idx = torch.zeros(K, T, B, dtype=torch.long)
    bmask = torch.zeros(K, T, B)
    active = torch.zeros(K, T, dtype=torch.bool)
    for k, batches in enumerate(per_client):
        for t, b in enumerate(batches):
            idx[k, t, : len(b)], bmask[k, t, : len(b)], active[k, t] = b, 1.0, True
    return idx, bmask, active


def local_train(model: nn.Module, start: Params, clients: ClientData, loss_fn=None, *,
                epochs: int | None = None, steps: int | None = None, lr: float = 0.05,
                momentum: float = 0.0, weight_decay: float = 0.0, mu: float = 0.0, batch_size: int = 32,
                generator: torch.Generator | None = None, extras_fn=None, vectorised: bool = True,
                chunk_size: int | str | None = "auto", return_loss: bool = False):
    """Train every client from ``start`` with SGD; returns the stacked client parameters [K, ...]
    (and, with ``return_loss``, the per-step training loss [K, T], NaN where a client was idle).
    See the module docstring for the meaning of each argument."""
    loss_fn = loss_fn or classification_loss
    template = dict(model.named_parameters())
    K = clients.n_clients
    start = start if _is_stacked(start, template) else broadcast_params(start, K)
    if n_stacked(start) != K:
        raise ValueError(f"start holds {n_stacked(start)} parameter sets but there are {K} clients; "
                         "pass one Params (broadcast) or a stacked Params with one entry per client")
    if isinstance(extras_fn, (list, tuple)) and len(extras_fn) != K:
        raise ValueError(f"extras_fn holds {len(extras_fn)} functions for {K} clients; pass one function or one "
                         "per client")
    extras_of = (lambda k: extras_fn[k]) if isinstance(extras_fn, (list, tuple)) else (lambda k: extras_fn)  # noqa: E731
    gens = client_generators(generator, K)
    idx, bmask, active = batch_schedule(clients.n_k.tolist(), batch_size, epochs=epochs, steps=steps,
                                        generators=gens)
    device = clients.x.device
    idx, bmask = idx.to(device), bmask.to(device)
    call = functional(model)

    # mu may differ per client (e.g. FedProx and FedAvg models trained in one vmap)
    mu_k = torch.as_tensor(mu, dtype=torch.float32).to(device).expand(K).contiguous()
    use_prox = bool((mu_k != 0).any())

    def objective(params, anchor, batch):
        loss = loss_fn(call, params, batch)
        if use_prox:
            loss = loss + 0.5 * batch["_mu"] * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
        return loss

    def client_batch(k, t):
        i = idx[k, t]
        batch = {"x": clients.x[k, i], "y": clients.y[k, i], "mask": bmask[k, t]}
        if extras_fn is not None:
            batch.update({n: v.to(device) for n, v in extras_of(k)(batch["x"], batch["y"], gens[k]).items()})
        return batch

    T = idx.shape[1]
    losses = torch.full((K, T), float("nan"))
    if not vectorised:
        out = []
        for k in range(K):
            m = set_params(copy.deepcopy(model), index_params(start, k))
            opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
            call_k, anchor = functional(m), index_params(start, k)
            for t in range(T):
                if not active[k, t]:
                    break
                params = dict(m.named_parameters())
                loss = loss_fn(call_k, params, client_batch(k, t))
                if mu_k[k]:
                    loss = loss + 0.5 * mu_k[k] * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[k, t] = float(loss.detach())
            out.append(get_params(m))
        params = stack_params(out)
        return (params, losses) if return_loss else params

    if chunk_size == "auto":  # on CPU, chunks of clients that stay in cache are 2-3x faster than one vmap
        chunk_size = CPU_CHUNK if device.type == "cpu" else None
    step_fn = vmap(grad_and_value(objective), in_dims=(0, 0, 0), chunk_size=chunk_size)
    params = {n: p.detach().clone() for n, p in start.items()}
    anchor = {n: p.detach() for n, p in start.items()}
    bufs = {n: torch.zeros_like(p) for n, p in params.items()} if momentum else None
    ar = torch.arange(K, device=device)
    active = active.to(device)
    for t in range(T):
        act = active[:, t]
        # only the clients still training at step t are computed (finished ones would be masked anyway)
        sub = ar if bool(act.all()) else act.nonzero().squeeze(1).to(device)
        k_list = sub.tolist()
        batch = {"x": clients.x[sub[:, None], idx[sub, t]], "y": clients.y[sub[:, None], idx[sub, t]],
                 "mask": bmask[sub, t], "_mu": mu_k[sub]}
        if extras_fn is not None:
            # drawn per client from its own generator, only for clients that step (as in the reference)
            ex = [extras_of(k)(batch["x"][j], batch["y"][j], gens[k]) for j, k in enumerate(k_list)]
            batch.update({name: torch.stack([e[name] for e in ex]).to(device) for name in ex[0]})
        full = len(k_list) == K
        p_sub = params if full else index_params(params, sub)
        a_sub = anchor if full else index_params(anchor, sub)
        grads, loss = step_fn(p_sub, a_sub, batch)
        with torch.no_grad():
            for n, p in p_sub.items():
                g = grads[n] + weight_decay * p if weight_decay else grads[n]
                if momentum:
                    g = momentum * bufs[n][sub] + g if t > 0 else g
                    bufs[n][sub] = g
                new = p - lr * g
                if full:
                    params[n] = new
                else:
                    params[n][sub] = new
        losses[k_list, t] = loss.detach().cpu().to(losses.dtype)
    return (params, losses) if return_loss else params


# ----------------------------------------------------------------------------------------------
# aggregation and evaluation
def fedavg(stacked: Params, n_k: Tensor, groups: int | None = None) -> Params:
    """FedAvg: sum_k (n_k / n) w_k. With ``groups=G`` the K entries are G blocks of K/G clients (e.g.
    G methods, block-major as in :meth:`ClientData.repeat`) and the result is stacked [G, ...]."""
    K = n_stacked(stacked)
    n_k = positive_counts(n_k, fix="Pass each client's number of training samples.")
    if groups is None:
        if len(n_k) != K:
            raise ValueError(f"n_k has {len(n_k)} entries but there are {K} client models; pass one count "
                             "per client")
        w = (n_k / n_k.sum()).to(torch.float32)
        return {n: torch.tensordot(w.to(p.device), p, dims=1) for n, p in stacked.items()}
    if K % groups:
        raise ValueError(f"groups={groups} does not divide the {K} client models")
    per = K // groups
    n_k = n_k.reshape(groups, per) if len(n_k) == K else n_k.reshape(1, per).expand(groups, per)
    w = (n_k / n_k.sum(1, keepdim=True)).to(torch.float32)
    return {n: torch.einsum("gk,gk...->g...", w.to(p.device), p.reshape(groups, per, *p.shape[1:]))
            for n, p in stacked.items()}


@torch.no_grad()
def predict(call, params: Params, x: Tensor, batch_size: int = 2048, stacked: bool = False) -> Tensor:
    """Outputs for ``x``: [N, ...] for one Params, [K, N, ...] for a stacked Params (``stacked=True``,
    one vmap over the K models)."""
    f = vmap(call, in_dims=(0, None)) if stacked else call
    outs = [f(params, xb) for xb in x.split(batch_size)]
    return torch.cat(outs, dim=1 if stacked else 0)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Accuracy along the last two dims: logits [..., N, C], y [N] -> [...]."""
    return (logits.argmax(-1) == y).float().mean(-1)


# ----------------------------------------------------------------------------------------------
# byte accounting
def state_bytes(obj) -> int:
    """Bytes of a model's parameters and buffers, or of a (possibly stacked) dict of tensors."""
    if isinstance(obj, nn.Module):
        tensors = list(obj.parameters()) + list(obj.buffers())
    elif isinstance(obj, dict):
        tensors = list(obj.values())
    else:
        tensors = list(obj)
    return int(sum(t.numel() * t.element_size() for t in tensors))


class CommLedger:
    """Bytes sent, per round and direction (``"down"`` = server -> clients, ``"up"`` = clients ->
    server). One-off transfers (a generator sent once, discriminators uploaded once) use round ``SETUP``.

    ``ledger.log(round, "down", "model", state_bytes(model), copies=K)``;
    ``ledger.total(direction=None, item=None, round=None)``; ``ledger.per_round()``."""

    def __init__(self):
        self.records: list[dict] = []

    def log(self, round: int, direction: str, item: str, n_bytes: int, copies: int = 1) -> None:
        check_choice("direction", direction, DIRECTIONS, fix="'down' is server -> client, 'up' client -> server")
        if n_bytes < 0 or copies < 0:
            raise ValueError(f"n_bytes={n_bytes} and copies={copies} must be >= 0")
        self.records.append({"round": int(round), "direction": direction, "item": item,
                             "bytes": int(n_bytes) * int(copies)})

    def total(self, direction: str | None = None, item: str | None = None, round: int | None = None) -> int:
        return sum(r["bytes"] for r in self.records
                   if (direction is None or r["direction"] == direction) and (item is None or r["item"] == item)
                   and (round is None or r["round"] == round))

    def per_round(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for r in self.records:
            out.setdefault(r["round"], {d: 0 for d in DIRECTIONS})[r["direction"]] += r["bytes"]
        return dict(sorted(out.items()))

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.records, columns=["round", "direction", "item", "bytes"])


def train_flops_per_sample(model: nn.Module, x: Tensor) -> float:
    """FLOPs of one forward + backward pass per sample (counted by torch's FlopCounterMode on the batch
    ``x``): the unit for client compute accounting (e.g. discriminator vs local training)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        out = m(x)
        out.float().sum().backward()
    return counter.get_total_flops() / len(x)


def rounds_bytes(model_bytes: int, n_clients: int, rounds: int) -> int:
    """Bytes of plain FedAvg-style training: the model down and up for every client and round."""
    return 2 * model_bytes * n_clients * rounds


# ---------------------------------------------------------------------------------------------
# Several seeds in one network (2-D): one weight per seed in every linear layer


class StackedLinear(nn.Module):
    """S linear layers applied to S member-major blocks of the batch: x [S*B, in] -> [S*B, out]
    with member s's rows through layer s (one batched matmul)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        if any(lin.bias is None for lin in linears):
            raise ValueError("StackedLinear needs linear layers with a bias")
        self.weight = nn.Parameter(torch.stack([lin.weight.detach().t() for lin in linears]).clone())
        self.bias = nn.Parameter(torch.stack([lin.bias.detach() for lin in linears])[:, None].clone())

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.baddbmm(self.bias, x.reshape(self.members, -1, x.shape[-1]), self.weight)
        return y.reshape(-1, y.shape[-1])

    def member(self, i: int) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[2]).to(self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight[i].t())
            lin.bias.copy_(self.bias[i, 0])
        return lin


def can_stack(module: nn.Module) -> bool:
    """True when every parameter of ``module`` lives in an ``nn.Linear`` layer (then
    :func:`stack_members` can vectorise it over seeds)."""
    in_linear = {id(p) for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return all(id(p) in in_linear for p in module.parameters())


def _replace(root: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def stack_members(modules: list[nn.Module]) -> nn.Module:
    """One module computing ``len(modules)`` copies of the same architecture at once on a member-major
    batch [S*B, ...] (member s = rows s*B..(s+1)*B-1). Every parameter must live in an ``nn.Linear``
    (:func:`can_stack`); everything else in the forward pass must act per sample."""
    if not all(can_stack(m) for m in modules):
        raise ValueError("only networks whose parameters all live in nn.Linear layers can be stacked over seeds "
                         "(the 2-D MLPs); train other networks one seed at a time")
    base = copy.deepcopy(modules[0])
    for name, m in list(base.named_modules()):
        if isinstance(m, nn.Linear):
            _replace(base, name, StackedLinear([mod.get_submodule(name) for mod in modules]))
    base.members = len(modules)
    return base


def unstack_member(module: nn.Module, i: int) -> nn.Module:
    """Member ``i`` of a :func:`stack_members` module as an ordinary module (its own copy)."""
    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if isinstance(m, StackedLinear):
            _replace(out, name, m.member(i))
    if hasattr(out, "members"):
        del out.members
    return out


def _member_cat(tensors: list[torch.Tensor], members: int) -> torch.Tensor:
    """Concatenate member-major batches so that the result is member-major again."""
    return torch.cat([t.reshape(members, -1, *t.shape[1:]) for t in tensors], 1).flatten(0, 1)


def _member_split(x: torch.Tensor, members: int, sizes: list[int]) -> list[torch.Tensor]:
    return [p.flatten(0, 1) for p in x.reshape(members, -1, *x.shape[1:]).split(sizes, 1)]


def _member_mean(v: torch.Tensor, members: int) -> torch.Tensor:
    return v.reshape(members, -1).mean(1)


def _clip_per_member(params: list[torch.Tensor], max_norm: float, members: int) -> torch.Tensor:
    """Clip each member's gradient to ``max_norm`` on its own (as S separate runs would); returns the
    S norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if members == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).reshape(1)
    norms = torch.sqrt(sum(g.reshape(members, -1).pow(2).sum(1) for g in grads))
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(members, *[1] * (g.ndim - 1)))
    return norms
