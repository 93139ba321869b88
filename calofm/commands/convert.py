"""``calofm convert IN OUT --to {calofm,calochallenge,parquet}``."""

from __future__ import annotations

import argparse

from calofm.commands.args import add_geometry_dir, float_in


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="IN", help="native .h5, CaloChallenge .hdf5, or a Parquet folder/file")
    p.add_argument("dst", metavar="OUT", help="output file (or folder for Parquet); never an input or inside one")
    p.add_argument("--to", required=True, choices=["calofm", "calochallenge", "parquet"], help="output format")
    p.add_argument("--geometry", help="geometry to record when importing (CaloChallenge default: par04_siw), or "
                                      "the geometry a native file must match (it sets the CaloChallenge binning XML)")
    add_geometry_dir(p)
    p.add_argument("--dataset", type=int, choices=[2, 3], default=2,
                   help="CaloChallenge export granularity: 2 (exact, 6480 voxels) or 3 (40500, phi split by overlap)")
    p.add_argument("--scale", type=float_in(0.0, low_open=True), default=1.0,
                   help="multiply voxels on CaloChallenge export, > 0 (1/f_samp of the geometry for visible-energy "
                        "files, see docs/format.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (a Parquet folder only if it holds nothing but calofm's shards)")


def run(args: argparse.Namespace) -> int:
    from calofm.data.calochallenge import binning_path
    from calofm.data.convert import convert

    out = convert(args.src, args.dst, args.to, geometry=args.geometry, dataset=args.dataset, scale=args.scale,
                  geometry_dirs=args.geometry_dir, overwrite=args.overwrite,
                  progress=not getattr(args, "quiet", False))
    print(f"wrote {out}" + (f" and {binning_path(out)}" if args.to == "calochallenge" else ""))
    return 0
