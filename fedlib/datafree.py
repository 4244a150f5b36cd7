"""Data-free ensemble distillation on the server (docs/methods.md §1.3): generators trained against the
clients' ensemble, whose samples replace server data.

- :func:`dense_distill` (DENSE-style): a label-conditioned generator trained against the uniform
  logit ensemble with cross-entropy plus an adversarial disagreement term; the student distilled on
  its samples, alternating.

Each method's server step has the signature of :attr:`fedlib.distill.Method.server`:
``server(model, start, client_params, setup, n_classes, cfg) -> params``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from . import federated as fl
from .distill import Method, kl_to_targets, register_method


def dense_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, n_classes: int, *,
                  steps: int, batch_size: int = 64, lr: float = 1e-3, lr_generator: float = 1e-3,
                  adv_weight: float = 1.0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> fl.Params:
    """DENSE-style data-free distillation (docs/methods.md §1.3), alternating per step:
    generator G(z, y) (``G.z_dim`` = noise + n_classes; y one-hot appended, our choice) minimises
    CE(uniform logit ensemble(G(z, y)), y) - adv_weight * KL(ensemble || student) (hard-to-mimic samples
    the ensemble is sure about); then the student minimises the KL on fresh G samples. G is updated
    in place (keep it across rounds); returns the student's params."""
    call = fl.functional(model)
    teacher = vmap(call, in_dims=(0, None))
    student = fl.set_params(copy.deepcopy(model), start)
    opt_s = torch.optim.Adam(student.parameters(), lr=lr)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_generator, betas=(0.5, 0.999))
    device = next(G.parameters()).device
    noise = G.z_dim - n_classes

    def draw():
        y = torch.randint(0, n_classes, (batch_size,), generator=generator)
        z = torch.randn(batch_size, noise, generator=generator)
        return torch.cat([z, F.one_hot(y, n_classes).float()], 1).to(device), y.to(device)

    for _ in range(steps):
        zin, y = draw()
        x = G(zin)
        t_logits = teacher(client_params, x).mean(0)
        q = torch.softmax(t_logits / temperature, -1)
        disagreement = kl_to_targets(student(x), q, temperature).mean()
        loss_g = F.cross_entropy(t_logits, y) - adv_weight * disagreement
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            zin, _ = draw()
            x = G(zin)
            q = torch.softmax(teacher(client_params, x).mean(0) / temperature, -1)
        loss_s = kl_to_targets(student(x), q, temperature).mean()
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        opt_s.step()
    return fl.get_params(student)


def dense_server(model, start, client_params, setup, n_classes, cfg):
    """DENSE as a server method: the setup's label-conditioned generator, kept across rounds."""
    return dense_distill(model, start, client_params, setup.dense_generator, n_classes,
                         steps=cfg.dense_steps or cfg.distill_steps, batch_size=cfg.distill_batch, lr=cfg.distill_lr,
                         temperature=cfg.temperature, generator=cfg.generator)


register_method(Method("dense", server=dense_server, setup_needs=("dense_generator",),
                       doc="DENSE-style data-free distillation with a generator against the ensemble"))
