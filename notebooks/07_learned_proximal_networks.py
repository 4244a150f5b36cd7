# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Learned proximal networks (LPN)
#
# **The paper's claim** (Fang, Buchanan & Sulam, ICLR 2024; docs/methods.md §8). A network f can be
# made *exactly* the proximal operator of some regulariser R by building it as the gradient of an
# input-convex network ψ (an ICNN, plus a small strongly convex term α/2 ||y||²): f = ∇ψ = prox_R with
# R(x) = ψ*(x) − ½||x||², possibly nonconvex, which we can evaluate (by inverting f). Trained with
# **proximal matching** (a loss 1 − exp(−||f(y) − x||² / γ²) with γ shrinking), f approaches the MAP
# denoiser, so R recovers the prior's negative log-density (scaled by σ², up to a constant); trained
# with the mean squared error it approaches the MMSE denoiser instead. Plugged into an iterative solver
# for an inverse problem (plug-and-play, PnP), an LPN makes the solver a real proximal gradient method
# on a known objective, so its iterates converge, while a generic denoiser carries no such guarantee;
# the paper reports restorations as good as or better than other PnP denoisers.
#
# **How this notebook tests it.** (1) A 1-D Laplacian prior, whose −log p = |x| / b and whose exact
# prox (the soft threshold at σ² / b) are known: the same LPN trained by proximal matching and by MSE,
# R / σ² compared with −log p after removing the best constant (mean absolute error on a grid), and f
# compared with the soft threshold. (2) Deblurring 8×8 digits (a Gaussian blur plus a little noise) by
# PnP proximal gradient, x ← f(x − η Aᵀ(Ax − b)), with the LPN and with a plain denoiser of 3×3
# convolutions of the same width without the convexity constraints, trained with MSE on the same pairs:
# per-iteration residuals ||x_{k+1} − x_k|| and the PSNR of the restoration on the test split. Every claim is decided on ≥ 3
# seeds by the noise rule (`fedlib.verdicts`: a paired mean difference beyond 2 standard errors holds;
# inside it is within noise).
#
# **Our scale.** Small networks trained for hundreds of steps on a CPU where the paper trains larger
# ICNNs for far longer on MNIST, CelebA and CT images. Ours: the softplus sharpness β of the ICNNs,
# the image ICNN's convex quadratic ½||Ky||² (a symmetric positive semidefinite convolution as its
# gradient) that starts the LPN at the identity, its non-negative weights started small, the linear
# decay of the learning rate during proximal matching, γ measured per pixel in units of σ, and the PnP
# step η = 1 (the textbook 1 / ||A||²). The denoisers are trained on the training split less a
# validation split; each denoiser's depth and learning rate, the image ICNN's β, the warm start and the
# images' γ were chosen on that validation split's denoising PSNR, and the training noise level σ and
# the number of PnP iterations on its PnP deblurring (both printed below as a check; docs/methods.md §8
# lists what was tried). The test split is read only by the PnP measurements the claims use. The `long` set adds seeds and steps; `paper` is Fashion-MNIST (28×28)
# with wider networks for a GPU.

# %% tags=["parameters", "explorer-setup"]
seeds = [0, 1, 2]  # seeds of every run (training and noise) [non-empty; distinct; each min 0; each max 2**31 - 1]
prior_b = 1.0  # scale b of the 1-D Laplace prior, -log p(x) is |x| / b plus a constant [> 0]
prior_sigma = 1.0  # noise level sigma of the 1-D training pairs, x plus sigma times Gaussian noise [> 0]
prior_steps = 500  # optimiser steps of each 1-D LPN [min 1; max 1000000]
prior_batch = 512  # 1-D training pairs per step [min 1; max 1000000]
prior_hidden = 32  # hidden width of the 1-D ICNN [min 1; max 4096]
prior_lr = 0.01  # Adam learning rate of the 1-D networks [> 0]
prior_gamma_start = 1.0  # gamma of the 1-D proximal matching after the warm start, in units of sigma [> 0]
prior_gamma_end = 0.1  # gamma of the 1-D proximal matching at the last step [> 0; max prior_gamma_start]
prior_beta = 10.0  # sharpness of the 1-D ICNN's softplus, softplus(beta t) / beta [> 0; max 1000]
prior_warmup = 0.5  # fraction of the 1-D steps trained with MSE before proximal matching [min 0; max 1]
dataset = "digits"  # images of the deblurring study [one of digits, fashion_mnist]
use_stand_in = False  # use fedlib's seeded stand-in data of the dataset's shape (smoke runs of `paper`)
val_size = 200  # training images held out as the validation split [min 1; max 100000]
sigma = 0.05  # noise level of the image denoisers' training pairs (pixels in [-1, 1]) [> 0]
steps = 300  # optimiser steps of each image denoiser, the same for the LPN and the plain one [min 1; max 1000000]
batch = 64  # training images per step [min 1; max 100000]
hidden = 16  # channels of every hidden layer, the same for both denoisers [min 1; max 1024]
layers = 3  # hidden layers of the plain denoiser and of the 1-D ICNN [min 1; max 32]
lr = 0.003  # Adam learning rate of the plain denoiser [> 0]
lpn_layers = 2  # hidden layers of the image LPN's ICNN [min 1; max 32]
lpn_lr = 0.01  # Adam learning rate of the image LPN [> 0]
lpn_beta = 4.0  # sharpness of the image ICNN's softplus, softplus(beta t) / beta [> 0; max 1000]
loss = "pm"  # the LPN's training loss, proximal matching (the paper's) or mse [one of pm, mse]
warmup = 0.8  # fraction of the image LPN's steps trained with MSE before proximal matching [min 0; max 1]
gamma_start = 2.0  # gamma of the images' proximal matching after the warm start, per pixel in units of sigma [> 0]
gamma_end = 1.0  # gamma of the images at the last step, annealed geometrically [> 0; max gamma_start]
alpha = 0.001  # weight of the strongly convex term alpha/2 |y|^2 of every ICNN [> 0; max 10]
blur_width = 1.0  # standard deviation of the Gaussian blur, in pixels [> 0; max 100]
blur_size = 5  # side of the blur kernel, odd [min 1; max 63]
noise = 0.02  # standard deviation of the observation noise [min 0]
eta = 1.0  # PnP step size [> 0; max 10]
pnp_iters = 100  # PnP iterations [min 2; max 100000]
n_test = 64  # test images restored per seed [min 1; max 100000]
cpu_threads = 1  # torch CPU threads (0 leaves torch's default) [min 0; max 256]
device = "auto"  # where to run [one of auto, cpu, cuda]

# %% tags=["explorer-setup"]
import ipywidgets as widgets
import matplotlib.pyplot as plt

from fedlib import plots
from fedlib.results import load_explorer

# %%
import time

import numpy as np
import pandas as pd
import torch
from IPython.display import display
from tqdm.auto import tqdm

from fedlib import data as fdata
from fedlib import lpn as L
from fedlib.plots import savefig, use_style
from fedlib.results import Run, save_explorer
from fedlib.utils import resolve_device, seed_everything
from fedlib.verdicts import compare, compare_to

run = Run.start("07_learned_proximal_networks", globals())
use_style()
dev = resolve_device(device)
if dev.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)
t_start = time.perf_counter()
seed_everything(seeds[0])

# %% [markdown]
# ## 1. A 1-D prior with a known log-density
# Per seed, the same ICNN trained twice on pairs (x, x + σv), x ~ Laplace(0, b): once by proximal
# matching (an MSE warm start, then γ annealed down) and once by MSE for as many steps. R is evaluated
# on a grid by inverting f (L-BFGS on ψ(y) − xy, `fedlib.lpn.regulariser`); the left panel draws R / σ²
# with the best constant removed against −log p, the right panel f against the exact prox.

# %%
LOSS_NAMES = {"pm": "proximal matching", "mse": "MSE"}
studies = {name: [] for name in LOSS_NAMES.values()}
with tqdm(total=2 * len(seeds) * prior_steps, desc="1-D LPNs") as bar:
    for seed in seeds:
        for key, name in LOSS_NAMES.items():
            cfg1 = L.LPNConfig(hidden=prior_hidden, layers=layers, alpha=alpha, sigma=prior_sigma, steps=prior_steps,
                               batch=prior_batch, lr=prior_lr, loss=key, warmup=prior_warmup,
                               gamma_start=prior_gamma_start,
                               gamma_end=prior_gamma_end, seed=seed)
            studies[name].append(L.laplace_study(cfg1, b=prior_b, beta=prior_beta, progress=bar))
prior = pd.DataFrame([{"loss": name, "seed": seed, "error of R / sigma^2 against -log p": s["prior_error"],
                       "error of f against the exact prox": s["prox_error"]}
                      for name, runs in studies.items() for seed, s in zip(seeds, runs)])
run.metrics["prior"] = prior.to_dict("records")
display(prior.groupby("loss").agg(["mean", "std"]).drop(columns="seed").round(4))
_ = savefig(plots.learned_prior_figure(studies), "07_learned_prior")

# %% [markdown]
# ## 2. Two denoisers per seed on images
# The LPN (a convolutional ICNN's gradient, trained with the `loss` parameter) and the plain denoiser
# (3×3 convolutions of the same width without sign constraints, a residual network trained with MSE),
# the same steps and noise draws, each with its own depth and learning rate. Their denoising PSNR at σ
# on the validation split is a check that both learned something, and so is their PnP deblurring of
# validation images (the same blur and noise as section 3): σ was chosen on it, since with η = 1 the
# denoiser is applied at every iteration and σ sets how strongly it regularises. The claims read only
# the test split's deblurring below.

# %%
train, test = fdata.load_train_test(dataset, stand_in_data=use_stand_in)
g_split = torch.Generator().manual_seed(seeds[0])
order = torch.randperm(len(train), generator=g_split)
x_train, x_val = train.x[order[val_size:]].to(dev), train.x[order[:val_size]].to(dev)
x_test = test.x[:n_test].to(dev)
print(f"{dataset}: {len(x_train)} training, {len(x_val)} validation and {len(x_test)} test images of shape "
      f"{tuple(x_train.shape[1:])}")
nets, val_rows = {}, []
with tqdm(total=2 * len(seeds) * steps, desc="denoisers") as bar:
    for seed in seeds:
        cfg = L.LPNConfig(hidden=hidden, layers=lpn_layers, alpha=alpha, sigma=sigma, steps=steps, batch=batch,
                          lr=lpn_lr, loss=loss, warmup=warmup, gamma_start=gamma_start, gamma_end=gamma_end,
                          seed=seed, beta=lpn_beta)
        plain_cfg = L.LPNConfig(hidden=hidden, layers=layers, sigma=sigma, steps=steps, batch=batch, lr=lr,
                                loss="mse", seed=seed)
        nets[seed] = L.train_denoisers(x_train, cfg, plain_cfg, progress=bar)
        g = torch.Generator().manual_seed(10_000 + seed)
        y_val = x_val + sigma * torch.randn(x_val.shape, generator=g).to(dev)
        for m, net in nets[seed].items():
            val_rows.append({"method": m, "seed": seed,
                             "validation PSNR, denoised": float(L.psnr(L.apply(net, y_val).detach(), x_val).mean()),
                             "validation PSNR, noisy": float(L.psnr(y_val, x_val).mean())})
A = L.gaussian_blur_operator(blur_width, blur_size, channels=x_val.shape[1], device=dev)
g = torch.Generator().manual_seed(30_000)
b_val = A(x_val) + noise * torch.randn(x_val.shape, generator=g).to(dev)
for row in val_rows:
    x_pnp, _, _ = L.pnp_pgd(nets[row["seed"]][row["method"]], A, b_val, eta=eta, iters=pnp_iters)
    row["validation PSNR, PnP deblurring"] = float(L.psnr(x_pnp, x_val).mean())
val = pd.DataFrame(val_rows)
run.metrics["validation"] = val.to_dict("records")
display(val.groupby("method").mean().drop(columns="seed").round(3))

# %% [markdown]
# ## 3. Deblurring by plug-and-play
# The test images blurred (`blur_width`, `blur_size`) with observation noise (`noise`, drawn per seed),
# then `pnp_iters` iterations of PnP proximal gradient from the observation, with each seed's two
# denoisers. With the LPN each iteration is an exact proximal gradient step on
# ½||Ax − b||² / η + R(x); with the plain denoiser it is a fixed-point iteration of some map. The
# residual ||x_{k+1} − x_k|| is averaged over the images.

# %%
A = L.gaussian_blur_operator(blur_width, blur_size, channels=x_test.shape[1], device=dev)
METHODS = ["LPN", "plain"]
KEEP = sorted({0, 1, 2, 5, 10, 20, pnp_iters} & set(range(pnp_iters + 1)))
rows, curves, outs = [], {m: [] for m in METHODS}, {}
for seed in tqdm(seeds, desc="PnP"):
    g = torch.Generator().manual_seed(20_000 + seed)
    b_obs = A(x_test) + noise * torch.randn(x_test.shape, generator=g).to(dev)
    for m in METHODS:
        x_hat, res, kept = L.pnp_pgd(nets[seed][m], A, b_obs, eta=eta, iters=pnp_iters, keep=KEEP)
        r = res.mean(1).cpu()
        curves[m].append(r.numpy())
        outs[m, seed] = {"x": x_hat.cpu(), "kept": {k: v.cpu() for k, v in kept.items()}, "b": b_obs.cpu(),
                         "residuals": r.tolist()}
        rows.append({"method": m, "seed": seed, "PSNR": float(L.psnr(x_hat, x_test).mean()),
                     "PSNR of the observation": float(L.psnr(b_obs, x_test).mean()),
                     "last / first residual": float(r[-1] / r[0]), "last residual": float(r[-1]),
                     "largest residual after iteration 10": float(r[10:].max()) if len(r) > 10 else float(r.max()),
                     "fraction of iterations whose residual rose": float(L.oscillation(res).mean())})
pnp = pd.DataFrame(rows)
run.metrics["pnp"] = pnp.to_dict("records")
display(pnp.groupby("method").agg(["mean", "std"]).drop(columns="seed").round(4))
_ = savefig(plots.residual_figure(curves), "07_pnp_residuals")

# %% [markdown]
# The first seed's restorations of the first eight test images: clean, observed, and each method's
# last iterate.

# %%
s0 = seeds[0]
fig = plots.restored_figure({"clean": x_test.cpu(), "observed (blurred, noisy)": outs["LPN", s0]["b"],
                             **{f"PnP with {m}": outs[m, s0]["x"] for m in METHODS}})
_ = savefig(fig, "07_restored")

# %% [markdown]
# ## 4. Explorer
# Pick a denoiser, a seed and an iteration: the images show that PnP iterate on eight test images (with
# their mean PSNR; iterate 0 is the observation), and the curve marks that iteration on the seed's residuals. It reads only the data this run
# stored (`fedlib.results.save_explorer`), so after opening the committed notebook, run the cells tagged
# `explorer-setup` and the explorer alone.

# %%
_ = save_explorer("07_learned_proximal_networks", {
    "methods": METHODS, "seeds": list(seeds), "iterations": KEEP,
    "iterates": {f"{m} seed {s}": torch.stack([plots.to_uint8(outs[m, s]["kept"][k][:8]) for k in KEEP])
                 for m in METHODS for s in seeds},
    "psnr": {f"{m} seed {s}": [float(L.psnr(outs[m, s]["kept"][k][:8], x_test[:8].cpu()).mean()) for k in KEEP]
             for m in METHODS for s in seeds},
    "residuals": {f"{m} seed {s}": outs[m, s]["residuals"] for m in METHODS for s in seeds}})

# %% tags=["explorer"]
explorer_data = load_explorer("07_learned_proximal_networks")


def explore(method=explorer_data["methods"][0], seed=explorer_data["seeds"][0],
            iteration=explorer_data["iterations"][-1]):
    plots.lpn_explorer_figure(explorer_data, method, seed, iteration)
    plt.show()


widgets.interactive(explore, method=explorer_data["methods"], seed=explorer_data["seeds"],
                    iteration=explorer_data["iterations"])

# %% [markdown]
# ## 5. Claims
# Each verdict is computed above, in this run, paired over the seeds by the noise rule. "Converges" is
# read as the last residual below one percent of the first; "monotone" as a residual that rises in
# fewer than one percent of the iterations (a fixed point iteration of an exact prox step may still
# wobble in floating point).

# %%
pr = prior.set_index(["loss", "seed"])
run.claim("1-D Laplace: proximal matching recovers -log p (up to a constant) better than MSE training",
          "the LPN trained by proximal matching recovers the prior's log-density; MSE does not", None,
          compare([pr.loc[("proximal matching", s), "error of R / sigma^2 against -log p"] for s in seeds],
                  [pr.loc[("MSE", s), "error of R / sigma^2 against -log p"] for s in seeds],
                  a_name="proximal matching error", b_name="MSE error", higher_is_better=False),
          note="mean absolute error of R / sigma^2 after removing the best constant, on a grid of [-2, 2]")
run.claim("1-D Laplace: the LPN trained by proximal matching is closer to the exact prox (soft threshold) than MSE's",
          "proximal matching learns the MAP denoiser, MSE the MMSE one", None,
          compare([pr.loc[("proximal matching", s), "error of f against the exact prox"] for s in seeds],
                  [pr.loc[("MSE", s), "error of f against the exact prox"] for s in seeds],
                  a_name="proximal matching", b_name="MSE", higher_is_better=False))
by = pnp.set_index(["method", "seed"])
col = lambda m, c: [by.loc[(m, s), c] for s in seeds]  # noqa: E731
run.claim("PnP with the LPN converges: last residual below 1% of the first",
          "PnP with an LPN converges (residuals decrease)", None,
          compare_to(col("LPN", "last / first residual"), 0.01, name="LPN last / first residual"))
run.claim("PnP with the LPN: residuals decrease monotonically (rise in < 1% of iterations)",
          "PnP with an LPN converges (residuals decrease)", None,
          compare_to(col("LPN", "fraction of iterations whose residual rose"), 0.01,
                     name="fraction of rising residuals"))
run.claim("PnP with the LPN restores at least as well (PSNR) as with the plain denoiser",
          "LPN restores as well as or better than other PnP denoisers", None,
          compare(col("LPN", "PSNR"), col("plain", "PSNR"), a_name="LPN PSNR", b_name="plain PSNR"),
          note="deblurring 8x8 test images; 'at least as well': within noise also supports it")
run.claim("PnP with the plain denoiser ends with a larger residual than with the LPN",
          "a generic denoiser has no convergence guarantee", None,
          compare(col("plain", "last residual"), col("LPN", "last residual"), a_name="plain last residual",
                  b_name="LPN last residual", fmt=".2e"))
run.metrics.update(wall_time_s=time.perf_counter() - t_start, cpu_time_s=time.process_time())
run.claims_table()

# %% [markdown]
# ## 6. Reading the verdicts
# **The learned prior.** The left figure of section 1 is the paper's 1-D experiment in small: where
# proximal matching works, R / σ² follows |x| / b with its kink at zero, and f is flat around zero
# like the soft threshold; MSE training gives the MMSE denoiser, which shrinks small inputs without
# zeroing them, so its R is rounded at zero. How close each gets at our budget is in the table of
# section 1 and the first two claims.
#
# **Convergence.** The LPN's PnP iteration is a proximal gradient method on a fixed objective, so its
# residuals must fall whatever the training did; the third and fourth claims check that the code keeps
# that promise, not that the LPN is a good denoiser (one that learned little, close to a shrunk
# identity, converges as well: read the convergence claims beside section 2's check). The plain denoiser carries no guarantee, but the lack of a guarantee is not a failure: a
# small, smooth residual network on 8×8 digits at a step of 1 / ||A||² may converge too, only more
# slowly (the last claim compares where the two stand after the same number of iterations). The
# paper's oscillations appear with deeper denoisers, larger steps and more iterations.
#
# **Restoration.** The constraints cost expressiveness at a fixed size and budget: a convex ψ summed
# over pixels is a much smaller family than a free convolutional network. Section 2's validation check
# shows how much each denoiser learned, and the fifth claim whether the LPN's restorations keep up at
# this scale; the paper's ICNNs are far wider and trained far longer.

# %%
print(f"notebook wall time: {run.metrics['wall_time_s']:.0f} s (CPU time of the kernel: {run.metrics['cpu_time_s']:.0f} s)")
_ = run.finish()
