"""calofm: a foundation model for calorimeter shower simulation.

Geometry -> data -> simulator -> models/diffusion/preprocess -> loading (calofm.hub) -> training, adaptation,
generation, evaluation -> command line (calofm.cli, calofm.commands).
"""

__version__ = "0.1.0"

from calofm.autoregister import install as _install_auto_registration  # noqa: E402

_install_auto_registration()  # AutoModel.from_pretrained(...) knows CaloDiT once transformers is imported


def load(path_or_repo, device=None, dtype=None, revision=None):
    """A trained model (folder, LoRA adapter folder or Hub repo id ``ORG/NAME[@REV]``) ready to ``sample``;
    see calofm.generate. ``revision``: a Hub branch, tag or commit."""
    import torch

    from calofm.generate import load as _load

    return _load(path_or_repo, device=device, dtype=dtype or torch.float32, revision=revision)
