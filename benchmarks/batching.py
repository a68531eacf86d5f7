"""Does stacking same-shape parameters into one solve pay? Stacked against one matrix at a time.

    OMP_NUM_THREADS=1 python benchmarks/batching.py        # ~2 min; writes results/batching.json

The issue's solver list asks for batching of same-shape parameters (with a memory cap);
ManifoldMuon stacks them (``foreach=None``/True, ``modman/optim/batching.py``). Two measurements,
fp32, 1 thread, the default solver and tolerance, alternated A B A B, medians:

1. Solves (``rows``): for b same-shape matrices (W on the Stiefel manifold, G Gaussian), b
   separate ``solve_manifold_muon`` calls against one call on the (b, m, n) stack, with the
   largest certified gap of each (the work must be equally accurate to compare). The closed form
   (anderson below m = 2.2n) loops over a batch's members itself, so there a batched call saves
   per-call overhead only.
2. Optimizer steps (``optimizer_rows``): ManifoldMuon's whole step on an MLP of L blocks
   (d→d, d→4d, 4d→d Linear layers with biases; lr 0.02, uniform budget, a batch of 64 inputs) with
   foreach=True against foreach=False — two copies of the model from the same seed, each with its
   own optimizer, fed the same inputs — and the peak temporary memory of one steady-state step
   of each (``modman.diagnostics.memory.peak_temporary_bytes``), in multiples of the largest
   parameter's bytes.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from torch import nn

from modman import ManifoldMuon
from modman.diagnostics.memory import peak_temporary_bytes
from modman.experiments.machine import machine  # noqa: E402
from modman.manifolds import Stiefel  # noqa: E402
from modman.solvers import DEFAULT_SOLVER, SOLVERS, solve_manifold_muon  # noqa: E402


def measure(m: int, n: int, b: int, repeats: int, solver: str) -> dict:
    g = torch.Generator().manual_seed(m * 1000 + n)
    W = torch.stack([Stiefel().random((m, n), generator=g) for _ in range(b)])
    G = torch.randn(b, m, n, generator=g)

    def separate():
        return [solve_manifold_muon(W[i], G[i], solver=solver) for i in range(b)]

    def batched():
        return solve_manifold_muon(W, G, solver=solver)

    separate(), batched()  # warm-up
    t_sep, t_bat = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        one_by_one = separate()
        t_sep.append(time.perf_counter() - t)
        t = time.perf_counter()
        stacked = batched()
        t_bat.append(time.perf_counter() - t)
    sep, bat = statistics.median(t_sep), statistics.median(t_bat)
    return {"shape": [m, n], "batch": b, "separate_s": sep, "batched_s": bat, "speedup": sep / bat,
            "max_gap_separate": max(float(r.duality_gap) for r in one_by_one),
            "max_gap_batched": float(stacked.duality_gap.max())}


def mlp(d: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4 * d), nn.ReLU(),
                                         nn.Linear(4 * d, d)) for _ in range(blocks)])


def measure_optimizer(d: int, blocks: int, steps: int, solver: str) -> dict:
    runs = {}
    for foreach in (True, False):
        model = mlp(d, blocks)
        with warnings.catch_warnings():  # (the default init is moved onto the manifold: said once here)
            warnings.simplefilter("ignore")
            opt = ManifoldMuon(model.modules(), lr=0.02, budget="uniform", solver=solver, foreach=foreach)
        runs[foreach] = (model, opt, [])
    g = torch.Generator().manual_seed(d * 100 + blocks)
    for _ in range(steps):
        x = torch.randn(64, d, generator=g)
        for model, opt, times in runs.values():
            opt.zero_grad()
            model(x).square().mean().backward()
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    largest = max(p.numel() * p.element_size() for p in runs[True][0].parameters())
    peaks = {}
    for foreach, (model, opt, _) in runs.items():  # one more steady-state step, its gradients as last
        peaks[foreach] = peak_temporary_bytes(opt.step, attribute=False).transient_bytes / largest
    stacked, alone = (statistics.median(runs[f][2][2:]) for f in (True, False))
    gap = {f: max(float(s["duality_gap"]) for s in runs[f][1].last_step_stats.values()) for f in (True, False)}
    return {"d": d, "blocks": blocks, "matrices": 3 * blocks, "steps": steps, "stacked_s": stacked,
            "one_at_a_time_s": alone, "speedup": alone / stacked, "peak_x_stacked": peaks[True],
            "peak_x_one_at_a_time": peaks[False], "max_gap_stacked": gap[True], "max_gap_one_at_a_time": gap[False]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="64x32x16,128x64x8,512x128x8,256x256x8,1024x128x4",
                   help="MxNxB,…: b matrices of m×n")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default="32x8,64x8,128x4,256x4", help="DxL,…: L blocks of width d (optimizer steps)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per model (the first 2 not timed)")
    p.add_argument("--solver", default=DEFAULT_SOLVER, choices=sorted(SOLVERS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "batching.json")
    args = p.parse_args()
    bad = [c for c in args.cases.split(",") if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*x[1-9][0-9]*", c)]
    if bad:
        p.error(f"--cases takes MxNxB,… with positive integers, got {bad}")
    if args.repeats < 1:
        p.error(f"--repeats must be ≥ 1, got {args.repeats}")
    bad = [c for c in args.models.split(",") if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", c)]
    if bad:
        p.error(f"--models takes DxL,… with positive integers, got {bad}")
    if args.steps < 3:
        p.error(f"--steps must be ≥ 3 (two warm-up steps), got {args.steps}")
    args.out.parent.mkdir(parents=True, exist_ok=True)  # now, not after the work
    torch.set_num_threads(1)
    rows = []
    for case in args.cases.split(","):
        m, n, b = (int(x) for x in case.split("x"))
        row = measure(m, n, b, args.repeats, args.solver)
        print(f"{m}×{n} ×{b}: separate {row['separate_s'] * 1e3:.1f} ms, batched {row['batched_s'] * 1e3:.1f} ms, "
              f"{row['speedup']:.2f}× (max gaps {row['max_gap_separate']:.1e} / {row['max_gap_batched']:.1e})",
              flush=True)
        rows.append(row)
    optimizer_rows = []
    for case in args.models.split(","):
        d, blocks = (int(x) for x in case.split("x"))
        row = measure_optimizer(d, blocks, args.steps, args.solver)
        print(f"MLP d={d} ×{blocks} blocks: stacked {row['stacked_s'] * 1e3:.1f} ms, one at a time "
              f"{row['one_at_a_time_s'] * 1e3:.1f} ms, {row['speedup']:.2f}×; peak temporary "
              f"{row['peak_x_stacked']:.1f}× / {row['peak_x_one_at_a_time']:.1f}× the largest parameter", flush=True)
        optimizer_rows.append(row)
    args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": machine(1),
                                    "solver": args.solver, "dtype": "float32", "rows": rows,
                                    "optimizer_rows": optimizer_rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
