"""The FedGO protocol's one-off part (docs/methods.md §1.2): the server's generator G, every client's
discriminator D_k against it, the discriminator logits the weights are computed from, and what it costs.

- ``train_gan`` (the server's G on its unlabeled data), ``sample(G, n)``;
- ``train_discriminators`` (every client's D_k against G samples, all clients in one vmap through
  :func:`fedlib.federated.local_train`, :func:`discriminator_loss`), ``discriminator_logits``; the weights then come from
  :func:`fedlib.weighting.fedgo_weights`;
- validation quantities of the discriminators (no class labels): ``discriminator_val_loss`` (each
  D_k's held-out binary cross-entropy) and ``client_posterior_loss`` (the held-out log-loss of the
  FedGO weights as the posterior of the source client: the one the discriminator budget is chosen on);
- the truly data-free G (docs/methods.md §1.2-1.3; the design is ours): :class:`LabelConditioned` wraps a
  label-conditioned generator as a plain z -> x generator, and ``train_generator_data_free`` trains it
  against the clients' ensemble alone (DENSE-style, no server data at all);
- the protocol's one-off steps as :func:`fedlib.studies.fedgo_setups` runs them, one function each:
  ``server_gan`` (step 1), ``client_discriminators`` (step 2 for several federations at once, sliced per
  federation), ``warmup_round`` and ``data_free_generators`` (the data-free scenario's G);
- ``model_costs`` and ``fedgo_overhead``: the extra bytes and client FLOPs next to the whole run;
- :class:`GaussianSource`: an off-the-shelf G with a known density (the 2-D toy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from . import federated as fl


def sample(G: nn.Module, n: int, generator: torch.Generator | None = None, batch_size: int = 4096) -> Tensor:
    """n samples of G (noise drawn on CPU from ``generator``)."""
    device = next(G.parameters()).device
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=generator)
        return torch.cat([G(zb.to(device)) for zb in z.split(batch_size)])


def train_gan(x: Tensor, G: nn.Module, D: nn.Module, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
              generator: torch.Generator | None = None) -> nn.Module:
    """Non-saturating GAN on the server's unlabeled data ``x`` (Adam, betas (0.5, 0.999)); returns G
    trained in place. Any GAN will do for FedGO (docs/methods.md §1.2); this is the small one we use."""
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    device = x.device
    for _ in range(steps):
        real = x[torch.randint(0, len(x), (batch_size,), generator=generator).to(device)]
        fake = G(torch.randn(batch_size, G.z_dim, generator=generator).to(device))
        loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-D(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return G


def discriminator_loss(G: nn.Module | list):
    """The ``loss_fn`` of client discriminator training (docs/methods.md §1.2 step 2): binary
    cross-entropy with label 1 for the client's own data and label 0 for G samples, one G sample per
    real sample (``batch["z"]``: its noise), both masked alike, so the optimum is
    D_k = p_k / (p_k + p_G), i.e. the logit l_k = log p_k - log p_G. G runs inside the (vmapped) loss,
    one call for all clients, without gradients (G is fixed). With a list of generators (one per
    federation trained together) ``batch["y"]`` carries each client's index into the list: D never
    reads class labels."""
    if isinstance(G, (list, tuple)):
        call_g, stacked = fl.functional(G[0]), fl.stack_params([fl.get_params(g) for g in G])

        def sample_of(batch):
            pick = batch["y"][:1]  # a 1-element index: a 0-d one would be read with .item(), which vmap refuses
            return call_g({n: p.index_select(0, pick)[0] for n, p in stacked.items()}, batch["z"])
    else:
        def sample_of(batch):  # a G that cannot run under vmap sends its samples in the batch (generator_noise)
            return batch["fake"] if "fake" in batch else G(batch["z"])

    def loss(call, params, batch) -> Tensor:
        with torch.no_grad():
            fake = sample_of(batch)
        per_sample = F.softplus(-call(params, batch["x"])) + F.softplus(call(params, fake))
        return fl.masked_mean(per_sample, batch["mask"])

    return loss


def generator_noise(G: nn.Module):
    """An ``extras_fn`` for :func:`fedlib.federated.local_train` drawing the noise of one G sample per
    real sample from the client's own generator (outside vmap; G itself runs in the loss). A G with
    ``vmappable = False`` (a diffusion sampler, :class:`fedlib.dmd2.SamplerGenerator`: its solvers branch
    on values) is run here instead, outside vmap, and its samples travel in the batch as ``fake``."""
    device = next(G.parameters()).device
    outside = not getattr(G, "vmappable", True)

    def extras(x, y, g):
        z = torch.randn(len(x), G.z_dim, generator=g).to(device)
        if outside:
            with torch.no_grad():
                return {"fake": G(z)}
        return {"z": z}

    return extras


def train_discriminators(D: nn.Module, G: nn.Module | list, clients: fl.ClientData, *, epochs: int, lr: float = 0.05,
                         momentum: float = 0.9, batch_size: int = 32, weight_decay: float = 0.0,
                         generator: torch.Generator | None = None, vectorised: bool = True,
                         init: fl.Params | None = None, generator_of: Tensor | None = None) -> fl.Params:
    """Step 2 of the FedGO protocol: every client trains D_k (from the same init, or from a stacked
    ``init``, one per client) for ``epochs`` epochs on its data vs G samples; all clients in one vmap.
    Several federations with their own generators train together when ``G`` is a list of generators
    (same architecture) and ``generator_of`` [K] gives each client's index into it. Returns stacked D
    params [K, ...]."""
    init = init if init is not None else fl.get_params(D)
    if isinstance(G, (list, tuple)):
        if generator_of is None or len(generator_of) != clients.n_clients:
            raise ValueError(f"a list of {len(G)} generators needs generator_of: one index per client "
                             f"({clients.n_clients})")
        ids = torch.as_tensor(generator_of, dtype=torch.long, device=clients.y.device)
        clients = fl.ClientData(clients.x, ids[:, None].expand_as(clients.y).contiguous(), clients.mask, clients.n_k)
    return fl.local_train(D, init, clients, discriminator_loss(G), epochs=epochs, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, batch_size=batch_size, generator=generator,
                          extras_fn=generator_noise(G[0] if isinstance(G, (list, tuple)) else G),
                          vectorised=vectorised)


def discriminator_logits(D: nn.Module, stacked_params: fl.Params, x: Tensor) -> Tensor:
    """Pre-sigmoid logits l_k(x) of every client's discriminator on ``x``: [K, N]. Raises on NaN."""
    from .methods import predict_each

    out = predict_each(fl.functional(D), stacked_params, x)
    if not torch.isfinite(out).all():
        raise ValueError("a discriminator produced NaN/inf logits on the server data; allowed: finite logits. "
                         "Retrain the discriminators with a smaller lr or weight decay")
    return out


def discriminator_val_loss(D: nn.Module, stacked_params: fl.Params, G: nn.Module, clients: fl.ClientData,
                           generator: torch.Generator | None = None) -> Tensor:
    """Each client's held-out binary cross-entropy [K] of its D_k on ``clients`` (data it did not train
    on) against as many fresh G samples: the logistic loss is minimised by the true log-ratio
    log p_k/p_G, so lower is a better density-ratio estimate for a fixed G (no labels needed)."""
    call = fl.functional(D)
    out = []
    for k in range(clients.n_clients):
        x, _ = clients.client(k)
        fake = sample(G, len(x), generator).to(x.device)
        p = fl.index_params(stacked_params, k)
        with torch.no_grad():
            out.append((F.softplus(-call(p, x)).mean() + F.softplus(call(p, fake)).mean()) / 2)
    return torch.stack(out).cpu()


def client_posterior_loss(D: nn.Module, stacked_params: fl.Params, val: fl.ClientData, n_k) -> Tensor:
    """The validation quantity of FedGO's weights: they estimate the posterior P(client k | x) over the
    union of client data (docs/methods.md §1.2), so on held-out samples whose client is known (client
    k's own data it did not train on) their log-loss -log a_k(x) is a proper score of that estimate
    (lower is better; no class labels). Returns the mean per client [K]. ``n_k``: the training counts."""
    from .weighting import fedgo_weights

    out = []
    for k in range(val.n_clients):
        x, _ = val.client(k)
        a = fedgo_weights(discriminator_logits(D, stacked_params, x), n_k)  # [K, n]
        out.append(-a[k].clamp_min(1e-12).log().mean())
    return torch.stack(out).cpu()


class LabelConditioned(nn.Module):
    """A label-conditioned generator G(z, onehot(y)) seen as a plain generator of ``z_dim`` Gaussian
    inputs: the last input picks the label, y = floor(C * Phi(z_last)) (uniform over the C classes),
    so :func:`sample` and the discriminators' G samples need nothing else."""

    def __init__(self, G: nn.Module, n_classes: int):
        super().__init__()
        self.G, self.n_classes = G, n_classes
        self.z_dim = G.z_dim - n_classes + 1

    def labels(self, z: Tensor) -> Tensor:
        u = 0.5 * (1 + torch.erf(z[:, -1] / math.sqrt(2.0)))
        return (u * self.n_classes).long().clamp(0, self.n_classes - 1)

    def forward(self, z: Tensor) -> Tensor:
        classes = torch.arange(self.n_classes, device=z.device)
        onehot = (self.labels(z)[:, None] == classes).to(z.dtype)  # F.one_hot does not vmap
        return self.G(torch.cat([z[:, :-1], onehot], 1))


def train_generator_data_free(G: LabelConditioned, model: nn.Module, client_params: fl.Params, *, steps: int,
                              batch_size: int = 64, lr: float = 1e-3, diversity: float = 1.0, n_generators: int = 0,
                              generator: torch.Generator | None = None) -> fl.Params:
    """The truly data-free G (no server data): G(z, y) is trained against the clients' uniform
    logit ensemble (DENSE's teacher) to produce samples the ensemble assigns to the drawn label y,
    cross-entropy CE(mean_k f_k(G(z, y)), y), minus ``diversity`` x a mode-seeking term
    (|G(z1, y) - G(z2, y)| / |z1 - z2|, same y) that keeps one label's samples apart. Adam
    (betas 0.5, 0.999). ``n_generators`` = S > 0 trains S generators at once, each against its own
    clients (``client_params`` stacked [S, K, ...]), from G's initial parameters; otherwise one
    (``client_params`` [K, ...]). Returns G's trained parameters (stacked [S, ...] when S > 0)."""
    from .methods import adam_step

    S = n_generators or 1
    call_f = fl.functional(model)
    call_g = fl.functional(G)
    cp = {n: p.detach() for n, p in client_params.items()}
    if not n_generators:
        cp = {n: p.unsqueeze(0) for n, p in cp.items()}
    params = fl.broadcast_params(fl.get_params(G), S)
    device = next(G.parameters()).device
    half = max(batch_size // 2, 1)

    def objective(gp, clients, z):
        x = call_g(gp, z)
        logits = vmap(call_f, in_dims=(0, None))(clients, x).mean(0)
        loss = F.cross_entropy(logits, G.labels(z))
        if diversity:
            gap = (x[:half] - x[half:]).abs().flatten(1).mean(1) / (z[:half] - z[half:]).abs().mean(1)
            loss = loss - diversity * gap.mean()
        return loss

    step = vmap(grad_and_value(objective), in_dims=(0, 0, None))
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    for t in range(1, steps + 1):
        z1 = torch.randn(half, G.z_dim, generator=generator)
        z2 = torch.cat([torch.randn(half, G.z_dim - 1, generator=generator), z1[:, -1:]], 1)  # same labels
        grads, _ = step(params, cp, torch.cat([z1, z2]).to(device))
        with torch.no_grad():
            adam_step(params, grads, state, t, lr, betas=(0.5, 0.999))
    return params if n_generators else fl.index_params(params, 0)


def model_costs(classifier: nn.Module, G: nn.Module, D: nn.Module, x: Tensor) -> dict:
    """What FedGO's overhead is computed from (:func:`fedgo_overhead`): the bytes of the classifier, G
    and D, and FLOPs per sample (``torch.utils.flop_counter`` on the batch ``x``) of one classifier and
    one D training step (forward + backward) and of one G forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(G.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        G(torch.randn(len(x), G.z_dim, device=device))
    return dict(classifier_bytes=fl.state_bytes(classifier), generator_bytes=fl.state_bytes(G),
                discriminator_bytes=fl.state_bytes(D), clf_flops=fl.train_flops_per_sample(classifier, x),
                disc_flops=fl.train_flops_per_sample(D, x), gen_forward_flops=fc.get_total_flops() / len(x))


def fedgo_overhead(*, classifier_bytes: int, generator_bytes: int, discriminator_bytes: int, n_clients: int,
                   rounds: int, n_k, local_epochs: int, disc_epochs: int, clf_flops: float, disc_flops: float,
                   gen_forward_flops: float, warmup_epochs: int = 0) -> dict:
    """FedGO's one-off extra cost next to the whole run (docs/methods.md §1.2 claim c).

    Bytes: G down to every client once + D_k up once, vs the classifier down and up every round.
    Client FLOPs per sample: D training sees a real and a G sample (2 x disc_flops) and draws the G
    sample (gen_forward_flops), for ``disc_epochs`` epochs; local training costs clf_flops per sample
    for ``local_epochs`` epochs every round. ``warmup_epochs`` > 0 (the data-free G of
    :func:`fedlib.studies.fedgo_setups`) adds a warm-up round: that many local epochs and one
    classifier upload per client."""
    n = float(sum(int(v) for v in n_k))
    extra_bytes = n_clients * (generator_bytes + discriminator_bytes + (classifier_bytes if warmup_epochs else 0))
    base_bytes = fl.rounds_bytes(classifier_bytes, n_clients, rounds)
    extra_flops = n * (disc_epochs * (2 * disc_flops + gen_forward_flops) + warmup_epochs * clf_flops)
    base_flops = n * local_epochs * rounds * clf_flops
    return {"extra_bytes": extra_bytes, "training_bytes": base_bytes,
            "bytes_pct": 100.0 * extra_bytes / (base_bytes + extra_bytes),
            "extra_client_flops": extra_flops, "training_client_flops": base_flops,
            "flops_pct": 100.0 * extra_flops / (base_flops + extra_flops)}


class GaussianSource(nn.Module):
    """An 'off-the-shelf' generator with a known density N(0, scale^2 I) in ``dim`` dimensions
    (the FedGO protocol allows a given G; on 2-D toys this keeps the toy figure exact and fast)."""

    def __init__(self, dim: int = 2, scale: float = 3.0):
        super().__init__()
        self.z_dim = dim
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def forward(self, z):
        return self.scale * z


# ----------------------------------------------------------------------------------------------
# the protocol's one-off steps, one function each (fedlib.studies.fedgo_setups assembles them per scenario).
# Each seeds or draws exactly where the protocol always did, so that the setups are reproducible bit for bit.
def server_gan(x_server: Tensor, shape: tuple, *, seed: int, z_dim: int, width: int, steps: int, lr: float,
               generator: torch.Generator | None = None, device="cpu") -> nn.Module:
    """Step 1 (docs/methods.md §1.2): the server's G, trained on its unlabeled data ``x_server``; G's
    initial weights come from ``torch.manual_seed(seed)`` (one G per seed, whatever else ran before)."""
    from . import models as fm

    torch.manual_seed(seed)
    G = fm.make_generator(shape, z_dim=z_dim, width=width).to(device)
    train_gan(x_server, G, fm.make_discriminator(shape).to(device), steps=steps, lr=lr, generator=generator)
    return G


def client_discriminators(D: nn.Module, G: nn.Module | list, packs: list, *, epochs: int, lr: float,
                          init: fl.Params, generator: torch.Generator | None = None,
                          generator_of: Tensor | None = None) -> list:
    """Step 2: the clients of every federation in ``packs`` (a list of :class:`fedlib.federated.ClientData`)
    train their D_k against G all in one vmap; returns one stacked D_k [K, ...] per pack, in order."""
    d_all = train_discriminators(D, G, fl.concat_clients(packs), epochs=epochs, lr=lr, generator=generator,
                                 init=init, generator_of=generator_of)
    out, start = [], 0
    for pack in packs:
        out.append(fl.index_params(d_all, slice(start, start + pack.n_clients)))
        start += pack.n_clients
    return out


def warmup_round(model: nn.Module, init: fl.Params, packs: list, *, epochs: int, lr: float,
                 generator: torch.Generator | None = None) -> fl.Params:
    """The data-free scenario's warm-up round (our design): every client of every pack trains ``model`` from
    ``init`` (local SGD, momentum 0.9, batches of 32) and uploads it; stacked [sum K, ...] in pack order."""
    return fl.local_train(model, init, fl.concat_clients(packs), epochs=epochs, lr=lr, momentum=0.9, batch_size=32,
                          generator=generator)


def data_free_generators(model: nn.Module, warm: fl.Params, n_federations: int, shape: tuple, n_classes: int, *,
                         seed: int, z_dim: int, width: int, steps: int, lr: float,
                         generator: torch.Generator | None = None, device="cpu") -> list:
    """One label-conditioned G per federation, each trained against its own clients' warm-up models
    (``warm`` stacked [n_federations * K, ...], federation-major; :func:`train_generator_data_free`), all
    from the same initial weights (``torch.manual_seed(seed)``). Returns the trained generators."""
    import copy

    from . import models as fm

    torch.manual_seed(seed)
    G = LabelConditioned(fm.make_generator(shape, z_dim=z_dim + n_classes, width=width), n_classes).to(device)
    K = next(iter(warm.values())).shape[0] // n_federations
    g_all = train_generator_data_free(G, model, {n: p.reshape(n_federations, K, *p.shape[1:]) for n, p in warm.items()},
                                      steps=steps, lr=lr, n_generators=n_federations, generator=generator)
    return [fl.set_params(copy.deepcopy(G), fl.index_params(g_all, i)) for i in range(n_federations)]
