"""One line of fidelity numbers per evaluated geometry (the demo's table, docs/fidelity.md)."""

from __future__ import annotations

import math

COLUMNS = ("E ratio", "spread", "S(hits)", "mean S", "AUC lo", "AUC hi", "FPD x1e3 (floor)", "KPD x1e3 (floor)")


def fidelity_row(entry: dict) -> dict[str, float]:
    """From one geometry's entry of ``metrics.json`` (``calofm evaluate``): mean visible-energy ratio, spread
    ratio of E_vis/E_inc, separation power of the hit count, mean separation power of the high-level
    histograms, classifier AUCs and FPD/KPD with the reference-halves floor (NaN where not computed)."""

    def get(*keys):
        node = entry
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return math.nan if node is None else float(node)

    hist = entry.get("hist") or {}
    seps = [v["separation_power"] for v in hist.values() if isinstance(v, dict)
            and v.get("separation_power") is not None and not math.isnan(v["separation_power"])]
    return {
        "e_ratio": get("energy", "mean_ratio"), "spread": get("energy", "spread_ratio"),
        "s_hits": get("hist", "n_hits", "separation_power"), "mean_s": sum(seps) / len(seps) if seps else math.nan,
        "auc_low": get("cls-low", "auc"), "auc_high": get("cls-high", "auc"),
        "fpd": get("fpd", "x1e3"), "fpd_floor": get("noise_floor", "fpd", "x1e3"),
        "kpd": get("kpd", "x1e3"), "kpd_floor": get("noise_floor", "kpd", "x1e3"),
    }


def format_rows(rows: list[dict], label: str = "geometry") -> str:
    """A fixed-width table of ``fidelity_row`` dicts, each with a ``label`` entry first."""
    head = (f"{label:>10} {'E ratio':>7} {'spread':>6} {'S(hits)':>7} {'mean S':>6} {'AUC lo':>6} {'AUC hi':>6} "
            f"{'FPD x1e3':>8} {'(floor)':>8} {'KPD x1e3':>8} {'(floor)':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{str(r[label]):>10} {r['e_ratio']:7.3f} {r['spread']:6.2f} {r['s_hits']:7.3f} "
                     f"{r['mean_s']:6.3f} {r['auc_low']:6.3f} {r['auc_high']:6.3f} {r['fpd']:8.1f} "
                     f"{r['fpd_floor']:8.1f} {r['kpd']:8.2f} {r['kpd_floor']:7.2f}")
    return "\n".join(lines)
