"""Generation speed of the CaloDiT presets: ms/shower vs Heun steps, FLOPs per evaluation, efficiency.

    .venv/bin/python benchmarks/generate.py [--presets tiny small base] [--batches 1 100] [--steps 1 8 32]

Heun with N steps costs NFE = 2N - 1 network evaluations. A (preset, batch, steps) cell is timed by
running the sampler when its estimated time fits ``--budget`` seconds, otherwise it is extrapolated
from the measured time of one evaluation (marked ``~``). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from calofm.diffusion import EDMPrecond, heun_sample
from calofm.models import create_model


def matmul_gflops(n: int = 2048, repeats: int = 8, device: str = "cpu") -> float:
    """Measured float32 matmul rate (GFLOP/s, best of repeats): the practical peak for dense layers."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def inputs(batch: int, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cond = dict(
        energy=torch.rand(batch, generator=g) * 999 + 1,
        phi=torch.rand(batch, generator=g) * 6.28 - 3.14,
        theta=torch.rand(batch, generator=g) + 1,
        geometry=torch.randint(0, 4, (batch,), generator=g),
    )
    noise = torch.randn(batch, 9, 16, 45, generator=g)
    return noise.to(device), {k: v.to(device) for k, v in cond.items()}


def flops_per_eval(precond: EDMPrecond, device) -> float:
    """FLOPs of one network evaluation for one shower (matmuls, convolutions and attention)."""
    # torch counts the CUDA attention kernels but not the CPU flash kernel: map it to the same formula
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_sdpa: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)} if cpu_sdpa else {}
    x, cond = inputs(1, device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        precond(x, torch.ones(1, device=device), **cond)
    return counter.get_total_flops()


def time_call(fn, repeats: int, device) -> float:
    """Median wall time (s) of fn() over repeats (warm up by calling it before)."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_preset(name, batches, steps_list, budget, peak, device) -> list[str]:
    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    with torch.no_grad():  # non-zero adaLN-Zero layers, as after training
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    precond = EDMPrecond(model)
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_eval(precond, device)
    rows = []
    for batch in batches:
        x, cond = inputs(batch, device)
        evaluate = partial(torch.no_grad()(precond), x, torch.ones(batch, device=device), **cond)
        # one evaluation; the first call doubles as warm-up. Repeat only when cheap (base at batch 100 is
        # ~0.9 TFLOP per evaluation)
        t_eval = time_call(evaluate, 1, device)
        if t_eval < budget / 20:
            t_eval = time_call(evaluate, 5, device)
        for steps in steps_list:
            nfe = 2 * steps - 1
            if nfe * t_eval <= budget:
                repeats = max(1, min(5, int(budget / (nfe * t_eval))))
                t = time_call(partial(heun_sample, precond, x, cond, num_steps=steps), repeats, device)
                mark = " "
            else:
                t, mark = nfe * t_eval, "~"
            rate = flops * nfe * batch / t / 1e9
            rows.append(
                f"{name:>5} {n_params / 1e6:7.2f}M {flops / 1e9:10.3f} {batch:5d} {steps:5d} {nfe:4d} "
                f"{mark}{1e3 * t / batch:11.2f} {rate:9.1f} {rate / peak:8.1%}"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 100])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--budget", type=float, default=8.0, help="max seconds per timed sampler run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    peak = matmul_gflops(device=args.device)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"float32 matmul 2048^3: {peak:.1f} GFLOP/s (the 'of peak' reference; measured again at the end)")
    print("GFLOP/eval is per shower; NFE = 2*steps - 1 (Heun); ~ = extrapolated from one evaluation\n")
    print(f"{'model':>5} {'params':>8} {'GFLOP/eval':>10} {'batch':>5} {'steps':>5} {'NFE':>4} "
          f"{'ms/shower':>12} {'GFLOP/s':>9} {'of peak':>8}")  # fmt: skip
    for name in args.presets:
        bench_preset(name, args.batches, args.steps, args.budget, peak, args.device)
    # On a shared machine the rate drifts with other jobs' load; a large change means noisy timings.
    print(f"\nfloat32 matmul at the end: {matmul_gflops(device=args.device):.1f} GFLOP/s (start {peak:.1f})")
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
