"""Invertible shower preprocessing: MeV cell energies <-> the model space the diffusion works in.

forward:  y = (log(x / u + eps) - mean) / std     x >= 0 in MeV, u = E_inc ("fraction"), 1 MeV ("absolute")
                                                  or the energy of the cell's layer ("layer")
inverse:  x = u (exp(y std + mean) - eps), then cells below max(noise_cut eps u, readout threshold) -> 0;
          "layer": each layer is normalised to 1, scaled to its given energy, cut at the threshold and
          scaled again, so every layer holds exactly its energy (the energy-factorised variant)

"logit" (CaloDiffusion, Amram & Pedro 2023): v = x / (maxdep E_inc), y = (logit(eps + (1 - 2 eps) v) - mean) / std;
inverse: v = (sigmoid(y std + mean) - eps) / (1 - 2 eps) clamped at 0, x = v maxdep E_inc, then the same noise
cut (v below noise_cut eps) and readout threshold. eps is the paper's alpha = 1e-6, maxdep its MAXDEP (2 for
CaloChallenge datasets 2 and 3): the largest cell energy the transform can represent, as a multiple of E_inc.

``ProfilePreprocessor`` (``calofm.profile``) is the transform of the factorised variant's energy model: layer
energies -> [log(E_tot / E_inc), log(E_z / E_tot + eps)] standardised per geometry.

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

from calofm.profile import ProfilePreprocessor, RunningStats  # noqa: F401 - RunningStats: calofm.preprocess API

VERSION = 3  # 2 added noise_cut (version-1 states load with 0), 3 added floor (older states load with None)
# (mode "logit" and its key "maxdep" came later without a new version: states of the other modes are unchanged,
# and a reader that predates them refuses the mode by name)
MODES = ("absolute", "fraction", "layer", "logit")


class ShowerPreprocessor:
    """The transform above with a global mean/std fitted on training data (``fit``) and stored as JSON."""

    def __init__(
        self,
        mode: Literal["absolute", "fraction", "layer", "logit"] = "fraction",
        eps: float | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        count: int = 0,
        noise_cut: float = 0.0,
        floor: float | None = None,
        maxdep: float | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"preprocessing mode must be one of {MODES}, got {mode!r}")
        eps = (1e-3 if mode == "absolute" else 1e-6) if eps is None else float(eps)
        if not eps > 0 or not std > 0 or not math.isfinite(mean) or not 0 <= noise_cut < math.inf:
            raise ValueError(f"preprocessing needs eps > 0, std > 0, a finite mean and noise_cut >= 0 "
                             f"(eps={eps}, std={std}, mean={mean}, noise_cut={noise_cut})")
        if floor is not None and not 0 < floor < math.inf:
            raise ValueError(f"preprocessing floor must be > 0 (a fraction of the readout threshold), got {floor}")
        if mode == "logit":
            maxdep = 2.0 if maxdep is None else float(maxdep)
            if not 0 < maxdep < math.inf or not eps < 0.5 or floor is not None:
                raise ValueError(f"preprocessing mode 'logit' needs maxdep > 0, eps < 0.5 and no floor "
                                 f"(maxdep={maxdep}, eps={eps}, floor={floor})")
        elif maxdep is not None:
            raise ValueError(f"preprocessing maxdep applies to mode 'logit' only, not {mode!r}")
        self.maxdep = maxdep  # logit: cells are fractions of maxdep x E_inc (None in the other modes)
        self.mode, self.eps, self.mean, self.std, self.count = mode, eps, float(mean), float(std), int(count)
        self.noise_cut = float(noise_cut)  # inverse: cells below noise_cut x the floor (eps u, or floor thr) -> 0
        # floor: the empty-cell floor is floor x the readout threshold (MeV) instead of eps x the unit, so it sits
        # at the same place relative to what the detector reads for every geometry, energy and layer
        self.floor = None if floor is None else float(floor)

    def offset(self, unit, threshold) -> torch.Tensor | float:
        """The floor added before the log, in units of ``unit``: eps, or floor x threshold / unit."""
        if self.floor is None:
            return self.eps
        if threshold is None:
            raise ValueError("a preprocessing floor relative to the readout threshold needs the threshold (MeV)")
        unit = torch.as_tensor(unit)
        threshold = torch.as_tensor(threshold, dtype=unit.dtype, device=unit.device)
        if threshold.ndim:
            threshold = threshold.reshape(-1, *([1] * (unit.ndim - 1)))
        return self.floor * threshold / unit

    # -- transforms ---------------------------------------------------------------------------
    def unit(self, x: torch.Tensor, energy: torch.Tensor | None, layers: torch.Tensor | None = None):
        """Energy unit per sample, (B, 1, ..., 1) MeV or 1.0; "layer": per layer (B, 1, 1, Z) from ``layers``
        (B, Z) MeV, or from x's own layer sums (empty layers get unit 1: their cells are all 0)."""
        if self.mode == "absolute":
            return 1.0
        if self.mode == "layer":
            sums = x.sum(dim=(1, 2)) if layers is None else torch.as_tensor(layers, dtype=x.dtype, device=x.device)
            return torch.where(sums > 0, sums, torch.ones_like(sums))[:, None, None, :]
        if energy is None:
            raise ValueError(f"preprocessing mode '{self.mode}' needs the incident energy (MeV)")
        return torch.as_tensor(energy, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))

    def forward(self, showers: torch.Tensor, energy: torch.Tensor | None = None, check: bool = True,
                threshold=None) -> torch.Tensor:
        """Showers (B, ...) MeV, incident energy (B,) MeV -> model space, same shape, float32 or wider.
        ``threshold`` (MeV, scalar or (B,)) is needed with a ``floor``.

        ``check=False`` skips the non-negativity check (a host sync): the training loop's data were checked
        when their files were read."""
        x = showers if showers.dtype in (torch.float32, torch.float64) else showers.float()
        if check and (x < 0).any():
            raise ValueError("showers must be non-negative energies in MeV")
        unit = self.unit(x, energy)
        if self.mode == "logit":
            return (self._logit(x / (self.maxdep * unit), check) - self.mean) / self.std
        return (torch.log(x / unit + self.offset(unit, threshold)) - self.mean) / self.std

    def _logit(self, v: torch.Tensor, check: bool) -> torch.Tensor:
        """logit(eps + (1 - 2 eps) v) of cell fractions v = x / (maxdep E_inc) in [0, 1]."""
        if check and (v > 1).any():
            raise ValueError(f"a cell holds more than maxdep={self.maxdep:g} x the incident energy; raise maxdep")
        v = self.eps + (1 - 2 * self.eps) * v.clamp_max(1.0)  # (unchecked: a brighter cell saturates)
        return torch.log(v) - torch.log1p(-v)

    __call__ = forward

    def inverse(
        self, y: torch.Tensor, energy: torch.Tensor | None = None, threshold: torch.Tensor | float = 0.0,
        layers: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model space -> MeV (B, ...), non-negative; cells below the noise cut or ``threshold`` (MeV, scalar
        or (B,)) -> 0. With ``layers`` (B, Z) MeV every layer is rescaled to hold exactly that energy (the
        factorised variant; "layer" mode needs them, its cells are shares of their layer)."""
        y = y if y.dtype in (torch.float32, torch.float64) else y.float()
        threshold = torch.as_tensor(threshold, dtype=y.dtype, device=y.device)
        if threshold.ndim:
            threshold = threshold.reshape(-1, *([1] * (y.ndim - 1)))
        log_rel = y * self.std + self.mean
        if self.mode == "logit":
            return self._inverse_logit(log_rel, energy, threshold, layers)
        if self.mode == "layer" and layers is None:
            raise ValueError("preprocessing mode 'layer' needs the layer energies (MeV) to invert")
        unit = self.unit(y, energy, layers)
        off = self.offset(unit, threshold if self.floor is not None else None)
        if layers is not None and self.mode != "absolute":
            # factorised: no cell holds more than its unit (layer energy, E_inc); also keeps exp() finite for any y
            log_rel = torch.minimum(log_rel, torch.log1p(torch.as_tensor(off, dtype=y.dtype, device=y.device)))
        rel = (torch.exp(log_rel) - off).clamp_min(0.0)  # x / unit
        rel = torch.where(rel >= self.noise_cut * off, rel, torch.zeros_like(rel))  # noise cut: noise_cut x floor
        x = rel if self.mode == "layer" else rel * unit
        if layers is None:
            return torch.where(x >= threshold, x, torch.zeros_like(x))
        return self._fit_layers(x, log_rel, torch.as_tensor(layers, dtype=x.dtype, device=x.device), threshold)

    def _inverse_logit(self, z, energy, threshold: torch.Tensor, layers) -> torch.Tensor:
        """Logits z (B, ...) -> MeV: sigmoid (finite for any z, so no cap is needed), undo the affine map, clamp
        at 0, noise cut at noise_cut x eps (the empty-cell floor, as a fraction of maxdep E_inc), x maxdep E_inc,
        readout threshold; with ``layers`` every layer is rescaled to its energy as in the other modes."""
        rel = ((torch.sigmoid(z) - self.eps) / (1 - 2 * self.eps)).clamp_min(0.0)  # x / (maxdep E_inc)
        rel = torch.where(rel >= self.noise_cut * self.eps, rel, torch.zeros_like(rel))
        x = rel * (self.maxdep * self.unit(z, energy))
        if layers is None:
            return torch.where(x >= threshold, x, torch.zeros_like(x))
        return self._fit_layers(x, z, torch.as_tensor(layers, dtype=x.dtype, device=x.device), threshold)

    def _fit_layers(self, x, log_rel, layers: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Cells (B, R, P, Z), in any unit -> MeV with every layer summing exactly to ``layers`` (B, Z).

        Normalise each layer, scale to its energy, apply the readout threshold, then scale the surviving cells
        up to the layer energy again (so no surviving cell falls below the threshold). A layer the network left
        empty gets its energy in the cell it rated highest; a layer whose energy is below the threshold ends
        empty, as in the detector."""
        rel = x
        empty = rel.sum(dim=(1, 2), keepdim=True) <= 0  # (B, 1, 1, Z)
        # (computed for every layer, without a data-dependent branch, so the sampler exports as one graph)
        flat = log_rel.flatten(1, 2)  # (B, R*P, Z)
        top = torch.zeros_like(flat).scatter(1, flat.argmax(dim=1, keepdim=True), 1.0).reshape(rel.shape)
        rel = torch.where(empty, top, rel)
        target = layers.clamp_min(0.0)[:, None, None, :]  # (B, 1, 1, Z)

        def scale_to_target(x):
            sums = x.sum(dim=(1, 2), keepdim=True)
            return torch.where(sums > 0, x * (target / sums.clamp_min(torch.finfo(x.dtype).tiny)), torch.zeros_like(x))

        x = scale_to_target(rel)
        x = torch.where(x >= threshold, x, torch.zeros_like(x))
        return scale_to_target(x)

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Any]) -> ShowerPreprocessor:
        """Streamed mean/std of log(x/u + eps) (or the logit) over all cells; batches are dicts (showers, energy
        MeV) or pairs.

        Chan et al.'s pairwise update in float64: memory is one batch, the result independent of batching.
        """
        stats = RunningStats()
        self.mean, self.std = 0.0, 1.0  # forward() with identity stats gives the raw log values
        for batch in batches:
            showers, energy = (batch["showers"], batch.get("energy")) if isinstance(batch, Mapping) else batch
            threshold = batch.get("threshold") if isinstance(batch, Mapping) else None
            stats.update(self.forward(torch.as_tensor(showers).double(), energy, threshold=threshold)
                         .reshape(-1, 1))  # float64 logs
        if stats.n < 2:
            raise ValueError("fit needs at least two cells of data")
        mean, std = stats.mean[0].item(), stats.std[0].item()
        if not std > 0:
            raise ValueError("fit: the data has zero spread in model space")
        self.mean, self.std, self.count = mean, std, stats.n
        return self

    # -- JSON-able state (lives in CaloDiTConfig.preprocessing) --------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "version": VERSION,
            "mode": self.mode,
            "eps": self.eps,
            "mean": self.mean,
            "std": self.std,
            "count": self.count,
            "noise_cut": self.noise_cut,
            "floor": self.floor,
        }
        if self.mode == "logit":  # only there: the states of the other modes stay as they were
            state["maxdep"] = self.maxdep
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ShowerPreprocessor:
        state = dict(state)
        if state.pop("version", None) not in (1, 2, VERSION):
            raise ValueError(f"preprocessing state: expected version 1 to {VERSION}, got {state!r}")
        unknown = set(state) - {"mode", "eps", "mean", "std", "count", "noise_cut", "floor", "maxdep"}
        if unknown or not {"mode", "eps", "mean", "std"} <= set(state):
            raise ValueError(f"preprocessing state: unknown keys {sorted(unknown)} or missing mode/eps/mean/std")
        return cls(**state)

    def __repr__(self) -> str:
        return (f"ShowerPreprocessor(mode={self.mode!r}, eps={self.eps:g}, mean={self.mean:.4f}, "
                f"std={self.std:.4f}, noise_cut={self.noise_cut:g}, floor={self.floor}"
                + (f", maxdep={self.maxdep:g})" if self.mode == "logit" else ")"))


class ModelSpace:
    """Everything between a batch of MeV showers and a model's inputs, and back: the shower transform and,
    for the energy-factorised variant, the profile transform. Built from a CaloDiT config (``from_config``)."""

    def __init__(self, shower: ShowerPreprocessor, profile: ProfilePreprocessor | None = None,
                 thresholds: Mapping[int, float] | None = None):
        if shower.mode == "layer" and profile is None:
            raise ValueError("the 'layer' shower transform needs the profile transform (the factorised variant)")
        if shower.floor is not None and not thresholds:
            raise ValueError("a preprocessing floor relative to the threshold needs the geometries' thresholds")
        self.shower, self.profile = shower, profile
        self.thresholds = {int(k): float(v) for k, v in (thresholds or {}).items()}  # slot -> MeV
        self._table: dict = {}

    @classmethod
    def from_config(cls, config, noise_cut: float | None = None) -> ModelSpace:
        """``noise_cut`` replaces the stored one (``calofm generate --noise-cut``); checked like any state."""
        if not config.preprocessing:
            raise ValueError("model config has no preprocessing statistics (was it trained with calofm?)")
        profile = None
        if getattr(config, "variant", "single") == "factorised":
            if not config.profile_preprocessing:
                raise ValueError("factorised model config has no profile_preprocessing statistics")
            profile = ProfilePreprocessor.from_dict(config.profile_preprocessing)
        thresholds = {config.geometry_slots[g]: t for g, t in config.geometry_thresholds.items()
                      if g in config.geometry_slots}
        state = {**config.preprocessing, **({} if noise_cut is None else {"noise_cut": noise_cut})}
        return cls(ShowerPreprocessor.from_dict(state), profile, thresholds)

    def threshold(self, slots: torch.Tensor) -> torch.Tensor | None:
        """Readout threshold (MeV) per row for geometry slots (B,), on their device (None without a floor)."""
        if self.shower.floor is None:
            return None
        key = str(slots.device)
        if key not in self._table:
            table = torch.full((max(self.thresholds) + 1,), math.nan, dtype=torch.float64)
            for slot, thr in self.thresholds.items():
                table[slot] = thr
            self._table[key] = table.to(slots.device)
        return self._table[key][slots]

    @property
    def factorised(self) -> bool:
        return self.profile is not None

    def inputs(self, batch: Mapping[str, torch.Tensor], device, check: bool = False) -> tuple[torch.Tensor, dict]:
        """Loader batch (showers MeV, energy MeV, phi, theta rad, geometry slot) -> (x in model space, conditions
        for the network: energy GeV, phi, theta, geometry and, factorised, the profile in its model space)."""
        showers, energy = batch["showers"].to(device), batch["energy"].to(device)
        cond = {"energy": energy / 1e3, "phi": batch["phi"].to(device), "theta": batch["theta"].to(device),
                "geometry": batch["geometry"].to(device)}
        if self.profile is not None:
            layers = showers.sum(dim=(1, 2), dtype=torch.float64)
            cond["profile"] = self.profile(layers, energy.double(), cond["geometry"], check=check).float()
            cond["layer_energy"] = layers.float()
        threshold = self.threshold(cond["geometry"])
        return self.shower.forward(showers, energy, check=check, threshold=threshold), cond
