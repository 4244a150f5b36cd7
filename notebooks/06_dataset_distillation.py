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
# # 06 · Dataset distillation with neural characteristic functions (NCFM)
#
# **The paper's claim** (Wang et al., CVPR 2025; docs/methods.md, NCFM). A few synthetic images per class
# (IPC) can stand in for a whole training set if their features match the real data's *distribution*,
# not only its mean. NCFM measures the mismatch by the **neural characteristic function discrepancy**
# (NCFD): for the features f(x) of a network, φ_X(t) = mean exp(i tᵀf(x)), and NCFD averages
# |φ_X(t) − φ_S(t)|² over frequencies t, written as an amplitude term and a phase term weighted by α and
# 1 − α. The frequencies come from a small **sampling network** trained to *maximise* NCFD while the
# synthetic set *minimises* it (a min-max game). The paper reports that this beats distribution
# matching (DM, which matches only mean features) and the other matching methods on CIFAR-10/100 and
# ImageNet subsets, at a fraction of trajectory matching's memory and time.
#
# **How this notebook tests it.** On fedlib's 8×8 digits, at IPC 1 and 10, three sets of the same size
# per seed: NCFM, DM (same iterations, same random feature ConvNets, same real batches, same image
# optimiser) and a random real subset (also the starting point of both distilled sets). Each set trains a
# fresh classifier (fedlib's SmallCNN) from scratch; its test accuracy on the real test split decides
# the claims, on ≥ 3 seeds with the noise rule (`fedlib.verdicts`: a paired mean difference beyond 2
# standard errors holds; inside it is within noise). Cost: the floating-point operations of one iteration
# (counted, so the verdict repeats; the wall time is shown beside it) and the bytes autograd keeps for one
# iteration's backward pass (a deterministic CPU stand-in for the activation memory behind a GPU's peak),
# NCFM over DM.
#
# **Our scale.** A few hundred updates on a CPU where the paper runs tens of thousands on a GPU, no
# differentiable augmentation, a tiny ConvNet, and two choices of ours for the sampling network: its
# frequencies keep their initial mean norm (it picks their directions, not their size), and its learning
# rate was set on a validation split held out of the training set, never on the test split the claims
# read (docs/methods.md §7 says which settings are ours). The `long` set adds seeds
# and iterations; `paper` is CIFAR-10 at IPC 1/10/50 for a GPU.

# %% tags=["parameters", "explorer-setup"]
dataset = "digits"  # real data to distil [one of digits, fashion_mnist, cifar10]
use_stand_in = False  # use fedlib's seeded stand-in data of the dataset's shape (smoke runs of `paper`)
ipcs = [1, 10]  # synthetic images per class [non-empty; distinct; each min 1; each max 5000]
seeds = [0, 1, 2]  # seeds of every run (distillation and evaluation) [non-empty; distinct; each min 0; each max 2**31 - 1]
iterations = 100  # updates of each synthetic set, the same for NCFM and DM [min 1; max 2000000]
batch_real = 32  # real images per class per iteration [min 1; max 100000]
lr_images = 0.05  # Adam learning rate on the synthetic pixels, the same for NCFM and DM [> 0]
lr_sampler = 1e-4  # Adam learning rate of NCFM's sampling network (ascent on NCFD); ten times larger, the sampler outran the synthetic set at the long budget on a validation split of the training set [> 0]
alpha = 0.5  # weight of NCFD's amplitude term; 1 - alpha weighs the phase term [min 0; max 1]
n_freqs = 64  # frequencies drawn per iteration [min 1; max 100000]
freq_scale = 1.0  # initial spread of the frequencies, in units of 1 / sqrt(feature dim) [> 0; max 1000]
feature_width = 8  # channel width of the random feature ConvNets [min 1; max 1024]
init = "real"  # start of the synthetic sets [one of real, noise]
eval_steps = 150  # SGD steps of the classifier trained on each set [min 1; max 1000000]
eval_lr = 0.01  # SGD learning rate of that classifier (momentum 0.9) [> 0]
eval_width = 8  # channel width of that classifier [min 1; max 1024]
fedlgd_clients = 5  # FedLGD's clients (one domain each under feature shift) [min 2; max 6]
fedlgd_alpha = 0.5  # Dirichlet concentration of FedLGD's label skew [> 0]
fedlgd_rounds = 10  # communication rounds of FedLGD, FedAvg and FedProx [min 1; max 10000]
fedlgd_local_steps = 10  # client SGD steps per round [min 1; max 100000]
fedlgd_lr = 0.05  # client SGD learning rate [> 0]
fedlgd_ipc = 2  # local virtual images per class a client holds [min 1; max 5000]
fedlgd_dm_iterations = 30  # DM updates of each client's local virtual set [min 1; max 2000000]
fedlgd_refresh_every = 5  # rounds between FedLGD's iterative-DM refreshes of the local sets [min 1; max 10000]
fedlgd_refresh_iterations = 10  # DM updates per refresh, through the global model's features [min 0; max 1000000]
fedlgd_global_ipc = 2  # global virtual images per class on the server [min 1; max 5000]
fedlgd_server_steps = 5  # gradient-matching updates of the global virtual set per round [min 0; max 1000000]
fedlgd_lam = 1.0  # weight of FedLGD's contrastive anchor loss [min 0; max 1000]
fedlgd_tau = 0.5  # temperature of that loss [> 0; max 100]
fedlgd_mu = 0.01  # FedProx's proximal weight (the baseline) [min 0; max 1000]
backend = "inprocess"  # where FedLGD's rounds run: inprocess (vectorised, this process) | flower (Flower ServerApp and ClientApps on Ray; each client keeps its local virtual sets on its node) [one of inprocess, flower]
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

from fedlib import backends
from fedlib import condense as cd
from fedlib import data as fdata
from fedlib import fedlgd as fl
from fedlib.plots import savefig, use_style
from fedlib.results import Run, save_explorer
from fedlib.utils import resolve_device, seed_everything
from fedlib.verdicts import compare, compare_to

run = Run.start("06_dataset_distillation", globals())
use_style()
dev = resolve_device(device)
if dev.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)
t_start = time.perf_counter()
seed_everything(seeds[0])

# %% [markdown]
# ## 1. The discrepancy on a handful of points
# Two clouds of 2-D "features", the second shifted. At each frequency t, NCFD's amplitude term compares
# the moduli of the two characteristic functions and its phase term their angles; the two add up to
# |φ_X(t) − φ_S(t)|² exactly (`fedlib.condense.ncfd_terms`; a unit test checks it). A shift of the mean
# leaves the moduli alone and shows up in the phase; a change of spread shows up in the amplitude.

# %%
g = torch.Generator().manual_seed(0)
cloud = torch.randn(400, 2, generator=g) * 0.5
t_demo = torch.randn(256, 2, generator=g)
rows = []
for name, other in [("same set", cloud), ("mean shifted", cloud + torch.tensor([0.8, 0.0])),
                    ("spread doubled", 2 * cloud)]:
    amp, ph = cd.ncfd_terms(cloud, other, t_demo)
    rows.append({"S": name, "amplitude term": float(amp.mean()), "phase term": float(ph.mean()),
                 "NCFD (alpha 1/2)": float(cd.ncfd(cloud, other, t_demo, 0.5))})
display(pd.DataFrame(rows).set_index("S").round(4))

# %% [markdown]
# ## 2. Distil: NCFM, DM and the random subset, per IPC and seed
# Every iteration draws a fresh randomly initialised ConvNet (SmallCNN's feature trunk) and a batch of
# real images per class, from the seed's own stream, so NCFM and DM of one seed see the same networks and
# batches. NCFM first takes an ascent step of its sampling network, then a descent step of the synthetic
# images at fresh frequencies; DM takes the descent step on its mean-feature distance.

# %%
train, test = fdata.load_train_test(dataset, stand_in_data=use_stand_in)
train, test = train.to(dev), test.to(dev)
C = train.n_classes
print(f"{dataset}: {len(train)} training and {len(test)} test images of shape {tuple(train.x.shape[1:])}, {C} classes; "
      f"feature dimension {cd.feature_dim(tuple(train.x.shape[1:]), feature_width)}")
sets = {}
for ipc in ipcs:
    for seed in tqdm(seeds, desc=f"IPC {ipc}"):
        cfg = cd.CondenseConfig(ipc=ipc, iterations=iterations, batch_real=batch_real, lr_images=lr_images,
                                lr_sampler=lr_sampler, alpha=alpha, n_freqs=n_freqs, freq_scale=freq_scale,
                                feature_width=feature_width, init=init, seed=seed)
        sets["random", ipc, seed] = cd.random_subset(train.x, train.y, C, ipc, seed=seed)
        sets["DM", ipc, seed] = cd.distill_dm(train.x, train.y, C, cfg, device=dev)
        sets["NCFM", ipc, seed] = cd.distill_ncfm(train.x, train.y, C, cfg, device=dev)
METHODS = ["NCFM", "DM", "random"]

# %% [markdown]
# ## 3. A classifier trained on each set
# Every set trains a SmallCNN from scratch (the same starting weights for the three sets of a seed), all
# of them at once in one vectorised `fedlib.federated.local_train`; the figure's dashed line is the same
# classifier trained on the whole training split for as many steps, for scale.

# %%
keys = list(sets)
whole = cd.SyntheticSet(train.x, train.y, "whole", seeds[0])
acc = cd.evaluate_sets([sets[k] for k in keys] + [whole], test.x, test.y, C,
                       cd.EvalConfig(steps=eval_steps, lr=eval_lr, width=eval_width))
whole_acc = acc.pop()
ncfd_real = cd.measure_ncfd(train.x, train.y, [sets[k] for k in keys], C, width=feature_width)
results = pd.DataFrame([{"method": m, "ipc": i, "seed": s, "accuracy": a, "NCFD to the real set": v}
                        for (m, i, s), a, v in zip(keys, acc, ncfd_real)])
run.metrics.update(results=results.to_dict("records"), whole_training_set_accuracy=whole_acc)
display(results.groupby(["ipc", "method"])[["accuracy", "NCFD to the real set"]].agg(["mean", "std"]).round(4))
_ = savefig(plots.accuracy_figure(results, METHODS, {i: whole_acc for i in ipcs}), "06_accuracy")

# %% [markdown]
# The synthetic sets of the first seed, one column per class (at most ten rows per set). The random
# subset is where NCFM and DM start from, so the difference between the panels is what each
# objective changed.

# %%
for ipc in ipcs:
    fig = plots.synthetic_sets_figure({m: sets[m, ipc, seeds[0]].x.cpu() for m in METHODS}, ipc, C,
                                      title=f"IPC {ipc}, seed {seeds[0]}")
    _ = savefig(fig, f"06_sets_ipc{ipc}")

# %% [markdown]
# ## 4. Cost: NCFM against DM
# Per seed and IPC: the mean wall time of one whole iteration (drawing the network and the real batch
# included; NCFM's includes its sampler's ascent step), the floating-point operations of the first
# iteration (`flops`, counted by `torch.utils.flop_counter`: matrix products and convolutions, the same
# every run, so the claim is decided on them; seconds vary with the machine's load) and
# the bytes autograd saves for the synthetic step's backward pass (`saved_bytes`, counted once per run
# through `torch.autograd.graph.saved_tensors_hooks`: the activations that set a GPU's peak memory in
# the paper's comparison; the parameters and data are the same for both methods and not counted).

# %%
cost = pd.DataFrame([{"ipc": i, "seed": s,
                      "seconds / iteration, NCFM": np.mean(sets["NCFM", i, s].history["seconds"]),
                      "seconds / iteration, DM": np.mean(sets["DM", i, s].history["seconds"]),
                      "saved bytes, NCFM": sets["NCFM", i, s].history["saved_bytes"],
                      "saved bytes, DM": sets["DM", i, s].history["saved_bytes"],
                      "operations, NCFM": sets["NCFM", i, s].history["flops"],
                      "operations, DM": sets["DM", i, s].history["flops"]} for i in ipcs for s in seeds])
cost["time ratio"] = cost["seconds / iteration, NCFM"] / cost["seconds / iteration, DM"]
cost["memory ratio"] = cost["saved bytes, NCFM"] / cost["saved bytes, DM"]
cost["operations ratio"] = cost["operations, NCFM"] / cost["operations, DM"]
run.metrics["cost"] = cost.to_dict("records")
display(cost.groupby("ipc").mean().drop(columns="seed").round(4))
_ = savefig(plots.cost_figure({**{f"seconds\nIPC {i}": cost[cost.ipc == i]["time ratio"] for i in ipcs},
                               **{f"operations\nIPC {i}": cost[cost.ipc == i]["operations ratio"] for i in ipcs},
                               **{f"memory\nIPC {i}": cost[cost.ipc == i]["memory ratio"] for i in ipcs}}), "06_cost")

# %% [markdown]
# ## 5. FedLGD: federated learning on local virtual data
# **The paper's claim** (Huang et al., CVPR 2024; docs/methods.md §7.1). Clients that train on small
# *local virtual sets* distilled from their data (by DM) keep their data private and train cheaply, but
# distilled sets make the clients' data *more* different from one another (the paper's observation), which
# hurts FedAvg. FedLGD adds two pieces of global information: the server learns a *global virtual set* by
# federated gradient matching (its gradients at the global model match the clients' averaged gradients,
# class by class) and uses it as anchors of a contrastive loss in local training; every few rounds the
# clients refresh their local sets by DM through the current global model's features. The paper reports
# that FedLGD beats FedAvg, FedProx and other methods trained on the same local virtual data, under label
# skew and under feature shift (digits datasets as domains).
#
# **How this notebook tests it.** The same 8×8 digits, per seed, in two federations of `fedlgd_clients`
# clients: label skew (a Dirichlet partition) and feature shift (client k holds a class-stratified share
# moved to domain k by a fixed transform, `fedlib.data.domain_split`; tested on every domain's copy of
# the test split). Each client distils a local virtual set by DM once; FedAvg and FedProx train on these
# sets, FedLGD on the same sets refreshed by its iterative DM, with its anchors. All start from the same
# model; the claims read the global model's test accuracy after the last round, paired over the seeds by
# the noise rule. The heterogeneity observation is measured by how far client models drift apart in one
# round from the same start (mean squared distance to their mean), on the local virtual sets against
# the real local data with the same steps. **Our scale**: a few clients, rounds and DM updates, IPC small,
# a width-8 SmallCNN; the settings the paper does not fix are ours and not tuned (docs/methods.md §7.1).

# %%
fedlgd_cfg = dict(rounds=fedlgd_rounds, local_steps=fedlgd_local_steps, lr=fedlgd_lr, ipc=fedlgd_ipc,
                  dm_iterations=fedlgd_dm_iterations, batch_real=batch_real, lr_images=lr_images,
                  refresh_every=fedlgd_refresh_every, refresh_iterations=fedlgd_refresh_iterations,
                  global_ipc=fedlgd_global_ipc, server_steps=fedlgd_server_steps, lam=fedlgd_lam, tau=fedlgd_tau,
                  mu=fedlgd_mu, width=eval_width, feature_width=feature_width)
fedlgd_out, spread = {}, []
for seed in tqdm(seeds, desc="FedLGD"):
    cfg = fl.FedLGDConfig(**fedlgd_cfg, seed=seed)
    for setting, (clients, tests) in fl.federations(train, test, fedlgd_clients, fedlgd_alpha, seed).items():
        fedlgd_out[setting, seed] = out = backends.run_fedlgd(clients, tests, C, cfg, device=dev, backend=backend)
        spread.append({"setting": setting, "seed": seed, **fl.heterogeneity(clients, out["local_sets"], C, cfg)})
SETTINGS = ["label skew", "feature shift"]
rounds_frame = pd.DataFrame([{"setting": st, "seed": s, "method": m, "round": r, "accuracy": a}
                             for (st, s), o in fedlgd_out.items() for m, v in o["accuracy"].items()
                             for r, a in enumerate(v)])
spread = pd.DataFrame(spread)
final = rounds_frame[rounds_frame["round"] == fedlgd_rounds - 1]
run.metrics.update(fedlgd_rounds=rounds_frame.to_dict("records"), fedlgd_spread=spread.to_dict("records"))
display(final.pivot_table(index="setting", columns="method", values="accuracy", aggfunc=["mean", "std"]).round(4))
display(spread.groupby("setting")[["virtual", "real"]].agg(["mean", "std"]).round(4))
_ = savefig(plots.fedlgd_rounds_figure(rounds_frame, list(fl.METHODS)), "06_fedlgd_rounds")

# %% [markdown]
# The first seed's sets under feature shift: each client's local virtual set after FedLGD's last refresh
# (one row per client, class-major, only the classes it holds) and the server's global virtual set, which
# started from noise and was shaped only by the clients' gradients.

# %%
o = fedlgd_out["feature shift", seeds[0]]
_ = savefig(plots.virtual_sets_figure([s.x.cpu() for s in o["refreshed"]], o["global"][0],
                                      title=f"feature shift, seed {seeds[0]}: local (refreshed) and global virtual sets"),
            "06_fedlgd_sets")

# %% [markdown]
# ## 6. Explorer
# Pick an IPC, a seed and a method: the grid shows that synthetic set (one column per class) and its
# classifier's test accuracy. The `view` control switches to FedLGD's sets of the chosen seed in either
# federation (the clients' local virtual sets as distilled, or after FedLGD's refreshes, and the global set). It reads only the data this run stored (`fedlib.results.save_explorer`),
# so after opening the committed notebook, run the cells tagged `explorer-setup` and the explorer alone.

# %%
_ = save_explorer("06_dataset_distillation", {
    "n_classes": C, "ipcs": list(ipcs), "seeds": list(seeds), "methods": METHODS,
    "sets": {f"{m} ipc {i} seed {s}": plots.to_uint8(sets[m, i, s].x) for (m, i, s) in keys},
    "accuracy": {f"{m} ipc {i} seed {s}": a for (m, i, s), a in zip(keys, acc)},
    "fedlgd_views": [f"FedLGD {st}, {w} local sets" for st in SETTINGS for w in ("initial", "refreshed")],
    "fedlgd_sets": {f"{st} seed {s}": {"initial": [plots.to_uint8(v.x) for v in o["local_sets"]],
                                       "refreshed": [plots.to_uint8(v.x) for v in o["refreshed"]],
                                       "global": plots.to_uint8(o["global"][0])} for (st, s), o in fedlgd_out.items()},
    "fedlgd_accuracy": {f"{st} seed {s}": {m: v[-1] for m, v in o["accuracy"].items()}
                        for (st, s), o in fedlgd_out.items()}})

# %% tags=["explorer"]
explorer_data = load_explorer("06_dataset_distillation")


views = ["distilled sets"] + explorer_data.get("fedlgd_views", [])


def explore(ipc=explorer_data["ipcs"][0], seed=explorer_data["seeds"][0], method=explorer_data["methods"][0],
            view=views[0]):
    if view == "distilled sets":
        plots.condense_explorer_figure(explorer_data, ipc, seed, method)
    else:  # "FedLGD <setting>, <initial|refreshed> local sets"
        setting, which = view[len("FedLGD "):].split(", ")
        plots.fedlgd_explorer_figure(explorer_data, setting, seed, which.split()[0])
    plt.show()


widgets.interactive(explore, ipc=explorer_data["ipcs"], seed=explorer_data["seeds"], method=explorer_data["methods"],
                    view=views)

# %% [markdown]
# ## 7. Claims
# Each verdict is computed above, in this run, paired over the seeds by the noise rule. "Little cost" is
# our reading of the paper's cost claim (made against trajectory matching, which we do not run): NCFM at
# most twice DM's operations per iteration and saved bytes. FedLGD's claims compare the global model's
# accuracy after the last round, method against baseline on the same seed; the heterogeneity claims compare
# the spread of client models after one round on the local virtual sets against the real local data.

# %%
by = {k: results.set_index(["method", "ipc", "seed"])["accuracy"][k] for k in METHODS}
for ipc in ipcs:
    a = {m: [by[m][ipc, s] for s in seeds] for m in METHODS}
    run.claim(f"a model trained on the NCFM set beats one trained on the DM set (IPC {ipc})",
              "NCFM beats DM on CIFAR-10/100 at every IPC", None,
              compare(a["NCFM"], a["DM"], a_name="NCFM accuracy", b_name="DM accuracy"))
    run.claim(f"a model trained on the NCFM set beats one trained on a random real subset (IPC {ipc})",
              "distilled sets beat random real subsets", None,
              compare(a["NCFM"], a["random"], a_name="NCFM accuracy", b_name="random accuracy"))
for ipc in ipcs:
    c = cost[cost.ipc == ipc]
    run.claim(f"NCFM's operations per iteration are at most twice DM's (IPC {ipc})",
              "NCFM is fast: about 20x faster than trajectory matching", None,
              compare_to(c["operations ratio"], 2.0, name="NCFM / DM floating-point operations per iteration"))
    run.claim(f"NCFM's backward memory is at most twice DM's (IPC {ipc})",
              "NCFM is light: about 300x less memory than trajectory matching", None,
              compare_to(c["memory ratio"], 2.0, name="NCFM / DM saved bytes"))
ncfd = results.set_index(["method", "ipc", "seed"])["NCFD to the real set"]
for ipc in ipcs:
    run.claim(f"NCFM lowers NCFD to the real set below its starting subset's (IPC {ipc})", "NCFM minimises NCFD", None,
              compare([ncfd["NCFM", ipc, s] for s in seeds], [ncfd["random", ipc, s] for s in seeds],
                      a_name="NCFM set", b_name="random start", higher_is_better=False),
              note="at fixed Gaussian frequencies and fixed random networks (`condense.measure_ncfd`), not the "
                   "sampler's: a yardstick that does not move with the game")
fin = final.set_index(["setting", "method", "seed"])["accuracy"]
for setting in SETTINGS:
    a = {m: [fin[setting, m, s] for s in seeds] for m in fl.METHODS}
    for base in ("FedAvg", "FedProx"):
        run.claim(f"FedLGD beats {base} trained on the same local virtual data ({setting})",
                  f"FedLGD beats {base} on local virtual data, label skew (CIFAR-10) and feature shift (digits domains)",
                  None, compare(a["FedLGD"], a[base], a_name="FedLGD accuracy", b_name=f"{base} accuracy"),
                  note="the global model's test accuracy after the last round"
                       + (", averaged over the clients' domains" if setting == "feature shift" else ""))
sp = spread.set_index(["setting", "seed"])
for setting in SETTINGS:
    run.claim(f"local virtual data pull client models further apart than the real local data ({setting})",
              "distilled local data amplify the heterogeneity of the clients", None,
              compare([sp.loc[(setting, s), "virtual"] for s in seeds], [sp.loc[(setting, s), "real"] for s in seeds],
                      a_name="spread on virtual sets", b_name="spread on real data"),
              note="mean squared distance of the client models to their mean after one round from one start")
run.metrics.update(wall_time_s=time.perf_counter() - t_start, cpu_time_s=time.process_time())
run.claims_table()

# %% [markdown]
# ## 8. Reading the verdicts
# **NCFM against DM.** On 8×8 digits the two distilled sets train classifiers of about the same accuracy
# at both IPCs (section 3's table and the claims, in the quick and the `long` set alike); both beat the
# random subsets they start from, by far at IPC 1. The NCFD yardstick of section 3, at fixed Gaussian
# frequencies, says why the characteristic function buys little here: DM's mean matching lowers it about
# as much as NCFM does. At the frequencies that matter the phase term is the mismatch of the means, and a
# class of 8×8 digits seen through a small random ConvNet is nearly described by its mean when the
# synthetic set holds one or ten images. The paper's gains are on CIFAR-10/100 and ImageNet subsets,
# whose classes are far from one mean, with differentiable augmentation, a wider ConvNet and tens of
# thousands of iterations. What is missing here to test the claim: richer classes (the `fashion_mnist`
# set is the next step on this machine, CIFAR-10 in the `paper` set on a GPU) and budget.
#
# **The min-max game needs a tether.** Left free, the sampling network's ascent moved the frequencies to
# where one or ten images cannot follow the real class, and in our trial runs over a few hundred
# iterations NCFM's sets fell below DM's and even below their random start (docs/methods.md §7). Keeping the frequencies' size fixed
# and the sampler's learning rate small, set on a validation split, keeps the game from running away.
#
# **Cost.** At this size an iteration is a few dozen small operations, so its wall time counts Python and
# kernel launches as much as arithmetic: the figure shows both ratios, seconds and counted operations; the
# claim reads the counted ones, which repeat exactly. Counted, NCFM's iteration is more than twice DM's
# at this size (its sampler's ascent is a second pass through the features' frequency products), so
# "at most twice DM's time" does not hold here. The bytes saved for the
# backward pass stay near DM's at IPC 10. With the paper's networks the real images' features dominate
# both methods' iterations and the time ratio should fall towards one; the `paper` set measures it on a GPU.
#
# **FedLGD.** What decides its four comparisons is the final global accuracy of three federations that
# share everything but FedLGD's two additions, so a verdict within noise says that at this scale the
# anchors and the refreshes change the global model less than the seeds do. Two things to read beside the
# table: the per-round curves (whether the methods part early and meet again, or never part), and the
# spread of client models, which says whether the local virtual sets here are more heterogeneous than the
# real local data at all; where they are not, the problem FedLGD corrects is absent at this scale, and
# beating FedAvg would not be expected. The paper's gains are on CIFAR-10 and five real digit datasets,
# with larger virtual sets and many more rounds (the `paper` set); our domains are fixed transforms of one
# small dataset, and the global virtual set has had few gradient-matching steps to move away from noise.

# %%
print(f"notebook wall time: {run.metrics['wall_time_s']:.0f} s (CPU time of the kernel: {run.metrics['cpu_time_s']:.0f} s)")
_ = run.finish()
