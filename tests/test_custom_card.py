"""A detector card that is not in geometries/: simulate -> adapt -> generate -> evaluate, and the card
travels with the run and the saved model so nothing after adaptation needs --geometry-dir."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import h5py
import pytest
import yaml
from bad_files import BadFile, assert_one_error_line, checksums
from train_helpers import ROOT, reset_accelerate, run, tiny_config

from calofm.adapt import ADAPTER_FILE
from calofm.cli import main as cli
from calofm.commands.pretrain import main as pretrain
from calofm.data.io import ShowerFile
from calofm.models import CaloDiTModel


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Path:
    return run(tiny_config(tmp_path_factory.mktemp("base") / "run", cache, steps=6, val_every=6))


def make_card(folder: Path, name: str, source: str = "allegro", slot: int | None = None) -> Path:
    """A copy of a built-in card under another name (and slot)."""
    text = (ROOT / "geometries" / f"{source}.yaml").read_text().replace(f"name: {source}", f"name: {name}", 1)
    if slot is not None:
        text = re.sub(r"^slot: \d+", f"slot: {slot}", text, flags=re.M)
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder / f"{name}.yaml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapt(base, cache, out, *extra) -> int:
    reset_accelerate()
    return cli(["adapt", "--base", str(base), "--samples", "256", "--steps", "4", "--batch-size", "16",
                "--cache-dir", str(cache), "--out", str(out), *extra])


def test_custom_card_simulate_adapt_generate_evaluate(tmp_path, base, cache):
    cards = tmp_path / "cards"
    card = make_card(cards, "mydet")
    digest = sha256(card)
    ref = tmp_path / "ref.h5"
    assert cli(["simulate", "--geometry", "mydet", "--geometry-dir", str(cards), "--samples", "48",
                "--energy", "5:50", "--out", str(ref), "--seed", "3"]) == 0
    out = tmp_path / "lora"
    assert adapt(base, cache, out, "--geometry", "mydet", "--geometry-dir", str(cards), "--merge") == 0
    assert adapt(base, cache, tmp_path / "full", "--geometry", "mydet", "--geometry-dir", str(cards),
                 "--method", "full") == 0
    # the card (content and hash) is in the run folder, the adapter, the merged and the full model
    adapter, merged, full = out / "model", out / "merged", tmp_path / "full" / "model"
    info = json.loads((adapter / ADAPTER_FILE).read_text())
    assert info["card"] == {"file": "geometries/mydet.yaml", "sha256": digest}
    for folder in (out, adapter, merged, full):
        assert (folder / "geometries" / "mydet.yaml").read_bytes() == card.read_bytes()
    for model in (merged, full):
        assert json.loads((model / "config.json").read_text())["geometry_cards"] == {"mydet": digest}
    assert yaml.safe_load((out / "train_config.yaml").read_text())["data"]["geometry_dirs"] == [str(cards)]
    shutil.rmtree(cards)  # the card is gone from where it was: every later step finds it in the model
    before = sha256(ref)
    for model in (adapter, merged, full):
        gen = tmp_path / f"gen_{model.parent.name}_{model.name}.h5"
        assert cli(["generate", "--model", str(model), "--geometry", "mydet", "--like", str(ref), "--steps", "2",
                    "--out", str(gen)]) == 0
        with ShowerFile(gen) as f:
            assert len(f) == 48 and f.attrs.geometry == "mydet"
            assert f.attrs.extra["geometry_card_sha256"] == digest
            assert f.attrs.extra["geometry_card"] == card_text(adapter)
    assert sha256(ref) == before
    # simulate stored the card in the reference and generate in its file: evaluate needs no --geometry-dir
    with ShowerFile(ref) as f:
        assert f.attrs.extra["geometry_card_sha256"] == digest and f.note == "geometry card: stored in the file"
    report = tmp_path / "report"
    assert cli(["evaluate", "--reference", str(ref), "--generated", str(tmp_path / "gen_lora_model.h5"),
                "--out", str(report), "--metrics", "hist", "--no-plots", "--no-noise-floor"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())["geometries"]["mydet"]
    assert metrics["threshold_MeV"] == yaml.safe_load(card_text(adapter))["threshold"]
    # a card given explicitly must be the model's own
    other = make_card(tmp_path / "other", "mydet", source="cld")
    assert cli(["generate", "--model", str(adapter), "--geometry", str(other), "--samples", "2",
                "--out", str(tmp_path / "x.h5")]) == 2
    assert not (tmp_path / "x.h5").exists()


def card_text(folder: Path) -> str:
    return (folder / "geometries" / "mydet.yaml").read_text()


# ----------------------------------------------------------------------------------------------
# Files carry their card: every reader finds it there, and a different card of that name is an error
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Two 12-shower files simulated from a card given by path, whose folder is removed afterwards."""
    folder = tmp_path_factory.mktemp("simulated")
    card = make_card(folder / "cards", "mydet")
    text = card.read_text()
    files = [folder / "s1.h5", folder / "s2.h5"]
    for seed, out in enumerate(files):
        assert cli(["-q", "simulate", "--geometry", str(card), "--samples", "12", "--energy", "5:50", "--seed",
                    str(seed), "--out", str(out)]) == 0
    shutil.rmtree(folder / "cards")
    return folder, files, text


READERS = {  # command -> argv for (file read first, another file of the same card, output folder)
    "validate": lambda f, g, out: ["validate", f],
    "evaluate": lambda f, g, out: ["evaluate", "-r", f, "-g", g, "-o", out / "report", "--metrics", "hist",
                                   "--no-plots", "--no-noise-floor"],
    "compare-geometries": lambda f, g, out: ["compare-geometries", "--files", f, g, "--out", out / "plots"],
    "convert": lambda f, g, out: ["convert", f, out / "cc.hdf5", "--to", "calochallenge"],
}


@pytest.mark.parametrize("command", list(READERS))
def test_every_reader_uses_the_card_stored_in_the_file(command, simulated, tmp_path):
    folder, (s1, s2), text = simulated
    before = checksums(folder)
    assert cli(["-q", *map(str, READERS[command](s1, s2, tmp_path))]) == 0
    assert checksums(folder) == before
    with ShowerFile(s1) as f:  # no card of that name anywhere but in the file
        assert f.geometry.card.threshold == yaml.safe_load(text)["threshold"]
        assert f.note == "geometry card: stored in the file"


def test_simulate_stores_a_card_that_is_not_built_in_and_convert_keeps_it(simulated, tmp_path):
    _, (s1, _), text = simulated
    with ShowerFile(s1) as f:
        assert f.attrs.extra["geometry_card"] == text
        assert f.attrs.extra["geometry_card_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert cli(["-q", "simulate", "--geometry", "odd", "--samples", "2", "--out", str(tmp_path / "odd.h5")]) == 0
    with ShowerFile(tmp_path / "odd.h5") as f:
        assert "geometry_card" not in f.attrs.extra and "geometry_card_sha256" not in f.attrs.extra
    assert cli(["-q", "convert", str(s1), str(tmp_path / "pq"), "--to", "parquet"]) == 0
    assert cli(["-q", "convert", str(tmp_path / "pq"), str(tmp_path / "back.h5"), "--to", "calofm"]) == 0
    with ShowerFile(tmp_path / "back.h5") as f:
        assert f.attrs.extra["geometry_card"] == text and f.geometry.name == "mydet"


def variant(folder: Path, **changes) -> Path:
    """The test card ``mydet`` with some top-level fields changed."""
    card = make_card(folder, "mydet")
    data = yaml.safe_load(card.read_text())
    card.write_text(yaml.safe_dump({**data, **changes}, sort_keys=False))
    return folder


@pytest.mark.parametrize("command", list(READERS))
def test_a_different_card_of_the_same_name_is_a_one_line_error(command, simulated, tmp_path, capsys):
    folder, (s1, s2), _ = simulated
    other = variant(tmp_path / "other", threshold=0.5)
    out = tmp_path / "out"
    out.mkdir()
    before = checksums(folder)
    capsys.readouterr()
    assert cli(["-q", *map(str, READERS[command](s1, s2, out)), "--geometry-dir", str(other)]) == 2
    problem = rf"its stored card of geometry 'mydet' differs from {re.escape(str(other / 'mydet.yaml'))}; give"
    assert_one_error_line(capsys.readouterr().err, command, BadFile("other card", s1, problem))
    assert list(out.iterdir()) == [] and checksums(folder) == before


def test_a_card_differing_in_slot_or_prose_is_the_same_card(simulated, tmp_path):
    _, (s1, _), _ = simulated
    same = variant(tmp_path / "same", slot=7, title="renamed", description="other words")
    assert cli(["-q", "validate", str(s1), "--geometry-dir", str(same)]) == 0
    assert cli(["-q", "validate", str(s1), "--geometry", str(same / "mydet.yaml")]) == 0


@pytest.mark.parametrize("damage, problem", [
    (lambda a: a.__setitem__("geometry_card", a["geometry_card"].replace("threshold:", "threshold: 9 #")),
     "its stored geometry card does not match the sha256 recorded with it"),
    (lambda a: a.__delitem__("geometry_card_sha256"), "attributes geometry_card and geometry_card_sha256 must both"),
    (lambda a: a.__setitem__("geometry", "otherdet"), "its stored geometry card is for 'mydet', but the file records"),
])
def test_a_damaged_stored_card_is_a_one_line_error(damage, problem, simulated, tmp_path, capsys):
    _, (s1, _), _ = simulated
    bad = tmp_path / "bad.h5"
    shutil.copy(s1, bad)
    with h5py.File(bad, "r+") as f:
        damage(f.attrs)
    capsys.readouterr()
    assert cli(["-q", "validate", str(bad)]) == 2
    assert_one_error_line(capsys.readouterr().err, "validate", BadFile("damaged card", bad, re.escape(problem)))


def test_a_card_whose_slot_is_taken_trains_the_slot_it_is_given(tmp_path, base, cache):
    cards = tmp_path / "cards"
    make_card(cards, "siwcopy", source="par04_siw", slot=0)  # slot 0 is par04_siw's in the base
    out = tmp_path / "run"
    assert adapt(base, cache, out, "--geometry", "siwcopy", "--geometry-dir", str(cards), "--method", "full") == 0
    slot = json.loads((out / "model" / ADAPTER_FILE).read_text())["slot"]
    assert slot == 1  # the first free slot
    # the training rows were labelled with that slot, not the card's
    assert yaml.safe_load((out / "train_config.yaml").read_text())["data"]["sources"][0]["slot"] == 1
    assert CaloDiTModel.from_pretrained(out / "model").config.geometry_slots == {"siwcopy": 1}


def test_init_from_checks_slots_and_claims_only_what_it_trained(tmp_path, base, cache, capsys):
    cards = tmp_path / "cards"
    make_card(cards, "clash", source="odd", slot=0)
    args = ["--output_dir", str(tmp_path / "clash"), "--model.init_from", str(base), "--steps", "2",
            "--data.cache_dir", str(cache), "--data.geometry_dirs", f"[{cards}]", "--data.stats_samples", "64",
            "--tensorboard", "false", "--data.num_workers", "0", "--batch_size", "16",
            "--data.sources", "[{geometry: clash, samples: 128, val_samples: 32}]"]
    assert pretrain(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"pretrain: error: {base}: slot 0 for geometry 'clash' is already used by 'par04_siw'"
    assert not (tmp_path / "clash").exists()  # checked before the run folder is made
    # trained further on ild alone: the model claims ild only
    cfg = tiny_config(tmp_path / "ild", cache, steps=2, **{"model.init_from": str(base)})
    cfg["data"]["sources"] = cfg["data"]["sources"][1:]
    final = run(cfg)
    assert CaloDiTModel.from_pretrained(final).config.geometry_slots == {"ild": 2}
