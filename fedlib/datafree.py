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
                ``weight`` x decay^t x (E_{y, z ~ G_w(.|y)} CE(h(z; theta_k^p), y) + ``latent`` x
                KL(h(G_w(eps, y_i)) || f(x_i))) to their loss (10 x 0.98^t, y uniform over the labels the
                client holds: the authors'). The global model is the FedAvg (no server distillation).
``fedftg``      FedFTG (Zhang et al., CVPR 2022): after FedAvg, the server fine-tunes the global model
                on samples of a conditional image generator trained adversarially against it: the
                generator minimises L_cls + beta_div L_div - beta_md L_md (the authors: one step per client), the
                global model minimises L_md, the alpha-weighted L1 between logits (hard-sample mining), with the class-level ensemble alpha_{k,y} = n_{k,y} /
                sum_j n_{j,y} and labels drawn from the clients' class counts (customised label
                sampling).
``coboosting``  Co-Boosting (Dai et al., ICLR 2024), one-shot FL: the server alternately synthesises
                hard samples from the weighted ensemble A_w(x) = sum_k w_k f_k(x) (a fresh generator per
                epoch, loss L_H - beta_adv KL(A_w || student), L_H's hardness weight detached),
                re-weights the ensemble members on them (w <- proj_simplex(w - mu sign(grad_w
                CE(A_w(x), y))), w kept across rounds) and distils A_w at T=4 into the server model
                over every sample synthesised so far, each batch made harder afresh by x + eps
                sign(grad_x CE(A_w(x), y)) (not stored).
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import federated as fl
from . import models as fm
from .methods import ClientTerm, Method, kl_to_targets, register_method
from .utils import build_config, check_choice, check_number

# per-method settings (ServerConfig.method_options overrides them); steps None: cfg.dense_steps or cfg.distill_steps.
# Defaults follow the papers' equations, with the authors' published settings where a paper is silent;
# the other reading of each choice is an option (docs/methods.md §1.3 says which is which).
OPTIONS = {
    # FedGen (authors' settings): generator at lr 3e-4 for many steps a round (cheap here: a two-layer MLP
    # through the K linear heads), diversity weight 1, per-client CE weighted by alpha (ensemble="clients";
    # "logits": the CE of the alpha-weighted logit ensemble), client term weight 10 decayed by 0.98 a round
    # plus the latent term (latent: its weight relative to the CE term, 10/10 in the authors' runs), labels
    # uniform over the labels a client holds (labels="held"; "prior": p(y)). Our earlier setting: steps
    # None, lr_generator 1e-2, diversity 0, weight 1, decay 1, latent 0, labels "prior", ensemble "logits".
    "fedgen": dict(steps=200, lr_generator=3e-4, weight=10.0, decay=0.98, latent=1.0, labels="held",
                   ensemble="clients", noise_dim=8, hidden=32, diversity=1.0),
    # FedFTG: L_md the alpha-weighted L1 between logits (md="kl": the old alpha-weighted KL at T), student_steps
    # Adam steps on the same batch (fresh_batches=True: fresh samples each), diversity L1 of samples over L2
    # of noise. The generator takes one step on the sum over clients; the authors' one step per client is
    # generator_update="per_client": ~3x slower on this CPU (40 s against 13 s for 5 rounds of one K=20
    # problem), and its K Adam steps a round turn 1e-7 differences of the client models into 1e-2 in the
    # fine-tuned model's logits (Flower against in-process, tests/test_flower.py), where "summed" stays at 1e-6
    "fedftg": dict(steps=None, student_steps=5, lr_generator=1e-3, beta_md=1.0, beta_div=1.0, noise_dim=16, width=16,
                   md="l1", generator_update="summed", fresh_batches=False, noise_metric="l2"),
    # Co-Boosting: a fresh generator per epoch with learnable latents, g_steps iterations, the best kept
    # (fresh_generator=False: one generator kept across epochs, one step each); the samples perturbed at
    # every distillation step, not stored (perturb="gradient": the paper's x + eps sign(grad_x CE);
    # "random": the authors' random-sign direction; "stored": our old stored gradient step); distillation
    # at T=4 by SGD over the whole pool (student="batch": one Adam step on a batch at cfg's lr and T)
    "coboosting": dict(steps=None, lr_generator=1e-3, beta_adv=1.0, gamma=1.0, eps=0.1, mu=0.01, noise_dim=16,
                       width=16, g_steps=5, fresh_generator=True, perturb="gradient", student="pool",
                       temperature=4.0, lr_student=0.01),
}

# the options whose values are a choice among names (checked with the allowed values in the error)
CHOICES = {("fedgen", "labels"): ("held", "prior"), ("fedgen", "ensemble"): ("clients", "logits"),
           ("fedftg", "md"): ("l1", "kl"), ("fedftg", "generator_update"): ("summed", "per_client"),
           ("fedftg", "noise_metric"): ("l2", "l1"), ("coboosting", "perturb"): ("gradient", "random", "stored"),
           ("coboosting", "student"): ("pool", "batch")}


def options(cfg, name: str) -> dict:
    """The settings of method ``name``: :data:`OPTIONS` updated by ``cfg.method_options[name]``."""
    given = dict(getattr(cfg, "method_options", {}).get(name, {}))
    unknown = sorted(set(given) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(f"unknown {name} options {unknown}; allowed: {', '.join(OPTIONS[name])}")
    out = {**OPTIONS[name], **given}
    for (m, key), allowed in CHOICES.items():
        if m == name and out[key] not in allowed:
            raise ValueError(f"{name} option {key}={out[key]!r} is not one of {', '.join(map(repr, allowed))}; "
                             f"pass one of them in method_options[{name!r}][{key!r}]")
    if out["steps"] is None:
        out["steps"] = cfg.dense_steps or cfg.distill_steps
    return out


def _check_settings(method: str, settings) -> None:
    """One method's distillation settings: every choice among names against :data:`CHOICES`, every number
    in its range (``steps`` 0 skips the distillation, as a ``distill_steps`` of 0 does)."""
    for (m, key), allowed in CHOICES.items():
        if m == method:
            check_choice(f"{method} {key}", getattr(settings, key), allowed,
                         fix=f"pass one of them in method_options[{method!r}][{key!r}]")
    for name, value in vars(settings).items():
        if isinstance(value, bool) or (method, name) in CHOICES:
            continue
        if name in ("steps", "student_steps"):
            check_number(name, value, at_least=0, integer=True, fix="0 switches it off")
        elif name in ("batch_size", "g_steps"):
            check_number(name, value, at_least=1, integer=True)
        elif name.startswith("lr") or name == "temperature":
            check_number(name, value, above=0)
        else:  # the losses' weights, Co-Boosting's perturbation size and weight step
            check_number(name, value, at_least=0)


@dataclass(kw_only=True)
class FedFTGSettings:
    """The settings of :func:`fedftg_distill` (its server step fills them from :data:`OPTIONS` ["fedftg"] and the
    server side: ``batch_size``, ``lr``, ``temperature`` are ``distill_batch``, ``distill_lr``, ``temperature``)."""

    steps: int  # rounds of generator steps (the server: dense_steps or distill_steps)
    student_steps: int = 5
    batch_size: int = 64
    lr: float = 1e-3  # the global model's Adam
    lr_generator: float = 1e-3
    beta_md: float = 1.0
    beta_div: float = 1.0
    temperature: float = 1.0
    md: str = "l1"
    generator_update: str = "summed"
    fresh_batches: bool = False
    noise_metric: str = "l2"

    def __post_init__(self):
        _check_settings("fedftg", self)


@dataclass(kw_only=True)
class CoBoostingSettings:
    """The settings of :func:`coboosting_distill` (its server step fills them from :data:`OPTIONS`
    ["coboosting"] and the server side: ``batch_size`` and ``lr`` are ``distill_batch`` and ``distill_lr``)."""

    steps: int  # epochs (the server: dense_steps or distill_steps)
    batch_size: int = 64
    lr: float = 1e-3  # the student's Adam (student="batch")
    lr_generator: float = 1e-3
    beta_adv: float = 1.0
    gamma: float = 1.0
    eps: float = 0.1
    mu: float = 0.01
    temperature: float = 4.0
    g_steps: int = 5
    fresh_generator: bool = True
    perturb: str = "gradient"
    student: str = "pool"
    lr_student: float = 0.01

    def __post_init__(self):
        _check_settings("coboosting", self)


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


def diversity_loss(x: Tensor, z: Tensor, noise_metric: str = "l2") -> Tensor:
    """L_div = exp(-mean_{i,j} d(x_i, x_j) d_z(z_i, z_j)), d the mean absolute difference per coordinate
    and d_z the mean squared difference (``noise_metric`` "l2", the FedGen/FedFTG authors' choice; "l1":
    the mean absolute difference, our earlier choice). The per-coordinate means are our normalisation:
    they keep the product O(1) for any sample size. Small when different noise gives different samples
    (mode seeking; FedFTG's L_dis, FedGen's diversity term)."""
    dx = (x.flatten(1)[:, None] - x.flatten(1)[None]).abs().mean(-1)
    diff = z[:, None] - z[None]
    dz = diff.pow(2).mean(-1) if noise_metric == "l2" else diff.abs().mean(-1)
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
def fedgen_generator_loss(head_logits: Tensor, y: Tensor, alpha: Tensor, ensemble: str = "clients") -> Tensor:
    """FedGen's generator objective on generated features, the clients' head logits ``head_logits``
    [K, B, C] weighted per sample by the class-level weights ``alpha`` [K, C] of its label ``y`` [B]
    (papers.md §1.3): ``ensemble`` "clients" (the authors' code): mean_i sum_k alpha_{k,y_i}
    CE(g(z_i; theta_k^p), y_i), every client's head asked to be right; "logits" (the paper's eq. 4 with
    alpha in place of 1/K): CE(sum_k alpha_{k,y} g(z; theta_k^p), y), the ensemble asked to be right."""
    a = alpha[:, y]  # [K, B]
    if ensemble == "logits":
        return F.cross_entropy((a[..., None] * head_logits).sum(0), y)
    ce = F.cross_entropy(head_logits.flatten(0, 1), y.repeat(head_logits.shape[0]), reduction="none").view_as(a)
    return (a * ce).sum(0).mean()


def fedgen_client_loss(head_logits: Tensor, y: Tensor) -> Tensor:
    """FedGen's client regulariser on generated features: CE(h(z; theta_k^p), y), mean over the B
    generated (z, y); ``head_logits`` [B, C] are the client's own head on them."""
    return F.cross_entropy(head_logits, y)


def fedgen_latent_loss(logits: Tensor, gen_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """The FedGen authors' latent term: KL(softmax(h(G_w(eps, y_i))) || softmax(f(x_i))), the client's
    prediction on its real sample x_i pulled to its own head's on a feature generated for x_i's label
    (the target detached, as theirs); mean over the real samples (``mask``: 1 real, 0 padding)."""
    q = torch.softmax(gen_logits.detach(), -1)
    kl = (q * (torch.log(q.clamp_min(1e-12)) - torch.log_softmax(logits, -1))).sum(-1)
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def fedgen_weight(weight: float, decay: float, round_: int) -> float:
    """The client term's weight in round ``round_`` (0-based): weight x decay^round (the authors: 10 x 0.98^t)."""
    return float(weight) * float(decay) ** round_


def train_fedgen_generator(G: fm.FeatureGenerator, heads: fl.Params, h, counts: Tensor, *, steps: int,
                           batch_size: int = 64, lr: float = 3e-4, diversity: float = 1.0,
                           ensemble: str = "clients", rng: torch.Generator | None = None) -> list[float]:
    """``steps`` Adam steps of G on :func:`fedgen_generator_loss` + ``diversity`` x
    :func:`diversity_loss` of the features against the noise (the authors weigh it 1) with labels
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
        loss = fedgen_generator_loss(heads_of(heads, z), y, alpha, ensemble)
        if diversity:
            loss = loss + diversity * diversity_loss(z, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.append(float(loss.detach()))
    return trace


def fedgen_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """FedGen's server step: G_w (kept across rounds) learns from the accepted clients' heads; the
    global model stays the FedAvg ``start``. The weight sent down is the next round's (the round that uses it)."""
    o = options(cfg, "fedgen")
    _, h = head_fn(model)
    feature_dim = model.get_submodule(fm.head_name(model)).in_features
    G = _generator(ctx.state, "G", ctx.rng, lambda: fm.FeatureGenerator(n_classes, feature_dim, o["noise_dim"],
                                                                          o["hidden"]), _device(start))
    counts = label_counts(setup.clients, n_classes, ctx.accepted).to(_device(start))
    train_fedgen_generator(G, client_params, h, counts, steps=o["steps"], batch_size=cfg.distill_batch,
                           lr=o["lr_generator"], diversity=o["diversity"], ensemble=o["ensemble"], rng=ctx.rng)
    ctx.state["prior"] = label_prior(counts)
    ctx.state["weight"] = fedgen_weight(o["weight"], o["decay"], ctx.round + 1)
    ctx.state["latent"], ctx.state["held"] = float(o["latent"]), float(o["labels"] == "held")
    return start


def fedgen_noreg_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """The ablation of FedGen without its regulariser: FedGen's settings with the client term's weight 0
    (so FedAvg, its clients drawing the same random numbers as FedGen's); its generator is never used,
    so it is built (the draws need one) but not trained."""
    o = options(cfg, "fedgen")
    feature_dim = model.get_submodule(fm.head_name(model)).in_features
    _generator(ctx.state, "G", ctx.rng, lambda: fm.FeatureGenerator(n_classes, feature_dim, o["noise_dim"], o["hidden"]),
               _device(start))
    counts = label_counts(setup.clients, n_classes, ctx.accepted).to(_device(start))
    ctx.state["prior"], ctx.state["weight"] = label_prior(counts), 0.0
    ctx.state["latent"], ctx.state["held"] = float(o["latent"]), float(o["labels"] == "held")
    return start


def _fedgen_payload(state: dict, n_classes: int, cfg):
    """G_w's parameters (``G.*``), p(y), the regulariser's weight, the latent term's relative weight and
    the label rule (1: uniform over the labels a client holds, 0: p(y)): None before G_w's first training."""
    if "G" not in state or "prior" not in state:
        return None
    return {**{f"G.{n}": p.detach().clone() for n, p in state["G"].named_parameters()},
            "prior": state["prior"].detach().clone(), "weight": torch.tensor(state["weight"]),
            "latent": torch.tensor(state["latent"]), "held": torch.tensor(state["held"])}


def _fedgen_extras(model: nn.Module, payload, n_classes: int):
    """Per step: B labels (uniform over the labels of the client's batch, its held labels as the client
    sees them, or from p(y)), B features z = G_w(eps, y) for them and B features for the batch's own
    labels (the latent term), drawn with the client's generator."""
    feature_dim = model.get_submodule(fm.head_name(model)).in_features
    if payload is None:
        def none(x, y, g):
            zeros = x.new_zeros(len(x), feature_dim)
            return {"fedgen_z": zeros, "fedgen_y": torch.zeros(len(x), dtype=torch.long), "fedgen_zy": zeros,
                    "fedgen_weight": torch.tensor(0.0), "fedgen_latent": torch.tensor(0.0)}

        return none
    params = {n[2:]: p for n, p in payload.items() if n.startswith("G.")}
    G = fm.FeatureGenerator.like(params, n_classes)
    G.load_state_dict(params)
    G = G.to(params["net.0.weight"].device)
    prior, weight = payload["prior"].float().cpu(), payload["weight"].float().reshape(())
    latent = payload["latent"].float().reshape(()) if "latent" in payload else torch.tensor(0.0)
    held = bool(payload["held"]) if "held" in payload else False
    device = params["net.0.weight"].device

    def draw(x, y, g):
        if held:
            # the authors draw uniformly over the labels the client holds; the batch's labels are what
            # the client term sees of them
            labels = torch.unique(y.cpu())
            yy = labels[torch.randint(0, len(labels), (len(x),), generator=g)]
        else:
            yy = torch.multinomial(prior, len(x), replacement=True, generator=g)
        eps = torch.randn(len(x), G.noise_dim, generator=g)
        eps_own = torch.randn(len(x), G.noise_dim, generator=g)
        with torch.no_grad():
            z = G(eps.to(device), yy.to(device))
            zy = G(eps_own.to(device), y.to(device))
        return {"fedgen_z": z, "fedgen_y": yy, "fedgen_zy": zy, "fedgen_weight": weight, "fedgen_latent": latent}

    return draw


def _fedgen_loss(model: nn.Module):
    _, h = head_fn(model)

    def loss(call, params, batch):
        out = fedgen_client_loss(h(params, batch["fedgen_z"]), batch["fedgen_y"])
        if "fedgen_zy" not in batch:  # called on generated features alone: the CE term only
            return out
        latent = fedgen_latent_loss(call(params, batch["x"]), h(params, batch["fedgen_zy"]), batch.get("mask"))
        return out + batch["fedgen_latent"] * latent

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
                   temperature: float = 1.0, md: str = "l1") -> Tensor:
    """L_md: the model discrepancy between the clients [K, B, C] and the global model [B, C], weighted
    by alpha_{k,y_i}. ``md`` "l1" (FedFTG's eq.): mean_i sum_k alpha_{k,y_i} ||f_k(x_i) - f(x_i)||_1 / C,
    the L1 distance between logits (divided by C, our normalisation, as a mean absolute error); "kl"
    (our earlier reading): mean_i sum_k alpha_{k,y_i} T^2 KL(softmax(f_k(x_i)/T) || softmax(f(x_i)/T)).
    The generator maximises it (hard samples), the global model minimises it."""
    a = alpha[:, y]
    if md == "l1":
        return (a * (logits - student_logits[None]).abs().mean(-1)).sum(0).mean()
    p = torch.softmax(logits / temperature, -1)
    kl = (p * (torch.log_softmax(logits / temperature, -1)
               - torch.log_softmax(student_logits / temperature, -1)[None])).sum(-1)  # [K, B]
    return temperature**2 * (a * kl).sum(0).mean()


def fedftg_generator_loss(logits, student_logits, x, noise, y, alpha, *, beta_md: float = 1.0,
                          beta_div: float = 1.0, temperature: float = 1.0, md: str = "l1",
                          noise_metric: str = "l2") -> Tensor:
    """The generator's objective L_cls + beta_div L_div - beta_md L_md (hard-sample mining); with
    ``logits`` of one client [1, B, C] and its alpha [1, C] it is that client's term (per-client update)."""
    return (fedftg_cls_loss(logits, y, alpha) + beta_div * diversity_loss(x, noise, noise_metric)
            - beta_md * fedftg_md_loss(logits, student_logits, y, alpha, temperature, md))


def fedftg_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, counts: Tensor,
                   n_classes: int, settings: FedFTGSettings | None = None, *, rng: torch.Generator | None = None,
                   trace: list | None = None, **fields) -> fl.Params:
    """FedFTG's server fine-tuning from ``start`` (the FedAvg model), ``steps`` times: the conditional
    generator G(z, y) (``G.z_dim`` = noise + n_classes) takes one Adam step on
    :func:`fedftg_generator_loss` summed over the clients, or one per client on its own alpha-weighted
    terms, clients in order (``generator_update`` "per_client", the authors' update); then the global model
    takes ``student_steps`` Adam steps on L_md of one batch of G's samples (``fresh_batches``: a fresh
    batch each). Labels y ~ p(y) of the clients' class counts ``counts`` [K, C] (customised label
    sampling). G is updated in place; returns the fine-tuned params (``trace``: the summed generator
    objective before each round of generator steps is appended). The settings are ``settings`` (a
    :class:`FedFTGSettings`) or its fields as keywords."""
    o = build_config(FedFTGSettings, settings, fields, "fedftg_distill")
    steps, student_steps, batch_size, lr, lr_generator = o.steps, o.student_steps, o.batch_size, o.lr, o.lr_generator
    beta_md, beta_div, temperature, md, noise_metric = o.beta_md, o.beta_div, o.temperature, o.md, o.noise_metric
    generator_update, fresh_batches = o.generator_update, o.fresh_batches
    device = next(G.parameters()).device
    alpha, prior = class_weights(counts).to(device), label_prior(counts).cpu()
    teacher = _teacher(model)
    call = fl.functional(model)
    student = fl.set_params(copy.deepcopy(model), start)
    opt_s = torch.optim.Adam(student.parameters(), lr=lr)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_generator, betas=(0.5, 0.999))
    noise_dim, K = G.z_dim - n_classes, fl.n_stacked(client_params)
    kw = dict(beta_md=beta_md, beta_div=beta_div, temperature=temperature, md=md, noise_metric=noise_metric)

    def draw():
        y = torch.multinomial(prior, batch_size, replacement=True, generator=rng).to(device)
        z = torch.randn(batch_size, noise_dim, generator=rng).to(device)
        return G(fm.conditional_noise(z, y, n_classes)), z, y

    for _ in range(steps):
        x, z, y = draw()
        loss_g = fedftg_generator_loss(teacher(client_params, x), student(x), x, z, y, alpha, **kw)
        if trace is not None:
            trace.append(float(loss_g.detach()))
        if generator_update == "summed":
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
        else:
            for k in range(K):
                x_k = G(fm.conditional_noise(z, y, n_classes))
                f_k = call(fl.index_params(client_params, k), x_k)[None]
                loss_k = fedftg_generator_loss(f_k, student(x_k), x_k, z, y, alpha[k:k + 1], **kw)
                opt_g.zero_grad(set_to_none=True)
                loss_k.backward()
                opt_g.step()
        with torch.no_grad():
            x, _, y = draw()
            t_logits = teacher(client_params, x)
        for _ in range(student_steps):
            loss_s = fedftg_md_loss(t_logits, student(x), y, alpha, temperature, md)
            opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            opt_s.step()
            if fresh_batches:
                with torch.no_grad():
                    x, _, y = draw()
                    t_logits = teacher(client_params, x)
    return fl.get_params(student)


def _image_generator(shape, n_classes: int, o: dict):
    return lambda: fm.make_generator(tuple(shape), z_dim=o["noise_dim"] + n_classes, width=o["width"])


def fedftg_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """FedFTG's server step: the conditional generator (kept across rounds) and the fine-tuned global model."""
    o = options(cfg, "fedftg")
    G = _generator(ctx.state, "G", ctx.rng, _image_generator(setup.test_x.shape[1:], n_classes, o), _device(start))
    counts = label_counts(setup.clients, n_classes, ctx.accepted)
    settings = FedFTGSettings(**{n: o[n] for n in FedFTGSettings.__dataclass_fields__ if n in o},
                              batch_size=cfg.distill_batch, lr=cfg.distill_lr, temperature=cfg.temperature)
    return fedftg_distill(model, start, client_params, G, counts, n_classes, settings, rng=ctx.rng)


# ----------------------------------------------------------------------------------------------
# Co-Boosting
def ensemble_logits(logits: Tensor, w: Tensor) -> Tensor:
    """A_w(x) = sum_k w_k f_k(x): the weighted logit ensemble, [K, B, C] and w [K] -> [B, C]."""
    return torch.einsum("k,kbc->bc", w.to(logits.dtype), logits)


def hard_sample_loss(logits: Tensor, y: Tensor, gamma: float = 1.0) -> Tensor:
    """L_H: cross-entropy re-weighted by hardness, mean_i -(1 - p_{y_i})^gamma log p_{y_i}, p =
    softmax(A_w(x_i)) (a focal form; ``gamma`` 0 is plain CE; the exponent is our choice): samples the
    ensemble already classifies surely weigh less, so the generator's gradient goes to the hard ones.
    The hardness (1 - p)^gamma is a weight, detached as in the authors' code: the gradient is that of
    the CE on each sample times its weight."""
    logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logp.detach().exp()).pow(gamma) * logp).mean()


def coboosting_weight_step(w: Tensor, grad: Tensor, mu: float) -> Tensor:
    """One gradient-sign step on the ensemble weights, w - mu sign(grad), projected back to the simplex
    by clipping at 0 and renormalising (uniform if every weight reached 0)."""
    w = (w - mu * torch.sign(grad)).clamp_min(0)
    return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))


def diversify(x: Tensor, grad: Tensor, eps: float, bounds: tuple | None = (-1.0, 1.0)) -> Tensor:
    """Co-Boosting's on-the-fly diversification: x + eps sign(grad) (``grad`` of the ensemble's CE with
    respect to x: one step that makes the sample harder; or a random tensor: a random-sign direction),
    kept in the data range ``bounds``."""
    x = x + eps * torch.sign(grad)
    return x if bounds is None else x.clamp(*bounds)


def kept_weights(state: dict, accepted: Tensor) -> Tensor | None:
    """The ensemble weights w kept from the last round, for the ``accepted`` clients (their indices, in
    order): a client new since then gets the mean weight, and w is renormalised; None in the first round."""
    if "w" not in state:
        return None
    last = dict(zip(state["clients"].tolist(), state["w"].tolist()))
    mean = 1.0 / len(last)
    w = torch.tensor([last.get(k, mean) for k in accepted.cpu().tolist()])
    return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))


def coboosting_distill(model: nn.Module, start: fl.Params, client_params: fl.Params, G: nn.Module, n_classes: int,
                       settings: CoBoostingSettings | None = None, *, rng: torch.Generator | None = None,
                       w: Tensor | None = None, build=None, **fields) -> tuple[fl.Params, Tensor]:
    """Co-Boosting from ``start``, ``steps`` epochs of: (1) the generator, fresh (``build()``, its
    parameters from ``rng``) with learnable latents z when ``fresh_generator`` (``G`` kept otherwise),
    takes ``g_steps`` Adam steps on L_H(A_w(x), y) - beta_adv KL(A_w(x) || student(x)); the batch of
    lowest loss joins the pool; (2) one gradient-sign step of w on CE(A_w(x), y) of that batch
    (:func:`coboosting_weight_step`); (3) the student distils A_w at ``temperature`` on the pool, every
    batch perturbed afresh and not stored (``perturb`` "gradient": :func:`diversify` along the sign of
    the ensemble's CE gradient, the paper's; "random": a random-sign direction, the authors' code;
    "stored": the old variant, the gradient step taken once at synthesis and stored): ``student``
    "pool": one SGD epoch (lr ``lr_student``, momentum 0.9) over the whole pool; "batch": one Adam step
    (lr ``lr``) on a random batch of it. Images stay in [-1, 1]. w starts uniform (or at ``w``).
    Returns the student's params and the final w. The settings are ``settings`` (a
    :class:`CoBoostingSettings`) or its fields as keywords."""
    o = build_config(CoBoostingSettings, settings, fields, "coboosting_distill")
    steps, batch_size, lr, lr_generator, temperature = o.steps, o.batch_size, o.lr, o.lr_generator, o.temperature
    beta_adv, gamma, eps, mu, g_steps = o.beta_adv, o.gamma, o.eps, o.mu, o.g_steps
    fresh_generator, perturb, student, lr_student = o.fresh_generator, o.perturb, o.student, o.lr_student
    device = next(G.parameters()).device
    teacher = _teacher(model)
    net = fl.set_params(copy.deepcopy(model), start)
    opt_s = (torch.optim.SGD(net.parameters(), lr=lr_student, momentum=0.9) if student == "pool"
             else torch.optim.Adam(net.parameters(), lr=lr))
    K = fl.n_stacked(client_params)
    w = (torch.full((K,), 1.0 / K) if w is None else w.detach().clone()).to(device)
    noise_dim = G.z_dim - n_classes
    bounds = lambda x: (-1.0, 1.0) if x.dim() == 4 else None  # noqa: E731 (images live in [-1, 1])

    def harder(x, y, logits=None):
        """x made harder for A_w (or moved in a random-sign direction), with the clients' logits on it."""
        if perturb == "random":
            direction = torch.randn(x.shape, generator=rng).to(device)
        else:
            xv = x.clone().requires_grad_(True)
            (direction,) = torch.autograd.grad(F.cross_entropy(ensemble_logits(teacher(client_params, xv), w), y), xv)
            # a coordinate whose gradient is rounding noise (below 1e-3 of the sample's largest) has no
            # direction: its sign would differ between two runs that agree to 1e-7 (in-process and Flower)
            scale = direction.flatten(1).abs().amax(1).view(-1, *[1] * (direction.dim() - 1))
            direction = torch.where(direction.abs() > 1e-3 * scale, direction, torch.zeros_like(direction))
        x = diversify(x, direction, eps, bounds(x))
        with torch.no_grad():
            return x, teacher(client_params, x)

    pool_x, pool_y = [], []
    for _ in range(steps):
        y = torch.randint(0, n_classes, (batch_size,), generator=rng).to(device)
        z = torch.randn(batch_size, noise_dim, generator=rng).to(device)
        gen = G
        if fresh_generator:
            seed = int(torch.randint(0, 2**62, (1,), generator=rng))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                gen = build().to(device)
            z = z.requires_grad_(True)
        opt_g = torch.optim.Adam(list(gen.parameters()) + ([z] if fresh_generator else []), lr=lr_generator,
                                 betas=(0.5, 0.999))
        best, best_x = float("inf"), None
        for _ in range(g_steps if fresh_generator else 1):
            x = gen(fm.conditional_noise(z, y, n_classes))
            a = ensemble_logits(teacher(client_params, x), w)
            q = torch.softmax(a / temperature, -1)
            loss_g = hard_sample_loss(a, y, gamma) - beta_adv * kl_to_targets(net(x), q, temperature).mean()
            if float(loss_g.detach()) < best:  # the authors keep the best batch of a generator's iterations
                best, best_x = float(loss_g.detach()), x.detach()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
        if perturb == "stored":
            best_x, _ = harder(best_x, y)
        pool_x.append(best_x)
        pool_y.append(y)
        # (2) the ensemble re-weighted on this epoch's samples
        with torch.no_grad():
            h_logits = teacher(client_params, best_x)
        wv = w.clone().requires_grad_(True)
        (gw,) = torch.autograd.grad(F.cross_entropy(ensemble_logits(h_logits, wv), y), wv)
        w = coboosting_weight_step(w, gw, mu)
        # (3) the student on the pool, perturbed afresh at every step
        px, py = torch.cat(pool_x), torch.cat(pool_y)
        if student == "pool":
            order = torch.randperm(len(px), generator=rng).to(device)
            batches = [order[i:i + batch_size] for i in range(0, len(px), batch_size)]
        else:
            batches = [torch.randint(0, len(px), (batch_size,), generator=rng).to(device)]
        for i in batches:
            if perturb == "stored":
                xb = px[i]
                with torch.no_grad():
                    lb = teacher(client_params, xb)
            else:
                xb, lb = harder(px[i], py[i])
            q = torch.softmax(ensemble_logits(lb, w) / temperature, -1)
            loss_s = kl_to_targets(net(xb), q, temperature).mean()
            opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            opt_s.step()
    return fl.get_params(net), w


def coboosting_server(model, start, client_params, setup, n_classes, cfg, ctx):
    """Co-Boosting's server step: a fresh generator per epoch (or one kept across epochs and rounds), w
    read back from ``ctx.state["w"]`` (kept across rounds with the clients' indices; uniform in the first)."""
    o = options(cfg, "coboosting")
    build = _image_generator(setup.test_x.shape[1:], n_classes, o)
    G = _generator(ctx.state, "G", ctx.rng, build, _device(start))
    settings = CoBoostingSettings(**{n: o[n] for n in CoBoostingSettings.__dataclass_fields__ if n in o},
                                  batch_size=cfg.distill_batch, lr=cfg.distill_lr)
    params, w = coboosting_distill(model, start, client_params, G, n_classes, settings, rng=ctx.rng,
                                   w=kept_weights(ctx.state, ctx.accepted), build=build)
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
        down = n_clients * (fl.state_bytes(G) + 4 * n_classes + 3 * 4)  # + p(y), the weight, latent, held: float32
    up = n_clients * n_classes * count_bytes if method in ("fedgen", "fedftg") else 0
    return {"down": down, "up": up}


register_method(Method("dense", server=dense_server, setup_needs=("dense_generator",),
                       doc="DENSE-style data-free distillation with a generator against the ensemble"))
register_method(Method("fedgen", server=fedgen_server, client=FEDGEN,
                       doc="FedGen: a feature-space generator learnt from the heads regularises the clients"))
register_method(Method("fedgen_noreg", server=fedgen_noreg_server, client=FEDGEN,
                       doc="FedGen's ablation: the client regulariser's weight 0 (FedAvg with FedGen's draws)"))
register_method(Method("fedftg", server=fedftg_server,
                       doc="FedFTG: the global model fine-tuned on hard samples of a conditional generator"))
register_method(Method("coboosting", server=coboosting_server,
                       doc="Co-Boosting: hard samples and ensemble weights boosted in turn, then distilled"))
