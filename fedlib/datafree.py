"""Data-free ensemble distillation (docs/methods.md §1.3): generators trained against the clients'
models stand in for server data. Four methods, each registered in :mod:`fedlib.methods` when the
package imports this module (so each runs in-process and on Flower), each as pure losses plus one server step
``server(model, start, client_params, setup, n_classes, cfg, ctx) -> params``:

==============  ===============================================================================
``dense``       DENSE-style (Zhang et al. 2022): a label-conditioned image generator against the
                uniform logit ensemble (cross-entropy) and the student (adversarial disagreement);
                the student distilled on its samples, alternating.
``fedgen``      FedGen (Zhu, Hong & Zhou, ICML 2021): the server learns a label-conditioned generator
                G_w(z | y) in the classifier's *feature space* (the input of its linear head) so that
                the clients' heads, weighted per class by their label counts, agree on y; G_w and the
                label prior go down to every client each round, and the clients add
                ``weight`` x E_{y ~ p(y), z ~ G_w(.|y)} CE(h(z; theta_k^p), y) to their loss. The global model is
                the FedAvg (no server distillation).
``fedftg``      FedFTG (Zhang et al., CVPR 2022): after FedAvg, the server fine-tunes the global model
                on samples of a conditional image generator trained adversarially against it: the
                generator minimises L_cls + beta_div L_div - beta_md L_md, the global model minimises
                L_md (hard-sample mining), with the class-level ensemble alpha_{k,y} = n_{k,y} /
                sum_j n_{j,y} and labels drawn from the clients' class counts (customised label
                sampling).
``coboosting``  Co-Boosting (Dai et al., ICLR 2024), one-shot FL: the server alternately synthesises
                hard samples from the weighted ensemble A_w(x) = sum_k w_k f_k(x) (generator loss
                L_H - beta_adv KL(A_w || student), then one gradient-sign step x + eps sign(grad_x
                CE(A_w(x), y)) that makes them harder), re-weights the ensemble members on them
                (w <- proj_simplex(w - mu sign(grad_w CE(A_w(x), y)))) and distils A_w into the server
                model on every sample synthesised so far.
==============  ===============================================================================

Notation follows the papers: n_{k,y} client k's count of class y (:func:`label_counts`),
alpha_{k,y} the class-level weights (:func:`class_weights`), p(y) the label prior
(:func:`label_prior`), w the ensemble weights of Co-Boosting. The equations are read from the papers;
where a paper leaves a choice open the docstring says "our choice". FedGen, FedFTG and Co-Boosting
draw from their group's own random stream (:class:`fedlib.distill.GroupContext`) and keep their
generator in the group's state across the rounds of one run, built lazily from that stream, so a run
needs no extra set-up (DENSE keeps the set-up's ``dense_generator`` and draws from the run's
generator, as before). Settings per method: ``run_rounds(..., method_options={"fedftg": {"beta_md": 1.0}})``;
the defaults are :data:`OPTIONS`; ``steps`` defaults to ``dense_steps`` (or ``distill_steps``), the
server budget every data-free method shares.

Extra communication (:func:`extra_bytes`): FedGen sends G_w and p(y) down to every client every round
(counted by both drivers' ledgers, as the payload of its :class:`fedlib.distill.ClientTerm`); FedGen and
FedFTG need each client's label counts n_{k,y} (C integers up per round; as for n_k, the simulation's
server reads them from the set-up, so :func:`extra_bytes` counts them by formula); Co-Boosting sends
nothing beyond the models.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import federated as fl
from . import models as fm
from .methods import ClientTerm, Method, kl_to_targets, register_method

# per-method settings (ServerConfig.method_options overrides them); steps None: cfg.dense_steps or cfg.distill_steps
OPTIONS = {
    # FedGen's lr: chosen on the generator's own objective (quick scale, 10 steps a round: at 1e-3 it falls
    # only from 2.33 to 1.66 in five rounds, at 1e-2 it reaches ~0 by round 4)
    "fedgen": dict(steps=None, lr_generator=1e-2, weight=1.0, noise_dim=8, hidden=32, diversity=0.0),
    "fedftg": dict(steps=None, student_steps=1, lr_generator=1e-3, beta_md=1.0, beta_div=1.0, noise_dim=16, width=16),
    "coboosting": dict(steps=None, lr_generator=1e-3, beta_adv=1.0, gamma=1.0, eps=0.1, mu=0.01, noise_dim=16,
                       width=16),
}


def options(cfg, name: str) -> dict:
    """The settings of method ``name``: :data:`OPTIONS` updated by ``cfg.method_options[name]``."""
    given = dict(getattr(cfg, "method_options", {}).get(name, {}))
    unknown = sorted(set(given) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(f"unknown {name} options {unknown}; allowed: {', '.join(OPTIONS[name])}")
    out = {**OPTIONS[name], **given}
    if out["steps"] is None:
        out["steps"] = cfg.dense_steps or cfg.distill_steps
    return out


# ----------------------------------------------------------------------------------------------
# shared pieces: label counts, class-level weights, the label prior, the classifier's head
def label_counts(clients: fl.ClientData, n_classes: int, accepted: Tensor | None = None) -> Tensor:
    """n_{k,y}: every client's count of each class [K, C] (float), of the ``accepted`` clients only when
    given (their indices, in that order)."""
    y = clients.y if accepted is None else clients.y[accepted.to(clients.y.device)]
    mask = clients.mask if accepted is None else clients.mask[accepted.to(clients.mask.device)]
    return (F.one_hot(y, n_classes).float() * mask[..., None]).sum(1)


def class_weights(counts: Tensor) -> Tensor:
    """The class-level ensemble weights alpha_{k,y} = n_{k,y} / sum_j n_{j,y} [K, C] (FedFTG; FedGen's
    weighting of its clients' heads); uniform over the clients for a class nobody holds."""
    total = counts.sum(0, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1e-12), torch.full_like(counts, 1.0 / counts.shape[0]))


def label_prior(counts: Tensor) -> Tensor:
    """p(y) proportional to sum_k n_{k,y} [C]: the labels the generators are asked for (FedGen's
    p-hat(y), FedFTG's customised label sampling)."""
    return counts.sum(0) / counts.sum()


def head_fn(model: nn.Module):
    """``(name, h)``: the classifier's head (:func:`fedlib.models.head_name`) and ``h(params, z)``, the
    head's logits on features ``z`` from the FULL classifier parameters ``params`` (pure; vmap-safe)."""
    name = fm.head_name(model)
    head = model.get_submodule(name)
    cut = len(name) + 1

    def h(params, z):
        return functional_call(head, {n[cut:]: p for n, p in params.items() if n.startswith(name + ".")}, (z,))

    return name, h


def diversity_loss(x: Tensor, z: Tensor) -> Tensor:
    """L_div = exp(-mean_{i,j} d(x_i, x_j) d(z_i, z_j)), d the mean absolute difference per coordinate
    (the normalisation is our choice: it keeps the product O(1) for any sample size): small when
    different noise gives different samples (mode seeking; FedFTG's L_dis)."""
    dx = (x.flatten(1)[:, None] - x.flatten(1)[None]).abs().mean(-1)
    dz = (z[:, None] - z[None]).abs().mean(-1)
    return torch.exp(-(dx * dz).mean())


def _generator(state: dict, key: str, rng: torch.Generator, build, device):
    """The group's generator, built on first use with its parameters drawn from the group's stream."""
    if key not in state:
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state[key] = build().to(device)
    return state[key]


def _teacher(model: nn.Module):
    return vmap(fl.functional(model), in_dims=(0, None))


def _device(params: fl.Params):
    return next(iter(params.values())).device


# ----------------------------------------------------------------------------------------------
# DENSE
def dense_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, n_classes: int, *,
                  steps: int, batch_size: int = 64, lr: float = 1e-3, lr_generator: float = 1e-3,
                  adv_weight: float = 1.0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> fl.Params:
    """DENSE-style data-free distillation (docs/methods.md §1.3), alternating per step:
    generator G(z, y) (``G.z_dim`` = noise + n_classes; y one-hot appended, our choice) minimises
    CE(uniform logit ensemble(G(z, y)), y) - adv_weight * KL(ensemble || student) (hard-to-mimic samples
    the ensemble is sure about); then the student minimises the KL on fresh G samples. G is updated
    in place (keep it across rounds); returns the student's params."""
    teacher = _teacher(model)
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


def dense_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """DENSE as a server method: the setup's label-conditioned generator, kept across rounds."""
    return dense_distill(model, start, client_params, setup.dense_generator, n_classes,
                         steps=cfg.dense_steps or cfg.distill_steps, batch_size=cfg.distill_batch, lr=cfg.distill_lr,
                         temperature=cfg.temperature, generator=cfg.generator)


# ----------------------------------------------------------------------------------------------
# FedGen
def fedgen_generator_loss(head_logits: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    """FedGen's generator objective on generated features: CE(sum_k alpha_{k,y} g(z; theta_k^p), y),
    the cross-entropy of the clients' head logits ``head_logits`` [K, B, C], weighted per sample by the
    class-level weights ``alpha`` [K, C] of its label ``y`` [B] (the paper's ensemble, weighted by the
    clients' label counts as papers.md §1.3 says)."""
    a = alpha[:, y]  # [K, B]
    return F.cross_entropy((a[..., None] * head_logits).sum(0), y)


def fedgen_client_loss(head_logits: Tensor, y: Tensor) -> Tensor:
    """FedGen's client regulariser on generated features: CE(h(z; theta_k^p), y), mean over the B
    generated (z, y); ``head_logits`` [B, C] are the client's own head on them."""
    return F.cross_entropy(head_logits, y)


def train_fedgen_generator(G: fm.FeatureGenerator, heads: fl.Params, h, counts: Tensor, *, steps: int,
                           batch_size: int = 64, lr: float = 1e-3, diversity: float = 0.0,
                           rng: torch.Generator | None = None) -> list[float]:
    """``steps`` Adam steps of G on :func:`fedgen_generator_loss` (+ ``diversity`` x
    :func:`diversity_loss` of the features against the noise, 0 in the paper's equation) with labels
    drawn from p(y) (:func:`label_prior` of ``counts`` [K, C]); ``heads`` the clients' stacked parameters,
    ``h`` from :func:`head_fn`. In place; returns the objective before every step."""
    device = next(G.parameters()).device
    alpha, prior = class_weights(counts).to(device), label_prior(counts).cpu()
    opt = torch.optim.Adam(G.parameters(), lr=lr)
    heads_of = vmap(h, in_dims=(0, None))
    trace = []
    for _ in range(steps):
        y = torch.multinomial(prior, batch_size, replacement=True, generator=rng).to(device)
        eps = torch.randn(batch_size, G.noise_dim, generator=rng).to(device)
        z = G(eps, y)
        loss = fedgen_generator_loss(heads_of(heads, z), y, alpha)
        if diversity:
            loss = loss + diversity * diversity_loss(z, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.append(float(loss.detach()))
    return trace


def fedgen_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """FedGen's server step: G_w (kept across rounds) learns from the accepted clients' heads; the
    global model stays the FedAvg ``start``."""
    o = options(cfg, "fedgen")
    _, h = head_fn(model)
    feature_dim = model.get_submodule(fm.head_name(model)).in_features
    G = _generator(ctx.state, "G", ctx.rng, lambda: fm.FeatureGenerator(n_classes, feature_dim, o["noise_dim"],
                                                                          o["hidden"]), _device(start))
    counts = label_counts(setup.clients, n_classes, ctx.accepted).to(_device(start))
    train_fedgen_generator(G, client_params, h, counts, steps=o["steps"], batch_size=cfg.distill_batch,
                           lr=o["lr_generator"], diversity=o["diversity"], rng=ctx.rng)
    ctx.state["prior"], ctx.state["weight"] = label_prior(counts), float(o["weight"])
    return start


def _fedgen_payload(state: dict, n_classes: int, cfg):
    """G_w's parameters (``G.*``), p(y) and the regulariser's weight: None before G_w's first training."""
    if "G" not in state or "prior" not in state:
        return None
    return {**{f"G.{n}": p.detach().clone() for n, p in state["G"].named_parameters()},
            "prior": state["prior"].detach().clone(), "weight": torch.tensor(state["weight"])}


def _fedgen_extras(model: nn.Module, payload, n_classes: int):
    """Per step: B labels from p(y) and B features z = G_w(eps, y), drawn with the client's generator."""
    feature_dim = model.get_submodule(fm.head_name(model)).in_features
    if payload is None:
        def none(x, y, g):
            return {"fedgen_z": x.new_zeros(len(x), feature_dim), "fedgen_y": torch.zeros(len(x), dtype=torch.long),
                    "fedgen_weight": torch.tensor(0.0)}

        return none
    params = {n[2:]: p for n, p in payload.items() if n.startswith("G.")}
    G = fm.FeatureGenerator.like(params, n_classes)
    G.load_state_dict(params)
    G = G.to(params["net.0.weight"].device)
    prior, weight = payload["prior"].float().cpu(), payload["weight"].float().reshape(())
    device = params["net.0.weight"].device

    def draw(x, y, g):
        yy = torch.multinomial(prior, len(x), replacement=True, generator=g)
        eps = torch.randn(len(x), G.noise_dim, generator=g)
        with torch.no_grad():
            z = G(eps.to(device), yy.to(device))
        return {"fedgen_z": z, "fedgen_y": yy, "fedgen_weight": weight}

    return draw


def _fedgen_loss(model: nn.Module):
    _, h = head_fn(model)

    def loss(call, params, batch):
        return fedgen_client_loss(h(params, batch["fedgen_z"]), batch["fedgen_y"])

    return loss


FEDGEN = ClientTerm("fedgen", payload=_fedgen_payload, extras=_fedgen_extras, loss=_fedgen_loss)


# ----------------------------------------------------------------------------------------------
# FedFTG
def fedftg_cls_loss(logits: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    """L_cls: the class-level ensemble's fidelity, mean_i sum_k alpha_{k,y_i} CE(f_k(x_i), y_i);
    ``logits`` [K, B, C] of the clients on the generated x, ``alpha`` [K, C]."""
    a = alpha[:, y]  # [K, B]
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none").view_as(a)
    return (a * ce).sum(0).mean()


def fedftg_md_loss(logits: Tensor, student_logits: Tensor, y: Tensor, alpha: Tensor,
                   temperature: float = 1.0) -> Tensor:
    """L_md: the model discrepancy, mean_i sum_k alpha_{k,y_i} T^2 KL(softmax(f_k(x_i)/T) ||
    softmax(f(x_i)/T)) between the clients [K, B, C] and the global model [B, C]. The generator
    maximises it (hard samples), the global model minimises it; for the global model its gradient is
    that of the KL to the class-level mixture sum_k alpha_{k,y} softmax(f_k / T)."""
    a = alpha[:, y]
    p = torch.softmax(logits / temperature, -1)
    kl = (p * (torch.log_softmax(logits / temperature, -1)
               - torch.log_softmax(student_logits / temperature, -1)[None])).sum(-1)  # [K, B]
    return temperature**2 * (a * kl).sum(0).mean()


def fedftg_generator_loss(logits, student_logits, x, noise, y, alpha, *, beta_md: float = 1.0,
                          beta_div: float = 1.0, temperature: float = 1.0) -> Tensor:
    """The generator's objective L_cls + beta_div L_div - beta_md L_md (hard-sample mining)."""
    return (fedftg_cls_loss(logits, y, alpha) + beta_div * diversity_loss(x, noise)
            - beta_md * fedftg_md_loss(logits, student_logits, y, alpha, temperature))


def fedftg_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, counts: Tensor,
                   n_classes: int, *, steps: int, student_steps: int = 1, batch_size: int = 64, lr: float = 1e-3,
                   lr_generator: float = 1e-3, beta_md: float = 1.0, beta_div: float = 1.0,
                   temperature: float = 1.0, rng: torch.Generator | None = None, trace: list | None = None) -> fl.Params:
    """FedFTG's server fine-tuning from ``start`` (the FedAvg model): ``steps`` times, one Adam step of
    the conditional generator G(z, y) (``G.z_dim`` = noise + n_classes) on
    :func:`fedftg_generator_loss`, then ``student_steps`` Adam steps of the global model on L_md of fresh
    samples. Labels y ~ p(y) of the clients' class counts ``counts`` [K, C] (customised label
    sampling). G is updated in place; returns the fine-tuned params (``trace``: the generator's
    objective before each of its steps is appended)."""
    device = next(G.parameters()).device
    alpha, prior = class_weights(counts).to(device), label_prior(counts).cpu()
    teacher = _teacher(model)
    student = fl.set_params(copy.deepcopy(model), start)
    opt_s = torch.optim.Adam(student.parameters(), lr=lr)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_generator, betas=(0.5, 0.999))
    noise_dim = G.z_dim - n_classes

    def draw():
        y = torch.multinomial(prior, batch_size, replacement=True, generator=rng).to(device)
        z = torch.randn(batch_size, noise_dim, generator=rng).to(device)
        return G(fm.conditional_noise(z, y, n_classes)), z, y

    for _ in range(steps):
        x, z, y = draw()
        loss_g = fedftg_generator_loss(teacher(client_params, x), student(x), x, z, y, alpha, beta_md=beta_md,
                                       beta_div=beta_div, temperature=temperature)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if trace is not None:
            trace.append(float(loss_g.detach()))
        for _ in range(student_steps):
            with torch.no_grad():
                x, _, y = draw()
                t_logits = teacher(client_params, x)
            loss_s = fedftg_md_loss(t_logits, student(x), y, alpha, temperature)
            opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            opt_s.step()
    return fl.get_params(student)


def _image_generator(shape, n_classes: int, o: dict):
    return lambda: fm.make_generator(tuple(shape), z_dim=o["noise_dim"] + n_classes, width=o["width"])


def fedftg_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """FedFTG's server step: the conditional generator (kept across rounds) and the fine-tuned global model."""
    o = options(cfg, "fedftg")
    G = _generator(ctx.state, "G", ctx.rng, _image_generator(setup.test_x.shape[1:], n_classes, o), _device(start))
    counts = label_counts(setup.clients, n_classes, ctx.accepted)
    return fedftg_distill(model, start, client_params, G, counts, n_classes, steps=o["steps"],
                          student_steps=o["student_steps"], batch_size=cfg.distill_batch, lr=cfg.distill_lr,
                          lr_generator=o["lr_generator"], beta_md=o["beta_md"], beta_div=o["beta_div"],
                          temperature=cfg.temperature, rng=ctx.rng)


# ----------------------------------------------------------------------------------------------
# Co-Boosting
def ensemble_logits(logits: Tensor, w: Tensor) -> Tensor:
    """A_w(x) = sum_k w_k f_k(x): the weighted logit ensemble, [K, B, C] and w [K] -> [B, C]."""
    return torch.einsum("k,kbc->bc", w.to(logits.dtype), logits)


def hard_sample_loss(logits: Tensor, y: Tensor, gamma: float = 1.0) -> Tensor:
    """L_H: cross-entropy re-weighted by hardness, mean_i -(1 - p_{y_i})^gamma log p_{y_i}, p =
    softmax(A_w(x_i)) (a focal form; ``gamma`` 0 is plain CE; the exponent is our choice): samples the
    ensemble already classifies surely weigh less, so the generator's gradient goes to the hard ones."""
    logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logp.exp()).pow(gamma) * logp).mean()


def coboosting_weight_step(w: Tensor, grad: Tensor, mu: float) -> Tensor:
    """One gradient-sign step on the ensemble weights, w - mu sign(grad), projected back to the simplex
    by clipping at 0 and renormalising (uniform if every weight reached 0)."""
    w = (w - mu * torch.sign(grad)).clamp_min(0)
    return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))


def diversify(x: Tensor, grad: Tensor, eps: float, bounds: tuple | None = (-1.0, 1.0)) -> Tensor:
    """Co-Boosting's on-the-fly diversification: x + eps sign(grad) (``grad`` of the ensemble's CE with
    respect to x: one step that makes the sample harder), kept in the data range ``bounds``."""
    x = x + eps * torch.sign(grad)
    return x if bounds is None else x.clamp(*bounds)


def coboosting_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, n_classes: int, *,
                       steps: int, batch_size: int = 64, lr: float = 1e-3, lr_generator: float = 1e-3,
                       beta_adv: float = 1.0, gamma: float = 1.0, eps: float = 0.1, mu: float = 0.01,
                       temperature: float = 1.0, rng: torch.Generator | None = None,
                       w: Tensor | None = None) -> tuple[fl.Params, Tensor]:
    """Co-Boosting from ``start``, ``steps`` times: (1) one Adam step of G(z, y) on L_H(A_w(x), y) -
    beta_adv KL(A_w(x) || student(x)); (2) the samples made harder (:func:`diversify`; images stay in
    [-1, 1]) join the pool; (3) one gradient-sign step of w on CE(A_w(x_hard), y)
    (:func:`coboosting_weight_step`); (4) one Adam step of the student on the KL to A_w over a batch
    of the pool. w starts uniform (or at ``w``). Returns the student's params and the final w."""
    device = next(G.parameters()).device
    teacher = _teacher(model)
    student = fl.set_params(copy.deepcopy(model), start)
    opt_s = torch.optim.Adam(student.parameters(), lr=lr)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_generator, betas=(0.5, 0.999))
    K = fl.n_stacked(client_params)
    w = (torch.full((K,), 1.0 / K) if w is None else w.detach().clone()).to(device)
    noise_dim = G.z_dim - n_classes
    pool_x, pool_logits = [], []  # the clients' logits on a pooled sample never change: kept, re-weighted by w
    for _ in range(steps):
        y = torch.randint(0, n_classes, (batch_size,), generator=rng).to(device)
        z = torch.randn(batch_size, noise_dim, generator=rng).to(device)
        x = G(fm.conditional_noise(z, y, n_classes))
        a = ensemble_logits(teacher(client_params, x), w)
        # (2) the direction that makes x harder for the ensemble, from the same forward pass as (1)
        (gx,) = torch.autograd.grad(F.cross_entropy(a, y), x, retain_graph=True)
        q = torch.softmax(a / temperature, -1)
        loss_g = hard_sample_loss(a, y, gamma) - beta_adv * kl_to_targets(student(x), q, temperature).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        x_hard = diversify(x.detach(), gx, eps, (-1.0, 1.0) if x.dim() == 4 else None)  # images live in [-1, 1]
        with torch.no_grad():
            h_logits = teacher(client_params, x_hard)  # [K, B, C]
        pool_x.append(x_hard)
        pool_logits.append(h_logits)
        # (3) the ensemble re-weighted on the hard samples
        wv = w.clone().requires_grad_(True)
        (gw,) = torch.autograd.grad(F.cross_entropy(ensemble_logits(h_logits, wv), y), wv)
        w = coboosting_weight_step(w, gw, mu)
        # (4) the student on a batch of every sample so far
        px, pl = torch.cat(pool_x), torch.cat(pool_logits, 1)
        i = torch.randint(0, len(px), (batch_size,), generator=rng).to(device)
        q = torch.softmax(ensemble_logits(pl[:, i], w) / temperature, -1)
        loss_s = kl_to_targets(student(px[i]), q, temperature).mean()
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        opt_s.step()
    return fl.get_params(student), w


def coboosting_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """Co-Boosting's server step: its generator (kept across rounds, if there are several), w from
    uniform over the accepted clients (kept in ``ctx.state["w"]`` with their indices)."""
    o = options(cfg, "coboosting")
    G = _generator(ctx.state, "G", ctx.rng, _image_generator(setup.test_x.shape[1:], n_classes, o), _device(start))
    params, w = coboosting_distill(model, start, client_params, G, n_classes, steps=o["steps"],
                                   batch_size=cfg.distill_batch, lr=cfg.distill_lr, lr_generator=o["lr_generator"],
                                   beta_adv=o["beta_adv"], gamma=o["gamma"], eps=o["eps"], mu=o["mu"],
                                   temperature=cfg.temperature, rng=ctx.rng)
    ctx.state["w"], ctx.state["clients"] = w.cpu(), ctx.accepted.cpu()
    return params


# ----------------------------------------------------------------------------------------------
# extra communication per round (the overhead table)
def extra_bytes(method: str, *, model: nn.Module, n_classes: int, n_clients: int, method_options: dict | None = None,
                count_bytes: int = 8) -> dict:
    """A method's communication beyond the models in one round, all clients together: ``down`` (FedGen:
    its payload, G_w with the ``method_options`` sizes, p(y) and the regulariser's weight, to every
    client; from the second round on, as the ledgers count it) and ``up`` (FedGen, FedFTG: every client's
    C label counts, ``count_bytes`` each; the simulation's server reads them from the set-up, as it does
    n_k, so only this formula counts them). DENSE and Co-Boosting: nothing."""
    down = 0
    if method == "fedgen":
        o = {**OPTIONS["fedgen"], **(method_options or {}).get("fedgen", {})}
        G = fm.FeatureGenerator(n_classes, model.get_submodule(fm.head_name(model)).in_features, o["noise_dim"],
                                o["hidden"])
        down = n_clients * (fl.state_bytes(G) + 4 * n_classes + 4)  # + p(y) and the weight, float32
    up = n_clients * n_classes * count_bytes if method in ("fedgen", "fedftg") else 0
    return {"down": down, "up": up}


register_method(Method("dense", server=dense_server, setup_needs=("dense_generator",),
                       doc="DENSE-style data-free distillation with a generator against the ensemble"))
register_method(Method("fedgen", server=fedgen_server, client=FEDGEN,
                       doc="FedGen: a feature-space generator learnt from the heads regularises the clients"))
register_method(Method("fedftg", server=fedftg_server,
                       doc="FedFTG: the global model fine-tuned on hard samples of a conditional generator"))
register_method(Method("coboosting", server=coboosting_server,
                       doc="Co-Boosting: hard samples and ensemble weights boosted in turn, then distilled"))
