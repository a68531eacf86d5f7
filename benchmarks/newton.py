"""Benchmark the "newton" solver against issue 4's bars (run with OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 python benchmarks/newton.py [--hidden 256] [--steps 51]

(1) Accuracy suite, fp32: certified gap and tangent residual (≤ 1e-4 each) on tall, wide, square,
    odd-n, rank-deficient G, m < 2n, G scaled by 1e-6 and 1e4; cold starts.
(2) Training: modman.ManifoldMuon(model.modules(), solver="newton") on a bias-free MLP
    784→H→H→10 (H = 1024 is the issue's size; --hidden scales it down) with synthetic data; side
    by side in one process, alternating every step, modman.Muon(ns_dtype="float32",
    ns_schedule="polar_express", ns_steps=None) and torch.optim.Muon on copies of the model.
    Per matrix and step the solver's results are recorded by wrapping the solver entry point the
    optimizer calls (instrumentation only). msign-equivalents per matrix per step are reported
    two ways: the solver's flop model (``SolveResult.msign_equivalents``) and measured time of
    the solve over the time of one default fp32 msign of the same matrix. Averages over steps
    10–(steps−1). Writes benchmarks/results/solvers.json (the "newton" entry; other entries kept).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from modman.experiments.machine import machine  # noqa: E402

import modman  # noqa: E402
import modman.optim.functional as F  # noqa: E402
from modman import msign  # noqa: E402
from modman.manifolds import Stiefel  # noqa: E402
from modman.solvers import solve_manifold_muon  # noqa: E402


def suite():
    g = torch.Generator().manual_seed(0)
    rows = []
    cases = [("tall", 256, 64, None, 1.0), ("wide", 64, 256, None, 1.0), ("square", 128, 128, None, 1.0),
             ("odd_n", 129, 129, None, 1.0), ("odd_n_tall", 300, 127, None, 1.0), ("rank_deficient", 256, 64, 4, 1.0),
             ("rank_deficient_m<2n", 200, 150, 8, 1.0), ("m<2n", 200, 150, None, 1.0), ("m<2n_mlp", 1024, 784, None, 1.0),
             ("scaled_1e-6", 256, 64, None, 1e-6), ("scaled_1e4", 256, 64, None, 1e4)]
    for name, m, n, r, c in cases:
        W = Stiefel().random((m, n), generator=g, dtype=torch.float64).float()
        k = r or min(m, n)
        G = (c * torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)).float()
        t = time.perf_counter()
        res = solve_manifold_muon(W, G, solver="newton")
        t = time.perf_counter() - t
        t0 = time.perf_counter()
        msign(G)
        t0 = time.perf_counter() - t0
        row = {"case": name, "shape": [m, n], "rank": k, "scale": c, "gap": res.duality_gap.item(),
               "tangent_residual": res.tangent_residual.item(), "newton_steps": res.iterations,
               "msign_equivalents_model": res.msign_equivalents, "msign_equivalents_time": t / t0}
        rows.append(row)
        print("suite", json.dumps(row), flush=True)
    return rows


def training(hidden, steps, lr=0.05):
    torch.manual_seed(0)
    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(784, hidden, bias=False), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, hidden, bias=False), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, 10, bias=False))
    base = mlp()
    models = {"newton": copy.deepcopy(base), "own_muon": copy.deepcopy(base), "torch_muon": copy.deepcopy(base)}
    opts = {"newton": modman.ManifoldMuon(models["newton"].modules(), lr=lr, solver="newton"),
            "own_muon": modman.Muon(models["own_muon"].modules(), lr=lr, ns_dtype="float32",
                                    ns_schedule="polar_express", ns_steps=None, torch_arithmetic=False),
            "torch_muon": torch.optim.Muon([p for p in models["torch_muon"].parameters()], lr=lr)}
    X = torch.randn(2048, 784)
    y = (X[:, :10] @ torch.randn(10, 10)).argmax(1)
    rec = []
    real = F.solve_manifold_muon

    def spy(W, G, **kw):
        t = time.perf_counter()
        res = real(W, G, **kw)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        msign(G)
        t_ms = time.perf_counter() - t
        rec.append((tuple(W.shape), res, dt, t_ms))
        return res

    F.solve_manifold_muon = spy
    times = {k: [] for k in opts}
    out = {"per_step": []}
    for step in range(steps):
        idx = torch.randint(0, 2048, (128,))
        for name in (["newton", "own_muon", "torch_muon"] if step % 2 == 0 else ["torch_muon", "own_muon", "newton"]):
            model, opt = models[name], opts[name]
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            n0 = len(rec)
            t = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t
            if step >= 10:
                times[name].append(dt)
            if name == "newton":
                mine = rec[n0:]
                out["per_step"].append({"step": step, "loss": loss.item(), "matrices": [
                    {"shape": list(s), "gap": r.duality_gap.item(), "res": r.tangent_residual.item(),
                     "newton_steps": r.iterations, "meq_model": r.msign_equivalents, "meq_time": a / b}
                    for s, r, a, b in mine]})
                print(f"step {step} loss {loss.item():.4f} " + " ".join(
                    f"{list(s)}:gap={r.duality_gap.item():.1e},it={r.iterations},meq={r.msign_equivalents:.1f}"
                    for s, r, _, _ in mine), flush=True)
    F.solve_manifold_muon = real
    mats = [mm for st in out["per_step"] if st["step"] >= 10 for mm in st["matrices"]]
    own, tm = statistics.median(times["own_muon"]), statistics.median(times["torch_muon"])
    new = statistics.median(times["newton"])
    summary = {
        "msign_calls_per_step": statistics.mean(mm["meq_model"] for mm in mats),
        "msign_equivalents_time_per_step": statistics.mean(mm["meq_time"] for mm in mats),
        "newton_steps_per_matrix": statistics.mean(mm["newton_steps"] for mm in mats),
        "tangent_residual": {"median": statistics.median(mm["res"] for mm in mats), "max": max(mm["res"] for mm in mats)},
        "duality_gap": {"median": statistics.median(mm["gap"] for mm in mats), "max": max(mm["gap"] for mm in mats)},
        "step_ratio_vs_own_muon": new / own,
        "step_ratio_vs_torch_muon": new / tm,
        "step_s_median": {"newton": new, "own_muon": own, "torch_muon": tm},
    }
    return summary, out["per_step"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=51)
    ap.add_argument("--skip-suite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [] if args.skip_suite else suite()
    summary, per_step = training(args.hidden, args.steps)
    print("newton", json.dumps(summary))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "solvers.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data["machine"] = data.get("machine") or machine()
    data["newton"] = dict(summary, command="OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
                          machine=machine(), threads=1,
                          training=f"MLP 784→{args.hidden}→{args.hidden}→10 bias-free, synthetic data, batch 128, "
                                   f"lr 0.05, steps 10–{args.steps - 1} (the issue's size is H = 1024)",
                          msign_equivalent_definition="flop model of SolveResult.msign_equivalents (see "
                          "modman/solvers/newton.py); msign_equivalents_time_per_step = solve time / time of one "
                          "default fp32 msign of the same matrix",
                          suite=rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
