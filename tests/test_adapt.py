"""Adaptation to a new detector: LoRA properties, adapter round trips, full/scratch runs, errors."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import reset_accelerate, run, tiny_config

from calofm.adapt import ADAPTER_FILE, AdaptConfig, assign_slot, load_adapted, lora_wrap
from calofm.cli import main as cli
from calofm.geometry import load_geometry
from calofm.hub.folders import load_model, save_model
from calofm.models import CaloDiTConfig, CaloDiTModel
from calofm.training.tracking import read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    return run(tiny_config(out, cache, steps=20, val_every=20))


def inputs(slot: int, n: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 9, 16, 45, generator=g)
    return x, torch.randn(n, generator=g), dict(energy=torch.full((n,), 20.0), phi=torch.zeros(n),
                                                theta=torch.full((n,), 1.3), geometry=torch.full((n,), slot))


def adapt(tmp_path, base, cache, *extra) -> int:
    reset_accelerate()
    return cli(["adapt", "--geometry", "allegro", "--samples", "256", "--base", str(base), "--steps", "8",
                "--cache-dir", str(cache), "--batch-size", "16", *extra])


def perturb_lora(pm, scale=0.05):
    with torch.no_grad():  # LoRA B starts at zero; give it weights so the adapter does something
        for name, p in pm.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(scale * torch.randn_like(p))


def test_lora_is_a_noop_at_init_and_disabling_it_restores_the_base(base):
    net = CaloDiTModel.from_pretrained(base)
    slot = assign_slot(net.config, load_geometry("allegro"))
    assert slot == 5  # the card's slot is free in the base
    x, c, cond = inputs(0)
    ref = net(x, c, **cond).detach().clone()
    pm = lora_wrap(net, slot, rank=4, alpha=8)
    torch.testing.assert_close(pm(x, c, **cond), ref, rtol=0, atol=0)  # exact no-op at init
    perturb_lora(pm)
    assert not torch.allclose(pm(x, c, **cond), ref)
    with pm.disable_adapter():  # pretrained geometries: exactly the base model
        torch.testing.assert_close(pm(x, c, **cond), ref, rtol=0, atol=0)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    # the trainable-token delta touches only the new slot's embedding row
    x, c, cond5 = inputs(slot)
    emb = pm.base_model.model.geometry_embed
    rows = emb(torch.arange(8))
    with pm.disable_adapter():
        rows0 = emb(torch.arange(8))
    changed = (rows - rows0).abs().sum(1) > 0
    assert changed.tolist() == [i == slot for i in range(8)]


def test_lora_adaptation_run_round_trips(tmp_path, base, cache, monkeypatch):
    out = tmp_path / "lora"
    assert adapt(tmp_path, base, cache, "--out", str(out), "--rank", "4", "--merge") == 0
    adapter, merged_dir = out / "model", out / "merged"
    info = json.loads((adapter / ADAPTER_FILE).read_text())
    assert info["geometry"] == "allegro" and info["slot"] == 5 and info["method"] == "lora"
    assert info["trainable_parameters"] < 0.3 * info["total_parameters"]
    assert info["base_revision"] is None  # a local base: no Hub commit
    # how each model was made, for its card: kind, steps, showers per geometry, no local paths
    rec = json.loads((adapter / "calofm_training.json").read_text())
    assert rec["kind"] == "lora" and rec["steps"] == 8 and rec["samples_seen"] == 8 * 16
    assert rec["geometries"]["allegro"]["train_showers"] == 256 and rec["geometries"]["allegro"]["val_showers"] > 0
    assert rec["geometries"]["allegro"]["sources"][0]["generator"].startswith("calofm-sim")
    base_rec = json.loads((Path(base) / "calofm_training.json").read_text())
    assert base_rec["kind"] == "pretrained" and set(base_rec["geometries"]) == {"par04_siw", "ild"}
    assert base_rec["geometries"]["par04_siw"]["train_showers"] == 384
    for text in ((adapter / "calofm_training.json").read_text(), (Path(base) / "calofm_training.json").read_text()):
        assert str(tmp_path) not in text and str(cache) not in text and str(Path(base).parent) not in text
    assert (adapter / "adapter_model.safetensors").stat().st_size < (Path(base) / "model.safetensors").stat().st_size
    # loss on the new detector falls
    recs = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if "val/allegro" in r]
    assert recs[-1]["val/allegro"] < recs[0]["val/allegro"]
    # adapter (unmerged), adapter merged on load, and the saved merged model agree
    x, c, cond = inputs(5)
    pm = load_adapted(adapter, merged=False)
    y_peft = pm(x, c, **cond)
    y_merged = load_adapted(adapter)(x, c, **cond)
    saved = CaloDiTModel.from_pretrained(merged_dir)
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved(x, c, **cond), y_peft, rtol=1e-4, atol=1e-4)
    # a merged model is a new network: it claims only the geometry it was adapted to
    assert saved.config.geometry_slots == {"allegro": 5} and load_adapted(adapter).config.geometry_slots == {
        "allegro": 5}
    # the adapter itself routes: base geometries go through the untouched base, exactly, also in a mixed batch
    base_net = CaloDiTModel.from_pretrained(base)
    assert pm.config.geometry_slots == {"par04_siw": 0, "ild": 2, "allegro": 5}
    x, c, cond0 = inputs(0)
    torch.testing.assert_close(pm(x, c, **cond0), base_net(x, c, **cond0), rtol=0, atol=0)
    mixed = {**cond0, "geometry": torch.tensor([0, 5, 2, 5])}
    y = pm(x, c, **mixed)
    for net, rows in ((base_net, [0, 2]), (pm.adapted, [1, 3])):  # each part is run as its own batch
        torch.testing.assert_close(y[rows], net(x[rows], c[rows], **{k: v[rows] for k, v in mixed.items()}),
                                   rtol=0, atol=0)
    # generation from the adapter folder and from the merged model
    for model in (adapter, merged_dir):
        gen = tmp_path / f"gen_{model.name}.h5"
        assert cli(["generate", "--model", str(model), "--geometry", "allegro", "--samples", "4", "--steps", "2",
                    "--out", str(gen)]) == 0
    import calofm

    kw = dict(geometry="allegro", energy_gev=10.0, phi=0.0, theta=1.5, steps=2, seed=0)
    s = calofm.load(adapter, device="cpu").sample(**kw)
    assert s.shape == (1, 9, 16, 45)
    # base geometries from the adapter folder: exactly the base model's showers; the merged model refuses them
    siw = dict(kw, geometry="par04_siw", energy_gev=[10.0, 40.0])
    np.testing.assert_array_equal(calofm.load(adapter, device="cpu").sample(**siw),
                                  calofm.load(base, device="cpu").sample(**siw))
    with pytest.raises(ValueError, match="not trained on geometry 'par04_siw'"):
        calofm.load(merged_dir, device="cpu").sample(**siw)
    # the brightest ALLEGRO training cell is recorded and reaches the loaded model's config
    assert 0 < info["cell_max"] < 1
    assert load_adapted(adapter).config.geometry_cell_max["allegro"] == info["cell_max"]
    assert saved.config.geometry_cell_max["allegro"] == info["cell_max"]
    # the base is found from any working directory, also when only its place relative to the adapter holds
    assert Path(info["base_path"]).is_absolute() and (adapter / info["base_relative"]).resolve() == Path(base).resolve()
    (adapter / ADAPTER_FILE).write_text(json.dumps({**info, "base": "moved/away", "base_path": "/nowhere"}))
    monkeypatch.chdir(tmp_path.parent)
    np.testing.assert_array_equal(calofm.load(adapter, device="cpu").sample(**kw), s)


def test_full_and_scratch_runs_and_cache_reuse(tmp_path, base, cache, caplog):
    caplog.set_level(logging.INFO, logger="calofm.sim.cache")
    assert adapt(tmp_path, base, cache, "--out", str(tmp_path / "full"), "--method", "full") == 0
    assert "reusing cached" in caplog.text and "simulating" not in caplog.text  # data from the LoRA test
    full = CaloDiTModel.from_pretrained(tmp_path / "full" / "model")
    assert full.config.geometry_slots == {"allegro": 5}  # trained on ALLEGRO only: it claims nothing else
    assert adapt(tmp_path, base, cache, "--out", str(tmp_path / "scratch"), "--from-scratch") == 0
    scratch = CaloDiTModel.from_pretrained(tmp_path / "scratch" / "model")
    assert scratch.config.geometry_slots == {"allegro": 5}
    assert set(scratch.config.geometry_cell_max) == {"allegro"}
    assert full.config.geometry_cell_max["allegro"] == scratch.config.geometry_cell_max["allegro"]
    assert scratch.config.hidden_size == full.config.hidden_size  # same architecture
    info = json.loads((tmp_path / "scratch" / "model" / ADAPTER_FILE).read_text())
    assert info["method"] == "scratch" and info["trainable_parameters"] == info["total_parameters"]


def test_errors_are_one_line(tmp_path, base, cache, capsys):
    assert cli(["adapt", "--geometry", "atlas", "--base", str(base), "--steps", "1"]) == 2
    assert "unknown geometry 'atlas'" in capsys.readouterr().err
    # a data file whose mesh does not match the geometry
    from calofm.data.format import FileAttrs
    from calofm.data.io import write_showers

    bad = tmp_path / "bad.h5"
    write_showers(bad, np.zeros((600, 9, 16, 45), "f4"), np.full(600, 1e4, "f4"), np.zeros(600, "f4"),
                  np.full(600, 1.5, "f4"), attrs=FileAttrs(mesh_dr=7.0))
    assert adapt(tmp_path, base, cache, "--data", str(bad), "--out", str(tmp_path / "x")) == 2
    assert "mesh mismatch" in capsys.readouterr().err
    # a base model on another mesh
    coarse = tmp_path / "coarse"
    net = CaloDiTModel.from_pretrained(base)
    CaloDiTModel(CaloDiTConfig(**{**net.config.to_dict(), "mesh_shape": (9, 16, 30), "geometry_cards": {}})
                 ).save_pretrained(coarse)
    capsys.readouterr()
    assert adapt(tmp_path, coarse, cache, "--out", str(tmp_path / "w")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"calofm adapt: error: {coarse}: mesh (9, 16, 30) does not match the data mesh (9, 16, 45)")
    # a base without spare slots
    full_base = tmp_path / "fullbase"
    net = CaloDiTModel.from_pretrained(base)
    net.config.geometry_slots = {f"g{i}": i for i in range(8)}
    net.config.geometry_thresholds, net.config.geometry_cell_max, net.config.geometry_cards = {}, {}, {}
    net.save_pretrained(full_base)
    assert adapt(tmp_path, full_base, cache, "--out", str(tmp_path / "y")) == 2
    assert "no spare geometry slot" in capsys.readouterr().err
    # an adapter applied to a different base
    assert adapt(tmp_path, base, cache, "--out", str(tmp_path / "z"), "--steps", "1") == 0
    other = tmp_path / "other"
    net, cards, _ = load_model(base)
    with torch.no_grad():
        net.final_layer.linear.weight.add_(0.01)
    save_model(net, other, cards)
    info_path = tmp_path / "z" / "model" / ADAPTER_FILE
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "base": str(other), "base_path": str(other), "base_relative": None}))
    with pytest.raises(ValueError, match="different base model"):
        load_adapted(tmp_path / "z" / "model")
    assert cli(["generate", "--model", str(tmp_path / "z" / "model"), "--geometry", "allegro", "--samples", "1",
                "--out", str(tmp_path / "g.h5")]) == 2
    assert "different base model" in capsys.readouterr().err


def test_adapt_config_defaults():
    a = AdaptConfig(geometry="cld")
    assert a.method == "lora" and a.rank == 32 and a.learning_rate == 5e-3 and a.out == Path("runs/adapt_cld_lora")
    s = AdaptConfig(geometry="cld", from_scratch=True)
    assert s.kind == "scratch" and s.method == "full"
    with pytest.raises(ValueError):
        AdaptConfig(geometry="cld", method="full", merge=True)
