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
# # 02 · FedDM: federated diffusion training, and what its bytes buy
#
# **The paper** (Vora et al., arXiv 2407.14730; papers.md §2) trains one U-Net denoiser across clients
# with FedAvg (*FedDM-vanilla*), adds a proximal term (μ/2)‖w − w_global‖² to each client's diffusion
# loss for non-IID data (*FedDM-prox*), and sends quantised model updates w_k − w_global instead of
# float32 weights (*FedDM-quant*). Claims: quantised updates cut communication by up to **4×** at the
# price of FID up to **1.75×** worse; the proximal term improves convergence under non-IID data.
#
# **How we test it.** All variants (vanilla, prox with a μ sweep, quant with a bits sweep) and a
# *central* model trained on the union of the data by the same SGD code, on an IID and a Dirichlet
# label-skew partition, for several seeds, trained side by side in one `torch.func.vmap` per distinct μ
# (`fedlib.feddm` on `fedlib.federated.local_train` + `fedlib.diffusion.diffusion_loss`). Bytes are
# the lengths of the real payloads (`fedlib.compression`: bit-packed codes plus a float32 scale and
# zero point per tensor). Quality is a **Frechet distance in the feature space of a small classifier
# fedlib trains on the same dataset** — it is *not* comparable to published (Inception) FID.
#
# **Our scale and choices.** The paper's exact bits, μ, partition and client counts could not be read
# (papers.md §2): we pick K clients, Dirichlet α and a μ / bits sweep and say so. By default 8×8 digits,
# a ~40k-parameter U-Net, EDM preconditioning (our choice: it learns in a few hundred SGD steps; the
# `paper` set uses the DDPM ε-objective as the paper does), a few hundred client steps: the models are
# far from converged, so quality differences between variants are partly seed noise — the table shows
# the spread over seeds. `-p dataset=fashion_mnist` runs FedDM's own 28×28 Fashion-MNIST (a 6,000-image
# subset on a CPU; the `fashion_mnist` parameter set uses all 60,000 images and a larger U-Net on a GPU).

# %% tags=["parameters"]
dataset = "digits"  # "digits" (8x8, bundled) | "fashion_mnist" (28x28, Debian package) | "cifar10" (needs the files) [one of digits, fashion_mnist, mnist, cifar10, cifar100]
stand_in_data = False  # use fedlib.data.stand_in(dataset) instead of the real data (smoke runs of paper sets)
n_train = 6000  # training images: a stratified subset of this size when the split is larger; 0 keeps it all [min 0]
n_clients = 4  # K clients (every client takes part in every round) [min 1; max train_size(dataset, n_train) // 4]
alpha = 0.1  # Dirichlet label-skew concentration of the non-IID partition [> 0]
rounds = 15  # communication rounds [min 1]
local_steps = 5  # SGD steps per client per round [min 1]
batch_size = 16  # client batch size (central training uses n_clients * batch_size) [min 1]
lr = 0.05  # client SGD learning rate [> 0]
momentum = 0.9  # client SGD momentum (reset every round) [min 0; < 1]
mu = [0.01, 0.1]  # FedDM-prox: proximal weights swept [distinct; each > 0]
bits = [8, 4]  # FedDM-quant: uplink bits swept, uniform affine; 32 sends float32 [distinct; each one of 2, 4, 8, 16, 32]
down_bits = 32  # downlink bits for the quant variants; 32 sends the float32 model [one of 2, 4, 8, 16, 32]
scheme = "tensor"  # quantisation scale per "tensor" or per output "channel" [one of tensor, channel]
rounding = "nearest"  # "nearest" | "stochastic" [one of nearest, stochastic]
process = "edm"  # "edm" | "vp_linear" (DDPM) | "vp_cosine" [one of edm, vp_linear, vp_cosine, vp_linear_continuous, vp_cosine_continuous]
prediction = "edm"  # "edm" (preconditioned) | "eps" | "x0" | "v" [one of edm, eps, x0, v]
channels = 8  # U-Net base width [min 1]
channel_mults = [1, 2]  # U-Net width multipliers per level [non-empty; each min 1]
n_evals = 3  # quality is measured at this many rounds (evenly spaced, the last round included) [min 1; max rounds]
n_eval = 256  # samples per model for the Frechet distance [min 2]
n_reference = 2000  # reference images (test split) for the Frechet distance [min 2]
sampler = "dpm_solver_pp_2m"  # the same ODE sampler for every model [in sampler_names()]
sample_steps = 10  # sampler steps, equal to the NFE for DPM-Solver++(2M) [min 1]
feature_steps = 600  # training steps of the feature classifier (cached) [min 1]
seeds = [0, 1]  # seeds (initialisation, partitions, training noise) [non-empty; distinct; each min 0]
vmap_chunk = 0  # models per vmap chunk in local training, to bound GPU memory; 0 trains all at once [min 0]
device = "auto"  # "auto" | "cpu" | "cuda" [one of auto, cpu, cuda]
backend = "inprocess"  # "inprocess" (vectorised, this process) | "flower" (the same rounds as Flower ServerApp and ClientApps on Ray) [one of inprocess, flower]

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from fedlib import compression as C
from fedlib import data as D
from fedlib import feddm as F
from fedlib import metrics as M
from fedlib.plots import image_grid, savefig, use_style
from fedlib.results import Run
from fedlib.utils import check_choice, resolve_device, seed_everything

use_style()
dev = resolve_device(device)
run = Run.start("02_feddm", globals())
t_start = time.perf_counter()

# %% [markdown]
# ## Data, partitions and the feature space of the quality metric

# %%
full_train, full_test = D.load_train_test(dataset, stand_in_data, stand_in_n=(n_train or 2048, n_reference))
train = full_train.stratified(n_train)  # digits (1437) stays whole; Fashion-MNIST on a CPU uses a subset
test = full_test.stratified(n_reference)
image_shape = tuple(train.x.shape[1:])
print(f"{train.name}: train {tuple(train.x.shape)}, reference (test) {tuple(test.x.shape)}")
# the feature classifier learns from the whole training split (cached, shared with other notebooks)
feature_net = M.feature_extractor(full_train, full_test, steps=feature_steps, device=dev)
print(f"feature classifier test accuracy {feature_net.test_accuracy:.3f}")
ref_stats = M.gaussian_stats(M.extract_features(feature_net, test.x))
fd_train_vs_test = M.classifier_fd(feature_net, train.x[: len(test)], ref_stats)
print(f"Frechet distance of real training images to the reference: {fd_train_vs_test:.3f} (the floor)")
run.metrics.update(feature_test_accuracy=feature_net.test_accuracy, fd_real_train_vs_reference=fd_train_vs_test)

# %%
labels = train.y.numpy()
partitions = {"iid": [D.iid_partition(len(train), n_clients, seed=s) for s in seeds],
              f"dirichlet {alpha:g}": [D.dirichlet_partition(labels, n_clients, alpha, seed=s) for s in seeds]}
fig, axes = plt.subplots(1, 2, figsize=(8, 2.4))
for ax, (name, parts) in zip(axes, partitions.items()):
    dist = D.label_distribution(labels, parts[0], train.n_classes)
    ax.imshow(dist, aspect="auto", cmap="Blues")
    ax.set(title=f"{name} (seed {seeds[0]})", xlabel="class", ylabel="client")
    ax.grid(False)
savefig(fig, "02_feddm_partitions")
for name, parts in partitions.items():
    print(name, "client sizes:", [[len(p) for p in ps] for ps in parts])

# %% [markdown]
# ## The model and what one update costs on the wire
# The byte counts below are the lengths of real encoded payloads of one client update, per bits.

# %%
# NBVAL_CHECK_OUTPUT
denoiser = F.make_denoiser(image_shape[0], channels, channel_mults, process=process, prediction=prediction).to(dev)
init = {s: {n: p.to(dev) for n, p in F.params_of(F.make_denoiser(image_shape[0], channels, channel_mults,
                                                                  process=process, prediction=prediction,
                                                                  seed=s)).items()}
        for s in seeds}
w0 = init[seeds[0]]
model_bytes = C.float32_bytes(w0)
print(f"U-Net: {sum(p.numel() for p in w0.values()):,} parameters in {len(w0)} tensors; float32 model {model_bytes:,} bytes")
update_bytes = {}
for b in sorted({32, 16, *bits}, reverse=True):
    _, update_bytes[b] = C.Quantizer(b, scheme, rounding).roundtrip({n: p.cpu() for n, p in w0.items()})
    print(f"{b:>2}-bit update ({scheme}): {update_bytes[b]:>9,} bytes  reduction {model_bytes / update_bytes[b]:.3f}x")
run.metrics.update(model_bytes=model_bytes, update_bytes=update_bytes)

# %% [markdown]
# ## Training every variant side by side

# %%
variants = F.make_variants(mu=mu, bits=bits, scheme=scheme, rounding=rounding, down_bits=down_bits, central=True)
x_train, y_train = train.x.to(dev), train.y.to(dev)
groups = F.build_groups(denoiser, x_train, y_train, partitions, variants, seeds, init)
eval_rounds = sorted({int(r) for r in np.linspace(rounds / n_evals, rounds, n_evals).round()})
final_samples = {}
evaluate = F.fd_evaluator(denoiser, feature_net, ref_stats, n_eval, sample_steps, sampler, image_shape,
                          seed=123, keep=final_samples)
print(f"{len(groups)} models ({len(variants)} variants x {len(partitions)} partitions x {len(seeds)} seeds, central once "
      f"per seed); evaluated at rounds {eval_rounds}")
seed_everything(seeds[0])
t0 = time.perf_counter()
# the same rounds, seeds and payloads on either backend; Flower only changes who runs them
history = F.run_feddm(denoiser, groups, rounds, local_steps=local_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                      eval_rounds=eval_rounds, evaluate=evaluate, seed=seeds[0], chunk_size=vmap_chunk or None,
                      backend=backend).history
train_time = time.perf_counter() - t0
hist = pd.DataFrame(history)
client_steps = sum(rounds * local_steps * g.clients.n_clients for g in groups if not g.variant.central)
print(f"trained and evaluated in {train_time:.0f} s ({client_steps} federated client-steps)")
run.metrics.update(train_and_eval_time_s=train_time, federated_client_steps=client_steps)

# %% [markdown]
# ## Quality against rounds and against bytes
# Frechet distance in the feature classifier's space (lower is better; **not comparable to FID**),
# mean over seeds; the grey line is real training images against the same reference.

# %%
mean = hist.groupby(["partition", "variant", "kind", "round"], sort=False)[["fd", "bytes_up", "bytes_down"]].mean().reset_index()
parts_fed = list(partitions)
fig, axes = plt.subplots(1, 2 * len(parts_fed), figsize=(4.2 * 2 * len(parts_fed), 3.2))
for j, pname in enumerate(parts_fed):
    for variant in [v.name for v in variants]:
        sub = mean[(mean["variant"] == variant) & (mean["partition"].isin([pname, "union"]))]
        style = dict(ls="--" if variant == "central" else "-", marker="o", ms=3, label=variant)
        axes[2 * j].plot(sub["round"], sub["fd"], **style)
        if variant != "central":
            axes[2 * j + 1].plot((sub["bytes_up"] + sub["bytes_down"]) / 2**20, sub["fd"], **style)
    axes[2 * j].set(title=f"{pname}: quality vs rounds", xlabel="round", ylabel="classifier FD (not FID)")
    axes[2 * j + 1].set(title=f"{pname}: quality vs bytes", xlabel="total MiB communicated (up + down)",
                        ylabel="classifier FD (not FID)")
    for ax in axes[2 * j: 2 * j + 2]:
        ax.axhline(fd_train_vs_test, color="grey", lw=0.8)
axes[0].legend(fontsize=7)
savefig(fig, "02_feddm_quality_vs_rounds_and_bytes")

# %% [markdown]
# ## The table
# Last round, mean over seeds. `up_reduction` = float32 uplink bytes / this variant's uplink bytes;
# `fd_ratio_vs_vanilla` = this FD / vanilla's FD on the same partition (the paper's "FID up to 1.75×").

# %%
table = F.summary_table(history, model_bytes)
pd.set_option("display.width", 160)
print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
run.metrics["table"] = table.to_dict(orient="records")
run.metrics["history"] = history

# %%
# NBVAL_CHECK_OUTPUT
# bytes are deterministic: the payload lengths do not depend on the values
print(table[["partition", "variant", "bytes_up", "bytes_down", "up_reduction"]].to_string(
    index=False, float_format=lambda v: f"{v:.4f}"))

# %%
show = [v.name for v in variants]
fig, axes = plt.subplots(len(parts_fed), len(show), figsize=(1.9 * len(show), 2.2 * len(parts_fed)), squeeze=False)
for i, pname in enumerate(parts_fed):
    for j, variant in enumerate(show):
        where = "union" if variant == "central" else pname
        image_grid(final_samples[f"{variant} | {where} | seed {seeds[0]}"][:36], nrow=6, ax=axes[i, j],
                   title=f"{variant}\n{where}")
savefig(fig, "02_feddm_samples")

# %% [markdown]
# ## Claims

# %%
tab = table.set_index(["partition", "variant"])
noniid = parts_fed[1]
up8 = update_bytes.get(8) or C.Quantizer(8, scheme, rounding).roundtrip({n: p.cpu() for n, p in w0.items()})[1]
red8 = model_bytes / up8
run.claim("8-bit updates cut the uplink by about 4x", "up to 4x (papers.md §2)",
          f"{red8:.3f}x (payload {up8:,} B vs float32 {model_bytes:,} B, scales and zero points counted)",
          red8 >= 3.9, note="sanity: bytes are the encoded payload's length", required=True)

quant_rows = table[(table["kind"] == "quant")]
worst = quant_rows.loc[quant_rows["fd_ratio_vs_vanilla"].idxmax()] if len(quant_rows) else None
q8 = quant_rows[quant_rows["variant"].str.startswith("quant 8-bit")]
if len(q8):
    r = q8["fd_ratio_vs_vanilla"].max()
    run.claim("8-bit quantised FedDM costs at most 1.75x in quality", "FID up to 1.75x worse",
              f"FD ratio vs vanilla {', '.join(f'{p}: {x:.2f}' for p, x in zip(q8['partition'], q8['fd_ratio_vs_vanilla']))}",
              r <= 1.75, note=f"classifier FD (not FID), {len(seeds)} seeds, {rounds} rounds; worst quant variant: "
              f"{worst['variant']} on {worst['partition']} at {worst['fd_ratio_vs_vanilla']:.2f}x; every model is still "
              f"far from the real-data floor ({fd_train_vs_test:.2f}), which makes ratios near 1 easy")

prox = table[(table["kind"] == "prox") & (table["partition"] == noniid)]
van = tab.loc[(noniid, "vanilla")]
if len(prox):
    best = prox.loc[prox["fd"].idxmin()]
    gain = van["fd"] - best["fd"]
    spread = float(np.nan_to_num(max(van["fd_std"], best["fd_std"])))  # 0 with one seed: no spread known
    all_prox = ", ".join(f"{v}: {f:.3f}" for v, f in zip(prox["variant"], prox["fd"]))
    run.claim("the proximal term helps under non-IID data", "improves convergence (non-IID)",
              f"{noniid}: vanilla FD {van['fd']:.3f} ± {van['fd_std']:.3f}, best prox ({best['variant']}) "
              f"{best['fd']:.3f} ± {best['fd_std']:.3f}; all prox: {all_prox}",
              bool(gain > spread) if gain > 0 else False,
              note=(f"best of {len(prox)} mu values beats vanilla by {gain:.3f}, more than the seed std {spread:.3f} "
                    "(picking the best mu favours prox)" if gain > spread else
                    f"prox is better by {gain:.3f}, within the seed spread {spread:.3f}: not shown at this scale"
                    if gain > 0 else f"prox is worse by {-gain:.3f} at this scale"))

cen = table[table["kind"] == "central"]
if len(cen):
    run.claim("central training on the union is an upper bound", "(baseline)",
              f"central FD {cen['fd'].iloc[0]:.3f}; vanilla iid {tab.loc[('iid', 'vanilla')]['fd']:.3f}, "
              f"{noniid} {van['fd']:.3f}", None, note="context, not a paper claim")
run.metrics["wall_time_before_finish_s"] = time.perf_counter() - t_start
run.claims_frame()

# %%
print(run.finish(device=str(dev)))
