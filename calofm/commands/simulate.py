"""``calofm simulate``: showers from the built-in simulator into a native file."""

from __future__ import annotations

import argparse
from pathlib import Path

from calofm.commands.args import SEED, add_geometry_dir, parse_count, parse_range, torch_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--geometry", required=True, help="geometry name (see `calofm geometries`) or a .yaml card")
    p.add_argument("--samples", type=parse_count, required=True, help="number of showers, e.g. 5000, 10k, 1M")
    p.add_argument("--out", required=True, help="output .h5 file")
    p.add_argument("--energy", type=parse_range, help="GeV range lo:hi (50:50 = fixed); default: the card's")
    p.add_argument("--theta", type=parse_range, help="rad range lo:hi (1.5708:1.5708 = normal incidence)")
    p.add_argument("--phi", type=parse_range, help="rad range lo:hi; default: the card's (full circle)")
    p.add_argument("--spectrum", choices=["flat", "log-uniform"], help="energy spectrum; default: the card's")
    p.add_argument("--particle", choices=["gamma", "e-", "e+"], help="default: the card's particle")
    p.add_argument("--energy-scale", choices=["visible", "deposited"], default="visible",
                   help="visible = active-layer energy (LEMURS); deposited = sampling-fraction corrected")
    p.add_argument("--no-threshold", action="store_true", help="keep cells below the readout threshold")
    p.add_argument("--seed", type=SEED, default=0,
                   help="random seed in [0, 2^63) (the output depends only on seed and settings)")
    p.add_argument("--compression", choices=["gzip", "lzf", "none"], default="gzip")
    p.add_argument("--device", type=torch_device, default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--restart", action="store_true", help="ignore a .partial file from an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_geometry_dir(p)


def run(args: argparse.Namespace) -> int:
    from calofm.data.output import check_output
    from calofm.geometry import load_geometry
    from calofm.sim.run import simulate_to_file
    from calofm.sim.shower import SimOptions

    geometry = load_geometry(args.geometry, args.geometry_dir)
    out = check_output(Path(args.out), [geometry.source], args.overwrite)  # never onto the card it reads
    options = SimOptions(
        particle=args.particle or geometry.card.particle,
        energy_scale=args.energy_scale,
        threshold=not args.no_threshold,
    )
    path = simulate_to_file(
        out, geometry, args.samples, energy=args.energy, theta=args.theta, phi=args.phi, spectrum=args.spectrum,
        seed=args.seed, options=options, device=args.device, progress=True, resume=not args.restart,
        compression=None if args.compression == "none" else args.compression,
    )
    print(f"wrote {args.samples} {options.particle} showers for {geometry.name} to {path}")
    return 0
