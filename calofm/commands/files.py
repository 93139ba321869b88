"""``calofm validate``: full check of shower files."""

from __future__ import annotations

import argparse

from calofm.commands.args import add_geometry_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="native shower file(s) (.h5)")
    p.add_argument("--geometry", help="geometry the file must match (needed for files without calofm attributes)")
    add_geometry_dir(p)


def run(args: argparse.Namespace) -> int:
    from calofm.data.io import validate_file
    from calofm.geometry import load_geometry

    geometry = load_geometry(args.geometry, args.geometry_dir) if args.geometry else None
    for path in args.files:
        s = validate_file(path, geometry=geometry, progress=True, geometry_dirs=args.geometry_dir)
        print(f"{path}: OK")
        print(f"  showers          {s['showers']}")
        print(f"  geometry         {s['geometry']}   particle {s['particle']}   energy scale {s['energy_scale']}")
        print(f"  E_inc            {s['E_inc_GeV'][0]:.4g} - {s['E_inc_GeV'][1]:.4g} GeV")
        print(f"  theta            {s['theta'][0]:.3f} - {s['theta'][1]:.3f} rad")
        print(f"  sum E / E_inc    {s['E_sum/E_inc']:.4f}")
        print(f"  hits per shower  {s['hits_per_shower']:.1f}   max cell {s['max_cell_MeV']:.4g} MeV")
        if s["note"]:
            print(f"  note             {s['note']}")
    return 0
