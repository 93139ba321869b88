"""generate and adapt on bad input, damaged models / adapters / checkpoints: exit 2, one line on stderr naming
the file and the problem, no traceback, no output left, inputs unchanged.

The corrupt shower files are the shared set of tests/bad_files.py, which the battery of the other commands
(tests/test_bad_input.py) runs on too."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from bad_files import NATIVE, SIW, BadFile, assert_one_error_line, checksums, good_file, make_bad_files
from train_helpers import reset_accelerate, run, tiny_config

from calofm.cli import main as cli

PROGRESS = re.compile(r"\d+%\||it/s|shower/s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Path:
    return run(tiny_config(tmp_path_factory.mktemp("base") / "run", cache, steps=4, val_every=4))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base, cache) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "run"
    reset_accelerate()
    assert cli(["adapt", "--geometry", "allegro", "--base", str(base), "--samples", "256", "--steps", "2",
                "--batch-size", "16", "--cache-dir", str(cache), "--out", str(out)]) == 0
    return out / "model"


def error_line(capsys, prog: str) -> str:
    """The one line on stderr (progress bars aside); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"calofm {prog}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The shared corrupt-file set (tests/bad_files.py, all par04_siw), a valid file of another geometry, and a
    valid file to list before the bad one; with the checksums of all of them."""
    folder = tmp_path_factory.mktemp("bad")
    files = make_bad_files(folder / "native")
    odd = good_file(folder / "odd.h5", attrs={**SIW, "geometry": "odd"})
    files["other-geometry"] = BadFile("other-geometry", odd, "geometry mismatch: file holds 'odd', asked for 'par04_")
    return folder, files, good_file(folder / "good.h5", seed=3), checksums(folder)


CASES = [*NATIVE, "other-geometry"]


def refused(capsys, command: str, argv: list[str], bad_file: BadFile, inputs: list[Path], out: Path) -> None:
    """``calofm -q <argv>`` exits 2 with one line naming the bad file, leaves no output and changes no input."""
    before = [checksums(p) for p in inputs]
    capsys.readouterr()
    assert cli(["-q", *argv]) == 2
    assert_one_error_line(capsys.readouterr().err, command, bad_file)
    assert list(out.iterdir()) == [] and [checksums(p) for p in inputs] == before


@pytest.mark.parametrize("case", CASES)
def test_generate_like_a_bad_file(case, bad, tmp_path, base, capsys):
    folder, files, _, _ = bad
    out = tmp_path / "new" / "gen.h5"
    refused(capsys, "generate", ["generate", "--model", str(base), "--geometry", "par04_siw", "--like",
                                 str(files[case].path), "--steps", "1", "--out", str(out)],
            files[case], [folder, base], tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_adapt_data_a_bad_file(case, bad, tmp_path, base, cache, capsys):
    """Every file is checked before the run folder exists, so adapt fails before any training."""
    folder, files, good, _ = bad
    reset_accelerate()
    refused(capsys, "adapt", ["adapt", "--geometry", "par04_siw", "--base", str(base), "--data", str(good),
                              str(files[case].path), "--steps", "1", "--cache-dir", str(cache), "--out",
                              str(tmp_path / "run")], files[case], [folder, base], tmp_path)


@pytest.mark.parametrize("where, problem", [("base", "is the input"), ("in-base", "is inside the input folder"),
                                            ("around-base", "holds the input"), ("around-data", "holds the input")])
def test_adapt_never_writes_onto_into_or_around_an_input(where, problem, tmp_path, base, cache, capsys):
    model = tmp_path / "pretrain" / "model"
    shutil.copytree(base, model)
    (tmp_path / "data").mkdir()
    data = good_file(tmp_path / "data" / "siw.h5", n=40)
    out = {"base": model, "in-base": model / "adapted", "around-base": model.parent, "around-data": data.parent}
    before = checksums(tmp_path)
    reset_accelerate()
    assert cli(["adapt", "--geometry", "par04_siw", "--base", str(model), "--data", str(data), "--steps", "1",
                "--cache-dir", str(cache), "--out", str(out[where])]) == 2
    assert error_line(capsys, "adapt").startswith(f"calofm adapt: error: {out[where]}: {problem}")
    assert checksums(tmp_path) == before


def onto_inputs(tmp: Path, like: Path, model: Path, base: Path) -> dict[str, tuple[Path, str]]:
    """--out paths that are an input or inside one (relative, through a symlink) -> what the error says."""
    (tmp / "link.h5").symlink_to(like)
    (tmp / "sub").mkdir()
    return {"like": (like, "is the input"), "like-relative": (tmp / "sub" / ".." / like.name, "is the input"),
            "like-symlink": (tmp / "link.h5", "is the input"), "model": (model, "is the input"),
            "in-model": (model / "gen.h5", "is inside the input folder"),
            "in-base": (base / "gen.h5", "is inside the input folder")}


@pytest.mark.parametrize("case", ["like", "like-relative", "like-symlink", "model", "in-model", "in-base"])
def test_generate_never_writes_onto_or_into_an_input(case, tmp_path, base, adapter, capsys):
    like = good_file(tmp_path / "x.h5")
    model = tmp_path / "adapter"
    shutil.copytree(adapter, model)
    _set_info(model, base_path=str(Path(base).resolve()), base_relative=None)
    out, problem = onto_inputs(tmp_path, like, model, base)[case]
    before = [checksums(p) for p in (like, model, base)]
    assert cli(["generate", "--model", str(model), "--geometry", "par04_siw", "--like", str(like), "--steps", "1",
                "--out", str(out), "--overwrite"]) == 2
    line = error_line(capsys, "generate")
    assert line.startswith(f"calofm generate: error: {out}: {problem}"), line
    assert [checksums(p) for p in (like, model, base)] == before and not (model / "gen.h5").exists()


@pytest.mark.parametrize("args, option", [
    (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--samples", "0"], "--samples"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**70)], "--seed"), (["--steps", "nan"], "--steps"),
])
def test_generate_bad_numbers(args, option, tmp_path, base, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["generate", "--model", str(base), "--geometry", "odd", "--samples", "2", "--out",
             str(tmp_path / "g.h5"), *args])
    assert exit_.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert cli(["generate", "--model", str(base), "--geometry", "par04_siw", "--samples", "2", "--energy", "0:10",
                "--out", str(tmp_path / "g.h5")]) == 2
    assert "--energy 0:10: must lie in (0" in error_line(capsys, "generate")
    assert not (tmp_path / "g.h5").exists()


@pytest.mark.parametrize("args, option", [
    (["--steps", "0"], "--steps"), (["--rank", "0"], "--rank"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--seed", "-1"], "--seed"), (["--samples", "0"], "--samples"),
])
def test_adapt_bad_numbers(args, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["adapt", "--geometry", "allegro", "--out", str(tmp_path / "run"), *args])
    assert exit_.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def flip(path: Path, where: float) -> None:
    """Invert one byte at a relative position of the file (0: start of the header, 0.9: tensor data)."""
    data = bytearray(path.read_bytes())
    i = min(int(len(data) * where) + (8 if where == 0 else 0), len(data) - 1)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


MODEL_DAMAGE = {
    "truncated": (lambda m: os.truncate(m / "model.safetensors", 1000), "model.safetensors: does not match the sha256"),
    "header_flipped": (lambda m: flip(m / "model.safetensors", 0), "model.safetensors: does not match the sha256"),
    "data_flipped": (lambda m: flip(m / "model.safetensors", 0.9), "model.safetensors: does not match the sha256"),
    "truncated_no_manifest": (lambda m: (os.remove(m / "calofm_checksums.json"),
                                         os.truncate(m / "model.safetensors", 1000)), "model.safetensors: cannot be"),
    "no_weights": (lambda m: os.remove(m / "model.safetensors"), "model.safetensors: file not found"),
    "pickle_only": (lambda m: os.replace(m / "model.safetensors", m / "pytorch_model.bin"), "are not loaded"),
    "no_config": (lambda m: os.remove(m / "config.json"), "config.json: file not found"),
    "broken_config": (lambda m: (m / "config.json").write_text('{"model_type": "calo'), "config.json: not valid"),
    "no_card": (lambda m: os.remove(m / "geometries" / "par04_siw.yaml"), "par04_siw.yaml: file not found"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_generate_with_a_damaged_model(case, tmp_path, base, capsys):
    damage, problem = MODEL_DAMAGE[case]
    model = tmp_path / "model"
    shutil.copytree(base, model)
    damage(model)
    before = checksums(model)
    assert cli(["generate", "--model", str(model), "--geometry", "par04_siw", "--samples", "2", "--steps", "1",
                "--out", str(tmp_path / "g.h5")]) == 2
    line = error_line(capsys, "generate")
    assert str(model) in line and problem in line, line
    assert not (tmp_path / "g.h5").exists() and checksums(model) == before


ADAPTER_DAMAGE = {
    "no_weights": (lambda a: os.remove(a / "adapter_model.safetensors"), "adapter_model.safetensors: file not found"),
    "data_flipped": (lambda a: flip(a / "adapter_model.safetensors", 0.9), "adapter_model.safetensors: does not m"),
    "truncated": (lambda a: os.truncate(a / "adapter_model.safetensors", 100), "adapter_model.safetensors: does no"),
    "truncated_old_format": (lambda a: (os.remove(a / "calofm_checksums.json"), _set_info(a, format=1),
                                        os.truncate(a / "adapter_model.safetensors", 100)),
                             "adapter_model.safetensors: cannot be loaded"),
    "no_manifest": (lambda a: os.remove(a / "calofm_checksums.json"), "calofm_checksums.json: file not found"),
    "broken_peft_json": (lambda a: (a / "adapter_config.json").write_text("{"), "adapter_config.json: not valid JSON"),
    "broken_info_json": (lambda a: (a / "calofm_adapter.json").write_text("[1,"), "calofm_adapter.json: not valid"),
    "info_without_slot": (lambda a: _set_info(a, slot=None), "calofm_adapter.json: missing entry 'slot'"),
    "card_changed": (lambda a: (a / "geometries" / "allegro.yaml").write_text("name: allegro\n"), "does not match"),
    # wrong types that peft or calofm used unchecked (TypeError / IndexError tracebacks before)
    "rank_text": (lambda a: _set_json(a / "adapter_config.json", r="8"), "adapter_config.json: does not fit its base"),
    "token_beyond": (lambda a: _set_json(a / "adapter_config.json", trainable_token_indices={"geometry_embed": [99]}),
                     "adapter_config.json: does not fit its base (index 99 is out of bounds"),
    "base_path_number": (lambda a: _set_info(a, base_path=5), "calofm_adapter.json: entry 'base_path' = 5 has the wr"),
    "cell_max_text": (lambda a: _set_info(a, cell_max="x"), "calofm_adapter.json: entry 'cell_max' = 'x' has the wron"),
}


def _set_json(path: Path, **change):
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def _set_info(adapter: Path, **change):
    path = adapter / "calofm_adapter.json"
    info = json.loads(path.read_text())
    info.update(change)
    path.write_text(json.dumps({k: v for k, v in info.items() if v is not None}))


@pytest.mark.parametrize("case", sorted(ADAPTER_DAMAGE))
def test_generate_with_a_damaged_adapter(case, tmp_path, adapter, base, capsys):
    damage, problem = ADAPTER_DAMAGE[case]
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    _set_info(folder, base_path=str(Path(base).resolve()), base_relative=None)
    damage(folder)
    before = checksums(folder)
    assert cli(["generate", "--model", str(folder), "--geometry", "allegro", "--samples", "2", "--steps", "1",
                "--out", str(tmp_path / "g.h5")]) == 2
    line = error_line(capsys, "generate")
    assert str(folder) in line and problem in line, line
    assert not (tmp_path / "g.h5").exists() and checksums(folder) == before


# ----------------------------------------------------------------------------------------------
# Training checkpoints: a damaged newest one falls back to the previous complete one
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def stopped(tmp_path, cache) -> Path:
    """A run stopped at step 4 with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    assert run(tiny_config(out, cache, steps=6, save_every=2, stop_at=4, val_every=100)) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_4"]
    return out


def steps_logged(out: Path) -> list[int]:
    from calofm.training.tracking import read_metrics

    return [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


CHECKPOINT_DAMAGE = {
    "truncated": lambda c: os.truncate(c / "model.safetensors", 500),
    "flipped": lambda c: flip(c / "optimizer.safetensors", 0.9),
    "missing_file": lambda c: os.remove(c / "ema.safetensors"),
    "broken_state": lambda c: (c / "state.json").write_text("{"),
    "no_manifest": lambda c: os.remove(c / "calofm_checksums.json"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_DAMAGE))
def test_resume_falls_back_to_the_previous_complete_checkpoint(case, stopped, cache, caplog):
    CHECKPOINT_DAMAGE[case](stopped / "checkpoints" / "checkpoint_4")
    caplog.set_level("WARNING", logger="calofm.training.checkpoint")
    assert run(tiny_config(stopped, cache, steps=6, save_every=2, val_every=100)) == stopped / "model"
    assert "checkpoint_4" in caplog.text and "resuming from" in caplog.text and "checkpoint_2 (step 2)" in caplog.text
    assert steps_logged(stopped) == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again, logged once


def test_resume_with_every_checkpoint_damaged_is_one_line(stopped, cache, capsys):
    for ckpt in (stopped / "checkpoints").iterdir():
        flip(ckpt / "model.safetensors", 0.9)
    before = checksums(stopped)
    cfg = tiny_config(stopped, cache, steps=6, save_every=2, val_every=100)
    from calofm.commands.pretrain import main as pretrain

    path = stopped.parent / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    assert pretrain(["--config", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "checkpoint_4/model.safetensors: does not match the sha256" in err[0]
    assert "no intact checkpoint left" in err[0]
    assert checksums(stopped) == before  # nothing changed: no fresh start over the old run


def test_a_pickle_in_a_checkpoint_is_never_loaded(stopped, cache, tmp_path, caplog):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    legacy = stopped / "checkpoints" / "checkpoint_5"  # newest: an accelerate-era checkpoint
    legacy.mkdir()
    (legacy / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    caplog.set_level("WARNING", logger="calofm.training.checkpoint")
    run(tiny_config(stopped, cache, steps=6, save_every=2, val_every=100))
    assert not marker.exists()
    assert "random_states_0.pkl: pickle from an older calofm checkpoint format, which is never loaded" in caplog.text
    assert steps_logged(stopped) == [1, 2, 3, 4, 5, 6]
