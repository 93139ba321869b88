"""Consistency distillation: the boundary parameterisation, the loss on an analytic ODE, and a tiny run whose
1-step student beats its teacher's 1-step sample, loads everywhere and resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from fake_hub import uploads  # noqa: F401 - pytest fixture
from train_helpers import reset_accelerate, run, tiny_config

import calofm
from calofm.cli import main as cli
from calofm.diffusion import ConsistencyPrecond, consistency_grid, consistency_loss, consistency_sample, edm_scalings
from calofm.distill import DistillConfig, distill
from calofm.sampling import ShowerSampler, student_sigmas

MU, S = 1.5, 0.3  # data ~ N(MU, S^2) per voxel


class Config:
    sigma_data, sigma_min, sigma_max, rho = 1.0, 0.002, 80.0, 7.0
    P_mean, P_std = -0.5, 1.2


def gaussian_denoiser(x, sigma, **cond):
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def exact_consistency(x, sigma, **cond):
    """The consistency function of N(MU, S^2) data: the ODE path through x at sigma ends at
    MU + (x - MU) S / sqrt(S^2 + sigma^2); ending at sigma_min instead makes f(x, sigma_min) = x exactly."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + (x - MU) * math.sqrt(S**2 + Config.sigma_min**2) / (S**2 + sigma**2).sqrt()


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, c_noise, **cond):
        self.seen.append((x.clone(), c_noise.clone()))
        return torch.ones_like(x)


def test_boundary_parameterisation_is_exact():
    net = Recorder()
    f = ConsistencyPrecond(net, Config)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(f(x, Config.sigma_min), x)  # f(x, sigma_min) = x whatever the network says
    sigma = torch.tensor([0.5, 2.0, 80.0], dtype=torch.float64)
    out = f(x, sigma)
    s = sigma[:, None]
    c_skip = 1 / ((s - Config.sigma_min) ** 2 + 1)
    c_out = (s - Config.sigma_min) / (s**2 + 1).sqrt()
    torch.testing.assert_close(out, c_skip * x + c_out)  # F = 1
    x_in, c_noise = net.seen[-1]
    torch.testing.assert_close(x_in.double(), x / (s**2 + 1).sqrt(), rtol=1e-6, atol=1e-6)  # EDM's c_in
    torch.testing.assert_close(c_noise.double(), sigma.log() / 4, rtol=1e-6, atol=1e-6)
    # far from sigma_min the student's scalings are its teacher's (EDM), so a copy of the teacher starts close
    c_skip_edm, c_out_edm = edm_scalings(s, 1.0)[:2]
    torch.testing.assert_close(c_skip[1:], c_skip_edm[1:], rtol=0.01, atol=1e-3)
    torch.testing.assert_close(c_out[1:], c_out_edm[1:], rtol=0.01, atol=1e-3)


def test_distillation_loss_vanishes_for_the_exact_consistency_function_only():
    g = torch.Generator().manual_seed(0)
    x = MU + S * torch.randn(256, 20, generator=g, dtype=torch.float64)
    z, u = torch.randn(256, 20, generator=g, dtype=torch.float64), torch.rand(256, generator=g, dtype=torch.float64)
    grid = consistency_grid(400, Config)
    assert grid[0].item() == pytest.approx(Config.sigma_min) and grid[-1].item() == pytest.approx(Config.sigma_max)
    exact = consistency_loss(exact_consistency, exact_consistency, gaussian_denoiser, x, {}, z, u, grid)
    identity = consistency_loss(lambda y, s: y, lambda y, s: y, gaussian_denoiser, x, {}, z, u, grid)
    assert exact.shape == (256,) and exact.mean() < 1e-4  # only the teacher's Heun error is left
    assert identity.mean() > 1e3 * exact.mean()
    # and the exact consistency function samples the data in one step
    y = consistency_sample(exact_consistency, torch.randn(4096, 8, generator=g), sigmas=[80.0])
    assert y.mean().item() == pytest.approx(MU, abs=0.02) and y.std().item() == pytest.approx(S, rel=0.05)


def test_student_sigmas():
    assert student_sigmas(1, 0.002, 80.0, 7.0) == [80.0]
    two = student_sigmas(2, 0.002, 80.0, 7.0)
    assert two[0] == 80.0 and 1.0 < two[1] < 5.0
    four = student_sigmas(4, 0.002, 80.0, 7.0)
    assert four[0] == 80.0 and all(b < a for a, b in zip(four, four[1:])) and four[-1] > 0.002


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    return run(tiny_config(root / "run", root / "cache", steps=30, val_every=30,
                           **{"model.variant": "factorised", "optim.lr": 3e-3}))


def distil(teacher: Path, out: Path, **kw) -> Path | None:
    reset_accelerate()
    args = dict(model=str(teacher), output_dir=str(out), steps=50, lr=2e-3, samples=96, val_samples=16,
                cache_dir=str(teacher.parent.parent / "cache"), num_workers=0, val_every=50, log_every=5,
                batch_size=16, warmup_steps=2, student_steps=1)
    return distill(DistillConfig(**{**args, **kw}))


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    return distil(teacher, tmp_path_factory.mktemp("student") / "run")


def model_space_samples(folder: Path, sampler: str, steps: int, n: int = 256):
    """Profile and shower in model space at fixed conditions (ILD, 30 GeV), from the same noise."""
    g = calofm.load(folder, device="cpu")
    r = ShowerSampler(g.net, g.config, sampler=sampler, steps=steps)
    gen = torch.Generator().manual_seed(0)
    cond = {"energy": torch.full((n,), 30.0), "phi": torch.full((n,), 0.1), "theta": torch.full((n,), 1.5),
            "geometry": torch.full((n,), g.slot("ild"))}
    noise = torch.randn((n, *g.config.mesh_shape), generator=gen, dtype=torch.float64)
    profile_noise = torch.randn((n, r.space.profile.width), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        profile = r.solve(r.profile_precond, profile_noise, cond, gen)
        layers = r.space.profile.inverse(profile, cond["energy"].double() * 1e3, cond["geometry"])
        shower = r.solve(r.precond, noise, {**cond, "profile": profile.float(), "layer_energy": layers.float()}, gen)
    return profile, shower


def distance(a, b) -> float:
    """Mean absolute difference of the per-entry means and standard deviations of two sample sets."""
    return ((a.mean(0) - b.mean(0)).abs().mean() + (a.std(0) - b.std(0)).abs().mean()).item()


def test_one_step_student_beats_the_one_step_teacher(teacher, student):
    ref = model_space_samples(teacher, "heun", 32)  # what both should reproduce
    one_step_teacher = model_space_samples(teacher, "euler", 1)
    one_step_student = model_space_samples(student, "consistency", 1)
    for k, part in enumerate(("profile", "shower")):
        t, s = distance(one_step_teacher[k], ref[k]), distance(one_step_student[k], ref[k])
        assert s < 0.9 * t, (part, s, t)


def test_student_loads_samples_and_generates_with_its_own_steps(teacher, student, tmp_path, capsys):
    from transformers import AutoModel

    g = calofm.load(student, device="cpu")
    assert g.config.consistency_sigmas == [80.0] and g.geometries == calofm.load(teacher).geometries
    assert type(AutoModel.from_pretrained(student)).__name__ == "CaloDiTModel"
    info = json.loads((student / "calofm_distill.json").read_text())
    assert info["student_steps"] == 1 and info["teacher"]["fingerprint"]
    showers = g.sample(geometry="par04_siw", energy_gev=[10.0, 40.0], phi=0.0, theta=1.5, seed=1)
    assert showers.shape == (2, 9, 16, 45) and (showers >= 0).all() and showers.sum() > 0
    with pytest.raises(ValueError, match="consistency"):
        g.sample(geometry="par04_siw", energy_gev=10.0, phi=0.0, theta=1.5, sampler="heun")
    with pytest.raises(ValueError, match="distilled student"):
        calofm.load(teacher).sample(geometry="ild", energy_gev=10.0, phi=0.0, theta=1.5, sampler="consistency")
    out = tmp_path / "gen.h5"
    assert cli(["generate", "--model", str(student), "--geometry", "ild", "--samples", "8", "--out", str(out)]) == 0
    assert "(consistency, 1 steps, 1 NFE)" in capsys.readouterr().out
    assert cli(["generate", "--model", str(student), "--geometry", "ild", "--samples", "8", "--steps", "2",
                "--out", str(tmp_path / "two.h5")]) == 0
    # its model card says what it is
    assert cli(["card", str(student)]) == 0
    card = (student / "README.md").read_text()
    assert "consistency-distilled" in card and "1 network evaluation per shower" in card


def test_distill_refuses_students_adapters_and_bad_options(teacher, student, tmp_path):
    with pytest.raises(ValueError, match="already a distilled student"):
        distil(student, tmp_path / "again")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="merge it first"):
        distil(adapter, tmp_path / "x")
    with pytest.raises(Exception, match="inside the input"):
        distil(teacher, teacher / "inside")
    for bad in ({"student_steps": 3}, {"grid": 1}, {"lr": 0.0}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError):
            DistillConfig(model="m", **bad)
    assert not (tmp_path / "x").exists()


def test_resumed_distillation_matches_an_uninterrupted_one(teacher, tmp_path):
    from safetensors.torch import load_file

    straight = distil(teacher, tmp_path / "straight", steps=6, save_every=100)
    assert distil(teacher, tmp_path / "resumed", steps=6, stop_at=3) is None
    resumed = distil(teacher, tmp_path / "resumed", steps=6)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_student_exports_whole_and_onnx_runtime_follows_both_consistency_steps(student, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from calofm.export import build_graph, example_inputs, export
    from calofm.hub.loading import load_network

    path = tmp_path / "student.onnx"
    info = export(str(student), path, steps=2, noise_inputs=True)
    assert (info["sampler"], info["steps"]) == ("consistency", 2)
    net, config, _ = load_network(student)
    graph = build_graph(net, config, steps=2, noise_inputs=True)
    args = example_inputs(graph, 4)
    assert args[4].shape[1] == 2 and args[5].shape[1] == 2  # one draw per step, both networks
    with torch.no_grad():
        expected = graph(*args).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.max())
    # the second step's draw matters (it is really read from the input)
    changed = (*args[:4], torch.cat([args[4][:, :1], -args[4][:, 1:]], 1), args[5])
    assert not np.allclose(session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), changed)})[0],
                           got)


def test_push_publishes_the_distillation_record_without_local_paths(student, uploads, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    assert cli(["push", str(student), "--repo-id", "org/student"]) == 0
    assert "calofm_distill.json" in uploads.files()
    staged = uploads.staged[-1]
    local = json.loads((student / "calofm_distill.json").read_text())
    info = json.loads((staged / "calofm_distill.json").read_text())
    assert local["teacher"]["base_path"] and "base_path" not in info["teacher"]
    assert info["teacher"]["base"] == Path(local["teacher"]["base"]).name == info["config"]["model"]
    assert info["teacher"]["fingerprint"] == local["teacher"]["fingerprint"]
    assert info["student_steps"] == local["student_steps"] and info["consistency_sigmas"] == [80.0]
    assert "output_dir" not in info["config"] and "cache_dir" not in info["config"]
    text = "".join(p.read_text(errors="ignore") for p in staged.rglob("*") if p.suffix in (".json", ".md"))
    assert str(tmp_path.parent) not in text and str(student.parent) not in text  # no local path is published
    assert calofm.load(staged).config.consistency_sigmas == [80.0]  # what was uploaded loads as a student
