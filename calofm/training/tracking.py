"""Offline experiment tracking: a JSON-lines tracker for Accelerate (TensorBoard is added when `tensorboard`
or `tensorboardX` is installed: `pip install calofm[tensorboard]`)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

from calofm.data.output import write_text_atomic


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per ``log`` call to ``<logging_dir>/metrics.jsonl``.

    The file is opened in ``start`` (called by ``init_trackers``), not in ``__init__``: decorating
    ``__init__`` with ``on_main_process`` would build Accelerate's state before the Accelerator
    and silently turn a multi-process run into single-process ones (seen with accelerate 1.15.0).
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name, self.logging_dir = run_name, Path(logging_dir)
        self.file = None

    @on_main_process
    def start(self):
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.logging_dir / "metrics.jsonl", "a")

    @property
    def tracker(self):
        return self.file

    @on_main_process
    def store_init_configuration(self, values: dict):
        self.file.write(json.dumps({"config": values}, default=str) + "\n")
        self.file.flush()

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.file.write(json.dumps({"step": step, **values}, default=float) + "\n")
        self.file.flush()

    @on_main_process
    def finish(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def trackers(output_dir: str | os.PathLike, tensorboard: bool = True) -> list:
    out = [JsonlTracker("calofm", Path(output_dir) / "logs")]
    if tensorboard and any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX")):
        out.append("tensorboard")
    return out


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only the records a run starting at ``step`` will not log again: those up to ``step`` when it
    resumes from a checkpoint, none when it starts over (step 0). Rewritten through a temporary file."""
    path = Path(path)
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [json.dumps(r) for r in records if step > 0 and ("config" in r or r["step"] <= step)]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The logged records of a run (``<output_dir>/logs/metrics.jsonl``), without the config line."""
    lines = Path(path).read_text().splitlines()
    return [r for r in map(json.loads, lines) if "config" not in r]
