"""Geometry cards as data that travels: their bytes and sha256, the copy a shower file carries, and when two
cards describe the same detector.

A model or adapter folder stores the cards of its geometries (``calofm.hub.folders``). A shower file stores
its card in two attributes, ``geometry_card`` (the card's text) and ``geometry_card_sha256``: generated files
always, simulated and imported files when the card is not a built-in one. A reader that finds no card of that
name (built in, ``--geometry-dir``) uses the file's own; one that does find a card requires the two to agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import yaml

from calofm.config import ConfigError, parse_yaml, to_dict
from calofm.geometry import Geometry, GeometryError, builtin_dir, geometry_from_data

CARD_ATTR = "geometry_card"
CARD_SHA_ATTR = "geometry_card_sha256"


def card_bytes(geometry: Geometry) -> bytes:
    """The card exactly as read (its file), or written out from the parsed card when it has no file."""
    if geometry.source is not None and Path(geometry.source).is_file():
        return Path(geometry.source).read_bytes()
    return yaml.safe_dump(to_dict(geometry.card), sort_keys=False).encode()


def card_sha256(geometry: Geometry) -> str:
    return hashlib.sha256(card_bytes(geometry)).hexdigest()


def is_builtin(geometry: Geometry) -> bool:
    """True when ``geometry``'s card is byte for byte the built-in card of its name."""
    builtin = builtin_dir() / f"{geometry.name}.yaml"
    return builtin.is_file() and builtin.read_bytes() == card_bytes(geometry)


def card_attrs(geometry: Geometry, always: bool = False) -> dict[str, str]:
    """The file attributes that carry ``geometry``'s card: for a card that is not built in (or ``always``)."""
    if not always and is_builtin(geometry):
        return {}
    return {CARD_ATTR: card_bytes(geometry).decode(), CARD_SHA_ATTR: card_sha256(geometry)}


def card_from_text(text: str, where: str) -> Geometry:
    """A validated ``Geometry`` from a card's text (no file behind it); errors start with ``where``."""
    try:
        return geometry_from_data(parse_yaml(text, where), where)
    except ConfigError as err:
        raise GeometryError(str(err)) from None


def _detector(geometry: Geometry):
    # the slot is a label a model assigns, title and description are prose: neither changes the detector
    return dataclasses.replace(geometry.card, slot=0, title="", description="")


def same_card(a: Geometry, b: Geometry) -> bool:
    """Whether two cards describe the same detector: every field equal except slot, title and description."""
    return _detector(a) == _detector(b)
