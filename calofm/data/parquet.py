"""Parquet shards and Hugging Face ``datasets``.

A folder of shards ``data-0000k-of-0000n.parquet`` with columns ``showers`` (fixed-size list of 6480 float32
in native C order), ``incident_energy``, ``incident_phi``, ``incident_theta``, plus ``calofm.json`` (the file
attributes). Plain tables from other tools with the same columns (variable-length lists) load too.
Every pyarrow error is turned into a one-line ``ShowerFileError`` naming the shard.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from calofm.config import first_line
from calofm.data.format import ENERGY, PHI, SHOWERS, THETA, FileAttrs, ShowerFileError, check_attrs, check_values
from calofm.data.io import ShowerFile, ShowerWriter, progress_disabled
from calofm.data.output import check_interrupted
from calofm.geometry import MESH_SHAPE

N_CELLS = int(np.prod(MESH_SHAPE))
COLUMNS = (SHOWERS, ENERGY, PHI, THETA)
META = "calofm.json"


def _features():
    from datasets import Features, List, Value

    return Features({
        SHOWERS: List(Value("float32"), length=N_CELLS),
        ENERGY: Value("float32"),
        PHI: Value("float32"),
        THETA: Value("float32"),
    })


@contextmanager
def arrow_errors(path: Path, what: str = "not a readable Parquet file"):
    """pyarrow's errors (which name no file) as one line naming the shard."""
    import pyarrow as pa

    try:
        yield
    except ShowerFileError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError) as err:
        raise ShowerFileError(path, f"{what} ({first_line(err)})") from None


def parquet_files(src: str | Path) -> list[Path]:
    src = Path(src)
    if not src.exists():
        raise ShowerFileError(src, "file not found")
    files = sorted(src.glob("*.parquet")) if src.is_dir() else [src]
    if not files:
        raise ShowerFileError(src, "no Parquet shards found")
    return files


@dataclass
class ParquetSource:
    files: list  # pyarrow ParquetFile per shard
    paths: list[Path]
    n: int
    attrs: FileAttrs


def open_parquet(src: str | Path, geometry: str | None = None) -> ParquetSource:
    """Shards, columns, row count (> 0) and recorded attributes, checked before anything is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path(src)
    meta = {}
    if src.is_dir() and (src / META).exists():
        try:
            meta = json.loads((src / META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShowerFileError(src / META, f"not readable JSON ({err})") from None
        if not isinstance(meta, dict):
            raise ShowerFileError(src / META, "must hold a JSON object of file attributes")
    paths = parquet_files(src)
    files = []
    for path in paths:
        with arrow_errors(path):
            pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = set(COLUMNS) - names
        if missing:
            raise ShowerFileError(path, f"missing column(s) {sorted(missing)}")
        kind = pf.schema_arrow.field(SHOWERS).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            raise ShowerFileError(path, f"'showers' has type {kind}, expected a list of {N_CELLS} numbers")
        files.append(pf)
    n = sum(pf.metadata.num_rows for pf in files)
    if n == 0:
        raise ShowerFileError(src, "holds no showers (N = 0)")
    try:
        attrs = FileAttrs(
            geometry=geometry or meta.get("geometry"), particle=meta.get("particle"),
            energy_scale=meta.get("energy_scale") or "visible", mesh_dr=meta.get("mesh_dr"),
            mesh_dz=meta.get("mesh_dz"), generator=meta.get("generator"), seed=meta.get("seed"),
            extra=meta.get("extra") or {},
        )
    except (TypeError, AttributeError) as err:
        raise ShowerFileError(src / META, f"unexpected attributes ({err})") from None
    check_attrs(src / META, attrs)
    return ParquetSource(files, paths, n, attrs)


def import_parquet(source: ParquetSource, out: Path, progress: bool = True) -> None:
    """Write the native file ``out`` from checked Parquet shards; bad values name the shard and its row."""
    with ShowerWriter(out, attrs=source.attrs) as w:
        for path, pf in tqdm(list(zip(source.paths, source.files)), disable=progress_disabled(progress),
                             desc="parquet shards"):
            row = 0
            with arrow_errors(path, "read failed"):
                batches = pf.iter_batches(batch_size=4096)
                for rb in batches:
                    check_interrupted()
                    values = rb.column(SHOWERS).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                    if values.size != len(rb) * N_CELLS:
                        raise ShowerFileError(path, f"'showers' rows must hold {N_CELLS} values")
                    showers = values.reshape(len(rb), *MESH_SHAPE)
                    cond = [rb.column(k).to_numpy(zero_copy_only=False).astype(np.float32) for k in COLUMNS[1:]]
                    check_values(path, showers, *cond, offset=row)
                    w.append(showers, *cond)
                    row += len(rb)


def export_parquet(reader: ShowerFile, out: Path, shard_rows: int = 10_000, progress: bool = True) -> None:
    """Write Parquet shards ``out/data-0000k-of-0000n.parquet`` plus ``calofm.json`` (file attributes)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets import utils as hf_tqdm

    out.mkdir()
    features = _features()
    n_shards = -(-reader.n // shard_rows)
    quiet = not hf_tqdm.are_progress_bars_disabled()
    if quiet:  # one bar per shard from `datasets` ("Casting the dataset") on top of ours
        hf_tqdm.disable_progress_bars()
    try:
        for k, (_, batch) in enumerate(reader.iter_chunks(rows=shard_rows, progress=progress, desc="parquet")):
            flat = batch[SHOWERS].reshape(len(batch[SHOWERS]), -1)
            table = pa.table({
                SHOWERS: pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), N_CELLS),
                ENERGY: pa.array(batch[ENERGY]), PHI: pa.array(batch[PHI]), THETA: pa.array(batch[THETA]),
            })
            Dataset(table).cast(features).to_parquet(str(out / f"data-{k:05d}-of-{n_shards:05d}.parquet"))
    finally:
        if quiet:
            hf_tqdm.enable_progress_bars()
    meta = {k: v for k, v in vars(reader.attrs).items() if k != "extra"}
    meta["extra"] = {k: _json_value(v) for k, v in reader.attrs.extra.items()}
    meta["rows"] = reader.n
    (out / META).write_text(json.dumps(meta, indent=1, default=str))


def _json_value(value):
    """numpy attribute values as plain JSON data (they come back as the same h5 attributes)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool | list) or value is None else str(value)


def load_parquet_dataset(src: str | Path, streaming: bool = False):
    """The shards as a Hugging Face ``datasets`` object (``streaming=True`` for an IterableDataset)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=[str(p) for p in parquet_files(src)], split="train",
                        features=_features(), streaming=streaming)
