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
# **The setting** (docs/methods.md §1.1). K clients train a shared model locally; the server averages
# them (FedAvg) and then *distils* an ensemble of the client models into the average, on unlabeled
# server data. The ensemble's pseudo-label is `q(y|x) = Σ_k a_k(x) softmax(f_k(x))`; the methods differ
# only in the weights `a_k(x)`: uniform (FedDF), entropy, variance, domain-aware (DaFKD), ...
#
# **The paper's claims** (FedGO, Jang, Park & Lee, ICML 2025; docs/methods.md §1.2). The best ensemble
# weighs client k at x by the posterior that x came from client k, `n_k p_k(x) / Σ_j n_j p_j(x)`. A
# discriminator `D_k` trained to tell client k's data from samples of a shared generator `G` has odds
# `D_k/(1-D_k) = p_k/p_G`, so `a_k = softmax_k(l_k + log n_k)` (l_k = D_k's logit) estimates it.
# (a) FedGO beats every baseline under strong heterogeneity (α = 0.05, 0.1), with a pre-existing server
# dataset and data-free; (b) its teacher (the weighted ensemble) is more accurate than the uniform one;
# (c) the one-off extra cost (G sent down once, each D_k up once, a few discriminator epochs) is
# negligible.
#
# **How this notebook tests them.** §1 the rule on a handful of points; §2 a 2-D toy where the oracle
# weights are known (3 seeds); §3 the protocol on the real 8×8 digits (half of each class unlabeled at
# the server, the rest split by Dirichlet(α)) with its hyper-parameters *searched* on validation
# quantities of a search seed, never on test accuracy (§3a: the `regime` set also chooses its dataset, K
# and α there, where FedAvg stays farthest from central training); §4 the main table for **two client
# counts (10 and 20) × 3 seeds**, in three server-data scenarios named by what the server holds, and §4b
# FedAvg's gap to central training, which says where the task is too easy for the claim; §5 why a better
# teacher does (or does not) give a better server model; §6 data-free, with its budget sweep; §7 the
# overhead, measured here and computed at the paper's model sizes; §8 an explorer; §9 the claims, each
# decided by the noise rule over seeds (`fedlib.results`), with a verdict and its reason.
#
# **Our scale, stated honestly.** The paper uses CIFAR-10/100 and ImageNet-100 with ResNet-18s for 100
# rounds. Here: digits (1437 training images → ~720 on the clients, ~720 unlabeled at the server, 360
# test), a GroupNorm CNN of about four thousand parameters, a few rounds of one local epoch, a 2-layer conv GAN. All
# methods, α, client counts and seeds of one round train as **one vectorised computation**
# (`torch.func.vmap`). Our choices where docs/methods.md is silent: SGD(0.05, momentum 0.9) locally;
# server distillation by Adam for a few *epochs* over the server data every round, cosine learning
# rate, keeping the epoch whose held-out KL to the teacher is lowest (a fifth of the server data held
# out, labelled only by the teacher); probability-averaged pseudo-labels at T = 1; FedProx μ = 0.01;
# discriminators trained with SGD; DENSE's generator conditioned on a one-hot label; and the truly
# data-free G of §6.

# %% tags=["parameters"]
dataset = "digits"  # digits | fashion_mnist | mnist | cifar10 | cifar100 (stand-in data when absent) [one of digits, fashion_mnist, mnist, cifar10, cifar100]
max_train = 0  # keep a stratified subset of this many training images; 0 keeps all [min 0]
max_test = 0  # keep a stratified subset of this many test images; 0 keeps all [min 0]
classifier = "small_cnn"  # small_cnn (8x8 / 28x28) | resnet (32x32) [one of small_cnn, resnet]
width = 8  # classifier width (small_cnn channels; resnet base width) [min 1; max 1024]
client_counts = [10, 20]  # K, one federated problem per client count (claims must hold at every one) [non-empty; distinct; each min 1; each max train_size(dataset, max_train) // 8]
alphas = [0.05, 0.1]  # Dirichlet concentrations of the client split [non-empty; distinct; each > 0]
seeds = [0, 1, 2]  # one federated problem per (K, alpha, seed); claims are decided over these [non-empty; distinct; each min 0; each max 2**31 - 1]
search_seed = 100  # the seed of every hyper-parameter search (never a claim seed) [min 0; max 2**31 - 1]
min_headroom = 0.05  # FedAvg's gap to central training (accuracy) below which, beyond the noise rule, FedGO's "beats every baseline" is not applicable at that K and alpha (§4b) [min 0; max 1]
regime_datasets = []  # §3a: datasets of the regime search (FedAvg's gap to central training on the search seed); empty: no search (the regime set searches) [distinct; each one of digits, fashion_mnist, mnist, cifar10, cifar100]
regime_client_counts = [5, 10, 20]  # §3a: client counts of the regime search [non-empty; distinct; each min 2; each max 1000]
regime_alphas = [0.05, 0.1, 0.5]  # §3a: Dirichlet concentrations of the regime search [non-empty; distinct; each > 0]
regime_min_client_data = 200  # §3a: a cell is eligible only if its median client holds at least this many images (the data its discriminator learns from; no offline dataset has more than 60000 training images) [min 1; max 60000]
rounds = 5  # communication rounds [min 1; max 10000]
local_epochs = 1  # E, local epochs per round [min 1; max 500]
lr = 0.05  # local SGD learning rate (momentum 0.9) [> 0]
batch_size = 32  # local mini-batch size [min 1; max 10000]
mu = 0.01  # FedProx proximal coefficient [min 0]
distill_epochs = 3  # server distillation epochs over the server data per round; 0 uses distill_steps [min 0; max 1000]
distill_steps = 20  # server distillation steps per round when distill_epochs is 0 (the old fixed budget) [min 0; max 2000]
distill_lr_grid = [0.003]  # server distillation learning rates searched on the held-out KL (one value: no search; the long set's search chose 0.003) [non-empty; each > 0]
distill_val = 0.2  # fraction of the server data held out (labelled by the teacher only) to keep the best epoch [min 0; < 1]
distill_batch = 64  # server distillation batch size [min 1; max 10000]
temperature = 1.0  # distillation temperature [> 0]
methods = ["fedavg", "fedprox", "feddf", "entropy", "variance", "dafkd", "fedgo"]  # pre-existing server data [non-empty; distinct; each in method_names()]
data_free_methods = ["feddf", "entropy", "variance", "dafkd", "fedgo", "fedka", "dense", "fedgen", "fedgen_noreg", "fedftg"]  # GAN-sample and data-free scenarios [distinct; each in method_names()]
oneshot_methods = ["feddf", "fedgo", "dense", "coboosting"]  # one-shot section: one round without server data (empty: skipped) [distinct; each in method_names()]
oneshot_local_epochs = 5  # local epochs of the one-shot round (one-shot FL trains its clients once, longer) [min 1; max 500]
scenarios = ["pre", "data_free"]  # pre (real server half) | gan_samples (samples of a GAN trained on it) | data_free (no server data) [non-empty; distinct; each one of pre, gan_samples, data_free]
gan_steps = 150  # server GAN training steps (once per seed) [min 0; max 500000]
gan_width_grid = [32]  # server generator widths searched with the discriminator epochs (one value: no search; the long set's search chose 32) [non-empty; each min 1; each max 1024]
disc_epoch_grid = [3, 10, 30]  # E_d, client discriminator epochs searched on the teacher's held-out accuracy (the long grid goes to 60) [non-empty; distinct; each min 1; each max 6000]
free_gen_steps = 50  # data-free G: steps against the warm-up ensemble (the long set sweeps it) [min 1; max 200000]
warmup_epochs = 1  # data-free G: local epochs of the warm-up round whose ensemble G is trained against [min 1; max 500]
dense_steps = 10  # DENSE generator/student steps per round [min 0; max 20000]
fedgen_steps = 10  # FedGen generator steps per round (the fedlib default follows the authors with 200 at lr 3e-4, about 26 s more per K 20 problem here) [min 1; max 20000]
fedgen_lr = 0.01  # FedGen generator learning rate (3e-4 of the authors needs their step count) [> 0]
fedgen_weight = 1.0  # FedGen client term weight in round 0, decayed by 0.98 a round (10 of the authors collapses our clients at lr 0.05) [min 0]
fedftg_generator_update = "summed"  # FedFTG generator update: summed (the fedlib default) or per_client (as the authors, about 3x slower here) [one of per_client, summed]
coboosting_g_steps = 2  # Co-Boosting iterations of the fresh generator of each epoch (the fedlib default is 5) [min 1; max 1000]
coboosting_student = "pool"  # Co-Boosting distillation: pool (as the authors, SGD over every sample so far at T 4) or batch (one Adam step, about 3 s less per K 20 problem) [one of pool, batch]
sweep_free_steps = []  # data-free sweep: G training budgets (empty: no sweep; the long set sweeps) [each min 1; each max 40000]
toy_mixture = "ring"  # 2-D mixture of the toy figure (ring | grid) [one of ring, grid]
toy_clients = 4  # clients of the toy figure [min 1; max 50]
toy_alpha = 0.1  # Dirichlet alpha of the toy figure [> 0]
toy_seeds = [0, 1, 2]  # toy problems; the weights-vs-oracle claim is decided over these [non-empty; distinct; each min 0; each max 2**31 - 1]
toy_epochs = 20  # local epochs of the toy clients (one round) [min 1; max 2000]
toy_disc_epochs = 30  # discriminator epochs of the toy clients [min 1; max 3000]
toy_distill_steps = 300  # distillation steps of the toy server models [min 0; max 30000]
device = "auto"  # auto | cpu | cuda [one of auto, cpu, cuda]
cpu_threads = 1  # torch CPU threads of this kernel (1: the committed quick and long runs; the regime set uses both cores of this machine, alone on it; 0 leaves the runner's --threads) [min 0; max 256]
client_chunk = 0  # models per vmap chunk, to bound memory for big models; 0 means auto: 128 on CPU, all on GPU [min 0]
backend = "inprocess"  # inprocess (vectorised, this process) | flower (the same rounds as Flower ServerApp and ClientApps on Ray) [one of inprocess, flower]

# %%
import dataclasses
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from tqdm.auto import tqdm

from fedlib import data as fdata
from fedlib import backends, datafree, distill, fedgo, metrics, models, plots, studies
from fedlib import federated as fl
from fedlib.plots import image_grid, savefig, use_style
from fedlib.results import Run, save_explorer
from fedlib.utils import resolve_device, seed_everything
from fedlib.verdicts import beats_every, compare, compare_to, per_seed

use_style()
dev = resolve_device(device)
if dev.type == "cpu" and cpu_threads:  # before Run.start, so that its provenance records the threads used
    torch.set_num_threads(cpu_threads)
g = seed_everything(seeds[0])
run = Run.start("01_fedgo_weighting", globals(), seed=seeds)
t_start = time.perf_counter()

# %% [markdown]
# ## 1 · The rule on a handful of points
# Four clients on a 2-D mixture whose components are the classes; each client holds a few of them
# (Dirichlet(α) split), so the client densities `p_k(x)` are known exactly and so is the **oracle**
# weighting `n_k p_k(x) / Σ_j n_j p_j(x)`. FedGO only sees its discriminators' logits `l_k(x)`:
# `a_k = softmax_k(l_k(x) + log n_k)`. Below, at five server points, each client's weight under the
# oracle, FedGO and the uniform rule (FedDF): FedGO puts the weight where the oracle does.

# %%
toy = studies.toy_study(toy_mixture, n_clients=toy_clients, alpha=toy_alpha, local_epochs=toy_epochs,
                        disc_epochs=toy_disc_epochs, distill_steps=toy_distill_steps, seeds=toy_seeds)
toy.weights_on_points(5)

# %% [markdown]
# ## 2 · The toy figure, over three seeds
# Top row: the weight of client 0 under each rule (its data in white); bottom row: the server model
# distilled from each rule's pseudo-labels (first seed). The table gives seed means over all toy seeds.

# %%
fig = plots.toy_weights_figure(toy, f"{toy_mixture} mixture, {toy_clients} clients, Dirichlet({toy_alpha}); "
                               f"FedAvg alone: {toy.fedavg_test_accuracy[0]:.3f}")
_ = savefig(fig, "01_toy_weights")
toy_table = toy.mean_table().round(4)
run.metrics["toy"] = {"per_seed_tv_to_oracle": toy.weight_tv_to_oracle, "mean": toy_table.to_dict()}
toy_table

# %% [markdown]
# ## 3 · Data, split and the FedGO protocol's one-off part
# The server holds half of every class, unlabeled (the same half for every K and α of a seed). Three
# scenarios, named by what the server actually holds:
#
# * **pre** — the real unlabeled server half; the server trains a GAN on it and sends G to the clients;
# * **gan_samples** — the same G; the server distils on G samples instead of its data. *This is not
#   data-free*: G was trained on the real server half (what earlier versions of this notebook called
#   "data-free");
# * **data_free** — no server data at all (our design, stated here): a warm-up round in which every
#   client trains the initial model locally and uploads it; the server trains a label-conditioned G
#   against their ensemble alone (DENSE's teacher, cross-entropy to the drawn label plus a mode-seeking
#   term, `fedlib.fedgo.train_generator_data_free`); the clients train their discriminators against
#   that G; the server distils on its samples. (Notebook 05 adds a federated diffusion generator.)
#
# **Searched, not guessed.** The discriminator epochs E_d (and, in the `long` set, G's width) are
# chosen on the search seed only: every client holds out a fifth of its data; the quantity is the
# accuracy of the FedGO teacher on the pooled held-out client data (labels the clients own; no test
# data). Two label-free proper scores are shown beside it: each D_k's held-out cross-entropy and the
# log-loss of the weights as the posterior of the source client. Both prefer *few* epochs
# (overconfident discriminators are penalised), while the teacher needs *well-ranked* logits.
# That search trains its discriminators against a GAN of the search seed's real server half, so the
# data-free scenario does not use its choice: its E_d is searched the same way against the search seed's
# own data-free G (a warm-up round and a G trained against the clients' ensemble: no server image read),
# and so is that G's width where `gan_width_grid` has several.

# %%
def load(name):
    """A dataset's train and test split, capped as this set's own data (§3a loads its grid's datasets so)."""
    tr, te = fdata.load_train_test(name, stand_in_n=(max_train or 2000, max_test or 2000))
    return tr.stratified(max_train), te.stratified(max_test)


train, test = load(dataset)
shape = tuple(train.x.shape[1:])
clf = models.make_classifier(classifier, shape, train.n_classes, width=width).to(dev)
init = fl.get_params(clf)
# The search's GAN and discriminators: FedGO's settings, except its GAN's Adam lr (1e-3, the search's own);
# disc_epochs is what the grid searches, so it is not read. Its clients train 5 local epochs (the search's).
search_config = studies.FedGOConfig(gan_steps=gan_steps, disc_epochs=0, gan_lr=1e-3)
search = []
for w in gan_width_grid:
    table, _ = studies.discriminator_epoch_search(train, clf, dataclasses.replace(search_config, gen_width=w),
                                                  client_counts=client_counts, alphas=alphas, seed=search_seed,
                                                  grid=disc_epoch_grid, local_epochs=5, generator=g, device=dev)
    search.append((w, table))
search, gan_width, disc_epochs = studies.best_discriminator_setting(search)
run.metrics["search_discriminators"] = {"table": search.to_dict("list"), "gan_width": gan_width,
                                        "disc_epochs": disc_epochs}
print(f"chosen on the search seed: generator width {gan_width}, discriminator epochs {disc_epochs}")

# %%
free_gen_width, disc_epochs_free = gan_width, disc_epochs
if "data_free" in scenarios:
    search_free = []
    for w in gan_width_grid:
        st_free = studies.fedgo_setups(train, test, client_counts=client_counts[:1], alphas=alphas[:1],
                                       seeds=[search_seed], scenarios=["data_free"], gan_steps=0, disc_epochs=1,
                                       gen_width=w, model=clf, init=init, warmup_epochs=warmup_epochs, local_lr=lr,
                                       free_steps=free_gen_steps, dense=False, generator=g, device=dev)
        table, _ = studies.discriminator_epoch_search(
            train, clf, search_config, client_counts=client_counts, alphas=alphas, seed=search_seed,
            grid=disc_epoch_grid, G=st_free.generators[("data_free", st_free.keys[0])], local_epochs=5, generator=g,
            device=dev)
        search_free.append((w, table))
    search_free, free_gen_width, disc_epochs_free = studies.best_discriminator_setting(search_free)
    run.metrics["search_discriminators_data_free"] = {"table": search_free.to_dict("list"), "gan_width": free_gen_width,
                                                      "disc_epochs": disc_epochs_free}
    print(f"data-free, chosen against the search seed's data-free G: generator width {free_gen_width}, "
          f"discriminator epochs {disc_epochs_free}")

# %%
fig = plots.fedgo_search_figure(search[search.gen_width == gan_width], "epochs",
                          {"teacher_val_acc": "FedGO teacher, held-out accuracy ↑", "val_bce": "D_k held-out BCE ↓",
                           "posterior_loss": "source-client log-loss ↓"}, chosen=disc_epochs)
_ = savefig(fig, "01_search_discriminators")

# %%
setups = studies.fedgo_setups(train, test, client_counts=client_counts, alphas=alphas, seeds=seeds,
                              scenarios=scenarios, gan_steps=gan_steps, disc_epochs=disc_epochs, gen_width=gan_width,
                              free_disc_epochs=disc_epochs_free, free_gen_width=free_gen_width,
                              model=clf, init=init, warmup_epochs=warmup_epochs, local_lr=lr,
                              free_steps=free_gen_steps, dense="dense" in data_free_methods, generator=g,
                              device=dev)
key0 = setups.keys[0]
server0 = setups.server_indices[seeds[0]]

# %% tags=["nbval-check-output"]
print(f"{dataset}: train {len(train)}, test {len(test)}, sample shape {shape}, classes {train.n_classes}")
print(f"server (unlabeled) {len(server0)}, on clients {sum(len(i) for i in setups.client_indices[key0])}")
print(f"classifier {classifier}: {models.n_params(clf)} parameters; discriminator "
      f"{models.n_params(setups.discriminator)}")
print(f"problems (K, alpha, seed): {len(setups.keys)}; scenarios: {', '.join(scenarios)}")

# %% [markdown]
# What each scenario's server distils on (first seed). The number under each panel is the Fréchet
# distance of 720 such samples to the real server half in the feature space of fedlib's digits
# classifier (`fedlib.metrics`; not comparable to published FID): how far the server data is from
# the data the clients hold.

# %%
feat = metrics.feature_extractor(train, test, device=dev)
ref = metrics.gaussian_stats(metrics.extract_features(feat, train.x[torch.as_tensor(server0)]))
shown = {"pre": train.x[torch.as_tensor(server0)]}
shown.update({s: setups.setups[s][key0[0]][0].server_x for s in scenarios if s != "pre"})
server_fd = {s: max(0.0, metrics.classifier_fd(feat, x, ref)) for s, x in shown.items()}  # 0 up to rounding for pre
fig, axes = plt.subplots(1, len(shown), figsize=(3.5 * len(shown), 3.4), squeeze=False)
for ax, (s, x) in zip(axes[0], shown.items()):
    image_grid(x[:32].cpu(), nrow=8, ax=ax, title=f"{s}\nFD to the real server half {server_fd[s]:.2f}")
_ = savefig(fig, "01_server_data")
run.metrics["server_data_fd"] = server_fd

# %% [markdown]
# ### 3a · Where can FedGO's claim show? The `regime` set's search
# A distilling method beats FedAvg only while its teacher beats FedAvg's model (§5), and no server model
# gets far past central training on the same client data. Where FedAvg already comes near central
# training, "FedGO beats every baseline" has no room to show (§4b decides that per K and α). The
# `regime` set therefore chooses its task by measurement, on the search seed only (never a claim seed):
# for every dataset, client count and α of its grid, FedAvg with this set's rounds and local epochs,
# and central training (the same model on the same client data for rounds × local epochs epochs, the
# reference of §4). The chosen cell has the largest gap among the *eligible* ones: those whose median
# client holds at least `regime_min_client_data` images, because each client's discriminator learns
# from its client's data alone (on digits the median client holds a few dozen images, and §5's FedGO
# teacher stays far below the exact-weight one). Other sets skip the search (`regime_datasets` is empty).

# %%
def fedavg_central_gap(name):
    """FedAvg's and central training's test accuracy after this set's budget, on the search seed, for
    every (K, alpha) of the regime grid of one dataset (loaded and capped as this set's own data)."""
    tr, te = (d.to(dev) for d in load(name))
    torch.manual_seed(search_seed)  # the search's model; fork_rng below keeps the run's own stream untouched
    m = models.make_classifier(classifier, tuple(tr.x.shape[1:]), tr.n_classes, width=width).to(dev)
    m_init, labels = fl.get_params(m), tr.y.cpu().numpy()
    gen = torch.Generator().manual_seed(search_seed)
    # the server half depends on the seed alone, so every (K, alpha) shares it and central trains on its complement
    server = fdata.fedgo_split(labels, regime_client_counts[0], regime_alphas[0], seed=search_seed)[1]
    union = torch.as_tensor(sorted(set(range(len(tr))) - set(server.tolist())), device=dev)
    rows = []
    for K in regime_client_counts:
        problems = []
        for a in regime_alphas:
            parts, server = fdata.fedgo_split(labels, K, a, seed=search_seed)
            problems.append(distill.Setup(fl.pack_clients(tr.x, tr.y, parts), tr.x[torch.as_tensor(server, device=dev)],
                                          te.x, te.y, key=(a,)))
            sizes = sorted(len(p) for p in parts)
            rows.append({"dataset": name, "clients": K, "alpha": a, "train": len(tr), "min_client": sizes[0],
                         "median_client": float(np.median(sizes))})
        res = backends.run_rounds(m, problems, ["fedavg"], backend="inprocess", rounds=rounds,
                                  local_epochs=local_epochs, lr=lr, batch_size=batch_size, mu=mu, generator=gen,
                                  init=m_init, chunk_size=client_chunk or "auto")
        for row, acc in zip(rows[-len(regime_alphas):], res.accuracy[:, 0, -1].tolist()):
            row["fedavg"] = acc
    c = distill.central_training(m, [tr.x[union]], [tr.y[union]], epochs=rounds * local_epochs, lr=lr,
                                 batch_size=batch_size, generator=gen, init=m_init, chunk_size=client_chunk or "auto")
    c_acc = float(fl.accuracy(fl.predict(fl.functional(m), c, te.x, stacked=True), te.y)[0])
    return [dict(r, central=c_acc, gap=c_acc - r["fedavg"]) for r in rows]


regime, regime_pick = None, None
if regime_datasets:
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        regime = pd.DataFrame([row for name in tqdm(regime_datasets, desc="regime search") for row in
                               fedavg_central_gap(name)])
    regime["eligible"] = regime.median_client >= regime_min_client_data
    if regime.eligible.any():
        regime_pick = regime[regime.eligible].sort_values("gap", ascending=False).iloc[0].to_dict()
    run.metrics["regime_search"] = {"table": regime.to_dict("list"), "pick": regime_pick,
                                    "seconds": time.perf_counter() - t0}
    fig, axes = plt.subplots(1, len(regime_datasets), figsize=(4.2 * len(regime_datasets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], regime_datasets):
        f = regime[regime.dataset == name]
        grid = f.pivot(index="clients", columns="alpha", values="gap")
        ax.imshow(grid.values, cmap="viridis", vmin=0, vmax=max(regime.gap.max(), 1e-6))
        for i, K in enumerate(grid.index):
            for j, a in enumerate(grid.columns):
                r = f[(f.clients == K) & (f.alpha == a)].iloc[0]
                mark = " *" if regime_pick and (name, K, a) == (regime_pick["dataset"], regime_pick["clients"],
                                                                regime_pick["alpha"]) else ""
                light = r.gap / max(regime.gap.max(), 1e-6) > 0.55  # viridis is light at its top
                if not r.eligible:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.85", alpha=0.85))
                ax.text(j, i, f"{r.gap:+.3f}{mark}\nmedian n {r.median_client:.0f}", ha="center", va="center",
                        fontsize=8, color="0.4" if not r.eligible else "black" if light else "white")
        ax.set(xticks=range(len(grid.columns)), xticklabels=[f"{a:g}" for a in grid.columns], yticks=range(len(grid.index)),
               yticklabels=grid.index, xlabel="Dirichlet α", ylabel="clients K",
               title=f"{name} ({int(f.train.iloc[0])} train), central {f.central.iloc[0]:.3f}")
    fig.suptitle(f"central minus FedAvg accuracy after {rounds} rounds, search seed {search_seed} "
                 f"(greyed: median client < {regime_min_client_data} images; * chosen)", fontsize=9)
    _ = savefig(fig, "01_regime_search")
    display(regime.round(3))
    print("chosen: " + ("no eligible cell" if regime_pick is None else
                        f"{regime_pick['dataset']}, K={regime_pick['clients']}, alpha={regime_pick['alpha']}: "
                        f"FedAvg {regime_pick['fedavg']:.3f} vs central {regime_pick['central']:.3f}"))

# %% [markdown]
# ## 4 · The main table: server test accuracy after the last round
# Every method starts from the same initial model. FedAvg and FedProx only average (they use no server
# data, so they are the same in every scenario); the others distil their teacher into the average
# every round. "Central" trains one model on all client data for `rounds × local_epochs` epochs: an
# upper reference. Results are indexed by their setup keys (scenario, K, α, seed, method, round).

# %%
common = dict(backend=backend, rounds=rounds, local_epochs=local_epochs, lr=lr, batch_size=batch_size, mu=mu,
              distill_epochs=distill_epochs, distill_steps=distill_steps, distill_val=distill_val,
              distill_batch=distill_batch, temperature=temperature, dense_steps=dense_steps, generator=g, init=init,
              chunk_size=client_chunk or "auto", predict_batch=256 if client_chunk else 1024,
              method_options={"fedgen": dict(steps=fedgen_steps, lr_generator=fedgen_lr, weight=fedgen_weight),
                              "fedftg": dict(generator_update=fedftg_generator_update),
                              "coboosting": dict(g_steps=coboosting_g_steps, student=coboosting_student)})
lr_table, distill_lr = None, distill_lr_grid[0]
if len(distill_lr_grid) > 1 and distill_epochs:  # FedGO on the search seed, each lr; the held-out KL decides
    search_setups = studies.fedgo_setups(train, test, client_counts=client_counts, alphas=alphas, seeds=[search_seed],
                                         scenarios=["pre"], gan_steps=gan_steps, disc_epochs=disc_epochs,
                                         gen_width=gan_width, generator=g, device=dev).all("pre")
    lr_table, distill_lr = studies.distill_lr_search(clf, search_setups, distill_lr_grid, **common)
run.metrics["search_distill_lr"] = {"table": None if lr_table is None else lr_table.to_dict("list"), "lr": distill_lr}
print(f"distillation lr {distill_lr}" + ("" if lr_table is None else f", chosen on the held-out KL:\n{lr_table}"))

# %%
t0 = time.perf_counter()
results = {s: {K: backends.run_rounds(clf, setups.setups[s][K], methods if s == "pre" else data_free_methods,
                                      distill_lr=distill_lr, progress=tqdm, **common) for K in client_counts}
           for s in scenarios}
seconds_rounds = time.perf_counter() - t0
frame = studies.rounds_frame(results)
# FedGen without its regulariser is an ablation reported beside FedGen (§9), never a baseline of a claim
ablation, frame = frame[frame.method == "fedgen_noreg"], frame[frame.method != "fedgen_noreg"]
union = [torch.as_tensor(sum((list(i) for i in setups.client_indices[(client_counts[0], alphas[0], seed)]), []))
         for seed in seeds]  # all client data of a seed (the same for every K and alpha)
central = distill.central_training(clf, [train.x[i.to(dev)] for i in union], [train.y[i.to(dev)] for i in union],
                                   epochs=rounds * local_epochs, lr=lr, batch_size=batch_size, generator=g, init=init,
                                   chunk_size=client_chunk or "auto")
central_acc = fl.accuracy(fl.predict(fl.functional(clf), central, test.x, stacked=True), test.y).cpu()
print(f"federated rounds: {seconds_rounds:.1f} s; central accuracy {central_acc.mean():.3f} ± {central_acc.std():.3f}")

# %% [markdown]
# **Analysis only: FedGO with exact weights** (`fedgo_exact`). Under label skew the exact posterior is
# `n_k,y / n_y` at a sample of class y; the same FedGO rule on discriminator logits `log π_k,y(x)`
# built from the server data's true labels (which no real server has) shows what the weighting could
# give with perfect discriminators. It separates the weighting rule from its estimation at our scale;
# it is never a baseline of a claim.

# %%
if "pre" in scenarios and "fedgo" in methods:
    exact = {K: backends.run_rounds(clf, studies.exact_weight_setups(setups.setups["pre"][K]), ["fedgo"],
                                    distill_lr=distill_lr, **common) for K in client_counts}
    frame = pd.concat([frame, studies.rounds_frame({"pre": exact}).assign(method="fedgo_exact")], ignore_index=True)

# %%
last = frame[frame["round"] == rounds]
main_table = last.groupby(["scenario", "method", "clients", "alpha"])["accuracy"].agg(["mean", "std"]).unstack(
    ["clients", "alpha"])
run.metrics["accuracy_last_round"] = {" / ".join(map(str, k)): v for k, v in
                                      last.groupby(["scenario", "clients", "alpha", "method"])["accuracy"]
                                      .mean().items()}
run.metrics["central_accuracy"] = central_acc.tolist()
main_table.round(3)

# %%
fig = plots.accuracy_rounds_figure(frame, float(central_acc.mean()))
_ = savefig(fig, "01_accuracy_rounds")

# %% [markdown]
# ### 4b · How much room does FedAvg leave? Its gap to central training
# Per client count and α, central training's accuracy minus FedAvg's after the last round, paired per seed
# (the same client data), beside FedGO's gain over FedAvg in each scenario. Where the gap is below
# `min_headroom` beyond the noise rule, the task is too easy for "FedGO beats every baseline" to apply:
# FedGO's server model follows its teacher (§5), and a teacher cannot show a gain that FedAvg has no room
# for. §9 then calls that claim "not applicable" at that K and α, with this measured gap as the reason, and
# decides it over the remaining client counts; a loss beyond noise still counts wherever it occurs. The
# default `min_headroom` is our choice, not the paper's: the claim's paired comparisons in this notebook's
# three-seed runs have a noise band (two standard errors) of a few accuracy points, so a gain needs at
# least that much room to show.

# %%
central_by_seed = pd.Series(central_acc.numpy(), index=seeds)
fedavg_last = last[last.method == "fedavg"]
headroom = {}  # (K, alpha) -> Comparison "FedAvg's gap to central > min_headroom"
for (K, a), f in fedavg_last.groupby(["clients", "alpha"]):
    gap_k = central_by_seed.loc[seeds].values - f.groupby("seed").accuracy.mean().loc[seeds].values
    headroom[(K, a)] = compare_to(gap_k, min_headroom, name="central minus FedAvg", below=False)
if headroom:
    gain_rows = []
    for s in scenarios:
        for (K, a) in headroom:
            fg = per_seed(frame, "accuracy", seeds, last="round", scenario=s, clients=K, alpha=a, method="fedgo") \
                if "fedgo" in set(frame[frame.scenario == s].method) else None
            fa = per_seed(fedavg_last, "accuracy", seeds, clients=K, alpha=a)
            if fg is not None:
                gain_rows += [{"what": f"FedGO − FedAvg, {s}", "K, α": f"{K}, {a:g}", "seed": sd, "value": v}
                              for sd, v in (fg - fa).items()]
    gap_rows = [{"what": "central − FedAvg", "K, α": f"{K}, {a:g}", "seed": sd, "value": v}
                for (K, a), c in headroom.items() for sd, v in zip(seeds, c.a)]
    room = pd.DataFrame(gap_rows + gain_rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(headroom) * (1 + len(scenarios)) / 2, 3.6))
    sns.barplot(room, x="K, α", y="value", hue="what", errorbar=("se", 1), ax=ax, alpha=0.8)
    sns.stripplot(room, x="K, α", y="value", hue="what", dodge=True, ax=ax, color="k", size=3, legend=False)
    ax.axhline(min_headroom, color="0.3", ls="--", lw=1, label=f"min_headroom {min_headroom:g}")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(ylabel="accuracy difference (last round)", title=f"{dataset}: FedAvg's room and FedGO's gain, {rounds} rounds")
    ax.legend(fontsize=7)
    _ = savefig(fig, "01_headroom")
    run.metrics["headroom"] = {f"{K} / {a}": {"gap_mean": c.mean + min_headroom, "gap_se": c.se, "verdict": c.verdict}
                               for (K, a), c in headroom.items()}
    display(pd.DataFrame([{"clients": K, "alpha": a, "central": central_by_seed.mean(),
                           "FedAvg": central_by_seed.mean() - np.mean(c.a), "gap": np.mean(c.a), "gap SE": c.se,
                           f"gap > {min_headroom:g}": c.verdict} for (K, a), c in headroom.items()]).round(3))

# %% [markdown]
# ## 5 · A better teacher, a better server model?
# Each point is one (K, α, seed) at the last round: the teacher's accuracy on the server data (true
# labels the server never sees) against the distilled server model's test accuracy. With epochs of
# distillation and the best held-out epoch kept, the points sit on the diagonal: **the server model is
# as good as its teacher, no better**. So the old puzzle (a teacher twice as accurate as the uniform
# one, yet no better server model than FedAvg) is about the teacher's *absolute* accuracy: a
# distilling method beats FedAvg only while its teacher beats FedAvg's model (dashed). FedGO's teacher
# is bounded by its discriminators: the E_d search of §3 moved it most (its table: held-out teacher
# accuracy against E_d), and `fedgo_exact` (exact weights, a far better teacher) shows the headroom the
# weighting rule itself has. FedAvg, in turn, keeps improving with rounds on digits: in the `long` set
# (15 rounds; the README's long table) it comes near central training and passes FedGO's teacher.

# %%
if "pre" in results:
    fig = plots.teacher_student_figure(frame, "pre")
    _ = savefig(fig, "01_teacher_student")
    teacher_table = (frame[(frame.scenario == "pre") & frame.teacher_accuracy.notna()]
                     .groupby(["method", "clients", "alpha"])["teacher_accuracy"].mean().unstack(["clients", "alpha"]))
    run.metrics["teacher_accuracy_mean_over_rounds"] = {str(k): v for k, v in teacher_table.stack([0, 1]).items()}
    display(teacher_table.round(3))
log = [e for per_k in results.values() for res in per_k.values() for e in res.distill_log]
if log:
    print(f"distillation ran {sum(e['epochs_run'] for e in log) / len(log):.1f} epochs per round on average; "
          f"best held-out epoch {torch.cat([e['best_epoch'] for e in log]).float().mean():.1f}")

# %% [markdown]
# ## 6 · Data-free: how close must G's samples be to the clients' data?
# FedGO's weights are the discriminators' odds `p_k/p_G` *at the server samples*. On real data (or on
# samples of a GAN trained on real data) these odds compare clients where clients have data; at
# samples of a generator that never saw data, they are extrapolations of discriminators to inputs
# neither they nor any client saw. Our classifiers use GroupNorm, so the batch-norm statistics that
# DENSE-style data-free generators match to look like the data do not exist here. Left: FedGO's gap to
# the best baseline (per seed: its accuracy minus the best other method's) at every round, per
# scenario (seed bands). Second figure (the `long` set): the gap against the data-free G's training
# budget (the main run's budget is one of the points), with the Fréchet distance of its samples to the
# real server half.

# %%
gaps = pd.concat([studies.gap_to_best(frame, s).assign(scenario=s) for s in scenarios], ignore_index=True)
hetero = gaps[gaps.alpha.isin([a for a in alphas if a <= 0.1] or alphas)]
per_round = hetero.groupby(["scenario", "seed", "round"], as_index=False)["gap"].mean()
fig = plots.gap_sweep_figure(per_round, "round", group="scenario", paper=0.0, paper_label="paper: FedGO ahead (> 0)",
                             title="FedGO minus the best baseline (α ≤ 0.1, every K)")
_ = savefig(fig, "01_gap_rounds")
run.metrics["gap_by_round"] = per_round.groupby(["scenario", "round"])["gap"].mean().to_dict()

# %%
sweep = None
if sweep_free_steps and "data_free" in scenarios:
    sweep = studies.data_free_sweep(
        train, test, clf, init, steps_grid=sweep_free_steps, client_counts=client_counts[:1], alphas=alphas,
        seeds=seeds, methods=[m for m in data_free_methods if m != "fedgen_noreg"], run_kw=dict(common, distill_lr=distill_lr), pre_frame=frame,
        fd=lambda x: metrics.classifier_fd(feat, x, ref), known={free_gen_steps: (frame, setups.all("data_free"))},
        gan_steps=gan_steps, disc_epochs=disc_epochs_free, gen_width=free_gen_width, warmup_epochs=warmup_epochs, generator=g,
        device=dev)
    fig = plots.gap_sweep_figure(sweep, "free_steps", paper=0.0, paper_label="paper: FedGO ahead (> 0)", log_x=True,
                                 xlabel="data-free G training steps",
                                 title=f"data-free, K={client_counts[0]}: gap after {rounds} rounds")
    _ = savefig(fig, "01_data_free_sweep")
    run.metrics["data_free_sweep"] = sweep.groupby("free_steps")[["gap", "fd"]].mean().to_dict()
    display(sweep.groupby("free_steps")[["gap", "fd"]].agg(["mean", "std"]).round(3))

# %% [markdown]
# ## 6b · One-shot, no server data: Co-Boosting beside FedGO, FedDF and DENSE
# Co-Boosting (Dai et al., ICLR 2024) is one-shot federated learning: clients train once, and the server
# alternately synthesises hard samples from the client ensemble and re-weights the ensemble members on
# them, then distils. Here every method gets one round with `oneshot_local_epochs` local epochs on the
# data-free scenario's set-ups (FedGO and FedDF distil on the data-free G's samples, DENSE and Co-Boosting
# on their own generators' samples), under the same seeds. Bars: seed mean, dots: seeds.

# %%
oneshot = None
if oneshot_methods and "data_free" in scenarios:
    one_kw = dict(common, rounds=1, local_epochs=oneshot_local_epochs)
    oneshot = studies.rounds_frame({"oneshot": {K: backends.run_rounds(clf, setups.setups["data_free"][K], oneshot_methods,
                                                                       distill_lr=distill_lr, progress=tqdm, **one_kw)
                                                for K in client_counts}})
    _ = savefig(plots.oneshot_figure(oneshot), "01_oneshot")
    run.metrics["oneshot"] = oneshot.groupby(["clients", "alpha", "method"])["accuracy"].mean().to_dict()

# %% [markdown]
# The data-free family's communication beyond the models, per round and all clients together
# (`fedlib.datafree.extra_bytes`): FedGen broadcasts its feature generator and label prior, FedGen and
# FedFTG upload label counts; DENSE and Co-Boosting send nothing extra. Relative to one round of FedAvg
# (every client's model up and the global model down).

# %%
model_bytes = fl.state_bytes(clf)
extra = pd.DataFrame([{"method": m, "clients": K, **datafree.extra_bytes(m, model=clf, n_classes=train.n_classes, n_clients=K)}
                      for m in dict.fromkeys(data_free_methods + list(oneshot_methods)) for K in client_counts])
extra["% of a FedAvg round"] = 100 * (extra["down"] + extra["up"]) / (2 * extra["clients"] * model_bytes)
run.metrics["datafree_extra_bytes"] = extra.to_dict("list")
display(extra[(extra.down + extra.up) > 0].round(2))

# %% [markdown]
# ## 7 · Overhead of FedGO
# Bytes: G down to each client once plus each D_k up once, against the classifier down and up every
# round. Client compute in FLOPs (`torch.utils.flop_counter`): E_d epochs of discriminator training (a
# real and a G sample per step, plus drawing the G sample) against `rounds × local_epochs` epochs of
# local training. The data-free scenario's warm-up round (`warmup_epochs` local epochs and one upload per
# client) is counted as its overhead, with its own E_d (`studies.scenario_overhead` reads both from the
# set-ups). The curves extend our run to more rounds and put larger models
# beside ours, at CIFAR-10 scale (25,000 client images, 20 clients, 5 local and 5 discriminator epochs,
# our `paper` set's choices): the ResNet-20 of our `paper` set and the paper's ResNet-18 (about eleven
# million parameters) with a DCGAN-class G and D. Those points are an estimate: the models' bytes are counted
# from their parameters and their FLOPs measured (`torch.utils.flop_counter` on one batch, CPU), but the
# protocol sizes (clients, images, epochs, 100 rounds) are assumed, and nothing at that scale is run; the
# paper's own E_d is not in docs/methods.md.

# %%
(scen0, _), G0 = next(iter(setups.generators.items()))
over = studies.overhead_study(clf, G0, setups.discriminator, train.x, n_k=[len(i) for i in setups.client_indices[key0]],
                              local_epochs=local_epochs, disc_epochs=setups.disc_epochs[scen0], rounds=rounds,
                              warmup_epochs=setups.warmup_epochs[scen0])
overhead_by_scenario = {scen: studies.scenario_overhead(setups, scen, clf, train.x, local_epochs=local_epochs,
                                                        rounds=rounds) for scen in scenarios}
overhead, at_paper, ours, paper_costs = over["this_run"], over["paper_scale"], over["costs"]["ours"], over["costs"]["paper"]
fig = plots.overhead_figure(over["curves"], marks={
    f"this run ({rounds} rounds)": (rounds, overhead["bytes_pct"], overhead["flops_pct"]),
    "paper scale (100 rounds)": (100, at_paper["bytes_pct"], at_paper["flops_pct"])})
_ = savefig(fig, "01_overhead")
run.metrics["overhead"] = {"this_run": overhead, "by_scenario": overhead_by_scenario, "paper_scale": at_paper,
                           "seconds": setups.seconds}

# %% tags=["nbval-check-output"]
print(f"classifier {ours['classifier_bytes']} B, G {ours['generator_bytes']} B, D {ours['discriminator_bytes']} B")
print(f"paper-class: classifier {paper_costs['classifier_bytes']} B, G {paper_costs['generator_bytes']} B, "
      f"D {paper_costs['discriminator_bytes']} B")
print(f"paper scale (estimate), 100 rounds: bytes {at_paper['bytes_pct']:.3f} %, client FLOPs {at_paper['flops_pct']:.3f} %")

# %% [markdown]
# ## 8 · Explorer
# Pick a scenario, a client count, α and the quantity; the curves are seed means with ±1 std bands of
# what the run stored (`explorer.pt` beside `metrics.json`), so the explorer needs only the next two
# cells of a committed notebook, not a re-run.

# %%
_ = save_explorer("01_fedgo_weighting", {"frame": {c: frame[c].tolist() for c in frame.columns},
                                         "central": float(central_acc.mean())})

# %% tags=["explorer-setup"]
import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd

from fedlib import plots
from fedlib.results import load_explorer

# %% tags=["explorer"]
store = load_explorer("01_fedgo_weighting")
stored = pd.DataFrame(store["frame"])


def show_rounds(scenario=stored.scenario[0], clients=int(stored.clients[0]), alpha=float(stored.alpha[0]),
                value="accuracy"):
    f = stored[(stored.scenario == scenario) & (stored.clients == clients) & (stored.alpha == alpha)]
    plots.accuracy_rounds_figure(f, store["central"], value=value)
    plt.show()


# interactive, not interact: papermill now and then never returned from an interact cell (nteract/papermill#723)
widgets.interactive(show_rounds, scenario=sorted(set(stored.scenario)), clients=sorted(set(stored.clients)),
                    alpha=sorted(set(stored.alpha)), value=["accuracy", "teacher_accuracy"])

# %%
show_rounds()  # the explorer's default view, for readers of the static notebook

# %% [markdown]
# ## 9 · Claims
# Every comparative claim is decided by the noise rule over the seeds (paired per seed: it holds when
# the mean difference exceeds 2 standard errors). "FedGO beats every baseline" is the combination of
# one comparison per baseline **and per client count**: it holds only if every one holds, fails if
# any fails. In the GAN-sample and data-free scenarios FedAvg and FedProx are baselines too (they need
# no server data). With one client every weighting is the same: those claims are "not applicable".
# The required claim is a sanity check of the library.

# %%
xc, yc = train.x[:200], train.y[:200]
check = fl.pack_clients(xc, yc, fdata.dirichlet_partition(yc.cpu().numpy(), 4, 0.5, seed=0))
kw = dict(epochs=1, lr=lr, momentum=0.9, batch_size=batch_size, mu=mu)
vec = fl.local_train(clf, init, check, generator=torch.Generator().manual_seed(0), **kw)
seq = fl.local_train(clf, init, check, generator=torch.Generator().manual_seed(0), vectorised=False, **kw)
# relative L2 error: ~1e-7 for the digits CNN; the paper-scale ResNet under torch's deterministic CPU
# kernels drifts to ~1e-4 by float reassociation alone, hence the 1e-3 bound
rel_err = (sum(((vec[n] - seq[n]) ** 2).sum() for n in vec) / sum((seq[n] ** 2).sum() for n in seq)).sqrt().item()
run.claim("vectorised client round equals the sequential reference", "(library sanity)",
          f"relative L2 error {rel_err:.1e}", rel_err < 1e-3, required=True)
multi = [K for K in client_counts if K > 1]
hetero_alphas = [a for a in alphas if a in (0.05, 0.1)]
scale = f"{dataset}, {rounds} rounds, K in {multi}, {len(seeds)} seeds"

# %%
def why(s, a):
    """The measured reason behind a scenario's verdict: the teacher against FedAvg (pre), or how far
    the server's samples are from the data and where FedGO's gap goes over the rounds."""
    gap = per_round[per_round.scenario == s].groupby("round")["gap"].mean()
    text = f"gap to the best baseline {gap.iloc[0]:+.3f} after round 1, {gap.iloc[-1]:+.3f} after round {rounds}"
    if s == "pre":
        t = per_seed(frame, "teacher_accuracy", last="round", scenario=s, clients=multi[-1], alpha=a,
                     method="fedgo").mean()
        return f"{text}; FedGO teacher {t:.3f} on the server data (K={multi[-1]}), its student follows it (§5)"
    return f"{text}; server samples at FD {server_fd[s]:.2f} from the real server half vs {server_fd['pre']:.2f} (§3, §6)"


def room_text(K, a):
    """FedAvg's measured gap to central training at (K, alpha) (§4b)."""
    c = headroom[(K, a)]
    return f"K={K}: central minus FedAvg {c.mean + min_headroom:+.3f} ± {c.se:.3f} SE"


for s in scenarios:
    for a in hetero_alphas:
        name = f"FedGO beats every baseline, {s} server data, alpha={a}"
        if not multi:
            run.claim(name, "yes (CIFAR-10/100, ImageNet-100, 100 rounds)", "one client: every weighting is the same",
                      None)
            continue
        # Too easy where FedAvg's gap to central training is below min_headroom beyond the noise rule (§4b):
        # a win cannot show there, but a loss still can, so a loss at any K decides the claim as before;
        # otherwise it is decided over the client counts with room, and is not applicable without any.
        easy = [K for K in multi if (K, a) in headroom and headroom[(K, a)].verdict == "does not hold"]
        room = [K for K in multi if K not in easy]
        gaps = "; ".join(room_text(K, a) for K in multi if (K, a) in headroom) or "FedAvg not run: not measured"
        comps = studies.fedgo_comparisons(frame, s, a, multi)
        lost = any(c.verdict == "does not hold" for c in comps.values())
        note = f"{scale}; {studies.SCENARIOS[s]}; {why(s, a)}; FedAvg's room (§4b): {gaps}"
        if easy and not lost and not room:
            run.claim(name, "yes (CIFAR-10/100, ImageNet-100, 100 rounds)",
                      f"not applicable: FedAvg's gap to central training is below {min_headroom:g} at every K, so a gain "
                      f"cannot show ({gaps}); no baseline is ahead of FedGO beyond noise", None, note=note)
            continue
        dropped = ""
        if easy and not lost:
            comps = studies.fedgo_comparisons(frame, s, a, room)
            dropped = f"; not applicable at K={easy} (FedAvg's gap to central training below {min_headroom:g})"
        verdict, text = beats_every(comps)
        run.claim(name, "yes (CIFAR-10/100, ImageNet-100, 100 rounds)", text + dropped, verdict, note=note)

# %%
if "pre" in scenarios and {"fedgo", "feddf"} <= set(methods) and multi:
    comps = {f"K={K}, alpha={a}": compare(*(per_seed(frame, "teacher_accuracy", scenario="pre",
                                                      clients=K, alpha=a, method=m).values
                                            for m in ("fedgo", "feddf")), a_name="FedGO teacher", b_name="uniform")
             for K in multi for a in (hetero_alphas or alphas)}
    verdict, text = beats_every(comps)
    run.claim("FedGO's teacher is more accurate than the uniform (FedDF) teacher", "yes", text, verdict,
              note="accuracy on the server data, mean over rounds, paired per seed; at every K and alpha")
else:
    run.claim("FedGO's teacher is more accurate than the uniform (FedDF) teacher", "yes",
              "one client: every weighting is the same" if not multi else "not measured (needs the pre scenario, "
              "fedgo and feddf)", None)
tv = toy.weight_tv_to_oracle
_ = run.claim("FedGO's weights are closer to the oracle's than uniform weights (2-D toy)", "yes (toy figure)", None,
              compare(tv["fedgo"], tv["uniform"], a_name="FedGO TV", b_name="uniform TV", higher_is_better=False)
              if toy_clients > 1 else None, note=f"{len(toy_seeds)} toy seeds, mean TV distance to the oracle weights")

# %%
# The data-free family as their papers state their claims, at every client count and alpha of the
# data-free scenario: FedGen against FedAvg and FedProx (its paper's baselines), beside the ablation
# without its regulariser (the client term's weight 0: what the regulariser itself adds); FedFTG against
# the FedAvg model it fine-tunes; Co-Boosting against FedDF and DENSE after one round (§6b).
def family_claim(name, paper, frame_, scenario, method, vs, ran, note, needs):
    if ran and multi:
        comps = {f"{k}, alpha={a}": c for a in (hetero_alphas or alphas)
                 for k, c in studies.fedgo_comparisons(frame_, scenario, a, multi, method=method, vs=vs).items()}
        verdict, text = beats_every(comps)
        run.claim(name, paper, text, verdict, note=note)
    else:
        run.claim(name, paper, "one client: every weighting is the same" if not multi else
                  f"not measured (needs {needs})", None)


with_ablation = pd.concat([frame, ablation], ignore_index=True)
family_claim("FedGen beats FedAvg and FedProx without server data",
             "yes (FedGen, ICML 2021: above FedAvg and FedProx under label skew)", with_ablation, "data_free", "fedgen",
             ["fedavg", "fedprox"], {"pre", "data_free"} <= set(scenarios) and "fedgen" in data_free_methods
             and {"fedavg", "fedprox"} <= set(methods),
             f"{scale}; data-free scenario, last round, paired per seed; FedGen's generator: {fedgen_steps} steps a "
             f"round at lr {fedgen_lr}, client term weight {fedgen_weight} x 0.98^t (the authors': 200 at 3e-4, 10)",
             "the pre and data_free scenarios, fedgen, fedavg and fedprox")
family_claim("FedGen beats its ablation without the regulariser (client term weight 0)",
             "implied (the regulariser is FedGen's contribution)", with_ablation, "data_free", "fedgen", ["fedgen_noreg"],
             "data_free" in scenarios and {"fedgen", "fedgen_noreg"} <= set(data_free_methods),
             f"{scale}; the ablation is FedAvg drawing FedGen's random numbers",
             "the data_free scenario, fedgen and fedgen_noreg")
family_claim("FedFTG improves the FedAvg model it starts from",
             "yes (FedFTG, CVPR 2022: data-free fine-tuning improves the FedAvg global model)", frame, "data_free",
             "fedftg", ["fedavg"], {"pre", "data_free"} <= set(scenarios) and "fedftg" in data_free_methods
             and "fedavg" in methods,
             f"{scale}; data-free scenario, last round, paired per seed; generator update {fedftg_generator_update} "
             "(the authors': per client)", "the pre and data_free scenarios, fedftg and fedavg")
family_claim("Co-Boosting beats FedDF and DENSE in one round without server data",
             "yes (Co-Boosting, ICLR 2024: beats one-shot ensemble distillation such as DENSE and FedDF)", oneshot,
             "oneshot", "coboosting", ["feddf", "dense"],
             oneshot is not None and {"coboosting", "feddf", "dense"} <= set(oneshot_methods),
             f"one round of {oneshot_local_epochs} local epochs, K in {multi}, {len(seeds)} seeds (§6b); "
             f"{coboosting_g_steps} iterations of each fresh generator (the authors' run more)",
             "oneshot_methods with coboosting, feddf and dense, and the data_free scenario")

# %%
if regime_datasets:  # the regime set: its problems must include the one its own search chose (§3a)
    pick = regime_pick and (regime_pick["dataset"], int(regime_pick["clients"]), float(regime_pick["alpha"]))
    run.claim("this set runs where the regime search put it (the largest eligible FedAvg-to-central gap)",
              "(protocol)", "no eligible cell" if not pick else
              f"search: {pick[0]}, K={pick[1]}, alpha={pick[2]:g} (gap {regime_pick['gap']:+.3f}, median client "
              f"{regime_pick['median_client']:.0f} images); this set: {dataset}, K in {client_counts}, alpha in {alphas}",
              bool(pick) and pick[0] == dataset and pick[1] in client_counts and pick[2] in alphas, required=True,
              note=f"search seed {search_seed}, {rounds} rounds; §3a")

# %%
# scenarios that share one G, its discriminators and E_d (pre and gan_samples) have one overhead: said once
same_cost = {}
for scen, o in overhead_by_scenario.items():
    key = (setups.disc_epochs[scen], setups.warmup_epochs[scen], round(o["bytes_pct"], 6), round(o["flops_pct"], 6))
    same_cost.setdefault(key, []).append(scen)
run.claim("FedGO's extra communication and client compute are negligible (< 5 %), this run", "negligible",
          "; ".join(f"{' and '.join(scens)} (E_d = {e_d}, warm-up epochs {warm}): bytes {b:.1f} %, client FLOPs {f:.1f} %"
                    for (e_d, warm, b, f), scens in same_cost.items()),
          all(o["bytes_pct"] < 5 and o["flops_pct"] < 5 for o in overhead_by_scenario.values()),
          note=f"{rounds} rounds of a {models.n_params(clf)}-parameter classifier against E_d "
               "discriminator epochs and, data-free, the warm-up round: the one-off cost shrinks with rounds and "
               "classifier size (§7)")
run.claim("FedGO's extra communication and client compute are negligible (< 5 %), paper scale (estimate)", "negligible",
          f"bytes {at_paper['bytes_pct']:.3f} %, client FLOPs {at_paper['flops_pct']:.3f} %",
          bool(at_paper["bytes_pct"] < 5 and at_paper["flops_pct"] < 5),
          note="an estimate: bytes counted from the parameters and FLOPs measured on one batch of the paper-size "
               "models (ResNet-18, DCGAN-class G and D of our sizes); the protocol sizes are assumed (20 clients, "
               "25,000 images, 5 local and 5 discriminator epochs, 100 rounds), nothing at that scale is run")
run.metrics["wall_time_s"] = time.perf_counter() - t_start
run.finish()
run.claims_table()

# %% [markdown]
# ### The verdicts and their reasons
# The table above is the verdict of this run; each claim's note carries its measured reason. What the
# runs of the two parameter sets show (`quick`: 5 rounds; `long`: 15 rounds, searches over G's width,
# E_d and the distillation lr, the data-free budget sweep; numbers in `results/<set>/01_fedgo_weighting`):
#
# * **Pre-existing server data.** FedGO leads early by the margin of its teacher over FedAvg's model
#   (gap figure of §6: its mean gap to the best baseline is largest after round 1 and shrinks every
#   round), but at 5 rounds it is not beyond the seed spread of every baseline at every client count
#   and α: the claim asks for all of them and prints the comparison that keeps it from holding. The gap
#   shrinks because FedAvg approaches central training on digits while FedGO's server model follows
#   its teacher (§5). §4b measures that room: where FedAvg's gap to central training is below
#   `min_headroom` beyond noise (the `long` set's 15 rounds on digits), the claim is "not applicable"
#   there, with the gap as its reason, unless FedGO loses beyond noise somewhere.
#   The rule itself is not at fault: with exact weights (`fedgo_exact`, §4) the same protocol has a far
#   better teacher. What digits lacks is *discriminator data* (a few dozen images per client; the E_d
#   search of §3) and a task on which FedAvg stays far from central training.
# * **The `regime` set** (its table in the README) is that task, chosen by measurement (§3a): the cell of
#   the search grid with the largest FedAvg-to-central gap whose median client holds at least
#   `regime_min_client_data` images, with five seeds, every pre-existing-data baseline and the noise rule.
#   Its claims table is the verdict there; §4b shows the gap beside FedGO's gain. It runs the pre-existing
#   server data only, to fit the hour.
# * **GAN samples** (G trained on the real server half, `long` only) and **data-free** (no server data):
#   FedGO is behind the best baseline at every round (gap figure of §6), and the data-free G's samples
#   are far from the data (their Fréchet distance to the real server half, §3). FedGO's weights are the
#   discriminators' odds read off those samples; the `long` set's sweep relates the gap to the data-free
#   G's training budget. Missing: generator realism (DENSE pulls G towards the data with the clients'
#   batch-norm statistics, which GroupNorm models do not have) and budget.
# * **Teacher accuracy** and **weights vs the oracle**: FedGO's teacher is far more accurate than the
#   uniform one, and its toy weights far closer to the oracle's, beyond the seed spread.
# * **The data-free family**, each as its paper states its claim (docs/methods.md §1.3 says which setting
#   is the paper's, which the authors', which ours). Why they may fail at our scale, from budget sweeps of
#   library calls on the quick problem (not this notebook's table, so no numbers here):
#   - FedGen's client term at the authors' weight 10 collapses our clients (their SGD lr makes a 10x-weighted
#     regulariser dominate), hence `fedgen_weight` = 1 here. At weight 1 its generator budget decides: the
#     quick budget of `fedgen_steps` generator steps a round leaves FedGen below FedAvg, about fifty reach
#     FedAvg's level and the authors' two hundred go above it. So "FedGen beats FedAvg and FedProx" and the
#     ablation claim are expected not to hold at `quick`: the regulariser helps once its generator is trained.
#   - FedFTG's fine-tuning lowers the FedAvg model it starts from at our budget (the more student steps on
#     the generator's samples, the worse), because ten generator steps a round do not make samples near
#     the data.
#   - Co-Boosting against DENSE in one round: at two iterations of each fresh generator
#     (`coboosting_g_steps`, the quick budget) the claims table above gives this run's verdict; in the
#     budget sweep, five iterations put Co-Boosting ahead beyond the spread.
#   These budgets are our scale, not the methods': the papers train their generators for hundreds to
#   thousands of steps.
# * **Overhead**: not negligible at our scale (E_d discriminator epochs, and for data-free the warm-up
#   round, against 5 × 1 local epochs of a classifier of about four thousand parameters), negligible at the
#   paper's scale by the same accounting (§7; an estimate: the paper-size models' bytes and FLOPs are measured,
#   the protocol sizes assumed): the one-off cost is amortised by rounds and by the classifier's size.
#
# Checked against docs/methods.md §1.2 point by point, with a test each (`tests/test_fedgo.py`): the
# discriminators' labels (real 1, G 0: their logit is log p_k − log p_G), which samples they see (their
# own data and as many G samples, padding masked), the weights' normalisation (over clients, with n_k;
# p_G cancels), and that the data-free scenario never reads the server half (nor do its choices: its
# E_d is searched against the search seed's own data-free G, §3).

