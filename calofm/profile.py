"""The factorised variant's profile transform: layer energies <-> the vector its energy model works in
(``ProfilePreprocessor``), and streamed per-column statistics (``RunningStats``). ``calofm.preprocess`` holds
the shower transform and ``ModelSpace``, which uses both."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch


class RunningStats:
    """Streamed per-column mean and (population) std of (N, D) batches: Chan et al.'s pairwise update in
    float64, so memory is one batch and the result does not depend on how the data were batched."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, v: torch.Tensor) -> None:
        v = torch.as_tensor(v, dtype=torch.float64)
        if v.shape[0] == 0:
            return
        nb, mb = v.shape[0], v.mean(dim=0)
        m2b = (v - mb).square().sum(dim=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        delta, total = mb - self.mean, self.n + nb
        self.mean = self.mean + delta * nb / total
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / total
        self.n = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.n).sqrt()


PROFILE_VERSION = 1


class ProfilePreprocessor:
    """Layer energies <-> the profile vector the factorised variant's energy model works in.

    forward:  v = [log(E_tot / E_inc), log(E_z / E_tot + eps) for z = 1..Z],  y = (v - mean_g) / std_g
    inverse:  E_tot = E_inc exp(v_0);  shares s_z = exp(v_z) - eps, those below noise_cut eps set to 0, then
              normalised to sum 1;  E_z = E_tot s_z

    The total is its own coordinate, so its mean and spread (the detector's response and resolution) are
    learned directly instead of through the correlations of 45 layers. Statistics are per geometry g
    (``fit``; a new geometry is added with ``fit`` on its data at adaptation), since visible fractions differ
    by 5x between detectors and some layers are empty in one detector and full in another. A column with
    no spread in a geometry (a layer behind its calorimeter) is standardised with std 1.
    """

    def __init__(self, eps: float = 1e-6, noise_cut: float = 1.0, stats: Mapping[str, Mapping] | None = None):
        if not 0 < eps < 1 or not 0 <= noise_cut < math.inf:
            raise ValueError(f"profile preprocessing needs 0 < eps < 1 and noise_cut >= 0 (eps={eps}, "
                             f"noise_cut={noise_cut})")
        self.eps, self.noise_cut = float(eps), float(noise_cut)
        self.stats: dict[str, dict[str, Any]] = {}
        self._tables: dict = {}  # (device, dtype) -> (mean, std) tables indexed by slot
        for name, entry in (stats or {}).items():
            self._set(name, int(entry["slot"]), entry["mean"], entry["std"], int(entry.get("count", 0)))

    def _set(self, name: str, slot: int, mean, std, count: int) -> None:
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not all(math.isfinite(m) for m in mean) or not all(0 < s < math.inf for s in std):
            raise ValueError(f"profile statistics of {name}: need finite means and std > 0 of equal length")
        if any(e["slot"] == slot for n, e in self.stats.items() if n != name):
            raise ValueError(f"profile statistics: slot {slot} of {name} is taken by another geometry")
        self.stats[name] = {"slot": slot, "mean": mean, "std": std, "count": count}
        self._tables.clear()

    @property
    def geometries(self) -> dict[str, int]:
        return {name: e["slot"] for name, e in self.stats.items()}

    @property
    def width(self) -> int:
        """Length of the profile vector, Z + 1."""
        if not self.stats:
            raise ValueError("profile preprocessing has no fitted geometry")
        return len(next(iter(self.stats.values()))["mean"])

    def _table(self, slots: torch.Tensor, dtype, device, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (mean, std) (B, Z + 1) for geometry slots (B,), gathered on ``device`` from a cached table.

        ``check=False`` skips the test that every slot was fitted (a host sync); an unfitted slot then gives NaN.
        """
        if not self.stats:
            raise ValueError("profile preprocessing has no fitted geometry")
        key = (str(device), dtype)
        if key not in self._tables:
            width = len(next(iter(self.stats.values()))["mean"])
            n = max(e["slot"] for e in self.stats.values()) + 1
            mean = torch.zeros(n, width, dtype=dtype)
            std = torch.full((n, width), math.nan, dtype=dtype)
            for e in self.stats.values():
                mean[e["slot"]] = torch.tensor(e["mean"], dtype=dtype)
                std[e["slot"]] = torch.tensor(e["std"], dtype=dtype)
            self._tables[key] = mean.to(device), std.to(device)
        mean, std = self._tables[key]
        slots = torch.as_tensor(slots, dtype=torch.long, device=device)
        if check:
            known = set(self.geometries.values())
            if not set(slots.unique().tolist()) <= known:
                raise ValueError(f"profile preprocessing has no statistics for geometry slot(s) "
                                 f"{sorted(set(slots.unique().tolist()) - known)}")
        return mean[slots], std[slots]

    def features(self, layers: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """Layer energies (B, Z) and E_inc (B,) in MeV -> unstandardised profile vectors (B, Z + 1)."""
        layers = torch.as_tensor(layers)
        layers = layers if layers.dtype in (torch.float32, torch.float64) else layers.float()
        total = layers.sum(dim=1, keepdim=True)
        tiny = torch.finfo(layers.dtype).tiny
        ratio = torch.log(total.clamp_min(tiny) / torch.as_tensor(energy, dtype=layers.dtype,
                                                                   device=layers.device).reshape(-1, 1))
        shares = torch.log(layers / total.clamp_min(tiny) + self.eps)
        return torch.cat([ratio, shares], dim=1)

    def forward(self, layers: torch.Tensor, energy: torch.Tensor, slots: torch.Tensor, check: bool = True):
        """Layer energies (B, Z) MeV, E_inc (B,) MeV, geometry slots (B,) -> model space (B, Z + 1)."""
        v = self.features(layers, energy)
        mean, std = self._table(slots, v.dtype, v.device, check)
        return (v - mean) / std

    __call__ = forward

    def inverse(self, y: torch.Tensor, energy: torch.Tensor, slots: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Model space (B, Z + 1) -> layer energies (B, Z) MeV, non-negative, summing to the sampled total.
        ``check=False``: no test that the slots were fitted (a host sync; an exported graph cannot raise)."""
        y = y if y.dtype in (torch.float32, torch.float64) else y.float()
        mean, std = self._table(slots, y.dtype, y.device, check)
        v = y * std + mean
        # a shower deposits at most E_inc, a layer at most the total: also keeps exp() finite for any y
        e_inc = torch.as_tensor(energy, dtype=y.dtype, device=y.device).reshape(-1, 1)
        total = e_inc * torch.exp(v[:, :1].clamp_max(0))
        shares = (torch.exp(v[:, 1:].clamp_max(math.log1p(self.eps))) - self.eps).clamp_min(0.0)
        shares = torch.where(shares >= self.noise_cut * self.eps, shares, torch.zeros_like(shares))
        norm = shares.sum(dim=1, keepdim=True)
        # all shares cut (never seen in practice): the total goes to the layer the network rated highest
        fallback = torch.nn.functional.one_hot(v[:, 1:].argmax(dim=1), shares.shape[1]).to(shares)
        shares = torch.where(norm > 0, shares / norm.clamp_min(torch.finfo(y.dtype).tiny), fallback)
        return total * shares

    def fit(self, batches: Iterable[tuple[str, int, torch.Tensor, torch.Tensor]]) -> ProfilePreprocessor:
        """Per-geometry statistics from (geometry name, slot, layer energies (B, Z) MeV, E_inc (B,) MeV) batches;
        geometries already fitted and not in ``batches`` keep theirs."""
        running: dict[str, tuple[int, RunningStats]] = {}
        for name, slot, layers, energy in batches:
            running.setdefault(name, (int(slot), RunningStats()))[1].update(
                self.features(torch.as_tensor(layers).double(), torch.as_tensor(energy).double()))
        for name, (slot, stats) in running.items():
            if stats.n < 2:
                raise ValueError(f"profile fit: geometry {name} needs at least two showers")
            std = torch.where(stats.std > 1e-3, stats.std, torch.ones_like(stats.std))  # constant columns: 1
            self._set(name, slot, stats.mean.tolist(), std.tolist(), stats.n)
        return self

    # -- JSON-able state (lives in CaloDiTConfig.profile_preprocessing) ----------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "eps": self.eps, "noise_cut": self.noise_cut,
                "stats": {name: dict(e) for name, e in self.stats.items()}}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ProfilePreprocessor:
        state = dict(state)
        if state.pop("version", None) != PROFILE_VERSION:
            raise ValueError(f"profile preprocessing state: expected version {PROFILE_VERSION}")
        unknown = set(state) - {"eps", "noise_cut", "stats"}
        if unknown:
            raise ValueError(f"profile preprocessing state: unknown keys {sorted(unknown)}")
        return cls(**state)

    def __repr__(self) -> str:
        return f"ProfilePreprocessor(eps={self.eps:g}, noise_cut={self.noise_cut:g}, geometries={self.geometries})"
