"""``calofm compare-geometries``: shower profiles of several detectors side by side (calofm.evaluation.compare)."""

from __future__ import annotations

import argparse

from calofm.commands.args import add_geometry_dir, float_in, int_in
from calofm.evaluation.compare import compare_geometries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", nargs="+", required=True, metavar="FILE.h5", help="one shower file per geometry")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the plots and summary.json")
    parser.add_argument("--geometry", nargs="+", default=None, metavar="NAME",
                        help="geometry per file (default: recorded in the files)")
    parser.add_argument("--threshold", type=float_in(0.0), default=None, metavar="MeV",
                        help="cell threshold (default: each geometry card's)")
    parser.add_argument("--max-showers", type=int_in(1), default=None, metavar="N", help="first N showers of each file")
    add_geometry_dir(parser)


def run(args: argparse.Namespace) -> int:
    summary = compare_geometries(args.files, args.out, args.geometry, args.threshold, args.max_showers,
                                 args.geometry_dir)
    print(f"{'geometry':>12} {'showers':>8} {'<depth>/X0':>10} {'<r>/R_M':>8} {'r90/R_M':>8} {'E_vis/E_inc':>11}")
    for g in summary["geometries"]:
        r90 = f"{g['r90_RM']:.2f}" if g["r90_RM"] is not None else "-"
        print(f"{g['geometry']:>12} {g['n']:>8} {g['mean_depth_X0']:>10.2f} {g['mean_r_RM']:>8.3f} {r90:>8} "
              f"{g['mean_e_vis_over_e_inc']:>11.4f}")
    print(f"plots: {args.out}/profiles.png, {args.out}/response.png")
    return 0
