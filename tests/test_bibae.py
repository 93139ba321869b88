"""BIB-AE family: config checks, loss formulas, gradient routing of the critics, training, checkpoint I/O,
generation (prior and fitted latent density) and its conditioning."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModel

from calofm.models.bibae import BIBAEConfig, BIBAEModel
from calofm.models.bibae_nets import mmd_rows, sorted_kernel_mmd
from calofm.models.shower import condition_features
from calofm.preprocess import ModelSpace, ShowerPreprocessor

TINY = dict(latent_encoded=4, latent_free=4, encoder_channels=(4, 8), encoder_hidden=32, decoder_hidden=32,
            decoder_channels=(8, 8), refine_channels=(8,), critic_channels=(4, 8), critic_hidden=16,
            latent_critic_hidden=(8, 8), pp_channels=8, pp_layers=3, density_size=16, hit_mmd_kernel=20,
            hit_mmd_cutoff=200)
B = 6


def tiny(**overrides) -> BIBAEModel:
    torch.manual_seed(0)
    return BIBAEModel(BIBAEConfig(**{**TINY, **overrides}))


def batch(n=B, seed=0):
    """Structured model-space showers: a core falling off in r with its z maximum moving with the energy."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(n, generator=g)
    r, z = torch.arange(9.0)[:, None, None], torch.arange(45.0)[None, None, :]
    core = torch.exp(-r / 2) * torch.exp(-((z - 10 - 15 * e[:, None, None, None]) / 8) ** 2)  # (n, 9, 1, 45)
    x = -1 + 3 * core.expand(n, 9, 16, 45) + 0.1 * torch.randn(n, 9, 16, 45, generator=g)
    cond = {"energy": 10 ** (1 + 2 * e), "phi": (torch.rand(n, generator=g) * 2 - 1) * math.pi,
            "theta": torch.rand(n, generator=g) + 1, "geometry": torch.randint(0, 8, (n,), generator=g)}
    return x, cond


def step_noise(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(n, 9, 16, 45, generator=g), "sigma": torch.rand(n, generator=g),
            "u": torch.rand(n, 2, generator=g)}


def perturbed(model, scale=0.05):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_builds_and_returns_per_sample_losses():
    model = tiny()
    losses = model.losses(*batch(), step_noise())
    assert set(losses) == {"kld", "latent_mmd", "recon", "latent_critic", "latent_gp", "latent_adv", "critic", "gp",
                           "adv", "pp_mmd", "pp_mse"}
    assert all(v.shape == (B,) and torch.isfinite(v).all() for v in losses.values())
    assert model.network_evaluations() == 2 and model.family == "bibae"
    plain = tiny(post_processor=False, recon_weight=0.0)
    assert plain.post is None and plain.network_evaluations() == 1
    assert not {"pp_mmd", "pp_mse", "recon"} & set(plain.losses(*batch(), step_noise()))
    with pytest.raises(ValueError, match="one pass"):
        model.check_steps(4)


def test_config_round_trip(tmp_path):
    config = BIBAEConfig(**TINY, latent_sampling="density", geometry_slots={"ild": 2}, geometry_thresholds={"ild": 0.1})
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BIBAEConfig) and loaded.encoder_channels == (4, 8) and loaded.refine_channels == (8,)
    assert loaded.latent_mmd_alphas == (1.0, 0.01) and loaded.latent_sampling == "density"
    fields = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert loaded.geometry_slots == {"ild": 2} and {k: loaded.to_dict()[k] for k in fields} == fields
    assert BIBAEConfig.preprocessing_defaults["mode"] == "fraction"
    ShowerPreprocessor(**BIBAEConfig.preprocessing_defaults)  # valid kwargs


@pytest.mark.parametrize("bad, match", [
    (dict(latent_encoded=0), "latent_encoded"),
    (dict(latent_free=-1), "latent_free"),
    (dict(latent_encoded=3000, latent_free=1000), "step noise"),
    (dict(encoder_channels=()), "encoder_channels"),
    (dict(decoder_channels=(8, 0)), "decoder_channels"),
    (dict(pp_layers=2), "pp_layers"),
    (dict(pp_channels=1), "pp_channels"),
    (dict(kld_weight=-0.1), "kld_weight"),
    (dict(gp_lambda=float("inf")), "gp_lambda"),
    (dict(hit_mmd_alpha=0.0), "hit_mmd_alpha"),
    (dict(latent_mmd_alphas=()), "latent_mmd_alphas"),
    (dict(latent_sampling="kde"), "latent_sampling"),
    (dict(post_processor="yes"), "post_processor"),
    (dict(density_size=0), "density_size"),
    (dict(latent_dim=8), "unknown key"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        BIBAEConfig(**{**TINY, **bad})


def test_loss_formulas_from_sliced_noise():
    """recon and KLD recomputed by hand: eps, free latents and prior samples are slices of noise["noise"]."""
    model = perturbed(tiny())
    x, cond = batch()
    noise = step_noise()
    losses = model.losses(x, cond, noise)
    c, flat, cfg = condition_features(cond, 8), noise["noise"].flatten(1), model.config
    eps, free, prior = flat[:, :4], flat[:, 4:8], flat[:, 8:12]
    with torch.no_grad():
        mu, logvar = model.encode(x, c)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = model.decode(torch.cat([z, free], 1), c)
        torch.testing.assert_close(losses["recon"], (recon - x).flatten(1).norm(dim=1))
        kld = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        torch.testing.assert_close(losses["kld"], cfg.kld_weight * kld)
        torch.testing.assert_close(losses["latent_mmd"], cfg.latent_mmd_weight * mmd_rows(z, prior, (1.0, 0.01)))
        pp = model.postprocess(recon, c)
        torch.testing.assert_close(losses["pp_mse"], (pp - recon).square().mean(dim=(1, 2, 3)))
        # the critic pair: real (x, x), fake (x, recon); adv: the critic's Wasserstein estimate (real - fake)
        torch.testing.assert_close(losses["critic"], model.critic(x, recon, c) - model.critic(x, x, c))
        torch.testing.assert_close(losses["adv"], model.critic(x, x, c) - model.critic(x, recon, c))
        lat = model.latent_critic(prior).mean(1) - model.latent_critic(z).mean(1)
        torch.testing.assert_close(losses["latent_adv"], cfg.latent_adv_weight * lat)
    # all randomness comes from `noise`: the global RNG does not matter
    torch.manual_seed(123)
    again = model.losses(x, cond, noise)
    assert all(torch.equal(again[k], losses[k]) for k in losses)


def test_mmd_helpers_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g) + 0.5

    def k(u, v, alpha):
        return torch.exp(-alpha * ((u[:, None] - v[None]) ** 2).sum(-1)).mean()

    batch_mmd = sum(k(a, a, al) + k(b, b, al) - 2 * k(a, b, al) for al in (1.0, 0.01))
    torch.testing.assert_close(mmd_rows(a, b, (1.0, 0.01)).mean(), batch_mmd)
    # the paper's sorted-kernel MMD: windows of sorted values, a 1D Gaussian-kernel MMD each, averaged
    x, y = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    out = sorted_kernel_mmd(x, y, kernel=10, stride=4, cutoff=30, alpha=2.0)
    xs, ys = (t.flatten(1).sort(1, descending=True).values for t in (x, y))
    for i in range(2):
        parts = []
        for j in range(0, 30, 4):
            u, v = xs[i, j:j + 10], ys[i, j:j + 10]
            kk = [torch.exp(-2.0 * (p[:, None] - q[None]) ** 2).mean() for p, q in ((u, u), (v, v), (u, v))]
            parts.append(kk[0] + kk[1] - 2 * kk[2])
        torch.testing.assert_close(out[i], torch.stack(parts).mean())
    assert sorted_kernel_mmd(x, x, 10, 4, 30, 2.0).abs().max() < 1e-6


def test_critics_and_generator_get_only_their_own_gradients():
    model = perturbed(tiny())
    x, cond = batch()
    losses = model.losses(x, cond, step_noise())
    groups = {"critic": model.critic, "latent_critic": model.latent_critic, "post": model.post,
              "vae": torch.nn.ModuleList([model.encoder, model.decoder])}

    def reached(name):
        model.zero_grad()
        losses[name].sum().backward(retain_graph=True)
        return {g for g, m in groups.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in m.parameters())}

    assert reached("adv") == {"vae"}  # the critic is evaluated with detached parameters
    assert reached("latent_adv") == {"vae"}
    assert reached("critic") == {"critic"} and reached("gp") == {"critic"}  # fakes are detached
    assert reached("latent_critic") == {"latent_critic"} and reached("latent_gp") == {"latent_critic"}
    assert reached("pp_mmd") == {"post"}  # trained on the detached reconstruction
    assert reached("recon") == {"vae"} and reached("kld") == {"vae"} and reached("latent_mmd") == {"vae"}


def test_training_lowers_reconstruction():
    """30 AdamW steps on one batch: the reconstruction must fall. The adversarial terms are a min-max game whose
    value need not fall (the critics learn as the generator does), so they are only checked to stay finite."""
    model = tiny()
    x, cond = batch(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(30):
        losses = model.losses(x, cond, step_noise(8, seed=step))
        opt.zero_grad()
        sum(losses.values()).mean().backward()
        opt.step()
        history.append({k: v.mean().item() for k, v in losses.items()})
    first, last = history[0]["recon"], sum(h["recon"] for h in history[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(v) for h in history for v in h.values())


def test_post_processor_learns_the_hit_spectrum():
    """The post-processor alone (the BIB-AE fixed): its sorted-kernel hit MMD to the data falls. Here the decoded
    showers are the data shifted and squeezed, which the per-cell 1x1x1 network can undo."""
    model = tiny(hit_mmd_alpha=2.0)
    x, cond = batch(8)
    c = condition_features(cond, 8)
    decoded = 0.6 * x + 0.5
    opt = torch.optim.AdamW(model.post.parameters(), lr=1e-2)
    values = []
    for _ in range(25):
        mmd = sorted_kernel_mmd(model.postprocess(decoded, c), x, 20, 25, 200, 2.0)
        opt.zero_grad()
        mmd.mean().backward()
        opt.step()
        values.append(mmd.mean().item())
    assert values[-1] < 0.3 * values[0], values


def test_generate_shape_reproducible_and_conditioned():
    model = perturbed(tiny()).eval()
    _, cond = batch()

    def gen(seed, c=cond):
        return model.generate(c, torch.Generator().manual_seed(seed))

    y = gen(0)
    assert y.shape == (B, 9, 16, 45) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.equal(gen(0), y) and not torch.allclose(gen(1), y)
    assert not torch.allclose(gen(0, {**cond, "energy": cond["energy"] * 3}), y)  # the energy matters
    assert not torch.allclose(gen(0, {**cond, "geometry": (cond["geometry"] + 1) % 8}), y)  # and the geometry
    with pytest.raises(ValueError, match="one pass"):
        model.generate(cond, None, steps=3)


def test_save_load_identical_with_fitted_density(tmp_path):
    model = perturbed(tiny()).eval()
    g = torch.Generator().manual_seed(5)
    model.fit_latent_density(torch.randn(40, 4, generator=g) * 0.3 + 1, torch.tensor([0, 2] * 20))
    model.config.preprocessing = ShowerPreprocessor(mean=-9.0, std=3.0, noise_cut=2.0).state_dict()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BIBAEModel) and loaded.dtype == torch.float32
    for name in ("density_points", "density_count", "density_scale"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    x, cond = batch()
    cond["geometry"] = torch.tensor([0, 2, 0, 2, 0, 2])
    for sampling in ("prior", "density"):
        model.config.latent_sampling = loaded.config.latent_sampling = sampling
        a = model.generate(cond, torch.Generator().manual_seed(0))
        assert torch.equal(loaded.generate(cond, torch.Generator().manual_seed(0)), a)
    la, lb = model.losses(x, cond, step_noise()), loaded.losses(x, cond, step_noise())
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_latent_density_fit_and_sampling():
    model = tiny(density_size=16, density_bandwidth=1.0)
    g = torch.Generator().manual_seed(0)
    _, cond = batch()
    with pytest.raises(ValueError, match="no latent density is fitted"):
        model.config.latent_sampling = "density"
        model.generate(cond, torch.Generator().manual_seed(0))
    # slot 3: 50 means (more than density_size: 16 kept, evenly spaced), bandwidth by Scott's rule
    mu3 = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 2
    model.fit_latent_density(mu3, torch.full((50,), 3))
    assert model.density_count.tolist() == [0, 0, 0, 16, 0, 0, 0, 0]
    keep = torch.linspace(0, 49, 16).round().long()
    assert torch.equal(model.density_points[3], mu3[keep])
    torch.testing.assert_close(model.density_scale[3], mu3.std(0, unbiased=False) * 16 ** (-1 / 8))
    # slot 1: identical means -> zero bandwidth: the sampled encoded latents are exactly the stored point
    model.fit_latent_density(torch.full((5, 4), -0.7), torch.ones(5, dtype=torch.long))
    assert model.density_count[3] == 16  # another slot's fit is kept
    z = model.sample_latents(torch.ones(B, dtype=torch.long), torch.Generator().manual_seed(1))
    assert z.shape == (B, 8) and torch.equal(z[:, :4], torch.full((B, 4), -0.7))
    assert z[:, 4:].std() > 0.3  # the free latents stay N(0, 1)
    z3 = model.sample_latents(torch.full((500,), 3), torch.Generator().manual_seed(1))
    assert (z3[:, :4].mean(0) - model.density_points[3].mean(0)).abs().max() < 0.35  # mean of the KDE
    kde_std = (mu3[keep].var(0, unbiased=False) + model.density_scale[3] ** 2).sqrt()  # points + kernel width
    assert (z3[:, :4].std(0) / kde_std - 1).abs().max() < 0.15
    with pytest.raises(ValueError, match=r"slot\(s\) \[0\]"):
        model.sample_latents(torch.tensor([1, 0]), None)
    with pytest.raises(ValueError, match="mu"):
        model.fit_latent_density(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="slots in"):
        model.fit_latent_density(torch.zeros(5, 4), torch.full((5,), 8))
    model.config.latent_sampling = "prior"  # the prior ignores the density
    assert torch.isfinite(model.generate({**cond, "geometry": torch.zeros(B, dtype=torch.long)}, None)).all()


def test_finish_training_fits_the_density_on_encoder_means():
    model = tiny().eval()
    showers = torch.rand(10, 9, 16, 45) * (torch.rand(10, 9, 16, 45) < 0.2)
    data = SimpleNamespace(sizes=[6, 4], offsets=[0, 6, 10])

    def getitems(rows):
        rows = torch.tensor(rows)
        return {"showers": showers[rows], "energy": torch.full((len(rows),), 5e3), "phi": torch.zeros(len(rows)),
                "theta": torch.full((len(rows),), 1.5), "geometry": torch.where(rows < 6, 2, 5)}

    data.__getitems__ = getitems
    space = ModelSpace(ShowerPreprocessor(mean=-10.0, std=3.0))
    model.finish_training(data, space, samples=5)
    assert model.density_count.tolist() == [0, 0, 5, 0, 0, 4, 0, 0]
    x, cond = space.inputs(getitems(list(range(5))), "cpu")
    with torch.no_grad():
        mu, _ = model.encode(x, condition_features(cond, 8))
    torch.testing.assert_close(model.density_points[2, :5], mu)


def test_runs_under_bf16_autocast():
    model = perturbed(tiny())
    x, cond = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses(x, cond, step_noise())
        sum(losses.values()).mean().backward()
        y = model.generate(cond, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v).all() for v in losses.values()) and torch.isfinite(y).all()
