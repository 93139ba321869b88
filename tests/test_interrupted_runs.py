"""Ctrl-C: generate leaves nothing behind; training (pretrain and adapt) leaves a resumable checkpoint or nothing."""

import hashlib
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_helpers import reset_accelerate, run, tiny_config

from calofm.cli import main as cli
from calofm.training.tracking import read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Path:
    return run(tiny_config(tmp_path_factory.mktemp("base") / "run", cache, steps=4, val_every=4))


def ctrl_c_at(step: int, times: int = 1):
    """Setup.evaluate hook: press Ctrl-C (a real SIGINT) ``times`` times at validation step ``step``."""
    def evaluate(net, at):
        if at == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return {}

    return evaluate


def train(cfg: dict, evaluate=None):
    from calofm.config import from_dict
    from calofm.training.config import TrainConfig
    from calofm.training.loop import Setup, train
    from calofm.training.pretrain import build_pretrain_model, save_pretrained

    reset_accelerate()
    tc = from_dict(TrainConfig, cfg)
    return train(tc, Setup(build=build_pretrain_model(tc), save=save_pretrained, evaluate=evaluate))


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}


def test_generate_interrupted_leaves_nothing_and_keeps_an_older_file(tmp_path, base, monkeypatch, capsys):
    from calofm.generate import ShowerGenerator

    real, calls = ShowerGenerator._batch, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShowerGenerator, "_batch", interrupted)
    out = tmp_path / "new" / "deeper" / "gen.h5"
    args = ["generate", "--model", str(base), "--geometry", "ild", "--samples", "8", "--batch-size", "4",
            "--steps", "1"]
    assert cli([*args, "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "calofm generate: interrupted"
    assert not (tmp_path / "new").exists()  # no file, no .partial, no folder it made
    old = tmp_path / "old.h5"
    old.write_bytes(b"an earlier result")
    calls.clear()
    assert cli([*args, "--out", str(old), "--overwrite"]) == 130
    assert old.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]


def test_first_ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, cache, capsys):
    cfg = dict(steps=6, val_every=3, save_every=100)
    full = train(tiny_config(tmp_path / "full", cache, **cfg))
    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(out, cache, **cfg), evaluate=ctrl_c_at(3))
    assert "finishing this step and saving a checkpoint" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_3"] and not (out / "model").exists()
    assert train(tiny_config(out, cache, **cfg)) == out / "model"
    a, b = losses(tmp_path / "full"), losses(out)
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
    assert full.is_dir()


def test_ctrl_c_with_nothing_to_resume_leaves_nothing(tmp_path, cache):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # before the first step: nothing to save
        train(tiny_config(out, cache, steps=4, val_every=100), evaluate=ctrl_c_at(0))
    assert not out.exists()
    with pytest.raises(KeyboardInterrupt):  # twice: stop at once, without a checkpoint
        train(tiny_config(out, cache, steps=6, val_every=3, save_every=100), evaluate=ctrl_c_at(3, times=2))
    assert not out.exists()


def test_adapt_interrupted_resumes_with_the_same_command(tmp_path, base, cache, monkeypatch, capsys):
    import calofm.training.loop as loop

    real = loop._validate_and_log

    def validate_then_ctrl_c(acc, model, ema, pre, data, setup, step):
        real(acc, model, ema, pre, data, setup, step)
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    recipe = tmp_path / "adapt.yaml"
    recipe.write_text(yaml.safe_dump({"val_every": 2, "steps": 4, "batch_size": 16, "samples": 256}))
    out = tmp_path / "run"
    args = ["adapt", "--geometry", "allegro", "--base", str(base), "--cache-dir", str(cache), "--out", str(out),
            "--config", str(recipe)]
    before = hashlib.sha256((Path(base) / "model.safetensors").read_bytes()).hexdigest()
    monkeypatch.setattr(loop, "_validate_and_log", validate_then_ctrl_c)
    reset_accelerate()
    assert cli(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "calofm adapt: interrupted"
    assert (out / "checkpoints" / "checkpoint_2").is_dir() and not (out / "model").exists()
    monkeypatch.setattr(loop, "_validate_and_log", real)
    reset_accelerate()
    assert cli(args) == 0
    assert "resumed from" in capsys.readouterr().out and (out / "model" / "adapter_model.safetensors").is_file()
    assert hashlib.sha256((Path(base) / "model.safetensors").read_bytes()).hexdigest() == before
