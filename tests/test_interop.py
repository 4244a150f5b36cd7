"""fedlib's DPM-Solver++(2M) on a diffusers UNet2DModel equals diffusers' DPMSolverMultistepScheduler
on the same model and time steps (tiny random UNet made here; no downloads)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fedlib.diffusion import dpm_solver_pp_2m  # noqa: E402
from fedlib.diffusion.interop import diffusers_timesteps_to_times, from_diffusers  # noqa: E402

# relative max-abs difference reached on CPU float32: ~1e-6 (float32 rounding); asserted 1e-5
TOLERANCE = 1e-5


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    with torch.no_grad():  # random output layer so the model is not the zero function
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _diffusers_solution(n_steps: int, prediction: str, final_sigmas_type: str):
    """(unet, scheduler, x_T, diffusers' own DPM-Solver++(2M) solution from x_T)."""
    unet = _tiny_unet()
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                  algorithm_type="dpmsolver++", solver_order=2,
                                                  prediction_type=prediction, final_sigmas_type=final_sigmas_type,
                                                  lower_order_final=True)
    sched.set_timesteps(n_steps)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return unet, sched, x_T, x


@pytest.mark.parametrize("n_steps,prediction", [(5, "epsilon"), (6, "v_prediction")])
def test_dpm_solver_pp_2m_matches_diffusers(n_steps, prediction):
    unet, sched, x_T, ref = _diffusers_solution(n_steps, prediction, "zero")
    with torch.no_grad():
        den = from_diffusers(unet, sched)
        times = diffusers_timesteps_to_times(sched.timesteps)
        ours, nfe = dpm_solver_pp_2m(den, x_T, times)
    assert nfe == n_steps == len(sched.timesteps)
    # relative to the sample scale: an untrained eps-model's x0 = (x - sigma eps)/alpha reaches ~1e2
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"max |fedlib - diffusers| / max |diffusers| = {err:.1e} (n_steps={n_steps}, {prediction})")
    assert err < TOLERANCE, err


@pytest.mark.parametrize("n_steps", [5, 16])
def test_lower_order_final_matches_diffusers_sigma_min_convention(n_steps):
    """With final_sigmas_type="sigma_min" diffusers makes the last step first order below 15
    steps (lower_order_final); fedlib's dpm_solver_pp_2m does so with lower_order_final=True, and by
    default keeps it second order (which then differs from diffusers below 15 steps)."""
    unet, sched, x_T, ref = _diffusers_solution(n_steps, "epsilon", "sigma_min")
    with torch.no_grad():
        den = from_diffusers(unet, sched)
        # diffusers' sigma_min is the noise level of DDPM step 0, i.e. fedlib's t = 1/N
        times = torch.cat([diffusers_timesteps_to_times(sched.timesteps, final_zero=False),
                           torch.tensor([1 / 1000], dtype=torch.float64)])
        ours, nfe = dpm_solver_pp_2m(den, x_T, times, lower_order_final=True)
        plain, _ = dpm_solver_pp_2m(den, x_T, times)
    assert nfe == n_steps
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < TOLERANCE, err
    plain_err = ((plain - ref).abs().max() / ref.abs().max()).item()
    if n_steps < 15:
        assert plain_err > 100 * TOLERANCE, plain_err
    else:  # 15 steps or more: diffusers keeps the last step second order, like fedlib's default
        assert plain_err < TOLERANCE, plain_err
