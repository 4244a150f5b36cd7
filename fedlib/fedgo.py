"""The FedGO protocol's one-off part (docs/methods.md §1.2): the server's generator G, every client's
discriminator D_k against it, the discriminator logits the weights are computed from, and what it costs.

- ``train_gan`` (the server's G on its unlabeled data), ``sample(G, n)``;
- ``train_discriminators`` (every client's D_k against G samples, all clients in one vmap through
  :func:`fedlib.federated.local_train`), ``discriminator_logits``; the weights then come from
  :func:`fedlib.weighting.fedgo_weights`;
- ``fedgo_overhead``: the extra bytes and client FLOPs next to the whole run;
- :class:`GaussianSource`: an off-the-shelf G with a known density (the 2-D toy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def discriminator_loss(call, params, batch) -> Tensor:
    """Binary cross-entropy, real = the client's data, fake = G samples (``batch["fake"]``), masked."""
    loss = F.softplus(-call(params, batch["x"])) + F.softplus(call(params, batch["fake"]))
    return fl.masked_mean(loss, batch["mask"])


def generator_extras(G: nn.Module):
    """An ``extras_fn`` for :func:`fedlib.federated.local_train` drawing one G sample per real sample
    from the client's own generator (outside vmap)."""
    device = next(G.parameters()).device

    def extras(x, y, g):
        with torch.no_grad():
            return {"fake": G(torch.randn(len(x), G.z_dim, generator=g).to(device))}

    return extras


def train_discriminators(D: nn.Module, G: nn.Module, clients: fl.ClientData, *, epochs: int, lr: float = 0.05,
                         momentum: float = 0.9, batch_size: int = 32, weight_decay: float = 0.0,
                         generator: torch.Generator | None = None, vectorised: bool = True,
                         init: fl.Params | None = None) -> fl.Params:
    """Step 2 of the FedGO protocol: every client trains D_k (from the same init) for ``epochs`` epochs
    on its data vs G samples; all clients in one vmap. Returns stacked D params [K, ...]."""
    init = init if init is not None else fl.get_params(D)
    return fl.local_train(D, init, clients, discriminator_loss, epochs=epochs, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, batch_size=batch_size, generator=generator,
                          extras_fn=generator_extras(G), vectorised=vectorised)


def discriminator_logits(D: nn.Module, stacked_params: fl.Params, x: Tensor) -> Tensor:
    """Pre-sigmoid logits l_k(x) of every client's discriminator on ``x``: [K, N]. Raises on NaN."""
    out = fl.predict(fl.functional(D), stacked_params, x, stacked=True)
    if not torch.isfinite(out).all():
        raise ValueError("a discriminator produced NaN/inf logits on the server data; allowed: finite logits. "
                         "Retrain the discriminators with a smaller lr or weight decay")
    return out


def fedgo_overhead(*, classifier_bytes: int, generator_bytes: int, discriminator_bytes: int, n_clients: int,
                   rounds: int, n_k, local_epochs: int, disc_epochs: int, clf_flops: float, disc_flops: float,
                   gen_forward_flops: float) -> dict:
    """FedGO's one-off extra cost next to the whole run (docs/methods.md §1.2 claim c).

    Bytes: G down to every client once + D_k up once, vs the classifier down and up every round.
    Client FLOPs per sample: D training sees a real and a G sample (2 x disc_flops) and draws the G
    sample (gen_forward_flops), for ``disc_epochs`` epochs; local training costs clf_flops per sample
    for ``local_epochs`` epochs every round."""
    n = float(sum(int(v) for v in n_k))
    extra_bytes = n_clients * (generator_bytes + discriminator_bytes)
    base_bytes = fl.rounds_bytes(classifier_bytes, n_clients, rounds)
    extra_flops = n * disc_epochs * (2 * disc_flops + gen_forward_flops)
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
