"""Sampling showers from a trained model: ``calofm.load(...)`` and ``calofm generate``.

``ShowerGenerator`` = network + EDM preconditioning + preprocessing inverse + geometry slots, so
``gen.sample(energy, phi, theta, geometry, steps)`` returns showers in MeV on the native mesh.
Models are a folder written by pretraining (``config.json`` + ``model.safetensors``), a merged or
fully fine-tuned model, a LoRA adapter folder (``adapter_config.json``), or a Hugging Face Hub id.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from calofm.cli import add_geometry_dir, parse_count, parse_range

log = logging.getLogger(__name__)

SAMPLERS = ("heun", "euler")


def resolve(path_or_repo: str | Path) -> Path:
    """A local folder, or a Hub repo id fetched (or found offline in the cache) with ``snapshot_download``."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: a model is a folder (config.json + model.safetensors), not a file")
        return path
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/")):
        raise ValueError(f"{path_or_repo}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo)))
    except Exception as err:  # offline without a cached copy, unknown repo, ...
        raise ValueError(f"{path_or_repo}: not a local folder and not available from the Hub ({err})") from None


def load_network(path_or_repo: str | Path, dtype: torch.dtype = torch.float32):
    """The network F of a model folder, adapter folder or Hub id, with its CaloDiTConfig."""
    from calofm.models import CaloDiTModel

    path = resolve(path_or_repo)
    if (path / "adapter_config.json").exists():
        from calofm.adapt import load_adapted

        net = load_adapted(path, dtype=dtype)
        return net, net.config
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: no config.json or adapter_config.json (not a calofm model)")
    net = CaloDiTModel.from_pretrained(path, dtype=dtype)
    return net, net.config


class ShowerGenerator:
    """A trained model ready to sample: ``sample(energy [GeV], phi, theta, geometry, steps)`` -> MeV showers."""

    def __init__(self, net: torch.nn.Module, config, device: str | torch.device | None = None):
        from calofm.diffusion import EDMPrecond
        from calofm.preprocess import ModelSpace

        self.space = ModelSpace.from_config(config)
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.config = config
        self.precond = EDMPrecond(self.net)
        self.pre = self.space.shower
        # factorised: the energy model's denoiser, with the EDM constants of the model's config
        self.profile_precond = EDMPrecond(self.net.energy_net, config) if self.space.factorised else None

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, device=None, dtype: torch.dtype = torch.float32):
        net, config = load_network(path_or_repo, dtype=dtype)
        return cls(net, config, device=device)

    @property
    def geometries(self) -> dict[str, int]:
        return dict(self.config.geometry_slots)

    def slot(self, geometry: str) -> int:
        if geometry not in self.config.geometry_slots:
            raise ValueError(f"the model was not trained on geometry '{geometry}' (it knows "
                             f"{', '.join(sorted(self.config.geometry_slots))}); adapt it with `calofm adapt`")
        return int(self.config.geometry_slots[geometry])

    def threshold(self, geometry: str) -> float:
        if geometry in self.config.geometry_thresholds:
            return float(self.config.geometry_thresholds[geometry])
        from calofm.geometry import load_geometry

        return load_geometry(geometry).card.threshold

    @torch.no_grad()
    def sample(
        self, energy, phi, theta, geometry: str, steps: int = 32, sampler: str = "heun", batch_size: int = 256,
        seed: int | None = None, progress: bool = False, precision: str = "fp32", cell_cap: bool = True,
    ) -> np.ndarray:
        """Showers (N, 9, 16, 45) in MeV for incident energies in GeV and angles in rad (arrays or scalars).

        ``cell_cap``: no cell exceeds the largest cell (as a fraction of E_inc) of the geometry's training
        data, where the model records it; always, no cell exceeds the incident energy.
        """
        e, ph, th = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (energy, phi, theta)))
        if (e <= 0).any() or not np.isfinite(e).all():
            raise ValueError("incident energies must be finite and > 0 GeV")
        if e.max() > 5e4:
            log.warning("incident energies up to %.3g GeV: energies are in GeV, not MeV", e.max())
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

    def _batch(self, e, phi, theta, geometry, seed, k, *, steps, sampler, precision, cell_cap) -> np.ndarray:
        from calofm.diffusion import euler_sample, heun_sample

        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
        n, dev = len(e), self.device
        cond = {
            "energy": torch.tensor(e, dtype=torch.float32, device=dev),
            "phi": torch.tensor(phi, dtype=torch.float32, device=dev),
            "theta": torch.tensor(theta, dtype=torch.float32, device=dev),
            "geometry": torch.full((n,), self.slot(geometry), dtype=torch.long, device=dev),
        }
        # batch k's noise depends on (seed, k) only: files are reproducible and resumable
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
                y = step_fn(self.precond, noise, {**cond, "profile": profile.float()}, num_steps=steps)
            layers = self.space.profile.inverse(profile, e_mev, cond["geometry"])  # (B, Z) MeV
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
        cap = self.pre.forward(top.expand_as(y), e_mev)
        showers = self.pre.inverse(torch.minimum(y, cap).float(), e_mev.float(), threshold=threshold)
        return showers.cpu().numpy()


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
    p.add_argument("--steps", type=int, default=32, help="sampler steps (Heun: 2N-1 network evaluations)")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="network precision (autocast)")
    p.add_argument("--no-cell-cap", dest="cell_cap", action="store_false",
                   help="do not cap cells at the brightest cell (fraction of E_inc) of the training data")
    p.add_argument("--overwrite", action="store_true")
    add_geometry_dir(p)


def conditions(args, geometry, n_default: int | None) -> dict[str, np.ndarray]:
    """Incident energies (MeV) and angles for the run: from --like, or sampled from the ranges."""
    from calofm.data.io import ShowerFile
    from calofm.sim.run import sample_conditions

    if args.like:
        with ShowerFile(args.like, geometry=geometry, check=True) as f:  # another detector's file is an error
            cond = {k: v.copy() for k, v in f.conditions().items()}
        n = len(cond["incident_energy"]) if args.samples is None else args.samples
        if n > len(cond["incident_energy"]):
            raise ValueError(f"{args.like}: holds {len(cond['incident_energy'])} showers, fewer than --samples {n}")
        return {k: v[:n] for k, v in cond.items()}
    if args.samples is None:
        raise ValueError("give --samples (or --like REF.h5 to copy a reference file's conditions)")
    card = geometry.card
    c = sample_conditions(args.samples, args.energy or card.energy, args.theta or card.theta, args.phi or card.phi,
                          args.spectrum or card.spectrum, np.random.default_rng([args.seed, 7]))
    return {"incident_energy": (c["energy_gev"] * 1e3).astype(np.float32),
            "incident_phi": c["phi"].astype(np.float32), "incident_theta": c["theta"].astype(np.float32)}


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from calofm.data.format import FileAttrs
    from calofm.data.io import ShowerWriter
    from calofm.geometry import load_geometry

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out}: exists already (use --overwrite)")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    geometry = load_geometry(args.geometry, args.geometry_dir)
    gen = load(args.model, device=args.device)
    gen.slot(geometry.name)  # fail before any work if the model does not know the geometry
    cond = conditions(args, geometry, None)
    n = len(cond["incident_energy"])
    attrs = FileAttrs(geometry=geometry.name, particle=geometry.card.particle, mesh_dr=geometry.mesh.dr,
                      mesh_dz=geometry.mesh.dz, generator=f"calofm-generate:{args.model}", seed=args.seed,
                      extra={"gen_steps": args.steps, "gen_sampler": args.sampler, "gen_cell_cap": args.cell_cap})
    bar = tqdm(total=n, unit="shower", desc=f"generate {geometry.name}")
    with ShowerWriter(out, attrs=attrs, compression="gzip") as w:
        for k, start in enumerate(range(0, n, args.batch_size)):
            sl = slice(start, start + args.batch_size)
            e_gev = cond["incident_energy"][sl].astype(np.float64) / 1e3
            showers = gen._batch(e_gev, cond["incident_phi"][sl], cond["incident_theta"][sl], geometry.name,
                                 args.seed, k, steps=args.steps, sampler=args.sampler, precision=args.precision,
                                 cell_cap=args.cell_cap)
            w.append(showers, cond["incident_energy"][sl], cond["incident_phi"][sl], cond["incident_theta"][sl])
            bar.update(len(showers))
    bar.close()
    nfe = 2 * args.steps - 1 if args.sampler == "heun" else args.steps
    print(f"wrote {n} showers for {geometry.name} to {out} ({args.sampler}, {args.steps} steps, {nfe} NFE)")
    return 0

