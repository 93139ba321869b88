"""``calofm_training.json``: how a saved model was made, for its model card and for anyone who reuses it.

Written beside the weights when a run finishes: calofm version, kind of run (pretrained, lora, full,
scratch), steps, global batch, samples seen, processes, precision, wall time of the run's last segment, and per
geometry the training and validation showers with the provenance of every file (simulator tag and seed, or
the file's name). Local paths are not recorded: only file names, so the record can be published.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from calofm.config import to_dict

RECORD = "calofm_training.json"


def training_record(cfg, data, kind: str, processes: int, mixed_precision: str, wall_seconds: float,
                    start_step: int) -> dict:
    """The record of a finished run (``cfg`` its TrainConfig, ``data`` its RunData)."""
    from calofm import __version__

    geometries: dict[str, dict] = {}
    for src, f in zip(data.train.sources, data.train.files):
        entry = geometries.setdefault(src.geometry.name, {"train_showers": 0, "val_showers": 0, "sources": []})
        rows = (len(f) if src.stop is None else src.stop) - src.start
        entry["train_showers"] += rows
        entry["sources"].append({"file": Path(src.path).name, "rows": rows, "generator": f.attrs.generator,
                                 "seed": f.attrs.seed})
    for name, val in data.val.items():
        geometries.setdefault(name, {"train_showers": 0, "val_showers": 0, "sources": []})["val_showers"] = len(val)
    config = public_config(to_dict(cfg))
    return {
        "calofm_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kind": kind,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "samples_seen": cfg.steps * cfg.batch_size,
        "processes": processes,
        "mixed_precision": mixed_precision,
        "wall_seconds": round(wall_seconds, 1),
        "resumed_from_step": start_step or None,
        "geometries": geometries,
        "config": config,
    }


def public_config(config: dict) -> dict:
    """A TrainConfig dict without the user's local paths: file names instead of paths, no cache or card folders,
    the base model as its Hub id or folder name."""
    from calofm.hub.resolve import is_repo_id

    config.pop("output_dir", None)
    data = config.get("data", {})
    data.pop("cache_dir", None)
    data["geometry_dirs"] = [Path(d).name for d in data.get("geometry_dirs", [])]
    for source in data.get("sources", []):
        source["files"] = [f if is_repo_id(f) else Path(f).name for f in source.get("files", [])]
        if str(source.get("geometry", "")).endswith((".yaml", ".yml")):
            source["geometry"] = Path(source["geometry"]).name
    model = config.get("model", {})
    if model.get("init_from") and not is_repo_id(model["init_from"]):
        model["init_from"] = Path(model["init_from"]).name
    return config
