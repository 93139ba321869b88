"""``calofm evaluate``: generated vs reference showers -> metrics.json, PNG plots and report.md."""

from __future__ import annotations

import argparse

from calofm.commands.args import SEED, add_geometry_dir, float_in, int_in, parse_range

METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd")
MIN_SHOWERS = 10  # = calofm.evaluation.suite.MIN_SHOWERS (not imported: `calofm --help` stays light)


def _metrics(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in chosen if m not in METRICS + ("all",)]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; choose from all, {', '.join(METRICS)}")
    return METRICS if "all" in chosen else chosen


def _fpd_samples(text: str) -> tuple[int, int]:
    lo, hi = parse_range(text)
    if lo != int(lo) or hi != int(hi) or lo < 2:
        raise argparse.ArgumentTypeError(f"'{text}' is not MIN:MAX with whole numbers 2 <= MIN <= MAX")
    return int(lo), int(hi)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", "-r", action="append", required=True, metavar="REF.h5",
                        help="reference (e.g. Geant4) file; repeat for several geometries")
    parser.add_argument("--generated", "-g", action="append", required=True, metavar="GEN.h5",
                        help="generated file: paired if it has the reference's conditions row by row "
                             "(calofm generate --like REF.h5), else compared unpaired (see --pairing)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="report folder")
    parser.add_argument("--metrics", type=_metrics, nargs="+", default=[METRICS], metavar="NAME",
                        help=f"subset of: {', '.join(METRICS)}, separated by spaces or commas (default: all)")
    parser.add_argument("--pairing", choices=("auto", "paired", "unpaired"), default="auto",
                        help="auto (default): paired when the conditions match row by row, else unpaired (conditions "
                             "compared and reported); paired: refuse other conditions; unpaired: always")
    parser.add_argument("--threshold", type=float_in(0.0), default=None, metavar="MeV",
                        help="cell threshold applied to both files (default: the geometry card's)")
    parser.add_argument("--geometry", action="append", default=None, metavar="NAME",
                        help="geometry per pair (default: recorded in the files)")
    parser.add_argument("--max-showers", type=int_in(MIN_SHOWERS), default=None, metavar="N",
                        help=f"use the first N showers only (N >= {MIN_SHOWERS})")
    parser.add_argument("--epochs", type=int_in(1), default=None,
                        help="classifier epochs (default 10 on CPU, 50 on GPU)")
    parser.add_argument("--full-classifier", action="store_true",
                        help="the full CaloChallenge recipe (width 2048, 50 epochs) even on CPU")
    parser.add_argument("--n-runs", type=int_in(1), default=1, help="independent classifier trainings (paper: 10)")
    parser.add_argument("--fpd-samples", type=_fpd_samples, default=(10_000, 50_000), metavar="MIN:MAX",
                        help="FPD batch sizes (default 10000:50000, as the CaloChallenge)")
    parser.add_argument("--kpd-batch", type=int_in(2), default=None,
                        help="KPD batch size (default 10000 as the CaloChallenge, or the sample size if smaller)")
    parser.add_argument("--no-noise-floor", action="store_true",
                        help="skip the reference-half-vs-half comparison (reruns every metric on N/2 vs N/2)")
    parser.add_argument("--no-plots", action="store_true", help="metrics and report only")
    parser.add_argument("--seed", type=SEED, default=0)
    add_geometry_dir(parser)


def options_from_args(args: argparse.Namespace):
    """EvalOptions from the command line."""
    from dataclasses import replace

    from calofm.evaluation.classifier import FULL_RECIPE, default_config
    from calofm.evaluation.suite import EvalOptions

    cls = default_config()
    if args.full_classifier:
        cls = replace(FULL_RECIPE, device=cls.device)
    cls = replace(cls, n_runs=args.n_runs, seed=args.seed, epochs=args.epochs or cls.epochs)
    metrics = tuple(dict.fromkeys(m for group in args.metrics for m in group))  # `hist fpd` or `hist,fpd`
    options = EvalOptions(metrics=metrics, threshold=args.threshold, noise_floor=not args.no_noise_floor,
                          classifier=cls, max_showers=args.max_showers, plots=not args.no_plots, seed=args.seed,
                          progress=not getattr(args, "quiet", False),
                          fpd_samples=tuple(int(v) for v in args.fpd_samples), kpd_batch=args.kpd_batch,
                          pairing=args.pairing)
    return options


def run(args: argparse.Namespace) -> int:
    from calofm.evaluation.suite import evaluate

    if len(args.reference) != len(args.generated):
        raise ValueError(f"{len(args.reference)} --reference but {len(args.generated)} --generated files")
    if args.geometry is not None and len(args.geometry) not in (1, len(args.reference)):
        raise ValueError(f"give one --geometry per file pair ({len(args.reference)}), or one for all")
    options = options_from_args(args)
    geometry = args.geometry * len(args.reference) if args.geometry and len(args.geometry) == 1 else args.geometry
    metrics = evaluate(args.reference, args.generated, args.out, geometry=geometry, options=options,
                       extra_dirs=args.geometry_dir)
    for name, entry in metrics["geometries"].items():
        parts = [f"{m} AUC {entry[m]['auc']:.3f}" for m in ("cls-low", "cls-high") if entry.get(m)]
        parts += [f"{m.upper()} x1e3 {entry[m]['x1e3']:.3f}" for m in ("fpd", "kpd") if entry.get(m)]
        if entry.get("hist"):
            parts.append(f"S(E_tot/E_inc) {entry['hist']['e_ratio']['separation_power']:.2e}")
        differ = (entry.get("conditions") or {}).get("differ")
        parts.append(entry["pairing"] + (f" (conditions differ: {', '.join(differ)})" if differ else ""))
        print(f"{name}: " + ", ".join(parts))
    print(f"report: {args.out}/report.md")
    return 0
