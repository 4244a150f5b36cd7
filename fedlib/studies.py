"""Experiment set-ups shared by the notebooks (the top floor: it may use every other module).

A notebook cell stays short when what it needs is built here once, as a dataclass with named fields:

- :func:`teacher_study`: the image dataset, fedlib's cached diffusion teacher for it, the cached
  feature classifier that defines the Fréchet distance, and the reference statistics (notebooks 03,
  04 and 05 load exactly the same objects through it).
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


def teacher_study(dataset: str = "digits", *, use_stand_in: bool = False, teacher_steps: int = 1500,
                  teacher_seed: int = 0, feature_steps: int = 600, device="cpu", progress: bool = True) -> TeacherStudy:
    """The dataset (or its seeded stand-in), the teacher trained once per (dataset, steps, seed) and
    cached, the feature classifier (seed 0, cached) and the test set's feature statistics."""
    train, test = fdata.load_train_test(dataset, use_stand_in)
    teacher = pretrained_teacher(dataset, steps=teacher_steps, seed=teacher_seed, device=device, progress=progress,
                                 data=train if train.name.startswith("stand_in") else None)
    features = metrics.feature_extractor(train, test, steps=feature_steps, seed=0, device=device)
    ref = metrics.gaussian_stats(metrics.extract_features(features, test.x))
    return TeacherStudy(train, test, teacher, features, ref)
