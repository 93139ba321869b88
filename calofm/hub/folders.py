"""Saved model folders: ``config.json`` + ``model.safetensors`` + the cards of the model's geometries
(``geometries/<name>.yaml``, their sha256 in ``config.geometry_cards``) + a checksum manifest.

A model carries its detector cards, so a model trained or adapted on a card outside ``geometries/`` (or on
a card changed since) generates for it anywhere, without ``--geometry-dir``. Loading is strict: safetensors
only (never a pickled ``pytorch_model.bin``), every tensor key must match, checksums must match.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from calofm.cards import card_bytes
from calofm.config import first_line
from calofm.data.integrity import (
    DamagedError,
    read_json,
    sha256_file,
    verify_manifest,
    write_json,
    write_manifest,
)
from calofm.data.output import atomic_folder
from calofm.geometry import Geometry, load_geometry_file
from calofm.hub.resolve import resolve

log = logging.getLogger(__name__)
CARDS_DIR = "geometries"
DISTILL_FILE = "calofm_distill.json"  # beside a distilled student's weights: its teacher and settings
WEIGHTS = "model.safetensors"


@contextlib.contextmanager
def quiet_transformers():
    """No 'Loading weights' / 'Writing model shards' progress bars (a model folder loads in a blink, and an
    error after loading should be the only line on stderr)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Geometry cards travel with the model
# ----------------------------------------------------------------------------------------------


def card_file(name: str) -> str:
    return f"{CARDS_DIR}/{name}.yaml"


def write_cards(folder: Path, geometries: dict[str, Geometry]) -> dict[str, str]:
    """Copy the cards into ``folder/geometries``; returns name -> sha256."""
    (folder / CARDS_DIR).mkdir(exist_ok=True)
    out = {}
    for name, geometry in geometries.items():
        (folder / card_file(name)).write_bytes(card_bytes(geometry))
        out[name] = sha256_file(folder / card_file(name))
    return out


def read_card(folder: Path, name: str, sha256: str, recorded_in: Path) -> Geometry:
    """The card ``name`` stored in ``folder``; it must be the one whose hash ``recorded_in`` holds."""
    path = folder / card_file(name)
    if not path.is_file():
        raise DamagedError(path, f"file not found (the card of geometry '{name}' recorded in {recorded_in.name})")
    if sha256_file(path) != sha256:
        raise DamagedError(path, f"does not match the sha256 recorded in {recorded_in.name} (damaged or modified)")
    return load_geometry_file(path)


# ----------------------------------------------------------------------------------------------
# Full model folders
# ----------------------------------------------------------------------------------------------


def save_model(net: nn.Module, out: str | Path, geometries: dict[str, Geometry], info: dict | None = None) -> Path:
    """Write ``net`` (any calofm model) with the cards of ``geometries`` it claims, atomically; ``info``:
    {file name: JSON object} of extra descriptive files (e.g. how the model was made)."""
    out = Path(out)
    config = net.config
    cards = {n: g for n, g in geometries.items() if n in config.geometry_slots}
    with atomic_folder(out) as tmp:
        hashes = write_cards(tmp, cards)
        config.geometry_cards = hashes  # exactly the cards in the folder; others are looked up by name
        with quiet_transformers():
            net.save_pretrained(tmp)  # safetensors; the config is checked before it is written
        for name, data in (info or {}).items():
            write_json(tmp / name, data)
        write_manifest(tmp, [WEIGHTS, *(card_file(n) for n in hashes)])
    return out


def check_model_folder(path: Path) -> dict:
    """The parsed config.json of a model folder whose files are all there and intact."""
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{path}: is a LoRA adapter, not a full model")
    config = read_json(path / "config.json")
    from calofm.models import FAMILIES

    if config.get("model_type") not in FAMILIES:
        raise DamagedError(path / "config.json", f"model_type is {config.get('model_type')!r}, not a calofm model "
                                                 f"({', '.join(FAMILIES)})")
    if not (path / WEIGHTS).is_file():
        pickled = " (pickled pytorch_model.bin files are not loaded)" if (path / "pytorch_model.bin").exists() else ""
        raise DamagedError(path / WEIGHTS, f"file not found{pickled}")
    verify_manifest(path, required=(WEIGHTS,))
    return config


def load_model(path_or_repo: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """(model, {name: Geometry of its stored cards}, folder) of a checked model folder or Hub id: a CaloDiTModel
    or a baseline family's model (``calofm.models.FAMILIES``, by config.json's model_type)."""
    from safetensors import SafetensorError

    from calofm.models import family_classes

    path = resolve(path_or_repo, revision)
    config_class, model_class = family_classes(check_model_folder(path)["model_type"])
    try:
        config = config_class.from_pretrained(path)
    except (ValueError, TypeError, OSError) as err:
        raise DamagedError(path / "config.json", first_line(err)) from None
    try:
        with quiet_transformers():
            net = model_class.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise DamagedError(path / WEIGHTS, f"cannot be loaded ({first_line(err)})") from None
    cards = {name: read_card(path, name, sha, path / "config.json") for name, sha in config.geometry_cards.items()}
    return net, cards, path


def require_calodit(net: nn.Module, spec, action: str) -> None:
    """Refuse a baseline family's model where only CaloDiT applies (adaptation, distillation, export)."""
    family = getattr(net.config, "model_type", "calodit")
    if family != "calodit":
        raise ValueError(f"{spec}: is a {family} baseline model; {action} works on CaloDiT models only")
