"""WGAN family: config checks, the WGAN-GP and constrainer loss formulas, which network each loss trains,
training on a synthetic batch, checkpoint round trip, and generation (shape, seed, conditions)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from calofm.models.shower import condition_features
from calofm.models.wgan import WGANConfig, WGANModel
from calofm.training.objective import step_noise

MESH = (9, 16, 45)
TINY = dict(latent_dim=8, generator_channels=(8, 4), critic_channels=(2, 2), critic_kernels_z=(10, 6, 4),
            critic_hidden=(16,), constrainer_channels=(2, 2), constrainer_hidden=8)
EDM = SimpleNamespace(P_mean=-0.5, P_std=1.2)  # step_noise draws sigma too; the WGAN uses noise and u only


def tiny_model(seed=0, **overrides) -> WGANModel:
    torch.manual_seed(seed)
    return WGANModel(WGANConfig(**{**TINY, **overrides}))


def conditions(batch=4, seed=0, energy=None, geometry=None):
    g = torch.Generator().manual_seed(seed)
    return {
        "energy": torch.rand(batch, generator=g) * 99 + 1 if energy is None else torch.full((batch,), float(energy)),
        "phi": (torch.rand(batch, generator=g) * 2 - 1) * math.pi,
        "theta": torch.rand(batch, generator=g) + 1.0,
        "geometry": torch.randint(0, 3, (batch,), generator=g) if geometry is None
        else torch.full((batch,), geometry, dtype=torch.long),
    }


def showers(cond, seed=0):
    """Model-space showers whose level and depth follow ln E (so the constrainer has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    le = torch.log(cond["energy"])[:, None, None, None]
    r = torch.arange(MESH[0]).float()[None, :, None, None]
    z = torch.arange(MESH[2]).float()[None, None, None, :]
    core = torch.exp(-r / 2 - (z - 8 * le) ** 2 / 60)
    return -1.0 + 2.5 * core * le / 4 + 0.2 * torch.randn(len(le), *MESH, generator=g)


def noise(batch, step=0):
    return step_noise((batch, *MESH), None, seed=0, micro=step, rank=0, world=1, precond=EDM, drop_p=0.0,
                      device="cpu")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_builds_with_paper_structure_and_one_pass():
    model = tiny_model()
    assert model.family == "wgan" and model.default_steps == 1 and model.network_evaluations() == 1
    assert WGANConfig.preprocessing_defaults["mode"] == "fraction"
    with pytest.raises(ValueError, match="one pass"):
        model.check_steps(4)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"generator", "critic", "constrainer"}
    # default (CPU) config: paper widths / 4, paper critic kernels along z and MLP widths
    default = WGANConfig()
    assert default.generator_channels == (64, 32, 16, 8) and default.critic_kernels_z == (10, 6, 4, 4)
    assert default.latent_dim == 100 and default.gp_lambda == 10.0


def test_config_round_trip(tmp_path):
    config = WGANConfig(**TINY, gp_lambda=5.0, energy_weight=0.5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, WGANConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.generator_channels == (8, 4) and isinstance(loaded.critic_hidden, tuple)


@pytest.mark.parametrize("bad", [
    dict(latent_dim=0), dict(latent_dim=10**6), dict(generator_channels=(7, 4)), dict(generator_channels=(8,)),
    dict(critic_kernels_z=(10, 6)), dict(critic_kernels_z=(30, 15, 4)), dict(critic_channels=(2, 0)),
    dict(critic_hidden=()), dict(constrainer_channels=(2,)), dict(constrainer_channels=(2, 2, 2, 2, 2)),
    dict(constrainer_hidden=0), dict(gp_lambda=-1.0), dict(energy_weight=float("nan")), dict(gp_lambda=True),
    dict(hiden_size=3),
])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        WGANConfig(**{**TINY, **bad})


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


class StubGenerator(nn.Module):
    def __init__(self, fake):
        super().__init__()
        self.fake = nn.Parameter(fake.clone())

    def forward(self, z, c):
        self.seen_z = z
        return self.fake + 0 * z.sum()


class QuadraticCritic(nn.Module):
    """D(x, c) = w |x|^2 + c_0: grad_x D = 2 w x, so the penalty shows where the interpolation point lies."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, c):
        return self.w * x.flatten(1).square().sum(1) + c[:, 0]


class MeanConstrainer(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, c_other):
        return x.flatten(1).mean(1) + self.b + 0 * c_other.sum(1)


def test_loss_formulas_with_stub_networks():
    cond, batch = conditions(3), 3
    x = showers(cond) * 0.05
    fake = torch.randn(batch, *MESH, generator=torch.Generator().manual_seed(5)) * 0.05
    model = tiny_model(gp_lambda=7.0, energy_weight=0.25)
    model.generator, model.critic, model.constrainer = StubGenerator(fake), QuadraticCritic(), MeanConstrainer()
    n = noise(batch)
    parts = model.losses(x, cond, n)

    c = condition_features(cond, model.config.n_geometry_slots)
    d_real = 0.5 * x.flatten(1).square().sum(1) + c[:, 0]
    d_fake = 0.5 * fake.flatten(1).square().sum(1) + c[:, 0]
    alpha = n["u"][:, 0].reshape(-1, 1, 1, 1)
    x_hat = alpha * x + (1 - alpha) * fake  # grad of 0.5 |x|^2 is x itself
    y = torch.log(cond["energy"])
    err_real = (x.flatten(1).mean(1) + 0.3 - y) ** 2
    err_fake = (fake.flatten(1).mean(1) + 0.3 - y) ** 2
    expected = {
        "critic": d_fake - d_real,
        "gp": 7.0 * (x_hat.flatten(1).norm(dim=1) - 1) ** 2,
        "generator": -d_fake,
        "energy": 0.25 * (err_fake - err_real).abs(),
        "constrainer": err_real,
    }
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        assert parts[key].shape == (batch,)
        torch.testing.assert_close(parts[key], value.float(), rtol=1e-5, atol=1e-5, msg=key)
    # the latent is the start of each shower's step noise
    torch.testing.assert_close(model.generator.seen_z, n["noise"].flatten(1)[:, :8], rtol=0, atol=0)


def test_each_loss_trains_only_its_network():
    model = tiny_model()
    cond = conditions(4)
    x, n = showers(cond), noise(4)
    trains = {"critic": {"critic"}, "gp": {"critic"}, "generator": {"generator"}, "energy": {"generator"},
              "constrainer": {"constrainer"}}
    for key, nets in trains.items():
        model.zero_grad(set_to_none=True)
        model.losses(x, cond, n)[key].sum().backward()
        touched = {name.split(".")[0] for name, p in model.named_parameters()
                   if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched == nets, key


def test_losses_use_only_the_given_noise_and_work_without_grad():
    model = tiny_model()
    cond = conditions(4)
    x, n = showers(cond), noise(4)
    torch.manual_seed(1)
    first = model.losses(x, cond, n)
    torch.manual_seed(2)
    second = model.losses(x, cond, n)
    with torch.no_grad():  # the validation pass: the gradient penalty still works
        third = model.losses(x, cond, n)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
        torch.testing.assert_close(first[key], third[key])
    assert all(torch.isfinite(v).all() for v in first.values())


def test_training_steps_constrainer_loss_falls():
    # The adversarial parts (critic, generator) are a two-player game: their values need not fall on any
    # step, so they are only checked for finiteness. The constrainer is a supervised regression of ln E on
    # real showers and must learn; the gradient penalty, ~lambda at initialisation, falls as the critic
    # becomes 1-Lipschitz.
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(30):
        cond = conditions(16, seed=step)
        parts = model.losses(showers(cond, seed=step), cond, noise(16, step))
        opt.zero_grad()
        sum(v.mean() for v in parts.values()).backward()
        opt.step()
        history.append({k: v.mean().item() for k, v in parts.items()})
    start = {k: sum(h[k] for h in history[:5]) / 5 for k in history[0]}
    end = {k: sum(h[k] for h in history[-5:]) / 5 for k in history[0]}
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert end["constrainer"] < 0.2 * start["constrainer"]
    assert end["gp"] < start["gp"]


# ----------------------------------------------------------------------------------------------
# Checkpoint and generation
# ----------------------------------------------------------------------------------------------


def test_save_load_identical(tmp_path):
    import calofm.models.wgan  # noqa: F401  (registers the family with the Auto classes)

    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms start at 1/0: perturb so every tensor must be loaded
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, WGANModel)
    cond = conditions(3)
    a = model.generate(cond, torch.Generator().manual_seed(3))
    b = loaded.generate(cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    x, n = showers(cond), noise(3)
    for key, value in model.losses(x, cond, n).items():
        torch.testing.assert_close(loaded.losses(x, cond, n)[key], value)


def test_generate_shape_seed_and_conditions():
    model = tiny_model().eval()
    cond = conditions(5)
    a = model.generate(cond, torch.Generator().manual_seed(0))
    assert a.shape == (5, *MESH) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(model.generate(cond, torch.Generator().manual_seed(0)), a, rtol=0, atol=0)
    assert not torch.allclose(model.generate(cond, torch.Generator().manual_seed(1)), a)
    # the same latents with another energy, or another geometry slot, give other showers
    low = model.generate(conditions(5, energy=2.0, geometry=0), torch.Generator().manual_seed(0))
    high = model.generate(conditions(5, energy=80.0, geometry=0), torch.Generator().manual_seed(0))
    other = model.generate(conditions(5, energy=2.0, geometry=1), torch.Generator().manual_seed(0))
    assert (low - high).abs().max() > 1e-4 and (low - other).abs().max() > 1e-4


def test_bf16_autocast():
    model = tiny_model()
    cond = conditions(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = model.losses(showers(cond), cond, noise(2))
        out = model.generate(cond, torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in parts.values())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
