"""GFlash as a generator: the built-in parametrised simulator (``calofm.sim``) behind the model interface.

Classic fast simulation (Grindhammer & Peters' GFlash, as in Geant4's parametrisation library) has no
network and nothing to train: the shower is drawn from parametrised longitudinal and radial profiles of the
detector's materials, spot by spot, then smeared by the card's resolution and cut at its readout threshold.
Here it samples through the same interface as every trained family (``calofm.load(...).sample``,
``calofm generate``), so its speed and fidelity sit in the same table.

Its one set of weights is a per-slot energy scale (1 by default): the knob a GFlash user tunes per
detector against full simulation. On calofm's own simulated data it reproduces the reference by
construction (it *is* the simulator that made it); against Geant4 files it is the classic baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from calofm.models.shower import BaselineModel, ShowerModelConfig, register_family

PARTICLES = ("gamma", "e-", "e+")
METHODS = ("auto", "spots", "binned")


class GFlashConfig(ShowerModelConfig):
    """The simulator options (``calofm.sim.shower.SimOptions``) of the generator."""

    model_type = "gflash"
    preprocessing_defaults = {}  # generates MeV: no model space

    particle: str = "gamma"
    spot_factor: float = 1.0  # multiplies GFlash's number of energy spots
    method: str = "auto"  # spots one by one, Poisson counts per cell ("binned"), or by spot count ("auto")

    def _check(self) -> None:
        super()._check()
        if self.particle not in PARTICLES:
            raise ValueError(f"GFlashConfig.particle={self.particle!r}: expected one of {PARTICLES}")
        if self.method not in METHODS:
            raise ValueError(f"GFlashConfig.method={self.method!r}: expected one of {METHODS}")
        if not 0 < self.spot_factor <= 100:
            raise ValueError(f"GFlashConfig.spot_factor must be in (0, 100], got {self.spot_factor}")


class GFlashModel(BaselineModel):
    """``generate`` simulates showers (MeV) for the rows' geometries with ``calofm.sim.ShowerSimulator``."""

    config_class = GFlashConfig
    base_model_prefix = "gflash"
    family = "gflash"
    title = "GFlash"  # name in the literature (model cards)
    summary = ("calofm's built-in parametrised (GFlash-style) shower simulator used as a generator: no network, "
               "nothing trained")
    trainable = False
    generates_mev = True

    def __init__(self, config: GFlashConfig):
        super().__init__(config)
        # per-slot scale of the generated energies: GFlash's tuning knob, fixed (not trained here)
        self.energy_scale = nn.Parameter(torch.ones(config.n_geometry_slots), requires_grad=False)
        self._simulators: dict = {}
        self.post_init()

    def _init_weights(self, module):
        if module is self:
            nn.init.ones_(self.energy_scale)

    def network_evaluations(self, steps: int | None = None) -> int:
        return 0  # no network: the parametrised simulator

    def losses(self, x, cond, noise):
        raise ValueError("gflash has nothing to train (recipes/train.py --model gflash writes it directly)")

    def _simulator(self, geometry, device):
        from calofm.sim.shower import ShowerSimulator, SimOptions

        key = (geometry.name, geometry.slot, str(device))
        if key not in self._simulators:
            options = SimOptions(particle=self.config.particle, spot_factor=self.config.spot_factor,
                                 method=self.config.method)
            self._simulators[key] = ShowerSimulator(geometry, options, device=device)
        return self._simulators[key]

    @torch.no_grad()
    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """Showers (B, R, P, Z) in MeV, thresholded; ``geometries``: {slot: Geometry} of every row's slot."""
        slots = cond["geometry"].long()
        out = torch.zeros(len(slots), *self.config.mesh_shape, device=slots.device)
        for slot in torch.unique(slots).tolist():
            if slot not in (geometries or {}):
                raise ValueError(f"gflash needs the detector card of slot {slot} to simulate it")
            rows = torch.nonzero(slots == slot).squeeze(1)
            sim = self._simulator(geometries[slot], slots.device)
            showers = sim(cond["energy"][rows], cond["theta"][rows], cond["phi"][rows], generator)
            out[rows] = showers.to(out) * self.energy_scale[slot]
        return out


register_family(GFlashConfig, GFlashModel)
