"""Where a model, adapter or dataset is: a local folder, or a Hugging Face Hub repo fetched into the cache.

``ORG/NAME``, ``ORG/NAME@REVISION`` (a branch, tag or commit) or a ``revision=`` keyword name a Hub repo.
Only the files calofm reads are downloaded (JSON, YAML cards, safetensors, Parquet, Markdown): a pickled
``pytorch_model.bin`` or ``*.pkl`` in a repo is never fetched, so it can never be loaded. Offline
(``HF_HUB_OFFLINE=1``) the cached snapshot is used. Every failure is one ``ValueError`` line naming the repo.
"""

from __future__ import annotations

import re
from pathlib import Path

from calofm.config import first_line

# what calofm reads from a repo; never pickles (*.bin, *.pt, *.pkl, *.ckpt)
MODEL_FILES = ["*.json", "*.safetensors", "geometries/*.yaml", "*.md"]
DATASET_FILES = ["*.parquet", "**/*.parquet", "*.json", "*.md", "geometries/*.yaml", "*.yaml"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ("org/name", "rev"); a ``revision`` keyword must not contradict it."""
    repo, at, rev = str(spec).partition("@")
    if not at:
        return repo, revision
    if not rev or not _REVISION.match(rev) or ".." in rev:
        raise ValueError(f"{spec}: '{rev}' is not a revision (a branch, tag or commit after '@')")
    if revision is not None and revision != rev:
        raise ValueError(f"{spec}: revision '{rev}' contradicts revision={revision!r}")
    return repo, rev


def valid_repo_id(text: str) -> bool:
    """``ORG/NAME`` as the Hub accepts it (no '..', '--' or a '.git' ending)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".git")


def is_repo_id(spec: str | Path) -> bool:
    """A Hub repo id (``ORG/NAME`` with an optional ``@REV``) that is not an existing local path."""
    text = str(spec)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return False
    return bool(_REPO_ID.match(text.partition("@")[0]))


def snapshot_commit(path: Path) -> str | None:
    """The 40-hex commit of a folder inside the Hub cache (``.../snapshots/<commit>``), else None."""
    path = Path(path)
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def fetch(repo_id: str, revision: str | None = None, repo_type: str = "model", local_dir: str | Path | None = None,
          allow_patterns: list[str] | None = None) -> Path:
    """``snapshot_download`` of only the files calofm reads; one-line errors naming the repo and revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id}: not a Hub repo id (ORG/NAME)")
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise ValueError(f"{repo_id}: '{revision}' is not a revision")
    where = f"{repo_id}@{revision}" if revision else repo_id
    patterns = allow_patterns or (DATASET_FILES if repo_type == "dataset" else MODEL_FILES)
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns,
                                      local_dir=str(local_dir) if local_dir is not None else None))
    except RevisionNotFoundError:
        raise ValueError(f"{where}: no such revision on the Hub") from None
    except GatedRepoError:
        raise ValueError(f"{where}: gated repo; accept its conditions on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{where}: no such {repo_type} repo on the Hub (or it is private: log in with "
                         f"hf auth login)") from None
    except LocalEntryNotFoundError:
        raise ValueError(f"{where}: not in the local Hub cache and the Hub cannot be reached (offline?)") from None
    except (OSError, ValueError) as err:  # HTTP errors, interrupted or damaged downloads, disk full
        raise ValueError(f"{where}: download failed ({first_line(err)})") from None


def resolve(spec: str | Path, revision: str | None = None) -> Path:
    """A local model/adapter folder, or a Hub repo id (``ORG/NAME[@REV]``) fetched into (or found in) the cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"{spec}: a local folder has no revisions (revision={revision!r})")
        if not path.is_dir():
            raise ValueError(f"{path}: a model is a folder (config.json + model.safetensors), not a file")
        return path
    if not is_repo_id(spec):
        raise ValueError(f"{spec}: no such model folder")
    repo, rev = split_revision(str(spec), revision)
    folder = fetch(repo, rev)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{repo}: not a calofm model or adapter (no config.json or adapter_config.json in the repo)")
    return folder
