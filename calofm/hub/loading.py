"""One entry point for every trained network calofm loads: a model folder, an adapter folder or a Hub repo.

``load_network`` resolves the path or repo id (``calofm.hub.resolve``), checks the files (``calofm.hub.folders``)
and, for a LoRA adapter, fetches and verifies its base and routes the adapter's geometry through the adapted
weights (``calofm.hub.adapters``). Generation, adaptation, evaluation and the command line all load here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from calofm.hub.adapters import open_adapter
from calofm.hub.folders import load_model
from calofm.hub.resolve import resolve


def is_adapter(folder: Path) -> bool:
    """A LoRA adapter folder (peft's adapter_config.json). A full fine-tune also records its base in
    calofm_adapter.json but is a complete model."""
    return (Path(folder) / "adapter_config.json").exists()


def load_network(path_or_repo: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """(network F, its CaloDiTConfig, {geometry: card stored with the model}) of a model folder, adapter
    folder or Hub id (``ORG/NAME[@REV]``). An adapter is routed: its geometry through the adapted weights,
    every base geometry through the untouched base."""
    path = resolve(path_or_repo, revision)
    if is_adapter(path):
        net, cards = open_adapter(path, dtype=dtype, mode="fast")
        return net, net.config, cards
    net, cards, _ = load_model(path, dtype=dtype)
    return net, net.config, cards
