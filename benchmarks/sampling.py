"""Fast sampling: ms/shower and fidelity of Heun, DPM-Solver++(2M) and a distilled student, PyTorch vs ONNX Runtime.

    python benchmarks/sampling.py --teacher demo_out/pretrain/model --student runs/distill/model
        [--geometry par04_siw] [--eval-showers 1000] [--presets small base] [--out runs/bench_sampling]
        [--timing-only]

Rows: Heun 32 steps (CaloDiT-2's sampler), Heun 10 (the demo's), DPM-Solver++(2M) at 8 and 4 steps, and the
consistency student at 1 and 2 steps. For the trained `small` models (``--teacher``, ``--student``) each row
gets its fidelity: showers generated for the conditions of ``--eval-showers`` held-out simulated ones and
scored by ``calofm evaluate`` (energy ratio, AUC high, FPD beside the reference-halves floor). Then every row
is timed at batch 1 and 100 on this machine in PyTorch (``ShowerSampler``, what ``calofm generate`` runs) and
in ONNX Runtime (the file ``calofm export`` writes, noise drawn inside). The `base` preset (CaloDiT-2 size)
has no trained weights here, so its rows are timed only (random weights: speed does not depend on them);
a cell whose run would exceed ``--budget`` seconds is extrapolated from one timed network evaluation and
marked ``~``. Finished fidelity rows are reused when run again; run the timing pass alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import evaluate, reference, row  # noqa: E402

ROWS = [("heun", 32), ("heun", 10), ("dpmpp_2m", 8), ("dpmpp_2m", 4), ("consistency", 1), ("consistency", 2)]


def generate(model: Path, geometry: str, ref: Path, path: Path, sampler: str, steps: int) -> Path:
    from calofm.cli import main

    if not path.exists():
        rc = main(["-q", "generate", "--model", str(model), "--geometry", geometry, "--like", str(ref), "--sampler",
                   sampler, "--steps", str(steps), "--out", str(path), "--seed", "1", "--batch-size", "250"])
        if rc:
            raise SystemExit(f"generation failed ({rc})")
    return path


def fidelity(models: dict, args, out: Path) -> dict:
    rows = {}
    ref = reference(args.geometry, args.eval_showers, out)
    for sampler, steps in ROWS:
        model = models["student" if sampler == "consistency" else "teacher"]
        tag = f"{sampler}_{steps}"
        gen = generate(model, args.geometry, ref, out / "generated" / f"{tag}.h5", sampler, steps)
        rows[tag] = row(evaluate(ref, gen, out / "evaluation" / tag), args.geometry)
        print(f"{tag}: E ratio {rows[tag]['e_ratio']:.3f} AUC high {rows[tag]['auc_high']:.3f} "
              f"FPD {rows[tag]['fpd']:.1f} ({rows[tag]['fpd_floor']:.1f})", flush=True)
    return rows


def random_models(preset: str, like: Path, folder: Path) -> dict:
    """Untrained teacher and 1-step student of ``preset`` with the data description (geometries, preprocessing)
    of the trained model ``like``, for timing."""
    import calofm
    from calofm.models import CaloDiTModel, preset_config
    from calofm.sampling import student_sigmas

    c = calofm.load(like, device="cpu").config
    out = {}
    for kind in ("teacher", "student"):
        path = folder / f"{preset}_{kind}"
        if not (path / "config.json").exists():
            config = preset_config(preset, variant=c.variant, geometry_slots=c.geometry_slots,
                                   geometry_thresholds=c.geometry_thresholds, geometry_cell_max=c.geometry_cell_max,
                                   preprocessing=c.preprocessing, profile_preprocessing=c.profile_preprocessing)
            if kind == "student":
                config.consistency_sigmas = student_sigmas(1, config.sigma_min, config.sigma_max, config.rho)
            torch.manual_seed(0)
            CaloDiTModel(config).save_pretrained(path)
        out[kind] = path
    return out


def time_torch(model: Path, geometry: str, sampler: str, steps: int, batch: int, budget: float) -> tuple[float, bool]:
    """ms/shower through ShowerSampler (the generate path), or extrapolated from one evaluation (True)."""
    import calofm
    from calofm.sampling import ShowerSampler, network_evaluations

    gen = calofm.load(model, device="cpu")
    e = np.geomspace(1.0, 1000.0, batch)

    def once(s: str, k: int) -> float:
        runner = ShowerSampler(gen.net, gen.config, sampler=s, steps=k)
        t0 = time.perf_counter()
        gen._batch(runner, e, np.zeros(batch), np.full(batch, 1.5708), geometry, 0, 0, precision="fp32")
        return time.perf_counter() - t0

    nfe = network_evaluations(sampler, steps)
    one = min(once("euler" if sampler != "consistency" else "consistency", 1) for _ in range(2))
    if one * nfe > budget:
        return 1e3 * one * nfe / batch, True
    repeats = max(1, int(budget / max(one * nfe, 1e-3) / 2))
    return 1e3 * min(once(sampler, steps) for _ in range(min(repeats, 3))) / batch, False


def time_onnx(model: Path, sampler: str, steps: int, batches: list[int], out: Path, geometry: str,
              budget: float) -> dict[int, tuple[float, bool]]:
    """ms/shower of the exported file in ONNX Runtime (whole sampler, internal noise), per batch size."""
    import onnxruntime as ort

    from calofm.export import export

    path = out / "onnx" / f"{Path(model).name}_{sampler}_{steps}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export(str(model), path, "onnx", sampler=sampler, steps=steps)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    import calofm

    slot = calofm.load(model, device="cpu").slot(geometry)
    times = {}
    for batch in batches:
        feed = {"energy": np.geomspace(1.0, 1000.0, batch).astype(np.float32), "phi": np.zeros(batch, np.float32),
                "theta": np.full(batch, 1.5708, np.float32), "geometry": np.full(batch, slot, np.int64)}
        session.run(None, feed)  # warm-up
        best, total, runs = float("inf"), 0.0, 0
        while runs < 3 and (runs == 0 or total < budget / 2):
            t0 = time.perf_counter()
            session.run(None, feed)
            dt = time.perf_counter() - t0
            best, total, runs = min(best, dt), total + dt, runs + 1
        times[batch] = (1e3 * best / batch, False)
    return times


def fmt(cell) -> str:
    if cell is None:
        return f"{'-':>9}"
    ms, extrapolated = cell
    return f"{'~' if extrapolated else ' '}{ms:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="trained model folder (small; the demo's)")
    ap.add_argument("--student", required=True, help="its distilled student (calofm distill)")
    ap.add_argument("--geometry", default="par04_siw")
    ap.add_argument("--eval-showers", type=int, default=1000)
    ap.add_argument("--presets", nargs="*", default=["small", "base"])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per timed cell before extrapolating")
    ap.add_argument("--onnx-max-nfe", type=int, default=19, help="export and time in ONNX rows up to this NFE")
    ap.add_argument("--out", default="runs/bench_sampling")
    ap.add_argument("--timing-only", action="store_true", help="skip the fidelity pass (reuse finished rows)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from calofm.sampling import network_evaluations

    torch.set_num_threads(torch.get_num_threads())
    trained = {"teacher": Path(args.teacher), "student": Path(args.student)}
    fid_file = out / "fidelity.json"
    fid = json.loads(fid_file.read_text()) if fid_file.exists() else {}
    if not args.timing_only:
        fid = fidelity(trained, args, out)
        fid_file.write_text(json.dumps(fid, indent=1))
    results = []
    for preset in args.presets:
        models = trained if preset == "small" else random_models(preset, trained["teacher"], out / "models")
        geometry = args.geometry
        for sampler, steps in ROWS:
            model = models["student" if sampler == "consistency" else "teacher"]
            nfe = network_evaluations(sampler, steps)
            r = {"preset": preset, "sampler": sampler, "steps": steps, "nfe": nfe,
                 "torch": {b: time_torch(model, geometry, sampler, steps, b, args.budget) for b in (1, 100)}}
            if nfe <= args.onnx_max_nfe and (preset == "small" or sampler == "consistency"):
                r["onnx"] = time_onnx(model, sampler, steps, [1, 100], out, geometry, args.budget)
            if preset == "small":
                r["fidelity"] = fid.get(f"{sampler}_{steps}")
            results.append(r)
            print(f"timed {preset} {sampler} {steps}", flush=True)
    (out / "sampling.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{'preset':>6} {'sampler':>11} {'steps':>5} {'NFE':>4} {'torch bs1':>9} {'torch bs100':>11} "
          f"{'ORT bs1':>9} {'ORT bs100':>9} {'E ratio':>7} {'AUC hi':>6} {'FPD x1e3 (floor)':>17}")
    for r in results:
        f = r.get("fidelity")
        fid_text = (f"{f['e_ratio']:7.3f} {f['auc_high']:6.3f} {f['fpd']:8.1f} ({f['fpd_floor']:6.1f})" if f
                    else f"{'-':>7} {'-':>6} {'-':>17}")
        onnx = r.get("onnx", {})
        print(f"{r['preset']:>6} {r['sampler']:>11} {r['steps']:5d} {r['nfe']:4d} {fmt(r['torch'][1])} "
              f"{fmt(r['torch'][100]):>11} {fmt(onnx.get(1))} {fmt(onnx.get(100))} {fid_text}")
    print("ms/shower (~: extrapolated from one timed network evaluation); NFE per network")


if __name__ == "__main__":
    main()
