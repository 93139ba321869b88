"""The ``calofm`` command line: one dispatcher; each subcommand is a module of ``calofm.commands``.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and imports heavy
libraries (torch, transformers) inside ``run`` so ``calofm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from calofm.commands.args import run_reporting_errors

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "geometries": ("calofm.commands.geometries", "list the detector geometries and their key numbers"),
    "simulate": ("calofm.commands.simulate", "simulate showers with the built-in parametrised simulator"),
    "validate": ("calofm.commands.files", "check a shower file and print a summary"),
    "convert": ("calofm.commands.convert", "convert between calofm, CaloChallenge and Parquet files"),
    "generate": ("calofm.commands.generate", "generate showers with a trained model"),
    "evaluate": ("calofm.commands.evaluate", "compare generated with reference showers: metrics, plots, report"),
    "compare-geometries": ("calofm.commands.compare_geometries", "plot shower profiles of several geometries"),
    "adapt": ("calofm.commands.adapt", "adapt a pretrained model to a new detector (LoRA or full fine-tuning)"),
    "distill": ("calofm.commands.distill", "distil a trained model into a 1-4 step consistency student"),
    "export": ("calofm.commands.export", "export a model's whole sampler as ONNX or TorchScript (Geant4 Par04, DDML)"),
    "card": ("calofm.commands.card", "write or refresh the model card (README.md) of a model or adapter folder"),
    "push": ("calofm.commands.push", "upload a model, fine-tune or LoRA adapter to the Hugging Face Hub with its card"),
    "pull": ("calofm.commands.pull", "download a model or adapter (and its base) from the Hugging Face Hub"),
    "push-dataset": ("calofm.commands.push_dataset", "upload shower files as Parquet shards with a dataset card"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calofm", description="Calorimeter shower foundation model toolkit.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


_NEGATIVE_RANGE = re.compile(r"^-[0-9.][0-9.eE+-]*:[-0-9.eE+]*$")


def join_negative_ranges(argv: list[str]) -> list[str]:
    """``--phi -3.1416:3.1416`` -> ``--phi=-3.1416:3.1416``: argparse takes a token starting with '-'
    that is not a plain number for an option flag, so a range with a negative lower end needs this."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_RANGE.match(token) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_ranges(sys.argv[1:] if argv is None else list(argv))
    # build only the chosen subcommand's arguments (imports of the others are skipped)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    return run_reporting_errors(f"calofm {args.command}", lambda: module.run(args), traceback=args.verbose > 1)


if __name__ == "__main__":
    sys.exit(main())
