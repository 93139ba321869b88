"""What should LoRA adapt, at which rank, learning rate and length? Measured on ALLEGRO fidelity.

    python benchmarks/lora.py --base runs/bench_fidelity/factorised_x1/pretrain/model
        [--eval-showers 2000] [--sample-steps 10] [--out runs/bench_lora] [--only NAME ...]

Each row adapts the base to ALLEGRO with `calofm adapt` (5000 simulated showers, the demo's data) changing
one setting from the reference row "default" (LoRA on attention + MLP + adaLN, rank 8, lr 2e-3, 400 steps: calofm
adapt's defaults before this benchmark; they are now the row "rank 32 + lr 5e-3", docs/fidelity.md), then generates
showers for 2000 held-out simulated ones (``--like``) and scores them as benchmarks/fidelity.py does:
energy ratio, spread ratio, S(n_hits), mean separation power, classifier AUCs, FPD/KPD beside the floor,
and the adaptation's wall time and trainable parameters. Finished rows are reused when run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import ADAPT, evaluate, generate, reference, reset_accelerate, row  # noqa: E402

# the reference row: every other row changes one or two settings of it (passed explicitly, whatever adapt's defaults)
DEFAULT = {"lora_targets": ["attention", "mlp", "adaln"], "rank": 8, "lr": 2e-3, "steps": 400, "method": "lora"}
SETTINGS = {
    "default": {},
    "+final": {"lora_targets": ["attention", "mlp", "adaln", "final"]},
    "+final+embedders": {"lora_targets": ["attention", "mlp", "adaln", "final", "embedders"]},
    "rank 4": {"rank": 4},
    "rank 32": {"rank": 32},
    "lr 5e-4": {"lr": 5e-4},
    "lr 5e-3": {"lr": 5e-3},
    "800 steps": {"steps": 800},
    "rank 32 + lr 5e-3": {"rank": 32, "lr": 5e-3},
    "full fine-tuning": {"method": "full", "lr": 2e-4},
}


def adapt(base: Path, setting: dict, out: Path, cache: str) -> tuple[Path, dict]:
    from calofm.cli import main

    final, info_file = out / "model", out / "run.json"
    if not final.exists():
        s = {**DEFAULT, **setting}
        args = ["-q", "adapt", "--geometry", ADAPT, "--base", str(base), "--out", str(out), "--cache-dir", cache,
                "--steps", str(s["steps"]), "--lr", str(s["lr"]), "--method", s["method"]]
        if s["method"] == "lora":
            args += ["--rank", str(s["rank"]), "--lora-targets", *s["lora_targets"]]
        reset_accelerate()
        t0 = time.perf_counter()
        if main(args):
            raise SystemExit(f"adaptation failed: {args}")
        info_file.write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    meta = json.loads((final / "calofm_adapter.json").read_text()) if (final / "calofm_adapter.json").exists() \
        else {}
    run = json.loads(info_file.read_text())
    return final, {"wall_s": run["wall_s"], "trainable": meta.get("trainable_parameters")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="pretrained model folder")
    ap.add_argument("--eval-showers", type=int, default=2000)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--out", default="runs/bench_lora")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--only", nargs="+", choices=list(SETTINGS), help="a subset of the rows")
    args = ap.parse_args()
    out = Path(args.out)
    cache = args.cache or str(out / "cache")
    ref = reference(ADAPT, args.eval_showers, out)
    rows = []
    for name in args.only or SETTINGS:
        tag = name.replace(" ", "_").replace("+", "plus_")
        model, meta = adapt(Path(args.base), SETTINGS[name], out / tag, cache)
        gen = generate(model, ADAPT, ref, out / tag / "generated", args.sample_steps)
        r = {"setting": name, **meta, **row(evaluate(ref, gen, out / tag / "evaluation"), ADAPT)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    (out / "lora.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'setting':>18} {'trainable':>9} {'adapt s':>7} {'E ratio':>7} {'spread':>6} {'S(hits)':>7} "
          f"{'mean S':>6} {'AUC lo':>6} {'AUC hi':>6} {'FPD x1e3':>17}")
    for r in rows:
        print(f"{r['setting']:>18} {r['trainable'] or 0:9,d} {r['wall_s']:7.0f} {r['e_ratio']:7.3f} "
              f"{r['spread']:6.2f} {r['s_hits']:7.3f} {r['mean_s']:6.3f} {r['auc_low']:6.3f} {r['auc_high']:6.3f} "
              f"{r['fpd']:8.1f} ({r['fpd_floor']:6.1f})")


if __name__ == "__main__":
    main()
