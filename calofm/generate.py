"""Sampling showers from a trained model: ``calofm.load(...)`` and ``calofm generate``.

``ShowerGenerator`` = network + EDM preconditioning + preprocessing inverse + geometry slots and cards, so
``gen.sample(geometry=..., energy_gev=..., phi=..., theta=..., steps=...)`` returns showers in MeV on the
native mesh. Models are a folder written by pretraining (``config.json`` + ``model.safetensors``), a merged
or fully fine-tuned model, a LoRA adapter folder (``adapter_config.json``), or a Hugging Face Hub id.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from calofm.cards import card_attrs, same_card
from calofm.cli import SEED, add_geometry_dir, int_in, parse_count, parse_range, torch_device
from calofm.training.saved import resolve  # noqa: F401 - resolve: this module's API

log = logging.getLogger(__name__)

SAMPLERS = ("heun", "euler")
MAX_STEPS, MAX_BATCH = 10_000, 10**6
PLAUSIBLE_GEV = (0.05, 2e4)  # outside: most likely a unit mix-up (MeV given as GeV or the other way round)


def load_network(path_or_repo: str | Path, dtype: torch.dtype = torch.float32):
    """(network F, its CaloDiTConfig, {geometry: card stored with the model}) of a model folder, adapter
    folder or Hub id. An adapter is routed: its geometry through the adapted weights, every base geometry
    through the untouched base (``calofm.training.adapter``)."""
    from calofm.training.saved import load_model

    path = resolve(path_or_repo)
    if (path / "adapter_config.json").exists():
        from calofm.training.adapter import open_adapter

        net, cards = open_adapter(path, dtype=dtype, mode="fast")
        return net, net.config, cards
    net, cards, _ = load_model(path, dtype=dtype)
    return net, net.config, cards


class ShowerGenerator:
    """A trained model ready to sample: ``sample(geometry=, energy_gev= | energy_mev=, phi=, theta=)`` -> MeV."""

    def __init__(self, net: torch.nn.Module, config, device: str | torch.device | None = None, cards=None):
        from calofm.diffusion import EDMPrecond
        from calofm.preprocess import ModelSpace

        self.space = ModelSpace.from_config(config)
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.config = config
        self.cards = dict(cards or {})  # geometry name -> Geometry stored with the model
        self.precond = EDMPrecond(self.net)
        self.pre = self.space.shower
        # factorised: the energy model's denoiser, with the EDM constants of the model's config
        self.profile_precond = EDMPrecond(self.net.energy_net, config) if self.space.factorised else None

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, device=None, dtype: torch.dtype = torch.float32):
        net, config, cards = load_network(path_or_repo, dtype=dtype)
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
        steps: int = 32, sampler: str = "heun", batch_size: int = 256, seed: int | None = None,
        progress: bool = False, precision: str = "fp32", cell_cap: bool = True, energy=None,
    ) -> np.ndarray:
        """Showers (N, 9, 16, 45) in MeV. Keywords only: ``geometry``, the incident energy as ``energy_gev``
        (GeV) or ``energy_mev`` (MeV, as in shower files: ``energy_mev=f["incident_energy"]``), ``phi`` and
        ``theta`` in rad; arrays or scalars, which broadcast.

        ``cell_cap``: no cell exceeds the largest cell (as a fraction of E_inc) of the geometry's training
        data, where the model records it; always, no cell exceeds the incident energy.
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
        self._check_energies(e, geometry, "energy_mev" if energy_mev is not None else "energy_gev")
        from tqdm.auto import tqdm

        out = np.empty((len(e), *self.config.mesh_shape), dtype=np.float32)
        seed = int(np.random.SeedSequence().entropy % 2**62) if seed is None else seed
        bar = tqdm(total=len(e), disable=not progress, unit="shower", desc=f"sample {geometry}")
        for k, start in enumerate(range(0, len(e), batch_size)):
            sl = slice(start, start + batch_size)
            out[sl] = self._batch(e[sl], ph[sl], th[sl], geometry, seed, k, steps=steps, sampler=sampler,
                                  precision=precision, cell_cap=cell_cap)
            bar.update(len(out[sl]))
        bar.close()
        return out

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

    def _batch(self, e, phi, theta, geometry, seed, k, *, steps, sampler, precision, cell_cap) -> np.ndarray:
        from calofm.diffusion import euler_sample, heun_sample

        n, dev = len(e), self.device
        cond = {
            "energy": torch.tensor(e, dtype=torch.float32, device=dev),
            "phi": torch.tensor(phi, dtype=torch.float32, device=dev),
            "theta": torch.tensor(theta, dtype=torch.float32, device=dev),
            "geometry": torch.full((n,), self.slot(geometry), dtype=torch.long, device=dev),
        }
        # batch k's noise depends on (seed, k) only: the same seed and batch size give the same file
        gen = torch.Generator().manual_seed((seed * 1_000_003 + k) % 2**63)  # any int seed, even >= 2**62
        noise = torch.randn((n, *self.config.mesh_shape), generator=gen, dtype=torch.float64).to(dev)
        step_fn = heun_sample if sampler == "heun" else euler_sample
        autocast = precision == "bf16"
        e_mev = cond["energy"].double() * 1e3
        threshold = self.threshold(geometry)
        if self.space.factorised:
            # energy model first: the profile (total and layer shares), then the shapes given that profile
            profile_noise = torch.randn((n, self.space.profile.width), generator=gen, dtype=torch.float64).to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                profile = step_fn(self.profile_precond, profile_noise, cond, num_steps=steps)
            layers = self.space.profile.inverse(profile, e_mev, cond["geometry"])  # (B, Z) MeV
            shape_cond = {**cond, "profile": profile.float(), "layer_energy": layers.float()}
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                y = step_fn(self.precond, noise, shape_cond, num_steps=steps)
            return self.pre.inverse(y, e_mev, threshold=threshold, layers=layers).float().cpu().numpy()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
            y = step_fn(self.precond, noise, cond, num_steps=steps)
        # no cell can hold more than the incident energy: cap the model-space value there (an
        # undertrained model can otherwise overflow exp() in the inverse transform) ...
        top = e_mev.reshape(-1, 1, 1, 1)
        if cell_cap and geometry in self.config.geometry_cell_max:
            # ... nor more than the brightest cell of the geometry's training data (docs/generation.md)
            limit = self.config.geometry_cell_max[geometry] * self.pre.unit(top, e_mev)
            top = torch.minimum(top, torch.as_tensor(limit, dtype=top.dtype, device=dev))
        cap = self.pre.forward(top.expand_as(y), e_mev, threshold=threshold)
        showers = self.pre.inverse(torch.minimum(y, cap).float(), e_mev.float(), threshold=threshold)
        return showers.cpu().numpy()


def check_sampling(steps: int, batch_size: int, sampler: str, seed: int | None) -> None:
    """The sampling options of ``sample`` and ``calofm generate``, range-checked."""
    from calofm.training.config import check_int

    check_int("steps", steps, 1, MAX_STEPS)
    check_int("batch_size", batch_size, 1, MAX_BATCH)
    check_int("seed", seed, 0, None, optional=True)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")


def load(path_or_repo: str | Path, device=None, dtype: torch.dtype = torch.float32) -> ShowerGenerator:
    """``calofm.load``: a trained model (folder, adapter folder or Hub id) ready to ``sample``."""
    return ShowerGenerator.from_pretrained(path_or_repo, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# CLI: calofm generate
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder, LoRA adapter folder or Hub repo id")
    p.add_argument("--geometry", required=True, help="geometry to generate for (must be known to the model)")
    p.add_argument("--out", required=True, help="output .h5 (native format)")
    p.add_argument("--samples", type=parse_count, help="number of showers (default: all of --like)")
    p.add_argument("--like", help="take incident energies and angles from this reference file, in order")
    p.add_argument("--energy", type=parse_range, help="GeV range lo:hi (default: the geometry card's)")
    p.add_argument("--theta", type=parse_range, help="rad range lo:hi (default: the card's)")
    p.add_argument("--phi", type=parse_range, help="rad range lo:hi (default: the card's)")
    p.add_argument("--spectrum", choices=["flat", "log-uniform"], help="energy spectrum (default: the card's)")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=32,
                   help="sampler steps (Heun: 2N-1 network evaluations)")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=256)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", type=torch_device, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="network precision (autocast)")
    p.add_argument("--no-cell-cap", dest="cell_cap", action="store_false",
                   help="do not cap cells at the brightest cell (fraction of E_inc) of the training data")
    p.add_argument("--overwrite", action="store_true")
    add_geometry_dir(p)


def check_ranges(args) -> None:
    """Condition ranges given on the command line (before any work)."""
    checks = (("energy", 0.0, math.inf, True), ("theta", 0.0, math.pi, True),
              ("phi", -math.pi - 1e-4, 2 * math.pi, False))
    for name, lo, hi, open_low in checks:
        value = getattr(args, name, None)
        if value is None:
            continue
        if value[0] < lo or (open_low and value[0] == lo) or value[1] > hi:
            raise ValueError(f"--{name} {value[0]:g}:{value[1]:g}: must lie in {'(' if open_low else '['}{lo:.4g}, "
                             f"{hi:.4g}] ({'GeV' if name == 'energy' else 'rad'})")


def conditions(args, geometry) -> dict[str, np.ndarray]:
    """Incident energies (MeV) and angles for the run: from --like (checked whole), or sampled from the ranges."""
    from calofm.data.io import ShowerFile, validate_file
    from calofm.sim.run import sample_conditions

    if args.like:
        validate_file(args.like, geometry)  # every value, as every command that reads a shower file
        with ShowerFile(args.like, geometry=geometry, check=True) as f:  # another detector's file is an error
            cond = {k: v.copy() for k, v in f.conditions().items()}
        total = len(cond["incident_energy"])
        if total == 0:
            raise ValueError(f"{args.like}: holds no showers")
        n = total if args.samples is None else args.samples
        if n > total:
            raise ValueError(f"{args.like}: holds {total} showers, fewer than --samples {n}")
        return {k: v[:n] for k, v in cond.items()}
    if args.samples is None:
        raise ValueError("give --samples (or --like REF.h5 to copy a reference file's conditions)")
    card = geometry.card
    c = sample_conditions(args.samples, args.energy or card.energy, args.theta or card.theta, args.phi or card.phi,
                          args.spectrum or card.spectrum, np.random.default_rng([args.seed, 7]))
    return {"incident_energy": (c["energy_gev"] * 1e3).astype(np.float32),
            "incident_phi": c["phi"].astype(np.float32), "incident_theta": c["theta"].astype(np.float32)}


def inputs_of(args) -> list[Path]:
    """What generate reads that exists here: the --like file, a card given as a path, the model folder and an
    adapter's base folder. The output may be none of them and lie inside none of them."""
    from calofm.training.adapter import ADAPTER_FILE, base_of
    from calofm.training.integrity import read_json

    card = args.geometry if args.geometry.endswith((".yaml", ".yml")) else None
    paths = [Path(p) for p in (args.like, card) if p and Path(p).exists()]
    model = Path(args.model).expanduser()
    if model.is_dir():
        paths.append(model)
        if (model / ADAPTER_FILE).is_file():
            with contextlib.suppress(ValueError):  # a damaged adapter is reported when it loads
                info = read_json(model / ADAPTER_FILE)
                base = base_of(model, info) if isinstance(info.get("base"), str) else None
                paths += [Path(base)] if base and Path(base).is_dir() else []
    return paths


def run(args: argparse.Namespace) -> int:
    from calofm.data.format import FileAttrs
    from calofm.data.output import Staging, check_output

    inputs = inputs_of(args)
    out = check_output(Path(args.out), inputs, args.overwrite)  # not onto or into an input, nor over a file
    check_ranges(args)
    gen = load(args.model, device=args.device)
    geometry = gen.geometry(args.geometry, args.geometry_dir)  # the model's own card first
    cond = conditions(args, geometry)
    n = len(cond["incident_energy"])
    gen._check_energies(cond["incident_energy"].astype(np.float64) / 1e3, geometry.name, "--energy/--like")
    # the card travels with the file too, so a later reader can find a detector that has no built-in card
    attrs = FileAttrs(geometry=geometry.name, particle=geometry.card.particle, mesh_dr=geometry.mesh.dr,
                      mesh_dz=geometry.mesh.dz, generator=f"calofm-generate:{args.model}", seed=args.seed,
                      extra={"gen_steps": args.steps, "gen_sampler": args.sampler, "gen_cell_cap": args.cell_cap,
                             **card_attrs(geometry, always=True)})
    # written into a temporary folder beside the output and moved into place when complete: an error or Ctrl-C
    # leaves no partial file and no folder this run created, and an existing output as it was
    with Staging(out.parent, out.name, inputs=inputs) as staging:
        write(gen, geometry, cond, staging.tmp / out.name, attrs, args)
        staging.place(staging.tmp / out.name, out)
    nfe = 2 * args.steps - 1 if args.sampler == "heun" else args.steps
    print(f"wrote {n} showers for {geometry.name} to {out} ({args.sampler}, {args.steps} steps, {nfe} NFE)")
    return 0


def write(gen: ShowerGenerator, geometry, cond: dict, out: Path, attrs, args) -> None:
    """Batch by batch into ``out``, with a progress bar."""
    from tqdm.auto import tqdm

    from calofm.data.io import ShowerWriter

    n = len(cond["incident_energy"])
    bar = tqdm(total=n, unit="shower", desc=f"generate {geometry.name}")
    try:
        with ShowerWriter(out, attrs=attrs, compression="gzip") as w:
            for k, start in enumerate(range(0, n, args.batch_size)):
                sl = slice(start, start + args.batch_size)
                e_gev = cond["incident_energy"][sl].astype(np.float64) / 1e3
                showers = gen._batch(e_gev, cond["incident_phi"][sl], cond["incident_theta"][sl], geometry.name,
                                     args.seed, k, steps=args.steps, sampler=args.sampler,
                                     precision=args.precision, cell_cap=args.cell_cap)
                w.append(showers, cond["incident_energy"][sl], cond["incident_phi"][sl], cond["incident_theta"][sl])
                bar.update(len(showers))
    except BaseException:
        bar.leave = False  # the error line should stand alone
        raise
    finally:
        bar.close()
