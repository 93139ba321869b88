"""The ``calofm`` command line: one dispatcher, each subcommand in the module that does the work.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and imports heavy
libraries (torch, transformers) inside ``run`` so ``calofm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import re
import sys

from calofm.config import first_line

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "geometries": ("calofm.commands.geometries", "list the detector geometries and their key numbers"),
    "simulate": ("calofm.sim.cli", "simulate showers with the built-in parametrised simulator"),
    "validate": ("calofm.commands.files", "check a shower file and print a summary"),
    "convert": ("calofm.commands.convert", "convert between calofm, CaloChallenge and Parquet files"),
    "generate": ("calofm.generate", "generate showers with a trained model"),
    "evaluate": ("calofm.evaluation.cli", "compare generated with reference showers: metrics, plots, report"),
    "compare-geometries": ("calofm.evaluation.compare", "plot shower profiles of several geometries"),
    "adapt": ("calofm.adapt", "adapt a pretrained model to a new detector (LoRA or full fine-tuning)"),
}


class CliError(ValueError):
    """A command-line value is malformed."""


_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*$")


def parse_count(text: str) -> int:
    """'200k' -> 200000, '1M' -> 1000000, '5000' -> 5000."""
    m = _COUNT.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a count (examples: 5000, 200k, 1M)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number of showers")
    return int(value)


def parse_range(text: str) -> tuple[float, float]:
    """'1:1000' -> (1.0, 1000.0); '50:50' or '50' -> (50.0, 50.0)."""
    parts = str(text).split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a range like 1:1000") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"'{text}' is not a range lo:hi with lo <= hi")
    return values[0], values[1]


def int_in(low: int | None = None, high: int | None = None):
    """argparse type: an integer in [low, high] (either end open when None); argparse names the option."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {_bounds(low, high)}")
        return value

    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """argparse type: a finite float in [low, high] ((low, high] with ``low_open``); NaN and inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_bounds(low, high, low_open)}")
        return value

    return parse


def _bounds(low, high, low_open: bool = False) -> str:
    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    lo = "-inf" if low is None else show(low)
    hi = "inf" if high is None else show(high)
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{']' if high is not None else ')'}"


SEED = int_in(0, 2**63 - 1)  # numpy and torch seeds: non-negative, fits int64


def torch_device(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...). Without this
    check torch raises RuntimeError for an unknown name and AssertionError for CUDA on a CPU build, deep inside the
    first tensor the command makes."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    try:
        if device.type == "meta":
            raise RuntimeError("it holds no data")
        torch.empty(1, device=device).item()
    except (RuntimeError, AssertionError) as err:
        raise argparse.ArgumentTypeError(f"'{text}' is not usable on this machine ({first_line(err)})") from None
    return text


def add_geometry_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--geometry-dir", action="append", default=[], metavar="DIR",
                        help="extra folder of geometry YAML cards (also $CALOFM_GEOMETRY_DIR)")


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


def run_reporting_errors(prog: str, fn, traceback: bool = False) -> int:
    """Exit code of ``fn()``; bad input (ValueError, OSError, KeyError) is one line on stderr and exit 2,
    Ctrl-C exit 130 (also a Ctrl-C that h5py swallowed, see ``calofm.data.output``). ``traceback=True``
    re-raises instead (``-vv``). Anything else keeps its traceback on purpose: where a library raises
    RuntimeError/TypeError on bad input (h5py on damaged files, torch on devices, peft on adapter configs),
    the code that calls it turns that into a one-line error naming the file or option."""
    try:
        from calofm.data.output import catch_interrupts  # here, not at import: `calofm --help` stays light

        with catch_interrupts():
            return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as err:
        if traceback:
            raise
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
