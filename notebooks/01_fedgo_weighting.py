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
# # 01 · FedGO: which clients should the server's teacher listen to?
#
# **The setting** (papers.md §1.1). K clients train a shared model locally; the server averages them
# (FedAvg) and then *distils* an ensemble of the client models into the average, on unlabeled server
# data. The ensemble's pseudo-label is `q(y|x) = Σ_k a_k(x) softmax(f_k(x))`; the methods differ only in
# the weights `a_k(x)`: uniform (FedDF), entropy, variance, domain-aware (DaFKD), ...
#
# **The paper's claim** (FedGO, Jang, Park & Lee, ICML 2025; papers.md §1.2). The best ensemble weighs
# client k at x by the posterior that x came from client k, `n_k p_k(x) / Σ_j n_j p_j(x)`. A
# discriminator `D_k` trained to tell client k's data from samples of a shared generator `G` has odds
# `D_k/(1-D_k) = p_k/p_G`, so `a_k = softmax_k(l_k + log n_k)` (l_k = D_k's logit) estimates it. Claims:
# (a) FedGO beats every baseline under strong heterogeneity (α = 0.05, 0.1); (b) its teacher (the
# weighted ensemble) is more accurate than the uniform one; (c) the one-off extra cost (G sent down
# once, each D_k sent up once, a few discriminator epochs) is negligible.
#
# **How this notebook tests it.** (1) A 2-D toy where the client densities are known exactly, so the
# oracle weights exist; (2) the main table on the real 8×8 digits with the FedGO split (half of each
# class unlabeled at the server, the other half split by Dirichlet(α) over 10 clients), 3 seeds, with a
# pre-existing server dataset and data-free (server data = samples of the server's GAN); (3) teacher
# quality; (4) overhead; (5) an explorer; (6) the claims table.
#
# **Our scale, stated honestly.** The paper uses CIFAR-10/100 and ImageNet-100 with ResNets for 100
# rounds. Here: digits (1437 training images → ~720 on clients, ~720 unlabeled at the server, 360 test),
# a 3.9k-parameter GroupNorm CNN, a few rounds of one local epoch, a 2-layer conv GAN. All methods of
# one round — and all α and seeds — train as **one vectorised computation** (`torch.func.vmap`): every
# method keeps its own global model, but their clients' local training is the same computation on
# different parameters. Choices papers.md leaves open (ours): SGD(0.05, momentum 0.9) locally, Adam(1e-3)
# for distillation on probability-averaged pseudo-labels at T = 1, FedProx μ = 0.01, discriminators
# trained with SGD for `disc_epochs` epochs, DENSE's generator conditioned on a one-hot label.

# %% tags=["parameters"]
dataset = "digits"  # digits | fashion_mnist | mnist | cifar10 | cifar100 (stand-in data when absent) [one of digits, fashion_mnist, mnist, cifar10, cifar100]
max_train = 0  # keep a stratified subset of this many training images; 0 keeps all [min 0]
max_test = 0  # keep a stratified subset of this many test images; 0 keeps all [min 0]
classifier = "small_cnn"  # small_cnn (8x8 / 28x28) | resnet (32x32) [one of small_cnn, resnet]
width = 8  # classifier width (small_cnn channels; resnet base width) [min 1]
n_clients = 10  # K [min 1; max train_size(dataset, max_train) // 8]
alphas = [0.05, 0.1, 1.0]  # Dirichlet concentrations of the client split [non-empty; each > 0]
seeds = [0, 1, 2]  # one federated problem per (alpha, seed) [non-empty; distinct; each min 0]
rounds = 5  # communication rounds [min 1]
local_epochs = 1  # E, local epochs per round [min 1]
lr = 0.05  # local SGD learning rate (momentum 0.9) [> 0]
batch_size = 32  # local mini-batch size [min 1]
mu = 0.01  # FedProx proximal coefficient [min 0]
distill_steps = 20  # server distillation steps per round (Adam) [min 0]
distill_lr = 0.001  # server distillation learning rate [> 0]
distill_batch = 64  # server distillation batch size [min 1]
temperature = 1.0  # distillation temperature [> 0]
methods = ["fedavg", "fedprox", "feddf", "entropy", "variance", "dafkd", "fedgo"]  # pre-existing server data [non-empty; distinct; each in method_names()]
data_free_methods = ["feddf", "entropy", "variance", "dafkd", "fedgo", "fedka", "dense"]  # data-free scenario [distinct; each in method_names()]
scenario = "both"  # pre | data_free | both [one of pre, data_free, both]
gan_steps = 150  # server GAN training steps (once) [min 0]
gan_width = 16  # server generator width (channels of its 4x4 map) [min 1]
disc_epochs = 3  # E_d, client discriminator epochs (once) [min 1]
dense_steps = 10  # DENSE generator/student steps per round [min 0]
toy_mixture = "ring"  # 2-D mixture of the toy figure (ring | grid) [one of ring, grid]
toy_clients = 4  # clients of the toy figure [min 1; max 50]
toy_alpha = 0.1  # Dirichlet alpha of the toy figure [> 0]
toy_epochs = 20  # local epochs of the toy clients (one round) [min 1]
toy_disc_epochs = 30  # discriminator epochs of the toy clients [min 1]
toy_distill_steps = 300  # distillation steps of the toy server models [min 0]
device = "auto"  # auto | cpu | cuda [one of auto, cpu, cuda]
client_chunk = 0  # models per vmap chunk, to bound memory for big models; 0 means auto: 128 on CPU, all on GPU [min 0]
cpu_threads = 1  # torch CPU threads; 1 is fastest for these tiny models on a shared 2-core CPU; 0 keeps torch's [min 0]
backend = "inprocess"  # inprocess (vectorised, this process) | flower (the same rounds as Flower ServerApp and ClientApps on Ray) [one of inprocess, flower]

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fedlib import data as fdata
from fedlib import distill, fedgo, studies
from fedlib import federated as fl
from fedlib import models
from fedlib.plots import savefig, use_style
from fedlib.results import Run
from fedlib.utils import check_choice, resolve_device, seed_everything

use_style()
check_choice("scenario", scenario, ("pre", "data_free", "both"))
dev = resolve_device(device)
if cpu_threads:
    torch.set_num_threads(cpu_threads)
g = seed_everything(seeds[0])
run = Run.start("01_fedgo_weighting", globals(), seed=seeds)
t_start = time.perf_counter()

# %% [markdown]
# ## 1 · The toy figure: weights, pseudo-labels and decision boundaries on 2-D data
# A mixture's components are the classes; a Dirichlet(α) split gives each client a few of them, so the
# client densities `p_k(x) = Σ_c π_kc N(x; μ_c, s²I)` are known exactly and so are the oracle weights.
# Clients train 2-D MLPs for one round; the server's unlabeled data are fresh mixture samples; `G` is
# a given broad Gaussian (the protocol allows an off-the-shelf G), against which every client trains its
# discriminator. Top row: the weight of client 0 under each rule (its data in white). Bottom row: the
# server model distilled from each rule's pseudo-labels.

# %%
toy = studies.toy_study(toy_mixture, n_clients=toy_clients, alpha=toy_alpha, local_epochs=toy_epochs,
                  disc_epochs=toy_disc_epochs, distill_steps=toy_distill_steps, seed=seeds[0])
rules = toy.rules
fig, axes = plt.subplots(2, len(rules), figsize=(2.3 * len(rules), 4.8), sharex=True, sharey=True)
gs, ext = toy.grid_size, toy.grid_extent
own = toy.x[torch.as_tensor(toy.parts[0])]
for j, rule in enumerate(rules):
    axes[0, j].imshow(toy.weights_grid[rule][0].reshape(gs, gs), origin="lower", extent=ext, vmin=0, vmax=1)
    axes[0, j].scatter(own[:, 0], own[:, 1], s=1, c="w", alpha=0.3)
    axes[0, j].set_title(f"{rule}\nTV to oracle {toy.weight_tv_to_oracle[rule]:.2f}")
    axes[1, j].imshow(toy.grid_prediction[rule].reshape(gs, gs), origin="lower", extent=ext, cmap="tab10",
                      vmin=0, vmax=9, alpha=0.6)
    axes[1, j].scatter(toy.server_x[:, 0], toy.server_x[:, 1], c=toy.server_y, cmap="tab10", vmin=0,
                       vmax=9, s=1)
    axes[1, j].set_title(f"server acc {toy.server_test_accuracy[rule]:.3f}")
    for ax in axes[:, j]:
        ax.grid(False)
axes[0, 0].set_ylabel("weight of client 0")
axes[1, 0].set_ylabel("distilled server model")
fig.suptitle(f"{toy_mixture} mixture, {toy_clients} clients, Dirichlet({toy_alpha}); FedAvg alone: "
             f"{toy.fedavg_test_accuracy:.3f}", y=1.02)
savefig(fig, "01_toy_weights")
toy_table = pd.DataFrame({"weight TV to oracle": toy.weight_tv_to_oracle,
                          "pseudo-label error": toy.pseudo_label_error,
                          "disagreement with oracle teacher": toy.disagreement_with_oracle,
                          "distilled server acc": toy.server_test_accuracy}).round(4)
run.metrics["toy"] = toy_table.to_dict()
toy_table

# %% [markdown]
# ## 2 · Data, split and the FedGO protocol's one-off part
# The server trains a GAN on its unlabeled half (once per seed), sends G to the clients, and every
# client trains its discriminator against G samples (all clients of all α of a seed in one vmap).

# %%
train, test = fdata.load_train_test(dataset, stand_in_n=(max_train or 2000, max_test or 2000))
train, test = train.stratified(max_train), test.stratified(max_test)
shape = tuple(train.x.shape[1:])
clf = models.make_classifier(classifier, shape, train.n_classes, width=width).to(dev)
setups = studies.fedgo_setups(train, test, n_clients=n_clients, alphas=alphas, seeds=seeds, gan_steps=gan_steps,
                        disc_epochs=disc_epochs, gen_width=gan_width, dense="dense" in data_free_methods,
                        generator=g, device=dev)
G0 = setups.generators[seeds[0]]
a0 = setups.client_indices[(alphas[0], seeds[0])]
server0 = setups.server_indices[(alphas[0], seeds[0])]

# %%
# NBVAL_CHECK_OUTPUT
print(f"{dataset}: train {len(train)}, test {len(test)}, sample shape {shape}, classes {train.n_classes}")
print(f"server (unlabeled) {len(server0)}, on clients {sum(len(i) for i in a0)}")
print(f"classifier {classifier}: {models.n_params(clf)} parameters; generator {models.n_params(G0)}; "
      f"discriminator {models.n_params(setups.discriminator)}")
print(f"problems (alpha, seed): {len(setups.keys)}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
real = train.x[torch.as_tensor(server0[:32])].cpu()
from fedlib.plots import image_grid  # noqa: E402

image_grid(real, nrow=8, ax=axes[0], title="server data (real, unlabeled)")
image_grid(fedgo.sample(G0, 32, torch.Generator().manual_seed(0)).cpu(), nrow=8, ax=axes[1],
           title=f"G samples ({gan_steps} GAN steps): data-free server data")
savefig(fig, "01_generator_samples")
sizes = pd.DataFrame({f"alpha={a}": [len(i) for i in setups.client_indices[(a, seeds[0])]] for a in alphas},
                     index=[f"client {k}" for k in range(n_clients)]).T
sizes

# %% [markdown]
# ## 3 · The main table: server test accuracy after the last round
# Every method starts from the same initial model. FedAvg and FedProx only average; the others
# distil their teacher into the average every round. "Central" trains one model on all client data
# (the union; the same for every α) for `rounds × local_epochs` epochs: an upper reference.

# %%
t0 = time.perf_counter()
# the same rounds, seeds and partitions on either backend; Flower only changes who runs them
common = dict(backend=backend, rounds=rounds, local_epochs=local_epochs, lr=lr, batch_size=batch_size, mu=mu,
              distill_steps=distill_steps, distill_lr=distill_lr, distill_batch=distill_batch,
              temperature=temperature, dense_steps=dense_steps, generator=g, init=fl.get_params(clf), progress=tqdm,
              chunk_size=client_chunk or "auto", predict_batch=256 if client_chunk else 1024)
results = {}
if scenario in ("pre", "both"):
    results["pre-existing"] = distill.run_rounds(clf, setups.pre, methods, **common)
if scenario in ("data_free", "both"):
    results["data-free"] = distill.run_rounds(clf, setups.data_free, data_free_methods, **common)
seconds_rounds = time.perf_counter() - t0
union = [torch.as_tensor(np.concatenate(setups.client_indices[(alphas[0], s)])) for s in seeds]
central = distill.central_training(clf, [train.x[i.to(dev)] for i in union], [train.y[i.to(dev)] for i in union],
                             epochs=rounds * local_epochs, lr=lr, batch_size=batch_size, generator=g,
                             init=fl.get_params(clf), chunk_size=client_chunk or "auto")
central_acc = fl.accuracy(fl.predict(fl.functional(clf), central, test.x, stacked=True), test.y).cpu()
print(f"federated rounds: {seconds_rounds:.1f} s; central accuracy {central_acc.mean():.3f} ± {central_acc.std():.3f}")

# %%
def acc_cube(res):
    """[alpha, seed, method, round] from the problem-major [S, M, R] tensor."""
    return res.accuracy.reshape(len(seeds), len(alphas), len(res.methods), rounds).transpose(0, 1)


rows = {}
for scen, res in results.items():
    cube = acc_cube(res)[..., -1]  # [alpha, seed, method]
    for j, m in enumerate(res.methods):
        rows[(scen, m)] = {f"alpha={a}": f"{cube[i, :, j].mean():.3f} ± {cube[i, :, j].std():.3f}"
                           for i, a in enumerate(alphas)}
rows[("reference", "central")] = {f"alpha={a}": f"{central_acc.mean():.3f} ± {central_acc.std():.3f}" for a in alphas}
main_table = pd.DataFrame(rows).T
main_table.index.names = ["server data", "method"]
run.metrics["accuracy"] = {f"{s}/{m}": v for (s, m), v in rows.items()}
run.metrics["accuracy_mean"] = {scen: {m: {str(a): float(acc_cube(res)[i, :, j, -1].mean()) for i, a in enumerate(alphas)}
                                       for j, m in enumerate(res.methods)} for scen, res in results.items()}
run.metrics["central_accuracy"] = central_acc.tolist()
main_table

# %%
colour = {m: f"C{i}" for i, m in enumerate(distill.METHODS)}
fig, axes = plt.subplots(len(results), len(alphas), figsize=(3.4 * len(alphas), 2.9 * len(results)),
                         squeeze=False, sharey=True, constrained_layout=True)
for r_i, (scen, res) in enumerate(results.items()):
    cube = acc_cube(res)
    for i, a in enumerate(alphas):
        ax = axes[r_i, i]
        for j, m in enumerate(res.methods):
            ax.plot(range(1, rounds + 1), cube[i, :, j].mean(0), marker="o", ms=3, label=m, color=colour[m],
                    lw=2.4 if m == "fedgo" else 1.2)
        if scen == "data-free" and "pre-existing" in results:  # FedAvg/FedProx use no server data
            pre = results["pre-existing"]
            for m in distill.aggregation_only():
                if m in pre.methods:
                    ax.plot(range(1, rounds + 1), acc_cube(pre)[i, :, pre.methods.index(m)].mean(0), ls="--",
                            color=colour[m], lw=1, label=f"{m} (no server data)")
        ax.axhline(float(central_acc.mean()), color="k", ls=":", lw=1, label="central")
        ax.set_title(f"{scen}, α={a}")
        ax.set_xlabel("round")
    axes[r_i, 0].set_ylabel("server test accuracy")
    axes[r_i, -1].legend(fontsize=6, loc="lower right")
savefig(fig, "01_accuracy_rounds")

# %% [markdown]
# ## 4 · Teacher quality
# Left: accuracy of each rule's weighted ensemble (the pseudo-labels) on the server data, against the
# true labels the server never sees, averaged over rounds and seeds. Right: on the 2-D toy, the mean
# total-variation distance of each rule's weights from the oracle's (0 = the optimal ensemble).

# %%
teacher = {}
if "pre-existing" in results:
    res = results["pre-existing"]
    tc = res.teacher_accuracy.reshape(len(seeds), len(alphas), len(res.methods), rounds).transpose(0, 1)
    for j, m in enumerate(res.methods):
        if m in distill.aggregation_only():
            continue
        teacher[m] = {f"alpha={a}": float(tc[i, :, j].mean()) for i, a in enumerate(alphas)}
teacher_table = pd.DataFrame(teacher).T.round(3)
run.metrics["teacher_accuracy"] = teacher
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
teacher_table.plot.bar(ax=axes[0], rot=0)
axes[0].set_ylabel("teacher accuracy on server data")
axes[0].set_ylim(0, 1)
pd.Series(toy.weight_tv_to_oracle).plot.bar(ax=axes[1], rot=0, color="C2")
axes[1].set_ylabel("TV distance to oracle weights (toy)")
savefig(fig, "01_teacher_quality")
teacher_table

# %% [markdown]
# ## 5 · Overhead of FedGO
# Bytes: G down to each client once plus each D_k up once, against the classifier down and up every
# round. Client compute in FLOPs (counted by `torch.utils.flop_counter`): `disc_epochs` epochs of
# discriminator training (a real and a G sample per step, plus drawing the G sample) against
# `rounds × local_epochs` epochs of local training. Also shown: the same models over the paper's
# 100 rounds.

# %%
x1 = train.x[:8]
Dm = setups.discriminator
with torch.no_grad():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        G0(torch.randn(8, G0.z_dim, device=dev))
gen_fwd = fc.get_total_flops() / 8
n_k = [len(i) for i in a0]
over_args = dict(classifier_bytes=fl.state_bytes(clf), generator_bytes=fl.state_bytes(G0),
                 discriminator_bytes=fl.state_bytes(Dm), n_clients=n_clients, n_k=n_k, local_epochs=local_epochs,
                 disc_epochs=disc_epochs, clf_flops=fl.train_flops_per_sample(clf, x1),
                 disc_flops=fl.train_flops_per_sample(Dm, x1), gen_forward_flops=gen_fwd)
overhead = fedgo.fedgo_overhead(rounds=rounds, **over_args)
overhead_100 = fedgo.fedgo_overhead(rounds=100, **over_args)
ledger = fl.CommLedger()
ledger.log(fl.SETUP, "down", "generator", fl.state_bytes(G0), copies=n_clients)
ledger.log(fl.SETUP, "up", "discriminator", fl.state_bytes(Dm), copies=n_clients)
for r in range(rounds):
    ledger.log(r, "down", "model", fl.state_bytes(clf), copies=n_clients)
    ledger.log(r, "up", "model", fl.state_bytes(clf), copies=n_clients)
run.metrics["overhead"] = {"this_run": overhead, "at_100_rounds": overhead_100,
                           "seconds": {**setups.seconds, "rounds_all_methods": seconds_rounds}}
overhead_table = pd.DataFrame({f"this run ({rounds} rounds)": overhead, "same models, 100 rounds": overhead_100})

# %%
# NBVAL_CHECK_OUTPUT
print("bytes per round (setup = -1):", ledger.per_round())
print(overhead_table.loc[["extra_bytes", "training_bytes", "bytes_pct"]].round(2).to_string())

# %%
overhead_table.round(2)

# %% [markdown]
# ## 6 · Explorer
# Pick a server-data scenario, α and method; the slider moves the round. Curves are seed means with a
# ±1 std band (stored results; nothing is recomputed).

# %%
store = {scen: {"methods": res.methods, "acc": acc_cube(res).numpy()} for scen, res in results.items()}


def explore(scenario_name=next(iter(store)), alpha=alphas[0], method="fedgo", round_=rounds):
    s = store[scenario_name]
    if method not in s["methods"]:
        print(f"{method} was not run in scenario {scenario_name}; choose one of {s['methods']}")
        return
    i, j = alphas.index(alpha), s["methods"].index(method)
    curve = s["acc"][i, :, j]
    fig, ax = plt.subplots(figsize=(5, 3))
    xr = np.arange(1, rounds + 1)
    ax.plot(xr, curve.mean(0), marker="o")
    ax.fill_between(xr, curve.mean(0) - curve.std(0), curve.mean(0) + curve.std(0), alpha=0.2)
    ax.axvline(round_, color="k", ls=":")
    ax.set_title(f"{method}, {scenario_name}, α={alpha}: round {round_} accuracy {curve[:, round_ - 1].mean():.3f}")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    plt.show()


try:
    import ipywidgets as widgets

    all_methods = sorted({m for s in store.values() for m in s["methods"]})
    widgets.interact(explore, scenario_name=list(store), alpha=alphas, method=all_methods,
                     round_=widgets.IntSlider(min=1, max=rounds, value=rounds))
except ImportError:
    explore()

# %% [markdown]
# ## 7 · Claims
# Computed from this run's numbers. FedGO "beats every baseline" means its seed-mean accuracy after
# the last round is above every other method's (FedAvg, FedProx and the other weightings; in the
# data-free scenario also FedKA and DENSE). Claims that
# may honestly fail at this scale are not required; the required one is a sanity check of the library
# (the vectorised client round equals the sequential reference).

# %%
xc, yc = train.x[:200], train.y[:200]
check = fl.pack_clients(xc, yc, fdata.dirichlet_partition(yc.cpu().numpy(), 4, 0.5, seed=0))
kw = dict(epochs=1, lr=lr, momentum=0.9, batch_size=batch_size, mu=mu)
vec = fl.local_train(clf, fl.get_params(clf), check, generator=torch.Generator().manual_seed(0), **kw)
seq = fl.local_train(clf, fl.get_params(clf), check, generator=torch.Generator().manual_seed(0), vectorised=False, **kw)
max_diff = max((vec[n] - seq[n]).abs().max().item() for n in vec)
# relative L2 error: ~1e-7 for the digits CNN; the paper-scale ResNet under torch's deterministic CPU
# kernels (seed_everything) drifts to ~1e-4 by float reassociation alone, hence the 1e-3 bound
rel_err = (sum(((vec[n] - seq[n]) ** 2).sum() for n in vec) / sum((seq[n] ** 2).sum() for n in seq)).sqrt().item()
run.claim("vectorised client round equals the sequential reference", "(library sanity)",
          f"max |diff| = {max_diff:.1e}, relative L2 error {rel_err:.1e}", rel_err < 1e-3, required=True)

for scen, res in results.items():
    mean = {m: acc_cube(res)[:, :, j, -1].mean(1) for j, m in enumerate(res.methods)}  # [alpha]
    if scen == "data-free" and "pre-existing" in results:  # FedAvg/FedProx are baselines here too
        pre = results["pre-existing"]
        mean.update({m: acc_cube(pre)[:, :, pre.methods.index(m), -1].mean(1) for m in distill.aggregation_only()
                     if m in pre.methods})
    if "fedgo" not in mean:
        continue
    for i, a in enumerate(alphas):
        if a not in (0.05, 0.1):
            continue
        best_other = max((m for m in mean if m != "fedgo"), key=lambda m: float(mean[m][i]))
        gap = float(mean["fedgo"][i] - mean[best_other][i])
        run.claim(f"FedGO beats every baseline, {scen} server data, alpha={a}",
                  "yes (CIFAR-10/100, ImageNet-100, 100 rounds)",
                  f"FedGO {float(mean['fedgo'][i]):.3f} vs best other ({best_other}) {float(mean[best_other][i]):.3f}",
                  gap > 0, note=f"digits, {rounds} rounds, {len(seeds)} seeds; gap {gap:+.3f}")

if "fedgo" in teacher and "feddf" in teacher:
    hetero = [f"alpha={a}" for a in alphas if a in (0.05, 0.1)] or [f"alpha={a}" for a in alphas]
    fg = np.mean([teacher["fedgo"][k] for k in hetero])
    un = np.mean([teacher["feddf"][k] for k in hetero])
    run.claim("FedGO's teacher is more accurate than the uniform (FedDF) teacher", "yes",
              f"{fg:.3f} vs {un:.3f} on the server data ({', '.join(hetero)})", fg > un,
              note="mean over rounds and seeds")
run.claim("FedGO's weights are closer to the oracle's than uniform weights (2-D toy)", "yes (toy figure)",
          f"TV {toy.weight_tv_to_oracle['fedgo']:.3f} vs {toy.weight_tv_to_oracle['uniform']:.3f}",
          toy.weight_tv_to_oracle["fedgo"] < toy.weight_tv_to_oracle["uniform"])
ok = overhead["bytes_pct"] < 5 and overhead["flops_pct"] < 5
run.claim("FedGO's extra communication and client compute are negligible (< 5 %)", "negligible",
          f"bytes {overhead['bytes_pct']:.1f} %, client FLOPs {overhead['flops_pct']:.1f} % "
          f"(100 rounds: {overhead_100['bytes_pct']:.1f} %, {overhead_100['flops_pct']:.1f} %)", ok,
          note="this run is only a few rounds of a tiny classifier; the one-off cost shrinks with rounds "
               "and classifier size")
run.metrics["wall_time_s"] = time.perf_counter() - t_start
run.claims_frame()

# %%
run.finish()
