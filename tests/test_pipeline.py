"""fedlib.pipeline (notebook 05) and the pieces it added elsewhere: stage caching keyed by inputs, a
diffusion sampler as FedGO's generator (run outside vmap), FedGO set-ups with a given server G, and the
federated diffusion stage reading client rows only."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from fedlib import data as fdata
from fedlib import dmd2, fedgo, ld3, models, pipeline, studies
from fedlib import federated as fl
from fedlib.diffusion import EDM, Denoiser, MLPDenoiser, schedule, solve
from fedlib.utils import CacheWarning


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_CACHE", str(tmp_path))
    return tmp_path


def test_key_of_is_stable_and_changes_with_any_input():
    x = torch.arange(6.0)
    a = pipeline.key_of(stage="s", cfg={"b": 1, "a": [1, 2]}, data=x)
    assert a == pipeline.key_of(data=x.clone(), cfg={"a": [1, 2], "b": 1}, stage="s")  # order-free, by value
    x2 = x.clone()
    x2[3] += 1e-3
    assert a != pipeline.key_of(stage="s", cfg={"b": 1, "a": [1, 2]}, data=x2)
    assert a != pipeline.key_of(stage="s", cfg={"b": 2, "a": [1, 2]}, data=x)
    assert a != pipeline.key_of(stage="s", cfg={"b": 1, "a": [1, 2]}, data=np.arange(6.0))


def test_cached_builds_once_reloads_and_rebuilds_a_corrupt_entry(cache):
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.ones(3), "n": np.int64(4), "per_seed": {0: np.float32(0.5)}, "rows": [(1, "a")]}

    first, hit1 = pipeline.cached("stage", "k1", build)
    again, hit2 = pipeline.cached("stage", "k1", build)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(again["w"], torch.ones(3)) and again["n"] == 4 and isinstance(again["n"], int)
    assert again["per_seed"] == {0: 0.5} and again["seconds"] == first["seconds"] >= 0
    path = cache / "pipeline" / "stage" / "k1.pt"
    path.write_bytes(b"not a torch file")
    with pytest.warns(CacheWarning):
        _, hit3 = pipeline.cached("stage", "k1", build)
    assert not hit3 and len(calls) == 2
    _, hit4 = pipeline.cached("stage", "k2", build)  # another key is another entry
    assert not hit4 and len(calls) == 3


def _toy_denoiser(seed=0):
    torch.manual_seed(seed)
    return Denoiser(MLPDenoiser(2, 16, 2), EDM(), "edm").eval()


def test_sampler_generator_is_the_sampler_from_scaled_prior_noise():
    den = _toy_denoiser()
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    sigma_T = float(den.process.sigma(torch.tensor(den.process.t_max, dtype=torch.float64)))
    times = schedule("edm", den.process, 4)
    G = dmd2.SamplerGenerator(den, times, (2,), solver="dpm_solver_pp_2m")
    with torch.no_grad():
        want = solve(den, sigma_T * z, times, "dpm_solver_pp_2m")[0].clamp(-1, 1)
    assert G.z_dim == 2 and not G.vmappable
    assert torch.allclose(G(z), want) and G.nfe == 4
    one = dmd2.SamplerGenerator(den, dmd2.student_times(den.process, 1), (2,))
    with torch.no_grad():
        want1 = den(sigma_T * z, dmd2.student_times(den.process, 1)[0].expand(5)).clamp(-1, 1)
    assert torch.allclose(one(z), want1, atol=1e-6) and one.nfe == 1
    assert fedgo.sample(one, 7).shape == (7, 2)


class _LinearG(torch.nn.Module):
    def __init__(self, vmappable):
        super().__init__()
        self.lin, self.z_dim, self.vmappable = torch.nn.Linear(2, 2), 2, vmappable

    def forward(self, z):
        if not self.vmappable and isinstance(z, torch.Tensor) and torch._C._functorch.is_batchedtensor(z):
            raise RuntimeError("called under vmap")
        return 3 * self.lin(z)


def test_discriminators_against_a_g_that_cannot_vmap_train_exactly_as_inside_vmap():
    torch.manual_seed(0)
    inside, outside = _LinearG(True), _LinearG(False)
    outside.load_state_dict(inside.state_dict())
    D = models.MLPDiscriminator(2, hidden=8)
    xs = torch.randn(50, 2)
    clients = fl.pack_clients(xs, torch.zeros(50, dtype=torch.long), [torch.arange(15), torch.arange(15, 50)])
    a = fedgo.train_discriminators(D, inside, clients, epochs=2, generator=torch.Generator().manual_seed(3))
    b = fedgo.train_discriminators(D, outside, clients, epochs=2, generator=torch.Generator().manual_seed(3))
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
    assert max((a[n] - fl.get_params(D)[n]).abs().max().item() for n in a) > 1e-4  # it did train


def test_fedgo_setups_with_a_given_server_generator_never_read_the_server_half():
    train, test = fdata.load_train_test("digits")
    train, test = train.stratified(300), test.stratified(60)
    server = fdata.fedgo_split(train.y.numpy(), 3, 0.1, seed=0)[1]
    poisoned = fdata.ArrayDataset(train.x.clone(), train.y, train.n_classes, train.name)
    poisoned.x[torch.as_tensor(server)] = float("nan")
    G = models.make_generator((1, 8, 8), z_dim=8, width=8)
    G.vmappable = False  # through the outside-vmap path, as the pipeline's sampler generators go
    st = studies.fedgo_setups(poisoned, test, client_counts=[3], alphas=[0.1], seeds=[0], scenarios=(),
                              gan_steps=2, disc_epochs=1, generator=torch.Generator().manual_seed(0),
                              server_generators={"mine": {0: G}})
    (s,) = st.all("mine")
    assert s.key == (3, 0.1, 0) and s.server_y is None and s.dense_generator is None
    assert s.server_x.shape == (len(server), 1, 8, 8) and s.disc_logits.shape == (3, len(server))
    assert torch.isfinite(s.server_x).all() and torch.isfinite(s.disc_logits).all()
    assert st.generators[("mine", s.key)] is G
    with pytest.raises(ValueError, match="one G per seed"):
        studies.fedgo_setups(train, test, client_counts=[3], alphas=[0.1], seeds=[0, 1], scenarios=(), gan_steps=2,
                             disc_epochs=1, server_generators={"mine": {0: G}})
    with pytest.raises(ValueError, match="clash"):
        studies.fedgo_setups(train, test, client_counts=[3], alphas=[0.1], seeds=[0], scenarios=(), gan_steps=2,
                             disc_epochs=1, server_generators={"pre": {0: G}})


def test_federated_diffusion_reads_client_rows_only_counts_quantised_bytes_and_caches(cache):
    train, _ = fdata.load_train_test("digits")
    train = train.stratified(200)
    parts, server = fdata.fedgo_split(train.y.numpy(), 3, 0.5, seed=0)
    x = train.x.clone()
    x[torch.as_tensor(server)] = float("nan")  # a server row read anywhere would poison the model
    kw = dict(rounds=2, local_steps=2, batch_size=8, lr=0.05, channels=4, channel_mults=(1,), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        st = pipeline.federated_diffusion(x, {0: parts}, bits=8, **kw)
        again = pipeline.federated_diffusion(x, {0: parts}, bits=8, **kw)
    assert not st.cached and again.cached and again.key == st.key
    assert all(torch.isfinite(p).all() for p in st.denoisers[0].parameters())
    assert pipeline.reads_no_server_data(st.indices_read[0], server)
    assert not pipeline.reads_no_server_data(np.append(st.indices_read[0], server[0]), server)
    assert all(torch.equal(a, b) for a, b in zip(st.denoisers[0].parameters(), again.denoisers[0].parameters()))
    # 8-bit updates: each client sends about a quarter of the float32 model per round; the server float32 models
    full = pipeline.federated_diffusion(x, {0: parts}, bits=32, **kw)
    assert full.key != st.key and not full.cached
    assert full.bytes_up[0] == 2 * 3 * st.model_bytes
    assert 0.24 < st.bytes_up[0] / full.bytes_up[0] < 0.3
    assert st.bytes_down[0] == full.bytes_down[0] == 2 * 3 * st.model_bytes


def test_distil_one_step_traces_fixed_noise_whose_last_point_is_the_returned_generator(cache):
    T = _toy_denoiser(1)
    traced = pipeline.DistilConfig(steps=6, batch_size=8, n_data=32, data_nfe=4, trace_points=3, trace_samples=10)
    G, info, hit = pipeline.distil_one_step(T, "toy", traced, shape=(2,), progress=False)
    assert not hit and [e["step"] for e in info["trace"]] == [2, 4, 6]
    assert all(e["samples"].shape == (10, 2) and torch.isfinite(e["samples"]).all() for e in info["trace"])
    assert not torch.equal(info["trace"][0]["samples"], info["trace"][-1]["samples"]), "the generator trained"
    # the trace's noise is fixed: the last point is the returned generator on that noise
    z = torch.randn((10, 2), generator=torch.Generator().manual_seed(20_000))
    torch.testing.assert_close(dmd2.SamplerGenerator(G, info["times"], (2,))(z), info["trace"][-1]["samples"])
    _, again, hit2 = pipeline.distil_one_step(T, "toy", traced, shape=(2,), progress=False)
    assert hit2 and len(again["trace"]) == 3
    _, plain, hit3 = pipeline.distil_one_step(T, "toy", dataclasses.replace(traced, trace_points=0),
                                              shape=(2,), progress=False)
    assert not hit3 and plain["trace"] == [], "no trace asked: another cache entry, none stored"


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 2.5), ("lr", 0.0), ("trace_points", -1),
                                          ("data_solver", "rk45")])
def test_distil_config_refuses_a_bad_setting_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        pipeline.DistilConfig(**{"steps": 4, field: value})


def test_distil_one_step_refuses_loose_settings_for_a_config():
    with pytest.raises(TypeError, match="DistilConfig"):
        pipeline.distil_one_step(_toy_denoiser(1), "toy", dict(steps=4), shape=(2,))


SMALL = dict(feddm_kw=dict(rounds=1, local_steps=2, batch_size=8, lr=0.05, channels=4, channel_mults=(1,)),
             ld3_kw=dict(nfes=[3], n_train=2, n_val=2, teacher_nfe=4, config=ld3.LD3Config(rounds_both=1)),
             dmd2_kw=dict(steps=2, batch_size=4, n_data=8, data_nfe=4),
             fedgo_kw=dict(rounds=1, disc_epochs=1, distill_epochs=1))


def test_the_whole_pipeline_run_on_nan_server_images_gives_identical_finite_outputs(cache):
    train, test = fdata.load_train_test("digits")
    train, test = train.stratified(120), test.stratified(40)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    check = pipeline.server_data_check(train, test, 3, 0.5, 0, **SMALL)
    assert torch.equal(torch.rand(3), want), "the check leaves the caller's random stream where it was"
    assert set(check["stages"]) == {"1 FedDM model", "2 LD3 grid", "3 DMD2 generator",
                                    "4 FedGO discriminators and server model"}
    assert check["reads_none"] and all(v == {"identical": True, "finite": True} for v in check["stages"].values())
    assert check["server_rows"] > 0 and check["server_rows"] + check["client_rows"] == len(train)
    assert not list(cache.iterdir()) or not list((cache / "pipeline").glob("*/*.pt")), "the check leaves no cache entry"


def test_the_server_data_check_catches_a_stage_that_reads_a_server_row(cache, monkeypatch):
    """The check can fail: a FedDM stage that also trains on one server row makes its output differ, and
    every stage downstream with it (with the NaN sentinel its quantised uplink refuses outright)."""
    train, test = fdata.load_train_test("digits")
    train, test = train.stratified(120), test.stratified(40)
    server = fdata.fedgo_split(train.y.numpy(), 3, 0.5, seed=0)[1]
    honest = pipeline.federated_diffusion

    def leaky(x, client_indices, **kw):
        return honest(x, {s: [np.append(p[0], server[0]), *p[1:]] for s, p in client_indices.items()}, **kw)

    monkeypatch.setattr(pipeline, "federated_diffusion", leaky)
    check = pipeline.server_data_check(train, test, 3, 0.5, 0, sentinel=5.0, **SMALL)
    assert not check["reads_none"]
    assert not any(v["identical"] for v in check["stages"].values()), check["stages"]
    with pytest.raises(ValueError, match="NaN"):
        pipeline.server_data_check(train, test, 3, 0.5, 0, **SMALL)
