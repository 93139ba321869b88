"""Simulator throughput per geometry: showers/s and MB/s at 10 GeV, 100 GeV and log-uniform 1 GeV-1 TeV.

    python benchmarks/simulate.py [--samples 2000] [--geometries par04_siw odd ...] [--device cpu]

Targets on 2 CPU cores: >= 2000 showers/s at 10 GeV, >= 300 showers/s log-uniform 1 GeV - 1 TeV
(Geant4 takes seconds per shower). Also prints the spot-by-spot vs binned cost at 100 GeV, which
sets the method crossover in calofm/sim/shower.py.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from calofm.geometry import MESH_SHAPE, load_all
from calofm.sim import Run, SimOptions

MB_PER_SHOWER = math.prod(MESH_SHAPE) * 4 / 1e6  # float32 output
TARGETS = {"10 GeV": 2000, "100 GeV": None, "1-1000 log": 300}


def rate(geometry, n, energy, spectrum="flat", method="auto", device="cpu") -> float:
    run = Run(geometry, n, energy=energy, spectrum=spectrum, seed=1, device=device,
              options=SimOptions(particle=geometry.card.particle, method=method))
    run.chunk(0)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for k in range(run.n_chunks):
        run.chunk(k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--geometries", nargs="*")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    geos = load_all()
    names = args.geometries or list(geos)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.samples} showers per point, {MB_PER_SHOWER * 1e3:.1f} kB per shower")
    header = f"{'geometry':>12} " + " ".join(f"{c + ' /s':>14} {'MB/s':>6}" for c in TARGETS)
    header += f" {'100 GeV spots/binned':>21}"
    print(header)
    worst = {c: float("inf") for c in TARGETS}
    for name in names:
        g = geos[name]
        cells = []
        for col, (energy, spectrum) in zip(TARGETS, [((10, 10), "flat"), ((100, 100), "flat"),
                                                        ((1, 1000), "log-uniform")]):
            r = rate(g, args.samples, energy, spectrum, device=args.device)
            worst[col] = min(worst[col], r)
            cells.append(f"{r:14.0f} {r * MB_PER_SHOWER:6.1f}")
        n_cmp = max(args.samples // 4, 250)
        spots = rate(g, n_cmp, (100, 100), method="spots", device=args.device)
        binned = rate(g, n_cmp, (100, 100), method="binned", device=args.device)
        print(f"{name:>12} " + " ".join(cells) + f" {spots / binned:21.2f}")
    print("\ntarget (worst geometry):")
    for col, target in TARGETS.items():
        if target:
            status = "OK" if worst[col] >= target else "BELOW TARGET"
            print(f"  {col:>12}: {worst[col]:7.0f} showers/s vs >= {target} -> {status}")


if __name__ == "__main__":
    main()
