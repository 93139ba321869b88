"""``calofm generate``: showers from a trained model (folder, adapter or Hub id) into a native HDF5 file."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import numpy as np

from calofm.cards import card_attrs
from calofm.commands.args import SEED, add_geometry_dir, float_in, int_in, parse_count, parse_range, torch_device
from calofm.generate import MAX_BATCH, MAX_STEPS, ShowerGenerator, load
from calofm.sampling import SAMPLERS


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
    p.add_argument("--steps", type=int_in(1, MAX_STEPS),
                   help="sampler steps (default: the model's: 32, a distilled student its own; Heun: 2N-1 "
                        "network evaluations, the others N)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="heun (default), euler, dpmpp_2m (few steps); consistency for a distilled student (its "
                        "default)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=256)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", type=torch_device, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="network precision (autocast)")
    p.add_argument("--no-cell-cap", dest="cell_cap", action="store_false",
                   help="do not cap cells at the brightest cell (fraction of E_inc) of the training data")
    p.add_argument("--noise-cut", type=float_in(0.0, 1e6),  # 1e6 x eps x E_inc = E_inc: no cell is left
                   help="cells below NOISE_CUT x eps x E_inc -> 0, instead of the model's stored cut "
                        "(docs/fidelity.md: 0.5 keeps more of Par04 Si-W's and ODD's faint hits)")
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
    from calofm.data.integrity import read_json
    from calofm.hub.adapters import ADAPTER_FILE, base_of

    card = args.geometry if args.geometry.endswith((".yaml", ".yml")) else None
    paths = [Path(p) for p in (args.like, card) if p and Path(p).exists()]
    model = Path(args.model).expanduser()
    if model.is_dir():
        paths.append(model)
        if (model / ADAPTER_FILE).is_file():
            with contextlib.suppress(ValueError):  # a damaged adapter is reported when it loads
                info = read_json(model / ADAPTER_FILE)
                base = base_of(model, info)[0] if isinstance(info.get("base"), str) else None
                paths += [Path(base)] if base and Path(base).is_dir() else []
    return paths


def run(args: argparse.Namespace) -> int:
    from calofm.data.format import FileAttrs
    from calofm.data.output import Staging, check_output

    inputs = inputs_of(args)
    out = check_output(Path(args.out), inputs, args.overwrite)  # not onto or into an input, nor over a file
    check_ranges(args)
    gen = load(args.model, device=args.device)
    args.sampler, args.steps, nfe = gen.sampling(args.sampler, args.steps)  # the model's defaults
    geometry = gen.geometry(args.geometry, args.geometry_dir)  # the model's own card first
    cond = conditions(args, geometry)
    n = len(cond["incident_energy"])
    gen._check_energies(cond["incident_energy"].astype(np.float64) / 1e3, geometry.name, "--energy/--like")
    # the card travels with the file too, so a later reader can find a detector that has no built-in card
    attrs = FileAttrs(geometry=geometry.name, particle=geometry.card.particle, mesh_dr=geometry.mesh.dr,
                      mesh_dz=geometry.mesh.dz, generator=f"calofm-generate:{args.model}", seed=args.seed,
                      extra={"gen_steps": args.steps, "gen_sampler": args.sampler, "gen_cell_cap": args.cell_cap,
                             **({"gen_noise_cut": args.noise_cut} if args.noise_cut is not None else {}),
                             **card_attrs(geometry, always=True)})
    # written into a temporary folder beside the output and moved into place when complete: an error or Ctrl-C
    # leaves no partial file and no folder this run created, and an existing output as it was
    with Staging(out.parent, out.name, inputs=inputs) as staging:
        write(gen, geometry, cond, staging.tmp / out.name, attrs, args)
        staging.place(staging.tmp / out.name, out)
    print(f"wrote {n} showers for {geometry.name} to {out} ({args.sampler}, {args.steps} steps, {nfe} NFE)")
    return 0


def write(gen: ShowerGenerator, geometry, cond: dict, out: Path, attrs, args) -> None:
    """Batch by batch into ``out``, with a progress bar."""
    from tqdm.auto import tqdm

    from calofm.data.io import ShowerWriter

    n = len(cond["incident_energy"])
    runner = gen.runner(geometry.name, sampler=args.sampler, steps=args.steps, cell_cap=args.cell_cap,
                        noise_cut=args.noise_cut)
    bar = tqdm(total=n, unit="shower", desc=f"generate {geometry.name}")
    try:
        with ShowerWriter(out, attrs=attrs, compression="gzip") as w:
            for k, start in enumerate(range(0, n, args.batch_size)):
                sl = slice(start, start + args.batch_size)
                e_gev = cond["incident_energy"][sl].astype(np.float64) / 1e3
                showers = gen._batch(runner, e_gev, cond["incident_phi"][sl], cond["incident_theta"][sl],
                                     geometry.name, args.seed, k, precision=args.precision)
                w.append(showers, cond["incident_energy"][sl], cond["incident_phi"][sl], cond["incident_theta"][sl])
                bar.update(len(showers))
    except BaseException:
        bar.leave = False  # the error line should stand alone
        raise
    finally:
        bar.close()
