import pytest
import torch

from fedlib.diffusion import (EDM, VP, Denoiser, MLPDenoiser, UNet, diffusion_loss, draw_noise_and_time,
                              load_checkpoint, make_process, save_checkpoint, schedule, train_diffusion)

PROCESSES = ["edm", "vp_linear", "vp_cosine", "vp_linear_continuous", "vp_cosine_continuous"]


@pytest.mark.parametrize("name", PROCESSES)
def test_process_lambda_round_trip_and_monotone(name):
    p = make_process(name)
    t = torch.linspace(p.t_min, p.t_max, 257, dtype=torch.float64)
    lam = p.lambda_(t)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(p.t_of_lambda(lam), t, rtol=1e-6, atol=1e-9)
    if name != "edm":
        torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(lam, torch.log(p.alpha(t) / p.sigma(t)))


def test_discrete_vp_matches_ddpm_alphas_cumprod_at_steps():
    p = VP("linear", discrete=True)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    n = torch.tensor([0, 10, 500, 999])
    t = (n + 1).double() / 1000
    torch.testing.assert_close(p.alpha(t) ** 2, abar[n])
    torch.testing.assert_close(p.network_time(t), n.double())
    assert float(p.sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0


@pytest.mark.parametrize("prediction,process", [("eps", VP()), ("x0", VP()), ("v", VP("cosine")), ("edm", EDM()),
                                                ("eps", EDM())])
def test_denoiser_conversions_are_consistent(prediction, process):
    """A network that outputs its exact target makes the denoiser return x0 exactly, and the loss 0."""
    x0 = torch.randn(6, 2, dtype=torch.float64)
    eps = torch.randn(6, 2, dtype=torch.float64)
    t = process.sample_t(6, torch.Generator().manual_seed(0)).double().clamp(process.t_min, process.t_max)
    holder = {}

    class Oracle(torch.nn.Module):
        def forward(self, x, t_net, return_features=False):
            return holder["target"]

    den = Denoiser(Oracle(), process, prediction)
    holder["target"] = den.target(x0, eps, t)
    x_t = process.add_noise(x0, eps, t)
    torch.testing.assert_close(den(x_t, t), x0)
    assert float(diffusion_loss(den, x0, eps, t)) < 1e-20


def test_edm_prediction_needs_edm_process():
    with pytest.raises(ValueError, match="EDM"):
        Denoiser(MLPDenoiser(), VP(), "edm")
    with pytest.raises(ValueError, match="allowed"):
        Denoiser(MLPDenoiser(), VP(), "score")


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (28, (1, 2, 2)), (32, (1, 2, 2)), (64, (1, 2, 2, 2))])
def test_unet_shapes_and_features(size, mults):
    net = UNet(1, 8, mults)
    x = torch.randn(2, 1, size, size)
    out, feats = net(x, torch.tensor([3.0, 500.0]), return_features=True)
    assert out.shape == x.shape
    assert feats.shape[:2] == (2, net.feature_channels)
    torch.testing.assert_close(net(x, torch.tensor(7.0)), net(x, torch.tensor([7.0, 7.0])))


def test_diffusion_loss_is_vmappable_over_parameters():
    den = Denoiser(MLPDenoiser(hidden=16, depth=2), EDM(), "edm")
    params = {k: torch.stack([v.detach(), v.detach() + 0.01]) for k, v in den.net.named_parameters()}
    x0 = torch.randn(2, 8, 2)
    g = torch.Generator().manual_seed(0)
    eps, t = zip(*[draw_noise_and_time(den.process, x0[k], g) for k in range(2)])
    eps, t = torch.stack(eps), torch.stack(t)
    grads = torch.func.vmap(torch.func.grad(lambda p, a, b, c: diffusion_loss(den, a, b, c, params=p)))(params, x0, eps, t)
    # client 0 equals an ordinary backward with the same draws
    den.net.zero_grad()
    diffusion_loss(den, x0[0], eps[0], t[0]).backward()
    for k, p in den.net.named_parameters():
        torch.testing.assert_close(grads[k][0], p.grad)


def test_training_lowers_the_loss_and_checkpoint_round_trips(tmp_path):
    from fedlib.data import toy_2d

    data = toy_2d("ring", n=512, seed=0)
    den = Denoiser(MLPDenoiser(hidden=32, depth=2), EDM(), "edm")
    ema, hist = train_diffusion(den, data, steps=150, batch_size=128, lr=3e-3, device="cpu", progress=False,
                                checkpoint=tmp_path / "ck.pt", log_every=25)
    assert hist["loss"][-1] < hist["loss"][0]
    fresh = Denoiser(MLPDenoiser(hidden=32, depth=2), EDM(), "edm")
    h2 = load_checkpoint(tmp_path / "ck.pt", fresh)  # weights_only=True inside
    assert h2["loss"] == hist["loss"]
    x = torch.randn(5, 2)
    torch.testing.assert_close(fresh(x, torch.tensor(1.0)), ema(x, torch.tensor(1.0)))


@pytest.mark.parametrize("name", ["uniform_t", "quadratic_t", "uniform_lambda", "edm"])
@pytest.mark.parametrize("proc", ["edm", "vp_linear", "vp_cosine_continuous"])
def test_schedules_are_decreasing_with_exact_ends(name, proc):
    p = make_process(proc)
    t = schedule(name, p, 7)
    assert len(t) == 8 and (t[1:] < t[:-1]).all()
    assert float(t[0]) == p.t_max and float(t[-1]) == p.t_min
    if name == "uniform_lambda":
        lam = p.lambda_(t)
        torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((7,), float(lam[1] - lam[0]), dtype=torch.float64))


def test_pretrained_teacher_is_fixed_by_its_seed(tmp_path, monkeypatch):
    from fedlib.diffusion import pretrained_teacher

    x = torch.randn(4, 2)
    outs = []
    for k in range(2):  # two cold caches, different global RNG states before the call
        monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path / str(k)))
        torch.manual_seed(100 + k)
        t = pretrained_teacher("ring", steps=5, seed=0, device="cpu", progress=False)
        outs.append(t(x, torch.tensor(1.0)))
    torch.testing.assert_close(outs[0], outs[1])
