"""The energy-factorised variant end to end: training both parts, exact layer energies, adaptation, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import reset_accelerate, run, tiny_config

import calofm
from calofm.adapt import ADAPTER_FILE, load_adapted
from calofm.cli import main as cli
from calofm.models import CaloDiTModel, create_model
from calofm.training.tracking import read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def factorised(out, cache, **kw):
    return tiny_config(out, cache, **{"model.variant": "factorised", **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Path:
    return run(factorised(tmp_path_factory.mktemp("base") / "run", cache, steps=30, val_every=30,
                          **{"optim.lr": 3e-3}))


def test_both_parts_learn_and_the_model_round_trips(base):
    recs = [r for r in read_metrics(base.parent / "logs" / "metrics.jsonl") if "val/ild" in r]
    first, last = recs[0], recs[-1]
    assert first["step"] == 0 and last["step"] == 30
    for part in ("val", "val_profile"):
        for geometry in ("par04_siw", "ild"):
            key = f"{part}/{geometry}"
            assert 0.7 < first[key] < 1.5  # sigma_data = 1 on unit-variance data: ~1 at initialisation
            assert last[key] < 0.95 * first[key], key
    model = CaloDiTModel.from_pretrained(base)
    from transformers import AutoModel

    auto = AutoModel.from_pretrained(base)
    assert type(auto) is CaloDiTModel and auto.config.variant == "factorised"
    for (k, a), (_, b) in zip(model.state_dict().items(), auto.state_dict().items()):
        assert torch.equal(a, b), k
    cfg = model.config
    assert cfg.preprocessing["mode"] == "fraction" and cfg.preprocessing["noise_cut"] == 0.75
    assert cfg.geometry_cell_max == {}
    assert set(cfg.profile_preprocessing["stats"]) == {"par04_siw", "ild"}
    assert {n: e["slot"] for n, e in cfg.profile_preprocessing["stats"].items()} == cfg.geometry_slots
    assert any(k.startswith("energy_net.") for k in model.state_dict())


class PointMassProfile(torch.nn.Module):
    """A stub energy network whose denoiser is exact for data that are all ``value``: D(x; sigma) = value.

    F receives c_in x and c_noise = ln(sigma) / 4 and returns (value - c_skip x) / c_out (sigma_data = 1), so
    any sampler ends exactly at ``value``: the formula of EDM's preconditioning, checked end to end."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, y, c_noise, **cond):
        sigma = torch.exp(4 * c_noise.double())[:, None]
        x = y.double() * torch.sqrt(sigma**2 + 1)
        c_skip, c_out = 1 / (sigma**2 + 1), sigma / torch.sqrt(sigma**2 + 1)
        return ((self.value - c_skip * x) / c_out).to(y.dtype)


def test_generated_layers_hold_exactly_the_energy_models_sample(base):
    gen = calofm.load(base, device="cpu")
    v = torch.zeros(1, 46, dtype=torch.float64)
    v[0, 0] = 0.5  # half a standard deviation above the mean visible fraction, average layer shares
    gen.net.energy_net = PointMassProfile(v)
    e = np.array([20.0, 40.0])
    showers = gen.sample(geometry="ild", energy_gev=e, phi=0.3, theta=1.4, steps=3, seed=2)
    expected = gen.space.profile.inverse(v.expand(2, 46), torch.tensor(e * 1e3, dtype=torch.float64),
                                         torch.full((2,), 2)).numpy()
    layers = showers.astype(np.float64).sum(axis=(1, 2))
    hit = (showers > 0).any(axis=(1, 2))
    # every layer with a hit holds exactly the energy model's energy (up to float32 cells) ...
    np.testing.assert_allclose(layers[hit], expected[hit], rtol=1e-4)
    assert showers[showers > 0].min() >= 0.1  # ... with the ILD readout threshold (0.1 MeV) applied:
    assert not hit[expected < 0.1].any()  # a layer with less energy than the threshold reads nothing
    assert hit.sum(axis=1).min() > 5


def test_generation_cli_and_determinism(tmp_path, base):
    from calofm.data.io import read_showers
    from calofm.sim import simulate_to_file

    ref = tmp_path / "ref.h5"
    simulate_to_file(ref, "par04_siw", 24, energy=(10, 50), seed=4, progress=False)
    out = tmp_path / "gen.h5"
    args = ["generate", "--model", str(base), "--geometry", "par04_siw", "--like", str(ref), "--steps", "2",
            "--out", str(out), "--seed", "5", "--batch-size", "16"]
    assert cli(args) == 0
    s = read_showers(out)["showers"]
    assert s.shape == (24, 9, 16, 45) and (s >= 0).all() and np.isfinite(s).all()
    again = tmp_path / "gen2.h5"
    assert cli([*args[:-6], "--out", str(again), "--seed", "5", "--batch-size", "16"]) == 0
    np.testing.assert_array_equal(read_showers(again)["showers"], s)


def test_resume_continues_the_same_loss_curve(tmp_path, cache):
    full = tmp_path / "full"
    run(factorised(full, cache, steps=8))
    part = tmp_path / "part"
    assert run(factorised(part, cache, steps=8, stop_at=4)) is None
    run(factorised(part, cache, steps=8))

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}

    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=1e-5)


def adapt(base, cache, out, *extra) -> int:
    reset_accelerate()
    return cli(["adapt", "--geometry", "allegro", "--samples", "256", "--base", str(base), "--steps", "6",
                "--cache-dir", str(cache), "--batch-size", "16", "--out", str(out), *extra])


def test_lora_adapts_both_parts_and_records_the_new_profile(tmp_path, base, cache):
    out = tmp_path / "lora"
    assert adapt(base, cache, out, "--rank", "4", "--merge") == 0
    info = json.loads((out / "model" / ADAPTER_FILE).read_text())
    assert info["profile"]["slot"] == info["slot"] and len(info["profile"]["mean"]) == 46
    from safetensors.torch import load_file

    keys = load_file(out / "model" / "adapter_model.safetensors").keys()
    assert any("energy_net" in k and "lora_" in k for k in keys)  # the energy model is adapted too ...
    assert any("energy_net.geometry_embed" in k for k in keys)  # ... with its own new slot row
    net = load_adapted(out / "model")
    assert net.config.profile_preprocessing["stats"]["allegro"]["slot"] == info["slot"]
    gen = calofm.load(out / "model", device="cpu")
    kw = dict(energy_gev=[10.0, 30.0], phi=0.0, theta=1.5, steps=2, seed=1)
    s = gen.sample(geometry="allegro", **kw)
    assert s.shape == (2, 9, 16, 45) and np.isfinite(s).all() and (s.sum(axis=(1, 2, 3)) > 0).all()
    # base geometries through the adapter folder are exactly the base model (energy model included)
    base_gen = calofm.load(base, device="cpu")
    np.testing.assert_array_equal(gen.sample(geometry="ild", **kw), base_gen.sample(geometry="ild", **kw))
    # the merged model generates the new geometry like the adapter, and only it
    merged = calofm.load(out / "merged", device="cpu")
    np.testing.assert_allclose(merged.sample(geometry="allegro", **kw), s, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="ild"):
        merged.sample(geometry="ild", **kw)
    # the merged model exports for Geant4 with its detector in Par04's fifth (fine-tuned) one-hot position
    from calofm.export import export

    info = export(str(out / "merged"), tmp_path / "allegro.onnx", steps=2, par04=True)
    assert info["slot_map"] == [None, None, None, None, "allegro"] and info["shapes"][1] == (3, 6480)
    with pytest.raises(ValueError, match="merge"):
        export(str(out / "model"), tmp_path / "adapter.onnx", steps=2)  # an adapter is two networks


@pytest.mark.parametrize("extra", [["--method", "full"], ["--from-scratch"]])
def test_full_and_scratch_runs_of_the_factorised_variant(tmp_path, base, cache, extra):
    out = tmp_path / "run"
    assert adapt(base, cache, out, *extra) == 0
    model = CaloDiTModel.from_pretrained(out / "model")
    assert model.config.variant == "factorised" and "allegro" in model.config.profile_preprocessing["stats"]
    s = calofm.load(out / "model", device="cpu").sample(geometry="allegro", energy_gev=20.0, phi=0.0, theta=1.5,
                                                      steps=2, seed=1)
    assert np.isfinite(s).all() and s.sum() > 0


def test_training_default_is_the_factorised_variant():
    from calofm.training.config import TrainConfig

    cfg = TrainConfig()
    # mode and noise cut are resolved per variant at fit time (fraction; noise cut 0.75 factorised, 2 single)
    assert cfg.model.variant == "factorised" and cfg.preprocess.mode is None and cfg.preprocess.floor is None
    assert cfg.preprocess.noise_cut is None


def test_single_variant_has_no_energy_model():
    single, fact = create_model("tiny"), create_model("tiny", variant="factorised")
    assert not hasattr(single, "energy_net") and hasattr(fact, "energy_net")
    x = torch.randn(2, 9, 16, 45)
    cond = dict(energy=torch.full((2,), 20.0), phi=torch.zeros(2), theta=torch.ones(2),
                geometry=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="profile"):
        fact(x, torch.zeros(2), **cond)
    layers = torch.full((2, 45), 50.0)
    assert fact(x, torch.zeros(2), profile=torch.zeros(2, 46), layer_energy=layers, **cond).shape == x.shape
    # each token sees its own layers: changing layer 44's energy changes only the last z-patch's output
    # (the tiny preset's patches are 3 layers deep; blocks mix tokens, so test the per-token embedding)
    e1 = fact.embed_layers(torch.zeros(2, 46), layers)
    layers2 = layers.clone()
    layers2[:, 44] = 5000.0
    e2 = fact.embed_layers(torch.zeros(2, 46), layers2)
    gz = fact.config.grid_size[2]
    changed = (e1 - e2).abs().sum(-1).reshape(2, -1, gz) > 0  # (B, r*p, z-patch)
    assert changed[..., -1].all() and not changed[..., :-1].any()
    with pytest.raises(ValueError, match="variant"):
        create_model("tiny", variant="double")
