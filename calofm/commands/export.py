"""``calofm export``: a trained model's whole sampler as one ONNX or TorchScript file (calofm.export)."""

from __future__ import annotations

import argparse

from calofm.commands.args import int_in
from calofm.export import FORMATS, MAX_OPSET, MIN_OPSET
from calofm.generate import MAX_STEPS
from calofm.sampling import SAMPLERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model folder (pretrained, fine-tuned, merged or distilled) or Hub id")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx or .pt)")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS),
                   help="sampler steps in the graph (default: the model's: 32, a distilled student its own)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: heun, or consistency for a distilled student")
    p.add_argument("--geant4-par04", dest="par04", action="store_true",
                   help="Geant4 Par04's contract: input (B, 8) = [E GeV, phi, theta, 5-slot one-hot], "
                        "output (B, 6480) GeV")
    p.add_argument("--slot-map", nargs=5, metavar="GEOMETRY",
                   help="with --geant4-par04: the model geometry behind each one-hot position ('-' for none; "
                        "default: par04_siw par04_scipb odd cld and the model's one other geometry)")
    p.add_argument("--noise-inputs", action="store_true",
                   help="take the noise as inputs instead of drawing it inside (to compare runtimes exactly)")
    p.add_argument("--opset", type=int_in(MIN_OPSET, MAX_OPSET), default=17, help="ONNX opset")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from calofm.export import export

    if args.slot_map and not args.par04:
        raise ValueError("--slot-map applies to --geant4-par04 only")
    info = export(args.model, args.out, args.format, sampler=args.sampler, steps=args.steps, par04=args.par04,
                  slot_map=args.slot_map, noise_inputs=args.noise_inputs, opset=args.opset,
                  overwrite=args.overwrite)
    print(f"wrote {args.out} ({args.format}; {info['sampler']}, {info['steps']} steps; inputs "
          f"{', '.join(info['inputs'])} -> {', '.join(info['outputs'])}; ran batches of 1 and 3: "
          f"{' and '.join(str(s) for s in info['shapes'])})")
    if "slot_map" in info:
        print("one-hot positions: " + ", ".join(f"{k + 3}: {g or 'none (NaN output)'}"
                                                for k, g in enumerate(info["slot_map"])))
    return 0
