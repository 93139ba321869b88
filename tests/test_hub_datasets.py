"""Shower datasets on the Hugging Face Hub, offline: ``push-dataset`` stages Parquet shards, the card and the
geometry card (HfApi's write calls mocked); through the loopback fake Hub (tests/fake_hub.py) ``datasets`` and
``dataset_files`` read them back as the same showers, and ``calofm adapt --data ORG/NAME`` trains on them."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_hub import fake_hub, uploads  # noqa: F401 - pytest fixtures
from train_helpers import run, tiny_config

from calofm.cli import main as cli
from calofm.data.io import read_showers
from calofm.hub.datasets import data_files, dataset_files
from calofm.hub.push import push, push_dataset

TOKEN = "hf_testtoken123"
KEYS = ("showers", "incident_energy", "incident_phi", "incident_theta")


def checksums(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def joined(*files) -> dict[str, np.ndarray]:
    parts = [read_showers(f) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def as_arrays(ds) -> dict[str, np.ndarray]:
    """A ``datasets`` table as the native arrays (showers reshaped to the mesh)."""
    table = ds.with_format("numpy")
    out = {k: np.asarray(table[k], dtype=np.float32) for k in KEYS}
    out["showers"] = out["showers"].reshape(-1, 9, 16, 45)
    return out


def assert_same(a: dict, b: dict) -> None:
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture
def hub(fake_hub, uploads):  # noqa: F811 - the fixtures imported above
    uploads.hub = fake_hub
    return fake_hub


def test_push_dataset_stages_shards_and_cards(tmp_showers, uploads, monkeypatch, capsys, caplog):  # noqa: F811
    from huggingface_hub import DatasetCard

    from calofm.hub.modelcard import DATASET_TAGS, card_metadata_errors

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    a, b = tmp_showers(n=12, seed=1, geometry="odd"), tmp_showers(n=7, seed=2, geometry="odd")
    before = checksums([a, b])
    caplog.set_level("DEBUG")
    assert cli(["push-dataset", str(a), str(b), "--repo-id", "org/showers", "--shard-rows", "5", "--private"]) == 0
    assert checksums([a, b]) == before
    assert [(c[0], c[1], c[2]["repo_type"]) for c in uploads.calls] == [("create_repo", "org/showers", "dataset"),
                                                                         ("upload_folder", "org/showers", "dataset")]
    assert uploads.calls[0][2]["private"] is True and uploads.calls[1][2]["commit_message"] == "Upload calofm showers"
    assert uploads.tokens == [None, None]
    shards = [f"data/odd/data-{k:05d}-of-00005.parquet" for k in range(5)]  # 12 rows: 3 shards, 7 rows: 2
    assert uploads.files() == ["README.md", "data/odd/calofm.json", *shards, "geometries/odd.yaml"]
    staged = uploads.staged[-1]
    meta = json.loads((staged / "data/odd/calofm.json").read_text())
    assert meta["geometry"] == "odd" and meta["rows"] == 19
    assert [(s["file"], s["rows"]) for s in meta["sources"]] == [(a.name, 12), (b.name, 7)]
    card = DatasetCard.load(staged / "README.md")
    assert card.data.license and set(DATASET_TAGS) <= set(card.data.tags) and "odd" in card.data.tags
    assert card_metadata_errors(card) == [] and "org/showers" in card.text
    printed = capsys.readouterr()
    staged_text = "".join(p.read_bytes().decode("utf-8", "replace") for p in staged.rglob("*") if p.is_file())
    for text in (staged_text, printed.out, printed.err, caplog.text):
        assert TOKEN not in text
    assert str(a.parent) not in staged_text


def test_push_dataset_refuses_bad_input_before_uploading(tmp_showers, uploads, tmp_path, capsys):  # noqa: F811
    odd, ild = tmp_showers(n=4, seed=1, geometry="odd"), tmp_showers(n=4, seed=2, geometry="ild")
    unnamed = tmp_showers(n=4, seed=3, geometry=None)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    cases = [([odd, ild], "geometry 'ild' differs from 'odd'"), ([odd, tmp_path / "no.h5"], "file not found"),
             ([bad], "bad.h5"), ([unnamed], "records no geometry"), ([odd, odd], "given twice")]
    for files, message in cases:
        assert cli(["push-dataset", *map(str, files), "--repo-id", "org/showers"]) == 2, files
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (files, err)
    assert cli(["push-dataset", str(odd), "--repo-id", "org/showers", "--revision", "../x"]) == 2
    assert "is not a revision" in capsys.readouterr().err
    assert uploads.calls == []


def test_dataset_round_trip_through_the_hub(tmp_showers, hub, tmp_path, caplog):
    import datasets

    from calofm.data.convert import native_to_parquet
    from calofm.data.parquet import load_parquet_dataset

    a, b = tmp_showers(n=12, seed=1, geometry="odd"), tmp_showers(n=7, seed=2, geometry="odd")
    url = push_dataset([a, b], "org/showers", shard_rows=5)
    commit = url.rsplit("/", 1)[1]
    ref = joined(a, b)
    # the local Parquet export, read by datasets
    native_to_parquet(a, tmp_path / "parquet", shard_rows=5, progress=False)
    assert_same(as_arrays(load_parquet_dataset(tmp_path / "parquet")), read_showers(a))
    # the served dataset repo, read by datasets as its card says
    assert_same(as_arrays(datasets.load_dataset("org/showers", split="train")), ref)
    # back to native files for training, converted once per commit
    cache = tmp_path / "calofm_cache"
    files = dataset_files("org/showers", cache_dir=cache)
    assert files == [cache / "hub" / "org--showers" / commit / "odd.h5"]
    assert_same(read_showers(files[0]), ref)
    stamp = files[0].stat()
    caplog.set_level("INFO")
    assert dataset_files("org/showers", cache_dir=cache) == files
    assert files[0].stat().st_mtime_ns == stamp.st_mtime_ns and files[0].stat().st_ino == stamp.st_ino
    assert "reusing" in caplog.text
    # a revision is its own snapshot
    push_dataset([b], "org/showers", revision="v2")
    v2 = dataset_files("org/showers@v2", cache_dir=cache)
    assert v2[0].parent != files[0].parent and v2[0].name == "odd.h5"
    assert_same(read_showers(v2[0]), read_showers(b))
    assert_same(read_showers(dataset_files("org/showers", revision=commit, cache_dir=cache)[0]), ref)
    # what a training source is given: a local path stays a path; a repo must hold the source's geometry
    assert data_files(str(a), "odd") == [a]
    assert data_files("runs/odd.h5", "odd") == [Path("runs/odd.h5")]  # a missing file is no repo id: not found later
    assert data_files("org/showers", "odd", cache) == files
    with pytest.raises(ValueError, match="org/showers: holds no showers of geometry 'ild' \\(it has odd\\)"):
        data_files("org/showers", "ild", cache)
    with pytest.raises(ValueError, match="no such dataset repo"):
        dataset_files("org/nothing", cache_dir=cache)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    small = [{"geometry": "par04_siw", "samples": 96, "val_samples": 16, "energy": [5.0, 50.0]}]
    return run(tiny_config(root / "run", root / "cache", steps=2, val_every=2,
                           **{"data.sources": small, "data.stats_samples": 32}))


def test_adapt_on_a_hub_dataset(base, tmp_showers, hub, tmp_path):
    from train_helpers import reset_accelerate

    import calofm

    data = tmp_showers(n=48, seed=3, geometry="allegro")
    commit = push_dataset([data], "org/allegro-showers").rsplit("/", 1)[1]
    base_commit = push(base, "org/base").rsplit("/", 1)[1]  # the base from the Hub too: adapt --base ORG/NAME
    (tmp_path / "adapt.yaml").write_text(yaml.safe_dump({"val_samples": 8, "rank": 2, "num_workers": 0}))
    out, cache = tmp_path / "adapted", tmp_path / "cache"
    reset_accelerate()
    assert cli(["adapt", "--geometry", "allegro", "--data", "org/allegro-showers", "--base", "org/base",
                "--steps", "2", "--batch-size", "8", "--cache-dir", str(cache), "--out", str(out),
                "--config", str(tmp_path / "adapt.yaml")]) == 0
    converted = cache / "hub" / "org--allegro-showers" / commit / "allegro.h5"
    assert_same(read_showers(converted), read_showers(data))
    record = json.loads((out / "model" / "calofm_training.json").read_text())
    assert record["geometries"]["allegro"]["train_showers"] == 40
    assert record["geometries"]["allegro"]["sources"][0]["file"] == "allegro.h5"
    info = json.loads((out / "model" / "calofm_adapter.json").read_text())
    assert info["config"]["data"] == ["org/allegro-showers"]
    # the adapter records its Hub base and the commit it was trained on, not a path into the local cache
    assert info["base"] == "org/base" and info["base_revision"] == base_commit and info["base_path"] is None
    assert record["config"]["data"]["sources"][0]["files"] == ["org/allegro-showers"]
    assert record["config"]["model"]["init_from"] == "org/base"
    showers = calofm.load(out / "model", device="cpu").sample(geometry="allegro", energy_gev=20.0, phi=0.0,
                                                              theta=1.5, steps=2, seed=0)
    assert showers.shape == (1, 9, 16, 45) and np.isfinite(showers).all()
