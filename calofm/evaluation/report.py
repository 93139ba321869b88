"""metrics.json and report.md: one section per geometry, the reference-halves noise floor beside each value."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from calofm.evaluation.histograms import SPECS

log = logging.getLogger(__name__)

# (label, path into the results, scale) for the summary table
SUMMARY_ROWS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("AUC low-level (cls-low)", ("cls-low", "auc"), 1.0),
    ("JSD low-level", ("cls-low", "jsd"), 1.0),
    ("AUC high-level (cls-high)", ("cls-high", "auc"), 1.0),
    ("JSD high-level", ("cls-high", "jsd"), 1.0),
    ("FPD x 1e3", ("fpd", "value"), 1e3),
    ("KPD x 1e3", ("kpd", "value"), 1e3),
    *((f"S {s.key}" + (" (mean over layers)" if s.per_layer else ""), ("hist", s.key, "separation_power"), 1.0)
      for s in SPECS),
    ("S voxel spectrum", ("hist", "voxel_spectrum", "separation_power"), 1.0),
    ("W1/sigma_ref E_tot/E_inc", ("hist", "e_ratio", "w1_rel"), 1.0),
    ("chi2/ndf mean longitudinal profile", ("hist", "longitudinal_profile", "chi2_ndf"), 1.0),
    ("chi2/ndf mean radial profile", ("hist", "radial_profile", "chi2_ndf"), 1.0),
)
ERRORS = {("cls-low", "auc"): "auc_std", ("cls-low", "jsd"): "jsd_std", ("cls-high", "auc"): "auc_std",
          ("cls-high", "jsd"): "jsd_std", ("fpd", "value"): "error", ("kpd", "value"): "error"}


def _get(d: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _fmt(value, scale: float = 1.0, err=None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    v = value * scale
    text = f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.3e}"
    if err is not None and math.isfinite(err) and err > 0:
        e = err * scale
        text += f" ± {e:.4f}" if 1e-3 <= abs(e) < 1e4 else f" ± {e:.2e}"
    return text


def _cell(results: dict | None, path: tuple[str, ...], scale: float) -> str:
    err_key = ERRORS.get(path)
    err = _get(results, (*path[:-1], err_key)) if err_key else None
    return _fmt(_get(results, path), scale, err)


def to_jsonable(obj):
    """NaN/inf -> null, numpy scalars and arrays -> Python values, dataclasses -> dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def summary_table(results: dict, floor: dict | None) -> list[str]:
    lines = ["| metric | generated vs reference | reference half vs half (noise floor) |", "|---|---|---|"]
    for label, path, scale in SUMMARY_ROWS:
        if _get(results, path) is None:
            continue
        lines.append(f"| {label} | {_cell(results, path, scale)} | {_cell(floor, path, scale)} |")
    return lines


def range_table(ranges: dict) -> list[str]:
    if not ranges:
        return []
    labels = list(ranges)
    lines = ["| feature | " + " | ".join(f"S {lab}" for lab in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines.append("| showers (ref / gen) | " + " | ".join(
        f"{ranges[lab]['n_reference']} / {ranges[lab]['n_generated']}" for lab in labels) + " |")
    for spec in SPECS:
        row = [_fmt(_get(ranges[lab], ("hist", spec.key, "separation_power"))) for lab in labels]
        lines.append(f"| {spec.key} | " + " | ".join(row) + " |")
    for key in ("e_ratio", "n_hits"):
        row = [f"{ranges[lab]['mean_reference'][key]:.4g} / {ranges[lab]['mean_generated'][key]:.4g}" for lab in labels]
        lines.append(f"| mean {key} (ref / gen) | " + " | ".join(row) + " |")
    return lines


def conditions_lines(results: dict) -> list[str]:
    """How the samples were paired; for unpaired samples, their condition distributions side by side."""
    if results.get("pairing") != "unpaired":
        return ["Paired: the generated showers have the reference's conditions row by row.", ""]
    cond = results["conditions"]
    lines = ["Unpaired: two independent samples, compared at the distribution level. Their conditions:", "",
             "| condition | mean ref / gen | std ref / gen | S | KS statistic | KS p-value |",
             "|---|---|---|---|---|---|"]
    for key in ("incident_energy", "incident_phi", "incident_theta"):
        c = cond[key]
        lines.append(f"| {key} [{c['unit']}] | {c['mean_reference']:.4g} / {c['mean_generated']:.4g} | "
                     f"{c['std_reference']:.4g} / {c['std_generated']:.4g} | {_fmt(c['separation_power'])} | "
                     f"{c['ks_statistic']:.3f} | {c['ks_p_value']:.2e} |")
    if cond["differ"]:
        lines += ["", f"**Warning:** the condition distributions differ ({', '.join(cond['differ'])}, KS p < 1e-3): "
                      "every metric below mixes shower and spectrum differences."]
    return [*lines, ""]


def write_report(pairs: list[dict], out_dir: Path, options) -> dict:
    """Plots per geometry, then metrics.json and report.md in ``out_dir``; returns the metrics dict."""
    from calofm.evaluation.plots import plot_comparison

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"created": datetime.now(UTC).isoformat(timespec="seconds"),
               "options": to_jsonable(options), "geometries": {}}
    md = ["# calofm evaluation report", "", f"Created {metrics['created']}. Metrics: {', '.join(options.metrics)}.",
          "Definitions: docs/evaluation.md (CaloChallenge 2022 metrics on the (r, phi, z) mesh).", ""]
    for pair in pairs:
        geo, comp, floor = pair["geometry"], pair["comparison"], pair["floor"]
        key = geo.name
        while key in metrics["geometries"]:
            key += "_"
        sub = out_dir / key
        entry = {"reference": pair["reference"], "generated": pair["generated"], "geometry": geo.name,
                 **comp.results, "noise_floor": floor.results if floor is not None else None}
        metrics["geometries"][key] = entry
        plots = []
        if options.plots:
            floor_hist = floor.results.get("hist") if floor is not None else None
            plots = plot_comparison(comp, geo, sub, options.energy_ranges, floor_hist)
        md += [f"## {key}", "", f"- reference: `{pair['reference']}`", f"- generated: `{pair['generated']}`",
               f"- showers: {comp.results['n_reference']} reference, {comp.results['n_generated']} generated; "
               f"threshold {comp.results['threshold_MeV']:g} MeV; "
               f"noise floor: {'two random halves of the reference' if floor is not None else 'not computed'}", ""]
        md += conditions_lines(comp.results)
        md += summary_table(comp.results, floor.results if floor is not None else None) + [""]
        ranges = comp.results.get("energy_ranges") or {}
        if ranges:
            md += ["### Per incident-energy range", ""] + range_table(ranges) + [""]
        if plots:
            md += ["### Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    (out_dir / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=1) + "\n")
    (out_dir / "report.md").write_text("\n".join(md))
    return to_jsonable(metrics)
