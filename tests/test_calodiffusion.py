"""CaloDiffusion: config checks, the cylindrical U-Net, the DDPM loss and sampler against their formulas, training,
checkpoint I/O and conditioning."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from calofm.models.calodiffusion import CaloDiffusionConfig, CaloDiffusionModel, cosine_schedule
from calofm.models.calodiffusion_nets import level_sizes
from calofm.models.shower import condition_features
from calofm.preprocess import ShowerPreprocessor

MESH = (9, 16, 45)
# 3 levels (2 downsamplings), 4-8 channels, T = 10: ~27k parameters, fast on one CPU thread
TINY = dict(layer_sizes=(4, 4, 4, 8), resnet_groups=4, cond_dim=16, attn_dim_head=8, num_timesteps=10)


def tiny(seed=0, **overrides) -> CaloDiffusionModel:
    torch.manual_seed(seed)
    return CaloDiffusionModel(CaloDiffusionConfig(**{**TINY, **overrides})).eval()


def conditions(batch, seed=0, energy=None, geometry=None):
    g = torch.Generator().manual_seed(seed)
    cond = {
        "energy": 10 ** (torch.rand(batch, generator=g) * 2),  # GeV
        "phi": (torch.rand(batch, generator=g) * 2 - 1) * math.pi,
        "theta": torch.rand(batch, generator=g) + 1,
        "geometry": torch.randint(0, 3, (batch,), generator=g),
    }
    if energy is not None:
        cond["energy"] = torch.full((batch,), float(energy))
    if geometry is not None:
        cond["geometry"] = torch.full((batch,), geometry)
    return cond


def step_noise(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(batch, *MESH, generator=g), "sigma": torch.rand(batch, generator=g),
            "u": torch.rand(batch, 2, generator=g)}


# -- config -------------------------------------------------------------------------------------------------------


def test_defaults_config_round_trip_and_paper_size(tmp_path):
    model = CaloDiffusionModel(CaloDiffusionConfig())
    assert model.default_steps == 400 and model.network_evaluations() == 398  # T = 400, the 2 noisiest skipped
    assert CaloDiffusionConfig.preprocessing_defaults["mode"] == "logit"
    assert ShowerPreprocessor(**CaloDiffusionConfig.preprocessing_defaults).maxdep == 2.0
    # the paper's dataset-2 network ([16,16,16,32], cond 128) has its published 0.52 M parameters
    paper = CaloDiffusionModel(CaloDiffusionConfig(layer_sizes=(16, 16, 16, 32), cond_dim=128))
    assert sum(p.numel() for p in paper.parameters()) == pytest.approx(0.52e6, rel=0.01)
    config = CaloDiffusionConfig(**TINY, geometry_slots={"par04_siw": 0}, geometry_thresholds={"par04_siw": 5e-4})
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, CaloDiffusionConfig) and again.layer_sizes == (4, 4, 4, 8)
    assert {k: v for k, v in again.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize("bad", [
    dict(layer_sizes=(8,)), dict(layer_sizes=(8, 12)), dict(layer_sizes=(8, 0)), dict(cond_dim=30),
    dict(resnet_groups=0), dict(attn_heads=0), dict(block_attention="yes"), dict(compress_z=1),
    dict(num_timesteps=1), dict(sample_offset=-1), dict(sample_offset=400), dict(cosine_s=0.0),
    dict(layer_sizes=(8,) * 6),  # 4 downsamplings: r = 9 -> 4 -> 2 -> 1 cannot be halved again
    dict(mesh_shape=(1, 16, 45)), dict(unknown_field=3),
])
def test_bad_config_values_raise(bad):
    with pytest.raises(ValueError):
        CaloDiffusionConfig(**bad)


# -- network ------------------------------------------------------------------------------------------------------


def test_unet_shapes_with_odd_sizes_and_cylindrical_symmetry():
    assert level_sizes((45, 16, 9), 3, compress_z=True) == [(45, 16, 9), (23, 8, 4), (12, 4, 2)]  # paper, DS2
    assert level_sizes((45, 16, 9), 3, compress_z=False) == [(45, 16, 9), (45, 8, 4), (45, 4, 2)]
    for mesh, compress in (((9, 16, 45), True), ((5, 6, 7), True), ((7, 10, 12), False), ((4, 4, 3), True)):
        model = tiny(mesh_shape=mesh, compress_z=compress)
        x = torch.randn(2, *mesh)
        out = model(x, torch.rand(2), condition_features(conditions(2), model.config.n_geometry_slots))
        assert out.shape == x.shape and torch.isfinite(out).all()
    # phi wraps around: rotating the input by a multiple of the total stride (2 downsamplings: 4 cells) rotates the
    # output, the seam included (zero padding along phi would break this at the edges)
    model = tiny()
    x, feats = torch.randn(2, *MESH), condition_features(conditions(2), model.config.n_geometry_slots)
    sigma = torch.rand(2)
    rotated = model(torch.roll(x, 4, dims=2), sigma, feats)
    torch.testing.assert_close(rotated, torch.roll(model(x, sigma, feats), 4, dims=2), atol=2e-5, rtol=1e-4)


# -- diffusion: the formulas with a stub network ------------------------------------------------------------------


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s = 400, 0.008
    betas, abar = cosine_schedule(T, s)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 1, 100, 250, 390):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert betas.max().item() == 0.9999 and betas[-1].item() == 0.9999 and betas.min().item() >= 1e-4
    assert (abar[1:] < abar[:-1]).all()


def test_loss_is_the_ddpm_epsilon_loss():
    model = tiny()
    T = model.config.num_timesteps
    seen = {}

    def stub(x, sigma, features):
        seen.update(x=x, sigma=sigma, features=features)
        return 0.5 * x

    model.forward = stub
    x, cond, noise = torch.randn(4, *MESH), conditions(4), step_noise(4, 1)
    noise["u"] = torch.tensor([[0.0, 0.9], [0.26, 0.1], [1 - 2**-24, 0.5], [0.55, 0.5]])
    loss = model.losses(x, cond, noise)
    t = torch.tensor([0, 2, T - 1, 5])  # floor(u T)
    abar = cosine_schedule(T, model.config.cosine_s)[1][t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise["noise"]
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(seen["sigma"], (1 - abar).sqrt().flatten())
    torch.testing.assert_close(seen["features"], condition_features(cond, model.config.n_geometry_slots))
    assert set(loss) == {"diffusion"} and loss["diffusion"].shape == (4,)
    torch.testing.assert_close(loss["diffusion"], (0.5 * x_t - noise["noise"]).square().mean(dim=(1, 2, 3)))


def test_sampler_is_the_papers_ancestral_ddpm_and_respaces():
    model = tiny()
    T, offset = model.config.num_timesteps, model.config.sample_offset
    calls = []

    def stub(x, sigma, features):  # any deterministic function of (x, sigma, conditions)
        calls.append(sigma[0].item())
        return 0.3 * x + sigma[:, None, None, None] * features[:, :1, None, None]

    model.forward = stub
    cond = conditions(3)
    out = model.generate(cond, torch.Generator().manual_seed(5))
    # the paper's loop (CaloDiffu.Sample / p_sample): t = T-1-offset .. 0, noise added except at t = 0
    betas, abar = (v.float() for v in cosine_schedule(T, model.config.cosine_s))
    abar_prev = torch.cat([torch.ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, *MESH, generator=g)
    feats = condition_features(cond, model.config.n_geometry_slots)
    for t in reversed(range(T - offset)):
        eps = 0.3 * x + (1 - abar[t]).sqrt() * feats[:, :1, None, None]
        mean = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        x = mean + post_var[t].sqrt() * torch.randn(3, *MESH, generator=g) if t > 0 else mean
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)
    assert len(calls) == model.network_evaluations() == T - offset
    # respaced: 6 of the 10 timesteps (0, 2, 4, 5, 7, 9), the 2 noisiest skipped -> 4 passes at those noise levels
    calls.clear()
    model.generate(cond, torch.Generator().manual_seed(5), steps=6)
    assert model.timesteps(6) == [0, 2, 4, 5] and model.network_evaluations(6) == len(calls) == 4
    abar64 = cosine_schedule(T, model.config.cosine_s)[1]
    assert calls == pytest.approx([math.sqrt(1 - abar64[t].item()) for t in (5, 4, 2, 0)], rel=1e-6)
    # with the exact denoiser of a point mass x0, every schedule ends exactly on x0
    x0 = torch.randn(1, *MESH)

    def exact(x, sigma, features):
        sigma = sigma.reshape(-1, 1, 1, 1)
        return (x - (1 - sigma**2).sqrt() * x0) / sigma

    model.forward = exact
    for steps in (None, 6, 3):
        torch.testing.assert_close(model.generate(cond, torch.Generator().manual_seed(0), steps=steps),
                                   x0.expand(3, -1, -1, -1), atol=1e-4, rtol=1e-4)
    for bad in (offset, T + 1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            model.generate(cond, None, steps=bad)


# -- training, checkpoints, generation ----------------------------------------------------------------------------


def test_loss_falls_with_adamw():
    """Model-space showers with structure: a fixed profile along r and z, scaled with log energy, plus noise."""
    torch.manual_seed(0)
    model = tiny().train()
    r = torch.linspace(1, -1, MESH[0]).reshape(-1, 1, 1)
    z = torch.sin(torch.linspace(0, math.pi, MESH[2])).reshape(1, 1, -1)
    cond = conditions(4, seed=2)
    scale = torch.log10(cond["energy"]).reshape(-1, 1, 1, 1)
    x = (r + z) * (0.5 + scale) + 0.1 * torch.randn(4, *MESH)
    evaluation = [step_noise(4, 1000 + i) for i in range(3)]

    def held_out():
        with torch.no_grad():
            return sum(model.losses(x, cond, n)["diffusion"].mean().item() for n in evaluation) / len(evaluation)

    before = held_out()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        opt.zero_grad()
        sum(model.losses(x, cond, step_noise(4, step)).values()).mean().backward()
        opt.step()
    after = held_out()
    assert after < 0.7 * before, (before, after)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast runs and stays finite
        assert torch.isfinite(model.losses(x, cond, evaluation[0])["diffusion"]).all()


def test_save_load_identical(tmp_path):
    model = tiny()
    with torch.no_grad():  # move every weight off its initial value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CaloDiffusionModel) and loaded.default_steps == 10
    x, cond = torch.randn(2, *MESH), conditions(2)
    feats = condition_features(cond, model.config.n_geometry_slots)
    assert torch.equal(loaded(x, torch.rand(2, generator=torch.Generator().manual_seed(0)), feats),
                       model(x, torch.rand(2, generator=torch.Generator().manual_seed(0)), feats))
    assert torch.equal(loaded.generate(cond, torch.Generator().manual_seed(1), steps=4),
                       model.generate(cond, torch.Generator().manual_seed(1), steps=4))


def test_generate_is_finite_reproducible_and_conditioned():
    model = tiny()

    def sample(seed, **kw):
        return model.generate(conditions(2, **kw), torch.Generator().manual_seed(seed), steps=4)

    a = sample(0, energy=5.0, geometry=0)
    assert a.shape == (2, *MESH) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, sample(0, energy=5.0, geometry=0))
    assert not torch.allclose(a, sample(1, energy=5.0, geometry=0))
    assert (a - sample(0, energy=500.0, geometry=0)).abs().max() > 1e-3  # the energy condition matters
    assert (a - sample(0, energy=5.0, geometry=1)).abs().max() > 1e-3  # so does the geometry slot
