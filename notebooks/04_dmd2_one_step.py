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
# # 04 · DMD2: a one-step generator distilled from a diffusion teacher
#
# **The paper's claim** (Yin et al., NeurIPS 2024; papers.md §5). A generator initialised from the
# teacher and trained by *distribution matching* — its gradient is the difference between a "fake"
# score (a denoiser that keeps learning the generator's own samples) and the teacher's "real" score,
# normalised per sample — reaches ImageNet-64 FID **1.28 in one step**, better than its teacher (about
# 2.3 with many steps) at 1/500 of the sampling cost. Three ingredients make it work: the **two
# time-scale update rule** (5 fake-score updates per generator update; without it training is
# unstable), a **GAN term** on the fake score's bottleneck features (lets the student use real data
# and surpass the teacher), and, for few-step generators, **backward simulation** (train on the
# inputs the generator will see at inference).
#
# **How this notebook tests it.** First on a 2-D ring mixture whose density is known exactly (sliced
# Wasserstein distance to the true mixture, mode coverage, log-likelihood under the true density),
# where every ablation is cheap: TTUR ratio 1 vs 5, with and without the GAN term, the 4-step
# student with and without backward simulation, and DMD1's regression loss instead of TTUR. Then on
# 8×8 digits: the teacher at NFE 1, 2, 4, 10, 50 with its
# best sampler against the 1-step and 4-step students, with sampling time per 1000 samples.
#
# **Our scale and metric.** Everything is implemented from papers.md §5 (`fedlib.dmd2`) on fedlib's
# diffusion core. Image quality is a Fréchet distance in the feature space of a classifier fedlib trains
# on digits (`fedlib.metrics`): **not comparable to published FID**. The `quick` defaults train for a
# few hundred generator updates on 2-D and a few dozen on digits, with small teachers (minutes on a CPU, where the paper
# uses hundreds of thousands of GPU iterations): read verdicts as directions at this scale.

# %% tags=["parameters"]
toy = "ring"  # 2-D mixture with an exact density: "ring" | "grid" [one of ring, grid]
toy_teacher_steps = 500  # training steps of the 2-D teacher (cached; notebook 03 uses 1500) [min 1]
toy_steps = 250  # DMD2 generator updates on 2-D [min 1]
toy_batch = 128  # batch size on 2-D [min 1]
toy_lr = 2e-3  # AdamW learning rate on 2-D (equal for generator and fake score) [> 0]
toy_eval = 2000  # samples per 2-D table entry [min 2]
dataset = "digits"  # image dataset: "digits" | "fashion_mnist" | "cifar10" (stand-in when absent) [one of digits, fashion_mnist, cifar10]
use_stand_in = False  # use fedlib's seeded stand-in data of the dataset's shape (smoke runs of `paper`)
teacher_steps = 500  # training steps of the image teacher (cached; notebook 03 uses 1500) [min 1]
teacher_seed = 0  # seed of the teachers (and of their cache keys) [min 0]
steps = 40  # DMD2 generator updates on images [min 1]
batch_size = 64  # batch size on images [min 1]
lr = 5e-4  # AdamW learning rate on images [> 0]
ttur_ratio = 5  # fake-score updates per generator update (paper: 5) [min 1]
gan_critic_weight = 1e-2  # weight of the GAN classifier loss in the fake-score update (paper: ~1e-2) [min 0]
gan_generator_weight = 3e-3  # weight of the GAN loss in the generator update (paper: 3e-3) [min 0]
n_student_steps = 4  # steps of the few-step student (paper: 4) [min 1]
backward_simulation = True  # train the few-step student on its own simulated inputs
regression_weight = 0.25  # weight of DMD1's regression loss in the DMD1 ablation [min 0]
teacher_nfes = [1, 2, 4, 10, 50]  # NFEs of the teacher rows of the table [non-empty; distinct; each min 1]
samplers = ["euler", "dpm_solver_pp_2m", "ipndm"]  # teacher samplers; the best per NFE is reported [non-empty; distinct; each in step_sampler_names()]
n_eval = 500  # image samples per table entry [min 2]
feature_steps = 600  # training steps of the classifier that defines the feature space (shared with 03) [min 1]
run_images = True  # also run the image part (digits)
run_ablations = True  # run the 2-D ablations
seeds = [0]  # seeds of the 2-D runs (ablations are averaged over them) [non-empty; distinct; each min 0]
cpu_threads = 1  # torch CPU threads (1 is fastest for these small networks on a shared CPU) [min 0]
device = "auto"  # "auto" | "cpu" | "cuda" [one of auto, cpu, cuda]

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from fedlib import data as D
from fedlib import dmd2, metrics
from fedlib.diffusion import pretrained_teacher
from fedlib.plots import image_grid, savefig, use_style
from fedlib.results import Run
from fedlib.utils import resolve_device, seed_everything

use_style()
dev = resolve_device(device)
if dev.type == "cpu":
    torch.set_num_threads(cpu_threads)
params = dict(toy=toy, toy_teacher_steps=toy_teacher_steps, toy_steps=toy_steps, toy_batch=toy_batch, toy_lr=toy_lr,
              toy_eval=toy_eval, dataset=dataset, use_stand_in=use_stand_in, teacher_steps=teacher_steps,
              teacher_seed=teacher_seed, steps=steps, batch_size=batch_size, lr=lr, ttur_ratio=ttur_ratio,
              gan_critic_weight=gan_critic_weight, gan_generator_weight=gan_generator_weight,
              n_student_steps=n_student_steps, backward_simulation=backward_simulation,
              regression_weight=regression_weight, teacher_nfes=teacher_nfes, samplers=samplers, n_eval=n_eval,
              feature_steps=feature_steps, run_images=run_images, run_ablations=run_ablations, seeds=seeds,
              cpu_threads=cpu_threads, device=device)
run = Run("04_dmd2_one_step", params=params)
t_start = time.perf_counter()

# %% [markdown]
# ## 1. The 2-D mixture: teacher, students and exact metrics
# The teacher is fedlib's standard 2-D one (`pretrained_teacher`: an EDM-preconditioned MLP, EMA
# weights, cached). Lower sliced Wasserstein (SW) is better; *covered* is the fraction of modes
# holding at least 20% of their share of samples; *on-mode* the fraction of samples within 3 std of
# a mode; log-likelihood is under the true density.

# %%
seed_everything(teacher_seed)
gm = D.mixture(toy)
toy_data = D.toy_2d(toy, n=4000, seed=teacher_seed).x
toy_teacher = pretrained_teacher(toy, steps=toy_teacher_steps, seed=teacher_seed, device=dev)
toy_ref = gm.sample(toy_eval, torch.Generator().manual_seed(12345))[0]


def toy_scores(x):
    cov = metrics.mode_coverage(gm, x)
    return {"sliced_w2": metrics.sliced_wasserstein(x, toy_ref), "covered": cov["covered"],
            "on_mode": cov["high_quality"], "log_lik": metrics.mixture_log_likelihood(gm, x)}


def toy_config(seed, **kw):
    base = dict(steps=toy_steps, batch_size=toy_batch, lr=toy_lr, ttur_ratio=ttur_ratio,
                gan_critic_weight=gan_critic_weight, gan_generator_weight=gan_generator_weight,
                eval_every=max(1, toy_steps // 10), seed=seed)
    return dmd2.DMD2Config(**{**base, **kw})


def toy_eval_fn(generator, times):
    return {"sliced_w2": metrics.sliced_wasserstein(dmd2.generate(generator, times, 1000, shape=(2,), seed=7), toy_ref)}


def train_toy(name, seed, **kw):
    return dmd2.train_dmd2(toy_teacher, toy_data, toy_config(seed, **kw), eval_fn=toy_eval_fn,
                           desc=f"{name} seed {seed}", device=dev)


# %%
# NBVAL_CHECK_OUTPUT
# what is trained: generator and fake score are copies of the teacher; the GAN head reads the fake score's bottleneck
print(f"{toy} teacher: {sum(p.numel() for p in toy_teacher.parameters()):,} parameters, process {toy_teacher.process}")
print(f"GAN head: {sum(p.numel() for p in dmd2.GANHead(toy_teacher.net.feature_channels).parameters()):,} parameters")
print("1-step student input time (sigma):", dmd2.student_times(toy_teacher.process, 1).tolist())
print(f"{n_student_steps}-step student input times (sigma):",
      [round(t, 3) for t in dmd2.student_times(toy_teacher.process, n_student_steps).tolist()])
print("DM-loss sigma range (2%-98% of the noise range):",
      [round(t, 4) for t in dmd2.t_from_noise_fraction(toy_teacher.process, torch.tensor(dmd2.DM_RANGE)).tolist()])

# %%
toy_runs = {("1-step DMD2", s): train_toy("1-step", s) for s in seeds}
toy_runs.update({(f"{n_student_steps}-step DMD2", s): train_toy(f"{n_student_steps}-step", s,
                                                                 n_student_steps=n_student_steps,
                                                                 backward_simulation=backward_simulation)
                 for s in seeds})
print({k: f"{r.seconds:.1f} s, diverged: {r.diverged}" for k, r in toy_runs.items()})

# %%
x_T_toy = toy_teacher.process.prior((toy_eval, 2), generator=torch.Generator().manual_seed(1), device=dev)
toy_teacher_rows = dmd2.teacher_baselines(toy_teacher, x_T_toy, teacher_nfes, samplers,
                                          lambda x: metrics.sliced_wasserstein(x, toy_ref))
toy_table = []
for r in toy_teacher_rows:
    if r["best"]:
        toy_table.append({"model": f"teacher ({r['sampler']})", "NFE": r["nfe"], **toy_scores(r["samples"]),
                          "s / 1000 samples": r["s_per_1000"]})
for (name, s), res in toy_runs.items():
    if s == seeds[0]:
        x, sec = dmd2.timed_sample(res, toy_eval, seed=1, device=dev)
        toy_table.append({"model": name, "NFE": len(res.times), **toy_scores(x), "s / 1000 samples": sec})
toy_table = pd.DataFrame(toy_table)
run.metrics["toy_table"] = toy_table.to_dict("records")
display(toy_table.round(4))

# %%
fig, axes = plt.subplots(1, 4, figsize=(13, 3.3), sharex=True, sharey=True)
lim = 3.2 if toy == "ring" else 3.0
xs = np.linspace(-lim, lim, 200)
grid = torch.tensor(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2), dtype=torch.float32)
dens = gm.log_prob(grid).exp().reshape(200, 200).numpy()
best = {r["nfe"]: r for r in toy_teacher_rows if r["best"]}
panels = [(f"teacher, NFE 1 ({best[1]['sampler']})", best[1]["samples"]),
          (f"teacher, NFE {max(teacher_nfes)}", best[max(teacher_nfes)]["samples"]),
          ("1-step DMD2 student", toy_runs[("1-step DMD2", seeds[0])].sample(toy_eval, seed=1)),
          (f"{n_student_steps}-step DMD2 student", toy_runs[(f"{n_student_steps}-step DMD2", seeds[0])].sample(toy_eval, seed=1))]
for ax, (title, x) in zip(axes, panels):
    ax.contourf(xs, xs, dens, levels=12, cmap="Greys")
    x = x.cpu()
    ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color="C3")
    ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
fig.suptitle("generator samples (red) over the true density (grey)")
fig_path = savefig(fig, "04_toy_samples_over_density")

# %% [markdown]
# ## 2. Ablations on 2-D
# Same teacher, same number of generator updates, same seeds; only one ingredient changes.
# Stability is read from the training curve (sliced Wasserstein of 1000 samples every
# `toy_steps / 10` generator updates): its mean over the second half of training and its spread.

# %%
ablations = {}
if run_ablations:
    for s in seeds:
        ablations[("TTUR ratio 1", s)] = train_toy("ttur 1", s, ttur_ratio=1)
        ablations[("no GAN term", s)] = train_toy("no GAN", s, gan_critic_weight=0.0, gan_generator_weight=0.0)
        ablations[(f"{n_student_steps}-step, backward simulation {'off' if backward_simulation else 'on'}", s)] = train_toy(
            "no backsim", s, n_student_steps=n_student_steps, backward_simulation=not backward_simulation)
        z_ref = toy_teacher.process.prior((2000, 2), generator=torch.Generator().manual_seed(100 + s), device=dev)
        x_ref = dmd2.teacher_baselines(toy_teacher, z_ref, [max(teacher_nfes)], samplers[-1:], lambda x: 0.0)[0]["samples"]
        ablations[("DMD1 regression, ratio 1", s)] = dmd2.train_dmd2(
            toy_teacher, toy_data, toy_config(s, ttur_ratio=1, regression_weight=regression_weight, gan_critic_weight=0.0,
                                              gan_generator_weight=0.0),
            regression_pairs=(z_ref, x_ref), eval_fn=toy_eval_fn, desc=f"DMD1 seed {s}", device=dev)
all_runs = {**toy_runs, **ablations}


def curve_summary(res):
    sw = [e["sliced_w2"] for e in res.history["eval"]]
    half = sw[len(sw) // 2:]
    return {"final SW": sw[-1] if sw else np.nan, "SW 2nd half mean": float(np.mean(half)) if half else np.nan,
            "SW 2nd half std": float(np.std(half)) if half else np.nan, "diverged": res.diverged is not None,
            "seconds": res.seconds}


rows = [{"run": name, "seed": s, **curve_summary(res)} for (name, s), res in all_runs.items()]
ablation_table = pd.DataFrame(rows).groupby("run", sort=False).mean(numeric_only=True).drop(columns="seed")
run.metrics["toy_ablations"] = ablation_table.reset_index().to_dict("records")
display(ablation_table.round(4))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for (name, s), res in all_runs.items():
    ev = res.history["eval"]
    if not ev:
        continue
    ls = "--" if n_student_steps > 1 and name.startswith(f"{n_student_steps}-step") else "-"
    axes[0].plot([e["step"] for e in ev], [e["sliced_w2"] for e in ev], ls, label=f"{name} (seed {s})" if len(seeds) > 1 else name)
    axes[1].plot(res.history["step"], res.history["loss_fake"], ls, alpha=0.7, label=name if s == seeds[0] else None)
axes[0].axhline(best[max(teacher_nfes)]["score"], color="k", lw=0.8, ls=":", label=f"teacher, NFE {max(teacher_nfes)}")
axes[0].set(xlabel="generator update", ylabel="sliced W2 to the true mixture", yscale="log", title="training curves (2-D)")
axes[1].set(xlabel="generator update", ylabel="fake-score loss", yscale="log", title="fake-score denoising loss")
axes[0].legend(fontsize=7)
fig_path = savefig(fig, "04_toy_training_curves")

# %% [markdown]
# ## 3. Digits: the teacher at NFE 1…50 against the 1-step and 4-step students
# The image teacher is fedlib's standard digits U-Net (`pretrained_teacher`, cached). Fréchet distance (FD) in fedlib's digits
# classifier's feature space, to the held-out test images — **not comparable to published FID**.

# %%
img_table = pd.DataFrame()
if run_images:
    train, test = D.load_train_test(dataset, use_stand_in)
    teacher = pretrained_teacher(dataset, steps=teacher_steps, seed=teacher_seed, device=dev,
                                 data=train if train.name.startswith("stand_in") else None)
    features = metrics.feature_extractor(train, test, steps=feature_steps, seed=0, device=dev)
    ref_stats = metrics.gaussian_stats(metrics.extract_features(features, test.x))
    fd = lambda x: metrics.classifier_fd(features, x, ref_stats)  # noqa: E731
    img_cfg = dict(steps=steps, batch_size=batch_size, lr=lr, ttur_ratio=ttur_ratio, gan_critic_weight=gan_critic_weight,
                   gan_generator_weight=gan_generator_weight, seed=seeds[0], checkpoint_every=max(1, steps // 3))
    img_runs = {"1-step DMD2": dmd2.train_dmd2(teacher, train.x, dmd2.DMD2Config(**img_cfg), desc=f"{dataset} 1-step", device=dev)}
    img_runs[f"{n_student_steps}-step DMD2"] = dmd2.train_dmd2(
        teacher, train.x, dmd2.DMD2Config(**img_cfg, n_student_steps=n_student_steps, backward_simulation=backward_simulation),
        desc=f"{dataset} {n_student_steps}-step", device=dev)
    shape = tuple(train.x.shape[1:])
    x_T = teacher.process.prior((n_eval, *shape), generator=torch.Generator().manual_seed(1), device=dev)
    img_teacher_rows = dmd2.teacher_baselines(teacher, x_T, teacher_nfes, samplers, fd)
    rows = [{"model": f"teacher ({r['sampler']})", "NFE": r["nfe"], "FD (fedlib classifier; not FID)": r["score"],
             "s / 1000 samples": r["s_per_1000"]} for r in img_teacher_rows if r["best"]]
    img_samples = {}
    for name, res in img_runs.items():
        x, sec = dmd2.timed_sample(res, n_eval, seed=1, device=dev)
        img_samples[name] = x
        rows.append({"model": name, "NFE": len(res.times), "FD (fedlib classifier; not FID)": fd(x), "s / 1000 samples": sec})
    rows.append({"model": "real test images", "NFE": 0, "FD (fedlib classifier; not FID)": fd(train.x[:n_eval]),
                 "s / 1000 samples": 0.0})
    img_table = pd.DataFrame(rows)
    run.metrics["image_table"] = img_table.to_dict("records")
    run.metrics["feature_classifier_test_accuracy"] = features.test_accuracy
    run.metrics["image_teacher"] = {"cached": teacher.history.get("cached"), "train_wall_time_s": teacher.history["wall_time_s"]}
    print(f"feature classifier test accuracy {features.test_accuracy:.3f}; teacher cached: {teacher.history.get('cached')}")
    display(img_table.round(4))

# %%
if run_images:
    best_img = {r["nfe"]: r for r in img_teacher_rows if r["best"]}
    grids = [(f"teacher NFE 1", best_img[1]["samples"]), (f"teacher NFE {max(teacher_nfes)}", best_img[max(teacher_nfes)]["samples"]),
             *img_samples.items()]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4))
    for ax, (title, x) in zip(axes, grids):
        image_grid(x[:64].cpu(), nrow=8, ax=ax, title=title)
    fig_path = savefig(fig, "04_digits_samples")

# %% [markdown]
# ## 4. Claims
# Each verdict is computed above, in this run. "Close to the teacher" is stated as a ratio of the
# student's distance to the many-step teacher's (1.0 = as good); at CPU scale (hundreds of generator
# updates instead of hundreds of thousands) we expect the direction, not the paper's magnitude.

# %%
tt = toy_table.set_index("model")
t_row = toy_table[toy_table.model.str.startswith("teacher")].set_index("NFE")
sw_student = float(tt.loc["1-step DMD2", "sliced_w2"])
sw_teacher_many, sw_teacher_one = float(t_row.loc[max(teacher_nfes), "sliced_w2"]), float(t_row.loc[1, "sliced_w2"])
ratio_toy = sw_student / sw_teacher_many
run.metrics["toy_sw_ratio_student_over_teacher"] = ratio_toy
main_ok = all(r.diverged is None for r in toy_runs.values()) and all(
    np.isfinite(r.history["loss_dm"]).all() for r in toy_runs.values())
run.claim("DMD2 training runs: finite losses, no divergence (2-D main runs)", "sanity",
          f"{len(toy_runs)} runs, {sum(len(r.history['step']) for r in toy_runs.values())} generator updates", main_ok,
          required=True)
run.claim("1-step student is close to the many-step teacher (2-D)", "ImageNet-64: 1.28 vs teacher ~2.3 FID (ratio 0.56)",
          f"SW {sw_student:.3f} vs teacher NFE {max(teacher_nfes)} {sw_teacher_many:.3f} (ratio {ratio_toy:.2f})",
          ratio_toy <= 2.0, note="holds if within 2x of the teacher at this scale; the paper's student is better (<1)")
run.claim("1-step student far better than the teacher at NFE 1 (2-D)", "1 step vs 1 step: student wins by far",
          f"SW {sw_student:.3f} vs {sw_teacher_one:.3f}", sw_student < 0.5 * sw_teacher_one,
          note="'far' = less than half the teacher's distance")
if run_images:
    it = img_table.set_index("model")
    fdcol = "FD (fedlib classifier; not FID)"
    ti = img_table[img_table.model.str.startswith("teacher")].set_index("NFE")
    fd_s, fd_many, fd_one = float(it.loc["1-step DMD2", fdcol]), float(ti.loc[max(teacher_nfes), fdcol]), float(ti.loc[1, fdcol])
    run.claim("1-step student close to the many-step teacher (digits)", "FID 1.28 vs ~2.3",
              f"FD {fd_s:.2f} vs teacher NFE {max(teacher_nfes)} {fd_many:.2f} (ratio {fd_s / fd_many:.2f})",
              fd_s <= 2.0 * fd_many, note=f"{steps} generator updates; FD in fedlib's classifier space, not FID")
    run.claim("1-step student far better than the teacher at NFE 1 (digits)", "student wins by far",
              f"FD {fd_s:.2f} vs {fd_one:.2f}", fd_s < 0.5 * fd_one, note="'far' = less than half")
    speed = float(ti.loc[max(teacher_nfes), "s / 1000 samples"]) / float(it.loc["1-step DMD2", "s / 1000 samples"])
    run.metrics["digits_sampling_speedup"] = speed
if run_ablations:
    ab = ablation_table
    m5, m1 = ab.loc["1-step DMD2", "SW 2nd half mean"], ab.loc["TTUR ratio 1", "SW 2nd half mean"]
    s5, s1 = ab.loc["1-step DMD2", "SW 2nd half std"], ab.loc["TTUR ratio 1", "SW 2nd half std"]
    run.claim("TTUR (ratio 5) stabilises training vs ratio 1", "without TTUR training is unstable",
              f"2nd-half SW mean {m5:.3f} (std {s5:.3f}) vs {m1:.3f} (std {s1:.3f}) at ratio 1",
              bool(m5 < m1 and s5 <= s1 * 1.1), note="holds if lower and no noisier over the second half of training")
    g_on, g_off = ab.loc["1-step DMD2", "SW 2nd half mean"], ab.loc["no GAN term", "SW 2nd half mean"]
    run.claim("the GAN term improves quality", "GAN term lowers FID", f"SW {g_on:.3f} with vs {g_off:.3f} without",
              bool(g_on < g_off), note="2-D, 2nd-half mean of the training curve")
    name_bs = f"{n_student_steps}-step DMD2"
    name_nobs = f"{n_student_steps}-step, backward simulation {'off' if backward_simulation else 'on'}"
    b_on, b_off = (ab.loc[name_bs, "SW 2nd half mean"], ab.loc[name_nobs, "SW 2nd half mean"]) if backward_simulation else (
        ab.loc[name_nobs, "SW 2nd half mean"], ab.loc[name_bs, "SW 2nd half mean"])
    run.claim("backward simulation improves the multi-step student", "fixes the train/inference mismatch",
              f"{n_student_steps}-step SW {b_on:.3f} with vs {b_off:.3f} without", bool(b_on < b_off), note="2-D, 2nd-half mean of the training curve")
    d1 = ab.loc["DMD1 regression, ratio 1", "SW 2nd half mean"]
    run.metrics["dmd1_vs_dmd2_sw"] = {"dmd1": d1, "dmd2": m5}
    run.claim("DMD2 (TTUR, no regression) at least as good as DMD1's regression loss", "DMD2 drops the regression loss",
              f"SW {m5:.3f} (DMD2) vs {d1:.3f} (DMD1 regression, ratio 1)", bool(m5 <= d1))
run.metrics["wall_time_s"] = time.perf_counter() - t_start
pd.set_option("display.max_colwidth", 90)
run.claims_frame()

# %%
print(f"notebook wall time: {run.metrics['wall_time_s']:.0f} s")
run.finish()
