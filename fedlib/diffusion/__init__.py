"""Diffusion core shared by FedDM, LD3 and DMD2 (papers.md section 3).

Processes (``process.py``), all with ``alpha(t)``, ``sigma(t)``, ``lambda_(t)``, ``t_of_lambda``,
``network_time(t)``, ``sample_t(n, generator)``, ``add_noise(x0, eps, t)``, ``prior(shape, generator)``::

    VP(schedule="linear"|"cosine", discrete=True, n_steps=1000, betas=None)   # DDPM / continuous VP
    EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    make_process("edm"|"vp_linear"|"vp_cosine"|"vp_linear_continuous"|"vp_cosine_continuous")

Denoiser and loss (``denoiser.py``)::

    den = Denoiser(net, process, prediction="eps"|"x0"|"v"|"edm")
    den(x_t, t, t_net=None, params=None) -> x0_hat        # params: for torch.func.functional_call
    den.raw(x_t, t, t_net=None, params=None) -> network output;  den.features(x_t, t) -> (x0_hat, feats)
    eps, t = draw_noise_and_time(process, x0, generator)  # draw outside vmap ...
    diffusion_loss(den, x0, eps, t, params=None, reduction="mean"|"none")   # ... pure in (params, x0, eps, t)

Networks (``networks.py``): ``UNet(in_channels, channels=32, channel_mults=(1, 2), blocks=1,
attention=False)`` for 8x8..64x64 and ``MLPDenoiser(dim=2, hidden=128, depth=3)``; both
``net(x, t_net, return_features=False)``; features = bottleneck (``net.feature_channels`` channels).

Training (``train.py``)::

    ema, history = train_diffusion(den, data, steps, batch_size=128, lr=2e-3, ema_decay=0.999, seed=0,
                                   device="auto", checkpoint=None)
    save_checkpoint(path, den, ema, history); load_checkpoint(path, den)  # torch.load(weights_only=True)
    teacher = pretrained_teacher("digits"|"fashion_mnist"|"grid"|"ring", steps, seed, device)  # cached

Samplers (``samplers.py``): ``x0, nfe = f(den, x_T, times, network_times=None)`` for ``euler`` (=
``ddim``), ``heun``, ``dpm_solver_pp_2m``, ``dpm_solver_pp_3m``, ``ipndm(order=4)``,
``unipc(order=2, variant="bh2"|"bh1")``; ``get_sampler(name)``; ``solve(den, x_T, times, sampler,
network_times=None, batch_size=None) -> (x0, nfe)``: the one batched solve. Schedules (``schedules.py``):
``schedule("uniform_t"|"quadratic_t"|"uniform_lambda"|"edm", process, n_steps)``;
``karras_sigmas(u, sigma_min, sigma_max, rho=7)``: the one rho = 7 grid.
Interop (``interop.py``): ``from_diffusers(unet, scheduler)`` -> Denoiser.
"""

from .denoiser import PREDICTIONS, Denoiser, diffusion_loss, draw_noise_and_time, frozen
from .networks import MLPDenoiser, UNet, timestep_embedding
from .process import EDM, VP, Process, ddpm_betas, make_process
from .samplers import (SAMPLERS, ddim, dpm_solver_pp_2m, dpm_solver_pp_3m, euler, get_sampler, heun, ipndm,
                       nfe_for_steps, solve, unipc)
from .schedules import SCHEDULES, karras_sigmas, schedule
from .train import (TEACHERS, load_checkpoint, make_teacher, pretrained_teacher, save_checkpoint,
                    teacher_config, train_diffusion)

__all__ = [
    "PREDICTIONS", "Denoiser", "diffusion_loss", "draw_noise_and_time", "frozen", "MLPDenoiser", "UNet",
    "timestep_embedding", "EDM", "VP", "Process", "ddpm_betas", "make_process", "SAMPLERS", "ddim",
    "dpm_solver_pp_2m", "dpm_solver_pp_3m", "euler", "get_sampler", "heun", "ipndm", "nfe_for_steps", "solve",
    "unipc", "SCHEDULES", "karras_sigmas", "schedule", "TEACHERS", "load_checkpoint", "make_teacher", "pretrained_teacher",
    "save_checkpoint", "teacher_config", "train_diffusion",
]
