"""The denoiser D(x_t, t) ~ E[x_0 | x_t] and the training loss (papers.md section 3).

:class:`Denoiser` wraps a raw network ``net(x, t_net) -> output`` trained to predict
``"eps"``, ``"x0"``, ``"v"`` or ``"edm"`` (the EDM-preconditioned F of Karras et al. 2022:
D = c_skip x + c_out F(c_in x, c_noise)) and always returns the x_0 estimate, which is what every
sampler in :mod:`fedlib.diffusion.samplers` consumes. ``t_net`` (optional) is LD3's decoupled network
time s'_i, given where it differs from the solver's time t_i. ``time_shift`` says what it moves:
``"prediction"`` (default, LD3's): the whole data prediction is evaluated at s', i.e. D(x, s') with the
input scaling c_in, c_noise and the eps/v/F -> x0 conversion all at s' (LD3 replaces x_theta(x_{t_i}, t_i)
by x_theta(x_{t_i}, s'_i) in the solver step, the solver's coefficients staying at t_i); ``"c_noise"``
(fedlib's earlier convention): only the time embedding c_noise moves, c_in and the conversion stay at t.

:func:`diffusion_loss` is a pure function of (denoiser, x0, eps, t[, params]) so callers can draw
eps and t themselves (e.g. outside ``torch.func.vmap``) and pass ``params`` for
``torch.func.functional_call``; each prediction type is regressed on its own target with unit
weight (eps-MSE, x0-MSE, v-MSE, EDM's F-MSE = lambda(sigma)-weighted x0-MSE).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..utils import check_choice
from .process import EDM, Process, _bcast

PREDICTIONS = ("eps", "x0", "v", "edm")
TIME_SHIFTS = ("prediction", "c_noise")  # what LD3's network time t_net moves (module docstring)


class Denoiser(nn.Module):
    """x_0-predicting wrapper around ``net``; ``denoiser(x, t, t_net=None) -> x0_hat``. ``time_shift``:
    what a ``t_net`` different from ``t`` moves (``TIME_SHIFTS``; module docstring)."""

    def __init__(self, net: nn.Module, process: Process, prediction: str = "eps", time_shift: str = "prediction"):
        super().__init__()
        check_choice("prediction", prediction, PREDICTIONS,
                     fix="Use 'edm' for an EDM-preconditioned network, else what the network was trained to output.")
        check_choice("time_shift", time_shift, TIME_SHIFTS,
                     fix="'prediction' evaluates the whole data prediction at LD3's network time (the paper's); "
                         "'c_noise' moves only the time embedding.")
        self.time_shift = time_shift
        if prediction == "edm" and not isinstance(process, EDM):
            raise ValueError("prediction='edm' needs the EDM process (its sigma_data); "
                             f"got process {process!r}. Use 'eps', 'x0' or 'v' with a VP process.")
        self.net, self.process, self.prediction = net, process, prediction

    # -- coefficients -------------------------------------------------------------------------
    def _coefficients(self, x: torch.Tensor, t: torch.Tensor, t_net: torch.Tensor):
        """(c_in, c_noise) for the network input; alpha, sigma for the conversion."""
        t = torch.as_tensor(t, device=x.device)
        t_net = t if t_net is None else torch.as_tensor(t_net, device=x.device)
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        if self.prediction == "edm":
            sd = self.process.sigma_data
            c_in = 1.0 / torch.sqrt(sigma**2 + sd**2)
            c_noise = torch.log(self.process.sigma(t_net)) / 4
        else:
            c_in = torch.ones_like(sigma)
            c_noise = self.process.network_time(t_net)
        return alpha, sigma, c_in, c_noise

    def raw(self, x: torch.Tensor, t: torch.Tensor, t_net: torch.Tensor | None = None, params=None,
            **net_kw):
        """The network output itself (in its own prediction space)."""
        alpha, sigma, c_in, c_noise = self._coefficients(x, t, t_net)
        c_noise = c_noise.to(x.dtype).expand(x.shape[0]) if c_noise.ndim == 0 else c_noise.to(x.dtype)
        x_in = _bcast(c_in, x) * x
        if params is None:
            return self.net(x_in, c_noise, **net_kw)
        return torch.func.functional_call(self.net, params, (x_in, c_noise), net_kw)

    def to_x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        alpha, sigma = _bcast(self.process.alpha(t), x), _bcast(self.process.sigma(t), x)
        if self.prediction == "eps":
            return (x - sigma * out) / alpha
        if self.prediction == "x0":
            return out
        if self.prediction == "v":  # v = alpha eps - sigma x0 (Salimans & Ho), VP only
            return alpha * x - sigma * out
        sd = self.process.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        return c_skip * x + c_out * out

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the raw network should output for x_t = alpha x0 + sigma eps."""
        alpha, sigma = _bcast(self.process.alpha(t), x0), _bcast(self.process.sigma(t), x0)
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":
            return alpha * eps - sigma * x0
        sd = self.process.sigma_data
        x_t = x0 + sigma * eps
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        return (x0 - c_skip * x_t) / c_out

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_net: torch.Tensor | None = None,
                params=None) -> torch.Tensor:
        if t_net is not None and self.time_shift == "prediction":
            t, t_net = t_net, None  # LD3: x_theta(x, s') entirely at the shifted time s'
        return self.to_x0(self.raw(x, t, t_net, params), x, t)

    def features(self, x: torch.Tensor, t: torch.Tensor, t_net: torch.Tensor | None = None):
        """(x0_hat, bottleneck features) - for discriminator heads that read the network (DMD2)."""
        if t_net is not None and self.time_shift == "prediction":
            t, t_net = t_net, None
        out, feats = self.raw(x, t, t_net, return_features=True)
        return self.to_x0(out, x, t), feats


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                   params=None, reduction: str = "mean") -> torch.Tensor:
    """Regression of the network on its own target at x_t = alpha_t x0 + sigma_t eps.

    ``eps`` ~ N(0, I) like x0 and ``t`` [B] are passed in (draw them with
    :func:`draw_noise_and_time`), so the function is pure and vmap-able over ``params``.
    ``reduction``: "mean" (scalar) or "none" (one value per sample).
    """
    x_t = denoiser.process.add_noise(x0, eps, t)
    out = denoiser.raw(x_t, t, params=params)
    per_sample = ((out - denoiser.target(x0, eps, t)) ** 2).flatten(1).mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample


def draw_noise_and_time(process: Process, x0: torch.Tensor, generator: torch.Generator | None = None):
    """(eps, t) for :func:`diffusion_loss`: eps ~ N(0, I) shaped like x0, t from the process's
    training distribution. Drawn on the CPU generator, moved to x0's device."""
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = process.sample_t(x0.shape[0], generator=generator, device=x0.device)
    return eps, t


def frozen(module: nn.Module) -> nn.Module:
    """An eval-mode copy with requires_grad False everywhere (teachers)."""
    m = copy.deepcopy(module).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# ---------------------------------------------------------------------------------------------
# Teaching helper: exact denoisers of a 2-D Gaussian mixture


class _MixtureNet(nn.Module):
    """x0-prediction 'network' of the exact EDM denoiser of a 2-D Gaussian mixture:
    D(x, sigma) = x + sigma^2 grad log p_sigma(x)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture
        self.feature_channels = 2
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x, t_net, return_features=False):
        m = self.mixture
        sigma2 = (t_net.to(x.dtype) ** 2)[:, None]  # [B, 1]
        var = m.std**2 + sigma2  # every noised component is N(mu_m, var I)
        d = x[:, None, :] - m.means[None].to(x)  # [B, M, 2]
        r = torch.softmax(m.weights.log()[None].to(x) - 0.5 * (d**2).sum(-1) / var, dim=1)
        out = x - sigma2 / var * (r[..., None] * d).sum(1)  # x + sigma^2 * grad log p_sigma(x)
        return (out, x) if return_features else out


def exact_denoiser(mixture) -> Denoiser:
    """The exact EDM denoiser E[x_0 | x_t] of a :class:`fedlib.data.GaussianMixture2D` (no training):
    the ideal real score of the teaching cell and of tests."""
    return Denoiser(_MixtureNet(mixture), EDM(), prediction="x0")
