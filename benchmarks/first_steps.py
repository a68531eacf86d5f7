"""The first steps of training, per matrix: where a solver meets rank-deficient momentum.

    OMP_NUM_THREADS=1 python benchmarks/first_steps.py [--hidden 1024] [--steps 12] [--solver anderson]

MLP 784→H→H→10 (bias-free, as in benchmarks/solvers.py), synthetic data, a fresh batch of 128
every step, modman.ManifoldMuon(model.modules(), solver=..., budget="uniform", lr=0.05). The
momentum of step t has rank ≤ 128·(t+1), so the first layer's (1024×784 at H = 1024, m < 2n) is
rank-deficient for the first six steps. For every step and matrix: the solve's wall time, its
iterations, certified gap and msign-equivalents (the solver's flop model). Writes
benchmarks/results/first_steps.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import warnings

import torch

import modman
import modman.optim.functional as F
from modman.experiments.machine import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--solver", default="anderson")
    ap.add_argument("--out", type=pathlib.Path,
                    default=pathlib.Path(__file__).resolve().parent / "results" / "first_steps.json")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)  # now, not after the work
    torch.set_num_threads(1)
    torch.manual_seed(0)
    H = args.hidden
    model = torch.nn.Sequential(torch.nn.Linear(784, H, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(H, H, bias=False), torch.nn.ReLU(), torch.nn.Linear(H, 10, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon(model.modules(), solver=args.solver, budget="uniform", lr=0.05)
    X = torch.randn(2048, 784)
    y = (X[:, :10] @ torch.randn(10, 10)).argmax(1)
    real = F.solve_manifold_muon
    solves = []

    def timed(W, G, **kw):
        t = time.perf_counter()
        r = real(W, G, **kw)
        solves.append({"shape": list(W.shape), "solve_s": time.perf_counter() - t, "iterations": r.iterations,
                       "duality_gap": float(r.duality_gap), "msign_equivalents": r.msign_equivalents})
        return r

    F.solve_manifold_muon = timed
    rows = []
    for step in range(args.steps):
        idx = torch.randint(0, 2048, (128,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        solves.clear()
        t = time.perf_counter()
        opt.step()
        rows.append({"step": step, "step_s": time.perf_counter() - t, "matrices": list(solves)})
        print(f"step {step}: {rows[-1]['step_s']:.2f} s " + " ".join(
            f"{tuple(m['shape'])}: {m['solve_s']:.2f} s it {m['iterations']} gap {m['duality_gap']:.1e}"
            for m in solves), flush=True)
    F.solve_manifold_muon = real
    out = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python " + " ".join(sys.argv),
           "machine": machine(), "model": f"bias-free MLP 784→{H}→{H}→10, batch 128, fresh batches",
           "optimizer": f"ManifoldMuon(model.modules(), solver={args.solver!r}, budget='uniform', lr=0.05)",
           "steps": rows}
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
