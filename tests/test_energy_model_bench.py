"""benchmarks/energy_model.py's building blocks: data, both energy models (tiny), metrics. No timing checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("zuko")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "energy_model.py"


@pytest.fixture(scope="module")
def em():
    spec = importlib.util.spec_from_file_location("energy_model_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def profiles(em, tmp_showers):
    """Training profiles of the three pretraining geometries from small files, with empty layers added:
    the first layers of every other shower, and the last layer of every ILD shower (a constant column)."""
    parts = {}
    for name, slot in em.GEOMETRIES.items():
        p = em.read_profiles(tmp_showers(n=24, seed=slot, geometry=name), slot)
        p.layers[::2, :3] = 0.0
        if name == "ild":
            p.layers[:, -1] = 0.0
        parts[name] = p
    return parts


def test_profiles_fit_like_training(em, profiles):
    profile = em.fit_profiles(profiles, samples=16)
    assert profile.geometries == em.GEOMETRIES and profile.width == em.WIDTH
    assert all(e["count"] == 16 for e in profile.stats.values())
    data = em.Profiles.cat(list(profiles.values()))
    y = profile(data.layers, data.energy, data.geometry)
    assert y.shape == (72, em.WIDTH) and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ["diffusion", "nsf", "maf"])
def test_energy_models_train_and_sample(em, profiles, kind):
    torch.manual_seed(0)
    profile = em.fit_profiles(profiles)
    data = em.Profiles.cat(list(profiles.values()))
    y = profile(data.layers, data.energy, data.geometry).float()
    if kind == "diffusion":
        model = em.DiffusionEnergyModel(hidden=16, depth=1, heads=2, frequency_embedding_size=16, sample_steps=3)
    else:
        model = em.FlowEnergyModel(profile, kind, transforms=2, hidden=(16,), bins=4)
    trainer = em.Trainer(model, y, data, steps=4, batch=8).run()
    assert trainer.step == 4 and np.isfinite(trainer.losses).all()
    held = data.select(torch.arange(0, 72, 7))  # rows of every geometry
    samples, layers, ms = em.sample_layers(trainer.ema_model(), held, profile, batch=4)
    assert samples.shape == (len(held), em.WIDTH) and torch.isfinite(samples).all() and ms > 0
    assert layers.shape == (len(held), em.N_LAYERS) and (layers >= 0).all()
    # the layers share out exactly the sampled total E_inc exp(v_0) (capped at E_inc)
    mean, std = profile._table(held.geometry, torch.float64, "cpu")
    total = held.energy * torch.exp((samples[:, 0] * std[:, 0] + mean[:, 0]).clamp_max(0))
    torch.testing.assert_close(layers.sum(dim=1), total, rtol=1e-9, atol=0.0)


def test_flow_dequantises_only_empty_layers(em, profiles):
    profile = em.fit_profiles(profiles)
    data = em.Profiles.cat(list(profiles.values()))
    y = profile(data.layers, data.energy, data.geometry).float()
    model = em.FlowEnergyModel(profile, "maf", transforms=1, hidden=(8,))
    slots = data.geometry
    at_empty = (y - model.empty[slots]).abs() < 1e-3 * model.inv_std[slots]
    assert torch.equal(at_empty[:, 1:], data.layers == 0) and not at_empty[:, 0].any()


def test_layer_metrics_of_identical_samples(em, profiles):
    p = profiles["par04_siw"]
    m = em.layer_metrics(p.layers.numpy(), p.layers.numpy(), p.energy.numpy(), "par04_siw")
    assert m["e_ratio"] == pytest.approx(1.0) and m["spread"] == pytest.approx(1.0)
    assert m["s_etot"] == 0.0 and m["s_layer"] == 0.0 and m["corr"] == pytest.approx(0.0, abs=1e-12)
    shifted = em.layer_metrics(p.layers.numpy(), 2 * p.layers.numpy(), p.energy.numpy(), "par04_siw")
    assert shifted["e_ratio"] == pytest.approx(2.0) and shifted["s_etot"] > 0.5
    assert shifted["corr"] == pytest.approx(0.0, abs=1e-9)  # a common scale leaves correlations alone
    assert em.table([{"model": "flow", "budget": 1.0, "geometry": "odd", "steps": 3, "train_s": 1.0, "params": 9,
                      "ms": 0.1, **m}]).count("\n") == 1
