"""Evaluation suite: CaloChallenge 2022 metrics on the (r, phi, z) mesh, for several geometries.

Public API (imported lazily so ``calofm --help`` stays fast):
``evaluate(reference, generated, out_dir, metrics=None, threshold=None, geometry=None, options=None) -> dict``,
``compare_samples(ref, gen, geometry, options) -> Comparison``, ``EvalOptions``, ``compare_geometries``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "calofm.evaluation.suite",
    "evaluate_pair": "calofm.evaluation.suite",
    "compare_samples": "calofm.evaluation.suite",
    "check_conditions": "calofm.evaluation.suite",
    "EvalOptions": "calofm.evaluation.suite",
    "ClassifierConfig": "calofm.evaluation.classifier",
    "classifier_test": "calofm.evaluation.classifier",
    "fpd": "calofm.evaluation.fpd",
    "kpd": "calofm.evaluation.fpd",
    "shower_features": "calofm.evaluation.features",
    "high_level_vector": "calofm.evaluation.features",
    "separation_power": "calofm.evaluation.histograms",
    "compare_geometries": "calofm.evaluation.compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'calofm.evaluation' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
