"""Would batching same-shape parameters into one solve pay? One batched solve against one solve per matrix.

    OMP_NUM_THREADS=1 python benchmarks/batching.py        # ~1 min; writes results/batching.json

The issue's solver list asks for batching of same-shape parameters (with a memory cap).
``solve_manifold_muon`` takes a batch (…, m, n), and ManifoldMuon batches a 3-D expert stack and
a grouped convolution's blocks; it does not gather separate same-shape Linear weights into one
call. This measures what gathering them would gain on this machine: for b same-shape matrices
(W on the Stiefel manifold, G Gaussian, fp32, 1 thread, the default solver and tolerance), the
median time of b separate solves and of one solve of the (b, m, n) stack, alternated A B A B,
and the largest certified gap of each (the work must be equally accurate to compare). The
closed form (anderson below m = 2.2n) loops over a batch's members itself, so there a batched
call saves per-call overhead only.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="64x32x16,128x64x8,512x128x8,256x256x8,1024x128x4",
                   help="MxNxB,…: b matrices of m×n")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--solver", default=DEFAULT_SOLVER, choices=sorted(SOLVERS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "batching.json")
    args = p.parse_args()
    bad = [c for c in args.cases.split(",") if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*x[1-9][0-9]*", c)]
    if bad:
        p.error(f"--cases takes MxNxB,… with positive integers, got {bad}")
    if args.repeats < 1:
        p.error(f"--repeats must be ≥ 1, got {args.repeats}")
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
    args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": machine(1),
                                    "solver": args.solver, "dtype": "float32", "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
