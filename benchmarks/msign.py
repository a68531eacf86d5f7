"""msign benchmark (issue 2): the fp32 accuracy bar and per-iteration accuracy per schedule.

For each bar shape and spectrum (κ = 1e3, log-spaced and flat-top) at the default schedule:
max|σ−1|, the iteration count, and the median wall time; then, per schedule (polar_express,
keller, convergent), max|σ−1| after each iteration k = 1..K at κ = 1e1…1e4 (512×256 fp32).
Singular values are measured in fp64 with LAPACK. Default run < 1 minute; --full adds
1024×1024, 2048×2048 and 4096×1536 (where a Frobenius bound of the Gram left a flat-top
spectrum's smallest σ under the schedule's floor) and more repeats.

    python benchmarks/msign.py [--threads N] [--repeats R] [--full]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from modman import msign
from modman.linalg import default_steps
from modman.experiments.machine import machine  # noqa: E402


def spectrum_matrix(m, n, sv, seed):
    g = torch.Generator().manual_seed(seed)
    k = len(sv)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * sv) @ V.T).float()


def spectrum(kind, k, kappa):
    if kind == "log":
        return torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    s = torch.ones(k, dtype=torch.float64)
    s[-1] = 1 / kappa
    return s


def max_dev(Y):
    return float((torch.linalg.svdvals(Y.double()) - 1).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "msign.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = default_steps("polar_express")
    shapes = [(512, 256), (256, 512), (300, 300), (257, 129)] + ([(1024, 1024), (2048, 2048), (4096, 1536)] if args.full else [])
    repeats = args.repeats * (3 if args.full else 1)

    bar = []
    print(f"fp32, κ = 1e3, default schedule polar_express ({steps} iterations), threads={args.threads}")
    print(f"{'shape':>10} {'spectrum':>8} {'max|σ−1|':>10} {'iters':>5} {'median ms':>9} {'≤1e-5':>6}")
    for (m, n) in shapes:
        for kind in ("log", "flat"):
            X = spectrum_matrix(m, n, spectrum(kind, min(m, n), 1e3), seed=m + n)
            msign(X)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                Y = msign(X)
                times.append(time.perf_counter() - t0)
            dev = max_dev(Y)
            # the fewest iterations that meet the bar, for reference
            need = next((k for k in range(max(1, steps - 3), 16) if max_dev(msign(X, steps=k)) <= 1e-5), None)
            row = {"shape": [m, n], "spectrum": kind, "kappa": 1e3, "max_abs_sigma_minus_1": dev,
                   "iterations": steps, "min_iterations_meeting_bar": need,
                   "median_seconds": statistics.median(times), "meets_bar": dev <= 1e-5 and steps <= 12}
            bar.append(row)
            print(f"{m:>4}x{n:<5} {kind:>8} {dev:>10.2e} {steps:>5} {1e3 * row['median_seconds']:>9.2f} "
                  f"{str(row['meets_bar']):>6}")

    per_iter = {}
    K = 14
    print("\nmax|σ−1| per iteration, 512×256 fp32 (log-spaced spectrum)")
    for sched in ("polar_express", "keller", "convergent"):
        per_iter[sched] = {}
        for kappa in (1e1, 1e2, 1e3, 1e4):
            X = spectrum_matrix(512, 256, spectrum("log", 256, kappa), seed=7)
            devs = [max_dev(msign(X, schedule=sched, steps=k)) for k in range(1, K + 1)]
            per_iter[sched][f"{kappa:.0e}"] = devs
            print(f"{sched:>14} κ={kappa:.0e}: " + " ".join(f"{d:.1e}" for d in devs))

    result = {
        "benchmark": "msign", "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(), "dtype": "float32", "default_schedule": "polar_express",
        "default_steps": steps, "bar": bar,
        "bar_ok": all(r["meets_bar"] for r in bar),
        "per_iteration": {"shape": [512, 256], "spectrum": "log", "iterations": list(range(1, K + 1)),
                          "max_abs_sigma_minus_1": per_iter},
        "notes": "times are wall-clock medians on a shared machine; accuracy from fp64 svdvals",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
