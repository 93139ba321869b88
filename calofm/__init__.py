"""calofm: a foundation model for calorimeter shower simulation.

Data -> geometry -> simulator -> model -> diffusion -> training -> sampling -> evaluation -> hub.
"""

__version__ = "0.1.0"


def load(path_or_repo, device=None, dtype=None):
    """A trained model (folder, LoRA adapter folder or Hub repo id) ready to ``sample``; see calofm.generate."""
    import torch

    from calofm.generate import load as _load

    return _load(path_or_repo, device=device, dtype=dtype or torch.float32)
