"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for everything else.

    <output_dir>/checkpoints/checkpoint_<step>/
        model.safetensors      every tensor of the (unwrapped) training network
        optimizer.safetensors  the optimiser's per-parameter state, keys "<parameter index>.<name>"
        ema.safetensors        the EMA shadow weights
        state.json             step, optimiser hyper-parameters, LR schedule, EMA counters, loss scaler
        calofm_checksums.json  sha256 of the four files above, written last

A checkpoint is written as ``checkpoint_<step>.partial`` and renamed when complete. Resuming verifies the
newest one completely (files, checksums, keys and shapes) before changing any state; a damaged one is
skipped with a warning in favour of the previous complete one. Nothing is unpickled, so a run folder from
someone else cannot run code. Random-generator states are not stored: every random draw of training is
keyed by (seed, step) (calofm.training.loop), so these files are all an exact resume needs.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from calofm.data.integrity import (
    DamagedError,
    load_tensors,
    read_json,
    verify_manifest,
    write_json,
    write_manifest,
)
from calofm.data.output import atomic_folder

log = logging.getLogger(__name__)
FORMAT = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "ema.safetensors")
STATE = "state.json"
_NAME = re.compile(r"^checkpoint_(\d+)$")


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that belongs to another model or optimiser configuration."""


@dataclass
class Payload:
    folder: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    ema: dict[str, torch.Tensor]
    state: dict


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, ema, scaler=None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints."""
    root = Path(root)
    final = root / f"checkpoint_{step}"
    opt = optimizer.state_dict()
    opt_tensors, opt_values = {}, {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            (opt_tensors if torch.is_tensor(value) else opt_values)[f"{index}.{name}"] = value
    state = {
        "format": FORMAT, "step": int(step),
        "optimizer": {"param_groups": opt["param_groups"], "values": opt_values},
        "scheduler": scheduler.state_dict(),
        "ema": {"decay": ema.decay, "updates": ema.updates},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    root.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as tmp:
        save_file(_cpu(model.state_dict()), tmp / "model.safetensors")
        save_file(_cpu(opt_tensors), tmp / "optimizer.safetensors")
        save_file(_cpu(ema.shadow), tmp / "ema.safetensors")
        write_json(tmp / STATE, state)
        write_manifest(tmp, [*TENSOR_FILES, STATE])
    for _, old in checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(folder: Path) -> Payload:
    """Every file of a checkpoint, verified; raises DamagedError naming the first bad file."""
    legacy = sorted(p.name for p in folder.glob("*.pkl")) + sorted(p.name for p in folder.glob("*.bin"))
    if legacy:
        raise DamagedError(folder / legacy[0], "pickle from an older calofm checkpoint format, which is never loaded")
    verify_manifest(folder, required=(*TENSOR_FILES, STATE), need_manifest=True)
    state = read_json(folder / STATE)
    try:
        if state["format"] != FORMAT:
            raise DamagedError(folder / STATE, f"checkpoint format {state['format']!r}, expected {FORMAT}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DamagedError(folder / STATE, f"step {step!r} is not a step number")
        groups, values = state["optimizer"]["param_groups"], state["optimizer"]["values"]
        state["scheduler"], state["ema"]["decay"], state["ema"]["updates"]  # noqa: B018 - presence check
    except (KeyError, TypeError) as err:
        raise DamagedError(folder / STATE, f"missing or malformed entry {err}") from None
    tensors = {name: load_tensors(folder / name) for name in TENSOR_FILES}
    opt_state: dict[int, dict] = {}
    for key, value in [*tensors["optimizer.safetensors"].items(), *values.items()]:
        index, _, name = key.partition(".")
        opt_state.setdefault(int(index), {})[name] = value
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return Payload(folder, step, tensors["model.safetensors"], {"state": opt_state, "param_groups": groups},
                   tensors["ema.safetensors"], state)


def _check_matches(p: Payload, model, optimizer, ema) -> None:
    """Keys and shapes against this run's objects, before any of them is changed."""
    def compare(what, saved: dict, ours: dict):
        missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
        shapes = [k for k in set(saved) & set(ours) if tuple(saved[k].shape) != tuple(ours[k].shape)]
        if missing or extra or shapes:
            detail = "; ".join(f"{n}: {', '.join(v[:3])}" for n, v in
                               (("missing", missing), ("unexpected", extra), ("other shape", sorted(shapes))) if v)
            raise CheckpointMismatchError(f"{p.folder}: {what} does not match this run ({detail}); it belongs to "
                                          f"another configuration: use another output_dir")

    compare("model.safetensors", p.model, model.state_dict())
    compare("ema.safetensors", p.ema, ema.shadow)
    ours = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in ours] != [len(g.get("params", ())) for g in p.optimizer["param_groups"]]:
        raise CheckpointMismatchError(f"{p.folder}: optimizer parameter groups do not match this run")


def load_latest(root: str | Path, model, optimizer, scheduler, ema, scaler=None) -> tuple[int, Path | None]:
    """Restore the newest intact checkpoint under ``root``; returns (its step, its folder), or (0, None)
    when there is none. Damaged ones are skipped with a warning; if every one is damaged, that is an error."""
    root = Path(root)
    for stale in root.glob("checkpoint_*.partial") if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)  # a save cut short: never complete, never used
    found, damaged = checkpoints(root), []
    for _, folder in found:
        try:
            payload = read_checkpoint(folder)
        except DamagedError as err:
            damaged.append(err)
            log.warning("%s; trying the previous checkpoint", err)
            continue
        _check_matches(payload, model, optimizer, ema)
        model.load_state_dict(payload.model, strict=True)
        optimizer.load_state_dict(payload.optimizer)
        scheduler.load_state_dict(payload.state["scheduler"])
        ema.load_state_dict({**payload.state["ema"], "shadow": payload.ema})
        if scaler is not None and payload.state.get("scaler"):
            scaler.load_state_dict(payload.state["scaler"])
        if damaged:
            log.warning("resuming from %s (step %d): the newer checkpoint(s) were damaged", folder, payload.step)
        return payload.step, folder
    if damaged:
        first = damaged[0]
        raise DamagedError(first.path, f"{first.problem}; no intact checkpoint left in {root} to resume from "
                                       f"(move the folder away to start again)")
    return 0, None


class GracefulStop:
    """Ctrl-C in a one-process run: the first one asks the loop to finish its step, save a checkpoint and
    stop (``requested``); a second one interrupts at once. Several processes keep the default handling
    (the launcher stops them); they resume from their last periodic checkpoint."""

    def __init__(self, enabled: bool = True):
        import os
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested, self._pid, self._old = False, os.getpid(), None

    def __enter__(self) -> GracefulStop:
        return self

    def arm(self) -> None:
        """Start catching Ctrl-C (right before the loop: data preparation stays interruptible at once)."""
        import signal

        if self.enabled and self._old is None:
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        import os
        import signal
        import sys

        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        self.requested = True
        signal.signal(signal.SIGINT, self._old)  # a second Ctrl-C interrupts at once
        print("\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
