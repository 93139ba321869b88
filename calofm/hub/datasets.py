"""Shower datasets on the Hugging Face Hub: Parquet shards, one config per geometry.

A dataset repo written by ``calofm push-dataset``::

    README.md                                       dataset card
    data/<geometry>/data-0000k-of-0000n.parquet     the showers (columns as ``calofm.data.parquet``)
    data/<geometry>/calofm.json                     file attributes (geometry, particle, mesh, provenance)
    geometries/<geometry>.yaml                      the detector cards

A repo holds one geometry (its dataset card describes one detector); several files of it are concatenated in the
order given. ``datasets.load_dataset("ORG/NAME", split="train")`` reads it, and ``dataset_files("ORG/NAME[@REV]")``
turns it back into native .h5 files for training (``calofm adapt --data ORG/NAME``): one per geometry (a repo made
by other tools may hold several shard folders), converted once per snapshot commit into the calofm cache and
reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from calofm.data.parquet import META
from calofm.hub.resolve import fetch, is_repo_id, snapshot_commit, split_revision

log = logging.getLogger(__name__)
FILE_SUFFIXES = (".h5", ".hdf5", ".parquet")  # never a dataset repo id, even when the file is missing
SAME = ("particle", "energy_scale", "mesh_dr", "mesh_dz")  # attributes the files of one geometry must share


# ----------------------------------------------------------------------------------------------
# Upload side: native files -> staged Parquet shards, cards and dataset card
# ----------------------------------------------------------------------------------------------


def _open_checked(path: Path):
    """(ShowerFile, Geometry) of a fully checked native file that records a geometry with a card."""
    from calofm.data.format import ShowerFileError
    from calofm.data.io import ShowerFile, validate_file

    if not path.is_file():
        raise ShowerFileError(path, "file not found" if not path.exists() else "is not a file")
    validate_file(path)  # every value, before anything is staged
    reader = ShowerFile(path)
    if reader.geometry is None:
        reader.close()
        what = f"geometry '{reader.attrs.geometry}' has no card here" if reader.attrs.geometry else \
            "records no geometry"
        raise ShowerFileError(path, f"{what}; a dataset names its detector (convert or simulate with --geometry)")
    return reader, reader.geometry


def stage_dataset(files: list[Path], staged: Path, repo_id: str, shard_rows: int = 10_000) -> str:
    """Fill ``staged`` with the Parquet shards of ``files`` (``data/<geometry>/``), the geometry's card and the
    dataset card (README.md); returns the geometry's name. All files must be of one geometry."""
    from calofm.cards import same_card
    from calofm.data.format import ShowerFileError
    from calofm.data.parquet import export_parquet
    from calofm.hub.folders import write_cards
    from calofm.hub.modelcard import dataset_card

    if not files:
        raise ValueError("give at least one shower file")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, not {shard_rows}")
    if len({Path(f).resolve() for f in files}) < len(files):
        raise ValueError("a shower file is given twice")
    readers = []
    try:
        for path in files:
            reader, geometry = _open_checked(path)
            readers.append(reader)
            first = readers[0]
            if geometry.name != first.geometry.name or not same_card(geometry, first.geometry):
                raise ShowerFileError(path, f"geometry '{geometry.name}' differs from '{first.geometry.name}' of "
                                            f"{first.path} (a dataset repo holds one geometry: push each to its own)")
            for key in SAME:
                if getattr(first.attrs, key) != getattr(reader.attrs, key):
                    raise ShowerFileError(path, f"{key} is {getattr(reader.attrs, key)!r}, but "
                                                f"{getattr(first.attrs, key)!r} in {first.path}")
        geometry = readers[0].geometry
        _stage_geometry(readers, staged / "data" / geometry.name, staged / ".parts", shard_rows, export_parquet)
        shutil.rmtree(staged / ".parts")
        write_cards(staged, {geometry.name: geometry})
    finally:
        for reader in readers:
            reader.close()
    card = dataset_card([Path(f) for f in files], repo_id)
    card.save(str(staged / "README.md"))
    return geometry.name


def _stage_geometry(readers: list, out: Path, parts: Path, shard_rows: int, export_parquet) -> None:
    """The files of one geometry as one numbered run of shards plus calofm.json (attributes, provenance)."""
    exported = []
    for k, reader in enumerate(readers):
        parts.mkdir(parents=True, exist_ok=True)
        export_parquet(reader, parts / str(k), shard_rows=shard_rows, progress=False)
        exported.append(parts / str(k))
    shards = [s for folder in exported for s in sorted(folder.glob("*.parquet"))]
    out.mkdir(parents=True)
    for k, shard in enumerate(shards):
        os.replace(shard, out / f"data-{k:05d}-of-{len(shards):05d}.parquet")
    metas = [json.loads((folder / META).read_text()) for folder in exported]
    meta = dict(metas[0])
    for key in ("generator", "seed"):  # kept when all files agree
        if any(m.get(key) != meta.get(key) for m in metas):
            meta[key] = None
    meta["extra"] = {k: v for k, v in meta.get("extra", {}).items()
                     if all(m.get("extra", {}).get(k) == v for m in metas)}
    meta["rows"] = sum(m["rows"] for m in metas)
    meta["sources"] = [{"file": r.path.name, "rows": m["rows"], "generator": m.get("generator"),
                        "seed": m.get("seed")} for r, m in zip(readers, metas)]
    (out / META).write_text(json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------------------------
# Download side: a dataset repo -> native files for training
# ----------------------------------------------------------------------------------------------


def _shard_folders(snapshot: Path) -> list[Path]:
    """Folders holding Parquet shards (``data/<geometry>/`` for calofm's repos; any folder for others)."""
    return sorted({p.parent for p in snapshot.rglob("*.parquet") if ".cache" not in p.relative_to(snapshot).parts})


def _geometry_of(folder: Path, snapshot: Path) -> str:
    meta = folder / META
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("geometry")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            return name
    return folder.name if folder != snapshot else "showers"


def dataset_files(spec: str, revision: str | None = None, cache_dir: str | Path | None = None) -> list[Path]:
    """A Hub dataset repo (``ORG/NAME[@REV]``) as native .h5 files, one per geometry (``<geometry>.h5``),
    converted once per snapshot commit into ``<cache>/hub/<org>--<name>/<commit>/`` and reused."""
    from calofm.data.convert import parquet_to_native
    from calofm.data.io import ShowerFile
    from calofm.sim.cache import cache_dir as calofm_cache

    repo, rev = split_revision(str(spec), revision)
    snapshot = fetch(repo, rev, repo_type="dataset")
    commit = snapshot_commit(snapshot) or hashlib.sha1(str(snapshot.resolve()).encode()).hexdigest()
    folders = _shard_folders(snapshot)
    if not folders:
        raise ValueError(f"{spec}: the dataset repo holds no Parquet shards")
    root = calofm_cache(cache_dir) / "hub" / repo.replace("/", "--") / commit
    cards = [snapshot / "geometries"] if (snapshot / "geometries").is_dir() else []
    out = []
    for folder in folders:
        name = _geometry_of(folder, snapshot)
        path = root / f"{name}.h5"
        if path in out:
            raise ValueError(f"{spec}: two shard folders hold geometry '{name}'")
        if path.exists():  # written whole or not at all (parquet_to_native stages and renames)
            try:
                with ShowerFile(path, check=False, geometry_dirs=cards) as f:
                    if len(f) > 0:
                        log.info("reusing %s converted from %s", path, spec)
                        out.append(path)
                        continue
            except ValueError as err:
                log.warning("%s unusable (%s); converting again", path, err)
            path.unlink()
        log.info("converting %s (%s) to %s", spec, folder.relative_to(snapshot), path)
        parquet_to_native(folder, path, progress=False, geometry_dirs=cards)
        out.append(path)
    return out


def data_files(spec: str | Path, geometry: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Training files of ``geometry`` named by ``spec``: a local file as it is, or the file of that geometry in a
    Hub dataset repo (``ORG/NAME[@REV]``). A name with a file suffix (``data/odd.h5``) is always a local path."""
    if not is_repo_id(spec) or str(spec).lower().endswith(FILE_SUFFIXES):
        return [Path(spec).expanduser()]
    files = dataset_files(str(spec), cache_dir=cache_dir)
    mine = [f for f in files if f.stem == geometry]
    if not mine:
        have = ", ".join(f.stem for f in files)
        raise ValueError(f"{spec}: holds no showers of geometry '{geometry}' (it has {have})")
    return mine
