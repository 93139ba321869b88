"""Files calofm reads back: JSON with one-line errors, sha256 manifests, tensors without pickle.

Every folder calofm saves (model, adapter, training checkpoint) is written under ``<name>.partial`` and renamed
when complete (``calofm.data.output.atomic_folder``), with ``calofm_checksums.json`` listing the sha256 of its
weight and card files. A reader checks the manifest before it trusts any byte, so a truncated or bit-flipped
file is a one-line error naming it (or, for checkpoints, a fall-back to the previous one), never a traceback or
silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from calofm.config import first_line
from calofm.data.output import write_text_atomic

log = logging.getLogger(__name__)
MANIFEST = "calofm_checksums.json"


class DamagedError(ValueError):
    """A saved file is missing, unreadable, or differs from its recorded checksum."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; a missing file, broken JSON or a non-object is a DamagedError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DamagedError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedError(path, f"cannot read ({type(err).__name__}: {err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedError(path, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise DamagedError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def write_json(path: str | Path, data: dict) -> None:
    """Through a temporary file and a rename: a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=1))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, files: list[str]) -> None:
    """Record the sha256 of ``files`` (paths relative to ``folder``) in the folder's manifest."""
    write_json(folder / MANIFEST, {"sha256": {name: sha256_file(folder / name) for name in sorted(files)}})


def verify_manifest(folder: str | Path, required: tuple[str, ...] = (), need_manifest: bool = False) -> bool:
    """Check every file the manifest lists (and that ``required`` ones are listed). False when there is no
    manifest and ``need_manifest`` is not set (folders written by other tools or older calofm versions)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        if need_manifest:
            raise DamagedError(folder / MANIFEST, "file not found (the folder is incomplete)")
        return False
    listed = read_json(folder / MANIFEST).get("sha256")
    if not isinstance(listed, dict):
        raise DamagedError(folder / MANIFEST, "has no 'sha256' table")
    for name in required:
        if name not in listed:
            raise DamagedError(folder / MANIFEST, f"does not list {name}")
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise DamagedError(path, "file not found")
        if sha256_file(path) != digest:
            raise DamagedError(path, "does not match the sha256 recorded when it was saved (damaged or modified)")
    return True


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (no pickle); unreadable files are a DamagedError naming them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DamagedError(path, "file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DamagedError(path, f"not a readable safetensors file ({first_line(err)})") from None
