"""Invertible shower preprocessing: MeV cell energies <-> the model space the diffusion works in.

forward:  y = (log(x / u + eps) - mean) / std     x >= 0 in MeV, u = E_inc ("fraction") or 1 MeV ("absolute")
inverse:  x = u (exp(y std + mean) - eps), then cells below max(noise_cut eps u, readout threshold) -> 0

Default "fraction", eps = 1e-6, noise_cut = 2, chosen by measurement (docs/pretraining.md): the small
model trained 500 steps on Par04 Si-W/ODD/ILD reproduced the median total energy at 5/50/500 GeV to
0.98/1.30/1.24 of the simulator with it, against 28/17/9.8 with "absolute" (eps = 1e-3 MeV, CaloDiT-2's
log(x_GeV + 1e-6)) and 64/90/21 or 2.6/2.9/1.9 with eps = 1e-9 or 1e-7. Dividing by E_inc makes the
hit-cell spectrum nearly energy-independent; eps sets where "empty" sits below it, and the network's
residual noise in that floor, amplified by exp, is what inflated the energy of the other choices.
The noise cut removes the cells the model cannot tell from empty (< 2 eps E_inc); it trades fake hits
at low energy against lost soft hits at high energy (hit-count ratios in docs/pretraining.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

VERSION = 2  # 2 added noise_cut; version-1 states load with noise_cut = 0


class ShowerPreprocessor:
    """The transform above with a global mean/std fitted on training data (``fit``) and stored as JSON."""

    def __init__(
        self,
        mode: Literal["absolute", "fraction"] = "fraction",
        eps: float | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        count: int = 0,
        noise_cut: float = 0.0,
    ):
        if mode not in ("absolute", "fraction"):
            raise ValueError(f"preprocessing mode must be 'absolute' or 'fraction', got {mode!r}")
        eps = (1e-3 if mode == "absolute" else 1e-6) if eps is None else float(eps)
        if not eps > 0 or not std > 0 or not math.isfinite(mean) or not 0 <= noise_cut < math.inf:
            raise ValueError(f"preprocessing needs eps > 0, std > 0, a finite mean and noise_cut >= 0 "
                             f"(eps={eps}, std={std}, mean={mean}, noise_cut={noise_cut})")
        self.mode, self.eps, self.mean, self.std, self.count = mode, eps, float(mean), float(std), int(count)
        self.noise_cut = float(noise_cut)  # inverse: cells below noise_cut * eps * u are empty

    # -- transforms ---------------------------------------------------------------------------
    def unit(self, x: torch.Tensor, energy: torch.Tensor | None) -> torch.Tensor | float:
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
        return (torch.log(x / self.unit(x, energy) + self.eps) - self.mean) / self.std

    __call__ = forward

    def inverse(
        self, y: torch.Tensor, energy: torch.Tensor | None = None, threshold: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        """Model space -> MeV (B, ...), non-negative; cells below the noise cut or ``threshold`` (MeV, scalar
        or (B,)) -> 0."""
        y = y if y.dtype in (torch.float32, torch.float64) else y.float()
        unit = self.unit(y, energy)
        x = (torch.exp(y * self.std + self.mean) - self.eps).clamp_min(0.0) * unit
        threshold = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
        if threshold.ndim:
            threshold = threshold.reshape(-1, *([1] * (x.ndim - 1)))
        noise = torch.as_tensor(self.noise_cut * self.eps * unit, dtype=x.dtype, device=x.device)
        cut = torch.maximum(threshold, noise)
        return torch.where(x >= cut, x, torch.zeros_like(x))

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
            "noise_cut": self.noise_cut,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ShowerPreprocessor:
        state = dict(state)
        if state.pop("version", None) not in (1, VERSION):
            raise ValueError(f"preprocessing state: expected version 1 or {VERSION}, got {state!r}")
        unknown = set(state) - {"mode", "eps", "mean", "std", "count", "noise_cut"}
        if unknown or not {"mode", "eps", "mean", "std"} <= set(state):
            raise ValueError(f"preprocessing state: unknown keys {sorted(unknown)} or missing mode/eps/mean/std")
        return cls(**state)

    def __repr__(self) -> str:
        return (f"ShowerPreprocessor(mode={self.mode!r}, eps={self.eps:g}, mean={self.mean:.4f}, "
                f"std={self.std:.4f}, noise_cut={self.noise_cut:g})")
