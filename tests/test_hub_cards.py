"""Model and dataset cards: what they state, that their usage snippet runs, their metadata rules, `calofm card`."""

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import DatasetCard, ModelCard, ModelCardData
from train_helpers import reset_accelerate, run, tiny_config

from calofm.cli import build_parser
from calofm.cli import main as cli
from calofm.data.io import read_showers
from calofm.geometry import load_geometry_file
from calofm.hub.modelcard import (
    MODEL_TAGS,
    card_metadata_errors,
    dataset_card,
    folder_kind,
    model_card,
    write_card,
)
from calofm.sim import simulate_to_file


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache) -> Path:
    return run(tiny_config(tmp_path_factory.mktemp("base") / "run", cache, steps=2, val_every=2))


@pytest.fixture(scope="module")
def lora(tmp_path_factory, pretrained, cache) -> Path:
    root = tmp_path_factory.mktemp("lora")
    (root / "adapt.yaml").write_text("val_samples: 32\nval_every: 2\n")
    reset_accelerate()
    assert cli(["-q", "adapt", "--geometry", "allegro", "--samples", "64", "--base", str(pretrained), "--steps", "2",
                "--batch-size", "8", "--rank", "2", "--cache-dir", str(cache), "--config", str(root / "adapt.yaml"),
                "--out", str(root / "out")]) == 0
    return root / "out" / "model"


def table(text: str, heading: str, first: str | None = None) -> list[dict[str, str]]:
    """The first Markdown table after ``heading`` (whose first column is ``first``, if given) as {column: cell}."""
    lines = text.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, x in enumerate(lines)
                 if x.startswith("|") and (first is None or x.startswith(f"| {first} |")))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [dict(zip(rows[0], r)) for r in rows[2:]]


def block(text: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def span(cell: str) -> tuple[float, float]:
    lo, hi = cell.split(" – ")
    return float(lo), float(hi)


def test_pretrained_card_states_geometries_slots_ranges_and_training(pretrained):
    config = json.loads((pretrained / "config.json").read_text())
    record = json.loads((pretrained / "calofm_training.json").read_text())
    text = str(model_card(pretrained))
    rows = {r["Geometry"].strip("`"): r for r in table(text, "## Geometries")}
    assert set(rows) == set(config["geometry_slots"]) == {"par04_siw", "ild"}
    for name, row in rows.items():
        card = load_geometry_file(pretrained / "geometries" / f"{name}.yaml").card
        assert int(row["Slot"]) == config["geometry_slots"][name]
        assert float(row["Threshold (MeV)"]) == config["geometry_thresholds"][name] == card.threshold
        assert row["Particle"] == card.particle and row["Detector"] == card.title
        for column, pair in (("Energy (GeV)", card.energy), ("theta (rad)", card.theta), ("phi (rad)", card.phi)):
            assert span(row[column]) == pytest.approx(pair, abs=1e-3)
    training = {r["Geometry"].strip("`"): r for r in table(text, "## Training")}
    for name, entry in record["geometries"].items():
        assert int(training[name]["Training showers"].replace(",", "")) == entry["train_showers"]
        source = entry["sources"][0]
        assert f"{source['generator']}, seed {source['seed']} (`{source['file']}`" in training[name]["Data"]
    # the run's own energy range (tiny_config trains par04_siw on 5-50 GeV), not the card's 1-1000
    assert span(training["par04_siw"]["Energy (GeV)"]) == (5.0, 50.0)
    assert f"{record['steps']} steps of batch {record['batch_size']}" in text
    assert "CaloDiT" in text and "EDM diffusion" in text and "9 x 16 x 45" in text
    assert f"{_parameters(pretrained):,} parameters" in text
    assert "gen.sample(geometry=\"par04_siw\"" in block(text, "python")
    assert "No evaluation was attached" in text and "not available" not in text


def _parameters(folder: Path) -> int:
    from calofm.hub.folders import load_model

    return sum(p.numel() for p in load_model(folder)[0].parameters())


def test_card_command_writes_a_card_whose_snippet_samples(pretrained, monkeypatch, capsys):
    home = pretrained.parents[1]
    monkeypatch.setenv("HOME", str(home))  # the model lives under HOME: the card shows ~, never the real path
    assert cli(["card", str(pretrained)]) == 0
    readme = Path(capsys.readouterr().out.strip())
    assert readme == pretrained / "README.md"
    text = readme.read_text()
    assert str(home) not in text and not re.search(r"hf_[A-Za-z0-9]{8,}", text)
    snippet = block(text, "python")
    assert 'calofm.load("~/' in snippet
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    showers = scope["showers"]
    assert showers.shape == (2, 9, 16, 45) and np.isfinite(showers).all() and (showers >= 0).all()
    command = shlex.split(block(text, "bash"))
    assert command[:2] == ["calofm", "generate"] and command[command.index("--geometry") + 1] == "par04_siw"
    args = build_parser(only="generate").parse_args(command[1:])
    assert Path(args.model).expanduser() == pretrained and args.samples == 1000


def test_card_metadata_round_trips_and_passes_the_rules(pretrained, tmp_path):
    path = write_card(pretrained, repo_id="calofm-test/calodit-tiny")
    loaded = ModelCard.load(path)
    data = loaded.data.to_dict()
    assert data["library_name"] == "calofm" and data["license"] == "apache-2.0"
    assert set(MODEL_TAGS) <= set(data["tags"]) and "lora" not in data["tags"] and "base_model" not in data
    assert card_metadata_errors(loaded) == [] and card_metadata_errors(loaded, kind=folder_kind(pretrained)) == []
    assert 'calofm.load("calofm-test/calodit-tiny")' in loaded.text  # --repo-id: the snippet loads from the Hub
    assert "--model calofm-test/calodit-tiny " in loaded.text and str(pretrained) not in loaded.text
    assert model_card(pretrained, license="mit").data.license == "mit"
    with pytest.raises(ValueError, match="not a Hub repo id"):
        model_card(pretrained, repo_id="/abs/path")


def test_card_metadata_errors_name_missing_tags_local_bases_and_tokens():
    good = dict(license="apache-2.0", library_name="calofm", tags=list(MODEL_TAGS))

    def errors(text="# card\n", kind=None, **data):
        return card_metadata_errors(ModelCard.from_template(ModelCardData(**{**good, **data}), template_str=
                                                            "---\n{{ card_data }}\n---\n" + text), kind=kind)

    assert errors() == []
    assert any("fast-simulation" in e for e in errors(tags=["calorimeter", "diffusion", "high-energy-physics"]))
    assert any("library_name" in e for e in errors(library_name="peft"))
    assert any("license" in e for e in errors(license=None))
    assert any("not a Hub repo id" in e for e in errors(base_model="/tmp/runs/pretrain/model",
                                                         base_model_relation="adapter"))
    assert any("not a Hub repo id" in e for e in errors(base_model="runs/pretrain/model"))
    assert any("base_model is missing" in e for e in errors(tags=[*MODEL_TAGS, "lora"]))
    assert any("base_model is missing" in e for e in errors(kind="full"))
    assert errors(kind="scratch") == [] and errors(kind="pretrained") == []
    assert any("expected 'adapter'" in e for e in errors(kind="lora", tags=[*MODEL_TAGS, "lora"],
                                                         base_model="org/base", base_model_relation="finetune"))
    assert any("token" in e for e in errors(text="login with hf_" + "a1B2" * 9 + "\n"))


def test_lora_card_names_a_hub_base_only(lora, pretrained, tmp_path, monkeypatch):
    card = model_card(lora)
    assert card_metadata_errors(card, kind="lora") == ["base_model is missing: an adapter or fine-tune names the Hub "
                                                       "repo of its base model"]
    assert "base_model" not in card.data.to_dict() and "lora" in card.data.tags
    assert "a local model" in card.text and "3 x 2 x 3" in card.text  # its base is found: the architecture shown
    rows = table(card.text, "## Geometries")
    assert [(r["Geometry"], r["Slot"]) for r in rows] == [("`allegro`", "5")]
    scope: dict = {}
    exec(compile(block(card.text, "python"), "README.md", "exec"), scope)  # loads the adapter on its base
    assert scope["showers"].shape == (2, 9, 16, 45) and np.isfinite(scope["showers"]).all()
    assert 'geometry="allegro"' in block(card.text, "python")

    hub = tmp_path / "adapter"
    shutil.copytree(lora, hub)
    info = json.loads((hub / "calofm_adapter.json").read_text())
    info.update(base="calofm-test/calodit-tiny", base_path=None, base_revision="0123456789abcdef" * 2 + "01234567")
    info.pop("base_relative", None)
    (hub / "calofm_adapter.json").write_text(json.dumps(info))
    card = model_card(hub)
    data = card.data.to_dict()
    assert data["base_model"] == "calofm-test/calodit-tiny" and data["base_model_relation"] == "adapter"
    assert card_metadata_errors(card, kind="lora") == []
    assert info["base_revision"] in card.text and info["fingerprint"] in card.text and "rank 2" in card.text
    assert "a local model" not in card.text and str(lora.parent) not in card.text
    # the base is nowhere on this machine: no architecture, and nothing is downloaded to find it
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not available where this card was written" in model_card(hub).text
    snapshot = tmp_path / "hf" / "models--calofm-test--calodit-tiny" / "snapshots" / info["base_revision"]
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pretrained / name, snapshot / name)
    text = model_card(hub).text  # found in the Hub cache at the recorded revision
    assert "hidden size 48" in text and f"{_parameters(pretrained):,} parameters in the base model" in text
    # a relative base path that looks like ORG/NAME is still a local base when its absolute path was recorded
    info.update(base="pretrain/model", base_path="/nowhere/pretrain/model", base_revision=None)
    (hub / "calofm_adapter.json").write_text(json.dumps(info))
    card = model_card(hub)
    assert "base_model" not in card.data.to_dict() and "a local model, `pretrain/model`" in card.text


@pytest.mark.parametrize("method", ["full", "scratch"])
def test_full_model_cards_record_their_relation(pretrained, tmp_path, method):
    folder = tmp_path / "model"
    shutil.copytree(pretrained, folder)
    (folder / "calofm_adapter.json").write_text(json.dumps({
        "geometry": "par04_siw", "slot": 0, "threshold": 0.0005, "method": method, "base": "calofm-test/base",
        "base_path": None, "base_revision": "f" * 40, "fingerprint": "e" * 64, "rank": None,
        "trainable_parameters": 1000, "total_parameters": 1000}))
    assert folder_kind(folder) == method
    if method == "scratch":  # as a folder saved before calofm_training.json existed
        (folder / "calofm_training.json").unlink()
    card = model_card(folder)
    data = card.data.to_dict()
    if method == "full":
        assert data["base_model"] == "calofm-test/base" and data["base_model_relation"] == "finetune"
        assert "2 steps of batch 16" in card.text
    else:  # random initial weights: nothing of the base's weights, no base_model
        assert "base_model" not in data and "trained from random weights" in card.text
        assert "training record (`calofm_training.json`) is not available" in card.text
        assert "steps of batch" not in card.text
    assert "lora" not in data["tags"] and card_metadata_errors(card, kind=method) == []


def test_evaluation_table_comes_from_metrics_files(pretrained, tmp_path):
    entry = {"reference": "/home/someone/ref.h5", "generated": "/home/someone/gen.h5", "geometry": "par04_siw",
             "n_reference": 1234, "n_generated": 1200, "threshold_MeV": 0.0005,
             "energy": {"mean_ratio": 1.0123, "spread_ratio": 0.934}, "hist": {"n_hits": {"separation_power": 0.1}},
             "cls-low": {"auc": 0.6111}, "cls-high": {"auc": 0.5872}, "fpd": {"x1e3": 12.5}, "kpd": {"x1e3": 0.123},
             "noise_floor": {"fpd": {"x1e3": 3.25}, "kpd": {"x1e3": 0.0456}}}
    ild = {"geometry": "ild", "n_reference": 300, "n_generated": 300, "energy": {"mean_ratio": 0.98},
           "noise_floor": None}
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"created": "now", "options": {}, "geometries":
                                                     {"par04_siw": entry}}))
    (tmp_path / "ild.json").write_text(json.dumps({"geometries": {"ild": ild}}))
    card = model_card(pretrained, metrics=[report / "metrics.json", tmp_path / "ild.json"])
    rows = {r["Geometry"].strip("`"): r for r in table(card.text, "## Evaluation")}
    siw = rows["par04_siw"]
    assert siw["Showers (reference / generated)"] == "1,234 / 1,200"
    assert float(siw["E ratio"]) == pytest.approx(1.0123, abs=1e-3) and float(siw["Spread ratio"]) == 0.93
    assert (float(siw["AUC low-level"]), float(siw["AUC high-level"])) == (0.611, 0.587)
    assert siw["FPD x1e3 (floor)"] == "12.50 (3.25)" and siw["KPD x1e3 (floor)"] == "0.123 (0.046)"
    assert rows["ild"]["AUC high-level"] == "—" and rows["ild"]["FPD x1e3 (floor)"] == "— (—)"
    assert ("against 1,234 reference showers: mean visible-energy ratio 1.012, low-level classifier AUC 0.611, "
            "high-level classifier AUC 0.587") in card.text  # quoted under intended use
    assert "/home/someone" not in card.text and "`report/metrics.json`" in card.text
    assert cli(["card", str(pretrained), "--metrics", str(report / "metrics.json"), "--license", "mit"]) == 0
    written = ModelCard.load(pretrained / "README.md")
    assert written.data.license == "mit" and [r["Geometry"] for r in table(written.text, "## Evaluation")] == [
        "`par04_siw`"]
    (tmp_path / "odd.json").write_text(json.dumps({"geometries": {"odd": {**entry, "geometry": "odd"}}}))
    with pytest.raises(ValueError, match=r"odd.json: evaluates geometry 'odd'"):
        model_card(pretrained, metrics=[tmp_path / "odd.json"])
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match=r"other.json: not a metrics.json"):
        model_card(pretrained, metrics=[tmp_path / "other.json"])


def test_card_command_refuses_what_is_not_a_model(tmp_path, pretrained, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for argv in (["card", str(tmp_path)], ["card", str(tmp_path / "notes.txt")],
                 ["card", str(pretrained), "--repo-id", "no repo id"], ["card", str(tmp_path / "missing")]):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("calofm card: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "README.md").exists()
    broken = tmp_path / "broken"
    shutil.copytree(pretrained, broken)
    (broken / "model.safetensors").write_bytes(b"damaged")
    assert cli(["card", str(broken)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_dataset_card_states_counts_ranges_and_provenance(tmp_path):
    a = simulate_to_file(tmp_path / "ild_a.h5", "ild", 64, energy=(20.0, 40.0), seed=5, progress=False)
    b = simulate_to_file(tmp_path / "ild_b.h5", "ild", 32, energy=(10.0, 30.0), seed=6, progress=False)
    card = dataset_card([a, b], "calofm-test/ild-showers")
    text = str(card)
    assert "96 gamma showers in the ILD ECal" in text
    energies = np.concatenate([read_showers(p)["incident_energy"] for p in (a, b)]) / 1e3
    contents = {r[""]: r for r in table(text, "## Contents")}
    low, high = (float(contents["Incident energy (GeV)"][k]) for k in ("Minimum", "Maximum"))
    assert low == pytest.approx(energies.min(), rel=1e-3) and high == pytest.approx(energies.max(), rel=1e-3)
    assert 10.0 <= low < 20.0 and 30.0 < high <= 40.0
    files = {r["Source file"]: r for r in table(text, "## Contents", first="Source file")}
    assert files["`ild_a.h5`"]["Seed"] == "5" and files["`ild_b.h5`"]["Showers"] == "32"
    assert files["`ild_a.h5`"]["Generator"] == "calofm-sim-gflash-v2"
    assert "name: ild" in block(text, "yaml") and "`showers` | 6480 x float32" in text
    assert 'datasets.load_dataset("calofm-test/ild-showers"' in text
    assert "calofm adapt --geometry ild --data calofm-test/ild-showers" in text
    assert str(tmp_path) not in text
    loaded = DatasetCard(text).data.to_dict()
    assert loaded["license"] and "calorimeter" in loaded["tags"] and loaded["size_categories"] == ["n<1K"]
    assert card_metadata_errors(DatasetCard(text)) == []
    assert any("license" in e for e in card_metadata_errors(DatasetCard("---\ntags: [calorimeter]\n---\n")))
    other = simulate_to_file(tmp_path / "odd.h5", "odd", 8, seed=1, progress=False)
    with pytest.raises(ValueError, match=r"odd.h5: geometry 'odd' differs from 'ild'"):
        dataset_card([a, other], "calofm-test/mixed")

