import math

import pytest
import torch

from fedlib import metrics
from fedlib.data import ArrayDataset, mixture, stand_in


def _scipy_fd(mu1, s1, mu2, s2):
    import numpy as np
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_is_zero_on_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.5
    sa, sb = metrics.gaussian_stats(a), metrics.gaussian_stats(b)
    fd = metrics.frechet_distance(*sa, *sb)
    assert fd == pytest.approx(_scipy_fd(sa[0].numpy(), sa[1].numpy(), sb[0].numpy(), sb[1].numpy()), rel=1e-6)
    assert abs(metrics.frechet_distance(*sa, *sa)) < 1e-8


def test_frechet_distance_closed_form_for_isotropic_gaussians():
    # FD(N(0, a^2 I), N(m, b^2 I)) = |m|^2 + d (a - b)^2
    d = 5
    fd = metrics.frechet_distance(torch.zeros(d), 4 * torch.eye(d), torch.ones(d), torch.eye(d))
    assert fd == pytest.approx(d + d * (2 - 1) ** 2)


def test_frechet_distance_stable_on_singular_covariances():
    x = torch.randn(10, 64, dtype=torch.float64)  # rank 9 covariance in 64 dims
    s = metrics.gaussian_stats(x)
    fd = metrics.frechet_distance(*s, *s)
    assert math.isfinite(fd) and abs(fd) < 1e-6 * float(torch.trace(s[1]))  # ~64


def test_sliced_wasserstein_detects_shift_and_vanishes_on_same_cloud():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    assert metrics.sliced_wasserstein(x, x) == 0
    sw = metrics.sliced_wasserstein(x, x + torch.tensor([3.0, 0.0]))
    # projections of a shift (3, 0): mean |3 cos u|^2 = 4.5 -> sqrt ~ 2.12
    assert sw == pytest.approx(math.sqrt(4.5), rel=0.1)


def test_mode_coverage_and_likelihood_on_the_true_mixture_and_a_collapsed_one():
    gm = mixture("ring")
    x, _ = gm.sample(4000, torch.Generator().manual_seed(0))
    cov = metrics.mode_coverage(gm, x)
    assert cov["covered"] == 1.0 and cov["high_quality"] > 0.95
    collapsed = gm.means[0] + 0.01 * torch.randn(4000, 2)
    assert metrics.mode_coverage(gm, collapsed)["covered"] == pytest.approx(1 / gm.n_components)
    assert metrics.mixture_log_likelihood(gm, x) > metrics.mixture_log_likelihood(gm, x * 1.3)


@pytest.mark.parametrize("name,shape", [("digits", 8), ("fashion_mnist", 28)])
def test_feature_extractor_is_generic_cached_and_learns(tmp_path, monkeypatch, name, shape):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    train, test = stand_in(name, "train", n=256, seed=0), stand_in(name, "test", n=128, seed=0)
    net = metrics.feature_extractor(train, test, steps=60, device="cpu")
    assert net.test_accuracy > 0.5  # stand-in classes are separable templates
    f = metrics.extract_features(net, test.x)
    assert f.shape == (128, net.n_features)
    again = metrics.feature_extractor(train, test, steps=60, device="cpu")
    assert again.cache_path == net.cache_path and again.test_accuracy == net.test_accuracy
    torch.testing.assert_close(metrics.extract_features(again, test.x), f)
    assert metrics.classifier_fd(net, test.x, test.x) == pytest.approx(0, abs=1e-6)


def test_inception_fid_fails_fast_and_clearly_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        metrics.inception_fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), device="cpu")


def test_teacher_study_loads_the_same_teacher_and_features_for_every_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    from fedlib.studies import teacher_study

    a = teacher_study("digits", teacher_steps=5, feature_steps=5, progress=False)
    b = teacher_study("digits", teacher_steps=5, feature_steps=5, progress=False)
    assert a.teacher.history["cached"] is False and b.teacher.history["cached"] is True
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        assert torch.equal(pa, pb)
    assert a.shape == (1, 8, 8) and a.fd(a.test.x[:200]) < a.fd(torch.rand(200, 1, 8, 8) * 2 - 1)


def test_real_image_floor_of_a_teacher_study_scores_real_images_outside_its_reference():
    """Notebook 04's real-image FD row: the reference is every test image, so the floor must score other
    real images (the training images; the row says so). Scoring the test images scores the reference
    against itself: 0 for digits at the notebook's n_eval (500 > its 360 test images), a floor of nothing."""
    from fedlib.studies import TeacherStudy

    train = ArrayDataset(torch.full((30, 1, 8, 8), -0.5), torch.zeros(30, dtype=torch.long), 10, "train")
    test = ArrayDataset(torch.full((20, 1, 8, 8), 0.5), torch.zeros(20, dtype=torch.long), 10, "test")
    study = TeacherStudy(train, test, teacher=None, features=None, ref_stats=None)
    seen = []
    study.fd = lambda x: seen.append(x) or 0.0
    study.real_fd(12)
    assert len(seen) == 1 and seen[0].shape == (12, 1, 8, 8) and torch.equal(seen[0], train.x[:12])
    assert not any(torch.equal(img, ref) for img in seen[0] for ref in test.x), "an image of the reference scored"
