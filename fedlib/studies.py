"""Experiment set-ups shared by the notebooks (the top floor: it may use every other module).

A notebook cell stays short when what it needs is built here once, as a dataclass with named fields:

- :func:`teacher_study`: the image dataset, fedlib's cached diffusion teacher for it, the cached
  feature classifier that defines the Fréchet distance, and the reference statistics (notebooks 03,
  04 and 05 load exactly the same objects through it); ``image_size`` and ``teacher_overrides`` make a
  cheaper study of the same data (notebook 03's quick Fashion-MNIST).
- :func:`ld3_case`: one dataset of notebook 03's held-out LD3 study (an image dataset through
  :func:`teacher_study`, or a 2-D mixture with its exact samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data as fdata
from . import metrics
from .diffusion import Denoiser, pretrained_teacher


@dataclass
class TeacherStudy:
    """What a notebook on a pretrained image teacher starts from."""

    train: fdata.ArrayDataset
    test: fdata.ArrayDataset
    teacher: Denoiser
    features: metrics.FeatureNet
    ref_stats: tuple  # (mu, Sigma) of the test images in the feature space

    @property
    def shape(self) -> tuple:
        return tuple(self.train.x.shape[1:])

    def fd(self, x: torch.Tensor) -> float:
        """Fréchet distance of images ``x`` to the test set in fedlib's classifier feature space (not
        comparable to published FID)."""
        return metrics.classifier_fd(self.features, x, self.ref_stats)


def pooled(ds: fdata.ArrayDataset, side: int) -> fdata.ArrayDataset:
    """``ds`` with its images average-pooled to ``side`` x ``side`` (unchanged when already that size)."""
    if ds.x.shape[-1] == side:
        return ds
    x = torch.nn.functional.adaptive_avg_pool2d(ds.x, side)
    return fdata.ArrayDataset(x, ds.y, ds.n_classes, f"{ds.name}_{side}px")


def teacher_study(dataset: str = "digits", *, use_stand_in: bool = False, teacher_steps: int = 1500,
                  teacher_seed: int = 0, feature_steps: int = 600, device="cpu", progress: bool = True,
                  image_size: int | None = None, teacher_overrides: dict | None = None) -> TeacherStudy:
    """The dataset (or its seeded stand-in), the teacher trained once per (dataset, steps, seed) and
    cached, the feature classifier (seed 0, cached) and the test set's feature statistics.

    ``image_size``: average-pool the images to this side first (a cheaper study of the same data; the
    teacher, the classifier and the reference statistics all see the pooled images);
    ``teacher_overrides``: changes to :func:`fedlib.diffusion.teacher_config` (e.g. ``channels=8``),
    part of the teacher's cache key."""
    train, test = fdata.load_train_test(dataset, use_stand_in)
    if image_size is not None:
        train, test = pooled(train, image_size), pooled(test, image_size)
    own_data = train.name.startswith("stand_in") or image_size is not None
    teacher = pretrained_teacher(dataset, steps=teacher_steps, seed=teacher_seed, device=device, progress=progress,
                                 data=train if own_data else None, **(teacher_overrides or {}))
    features = metrics.feature_extractor(train, test, steps=feature_steps, seed=0, device=device)
    ref = metrics.gaussian_stats(metrics.extract_features(features, test.x))
    return TeacherStudy(train, test, teacher, features, ref)


# ---------------------------------------------------------------------------------------------
# Notebook 03 (LD3): one dataset of the held-out study

SMALL_TEACHER = dict(channels=8, channel_mults=(1, 2), batch_size=32, lr=3e-3, ema_decay=0.995)
"""A cheap image teacher (U-Net with 8 base channels and two levels): the quick set's Fashion-MNIST teacher."""


@dataclass
class LD3Case:
    """One dataset of notebook 03: the frozen teacher, the shape of a sample, LD3's loss there (the
    quantity it validates and the table reports) and the distribution metric reported beside it."""

    dataset: str
    teacher: Denoiser
    shape: tuple
    loss: str                 # "features" / "l2" / "lpips" (images), "l2" (2-D points)
    feature_fn: object        # the classifier's feature map (loss "features"), else None
    metric: object            # samples -> float, lower is better
    metric_name: str
    n_eval: int               # held-out noise draws per seed
    model_name: str           # names the teacher in LD3's cache of learned grids
    info: dict                # teacher facts for run.metrics


def ld3_case(dataset: str, *, teacher_steps: int, n_eval: int, teacher_seed: int = 0, feature_steps: int = 600,
             image_size: int | None = None, teacher: str = "default", loss: str = "features",
             use_stand_in: bool = False, device="cpu", progress: bool = False) -> LD3Case:
    """``"grid"`` / ``"ring"``: fedlib's MLP teacher on the 2-D mixture, LD3's L2 loss, and the sliced
    Wasserstein distance to ``n_eval`` exact samples of the mixture; an image dataset: :func:`teacher_study`
    (``image_size`` pools the images, ``teacher="small"`` trains :data:`SMALL_TEACHER`), LD3's ``loss``
    and the Fréchet distance in the classifier's feature space (not comparable to FID)."""
    if dataset in ("grid", "ring"):
        gm = fdata.mixture(dataset)
        t = pretrained_teacher(dataset, steps=teacher_steps, seed=teacher_seed, device=device, progress=progress)
        ref = gm.sample(n_eval, torch.Generator().manual_seed(7))[0]
        info = {"n_params": sum(p.numel() for p in t.parameters()), "final_loss": t.history["loss"][-1],
                "cached": t.history.get("cached"), "train_wall_time_s": t.history["wall_time_s"]}
        return LD3Case(dataset, t, (2,), "l2", None, lambda x: metrics.sliced_wasserstein(x, ref), "sliced W2",
                       n_eval, t.cache_path.stem, info)
    st = teacher_study(dataset, use_stand_in=use_stand_in, teacher_steps=teacher_steps, teacher_seed=teacher_seed,
                       feature_steps=feature_steps, device=device, progress=progress, image_size=image_size,
                       teacher_overrides=SMALL_TEACHER if teacher == "small" else None)
    t = st.teacher
    info = {"n_params": sum(p.numel() for p in t.parameters()), "final_loss": t.history["loss"][-1],
            "cached": t.history.get("cached"), "train_wall_time_s": t.history["wall_time_s"],
            "image_side": st.shape[-1], "feature_classifier_test_accuracy": st.features.test_accuracy}
    return LD3Case(dataset, t, st.shape, loss, st.features.features if loss == "features" else None, st.fd, "FD",
                   n_eval, t.cache_path.stem, info)
