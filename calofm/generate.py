"""Sampling showers from a trained model: ``calofm.load(...)`` and ``calofm generate``.

``ShowerGenerator`` = network + EDM preconditioning + preprocessing inverse + geometry slots and cards, so
``gen.sample(geometry=..., energy_gev=..., phi=..., theta=..., steps=...)`` returns showers in MeV on the
native mesh. Models are a folder written by pretraining (``config.json`` + ``model.safetensors``), a merged
or fully fine-tuned model, a LoRA adapter folder (``adapter_config.json``), or a Hugging Face Hub id.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from calofm.cards import same_card
from calofm.hub.loading import load_network
from calofm.sampling import SAMPLERS, BaselineSampler, ShowerSampler, network_evaluations, resolve_sampling

log = logging.getLogger(__name__)

MAX_STEPS, MAX_BATCH = 10_000, 10**6
PLAUSIBLE_GEV = (0.05, 2e4)  # outside: most likely a unit mix-up (MeV given as GeV or the other way round)


class ShowerGenerator:
    """A trained model ready to sample: ``sample(geometry=, energy_gev= | energy_mev=, phi=, theta=)`` -> MeV."""

    def __init__(self, net: torch.nn.Module, config, device: str | torch.device | None = None, cards=None):
        from calofm.models import BaselineModel
        from calofm.preprocess import ModelSpace

        self.baseline = isinstance(net, BaselineModel)  # a baseline family: its own sampler (BaselineSampler)
        self.space = None if getattr(net, "generates_mev", False) else ModelSpace.from_config(config)
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.config = config
        self.cards = dict(cards or {})  # geometry name -> Geometry stored with the model

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, device=None, dtype: torch.dtype = torch.float32,
                        revision: str | None = None):
        net, config, cards = load_network(path_or_repo, dtype=dtype, revision=revision)
        return cls(net, config, device=device, cards=cards)

    @property
    def geometries(self) -> dict[str, int]:
        return dict(self.config.geometry_slots)

    def slot(self, geometry: str) -> int:
        if geometry not in self.config.geometry_slots:
            raise ValueError(f"the model was not trained on geometry '{geometry}' (it knows "
                             f"{', '.join(sorted(self.config.geometry_slots))}); adapt it with `calofm adapt`")
        return int(self.config.geometry_slots[geometry])

    def geometry(self, name_or_card: str, extra_dirs=None):
        """The card of a geometry the model knows: the one stored with the model first (no --geometry-dir
        needed), else by name from ``extra_dirs`` and the built-in cards. A ``.yaml`` path must be the
        model's card when the model stored one."""
        from calofm.geometry import load_geometry

        given = name_or_card.endswith((".yaml", ".yml"))
        geometry = load_geometry(name_or_card) if given else None
        name = geometry.name if given else name_or_card
        self.slot(name)
        stored = self.cards.get(name)
        if stored is None:
            return geometry or load_geometry(name, extra_dirs)
        if given and not same_card(geometry, stored):
            raise ValueError(f"{name_or_card}: differs from the card of '{name}' stored with the model "
                             f"({stored.source}); leave the card out to use the model's")
        return stored

    def threshold(self, geometry: str) -> float:
        if geometry in self.config.geometry_thresholds:
            return float(self.config.geometry_thresholds[geometry])
        return self.geometry(geometry).card.threshold

    @torch.no_grad()
    def sample(
        self, *legacy, geometry: str | None = None, energy_gev=None, energy_mev=None, phi=None, theta=None,
        steps: int | None = None, sampler: str | None = None, batch_size: int = 256, seed: int | None = None,
        progress: bool = False, precision: str = "fp32", cell_cap: bool = True, energy=None,
        noise_cut: float | None = None,
    ) -> np.ndarray:
        """Showers (N, 9, 16, 45) in MeV. Keywords only: ``geometry``, the incident energy as ``energy_gev``
        (GeV) or ``energy_mev`` (MeV, as in shower files: ``energy_mev=f["incident_energy"]``), ``phi`` and
        ``theta`` in rad; arrays or scalars, which broadcast.

        ``sampler`` and ``steps`` default to the model's own (Heun, 32 steps; a distilled student: its consistency
        steps); ``sampler`` is one of ``calofm.sampling.SAMPLERS``.
        ``cell_cap``: no cell exceeds the largest cell (as a fraction of E_inc) of the geometry's training
        data, where the model records it; always, no cell exceeds the incident energy.
        ``noise_cut`` replaces the model's stored noise cut for this call (docs/fidelity.md: lower keeps more
        faint cells; the factorised variant's layer energies do not change).
        """
        if legacy or energy is not None:
            raise TypeError("ShowerGenerator.sample takes keywords only, with the energy unit in the name: "
                            "sample(geometry=..., energy_gev=... or energy_mev=..., phi=..., theta=...)")
        if geometry is None or phi is None or theta is None or (energy_gev is None) == (energy_mev is None):
            raise TypeError("sample() needs geometry=, phi=, theta= and exactly one of energy_gev= / energy_mev=")
        e_gev = np.asarray(energy_gev if energy_mev is None else np.asarray(energy_mev, dtype=np.float64) / 1e3,
                           dtype=np.float64)
        e, ph, th = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (e_gev, phi, theta)))
        check_sampling(steps=steps, batch_size=batch_size, sampler=sampler, seed=seed)
        runner = self.runner(geometry, sampler=sampler, steps=steps, cell_cap=cell_cap, noise_cut=noise_cut)
        self._check_energies(e, geometry, "energy_mev" if energy_mev is not None else "energy_gev")
        from tqdm.auto import tqdm

        out = np.empty((len(e), *self.config.mesh_shape), dtype=np.float32)
        seed = int(np.random.SeedSequence().entropy % 2**62) if seed is None else seed
        bar = tqdm(total=len(e), disable=not progress, unit="shower", desc=f"sample {geometry}")
        for k, start in enumerate(range(0, len(e), batch_size)):
            sl = slice(start, start + batch_size)
            out[sl] = self._batch(runner, e[sl], ph[sl], th[sl], geometry, seed, k, precision=precision)
            bar.update(len(out[sl]))
        bar.close()
        return out

    def sampling(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int, int]:
        """(sampler, steps, network evaluations per shower) with the model's defaults filled in; a baseline
        family's sampler is the family name."""
        if self.baseline:
            if sampler not in (None, self.net.family):
                raise ValueError(f"a {self.net.family} model samples with its own sampler: --sampler does not apply")
            steps = self.net.check_steps(steps)
            return self.net.family, steps, self.net.network_evaluations(steps)
        sampler, steps = resolve_sampling(self.config, sampler, steps)
        return sampler, steps, network_evaluations(sampler, steps)

    def runner(self, geometry: str, sampler: str | None = None, steps: int | None = None,
               cell_cap: bool = True, noise_cut: float | None = None) -> ShowerSampler:
        """The whole sampler for ``geometry`` as one module (``calofm.sampling.ShowerSampler``, or for a baseline
        family ``BaselineSampler``) on the device."""
        if self.baseline:
            self.sampling(sampler, steps)  # the same checks as for the command line
            geometries = {self.slot(geometry): self.geometry(geometry)} if self.net.generates_mev else None
            return BaselineSampler(self.net, self.config, steps=steps, cell_cap=cell_cap, geometries=geometries,
                                   thresholds={geometry: self.threshold(geometry)}, noise_cut=noise_cut).to(self.device)
        return ShowerSampler(self.net, self.config, sampler=sampler, steps=steps, cell_cap=cell_cap,
                             thresholds={geometry: self.threshold(geometry)}, noise_cut=noise_cut).to(self.device)

    def _check_energies(self, e_gev: np.ndarray, geometry: str, keyword: str) -> None:
        """Refuse non-positive or non-finite energies; warn when they are far outside any plausible range."""
        self.slot(geometry)
        if not np.isfinite(e_gev).all() or (e_gev <= 0).any():
            raise ValueError(f"{keyword}: incident energies must be finite and > 0")
        lo, hi = PLAUSIBLE_GEV
        card = self.cards.get(geometry)
        if card is not None:  # the range the model was trained on, with a factor 10 of slack
            lo, hi = card.card.energy[0] / 10, card.card.energy[1] * 10
        if e_gev.size and (e_gev.min() < lo or e_gev.max() > hi):
            warnings.warn(f"{keyword}: incident energies {e_gev.min():.4g}-{e_gev.max():.4g} GeV are far outside "
                          f"{lo:.3g}-{hi:.3g} GeV: is the unit right (energy_gev= vs energy_mev=)?", stacklevel=3)

    def _batch(self, runner: ShowerSampler, e, phi, theta, geometry, seed, k, *, precision) -> np.ndarray:
        n, dev = len(e), self.device
        cond = [torch.tensor(v, dtype=torch.float32, device=dev) for v in (e, phi, theta)]
        slot = torch.full((n,), self.slot(geometry), dtype=torch.long, device=dev)
        # batch k's noise depends on (seed, k) only: the same seed and batch size give the same file
        key = (seed * 1_000_003 + k) % 2**63  # any int seed, even >= 2**62
        if self.baseline:  # the family draws its latents itself, on the device
            gen = torch.Generator(device=dev).manual_seed(key)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return runner(*cond, slot, generator=gen).cpu().numpy()
        gen = torch.Generator().manual_seed(key)
        noise = torch.randn((n, *self.config.mesh_shape), generator=gen, dtype=torch.float64).to(dev)
        profile_noise = None
        if self.space.factorised:
            profile_noise = torch.randn((n, self.space.profile.width), generator=gen, dtype=torch.float64).to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            showers = runner(*cond, slot, noise, profile_noise, generator=gen)
        return showers.cpu().numpy()


def check_sampling(steps: int | None, batch_size: int, sampler: str | None, seed: int | None) -> None:
    """The sampling options of ``sample`` and ``calofm generate``, range-checked (None: the model's default)."""
    from calofm.training.config import check_int

    check_int("steps", steps, 1, MAX_STEPS, optional=True)
    check_int("batch_size", batch_size, 1, MAX_BATCH)
    check_int("seed", seed, 0, None, optional=True)
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")


def load(path_or_repo: str | Path, device=None, dtype: torch.dtype = torch.float32,
         revision: str | None = None) -> ShowerGenerator:
    """``calofm.load``: a trained model (folder, adapter folder or Hub id ``ORG/NAME[@REV]``) ready to ``sample``."""
    return ShowerGenerator.from_pretrained(path_or_repo, device=device, dtype=dtype, revision=revision)
