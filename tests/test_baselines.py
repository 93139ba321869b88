"""The baseline registry and what every family shares: the train recipe, loading, sampling, the CLI."""

import h5py
import numpy as np
import pytest
import torch
from train_helpers import ROOT, SOURCES, reset_accelerate

import calofm
from calofm.cli import main as cli
from calofm.commands.train import main as train_main
from calofm.commands.train import parse
from calofm.config import ConfigError, from_dict
from calofm.models import FAMILIES, BaselineModel, family_classes
from calofm.training.config import TrainConfig

CONFIGS = ROOT / "recipes" / "configs" / "baselines"


def test_registry_lists_every_family_with_its_classes():
    assert set(FAMILIES) == {"calodit", "calodiffusion", "bibae", "wgan", "gflash", "caloflow", "caloclouds"}
    for name in FAMILIES:
        config_class, model_class = family_classes(name)
        assert config_class.model_type == name and model_class.config_class is config_class
        assert name == "calodit" or (issubclass(model_class, BaselineModel) and model_class.family == name)
    with pytest.raises(ValueError, match="unknown model family 'flow'"):
        family_classes("flow")


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "calodit"])
def test_every_baseline_has_a_recipe_that_builds(name):
    cfg = parse(["--model", name, "--output_dir", "runs/x"], CONFIGS)
    assert cfg.model.family == name
    family_classes(name)[0](**cfg.model.family_config)  # the recipe's family_config is a valid config


def test_family_options_are_checked_like_every_config_field():
    base = {"model": {"family": "gflash", "family_config": {"spot_factor": 2.0}}}
    assert from_dict(TrainConfig, base).model.family_config == {"spot_factor": 2.0}
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrainConfig, {"model": {"family": "gflash", "family_config": {"spot_factr": 2.0}}})
    with pytest.raises(ConfigError, match="spot_factor must be in"):
        from_dict(TrainConfig, {"model": {"family": "gflash", "family_config": {"spot_factor": -1.0}}})
    with pytest.raises(ConfigError, match="choose from calodit"):
        from_dict(TrainConfig, {"model": {"family": "vae"}})
    with pytest.raises(ConfigError, match="for the baseline families"):
        from_dict(TrainConfig, {"model": {"family_config": {"x": 1}}})
    with pytest.raises(ConfigError, match="from scratch only"):
        from_dict(TrainConfig, {"model": {"family": "wgan", "init_from": "runs/pretrain/model"}})
    cfg = from_dict(TrainConfig, base)
    with pytest.raises(ValueError, match="unknown key"):  # also when changed in code
        cfg.model.family_config = {"nope": 1}
    assert cfg.model.family_config == {"spot_factor": 2.0}


def tiny_run(name: str, out, cache, *extra) -> list[str]:
    srcs = ",".join(
        "{" + f"geometry: {s['geometry']}, samples: {s['samples']}, val_samples: {s['val_samples']}, "
        f"energy: [{s['energy'][0]}, {s['energy'][1]}]" + "}" for s in SOURCES)
    return ["--model", name, "--output_dir", str(out), f"--data.sources=[{srcs}]", f"--data.cache_dir={cache}",
            "--data.num_workers=0", "--data.stats_samples=128", "--tensorboard=false", *extra]


@pytest.fixture(scope="module")
def gflash_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("gflash") / "run"
    reset_accelerate()
    assert train_main(tiny_run("gflash", out, tmp_path_factory.mktemp("cache")), CONFIGS) == 0
    return out / "model"


def test_gflash_is_the_simulator_behind_the_model_interface(gflash_model):
    from calofm.geometry import load_geometry
    from calofm.sim.shower import ShowerSimulator

    gen = calofm.load(gflash_model, device="cpu")
    assert isinstance(gen.net, BaselineModel) and gen.geometries == {"par04_siw": 0, "ild": 2}
    assert gen.sampling() == ("gflash", 1, 0)
    e = np.array([5.0, 20.0, 40.0])
    showers = gen.sample(geometry="ild", energy_gev=e, phi=0.1, theta=1.5, seed=7, batch_size=8)
    # the same draws as the simulator itself with the generator of batch 0 of seed 7
    g = torch.Generator().manual_seed((7 * 1_000_003) % 2**63)
    sim = ShowerSimulator(load_geometry("ild"))
    ref = sim(torch.tensor(e), torch.full((3,), 1.5, dtype=torch.float64), torch.full((3,), 0.1), g)
    np.testing.assert_allclose(showers, ref.numpy(), rtol=1e-6)
    assert showers.shape == (3, 9, 16, 45) and (showers >= 0).all()
    with pytest.raises(ValueError, match="steps does not apply"):
        gen.sample(geometry="ild", energy_gev=e, phi=0.1, theta=1.5, steps=4)
    with pytest.raises(ValueError, match="own sampler"):
        gen.sample(geometry="ild", energy_gev=e, phi=0.1, theta=1.5, sampler="heun")


def test_gflash_generates_files_with_the_cli(gflash_model, tmp_path, capsys):
    out = tmp_path / "g.h5"
    assert cli(["generate", "--model", str(gflash_model), "--geometry", "par04_siw", "--energy", "10:20",
                "--samples", "4", "--out", str(out), "--seed", "1"]) == 0
    assert "(gflash, 1 steps, 0 NFE)" in capsys.readouterr().out
    with h5py.File(out) as f:
        showers = f["showers"][:]
    assert showers.shape[0] == 4 and np.isfinite(showers).all() and showers.sum() > 0


def test_a_second_write_refuses_the_finished_folder(gflash_model, capsys):
    reset_accelerate()
    assert train_main(tiny_run("gflash", gflash_model.parent, "unused"), CONFIGS) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["adapt", "--geometry", "allegro", "--steps", "1"],
    ["distill", "--steps", "1"],
    ["export", "--format", "onnx"],
])
def test_calodit_only_commands_refuse_a_baseline(gflash_model, tmp_path, capsys, command):
    flag = "--base" if command[0] == "adapt" else "--model"
    out = tmp_path / ("out.onnx" if command[0] == "export" else "out")
    assert cli([*command, flag, str(gflash_model), "--out", str(out)]) == 2
    assert "is a gflash baseline model" in capsys.readouterr().err
    assert not out.exists()


def tiny_family_config(family: str) -> dict:
    """The tiny config of each trainable family's own tests (tests/test_<family>.py)."""
    import importlib

    return dict(importlib.import_module(f"test_{family}").TINY)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_tiny(family: str, out, cache, *extra) -> int:
    import json

    reset_accelerate()
    options = json.dumps(tiny_family_config(family))
    return train_main(tiny_run(family, out, cache, "--steps=4", "--batch_size=8", "--val_every=2", "--log_every=1",
                               "--save_every=2", "--data.stats_samples=64", "--optim.warmup_steps=1",
                               f"--model.family_config={options}", *extra), CONFIGS)


@pytest.mark.parametrize("family", ["calodiffusion", "bibae", "wgan", "caloflow", "caloclouds"])
def test_each_family_trains_in_the_loop_and_samples_through_calofm_load(family, tmp_path, cache):
    from transformers import AutoModel

    from calofm.training.tracking import read_metrics

    out = tmp_path / "run"
    assert train_tiny(family, out, cache) == 0
    records = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if "val/ild" in r]
    assert [r["step"] for r in records] == [0, 2, 4] and all(np.isfinite(r["val/ild"]) for r in records)
    model = out / "model"
    assert (model / "model.safetensors").is_file() and not list(model.glob("*.bin"))
    auto = AutoModel.from_pretrained(model)
    assert type(auto) is family_classes(family)[1] and auto.config.geometry_slots == {"par04_siw": 0, "ild": 2}
    assert auto.config.preprocessing["mode"] == family_classes(family)[0].preprocessing_defaults["mode"]
    gen = calofm.load(model, device="cpu")
    e = np.array([5.0, 40.0])
    showers = gen.sample(geometry="ild", energy_gev=e, phi=0.3, theta=1.4, seed=3)
    again = gen.sample(geometry="ild", energy_gev=e, phi=0.3, theta=1.4, seed=3)
    assert showers.shape == (2, 9, 16, 45) and np.isfinite(showers).all() and (showers >= 0).all()
    np.testing.assert_array_equal(showers, again)  # a seed gives the same showers
    # MeV, capped: no cell above the brightest cell of the training data (a fraction of E_inc), thresholded
    cap = gen.config.geometry_cell_max["ild"] * e[:, None, None, None] * 1e3
    assert (showers <= cap * (1 + 1e-5)).all()
    threshold = gen.threshold("ild")
    assert ((showers == 0) | (showers >= threshold)).all()


def test_a_baseline_resumes_exactly(tmp_path, cache):
    """Stopped at step 2 and resumed: the same weights as one uninterrupted run (the GAN's latents, the
    BIB-AE's reparameterisation noise and the DDPM's timesteps all come from the loop's keyed noise)."""
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_tiny("bibae", straight, cache) == 0
    assert train_tiny("bibae", resumed, cache, "--stop_at=2") == 0
    assert not (resumed / "model").exists()
    assert train_tiny("bibae", resumed, cache) == 0
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_baseline_gets_a_model_card_that_says_what_it_is(gflash_model):
    from huggingface_hub import ModelCard

    from calofm.hub.modelcard import card_metadata_errors, folder_kind

    assert folder_kind(gflash_model) == "baseline"
    assert cli(["card", str(gflash_model)]) == 0
    text = (gflash_model / "README.md").read_text()
    assert "A GFlash baseline model" in text and "CaloDiT" not in text and "steps=10" not in text
    assert card_metadata_errors(ModelCard.load(gflash_model / "README.md"), kind="baseline") == []


def test_every_baseline_family_says_what_it_is_for_its_card():
    from calofm.models import BASELINES, family_classes

    for name in BASELINES:
        model_class = family_classes(name)[1]
        assert model_class.family == name and model_class.title and len(model_class.summary) > 40, name


def test_two_processes_train_a_baseline_as_one_does(tmp_path, cache):
    """`accelerate launch --num_processes 2 recipes/train.py --model wgan` follows the 1-process loss curve:
    each process takes its rows of the same global batch and of the same keyed noise."""
    import json
    import os
    import subprocess
    import sys

    from calofm.training.tracking import read_metrics

    def launch(procs: int):
        out = tmp_path / f"p{procs}"
        args = tiny_run("wgan", out, cache, "--steps=4", "--batch_size=8", "--val_every=4", "--log_every=1",
                        "--data.stats_samples=64", f"--model.family_config={json.dumps(tiny_family_config('wgan'))}")
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               *(["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"] if procs > 1
                 else ["--num_processes", "1"]), str(ROOT / "recipes" / "train.py"), *args]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}

    one, two = launch(1), launch(2)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-3)


def test_caloclouds_student_distils_with_the_loops_ema_as_target(tmp_path, cache):
    """CaloClouds II (CM): the consistency student trains in the loop from its teacher (the EMA is the target) and
    samples with one point-network pass."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert train_tiny("caloclouds", teacher, cache) == 0
    assert train_tiny("caloclouds", student, cache, f"--model.family_config.distill_from={teacher / 'model'}") == 0
    t, s = calofm.load(teacher / "model", device="cpu"), calofm.load(student / "model", device="cpu")
    assert s.sampling()[2] < t.sampling()[2]
    showers = s.sample(geometry="ild", energy_gev=[10.0, 30.0], phi=0.0, theta=1.5, seed=0)
    assert showers.shape == (2, 9, 16, 45) and np.isfinite(showers).all() and (showers >= 0).all()


def test_a_student_distils_from_its_teacher_in_the_loop(tmp_path, cache):
    """CaloFlow's two stages through recipes/train.py: the MAF teacher, then the IAF student that names it with
    distill_from; the student starts from the teacher's weights, samples in one pass per block and saves
    without the teacher."""
    from safetensors.torch import load_file

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert train_tiny("caloflow", teacher, cache) == 0
    assert train_tiny("caloflow", student, cache, "--model.family_config.stage=student",
                      f"--model.family_config.distill_from={teacher / 'model'}") == 0
    t, s = calofm.load(teacher / "model", device="cpu"), calofm.load(student / "model", device="cpu")
    assert s.config.stage == "student" and s.sampling()[2] < t.sampling()[2]
    assert load_file(student / "model" / "model.safetensors").keys() == \
        load_file(teacher / "model" / "model.safetensors").keys()  # the teacher is not saved inside
    showers = s.sample(geometry="par04_siw", energy_gev=[10.0, 30.0], phi=0.0, theta=1.5, seed=0)
    assert showers.shape == (2, 9, 16, 45) and np.isfinite(showers).all() and (showers >= 0).all()
    assert train_tiny("caloflow", tmp_path / "bad", cache, "--model.family_config.stage=student",
                      f"--model.family_config.distill_from={tmp_path / 'missing'}") == 2
