"""Argument types and the error reporting shared by every command (``calofm ...`` and the recipes).

Numeric options are range-checked by argparse types (``int_in``, ``float_in``, ``SEED``): a bad value is a
one-line usage error naming the option, before any work.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from calofm.config import first_line


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


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False):
    """argparse type: a finite float in [low, high] (open at an end with ``low_open`` / ``high_open``); NaN and
    inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        if (low is not None and (value < low or (low_open and value == low))) or (
                high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_bounds(low, high, low_open, high_open)}")
        return value

    return parse


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    lo = "-inf" if low is None else show(low)
    hi = "inf" if high is None else show(high)
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{']' if high is not None and not high_open else ')'}"


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
