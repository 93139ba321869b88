"""Pretraining loop: loss goes down, exact resume, 2 processes == 1 process, config errors, generation."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_helpers import ROOT, reset_accelerate, run, tiny_config

from calofm.commands.pretrain import main
from calofm.config import ConfigError, build, to_dict
from calofm.data.io import ShowerFile, read_showers
from calofm.training.config import TrainConfig
from calofm.training.tracking import read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}


def val(out: Path, step: int) -> dict[str, float]:
    recs = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if r["step"] == step and "val/ild" in r]
    return {k: v for k, v in recs[-1].items() if k.startswith("val/")}


def test_tiny_run_learns_and_saves_a_loadable_model(tmp_path, cache):
    out = tmp_path / "run"
    final = run(tiny_config(out, cache, steps=40, val_every=40, **{"optim.lr": 3e-3}))
    before, after = val(out, 0), val(out, 40)
    assert set(before) == {"val/par04_siw", "val/ild"}
    for key in before:  # validation loss per geometry falls
        assert after[key] < 0.9 * before[key], (key, before[key], after[key])
    from calofm.models import CaloDiTModel

    model = CaloDiTModel.from_pretrained(final)
    assert model.config.geometry_slots == {"par04_siw": 0, "ild": 2}
    assert model.config.preprocessing["std"] > 0
    # the brightest cell (fraction of E_inc) of each geometry's first stats_samples training showers
    from calofm.sim.cache import simulated_file

    for src in tiny_config(out, cache)["data"]["sources"]:
        d = read_showers(simulated_file(src["geometry"], src["samples"], seed=1, cache=cache,
                                        energy=tuple(src["energy"]), progress=False))
        top = (d["showers"][:128].reshape(128, -1).max(1) / d["incident_energy"][:128]).max()
        assert model.config.geometry_cell_max[src["geometry"]] == pytest.approx(top, rel=1e-6)
    recs = read_metrics(out / "logs" / "metrics.jsonl")
    assert all(0 <= r["data_wait"] <= 1 for r in recs if "data_wait" in r)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["steps"] == 40 and saved["model"]["preset"] == "tiny"


def test_resume_continues_the_same_loss_curve(tmp_path, cache):
    full = tmp_path / "full"
    run(tiny_config(full, cache))
    part = tmp_path / "part"
    assert run(tiny_config(part, cache, stop_at=5)) is None  # interrupted after step 5, checkpoint written
    assert (part / "checkpoints").is_dir() and not (part / "model").exists()
    with open(part / "logs" / "metrics.jsonl", "a") as f:  # a crash after the checkpoint had logged steps 6-7
        f.write('{"step": 6, "loss": 9.0}\n{"step": 7, "loss": 9.0}\n')
    run(tiny_config(part, cache))  # same command again: resumes at step 6
    # steps 1-5 were not trained again (a restart from scratch would log them twice)
    steps = [r["step"] for r in read_metrics(part / "logs" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_trim_metrics_keeps_what_a_restarted_run_will_not_log_again(tmp_path):
    from calofm.training.tracking import trim_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"config": {"a": 1}}, {"step": 0, "val/odd": 1.0}, {"step": 5, "loss": 2.0}, {"step": 6, "loss": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    trim_metrics(path, 5)  # resume from the checkpoint at step 5
    assert read_metrics(path) == lines[1:3] and json.loads(path.read_text().splitlines()[0]) == lines[0]
    trim_metrics(path, 0)  # a fresh start in the same folder
    assert path.read_text() == ""
    trim_metrics(tmp_path / "none.jsonl", 3)  # nothing logged yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


def test_gradient_accumulation_logs_the_mean_of_its_micro_batches_also_to_tensorboard(tmp_path, cache, monkeypatch):
    from calofm.training.objective import DiffusionObjective

    micro_losses, real = [], DiffusionObjective.forward

    def spy(self, *args, **kwargs):  # the training objective (validation calls .parts)
        out = real(self, *args, **kwargs)
        micro_losses.append((out.shape[0], float(out.detach().mean())))
        return out

    monkeypatch.setattr(DiffusionObjective, "forward", spy)
    out = tmp_path / "accum"
    run(tiny_config(out, cache, steps=4, grad_accum=2, val_every=100, tensorboard=True))
    recs = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]
    events = list(out.rglob("events.out.tfevents.*"))  # TensorBoard too (tensorboardX is a dev dependency)
    assert any(b"samples_per_s" in e.read_bytes() for e in events)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # optimiser steps, not micro-steps
    assert [n for n, _ in micro_losses] == [8] * 8  # batch 16 in two micro-batches of 8
    expected = [(micro_losses[2 * i][1] + micro_losses[2 * i + 1][1]) / 2 for i in range(4)]
    np.testing.assert_allclose([r["loss"] for r in recs], expected, rtol=1e-6)


def test_bf16_mixed_precision_is_used_for_training_and_the_model_saves_in_float32(tmp_path, cache):
    from calofm.config import from_dict
    from calofm.training.loop import Setup, train
    from calofm.training.pretrain import build_pretrain_model, save_pretrained

    cfg = from_dict(TrainConfig, tiny_config(tmp_path / "bf16", cache, steps=2, val_every=100,
                                              mixed_precision="bf16"))
    dtypes = set()
    build = build_pretrain_model(cfg)

    def build_and_watch(data):
        net, pre = build(data)
        net.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
        return net, pre

    reset_accelerate()
    final = train(cfg, Setup(build=build_and_watch, save=save_pretrained))
    assert dtypes == {torch.bfloat16}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    assert all(np.isfinite(r["loss"]) for r in read_metrics(final.parent / "logs" / "metrics.jsonl") if "loss" in r)
    with pytest.raises(ConfigError, match="mixed_precision"):
        from_dict(TrainConfig, tiny_config(tmp_path / "x", cache, mixed_precision="fp8"))


def _launch(cfg: dict, tmp_path: Path, procs: int) -> Path:
    path = tmp_path / f"cfg{procs}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if procs > 1:
        launch += ["--multi_gpu", "--num_processes", str(procs), "--main_process_port", "0"]
    else:
        launch += ["--num_processes", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*launch, str(ROOT / "recipes" / "pretrain.py"), "--config", str(path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(cfg["output_dir"])


@pytest.mark.parametrize("variant", ["single", "factorised"])
def test_two_processes_match_one_process(tmp_path, cache, variant):
    kw = {"steps": 6, "val_every": 6, "model.variant": variant}
    one = _launch(tiny_config(tmp_path / "one", cache, **kw), tmp_path, 1)
    two = _launch(tiny_config(tmp_path / "two", cache, **kw), tmp_path, 2)
    recs = read_metrics(two / "logs" / "metrics.jsonl")
    assert json.loads((two / "logs" / "metrics.jsonl").read_text().splitlines()[0])["config"]["world"] == 2
    assert len([r for r in recs if "loss" in r]) == 6
    a, b = losses(one), losses(two)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-3)
    for key, value in val(one, 6).items():
        assert abs(val(two, 6)[key] / value - 1) < 2e-3


def test_bad_configs_are_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        build(TrainConfig, bad)
    bad.write_text("steps: ten\n")
    with pytest.raises(ConfigError, match="steps"):
        build(TrainConfig, bad)
    with pytest.raises(ConfigError, match="presett"):
        build(TrainConfig, None, ["--model.presett", "tiny"])
    with pytest.raises(ConfigError):
        build(TrainConfig, None, ["--data.sources", "[{geometry: odd, weight: heavy}]"])
    assert main(["--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["--optim.schedule", "linear"]) == 2
    missing = tmp_path / "nope.h5"  # bad input found while training is one line too, not a traceback
    capsys.readouterr()
    assert main(["--output_dir", str(tmp_path / "run"), "--data.sources",
                 f"[{{geometry: odd, files: [{missing}]}}]"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pretrain: error: {missing}: file not found"
    # the embedded default is a valid config and is the documented demo
    default = to_dict(TrainConfig())
    assert default["model"]["preset"] == "small"
    assert [s["geometry"] for s in default["data"]["sources"]] == ["par04_siw", "odd", "ild"]


def test_recipes_parse():
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        build(TrainConfig, path)


def test_generation(tmp_path, cache):
    from calofm.cli import main as cli

    final = run(tiny_config(tmp_path / "g", cache, steps=2))
    ref = tmp_path / "ref.h5"
    from calofm.sim import simulate_to_file

    simulate_to_file(ref, "ild", 40, energy=(10, 60), seed=4, progress=False)
    out = tmp_path / "gen.h5"
    args = ["generate", "--model", str(final), "--geometry", "ild", "--like", str(ref), "--steps", "2",
            "--out", str(out), "--seed", "5", "--batch-size", "16"]
    assert cli(args) == 0
    gen, refd = read_showers(out), read_showers(ref)
    for key in ("incident_energy", "incident_phi", "incident_theta"):
        np.testing.assert_array_equal(gen[key], refd[key])  # same conditions, same order
    s = gen["showers"]
    assert s.shape == (40, 9, 16, 45) and (s >= 0).all()
    assert s[s > 0].min() >= 0.1  # ILD readout threshold (0.1 MeV) applied
    with ShowerFile(out) as f:
        assert f.attrs.geometry == "ild" and f.attrs.extra["gen_steps"] == 2 and f.attrs.extra["gen_cell_cap"]
    uncapped = tmp_path / "uncapped.h5"
    assert cli([*args[:-6], "--out", str(uncapped), "--seed", "5", "--batch-size", "16", "--no-cell-cap"]) == 0
    with ShowerFile(uncapped) as f:
        assert not f.attrs.extra["gen_cell_cap"]
    assert (read_showers(uncapped)["showers"] >= s).all()  # the same noise, only the cap differs
    cut = tmp_path / "cut.h5"
    assert cli([*args[:-6], "--out", str(cut), "--seed", "5", "--batch-size", "16", "--noise-cut", "0.5"]) == 0
    with ShowerFile(cut) as f, ShowerFile(out) as default:
        assert f.attrs.extra["gen_noise_cut"] == 0.5 and "gen_noise_cut" not in default.attrs.extra
    with pytest.raises(SystemExit, match="2"):  # a one-line argparse error before anything is written
        cli([*args[:-6], "--out", str(tmp_path / "bad.h5"), "--noise-cut", "-1"])
    assert not (tmp_path / "bad.h5").exists()
    # deterministic under the seed
    out2 = tmp_path / "gen2.h5"
    assert cli([*args[:-6], "--out", str(out2), "--seed", "5", "--batch-size", "16"]) == 0
    np.testing.assert_array_equal(read_showers(out2)["showers"], s)
    # Python API
    import calofm

    g = calofm.load(final, device="cpu")
    kw = dict(geometry="par04_siw", phi=0.1, theta=1.2, steps=2)
    a = g.sample(energy_gev=[20.0, 30.0], seed=1, **kw)
    b = g.sample(energy_mev=[20e3, 30e3], seed=1, **kw)  # the same energies in MeV
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 9, 16, 45)
    # the unit is in the keyword: the old call (GeV, positional or energy=) is an error, not a guess
    with pytest.raises(TypeError, match="energy_gev"):
        g.sample([20.0, 30.0], 0.1, 1.2, "par04_siw", steps=2)
    with pytest.raises(TypeError, match="energy_gev"):
        g.sample(energy=[20.0, 30.0], **kw)
    with pytest.raises(TypeError, match="exactly one"):
        g.sample(energy_gev=[20.0], energy_mev=[2e4], **kw)
    # MeV passed as GeV (20 TeV) or GeV as MeV (20 MeV) is far outside the card's range: a warning
    with pytest.warns(UserWarning, match="unit"):
        g.sample(energy_gev=[20e3], **{**kw, "steps": 1})
    with pytest.warns(UserWarning, match="unit"):
        g.sample(energy_mev=[20.0], **{**kw, "steps": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plausible energies: no warning
        g.sample(energy_mev=[20e3], **{**kw, "steps": 1})
    with pytest.raises(ValueError, match="steps must be"):
        g.sample(energy_gev=[20.0], **{**kw, "steps": 0})
    with pytest.raises(ValueError, match="not trained on geometry 'allegro'"):
        g.sample(geometry="allegro", energy_gev=10.0, phi=0.0, theta=1.5, steps=1)
    # no seed: fresh noise each call; any int seed works (torch generators take < 2**63)
    c, d = (g.sample(energy_gev=[20.0, 30.0], **kw) for _ in range(2))
    assert c.shape == (2, 9, 16, 45) and not np.array_equal(c, d)
    assert g.sample(energy_gev=20.0, seed=2**62 + 5, **{**kw, "steps": 1}).shape == (1, 9, 16, 45)
    # cells are capped at the brightest training cell; a tighter recorded maximum tightens the cap
    e = np.array([20.0, 30.0, 40.0])
    frac = g.sample(energy_gev=e, seed=3, **kw).reshape(3, -1).max(1) / (e * 1e3)
    assert frac.max() <= g.config.geometry_cell_max["par04_siw"] * (1 + 1e-5)
    g.config.geometry_cell_max["par04_siw"] = 0.5 * frac.max()
    capped = g.sample(energy_gev=e, seed=3, **kw).reshape(3, -1).max(1) / (e * 1e3)
    free = g.sample(energy_gev=e, seed=3, cell_cap=False, **kw).reshape(3, -1).max(1) / (e * 1e3)
    assert capped.max() <= 0.5 * frac.max() * (1 + 1e-5) < free.max()
    # the noise cut can be replaced per call: a lower one keeps more faint cells, a huge one removes most
    hits = {c: int((g.sample(energy_gev=e, seed=3, noise_cut=c, **kw) > 0).sum()) for c in (0.0, None, 1e3)}
    assert hits[0.0] >= hits[None] >= hits[1e3] and hits[0.0] > hits[1e3], hits
    with pytest.raises(ValueError, match="noise_cut"):
        g.sample(energy_gev=20.0, noise_cut=-1.0, **kw)
    # --like takes conditions from a file of the same geometry only
    assert cli(["generate", "--model", str(final), "--geometry", "par04_siw", "--like", str(ref), "--steps", "1",
                "--out", str(tmp_path / "y.h5")]) == 2
    assert not (tmp_path / "y.h5").exists()
    assert cli(["generate", "--model", str(final), "--geometry", "odd", "--samples", "2", "--out",
                str(tmp_path / "x.h5")]) == 2
