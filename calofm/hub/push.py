"""Publishing on the Hugging Face Hub: ``push`` a model or LoRA adapter, ``pull`` one (with its base), and
``push_dataset`` shower files as Parquet shards.

Everything is checked before anything is uploaded: a model must be a calofm model folder with intact checksums,
an adapter must be readable and name a base that others can fetch (a Hub repo id, ``--base-repo``). The upload is
staged in a temporary folder holding only the files calofm reads (config and weights, the checksum manifest, the
training record and adapter record, the geometry cards), never pickles or other files of the user's folder, with
local paths removed from the records and a fresh model card (``README.md``). The user's folder is never written.
The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``) or ``token=``, and is
passed to ``HfApi`` only: it is never written or logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from calofm.config import first_line
from calofm.data.integrity import MANIFEST, read_json, write_json
from calofm.hub.adapters import ADAPTER_FILE, ADAPTER_WEIGHTS, base_of, fingerprint, read_adapter
from calofm.hub.folders import DISTILL_FILE, WEIGHTS, card_file, check_model_folder
from calofm.hub.loading import is_adapter
from calofm.hub.resolve import fetch, resolve, split_revision, valid_repo_id
from calofm.training.record import RECORD

log = logging.getLogger(__name__)
# ADAPTER_FILE: a full fine-tune's base; DISTILL_FILE: a distilled student's teacher and settings
MODEL_FILES = ("config.json", WEIGHTS, MANIFEST, RECORD, ADAPTER_FILE, DISTILL_FILE)
ADAPTER_FILES = ("adapter_config.json", ADAPTER_WEIGHTS, MANIFEST, ADAPTER_FILE, RECORD)
LOCAL_KEYS = ("base_path", "base_relative")  # local paths in calofm_adapter.json, never published


def check_folder(folder: Path) -> tuple[str, dict]:
    """("model", config) or ("adapter", calofm_adapter.json) of a folder whose files are all there and intact."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (a calofm model or LoRA adapter folder)")
    if is_adapter(folder):
        return "adapter", read_adapter(folder)[0]
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder}: not a calofm model or LoRA adapter (no config.json or adapter_config.json)")
    return "model", check_model_folder(folder)


def _base_is_local(info: dict) -> bool:
    """The recorded base was a local folder (``base_path``; older records: a base that is no repo id)."""
    return bool(info.get("base_path")) or not valid_repo_id(str(info.get("base", "")))


def public_record(info: dict, base_repo: str | None) -> dict:
    """``calofm_adapter.json`` as published: the base named by its Hub id (``base_repo`` when given, with its
    revision), no local paths (also none in the recorded adaptation settings)."""
    info = {k: v for k, v in info.items() if k not in LOCAL_KEYS}
    if base_repo is not None:
        repo, rev = split_revision(base_repo)
        info["base"] = repo
        info.pop("base_revision", None)
        if rev:
            info["base_revision"] = rev
    elif _base_is_local(info):  # a full fine-tune's provenance: the base's folder name, not its path
        info["base"] = Path(str(info.get("base", ""))).name
    config = info.get("config")
    if isinstance(config, dict):
        config = dict(config)
        config["base"] = info["base"]
        config["data"] = [_public_data(str(d)) for d in config.get("data") or []]
        config["geometry_dirs"] = [Path(d).name for d in config.get("geometry_dirs") or []]
        for key in ("output_dir", "cache_dir"):
            config.pop(key, None)
        info["config"] = config
    return info


def public_distill_record(info: dict) -> dict:
    """``calofm_distill.json`` as published: the teacher by its Hub id, or by its folder's name when it was a
    local folder (a student loads without its teacher), and no local paths in the recorded settings."""
    info = dict(info)
    teacher = {k: v for k, v in dict(info.get("teacher") or {}).items() if k not in LOCAL_KEYS}
    if not valid_repo_id(str(teacher.get("base", ""))):
        teacher["base"] = Path(str(teacher.get("base", ""))).name
    info["teacher"] = teacher
    if isinstance(info.get("config"), dict):
        config = {k: v for k, v in info["config"].items() if k not in ("output_dir", "cache_dir")}
        info["config"] = {**config, "model": teacher["base"]}
    return info


def published_base(folder: str | Path, base_repo: str | None = None) -> str | None:
    """``ORG/NAME[@REV]`` of the base an adapter or fine-tune names once published (None for other models)."""
    folder = Path(folder).expanduser()
    if not (folder / ADAPTER_FILE).is_file():
        return None
    info = public_record(read_json(folder / ADAPTER_FILE), base_repo)
    if info.get("method") == "scratch" or not valid_repo_id(str(info.get("base", ""))):
        return None
    return info["base"] + (f"@{info['base_revision']}" if info.get("base_revision") else "")


def _public_data(spec: str) -> str:
    """A training data entry as published: a Hub dataset id as it is, a local file by its name."""
    from calofm.hub.datasets import FILE_SUFFIXES

    local = spec.lower().endswith(FILE_SUFFIXES) or not valid_repo_id(spec.partition("@")[0])
    return Path(spec).name if local else spec


def _place(src: Path, dst: Path) -> None:
    """Weights hard-linked when possible (never written to: the staged records are new files), others copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".safetensors":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def stage_folder(folder: Path, staged: Path, repo_id: str, base_repo: str | None = None,
                 metrics: Iterable[str | Path] = ()) -> str:
    """Fill ``staged`` with what is published of ``folder``; returns its kind ("model" or "adapter")."""
    from huggingface_hub import ModelCard

    from calofm.hub.modelcard import card_metadata_errors, folder_kind, write_card

    folder = Path(folder)
    kind, record = check_folder(folder)
    derived = record if kind == "adapter" else read_json(folder / ADAPTER_FILE) if (folder / ADAPTER_FILE).is_file() \
        else None  # a full fine-tune records its base like an adapter; a scratch run has none to name
    if base_repo is None and derived is not None and derived.get("method") != "scratch" and _base_is_local(derived):
        what = "adapter" if kind == "adapter" else "fine-tuned model"
        raise ValueError(f"{folder}: the {what}'s base is the local folder {derived.get('base')}; publish the base "
                         f"first and pass --base-repo ORG/NAME[@REV]")
    if kind == "adapter":
        names = list(ADAPTER_FILES)
        card = record.get("card")
        names += [card["file"]] if isinstance(card, dict) and isinstance(card.get("file"), str) else []
    else:
        names = list(MODEL_FILES) + [card_file(n) for n in record.get("geometry_cards") or {}]
    if base_repo is not None and not valid_repo_id(split_revision(base_repo)[0]):
        raise ValueError(f"{base_repo}: --base-repo must be a Hub repo id ORG/NAME[@REV]")
    skipped = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.relative_to(folder).as_posix() not in names)
    if skipped:
        log.info("not uploaded (calofm does not read them): %s", ", ".join(skipped))
    for name in names:
        if (folder / name).is_file():
            _place(folder / name, staged / name)
    if (staged / ADAPTER_FILE).exists():
        info = public_record(read_json(staged / ADAPTER_FILE), base_repo)
        write_json(staged / ADAPTER_FILE, info)
        if kind == "adapter":  # peft's record of the base: the repo, not the local folder it was trained on
            peft = read_json(staged / "adapter_config.json")
            peft.update(base_model_name_or_path=info["base"], revision=info.get("base_revision"))
            write_json(staged / "adapter_config.json", peft)
    if (staged / DISTILL_FILE).exists():
        write_json(staged / DISTILL_FILE, public_distill_record(read_json(staged / DISTILL_FILE)))
    check_folder(staged)  # what is uploaded loads
    readme = write_card(staged, repo_id, list(metrics))
    errors = card_metadata_errors(ModelCard.load(readme), kind=folder_kind(staged))
    if errors:
        raise ValueError(f"{folder}: its model card would be wrong: {'; '.join(errors)}")
    return kind


def _hub_call(where: str, what: str, fn, /, *args, **kwargs):
    """A call to the Hub API as one line naming the repo on failure (never showing the token)."""
    import httpx2

    try:
        return fn(*args, **kwargs)
    except (httpx2.HTTPError, OSError, ValueError) as err:
        raise ValueError(f"{where}: {what} failed ({first_line(err)})") from None


def upload(staged: Path, repo_id: str, repo_type: str, private: bool, revision: str | None,
           commit_message: str, token: str | None) -> str:
    """create_repo (+ branch) and upload_folder of the staged folder; the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    _hub_call(repo_id, "creating the repo", api.create_repo, repo_id, repo_type=repo_type, private=private,
              exist_ok=True)
    if revision:
        _hub_call(repo_id, f"creating branch {revision}", api.create_branch, repo_id, branch=revision,
                  repo_type=repo_type, exist_ok=True)
    info = _hub_call(repo_id, "the upload", api.upload_folder, folder_path=str(staged), repo_id=repo_id,
                     repo_type=repo_type, revision=revision, commit_message=commit_message)
    return str(getattr(info, "commit_url", None) or info)


def _check_repo_id(repo_id: str, revision: str | None) -> None:
    if not valid_repo_id(repo_id):
        raise ValueError(f"{repo_id}: --repo-id must be a Hub repo id ORG/NAME (a branch goes in --revision)")
    if revision is not None:
        split_revision(f"{repo_id}@{revision}")


def _check_metrics(metrics: Iterable[str | Path]) -> list[Path]:
    paths = [Path(m) for m in metrics]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path}: metrics file not found")
    return paths


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, base_repo: str | None = None, metrics: Iterable[str | Path] = (),
         token: str | None = None) -> str:
    """Upload a model folder or LoRA adapter folder with its model card; returns the commit URL."""
    _check_repo_id(repo_id, revision)
    metrics = _check_metrics(metrics)
    with tempfile.TemporaryDirectory(prefix="calofm-push-") as tmp:
        staged = Path(tmp) / "upload"
        staged.mkdir()
        kind = stage_folder(Path(folder).expanduser(), staged, repo_id, base_repo, metrics)
        message = commit_message or f"Upload calofm {kind}"
        return upload(staged, repo_id, "model", private, revision, message, token)


def push_dataset(files: Iterable[str | Path], repo_id: str, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, shard_rows: int = 10_000, token: str | None = None) -> str:
    """Upload native shower files of one geometry as Parquet shards with its card and a dataset card; returns the
    commit URL."""
    from calofm.hub.datasets import stage_dataset

    _check_repo_id(repo_id, revision)
    with tempfile.TemporaryDirectory(prefix="calofm-push-dataset-") as tmp:
        staged = Path(tmp) / "upload"
        staged.mkdir()
        stage_dataset([Path(f).expanduser() for f in files], staged, repo_id, shard_rows=shard_rows)
        return upload(staged, repo_id, "dataset", private, revision, commit_message or "Upload calofm showers", token)


# ----------------------------------------------------------------------------------------------
# pull
# ----------------------------------------------------------------------------------------------


def check_base(adapter: Path, info: dict) -> Path:
    """The folder of an adapter's base (fetched into the Hub cache if it is a repo), checked and with the
    weights the adapter was trained on."""
    where, revision = base_of(adapter, info)
    shown = f"{where}@{revision}" if revision else where
    base = resolve(where, revision)
    if is_adapter(base):
        raise ValueError(f"{adapter}: its base {shown} is an adapter, not a model")
    check_model_folder(base)
    if fingerprint(base) != info["fingerprint"]:
        raise ValueError(f"{adapter}: adapter was trained on a different base model than {shown} "
                         f"(weights fingerprint differs)")
    return base


def pull(repo_id: str, revision: str | None = None, out: str | Path | None = None) -> Path:
    """A model or adapter repo, checked, in the Hub cache (or, with ``out``, in that new folder); an adapter's
    base is fetched into the cache and must be the one it was trained on. Returns the folder."""
    repo, rev = split_revision(str(repo_id), revision)
    if not valid_repo_id(repo):
        raise ValueError(f"{repo_id}: not a Hub repo id (ORG/NAME[@REV])")
    if out is None:
        folder = resolve(repo, rev)
        kind, info = check_folder(folder)
        if kind == "adapter":
            check_base(folder, info)
        return folder
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; choose a new folder")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # a pull that was killed leaves huggingface_hub's records in it; anything else is kept
        if not partial.is_dir() or not (partial / ".cache" / "huggingface").is_dir() and any(partial.iterdir()):
            raise ValueError(f"{partial}: exists and is not a leftover of calofm pull; remove or rename it")
        shutil.rmtree(partial)
    try:
        fetch(repo, rev, local_dir=partial)
        shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download records
        if not (partial / "config.json").is_file() and not is_adapter(partial):
            raise ValueError(f"{repo}: not a calofm model or adapter (no config.json or adapter_config.json in the "
                             f"repo)")
        kind, info = check_folder(partial)
        if kind == "adapter":
            check_base(partial, info)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def describe(folder: Path) -> str:
    """One line: what a checked model or adapter folder is."""
    kind, record = check_folder(folder)
    if kind == "adapter":
        base = record["base"] + (f"@{record['base_revision']}" if record.get("base_revision") else "")
        return f"LoRA adapter for geometry {record['geometry']} (slot {record['slot']}) on base {base}"
    slots = record.get("geometry_slots") or {}
    names = ", ".join(sorted(slots, key=slots.get)) or "none"
    return f"calofm model ({record.get('variant', 'single')}) with geometries {names}"

