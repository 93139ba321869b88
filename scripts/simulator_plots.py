"""Plots for docs/simulator.md: longitudinal and radial profiles of every geometry from the simulator.

    python scripts/simulator_plots.py [--samples 2000] [--energy 50] [--out docs/img]

Simulates each geometry card at a fixed energy and normal incidence (photons, visible energy) and
draws the profiles with calofm.evaluation.compare_geometries (depth in mm and X0, radius in mm and
R_M), then a response plot over each card's own energy range.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

from calofm.evaluation import compare_geometries
from calofm.geometry import load_all
from calofm.sim import simulate_to_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--energy", type=float, default=50.0, help="GeV, fixed, for the profiles")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fixed, spectrum = [], []
        for name in load_all():
            f = Path(tmp) / f"{name}_{args.energy:g}GeV.h5"
            simulate_to_file(f, name, args.samples, energy=(args.energy, args.energy),
                             theta=(math.pi / 2, math.pi / 2), phi=(0.0, 0.0), seed=1, progress=False)
            fixed.append(f)
            g = Path(tmp) / f"{name}.h5"  # the card's own energy range and angles
            simulate_to_file(g, name, args.samples, seed=2, progress=False)
            spectrum.append(g)
        compare_geometries(fixed, Path(tmp) / "fixed")
        compare_geometries(spectrum, Path(tmp) / "cards")
        shutil.copy(Path(tmp) / "fixed" / "profiles.png", out / "simulator_profiles.png")
        shutil.copy(Path(tmp) / "cards" / "response.png", out / "simulator_response.png")
        shutil.copy(Path(tmp) / "fixed" / "summary.json", out / "simulator_profiles_summary.json")
    print(f"wrote {out / 'simulator_profiles.png'} and {out / 'simulator_response.png'}")


if __name__ == "__main__":
    main()
