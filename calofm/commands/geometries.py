"""``calofm geometries``: table of the available detector geometries."""

from __future__ import annotations

import argparse
import json

from calofm.commands.args import add_geometry_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_geometry_dir(p)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--sections", action="store_true", help="also list the derived values of every stack section")


def run(args: argparse.Namespace) -> int:
    from calofm.geometry import geometry_table, load_all

    geos = load_all(args.geometry_dir)
    if args.json:
        print(json.dumps({n: g.summary() for n, g in geos.items()}, indent=1))
        return 0
    print(geometry_table(geos))
    if args.sections:
        for g in geos.values():
            print(f"\n{g.name} ({g.source})")
            print(f"  {'section':>10} {'start':>7} {'thick':>7} {'X0':>6} {'R_M':>6} {'Ec':>6} {'f_mip':>6} "
                  f"{'e/mip':>5} {'f_em':>6} {'F_S':>5}")
            for s in g.sections:
                print(f"  {s.name:>10} {s.start:7.1f} {s.thickness:7.1f} {s.X0:6.2f} {s.R_M:6.1f} {s.Ec:6.1f} "
                      f"{s.f_mip:6.4f} {s.e_mip:5.2f} {s.f_em:6.4f} {s.F_S:5.2f}")
    return 0
