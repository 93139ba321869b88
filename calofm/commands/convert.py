"""``calofm convert IN OUT --to {calofm,calochallenge,parquet}``."""

from __future__ import annotations

import argparse

from calofm.cli import add_geometry_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="IN", help="native .h5, CaloChallenge .hdf5, or a Parquet folder/file")
    p.add_argument("dst", metavar="OUT", help="output file (or folder for Parquet)")
    p.add_argument("--to", required=True, choices=["calofm", "calochallenge", "parquet"], help="output format")
    p.add_argument("--geometry", help="geometry to record when importing (CaloChallenge default: par04_siw)")
    add_geometry_dir(p)
    p.add_argument("--dataset", type=int, choices=[2, 3], default=2,
                   help="CaloChallenge export granularity: 2 (exact, 6480 voxels) or 3 (40500, phi split by overlap)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply voxels on CaloChallenge export (e.g. 30.3 = 1/0.033 for visible Si energy)")


def run(args: argparse.Namespace) -> int:
    from calofm.data.convert import convert

    out = convert(args.src, args.dst, args.to, geometry=args.geometry, dataset=args.dataset, scale=args.scale,
                  geometry_dirs=args.geometry_dir)
    print(f"wrote {out}")
    return 0
