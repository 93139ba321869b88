"""LoRA adapter folders: written with their card and checksums, loaded on their verified base.

    <adapter>/adapter_config.json, adapter_model.safetensors   peft's files
    <adapter>/calofm_adapter.json     base (as given, absolute and relative path, sha256 of its weights),
                                      geometry, slot, readout threshold, brightest cell, card, counts
    <adapter>/geometries/<name>.yaml  the card of the adapted geometry
    <adapter>/calofm_checksums.json   sha256 of the adapter weights and the card

On its base an adapter is either routed (``AdapterRouter``: rows of the adapted geometry go through the
adapted network, every other geometry through the untouched base, so the base geometries are exactly the
base model) or merged into a standalone network that claims the adapted geometry only.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

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
from calofm.geometry import MESH_SHAPE, Geometry
from calofm.hub.folders import (
    WEIGHTS,
    card_file,
    load_model,
    quiet_transformers,
    read_card,
    require_calodit,
    write_cards,
)
from calofm.hub.resolve import resolve, snapshot_commit

ADAPTER_FILE = "calofm_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = 2  # 2: checksums and the card are stored with the adapter
REQUIRED = {"geometry": str, "slot": int, "threshold": (int, float), "fingerprint": str, "base": str}
OPTIONAL = {"cell_max": (int, float), "profile": dict, "base_path": str, "base_relative": str, "format": int,
            "base_revision": str}


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls transformers' deprecated ``is_gradient_checkpointing``: hide that FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def fingerprint(model_dir: Path) -> str:
    """sha256 of the base weights file: an adapter is only valid on exactly this base."""
    return sha256_file(Path(model_dir) / WEIGHTS)


def load_base(base: str | Path, dtype=torch.float32, revision: str | None = None):
    """(network, its cards, folder) of a base model fit for adaptation, checked; ``base`` a folder or Hub id."""
    path = resolve(base, revision)
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{base}: is an adapter, not a base model (merge it first with --merge)")
    net, cards, path = load_model(path, dtype=dtype)
    require_calodit(net, base, "calofm adapt")
    if tuple(net.config.mesh_shape) != MESH_SHAPE:
        raise ValueError(f"{base}: mesh {tuple(net.config.mesh_shape)} does not match the data mesh {MESH_SHAPE}")
    if not net.config.preprocessing:
        raise ValueError(f"{base}: has no preprocessing statistics (not a trained calofm model)")
    return net, cards, path


def save_adapter(peft_net: nn.Module, out: Path, info: dict, geometry: Geometry) -> None:
    """The adapter folder, written atomically (an interrupted save leaves the previous folder, or none)."""
    with atomic_folder(out) as tmp:
        with quiet_peft(), quiet_transformers():
            peft_net.save_pretrained(tmp)  # safetensors
        sha = write_cards(tmp, {geometry.name: geometry})[geometry.name]
        write_json(tmp / ADAPTER_FILE, {**info, "format": FORMAT,
                                        "card": {"file": card_file(geometry.name), "sha256": sha}})
        write_manifest(tmp, [ADAPTER_WEIGHTS, card_file(geometry.name)])


def read_adapter(path: Path) -> tuple[dict, Geometry | None]:
    """The checked ``calofm_adapter.json`` of an adapter folder and its stored card (None for old adapters)."""
    if not (path / ADAPTER_FILE).exists():
        raise ValueError(f"{path}: {ADAPTER_FILE} is missing (not a calofm adapter)")
    info = read_json(path / ADAPTER_FILE)
    for key, kind in (*REQUIRED.items(), *OPTIONAL.items()):
        if key not in info and key in REQUIRED:
            raise DamagedError(path / ADAPTER_FILE, f"missing entry '{key}'")
        if info.get(key) is not None and (isinstance(info[key], bool) or not isinstance(info[key], kind)):
            raise DamagedError(path / ADAPTER_FILE, f"entry '{key}' = {info[key]!r} has the wrong type")
    read_json(path / "adapter_config.json")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise DamagedError(path / ADAPTER_WEIGHTS, "file not found (the adapter's weights)")
    verify_manifest(path, required=(ADAPTER_WEIGHTS,), need_manifest=info.get("format", 1) >= FORMAT)
    card = info.get("card")
    if card is None:
        return info, None
    if not isinstance(card, dict) or not isinstance(card.get("sha256"), str):
        raise DamagedError(path / ADAPTER_FILE, "entry 'card' is malformed")
    return info, read_card(path, info["geometry"], card["sha256"], path / ADAPTER_FILE)


def base_of(adapter: Path, info: dict) -> tuple[str, str | None]:
    """(where, revision) of an adapter's base model: next to the adapter as it was when trained, at its
    absolute path, else as given at training time: a Hub repo id at the recorded commit, or a path from the
    working directory."""
    for key, root in (("base_relative", adapter), ("base_path", Path("/"))):
        if isinstance(info.get(key), str) and (root / info[key]).is_dir():
            return str(root / info[key]), None
    return info["base"], info.get("base_revision")


def base_record(base: str, folder: Path) -> dict:
    """How an adapter records its base: as given, its local folder (absolute) unless that is a Hub cache
    snapshot, the Hub commit if it came from the Hub, and the fingerprint of its weights."""
    from calofm.hub.resolve import is_repo_id, split_revision

    commit = snapshot_commit(folder)
    repo = split_revision(base)[0] if is_repo_id(base) else base
    return {"base": repo, "base_path": None if commit else str(Path(folder).resolve()),
            "base_revision": commit, "fingerprint": fingerprint(folder)}


class WithoutAdapter(nn.Module):
    """A PeftModel with its adapter switched off: exactly the base network (weights shared); ``energy_net``
    likewise for the factorised variant's energy model."""

    def __init__(self, peft_model: nn.Module, part: str | None = None):
        super().__init__()
        self.peft, self.part = peft_model, part

    @property
    def energy_net(self) -> nn.Module:
        return WithoutAdapter(self.peft, "energy_net")

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            net = self.peft if self.part is None else getattr(self.peft, self.part)
            return net(*args, **kwargs)


class AdapterRouter(nn.Module):
    """The network of an adapter on its base: rows whose geometry slot is the adapted one go through
    ``adapted``, all other rows through ``base``. ``config`` claims the base's geometries plus the new one.
    For the factorised variant ``energy_net`` routes the energy model's rows the same way."""

    def __init__(self, base: nn.Module, adapted: nn.Module, slot: int, config, part: str | None = None):
        super().__init__()
        self.base, self.adapted, self.slot, self.config, self.part = base, adapted, slot, config, part

    @property
    def energy_net(self) -> nn.Module:
        if self.part is not None or not getattr(self.config, "factorised", False):
            raise AttributeError("energy_net")
        return AdapterRouter(self.base.energy_net, self.adapted.energy_net, self.slot, self.config, "energy_net")

    def forward(self, x, c_noise, geometry, **cond) -> torch.Tensor:
        mine = geometry == self.slot
        if bool(mine.all()):
            return self.adapted(x, c_noise, geometry=geometry, **cond)
        if not bool(mine.any()):
            return self.base(x, c_noise, geometry=geometry, **cond)
        out = None
        for net, rows in ((self.adapted, mine), (self.base, ~mine)):
            part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
            y = net(x[rows], c_noise[rows], geometry=geometry[rows], **part)
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[rows] = y.to(out.dtype)
        return out


def open_adapter(path: str | Path, dtype=torch.float32, mode: str = "fast"):
    """(network, {geometry: card}) of an adapter folder on its base.

    ``mode``: "merged" - a standalone network claiming the adapted geometry only; "fast" - an
    ``AdapterRouter`` over the untouched base and a merged copy (generation); "unmerged" - an
    ``AdapterRouter`` over the PeftModel itself (``.adapted``), base rows with the adapter disabled.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    path = Path(path)
    info, card = read_adapter(path)
    where, revision = base_of(path, info)
    base, cards, base_path = load_base(where, dtype=dtype, revision=revision)
    if fingerprint(base_path) != info["fingerprint"]:
        raise ValueError(f"{path}: adapter was trained on a different base model than {info['base']} "
                         f"(weights fingerprint differs)")
    name, slot = info["geometry"], int(info["slot"])
    claim = dict(slot=slot, threshold=float(info["threshold"]), cell_max=info.get("cell_max"),
                 card_sha256=info["card"]["sha256"] if card is not None else None, profile=info.get("profile"))
    if card is not None:
        cards = {**cards, name: card}
    try:
        with quiet_peft(), quiet_transformers():
            peft_model = PeftModel.from_pretrained(base if mode == "unmerged" else copy.deepcopy(base), path)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise DamagedError(path / ADAPTER_WEIGHTS, f"cannot be loaded on its base ({first_line(err)})") from None
    except (ValueError, KeyError, TypeError, IndexError) as err:
        # peft uses adapter_config.json unchecked: a wrong type ("r": "8") is a TypeError, a token index beyond the
        # embedding an IndexError, an unknown peft_type a KeyError
        raise DamagedError(path / "adapter_config.json", f"does not fit its base ({first_line(err)})") from None
    peft_model.eval()
    if mode == "unmerged":
        config = copy.deepcopy(base.config)
        config.add_geometry(name, **claim)
        return AdapterRouter(WithoutAdapter(peft_model), peft_model, slot, config), cards
    merged = peft_model.merge_and_unload()
    merged.config.add_geometry(name, **claim)
    if mode == "merged":
        merged.config.keep_geometries([name])  # its weights are no longer the base's for any other geometry
        return merged, cards
    if mode != "fast":
        raise ValueError(f"mode must be 'merged', 'fast' or 'unmerged', not {mode!r}")
    config = copy.deepcopy(merged.config)
    return AdapterRouter(base.eval(), merged, slot, config), cards


def load_adapted(path: str | Path, dtype=torch.float32, merged: bool = True) -> nn.Module:
    """An adapter on its base: merged into a standalone network that claims only the adapted geometry, or
    (``merged=False``) an ``AdapterRouter`` over the unmerged PeftModel that leaves base geometries exact."""
    return open_adapter(path, dtype=dtype, mode="merged" if merged else "unmerged")[0]
