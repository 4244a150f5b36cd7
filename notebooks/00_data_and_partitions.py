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
# # 00 · Data and partitions: what "non-IID" means
#
# Every paper notebook in fedlib stands on the data shown here.
#
# * **digits** — scikit-learn's bundled 8×8 handwritten digits (1797 real images, 10 classes), the
#   embedded default that runs anywhere, offline.
# * **2-D toys** — Gaussian mixtures (grid, ring) whose exact density is known, plus moons, swiss roll and
#   checkerboard; exact densities give exact metrics (sliced Wasserstein, log-likelihood) and the
#   *oracle* ensemble weights of FedGO (docs/methods.md §1.2).
# * **Fashion-MNIST** — FedDM's own dataset, found offline in Debian's `dataset-fashion-mnist`.
#
# Federated papers split data over clients by a **Dirichlet label skew** (docs/methods.md §1.4): every
# class is divided among the K clients by proportions drawn from Dirichlet(α). Small α (0.05) leaves
# each client one or two classes; large α approaches IID. FedGO additionally gives **half of every
# class, unlabeled, to the server**. This notebook shows those splits and checks their invariants; its
# explorer (section 5) draws any α and partition from what the run stored.

# %% tags=["parameters"]
seed = 0  # seed of every partition drawn here [min 0; max 2**31 - 1]
n_clients = 10  # K, the number of clients [min 1; max train_size("digits") // 4]
alphas = [0.05, 0.1, 1.0, 100.0]  # Dirichlet concentrations shown in the heatmaps [non-empty; each > 0]
toy_points = 2000  # points per 2-D toy dataset [min 10; max 500000]
show_fashion_mnist = True  # also show Fashion-MNIST when Debian's files are present

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from fedlib import data as fdata
from fedlib import plots
from fedlib.plots import image_grid, savefig, use_style
from fedlib.results import Run, save_explorer

use_style()
run = Run.start("00_data_and_partitions", globals())

# %% [markdown]
# ## 1 · The rule, on a handful of numbers
# Three classes of ten samples, four clients. For each class c the split draws proportions
# π_c ~ Dirichlet(α·1) over the clients and deals the class's samples out accordingly. Small α puts
# almost all of a class on one client; large α spreads it evenly.

# %%
rng = np.random.default_rng(seed)
for a in (0.1, 100.0):
    pi = rng.dirichlet(a * np.ones(4), size=3)  # [class, client]
    counts = np.array([rng.multinomial(10, p) for p in pi])
    print(f"alpha={a:<5}  pi_c (rows = classes):", np.round(pi, 2).tolist())
    print(f"             samples per client:      ", counts.tolist())

# %% [markdown]
# ## 2 · The embedded dataset: digits
# A fixed stratified 80/20 split (seed 0); pixels scaled to [-1, 1].

# %% tags=["nbval-check-output"]
train, test = fdata.load_digits("train"), fdata.load_digits("test")
print("train", tuple(train.x.shape), "test", tuple(test.x.shape), "classes", train.n_classes)
print("range", float(train.x.min()), float(train.x.max()))
print("train counts", train.label_counts().tolist())

# %%
order = np.argsort(train.y.numpy(), kind="stable")
pick = np.concatenate([order[train.y.numpy()[order] == c][:8] for c in range(10)])
fig, ax = plt.subplots(figsize=(4.5, 5.5))
image_grid(train.x[pick], nrow=8, ax=ax, title="digits: 8 training images per class")
_ = savefig(fig, "00_digits_samples")

# %% [markdown]
# ## 3 · 2-D toy data
# Colours are the component (mixtures) or segment labels; mixtures also carry their exact log-density.

# %%
toys = {name: fdata.toy_2d(name, toy_points, seed) for name in fdata.TOY_NAMES}
fig, axes = plt.subplots(1, len(toys), figsize=(3 * len(toys), 3))
for ax, (name, ds) in zip(axes, toys.items()):
    ax.scatter(ds.x[:, 0], ds.x[:, 1], c=ds.y, s=2, cmap="tab20")
    ax.set(title=f"{name} ({ds.n_classes} labels)", aspect="equal")
_ = savefig(fig, "00_toy_2d")

# %%
gm = fdata.mixture("grid")
xs = np.linspace(-3, 3, 200)
logp = gm.log_prob(torch.tensor(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2), dtype=torch.float32))
fig, ax = plt.subplots(figsize=(3.5, 3.2))
im = ax.imshow(logp.reshape(200, 200).clamp(min=-10), extent=(-3, 3, -3, 3), origin="lower")
fig.colorbar(im, ax=ax, label="log p(x)")
ax.set_title("grid mixture: exact log-density")
_ = savefig(fig, "00_grid_logdensity")
# the exact density integrates to one (a check on the closed form)
run.metrics["grid_density_mass"] = float(logp.exp().sum() * (xs[1] - xs[0]) ** 2)
print("mass of the exact density on [-3, 3]^2:", round(run.metrics["grid_density_mass"], 4))

# %% [markdown]
# ## 4 · Dirichlet label skew over K clients
# Each row is a client, each column a class; colour is the share of that class in the client's data
# (one colour scale for all panels; the global share is 0.1 per class). At α = 0.05 most clients see
# one or two classes; at α = 100 every client sees every class in near the global proportions. The
# number under each panel is the mean total-variation distance of the clients' label mix from the
# global one (0: IID, 1: disjoint).

# %%
labels = train.y.numpy()
splits = {a: fdata.dirichlet_partition(labels, n_clients, a, seed=seed) for a in alphas}
counts = {a: fdata.label_distribution(labels, parts, 10) for a, parts in splits.items()}
tv = {a: plots.label_tv(c) for a, c in counts.items()}
run.metrics["label_tv_by_alpha"] = {str(a): v for a, v in tv.items()}
fig = plots.label_heatmaps({f"alpha = {a}\nTV {tv[a]:.2f}": c for a, c in counts.items()})
_ = savefig(fig, "00_dirichlet_heatmaps")

# %% tags=["nbval-check-output"]
# invariants: every training index lands on exactly one client, every client above the minimum size
cover_ok = {a: bool(len(np.concatenate(parts)) == len(labels)
                   and len(np.unique(np.concatenate(parts))) == len(labels)
                   and min(len(p) for p in parts) >= 2) for a, parts in splits.items()}
print("every index assigned exactly once, every client >= 2 samples:", cover_ok)

# %% [markdown]
# ## 5 · The FedGO split
# Half of each class goes, unlabeled, to the server (its distillation set); the other half is split over
# the clients by Dirichlet(α). The test set is never touched.

# %% tags=["nbval-check-output"]
client_parts, server_idx = fdata.fedgo_split(labels, n_clients, alpha=0.1, seed=seed)
client_all = np.concatenate(client_parts)
print("server samples", len(server_idx), "client samples", len(client_all), "clients", len(client_parts))
print("overlap server/client:", len(np.intersect1d(server_idx, client_all)))
print("server per class", np.bincount(labels[server_idx], minlength=10).tolist())

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3), gridspec_kw={"width_ratios": [3, 1]})
axes[0].imshow(fdata.label_distribution(labels, client_parts, 10), cmap="Blues", aspect="auto")
axes[0].set(title="FedGO split, alpha = 0.1: client label counts", xlabel="class", ylabel="client")
axes[0].grid(False)
axes[1].bar(range(10), np.bincount(labels[server_idx], minlength=10), color="gray")
axes[1].set(title="server (unlabeled)", xlabel="class")
_ = savefig(fig, "00_fedgo_split")

# %% [markdown]
# ## 6 · Explorer
# Pick α and a partition; the heatmap shows the clients' label shares. The run stored the label counts
# of every (partition, α) pair (`results/quick/00_data_and_partitions/explorer.pt`), so the explorer
# needs only the next two cells of a committed notebook, not a re-run.

# %%
partitions = {"dirichlet": lambda a: splits[a],
              "fedgo split (client half)": lambda a: fdata.fedgo_split(labels, n_clients, a, seed=seed)[0],
              "shards (2 per client)": lambda a: fdata.shard_partition(labels, n_clients, 2, seed=seed),
              "iid": lambda a: fdata.iid_partition(len(labels), n_clients, seed=seed)}
_ = save_explorer("00_data_and_partitions", {
    "alphas": list(alphas), "partitions": list(partitions),
    "counts": {p: {str(a): torch.tensor(fdata.label_distribution(labels, f(a), 10)) for a in alphas}
               for p, f in partitions.items()}})

# %% tags=["explorer-setup"]
import ipywidgets as widgets
import matplotlib.pyplot as plt

from fedlib import plots
from fedlib.results import load_explorer

# %% tags=["explorer"]
store = load_explorer("00_data_and_partitions")


def show_partition(partition=store["partitions"][0], alpha=store["alphas"][0]):
    c = store["counts"][partition][str(alpha)].numpy()
    plots.label_heatmaps({f"{partition}, alpha = {alpha}: TV {plots.label_tv(c):.2f}": c}, width=4.5)
    plt.show()


# interactive, not interact: papermill now and then never returned from an interact cell (nteract/papermill#723)
widgets.interactive(show_partition, partition=store["partitions"], alpha=store["alphas"])

# %%
show_partition("fedgo split (client half)", 0.1)  # the explorer's view for readers of the static notebook

# %% [markdown]
# ## 7 · Fashion-MNIST (FedDM's dataset), when Debian's files are present

# %%
fashion_status = "skipped"
if show_fashion_mnist:
    try:
        fm = fdata.load_dataset("fashion_mnist", "train")
        fashion_status = f"{len(fm)} train images of shape {fm.shape}"
        fig, ax = plt.subplots(figsize=(5, 3))
        image_grid(fm.x[:32], nrow=8, ax=ax, title="Fashion-MNIST (train)")
        _ = savefig(fig, "00_fashion_mnist_samples")
    except fdata.DatasetUnavailable as err:
        fashion_status = f"skipped: {err}"
print("Fashion-MNIST:", fashion_status)
run.metrics["fashion_mnist"] = fashion_status

# %% [markdown]
# ## Claims
# This notebook makes no paper claim; its claims are the invariants every other notebook relies on
# (deterministic: no seed spread to weigh).

# %%
tv_small, tv_large = tv[min(alphas)], tv[max(alphas)]
run.claim("Dirichlet partition assigns every sample exactly once", "by construction (docs/methods.md §1.4)",
          f"{sum(cover_ok.values())}/{len(cover_ok)} splits exact covers", all(cover_ok.values()), required=True)
run.claim("small alpha is strongly non-IID, large alpha near IID", "alpha 0.05 -> 1-2 classes; large alpha -> IID",
          f"mean TV {tv_small:.2f} at alpha={min(alphas)} vs {tv_large:.3f} at alpha={max(alphas)}",
          tv_small > 0.5 and tv_large < 0.1 if len(alphas) > 1 else None, required=len(alphas) > 1)
run.claim("FedGO split: server and clients disjoint, half of each class to the server", "docs/methods.md §1.2",
          f"{len(server_idx)} server / {len(client_all)} client",
          len(np.intersect1d(server_idx, client_all)) == 0 and abs(len(server_idx) - len(client_all)) <= 10,
          required=True)
run.finish()
run.claims_table()
