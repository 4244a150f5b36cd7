"""Learned proximal networks (fedlib.lpn): ψ is convex, f = ∇ψ, f is the prox of the R it defines, and
the configuration refuses bad values by name. Untrained (randomly initialised) networks: every property
holds for any weights, which is the point of the construction."""

import pytest
import torch

from fedlib import lpn as L


def _vector_psi(seed=0, dim=2):
    torch.manual_seed(seed)
    psi = L.ICNN(dim, hidden=16, layers=3, alpha=0.1, beta=4.0)
    with torch.no_grad():  # spread the weights so that the network is far from a quadratic
        for p in psi.parameters():
            p.add_(torch.randn_like(p))
    return psi


def _conv_psi(seed=0):
    torch.manual_seed(seed)
    psi = L.ConvICNN(1, hidden=4, layers=2, alpha=0.1)
    with torch.no_grad():
        for p in psi.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return psi


@pytest.mark.parametrize("make, shape", [(_vector_psi, (2,)), (_conv_psi, (1, 6, 6))])
def test_psi_is_convex_along_random_lines(make, shape):
    psi = make()
    g = torch.Generator().manual_seed(1)
    a, d = torch.randn(32, *shape, generator=g), torch.randn(32, *shape, generator=g)
    t = torch.linspace(-3, 3, 41)
    with torch.no_grad():
        vals = torch.stack([psi(a + s * d) for s in t])  # [41, 32]
    second = vals[2:] - 2 * vals[1:-1] + vals[:-2]
    # the strongly convex term alone gives α h² ||d||²: the second differences are at least that
    h = float(t[1] - t[0])
    floor = psi.alpha * h ** 2 * (d.flatten(1) ** 2).sum(1)
    assert (second >= floor - 1e-4).all()


def test_the_plain_denoiser_is_not_a_gradient_field():
    # the control: without the sign constraints the same layers give a map whose Jacobian is not symmetric
    torch.manual_seed(0)
    net = L.PlainDenoiser(1, hidden=4, layers=2)
    y = torch.randn(1, 1, 4, 4)
    J = torch.autograd.functional.jacobian(lambda v: net(v.view(1, 1, 4, 4)).flatten(), y.flatten())
    assert (J - J.T).abs().max() > 1e-3


def test_f_is_the_gradient_of_psi():
    psi = _vector_psi()
    y = torch.randn(8, 2, dtype=torch.float64)
    psi = psi.double()
    f = L.lpn(psi, y)
    h = 1e-5
    fd = torch.stack([(psi(y + h * e) - psi(y - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(f, fd.detach(), atol=1e-6)


def test_the_image_lpn_is_the_gradient_of_its_psi_and_starts_at_the_identity():
    # directional finite differences of ψ match <f(y), d>; at initialisation f is close to the identity
    # (the starting point the training relies on), and after the perturbation it is far from it
    torch.manual_seed(0)
    fresh = L.ConvICNN(1, hidden=4, layers=2, alpha=1e-3).double()
    y = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    assert (L.lpn(fresh, y) - y).abs().max() < 0.1 * y.abs().max()
    psi = _conv_psi().double()
    f = L.lpn(psi, y)
    assert (f - y).abs().max() > 0.5
    d = torch.randn_like(y)
    h = 1e-5
    fd = (psi(y + h * d) - psi(y - h * d)) / (2 * h)
    assert torch.allclose((f * d).flatten(1).sum(1), fd.detach(), atol=1e-6)


def test_training_the_image_lpn_lowers_the_loss():
    # a flat loss (a learning-rate or gradient problem) fails here: MSE warm start then proximal matching
    # blocky two-level images in [-1, 1] (2x2 blocks): a denoiser has something to learn from them
    blocks = (torch.rand(256, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).double() * 2 - 1
    x = blocks.float().repeat_interleave(2, -1).repeat_interleave(2, -2)
    cfg = L.LPNConfig(hidden=8, layers=2, sigma=0.2, steps=40, batch=32, lr=1e-2, loss="mse")
    torch.manual_seed(0)
    psi = L.ConvICNN(1, cfg.hidden, cfg.layers, cfg.alpha, cfg.beta)
    h = L.train(psi, lambda n, g: x[torch.randint(len(x), (n,), generator=g)], cfg)
    assert sum(h["loss"][-10:]) < 0.9 * sum(h["loss"][:10])


def test_invert_solves_f_of_y_equals_x():
    psi = _vector_psi().double()
    x = torch.randn(16, 2, dtype=torch.float64)
    y = L.invert(psi, x, iters=300)
    assert (L.lpn(psi, y) - x).abs().max() < 1e-4


def test_lpn_is_the_prox_of_its_regulariser():
    # for x = f(y): x minimises R(z) + 1/2 ||z - y||² over z (checked at random z, near and far), and the
    # gradient of R at x, by finite differences through the inversion, is y - x (the prox's optimality)
    psi = _vector_psi().double()
    g = torch.Generator().manual_seed(2)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    x, r_x = L.regulariser_at_image(psi, y)
    objective_x = r_x + 0.5 * ((x - y) ** 2).sum(1)
    for scale in (0.05, 0.5, 2.0):
        z = x + scale * torch.randn(6, 2, generator=g, dtype=torch.float64)
        objective_z = L.regulariser(psi, z, iters=500) + 0.5 * ((z - y) ** 2).sum(1)
        assert (objective_z >= objective_x - 1e-6).all(), scale
    h = 1e-4
    grad = torch.stack([(L.regulariser(psi, x + h * e, 500) - L.regulariser(psi, x - h * e, 500)) / (2 * h)
                        for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(grad, y - x, atol=1e-6)


def test_regulariser_at_image_matches_the_inversion():
    psi = _vector_psi().double()
    y = torch.randn(10, 2, dtype=torch.float64)
    x, r = L.regulariser_at_image(psi, y)
    assert torch.allclose(L.regulariser(psi, x, iters=300), r, atol=1e-5)


def test_prior_error_ignores_constants_and_sees_shape():
    t = torch.linspace(-2, 2, 41)
    assert L.prior_error(t.abs() + 3.0, t.abs()) < 1e-6
    assert L.prior_error(t ** 2, t.abs()) > 0.1


def test_proximal_matching_loss_is_near_zero_only_at_the_target_and_saturates():
    x = torch.zeros(4, 3)
    assert float(L.proximal_matching_loss(x, x, gamma=0.5, sigma=1.0)) == 0.0
    far = float(L.proximal_matching_loss(x + 10, x, gamma=0.5, sigma=1.0))
    assert far > 0.999  # a bounded loss: outliers stop pulling, which is what makes it mode-seeking


def test_training_with_proximal_matching_lowers_the_loss_in_one_dimension():
    cfg = L.LPNConfig(hidden=8, layers=2, sigma=1.0, steps=60, batch=128, lr=1e-2, loss="mse")
    psi = L.ICNN(1, cfg.hidden, cfg.layers, cfg.alpha, beta=4.0)
    h = L.train(psi, L.laplace_sampler(), cfg)
    assert sum(h["loss"][-10:]) < sum(h["loss"][:10])


def test_pnp_with_an_identity_denoiser_is_gradient_descent():
    # D = identity: PnP proximal gradient reduces to gradient descent on 1/2 ||A x - b||², whose
    # residuals fall monotonically for η < 2 / ||A||²
    class Identity(torch.nn.Module):
        def forward(self, y):
            return y

    A = L.gaussian_blur_operator(1.0, 5)
    x_true = torch.rand(2, 1, 8, 8) * 2 - 1
    b = A(x_true)
    x, res, kept = L.pnp_pgd(Identity(), A, b, eta=1.0, iters=20, keep=(0, 5))
    assert res.shape == (20, 2) and set(kept) == {0, 5}
    assert (res[1:] <= res[:-1] + 1e-7).all()
    assert float(L.oscillation(res).max()) == 0.0
    assert ((A(x) - b).norm() < (A(b) - b).norm())


@pytest.mark.parametrize("field, value", [("alpha", 0), ("sigma", -1.0), ("steps", 0), ("loss", "l1"),
                                          ("warmup", 1.5), ("gamma_end", 5.0), ("hidden", 2.5),
                                          ("beta", 0.0)])
def test_config_refuses_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        L.LPNConfig(**{field: value})
