"""diffusers interop: wrap a ``UNet2DModel`` trained with a DDPM scheduler as a fedlib Denoiser, so
LD3 and fedlib's samplers run on models users already have.

``from_diffusers(unet, scheduler)``: the process is the discrete VP chain built from the
scheduler's ``betas`` (t = (n+1)/N for DDPM step n; the network is fed the step index n = N t - 1),
the prediction type is the scheduler's ``prediction_type`` ("epsilon" -> eps, "v_prediction" -> v,
"sample" -> x0). ``diffusers_timesteps_to_times(timesteps)`` maps a diffusers integer schedule to
fedlib times (with t = 0, i.e. sigma = 0, appended as diffusers' final "zero" sigma).

Conventions beside diffusers: ``DPMSolverMultistepScheduler(final_sigmas_type="sigma_min",
lower_order_final=True)`` (its default lower_order_final) ends on sigma_min (fedlib's t = 1/N: append it
to ``diffusers_timesteps_to_times(..., final_zero=False)``) and, below 15 steps, takes that last step at
first order; fedlib's :func:`~fedlib.diffusion.samplers.dpm_solver_pp_2m` keeps it second order unless
called with ``lower_order_final=True`` (then they agree; ``tests/test_interop.py``). With
``final_sigmas_type="zero"`` both make the last step first order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils import check_choice
from .denoiser import Denoiser
from .process import VP

_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class _DiffusersNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t_net, return_features=False):
        if return_features:
            raise NotImplementedError("bottleneck features are not exposed for diffusers UNet2DModel")
        return self.unet(x, t_net).sample


def from_diffusers(unet, scheduler) -> Denoiser:
    """A fedlib :class:`Denoiser` around a diffusers ``UNet2DModel`` and its (DDPM-family) scheduler
    (anything with ``config.prediction_type`` and ``betas``)."""
    pred = check_choice("diffusers prediction_type", scheduler.config.prediction_type, _PREDICTION)
    process = VP(betas=torch.as_tensor(scheduler.betas, dtype=torch.float64), discrete=True)
    return Denoiser(_DiffusersNet(unet), process, _PREDICTION[pred])


def diffusers_timesteps_to_times(timesteps, n_train_steps: int = 1000, final_zero: bool = True) -> torch.Tensor:
    """Integer DDPM step indices (decreasing) -> fedlib times (n + 1)/N, float64, plus t = 0."""
    t = (torch.as_tensor(timesteps, dtype=torch.float64) + 1) / n_train_steps
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]) if final_zero else t
