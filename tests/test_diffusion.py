"""EDM preconditioning, loss and samplers; samplers checked on an analytic Gaussian denoiser."""

import math

import pytest
import torch

from calofm.diffusion import (
    EDMPrecond,
    dpmpp_2m_sample,
    draw_sigma_noise,
    edm_loss,
    euler_sample,
    heun_sample,
    karras_sigmas,
)
from calofm.models import create_model

MU, S = 1.5, 0.3  # data ~ N(MU, S^2) independently per voxel
SIGMA_MAX = 80.0


class GaussianDenoiser:
    """Exact D(x; sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2) for N(MU, S^2) data; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def exact_ode_solution(noise):
    """The probability-flow ODE of this denoiser solves to x(0) - MU = (x(T) - MU) S / sqrt(S^2 + T^2)."""
    x_T = noise.double() * SIGMA_MAX
    return MU + (x_T - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)


def cond_for(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        energy=torch.rand(batch, generator=g) * 50 + 1,
        phi=torch.rand(batch, generator=g) * 6 - 3,
        theta=torch.rand(batch, generator=g) + 1,
        geometry=torch.randint(0, 8, (batch,), generator=g),
    )


@pytest.fixture(scope="module")
def noise():
    return torch.randn(4, 9, 16, 45, generator=torch.Generator().manual_seed(0))


def test_karras_sigmas():
    t = karras_sigmas(32, 0.002, 80.0, 7.0)
    assert t.dtype == torch.float64 and t.shape == (33,)
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002) and t[-1] == 0
    assert (t[1:] < t[:-1]).all()
    torch.testing.assert_close(karras_sigmas(1), torch.tensor([80.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        karras_sigmas(0)


@pytest.mark.parametrize("sampler, steps, nfe", [(heun_sample, 32, 63), (heun_sample, 1, 1), (euler_sample, 32, 32),
                                                   (dpmpp_2m_sample, 8, 8), (dpmpp_2m_sample, 1, 1)])
def test_network_evaluations(noise, sampler, steps, nfe):
    denoiser, seen = GaussianDenoiser(), []
    sampler(denoiser, noise[:2], num_steps=steps, callback=lambda i, n, x: seen.append((i, n)))
    assert denoiser.calls == nfe
    assert seen == [(i, steps) for i in range(steps)]


def test_samplers_recover_gaussian_and_heun_beats_euler(noise):
    exact = exact_ode_solution(noise)  # per sample: the deterministic ODE has a closed-form endpoint
    errors = {}
    for sampler in (heun_sample, euler_sample):
        for steps in (16, 32, 64):
            x = sampler(GaussianDenoiser(), noise, num_steps=steps)
            assert x.dtype == noise.dtype and x.shape == noise.shape
            errors[sampler.__name__, steps] = (x.double() - exact).abs().max().item()
    for steps in (16, 32, 64):  # (with 8 or fewer steps Heun overshoots and is not better than Euler here)
        assert errors["heun_sample", steps] < 0.5 * errors["euler_sample", steps]
    assert errors["heun_sample", 32] / errors["heun_sample", 64] > 3.5  # second order
    assert 1.7 < errors["euler_sample", 32] / errors["euler_sample", 64] < 2.3  # first order
    x = heun_sample(GaussianDenoiser(), noise, num_steps=32)  # CaloDiT-2's sampler
    assert errors["heun_sample", 32] < 0.05
    assert x.mean().item() == pytest.approx(MU, abs=0.02)  # 26k voxels: standard error ~0.002
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_dpmpp_2m_is_second_order_and_beats_heun_and_euler_per_network_evaluation(noise):
    exact = exact_ode_solution(noise)

    def error(sampler, steps):
        return (sampler(GaussianDenoiser(), noise, num_steps=steps).double() - exact).abs().max().item()

    assert error(dpmpp_2m_sample, 32) / error(dpmpp_2m_sample, 64) > 3.5  # second order at Euler's cost
    assert error(dpmpp_2m_sample, 64) < 0.01
    for steps in (4, 8):  # the few-step regime it is for: better than Euler at equal calls, Heun at about equal
        assert error(dpmpp_2m_sample, steps) < 0.5 * error(euler_sample, steps)
        assert error(dpmpp_2m_sample, 2 * steps) < 0.5 * error(heun_sample, steps)
    assert error(dpmpp_2m_sample, 32) < 0.5 * error(heun_sample, 16)  # 32 vs 31 network evaluations
    x = dpmpp_2m_sample(GaussianDenoiser(), noise, num_steps=32)
    assert x.dtype == noise.dtype and x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_stochastic_heun_reproducible_with_generator(noise):
    def run(seed):
        return heun_sample(
            GaussianDenoiser(), noise[:2], num_steps=8, s_churn=10.0, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_sampler_accepts_explicit_schedule_and_rejects_bad_ones(noise):
    explicit = heun_sample(GaussianDenoiser(), noise[:1], sigmas=karras_sigmas(8))
    torch.testing.assert_close(explicit, heun_sample(GaussianDenoiser(), noise[:1], num_steps=8))
    with pytest.raises(ValueError, match="decreasing"):
        heun_sample(GaussianDenoiser(), noise[:1], sigmas=torch.tensor([1.0, 2.0, 0.0]))


def test_precond_at_init_is_c_skip_times_x(noise):
    torch.manual_seed(0)
    precond = EDMPrecond(create_model("tiny").eval())
    assert precond.sigma_data == 1.0 and precond.sigma_max == 80.0  # new models: unit-variance model space
    x, sigma = noise[:4].double(), torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    out = precond(x, sigma, **cond_for(4))
    c_skip = (1 / (sigma**2 + 1)).reshape(-1, 1, 1, 1)
    assert out.dtype == torch.float64 and torch.equal(out, c_skip * x)


class RecordingNet(torch.nn.Module):
    """A stub F that records its inputs and returns a fixed tensor, to check every EDM scaling exactly."""

    def __init__(self, output, sigma_data):
        super().__init__()
        self.output, self.sigma_data, self.seen = output, sigma_data, {}
        self.weight = torch.nn.Parameter(torch.zeros(()))  # a parameter, for the dtype EDMPrecond reads

    def forward(self, x, c_noise, **cond):
        self.seen = {"x": x.clone(), "c_noise": c_noise.clone(), **cond}
        return self.output.to(x.dtype)


@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
def test_precond_scalings_with_a_recording_network(noise, sd):
    """D = c_skip x + c_out F(c_in x, ln(sigma)/4) with EDM Table 1's c_skip, c_out, c_in for this sigma_data."""
    x = noise[:3].double()
    sigma = torch.tensor([0.02, 1.0, 40.0], dtype=torch.float64)
    f_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = RecordingNet(f_out, sd)
    out = EDMPrecond(net)(x, sigma, geometry=torch.tensor([1, 2, 3]))
    s = sigma.reshape(-1, 1, 1, 1)
    c_in, c_skip = 1 / torch.sqrt(s**2 + sd**2), sd**2 / (s**2 + sd**2)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    torch.testing.assert_close(net.seen["x"], (c_in * x).float())  # F gets c_in x (in its dtype) ...
    torch.testing.assert_close(net.seen["c_noise"], (sigma.log() / 4).float())  # ... and ln(sigma) / 4
    assert torch.equal(net.seen["geometry"], torch.tensor([1, 2, 3]))  # conditions pass through untouched
    torch.testing.assert_close(out, c_skip * x + c_out * f_out)
    # the input to F has unit variance at every noise level when the data have std sigma_data
    data = sd * torch.randn(4000, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for level in (0.01, 1.0, 80.0):
        net = RecordingNet(torch.zeros(()), sd)
        EDMPrecond(net)(data + level * torch.randn(data.shape, generator=torch.Generator().manual_seed(5),
                                                   dtype=torch.float64), level)
        assert abs(net.seen["x"].std().item() - 1) < 0.05


def test_zero_network_loss_is_one_on_unit_variance_data():
    """With sigma_data = 1 on standardised data, the EDM-weighted loss of F = 0 is 1 for every sigma.

    D - x = (c_skip - 1) x + c_skip sigma n, so E|D - x|^2 = sigma^2 / (sigma^2 + 1) and times
    lambda = (sigma^2 + 1) / sigma^2 that is 1. sigma_data = 0.5 on the same data gives ~2.1 (between 1 and 4
    depending on sigma), what runs logged at step 0 before sigma_data matched the data."""
    torch.manual_seed(0)
    x = torch.randn(512, 9, 16, 45, generator=torch.Generator().manual_seed(1))
    cond = cond_for(512)
    net = create_model("tiny", patch_size=(3, 4, 5)).eval()
    with torch.no_grad():
        loss = edm_loss(EDMPrecond(net), x, cond, generator=torch.Generator().manual_seed(2))
        old = edm_loss(EDMPrecond(net, config=type("C", (), {"sigma_data": 0.5})()), x, cond,
                       generator=torch.Generator().manual_seed(2))
    assert abs(loss.mean().item() - 1) < 0.02
    assert 1.8 < old.mean().item() < 2.4


def test_edm_loss_per_sample_finite_and_reproducible(noise):
    torch.manual_seed(0)
    precond = EDMPrecond(create_model("tiny"))
    x, cond = noise[:4], cond_for(4)
    loss = edm_loss(precond, x, cond, generator=torch.Generator().manual_seed(7))
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
    again = edm_loss(precond, x, cond, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loss, again)
    cfg = precond.net.config  # the same draw with the model's own P_mean/P_std, passed in explicitly
    sigma, eps = draw_sigma_noise(x, torch.Generator().manual_seed(7), cfg.P_mean, cfg.P_std)
    assert torch.equal(edm_loss(precond, x, cond, sigma=sigma, noise=eps), loss)
    # per sample: a sample's loss does not depend on the rest of the batch
    part = edm_loss(precond, x[:2], {k: v[:2] for k, v in cond.items()}, sigma=sigma[:2], noise=eps[:2])
    torch.testing.assert_close(part, loss[:2])
    # at init F = 0, so D = c_skip (x + sigma n) and the loss has a closed form
    sd, s4 = 1.0, sigma.reshape(-1, 1, 1, 1)
    denoised = sd**2 / (s4**2 + sd**2) * (x + s4 * eps)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(loss, weight * (denoised - x).square().flatten(1).mean(1))


def test_loss_decreases_when_training_tiny_model():
    torch.manual_seed(0)
    model = create_model("tiny", patch_size=(3, 4, 5))  # 108 tokens instead of 360: 3x cheaper steps
    precond = EDMPrecond(model)
    g = torch.Generator().manual_seed(0)
    # a structured fixed batch: a smooth profile along z plus noise
    profile = torch.exp(-((torch.arange(45) - 12.0) ** 2) / 50)
    x = (profile * 2 - 1).expand(4, 9, 16, 45) + 0.1 * torch.randn(4, 9, 16, 45, generator=g)
    cond = cond_for(4)
    eval_sigma, eval_noise = draw_sigma_noise(
        x.repeat(4, 1, 1, 1), torch.Generator().manual_seed(1), model.config.P_mean, model.config.P_std
    )
    cond4 = {k: v.repeat(4) for k, v in cond.items()}

    def eval_loss():
        with torch.no_grad():
            return edm_loss(precond, x.repeat(4, 1, 1, 1), cond4, sigma=eval_sigma, noise=eval_noise).mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(50):
        loss = edm_loss(precond, x, cond, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.75 * before  # typically ~0.55


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_sampling_a_model_in_bf16_keeps_float64_state(noise, mode):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if mode == "bf16-weights":
        model.to(torch.bfloat16)
    precond, states = EDMPrecond(model), []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        x = heun_sample(precond, noise[:2], cond_for(2), num_steps=3, callback=lambda i, n, s: states.append(s.dtype))
    assert x.dtype == torch.float32 and torch.isfinite(x).all() and states == [torch.float64] * 3
