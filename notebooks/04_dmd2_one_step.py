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
# **The paper's claim** (Yin et al., NeurIPS 2024; docs/methods.md §5). A generator initialised from the
# teacher and trained by *distribution matching* — its gradient is the difference between a "fake"
# score (a denoiser that keeps learning the generator's own samples) and the teacher's "real" score,
# normalised per sample — reaches ImageNet-64 FID **1.28 in one step**, better than its teacher (about
# 2.3 with many steps) at 1/500 of the sampling cost. Three ingredients make it work: the **two
# time-scale update rule** (5 fake-score updates per generator update; without it training is
# unstable), a **GAN term** on the fake score's bottleneck features (lets the student use real data
# and surpass the teacher), and, for few-step generators, **backward simulation** (train on the
# inputs the generator will see at inference).
#
# **How this notebook tests it.** On a 2-D ring mixture whose density is known, with every run on
# three or more seeds (`fedlib.results.compare`: a claim holds when the paired mean difference exceeds
# 2 standard errors) and every verdict on a *late-training average* (the mean over the second half of
# training), never the last iterate. Hyper-parameters the paper sets for ImageNet (the GAN weights,
# and in the `long` set the learning rate and the fake-score lag) are **searched on a validation
# distance** (sliced W2 to a validation sample of the true mixture); the claims are measured on a
# separate held-out test sample. Then a **budget sweep** (the student/teacher gap against generator
# updates), the ablations (TTUR: the chosen ratio vs 1, GAN term, backward simulation, DMD1's regression loss) and
# 8×8 digits: the teacher at NFE 1…50 with its best sampler against the 1- and 4-step students.
#
# **Our scale and metric.** Implemented from docs/methods.md §5 (`fedlib.dmd2`) on fedlib's diffusion
# core. Image quality is a Fréchet distance in the feature space of a classifier fedlib trains on
# digits: **not comparable to published FID**. The `quick` set trains a few hundred generator updates
# on 2-D and a few dozen on digits (minutes on a CPU; the paper runs hundreds of thousands of GPU
# iterations); the `long` set stretches the 2-D budget 16-fold and widens the search.

# %% tags=["parameters"]
toy = "ring"  # 2-D mixture with an exact density [one of ring, grid]
toy_teacher_steps = 2000  # training steps of the 2-D teacher (cached; notebook 03 trains it with these steps, so a run after 03 loads it) [min 1; max 300000]
toy_steps = 200  # generator updates of a 2-D run at budget 1 (the quick budget) [min 4; max 500000]
toy_batch = 64  # batch size on 2-D [min 1; max 10000]
toy_lr = 1e-3  # AdamW learning rate on 2-D, equal for generator and fake score, before the search [> 0]
toy_eval = 2000  # generator samples per 2-D evaluation, and size of the validation and test references [min 100; max 1000000]
toy_eval_every = 20  # generator updates between 2-D evaluations [min 1; max toy_steps]
seeds = [0, 1, 2]  # seeds of every run; 2-D seeds train together, vectorised [non-empty; distinct; each min 0; each max 2**31 - 1]
budget_multipliers = [0.25, 0.5, 1]  # budgets of the 1-step gap sweep, in units of toy_steps; each budget reaches one evaluation (toy_eval_every updates) [non-empty; distinct; each min toy_eval_every / toy_steps; each max 1000]
gan_ratios = [0.0, 0.01]  # GAN weights searched, as fractions of the paper's GAN-to-DM ratio (1 - the paper's; the long set searches 1e-4 to 1) [non-empty; distinct; each min 0]
search_lrs = [1e-3]  # 2-D learning rates searched after the GAN weights (the long set searches 5e-4 to 4e-3) [non-empty; distinct; each > 0]
search_ttur_ratios = [5]  # fake-score updates per generator update searched after the lr (the long set - 2, 5, 10) [non-empty; distinct; each min 1; each max 1000]
gan_critic_weight = 1e-2  # the paper's GAN critic weight (at ImageNet-64's sample size; fedlib rescales it) [min 0]
gan_generator_weight = 3e-3  # the paper's GAN generator weight (likewise) [min 0]
ttur_ratio = 5  # fake-score updates per generator update before the search (paper - 5) [min 1; max 1000]
n_student_steps = 4  # steps of the few-step student (paper - 4) [min 2; max 400]
regression_weight = 0.25  # weight of DMD1's regression loss in the DMD1 ablation [min 0]
teacher_nfes = [1, 2, 4, 10, 50]  # NFEs of the teacher rows of the tables [non-empty; distinct; each min 1; each max 5000]
samplers = ["dpm_solver_pp_2m", "ipndm"]  # teacher samplers; the best per NFE is reported [non-empty; distinct; each in step_sampler_names()]
run_ablations = True  # run the 2-D ablations
run_images = True  # also run the image part (digits)
image_multistep = False  # also train the few-step student on images (the GPU sets)
dataset = "digits"  # image dataset (seeded stand-in when absent) [one of digits, fashion_mnist, cifar10]
use_stand_in = False  # use fedlib's seeded stand-in data of the dataset's shape (smoke runs of `paper`)
teacher_steps = 1500  # training steps of the image teacher (cached; notebook 03 trains it with these steps, so a run after 03 loads it) [min 1; max 20000000]
teacher_seed = 0  # seed of the teachers (and of their cache keys) [min 0; max 2**31 - 1]
steps = 40  # DMD2 generator updates on images [min 2; max 2000000]
batch_size = 32  # batch size on images [min 1; max 10000]
lr = 5e-4  # AdamW learning rate on images [> 0]
n_eval = 500  # image samples per table entry [min 2; max 1000000]
feature_steps = 600  # training steps of the classifier that defines the feature space (shared with 03) [min 1; max 500000]
cpu_threads = 1  # torch CPU threads (1 is fastest for these small networks on a shared CPU; 0 leaves torch's default) [min 0; max 256]
device = "auto"  # where to run [one of auto, cpu, cuda]

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from fedlib import data as fdata
from fedlib import dmd2, plots
from fedlib.diffusion import pretrained_teacher, schedule, solve
from fedlib.plots import image_grid, savefig, use_style
from fedlib.results import Run, save_explorer
from fedlib.studies import teacher_study
from fedlib.utils import resolve_device, seed_everything
from fedlib.verdicts import compare, compare_to

run = Run.start("04_dmd2_one_step", globals())
use_style()
dev = resolve_device(device)
if dev.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)
t_start = time.perf_counter()

# %% [markdown]
# ## 0. The rule on a handful of points
# DMD moves each generator sample x along g = (x_fake − x_real)/w, the fake score's denoised estimate
# minus the teacher's, divided by w = mean|x − x_real|. For a denoiser D(x_t) = x_t + σ² ∇log p_σ(x_t),
# that is σ²(s_fake − s_real)/w: the difference of the two *scores*. Below, both denoisers are exact:
# the true mixture (real) and the same mixture turned by a sixteenth of a turn (standing for the generator's current
# distribution, fake). `dmd2.distribution_matching_loss`'s autograd gradient equals the score
# difference, and −g points from the generator's modes (blue) towards the true ones.

# %%
true_mix = fdata.mixture(toy)
c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
gen_mix = fdata.GaussianMixture2D(true_mix.means @ torch.tensor([[c, s], [-s, c]]), true_mix.std)
g0 = torch.Generator().manual_seed(0)
x_demo = gen_mix.sample(6, g0)[0].requires_grad_(True)
sigma, eps = torch.full((6,), 0.5), torch.randn(6, 2, generator=g0)
loss, g_demo, w_demo = dmd2.distribution_matching_loss(x_demo, dmd2.exact_denoiser(true_mix), dmd2.exact_denoiser(gen_mix),
                                                       sigma, eps, reduction="sum", return_direction=True)
(grad_demo,) = torch.autograd.grad(loss, x_demo)
x_t = x_demo.detach() + 0.5 * eps
score_diff = 0.25 * (gen_mix.score(x_t, 0.5) - true_mix.score(x_t, 0.5)) / w_demo[:, None]
display(pd.DataFrame({"x": x_demo.detach().tolist(), "autograd gradient g": grad_demo.tolist(),
                      "sigma^2 (s_fake - s_real) / w": score_diff.tolist(), "w": w_demo.tolist()}).map(
    lambda v: np.round(v, 3)))
fig, ax = plt.subplots(figsize=(3.8, 3.8))
plots.dm_gradient_quiver(ax, true_mix, gen_mix, x_demo.detach(), -0.25 * grad_demo)
ax.set_title("one DMD step −g at sigma 0.5 (arrows)", fontsize=8)
_ = savefig(fig, "04_dm_gradient_teaching")

# %% [markdown]
# ## 1. The 2-D mixture: teacher, references, what is trained
# The teacher is fedlib's standard 2-D one (`pretrained_teacher`: an EDM-preconditioned MLP, EMA
# weights, cached; the same as notebook 03's). Two independent **stratified** samples of the true
# mixture (the exact share of points per mode) serve as references: *validation* for the search,
# *test* for the claims. The fake score is trained at times uniform in noise fraction over the whole
# range; the generator's GAN weight is rescaled to the paper's GAN-to-DM ratio and the critic's keeps the
# paper's ratio to the fake-score loss unscaled (both are means; `fedlib.dmd2.gan_weight_scale`).

# %%
seed_everything(teacher_seed)
gm = fdata.mixture(toy)
toy_data = fdata.toy_2d(toy, n=4000, seed=teacher_seed).x
toy_teacher = pretrained_teacher(toy, steps=toy_teacher_steps, seed=teacher_seed, device=dev)
evaluator = dmd2.ToyEvaluator(gm, toy_eval, seed=1000, keep=400)
gan_scale = dmd2.gan_weight_scale(2)


def toy_config(steps=toy_steps, gan_ratio=0.0, lr=toy_lr, ttur_ratio=ttur_ratio, **kw):
    return dmd2.DMD2Config(steps=steps, batch_size=toy_batch, lr=lr, ttur_ratio=ttur_ratio,
                           gan_critic_weight=gan_critic_weight * gan_ratio, gan_generator_weight=gan_generator_weight * gan_ratio,
                           eval_every=toy_eval_every, checkpoint_every=toy_eval_every, **kw)


def train_toy(name, pairs=None, **kw):
    return dmd2.train_dmd2_seeds(toy_teacher, toy_data, toy_config(**kw), seeds, eval_fn=evaluator,
                                 regression_pairs=pairs, desc=name, device=dev)


# %%
print(f"{toy} teacher: {sum(p.numel() for p in toy_teacher.parameters()):,} parameters, process {toy_teacher.process}")
print("1-step student input time (sigma):", dmd2.student_times(toy_teacher.process, 1).tolist())
print(f"{n_student_steps}-step student input times (sigma):",
      [round(t, 3) for t in dmd2.student_times(toy_teacher.process, n_student_steps).tolist()])
print("DM-loss sigma range (2%-98% of the noise range):",
      [round(t, 4) for t in dmd2.t_from_noise_fraction(toy_teacher.process, torch.tensor(dmd2.DM_RANGE)).tolist()])
print(f"generator's GAN weight x {gan_scale:g} on 2-D (12288 / 2 elements per sample): the paper's ratio to the DM loss; "
      "the critic's x 1: the paper's ratio to the fake-score loss")

# %% [markdown]
# ## 2. Hyper-parameters searched on the validation distance
# One at a time, each over its grid with the others at their best so far (`dmd2.coordinate_search`):
# the GAN weights as a fraction of the paper's GAN-to-DM ratio (0: no GAN term; 1: the paper's ratio;
# 1/6144 would be the paper's raw generator weight unscaled), then the learning rate, then the fake-score lag
# (TTUR ratio). The score is the late-training average (second half) of the sliced W2 to the
# **validation** sample, mean over seeds; the test sample is never looked at here.

# %%
search_runs = {}


def search_score(hp):
    search_runs[tuple(sorted(hp.items()))] = res = train_toy(f"search {hp}", **hp)
    return [dmd2.late_average(r.history, "sw_val") for r in res]


best_hp, search_records = dmd2.coordinate_search(
    search_score, {"gan_ratio": gan_ratios, "lr": search_lrs, "ttur_ratio": search_ttur_ratios},
    {"gan_ratio": gan_ratios[0], "lr": toy_lr, "ttur_ratio": ttur_ratio})
run.metrics["search"] = {"best": best_hp, "records": search_records}
print("chosen on validation:", best_hp)
display(pd.DataFrame(search_records).groupby(["param", "value"], sort=False)["score"].agg(["mean", "std"]).round(4))
_ = savefig(plots.search_figure(search_records, title="2-D search: late sliced W2 to the validation sample"), "04_search")

# %% [markdown]
# ## 3. The 1-step student against the teacher, and the gap against the budget
# The chosen configuration trained to the largest budget; a run of N updates is the first N updates
# of a longer one (constant learning rate), so each budget reads the late-training average (updates
# N/2…N) of the test distance. The teacher samples the same number of points per seed (its noise
# seeded by the seed) with its best sampler at each NFE.

# %%
max_steps = int(round(max(budget_multipliers) * toy_steps))
best_key = tuple(sorted(best_hp.items()))
main = search_runs[best_key] if max_steps == toy_steps else train_toy("1-step DMD2", steps=max_steps, **best_hp)
x_T_toy = {s: toy_teacher.process.prior((toy_eval, 2), generator=torch.Generator().manual_seed(10 + s), device=dev) for s in seeds}
teacher_rows = {s: dmd2.teacher_baselines(toy_teacher, x_T_toy[s], teacher_nfes, samplers,
                                          lambda x: evaluator.sw(x, evaluator.test)) for s in seeds}
teacher_sw = {nfe: [min(r["score"] for r in teacher_rows[s] if r["nfe"] == nfe) for s in seeds] for nfe in teacher_nfes}
nfe_hi = max(teacher_nfes)
teacher_x = {s: min((r for r in teacher_rows[s] if r["nfe"] == nfe_hi), key=lambda r: r["score"])["samples"] for s in seeds}
teacher_off = [dmd2.off_mode_fraction(gm, teacher_x[s]) for s in seeds]
teacher_tv = [dmd2.mode_weight_tv(gm, teacher_x[s]) for s in seeds]
budget = pd.DataFrame([{"budget": b, "seed": s, "sw": dmd2.late_average(r.history, "sw_test", upto=b),
                        "ratio": dmd2.late_average(r.history, "sw_test", upto=b) / teacher_sw[nfe_hi][i],
                        "off-mode share": dmd2.late_average(r.history, "off_mode_test", upto=b),
                        "mode-weight TV": dmd2.late_average(r.history, "mode_tv_test", upto=b)}
                       for b in [int(round(m * toy_steps)) for m in budget_multipliers]
                       for i, (s, r) in enumerate(zip(seeds, main))])
run.metrics.update(budget_sweep=budget.to_dict("records"), teacher_sw_test=teacher_sw, teacher_off_mode=teacher_off,
                   teacher_mode_tv=teacher_tv)
display(budget.groupby("budget")[["sw", "ratio", "off-mode share", "mode-weight TV"]].agg(["mean", "std"]).round(3))
print(f"teacher NFE {nfe_hi}: test SW {np.mean(teacher_sw[nfe_hi]):.3f}, off-mode share {np.mean(teacher_off):.3f}, "
      f"mode-weight TV {np.mean(teacher_tv):.3f}")
fig = plots.budget_gap_figure(budget, 1.28 / 2.3, f"1-step student / teacher NFE {nfe_hi} (2-D, test SW)",
                              [("off-mode share", float(np.mean(teacher_off)), "share of samples off every mode (> 3 sd)"),
                               ("mode-weight TV", float(np.mean(teacher_tv)), "mode-weight error (TV of the mode shares)")])
_ = savefig(fig, "04_budget_gap")

# %% [markdown]
# ## 4. Ablations on 2-D
# Same teacher, budget, seeds and chosen hyper-parameters; one ingredient changes. Each row is the
# late-training average of the test distance (mean ± sd over seeds). "fake score at EDM's log-normal
# times" is fedlib's earlier implementation, which trained the fake score at EDM's training times (it
# rarely saw σ > 2, where 53% of the generator's DM-loss times lie).

# %%
runs = {"1-step DMD2": search_runs[best_key]}
if run_ablations:
    no_gan = {**best_hp, "gan_ratio": 0.0}
    runs["no GAN term"] = search_runs.get(tuple(sorted(no_gan.items()))) or train_toy("no GAN", **no_gan)
    runs["TTUR ratio 1"] = train_toy("TTUR 1", **{**best_hp, "ttur_ratio": 1})
    runs[f"{n_student_steps}-step DMD2"] = train_toy(f"{n_student_steps}-step", n_student_steps=n_student_steps, **best_hp)
    runs[f"{n_student_steps}-step, no backward simulation"] = train_toy(
        "no backsim", n_student_steps=n_student_steps, backward_simulation=False, **best_hp)
    runs["fake score at EDM's log-normal times"] = train_toy("old fake times", fake_times="process", **best_hp)
    z_ref = toy_teacher.process.prior((4000, 2), generator=torch.Generator().manual_seed(100), device=dev)
    x_ref, _ = solve(toy_teacher, z_ref, schedule("edm", toy_teacher.process, nfe_hi), samplers[-1])
    runs["DMD1 regression, ratio 1"] = train_toy("DMD1", pairs=(z_ref, x_ref.detach()), **{
        **best_hp, "gan_ratio": 0.0, "ttur_ratio": 1}, regression_weight=regression_weight)
late = {name: [dmd2.late_average(r.history, "sw_test") for r in res] for name, res in runs.items()}
ablation_table = pd.DataFrame({n: {"late test SW, mean": np.mean(v), "sd over seeds": np.std(v, ddof=1),
                                   "diverged": any(r.diverged for r in runs[n]), "seconds (all seeds)": runs[n][0].seconds}
                               for n, v in late.items()}).T
run.metrics["toy_ablations"] = {n: {"late_sw_test": v, **ablation_table.loc[n].to_dict()} for n, v in late.items()}
display(ablation_table.round(4))

# %%
curves = pd.DataFrame([{"run": name, "seed": r.seed, "step": e["step"], "test sliced W2": e["sw_test"]}
                       for name, res in runs.items() for r in res for e in r.history["eval"]])
fig = plots.curves_figure(curves, "test sliced W2", float(np.mean(teacher_sw[nfe_hi])),
                          f"2-D training curves ({len(seeds)} seeds, ±1 sd)")
_ = savefig(fig, "04_toy_training_curves")

# %%
fig, axes = plt.subplots(1, 4, figsize=(13, 3.3))
best_rows = {nfe: min((r for r in teacher_rows[seeds[0]] if r["nfe"] == nfe), key=lambda r: r["score"]) for nfe in teacher_nfes}
student_x = {name: res[0].history["eval"][-1]["samples"].float() for name, res in runs.items()}
nfe_lo = min(teacher_nfes)
panels = [(f"teacher, NFE {nfe_lo} ({best_rows[nfe_lo]['sampler']})", best_rows[nfe_lo]["samples"][:400]),
          (f"teacher, NFE {nfe_hi}", best_rows[nfe_hi]["samples"][:400]), ("1-step DMD2 student", student_x["1-step DMD2"]),
          (f"{n_student_steps}-step DMD2 student", student_x.get(f"{n_student_steps}-step DMD2"))]
plots.samples_over_density(axes, gm, [(t, None if x is None else x.cpu()) for t, x in panels])
fig.suptitle(f"generator samples (red) over the true density (grey), seed {seeds[0]}")
_ = savefig(fig, "04_toy_samples_over_density")

# %% [markdown]
# ## 5. Digits: the teacher at NFE 1…50 against the 1-step and 4-step students
# The image teacher and the feature classifier come from `fedlib.studies.teacher_study` (cached,
# shared with notebooks 03 and 05). Fréchet distance (FD) in fedlib's digits classifier's feature
# space, to the held-out test images — **not comparable to published FID**. The GAN weights are the
# ratio chosen on 2-D (a search on images needs the GPU `paper` set).

# %%
if run_images:
    study = teacher_study(dataset, use_stand_in=use_stand_in, teacher_steps=teacher_steps, teacher_seed=teacher_seed,
                          feature_steps=feature_steps, device=dev)
    img_eval = lambda gen, times: {"fd": study.fd(dmd2.generate(gen, times, n_eval, shape=study.shape, seed=1))}  # noqa: E731
    img_cfg = dict(steps=steps, batch_size=batch_size, lr=lr, ttur_ratio=best_hp["ttur_ratio"],
                   gan_critic_weight=gan_critic_weight * best_hp["gan_ratio"], eval_every=max(1, steps // 6),
                   gan_generator_weight=gan_generator_weight * best_hp["gan_ratio"], checkpoint_every=max(1, steps // 3))
    img_runs = {f"{k}-step DMD2": dmd2.train_dmd2_seeds(
        study.teacher, study.train.x, dmd2.DMD2Config(**img_cfg, n_student_steps=k), seeds, eval_fn=img_eval,
        desc=f"{dataset} {k}-step", device=dev) for k in ((1, n_student_steps) if image_multistep else (1,))}
    x_T = study.teacher.process.prior((n_eval, *study.shape), generator=torch.Generator().manual_seed(1), device=dev)
    img_teacher_rows = dmd2.teacher_baselines(study.teacher, x_T, teacher_nfes, samplers, study.fd)

# %%
img_table, fd_student = pd.DataFrame(), {}
if run_images:
    rows = [{"model": f"teacher ({r['sampler']})", "NFE": r["nfe"], "FD": r["score"], "sd over seeds": np.nan,
             "s / 1000 samples": r["s_per_1000"]} for r in img_teacher_rows if r["best"]]
    img_samples = {}
    for name, res in img_runs.items():
        fd_student[name] = [dmd2.late_average(r.history, "fd") for r in res]
        x, sec = dmd2.timed_sample(res[0], n_eval, seed=1, device=dev)
        img_samples[name] = x
        rows.append({"model": f"{name} (late average)", "NFE": len(res[0].times), "FD": np.mean(fd_student[name]),
                     "sd over seeds": np.std(fd_student[name], ddof=1), "s / 1000 samples": sec})
    rows.append({"model": "real training images (not in the FD reference)", "NFE": 0, "FD": study.real_fd(n_eval),
                 "sd over seeds": np.nan, "s / 1000 samples": 0.0})
    img_table = pd.DataFrame(rows)
    fd_t = {r["nfe"]: r["score"] for r in img_teacher_rows if r["best"]}
    img_budget = pd.DataFrame([{"budget": e["step"], "seed": r.seed, "ratio": e["fd"] / fd_t[nfe_hi]}
                               for r in img_runs["1-step DMD2"] for e in r.history["eval"]])
    run.metrics.update(image_table=img_table.to_dict("records"), image_fd_per_seed=fd_student,
                       image_budget=img_budget.to_dict("records"), feature_classifier_test_accuracy=study.features.test_accuracy)
    display(img_table.round(4))
    _ = savefig(plots.budget_gap_figure(img_budget, 1.28 / 2.3, f"1-step student / teacher NFE {nfe_hi} ({dataset}, FD)"),
                "04_digits_budget_gap")

# %%
if run_images:
    best_img = {r["nfe"]: r for r in img_teacher_rows if r["best"]}
    grids = [(f"teacher NFE {nfe_lo}", best_img[nfe_lo]["samples"]), (f"teacher NFE {nfe_hi}", best_img[nfe_hi]["samples"]),
             *img_samples.items()]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4))
    for ax, (title, x) in zip(axes, grids):
        image_grid(x[:64].cpu(), nrow=8, ax=ax, title=title)
    _ = savefig(fig, "04_digits_samples")

# %% [markdown]
# ## 6. Explorer
# Pick a model (the teacher at an NFE, a student, an ablation) and a training step: the left panel
# shows that model's 2-D samples over the true density, the middle one the 1-step student's samples
# at that generator update, the right one its digits where it was run on images. It reads only the
# data this run stored (`fedlib.results.save_explorer`), so after opening the committed notebook,
# run the next two cells alone.

# %%
to_uint8 = lambda x: ((x[:32].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # noqa: E731
trace = main[0].history["eval"]
_ = save_explorer("04_dmd2_one_step", {
    "mixture_means": gm.means, "mixture_std": gm.std,
    "toy_samples": {**{f"teacher NFE {n}": best_rows[n]["samples"][:400].cpu() for n in teacher_nfes},
                    **{k: v.cpu() for k, v in student_x.items() if v is not None}},
    "toy_scores": {**{f"teacher NFE {n}": teacher_sw[n][0] for n in teacher_nfes}, **{k: v[0] for k, v in late.items()}},
    "training_steps": [e["step"] for e in trace], "training_samples": torch.stack([e["samples"].float() for e in trace]),
    "image_samples": {**({f"teacher NFE {r['nfe']}": to_uint8(r["samples"]) for r in img_teacher_rows if r["best"]}
                         if run_images else {}), **{k: to_uint8(v) for k, v in (img_samples if run_images else {}).items()}}})

# %% tags=["explorer-setup"]
import ipywidgets as widgets
import matplotlib.pyplot as plt

from fedlib.plots import dmd2_explorer_figure
from fedlib.results import load_explorer

# %% tags=["explorer"]
explorer_data = load_explorer("04_dmd2_one_step")


def explore(model="1-step DMD2", step=explorer_data["training_steps"][-1]):
    dmd2_explorer_figure(explorer_data, model, step)
    plt.show()


steps_seen = explorer_data["training_steps"]
widgets.interactive(explore, model=list(explorer_data["toy_samples"]),
                    step=widgets.SelectionSlider(options=steps_seen, value=steps_seen[-1], description="update"))

# %%
fig = plots.dmd2_explorer_figure(explorer_data, "1-step DMD2", steps_seen[len(steps_seen) // 2])
_ = savefig(fig, "04_explorer_default")

# %% [markdown]
# ## 7. Claims
# Each verdict is computed above, in this run, on ≥ 3 seeds by the noise rule (paired over seeds;
# holds when the mean difference exceeds 2 SE), on late-training averages of the **test** distance.

# %%
sw1 = [dmd2.late_average(r.history, "sw_test", upto=toy_steps) for r in main]
diverged = [n for n, res in runs.items() if any(r.diverged for r in res)]
run.claim("DMD2 training runs: finite losses, no divergence (2-D)", "sanity",
          f"{len(runs)} configurations x {len(seeds)} seeds; diverged: {diverged or 'none'}", not diverged, required=True)
trend = budget.groupby("budget")[["ratio", "off-mode share", "mode-weight TV"]].mean().round(2)
run.claim("1-step student matches or beats the many-step teacher (2-D)", "ImageNet-64: FID 1.28 vs teacher ~2.3 (ratio 0.56)",
          None, compare(sw1, teacher_sw[nfe_hi], a_name="student SW", b_name=f"teacher NFE {nfe_hi}", higher_is_better=False),
          note=f"at budget {toy_steps}. Against updates {list(trend.index)}: SW ratio {trend['ratio'].tolist()}, share off "
               f"every mode {trend['off-mode share'].tolist()} (teacher {np.mean(teacher_off):.2f}), mode-weight TV "
               f"{trend['mode-weight TV'].tolist()} (teacher {np.mean(teacher_tv):.2f}). The mass between modes shrinks "
               "with budget; what is left is the uneven split over the modes (section 3 figure, section 8)")
if 1 in teacher_nfes:
    run.claim("1-step student far better than the teacher at NFE 1 (2-D)", "one step vs one step: the student wins by far",
              None, compare_to(np.divide(sw1, teacher_sw[1]), 0.5, name="student / teacher-NFE-1 SW"), note="'far': below half")

# %%
if run_ablations:
    better = lambda a, b, an, bn: compare(late[a], late[b], a_name=an, b_name=bn, higher_is_better=False)  # noqa: E731
    run.claim("TTUR (the chosen ratio) beats ratio 1", "without TTUR training is unstable", None,
              better("1-step DMD2", "TTUR ratio 1", f"ratio {best_hp['ttur_ratio']}", "ratio 1"))
    stage1 = lambda r: search_runs[tuple(sorted({"gan_ratio": r, "lr": toy_lr, "ttur_ratio": ttur_ratio}.items()))]  # noqa: E731
    nonzero = [r for r in gan_ratios if r > 0]
    if nonzero and 0.0 in gan_ratios:  # both sides from the GAN stage of the search (same lr and lag)
        val = {r: np.mean([dmd2.late_average(x.history, "sw_val") for x in stage1(r)]) for r in gan_ratios}
        gan_best = min(nonzero, key=val.get)
        late["GAN (stage 1)"], late["no GAN (stage 1)"] = ([dmd2.late_average(x.history, "sw_test") for x in stage1(r)]
                                                           for r in (gan_best, 0.0))
        run.claim("the GAN term improves quality (2-D)", "GAN term lowers FID", None,
                  better("GAN (stage 1)", "no GAN (stage 1)", f"GAN ratio {gan_best:g}", "no GAN"),
                  note=f"best non-zero ratio on validation; validation SW by ratio {({k: round(v, 3) for k, v in val.items()})}")
    run.claim("backward simulation improves the multi-step student", "fixes the train/inference mismatch", None,
              better(f"{n_student_steps}-step DMD2", f"{n_student_steps}-step, no backward simulation", "with", "without"))
    run.claim("DMD2 (TTUR, no regression) at least as good as DMD1's regression loss", "DMD2 drops the regression loss",
              None, better("1-step DMD2", "DMD1 regression, ratio 1", "DMD2", "DMD1"), note="'does not hold' only if worse")
    run.claim("fake score over the whole noise range beats EDM's log-normal times", "the paper's setting",
              None, better("1-step DMD2", "fake score at EDM's log-normal times", "uniform", "log-normal"))

# %%
if run_images:
    first, last = (img_budget.groupby("budget")["ratio"].mean().iloc[i] for i in (0, -1))
    run.claim("1-step student matches or beats the many-step teacher (digits)", "FID 1.28 vs ~2.3", None,
              compare_to(fd_student["1-step DMD2"], fd_t[nfe_hi], name="student FD"),
              note=f"late average of {steps} updates (FD in fedlib's classifier space, not FID) against the teacher at NFE "
                   f"{nfe_hi}; the student/teacher FD ratio falls from {first:.1f} to {last:.1f} over training and is still "
                   "falling (the FD-vs-updates figure): budget is what is missing")
    if 1 in teacher_nfes:
        run.claim("1-step student far better than the teacher at NFE 1 (digits)", "student wins by far", None,
                  compare_to(np.divide(fd_student["1-step DMD2"], fd_t[1]), 0.5, name="student / teacher-NFE-1 FD"))
run.metrics.update(wall_time_s=time.perf_counter() - t_start, cpu_time_s=time.process_time())
run.claims_table()

# %% [markdown]
# ## 8. Why the failing claims fail
# What follows reads the quick run above and the `long` set (`python -m fedlib reproduce 04 --scale long`,
# results/long/04_dmd2_one_step: the same notebook, the 1-step budget stretched to 16× and the search
# widened); the numbers are in their tables, figures and metrics.json.
#
# **The one-step student does not match the many-step teacher on 2-D.** Not for want of searching:
# the GAN weights, the learning rate and the fake-score lag were searched on the validation distance
# (section 2; what the long set's search picks, and each candidate's validation distance, are in its
# `metrics.json` under `search`: no pick is typed here, since they move between machines). Nor, as far as we
# can find, a defect: the implementation was checked against docs/methods.md §5 point by point, each
# with a test in `tests/test_dmd2.py` — the DM gradient's normaliser and sign (with exact denoisers,
# g = σ²(s_fake − s_real)/w, and a step along −g raises the true density), which network each loss
# trains (the fake-score update never reaches the generator; the generator update, DM and GAN, never
# reaches the fake score or the head), what the generator sees under backward simulation (the
# inference chain's state, per sample), the time ranges (fake score and GAN over the whole noise
# range: two deviations from the paper, fixed) and the GAN weights' normalisation. The budget figure shows
# instead *where* the error sits. (1) Mass between the modes: a one-step generator is a continuous map
# from a 2-D Gaussian onto eight separated modes and must leave mass on the seams between them (the
# bridges in the samples figure). Its share falls steadily with updates, in the quick and the long set,
# yet stays well above the teacher's and true samples'. (2) An uneven split over the modes: the
# mode-weight error (total variation of the mode shares) falls over the quick budget but then stalls
# in the long set until its largest budget, still above the teacher's, and it is what the sliced
# distance sees once the seams thin out: the long set's test SW stays nearly flat over most budgets
# and falls only at the largest together with it, while the seams keep thinning (the budget figure). Rebalancing mass
# between separated modes means moving the generator's partition of the noise space across
# low-density regions, where the score difference is weakest. What is missing
# is **budget** (the trend has not flattened at 16×), and a generator that can make sharp transitions
# (**model size**); the paper's images have no eight isolated modes in two dimensions. On 2-D the
# student can at best *match* the teacher: the teacher sits near the metric's floor (teacher NFE 50
# against fresh samples of the true mixture, in the tables above).
#
# **The GAN term does not help on 2-D beyond the seed spread.** At the paper's GAN-to-DM ratio (1) it
# makes the student worse on the long set's validation distance; at the smaller ratios its effect is
# small, and the chosen ratio against none is within noise (the claims). Its gradient flows into the fake score's shared trunk
# (for a 3-layer MLP, the whole network) and degrades the denoiser the DM gradient reads; and its
# benefit in the paper comes from real data correcting a teacher visibly worse than the data (the
# paper's ImageNet teacher), while our 2-D teacher is already near the metric's floor. What is missing: a
# teacher measurably worse than its data (a GPU-scale image set).
#
# **Backward simulation** helps at the quick scale (see the claims) but is within noise in the long
# set's configuration (its searched learning rate and lag), where the
# 4-step student is also worse than the 1-step one: at 200 updates the multi-step student has four
# input levels to learn and is further from converged.
#
# **The digits student does not match the teacher.** Its FD ratio to the teacher at NFE 50 falls
# steeply over the quick budget (the digits figure); in the long set (160 updates) it flattens after
# about a third of its updates, well above 1 (its late average FD against the teacher's and real test
# images': `results/long/04_dmd2_one_step/metrics.json`, the README's long table). What is missing: **budget** (the paper trains
# hundreds of thousands of iterations) and a learning rate searched for images (ours is not), and the
# GAN term with real data, the paper's route past the teacher, which needs the GPU scale above.

# %%
print(f"notebook wall time: {run.metrics['wall_time_s']:.0f} s (CPU time of the kernel: {run.metrics['cpu_time_s']:.0f} s)")
_ = run.finish()
