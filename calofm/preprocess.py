"""Invertible shower preprocessing: MeV cell energies <-> the model space the diffusion works in.

forward:  y = (log(x / u + eps) - mean) / std     x >= 0 in MeV, u = 1 MeV ("absolute") or E_inc ("fraction")
inverse:  x = max(u (exp(y std + mean) - eps), 0), then cells below the per-sample readout threshold -> 0

Default "absolute" (CaloDiT-2's log(x_GeV + 1e-6), in MeV units, eps = 1e-3 MeV): the readout threshold
is a fixed energy in MeV (5e-4 MeV for most detectors), so with absolute units the boundary between
empty and barely-hit cells sits at one level of y for every incident energy. Dividing by E_inc first
("fraction") makes the hit-cell spectrum nearly energy-independent, but over 1 GeV - 1 TeV it moves
that boundary by ln(1000) ~ 6.9 in y, and a fixed eps swallows hits below eps E_inc (1 MeV at 1 TeV)
into the empty-cell floor, which damages the number of hits and the low-energy cell spectrum. The
energy dependence of the hit cells is a shift the model's energy conditioning represents directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

VERSION = 1


class ShowerPreprocessor:
    """The transform above with a global mean/std fitted on training data (``fit``) and stored as JSON."""

    def __init__(
        self,
        mode: Literal["absolute", "fraction"] = "absolute",
        eps: float | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        count: int = 0,
    ):
        if mode not in ("absolute", "fraction"):
            raise ValueError(f"preprocessing mode must be 'absolute' or 'fraction', got {mode!r}")
        eps = (1e-3 if mode == "absolute" else 1e-7) if eps is None else float(eps)
        if not eps > 0 or not std > 0 or not math.isfinite(mean):
            raise ValueError(f"preprocessing needs eps > 0, std > 0 and a finite mean (eps={eps}, std={std})")
        self.mode, self.eps, self.mean, self.std, self.count = mode, eps, float(mean), float(std), int(count)

    # -- transforms ---------------------------------------------------------------------------
    def _unit(self, x: torch.Tensor, energy: torch.Tensor | None) -> torch.Tensor | float:
        """Energy unit per sample, (B, 1, ..., 1) MeV or 1.0."""
        if self.mode == "absolute":
            return 1.0
        if energy is None:
            raise ValueError("preprocessing mode 'fraction' needs the incident energy (MeV)")
        return torch.as_tensor(energy, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))

    def forward(self, showers: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
        """Showers (B, ...) MeV, incident energy (B,) MeV -> model space, same shape, float32 or wider."""
        x = showers if showers.dtype in (torch.float32, torch.float64) else showers.float()
        if (x < 0).any():
            raise ValueError("showers must be non-negative energies in MeV")
        return (torch.log(x / self._unit(x, energy) + self.eps) - self.mean) / self.std

    __call__ = forward

    def inverse(
        self, y: torch.Tensor, energy: torch.Tensor | None = None, threshold: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        """Model space -> MeV (B, ...), non-negative; cells below ``threshold`` (MeV, scalar or (B,)) -> 0."""
        y = y if y.dtype in (torch.float32, torch.float64) else y.float()
        x = (torch.exp(y * self.std + self.mean) - self.eps).clamp_min(0.0) * self._unit(y, energy)
        threshold = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
        if threshold.ndim:
            threshold = threshold.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(x >= threshold, x, torch.zeros_like(x))

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Any]) -> ShowerPreprocessor:
        """Streamed mean/std of log(x/u + eps) over all cells; batches are dicts (showers, energy MeV) or pairs.

        Chan et al.'s pairwise update in float64: memory is one batch, the result independent of batching.
        """
        n, mean, m2 = 0, 0.0, 0.0
        self.mean, self.std = 0.0, 1.0  # forward() with identity stats gives the raw log values
        for batch in batches:
            showers, energy = (batch["showers"], batch.get("energy")) if isinstance(batch, Mapping) else batch
            v = self.forward(torch.as_tensor(showers).double(), energy).flatten()  # log in float64 too
            nb, mb = v.numel(), v.mean().item()
            m2b = (v - mb).square().sum().item()
            delta, total = mb - mean, n + nb
            mean += delta * nb / total
            m2 += m2b + delta**2 * n * nb / total
            n = total
        if n < 2:
            raise ValueError("fit needs at least two cells of data")
        std = math.sqrt(m2 / n)
        if not std > 0:
            raise ValueError("fit: the data has zero spread in model space")
        self.mean, self.std, self.count = mean, std, n
        return self

    # -- JSON-able state (lives in CaloDiTConfig.preprocessing) --------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "mode": self.mode,
            "eps": self.eps,
            "mean": self.mean,
            "std": self.std,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ShowerPreprocessor:
        state = dict(state)
        if state.pop("version", None) != VERSION:
            raise ValueError(f"preprocessing state: expected version {VERSION}, got {state!r}")
        unknown = set(state) - {"mode", "eps", "mean", "std", "count"}
        if unknown or not {"mode", "eps", "mean", "std"} <= set(state):
            raise ValueError(f"preprocessing state: unknown keys {sorted(unknown)} or missing mode/eps/mean/std")
        return cls(**state)

    def __repr__(self) -> str:
        return f"ShowerPreprocessor(mode={self.mode!r}, eps={self.eps:g}, mean={self.mean:.4f}, std={self.std:.4f})"
