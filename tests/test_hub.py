"""Models and adapters on the Hugging Face Hub, offline: a loopback fake Hub (tests/fake_hub.py) serves what
``calofm push`` uploads (HfApi's write calls mocked), and calofm loads, pins revisions, pulls and refuses damage
from it; a hand-seeded cache serves ``HF_HUB_OFFLINE=1`` in a subprocess."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fake_hub import fake_hub, seed_cache, uploads  # noqa: F401 - pytest fixtures
from train_helpers import ROOT, reset_accelerate, run, tiny_config

import calofm
from calofm.cli import main as cli
from calofm.hub.folders import check_model_folder, load_model, save_model
from calofm.hub.push import pull, push

SMALL = [{"geometry": "par04_siw", "samples": 96, "val_samples": 16, "energy": [5.0, 50.0]},
         {"geometry": "ild", "samples": 96, "val_samples": 16, "energy": [10.0, 50.0]}]
SAMPLE = dict(energy_gev=[10.0, 40.0], phi=0.0, theta=1.5, steps=2, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained base, the same with other weights (v1) and a LoRA adapter for allegro on the base."""
    root = tmp_path_factory.mktemp("models")
    cache = root / "cache"
    base = run(tiny_config(root / "base", cache, steps=2, val_every=2, **{"data.sources": SMALL,
                                                                          "data.stats_samples": 32}))
    net, cards, _ = load_model(base)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    v1 = save_model(net, root / "v1", cards)
    (root / "adapt.yaml").write_text(yaml.safe_dump({"val_samples": 16, "rank": 2, "num_workers": 0}))
    reset_accelerate()
    assert cli(["adapt", "--geometry", "allegro", "--samples", "64", "--base", str(base), "--steps", "2",
                "--batch-size", "8", "--cache-dir", str(cache), "--out", str(root / "lora"),
                "--config", str(root / "adapt.yaml")]) == 0
    return {"base": base, "v1": v1, "adapter": root / "lora" / "model"}


@pytest.fixture
def hub(fake_hub, uploads):  # noqa: F811 - the fixtures imported above
    """The fake Hub, with ``push`` publishing into it."""
    uploads.hub = fake_hub
    return fake_hub


def sample(model, geometry="par04_siw", **kw):
    return calofm.load(model, device="cpu", **kw).sample(geometry=geometry, **SAMPLE)


def checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_hub_cached(tmp_path: Path, repo_id: str) -> bool:
    """Whether ``repo_id`` was fetched into the fake_hub fixture's Hugging Face cache."""
    return (tmp_path / "hf_home" / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir()


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ----------------------------------------------------------------------------------------------
# Loading from the (fake) Hub
# ----------------------------------------------------------------------------------------------


def test_load_by_repo_id_samples_and_pins_revisions(models, hub):
    main_url = push(models["base"], "org/model")
    v1_url = push(models["v1"], "org/model", revision="v1")
    main_sha, v1_sha = main_url.rsplit("/", 1)[1], v1_url.rsplit("/", 1)[1]
    assert hub.repos[("model", "org/model")]["refs"] == {"main": main_sha, "v1": v1_sha}
    local_main, local_v1 = sample(models["base"]), sample(models["v1"])
    assert local_main.shape == (2, 9, 16, 45) and not np.array_equal(local_main, local_v1)
    np.testing.assert_array_equal(sample("org/model"), local_main)
    np.testing.assert_array_equal(sample("org/model@v1"), local_v1)
    np.testing.assert_array_equal(sample("org/model", revision="v1"), local_v1)
    np.testing.assert_array_equal(sample(f"org/model@{main_sha}"), local_main)  # a commit pins too
    with pytest.raises(ValueError) as err:
        calofm.load("org/model@v1", revision="main")
    assert "contradicts" in one_line(err)
    with pytest.raises(ValueError) as err:
        calofm.load("org/model@v9")
    assert one_line(err) == "org/model@v9: no such revision on the Hub"


def test_pickles_in_a_repo_are_never_downloaded(models, fake_hub):  # noqa: F811
    files = {p.relative_to(models["base"]).as_posix(): p.read_bytes() for p in models["base"].rglob("*")
             if p.is_file()}
    fake_hub.publish("org/pickled", {**files, "pytorch_model.bin": b"pickle", "optimizer.pkl": b"pickle",
                                     "training_args.bin": b"pickle"})
    np.testing.assert_array_equal(sample("org/pickled"), sample(models["base"]))
    assert fake_hub.downloads("config.json") and fake_hub.downloads("model.safetensors")  # the log sees downloads
    for name in ("pytorch_model.bin", "optimizer.pkl", "training_args.bin"):
        assert fake_hub.downloads(name) == []


def test_transformers_automodel_from_the_hub(models, hub):
    from transformers import AutoModel

    import calofm.models  # the AutoModel registration lives here

    push(models["base"], "org/model")
    net = AutoModel.from_pretrained("org/model", dtype=torch.float32)
    assert isinstance(net, calofm.models.CaloDiTModel)
    local = load_model(models["base"])[0].state_dict()
    assert net.state_dict().keys() == local.keys()
    assert all(torch.equal(v, local[k]) for k, v in net.state_dict().items())


def test_adapter_loads_on_its_fetched_base_exactly(models, hub, tmp_path):
    main = push(models["base"], "org/base").rsplit("/", 1)[1]
    push(models["adapter"], "org/adapter", base_repo=f"org/base@{main}")
    push(models["v1"], "org/base")  # main moves on; the adapter is pinned to the commit it was trained on
    info = json.loads(hub.files("org/adapter")["calofm_adapter.json"])
    assert info["base"] == "org/base" and info["base_revision"] == main and "base_path" not in info
    np.testing.assert_array_equal(sample("org/adapter", "allegro"), sample(models["adapter"], "allegro"))
    np.testing.assert_array_equal(sample("org/adapter"), sample(models["base"]))  # base geometries: the base
    np.testing.assert_array_equal(sample("org/adapter", "ild"), sample(models["base"], "ild"))
    assert fake_hub_cached(tmp_path, "org/base")
    assert cli(["pull", "org/adapter"]) == 0


def test_adapter_on_a_different_base_is_refused(models, hub, tmp_path, capsys):
    push(models["v1"], "org/base")
    push(models["adapter"], "org/adapter", base_repo="org/base")
    with pytest.raises(ValueError) as err:
        calofm.load("org/adapter")
    assert "trained on a different base model than org/base (weights fingerprint differs)" in one_line(err)
    out = tmp_path / "pulled"
    assert cli(["pull", "org/adapter", "--out", str(out)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert "\n" not in stderr and "fingerprint differs" in stderr
    assert not out.exists() and not out.with_name("pulled.partial").exists()


# ----------------------------------------------------------------------------------------------
# Bad repos: one line, nothing half-loaded or half-written
# ----------------------------------------------------------------------------------------------


def test_repo_that_is_not_a_calofm_model(fake_hub, capsys, tmp_path):  # noqa: F811
    fake_hub.publish("org/other", {"README.md": b"# not a model", "weights.safetensors": b"\0" * 16})
    with pytest.raises(ValueError) as err:
        calofm.load("org/other")
    assert "org/other: not a calofm model" in one_line(err)
    assert cli(["generate", "--model", "org/other", "--geometry", "odd", "--samples", "2",
                "--out", str(tmp_path / "gen.h5")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "gen.h5").exists()
    with pytest.raises(ValueError, match="org/other: not a calofm model or adapter"):
        pull("org/other", out=tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists() and not (tmp_path / "pulled.partial").exists()
    with pytest.raises(ValueError, match="no such model repo"):
        calofm.load("org/missing")


def test_served_file_differing_from_its_checksum(models, fake_hub, tmp_path):  # noqa: F811
    files = {p.relative_to(models["base"]).as_posix(): p.read_bytes() for p in models["base"].rglob("*")
             if p.is_file()}
    weights = bytearray(files["model.safetensors"])
    weights[-3] ^= 0xFF  # same size, one byte of a tensor changed: only the manifest can tell
    fake_hub.publish("org/damaged", {**files, "model.safetensors": bytes(weights)})
    with pytest.raises(ValueError) as err:
        calofm.load("org/damaged")
    assert one_line(err).endswith("model.safetensors: does not match the sha256 recorded when it was saved "
                                  "(damaged or modified)")
    out = tmp_path / "pulled"
    with pytest.raises(ValueError, match="does not match the sha256"):
        pull("org/damaged", out=out)
    assert not out.exists() and not out.with_name("pulled.partial").exists()


# ----------------------------------------------------------------------------------------------
# pull
# ----------------------------------------------------------------------------------------------


def test_pull_into_a_folder_verified_and_never_over_one(models, hub, tmp_path, capsys):
    push(models["base"], "org/model")
    push(models["v1"], "org/model", revision="v1")
    out = tmp_path / "pulled"
    assert cli(["pull", "org/model@v1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "org/model@v1: calofm model (single) with geometries par04_siw, ild" in printed and str(out) in printed
    check_model_folder(out)
    assert sorted(checksums(out)) == ["README.md", "calofm_checksums.json", "config.json", "geometries/ild.yaml",
                                      "geometries/par04_siw.yaml", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (models["v1"] / "model.safetensors").read_bytes()
    np.testing.assert_array_equal(sample(out), sample(models["v1"]))
    before = checksums(out)
    assert cli(["pull", "org/model", "--out", str(out)]) == 2  # an existing non-empty folder is refused
    assert "exists and is not empty" in capsys.readouterr().err
    assert checksums(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pull("org/model", out=empty) == empty and (empty / "config.json").is_file()
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "x.partial" / "mine.txt").write_text("not a download")  # not ours: never removed
    with pytest.raises(ValueError, match="x.partial: exists and is not a leftover of calofm pull"):
        pull("org/model", out=tmp_path / "x")
    assert (tmp_path / "x.partial" / "mine.txt").is_file() and not (tmp_path / "x").exists()
    cached = pull("org/model")  # without --out: the Hugging Face cache, where calofm.load finds it
    assert cached.parent.name == "snapshots" and check_model_folder(cached)


def test_pull_adapter_fetches_its_base(models, hub, tmp_path, capsys):
    push(models["base"], "org/base")
    push(models["adapter"], "org/adapter", base_repo="org/base")
    out = tmp_path / "adapter"
    assert cli(["pull", "org/adapter", "--out", str(out)]) == 0
    assert "LoRA adapter for geometry allegro (slot 5) on base org/base" in capsys.readouterr().out
    assert fake_hub_cached(tmp_path, "org/base")
    np.testing.assert_array_equal(sample(out, "allegro"), sample(models["adapter"], "allegro"))


# ----------------------------------------------------------------------------------------------
# Offline: a seeded cache, HF_HUB_OFFLINE=1 in a fresh process
# ----------------------------------------------------------------------------------------------


def test_generate_offline_from_a_seeded_cache(models, tmp_path):
    cache = tmp_path / "hub_cache"
    seed_cache(cache, "org/model", models["base"])
    out = tmp_path / "gen.h5"
    code = ("import sys; from calofm.cli import main\n"
            f"a = main(['generate', '--model', 'org/model', '--geometry', 'ild', '--samples', '3', '--steps', '2', "
            f"'--out', {str(out)!r}])\n"
            f"b = main(['generate', '--model', 'org/uncached', '--geometry', 'ild', '--samples', '3', "
            f"'--out', {str(tmp_path / 'no.h5')!r}])\n"
            "print('exit codes', a, b)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert "exit codes 0 2" in result.stdout, result.stderr[-2000:]
    assert "org/uncached: not in the local Hub cache and the Hub cannot be reached" in result.stderr
    from calofm.data.io import ShowerFile

    with ShowerFile(out) as f:
        assert len(f) == 3 and f.attrs.geometry == "ild"


# ----------------------------------------------------------------------------------------------
# push: what is staged and uploaded (HfApi's write calls mocked)
# ----------------------------------------------------------------------------------------------

TOKEN = "hf_testtoken123"


def user_folder(src: Path, dst: Path) -> Path:
    """A copy of a model/adapter folder with things of the user's that must never be published."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "pytorch_model.bin").write_bytes(b"a pickle")
    (dst / "notes.json").write_text('{"mine": true}')
    (dst / "geometries" / "draft.yaml").write_text("name: draft\n")
    (dst / "README.md").write_text("# my own notes\n")
    return dst


def staged_text(uploads) -> str:  # noqa: F811
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in uploads.staged[-1].rglob("*") if p.is_file())


def test_push_model_uploads_only_what_calofm_reads(models, uploads, tmp_path, monkeypatch, capsys, caplog):  # noqa: F811
    from huggingface_hub import ModelCard

    from calofm.hub.modelcard import MODEL_TAGS, card_metadata_errors

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = user_folder(models["base"], tmp_path / "mine")
    before = checksums(folder)
    caplog.set_level("DEBUG")
    assert cli(["push", str(folder), "--repo-id", "org/model", "--private", "--revision", "dev",
                "--commit-message", "first model"]) == 0
    assert checksums(folder) == before  # the user's folder is untouched
    assert [(c[0], c[1]) for c in uploads.calls] == [("create_repo", "org/model"), ("create_branch", "org/model"),
                                                     ("upload_folder", "org/model")]
    assert uploads.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert uploads.calls[1][2] == {"branch": "dev", "repo_type": "model", "exist_ok": True}
    assert uploads.calls[2][2] == {"repo_type": "model", "revision": "dev", "commit_message": "first model"}
    assert uploads.tokens == [None] * 3  # huggingface_hub finds HF_TOKEN itself; calofm never handles it
    assert uploads.files() == ["README.md", "calofm_checksums.json", "calofm_training.json", "config.json",
                               "geometries/ild.yaml", "geometries/par04_siw.yaml", "model.safetensors"]
    staged = uploads.staged[-1]
    for name in ("config.json", "model.safetensors", "calofm_checksums.json", "geometries/ild.yaml"):
        assert (staged / name).read_bytes() == (folder / name).read_bytes()
    card = ModelCard.load(staged / "README.md")
    assert card.data.library_name == "calofm" and set(MODEL_TAGS) <= set(card.data.tags)
    assert card.data.base_model is None and card_metadata_errors(card, kind="pretrained") == []
    assert "org/model" in card.text and "# my own notes" not in card.text
    printed = capsys.readouterr()
    assert "uploaded" in printed.out and "org/model@dev" in printed.out and "its base model" not in printed.out
    for text in (staged_text(uploads), printed.out, printed.err, caplog.text):
        assert TOKEN not in text
    assert str(tmp_path) not in staged_text(uploads)  # no local path is published


def test_push_adapter_names_its_base_repo(models, uploads, tmp_path, monkeypatch, capsys, caplog):  # noqa: F811
    from huggingface_hub import ModelCard

    from calofm.hub.modelcard import card_metadata_errors

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = user_folder(models["adapter"], tmp_path / "adapter")
    before = checksums(folder)
    assert cli(["push", str(folder), "--repo-id", "org/adapter"]) == 2  # its base is a local folder
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--base-repo ORG/NAME[@REV]" in err and str(folder) in err
    assert uploads.calls == []  # refused before anything was sent
    caplog.set_level("DEBUG")
    assert cli(["push", str(folder), "--repo-id", "org/adapter", "--base-repo", "org/base@v2"]) == 0
    assert checksums(folder) == before
    assert uploads.calls[-1][2]["commit_message"] == "Upload calofm adapter"
    assert uploads.files() == ["README.md", "adapter_config.json", "adapter_model.safetensors", "calofm_adapter.json",
                               "calofm_checksums.json", "calofm_training.json", "geometries/allegro.yaml"]
    staged = uploads.staged[-1]
    info = json.loads((staged / "calofm_adapter.json").read_text())
    assert info["base"] == "org/base" and info["base_revision"] == "v2"
    assert "base_path" not in info and "base_relative" not in info
    assert info["fingerprint"] == hashlib.sha256((models["base"] / "model.safetensors").read_bytes()).hexdigest()
    assert info["config"]["base"] == "org/base" and "output_dir" not in info["config"]
    card = ModelCard.load(staged / "README.md")
    assert card.data.library_name == "calofm" and "lora" in card.data.tags
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "adapter"
    assert card_metadata_errors(card, kind="lora") == []
    printed = capsys.readouterr()
    assert "its base model: org/base@v2" in printed.out
    for text in (staged_text(uploads), printed.out, printed.err, caplog.text):
        assert TOKEN not in text
    assert str(tmp_path) not in staged_text(uploads) and str(models["base"]) not in staged_text(uploads)


def test_push_refuses_bad_folders_before_uploading(models, uploads, tmp_path, capsys):  # noqa: F811
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(models["base"], damaged)
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "metrics.json").write_text('{"auc": 0.5}')
    cases = [([str(damaged), "--repo-id", "org/m"], "model.safetensors: does not match the sha256"),
             ([str(empty), "--repo-id", "org/m"], "not a calofm model or LoRA adapter (no config.json"),
             ([str(tmp_path / "missing"), "--repo-id", "org/m"], "no such folder"),
             ([str(models["base"]), "--repo-id", "not a repo"], "must be a Hub repo id"),
             ([str(models["adapter"]), "--repo-id", "org/a", "--base-repo", "/some/path"], "must be a Hub repo id"),
             ([str(models["base"]), "--repo-id", "org/m", "--metrics", str(tmp_path / "no.json")],
              "metrics file not found"),
             ([str(models["base"]), "--repo-id", "org/m", "--metrics", str(tmp_path / "metrics.json")],
              "not a metrics.json of calofm evaluate")]
    for argv, message in cases:
        assert cli(["push", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (argv, err)
    assert uploads.calls == []


def test_push_fine_tune_names_its_base_repo(models, uploads, tmp_path, capsys):  # noqa: F811
    """A full fine-tune keeps calofm_adapter.json as its record: its local base is refused like an adapter's."""
    import shutil

    from huggingface_hub import ModelCard

    from calofm.hub.modelcard import card_metadata_errors

    folder = tmp_path / "full"
    shutil.copytree(models["v1"], folder)
    record = {"geometry": "ild", "slot": 2, "method": "full", "base": str(models["base"]),
              "base_path": str(models["base"]), "base_relative": "../base", "fingerprint": "0" * 64,
              "threshold": 0.1, "config": {"base": str(models["base"]), "output_dir": str(tmp_path)}}
    (folder / "calofm_adapter.json").write_text(json.dumps(record))
    assert cli(["push", str(folder), "--repo-id", "org/full"]) == 2
    assert "fine-tuned model's base is the local folder" in capsys.readouterr().err and uploads.calls == []
    assert cli(["push", str(folder), "--repo-id", "org/full", "--base-repo", "org/base"]) == 0
    assert "calofm_adapter.json" in uploads.files() and "adapter_config.json" not in uploads.files()
    info = json.loads((uploads.staged[-1] / "calofm_adapter.json").read_text())
    assert info["base"] == "org/base" and "base_revision" not in info and "base_path" not in info
    assert str(tmp_path) not in json.dumps(info) and uploads.calls[-1][2]["commit_message"] == "Upload calofm model"
    card = ModelCard.load(uploads.staged[-1] / "README.md")
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "finetune"
    assert card_metadata_errors(card, kind="full") == []
