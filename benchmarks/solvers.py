"""Benchmark the manifold-Muon solvers: certified gap vs work, and per-step cost with warm starts.

    python benchmarks/solvers.py            # short run (MLP 784→256→256→10, steps 0–30)
    python benchmarks/solvers.py --full     # MLP 784→1024→1024→10, steps 0–50, larger suite

(1) Fixed suite: certified duality gap and tangent residual per solver at its defaults.
(2) Training: an MLP on synthetic data; the momentum of each weight feeds every solver, each
    with its own warm-start chain (U = W/s on unscaled Stiefel, s = √(out/in)); the weights follow
    the default solver's step with the msign retraction. Per matrix and step we time, side by
    side in one process: the solver call (certificate included), modman's own Muon at the same
    precision (msign(momentum), Polar Express, fp32) and torch.optim.Muon's arithmetic
    (msign(momentum, keller, 5 steps, bf16)). msign-equivalents per matrix per step =
    solve time / own-Muon time (a time-based count that charges eigh, reduction and the
    certificate honestly); the solver's own msign_calls count is reported too.
Averages are over steps ≥ 10. Writes benchmarks/results/solvers.json and solvers.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from modman import msign
from modman.solvers import DEFAULT_SOLVER, solve_manifold_muon


def machine():
    flags = ""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        flags = []
    bf16 = sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f.startswith("avx512"))
    return {"cpu": model, "bf16_flags": bf16 or "none (no avx512_bf16/amx: bf16 matmul is emulated)",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": None}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def suite(solvers, full):
    shapes = [(64, 16), (256, 64)] + ([(1024, 256), (1024, 784)] if full else [])
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, n in shapes:
        for rank in ("full", "low"):
            W = torch.linalg.qr(torch.randn(m, n, generator=g)).Q
            r = n if rank == "full" else max(1, n // 8)
            G = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
            for s in solvers:
                for cap in (1, 4, 16, None):
                    res = solve_manifold_muon(W, G, solver=s, max_iters=cap)
                    rows.append({"shape": [m, n], "rank": rank, "solver": s, "max_iters": cap,
                                 "msign_calls": res.msign_calls, "gap": res.duality_gap.item(),
                                 "tangent_residual": res.tangent_residual.item()})
                    print(f"suite {m}x{n} {rank:4s} {s:12s} cap={cap!s:4s} calls={res.msign_calls:4d} "
                          f"gap={res.duality_gap.item():.2e} res={res.tangent_residual.item():.1e}", flush=True)
    return rows


def training(solvers, full, steps, lr=0.02, beta=0.95):
    torch.manual_seed(0)
    h = 1024 if full else 256
    layers = [torch.nn.Linear(784, h, bias=False), torch.nn.Linear(h, h, bias=False), torch.nn.Linear(h, 10, bias=False)]
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
    X = torch.randn(512, 784)
    y = (X[:, :10] @ torch.randn(10, 10)).argmax(1)
    with torch.no_grad():
        for L in layers:
            s = (L.weight.shape[0] / L.weight.shape[1]) ** 0.5
            L.weight.copy_(s * msign(L.weight, schedule="svd"))
    mom = [torch.zeros_like(L.weight) for L in layers]
    warm = {s: [None] * len(layers) for s in solvers}
    rec = {s: {"t": [], "calls": [], "gap": [], "res": []} for s in solvers}
    rec_muon = {"own": [], "torch": []}
    for step in range(steps):
        idx = torch.randint(0, 512, (128,))
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        model.zero_grad()
        loss.backward()
        for i, L in enumerate(layers):
            mom[i].mul_(beta).add_(L.weight.grad)
            s_ = (L.weight.shape[0] / L.weight.shape[1]) ** 0.5
            U = L.weight.detach() / s_
            _, t_own = timed(lambda: msign(mom[i]))
            _, t_torch = timed(lambda: msign(mom[i], schedule="keller", compute_dtype=torch.bfloat16))
            results = {}
            for s in solvers:
                if s == "dual_ascent" and step % 10 != 0:
                    continue  # 100 msign per call: sample every 10th step
                res, t = timed(lambda: solve_manifold_muon(U, mom[i], solver=s, warm_start=warm[s][i]))
                warm[s][i] = res.state
                results[s] = res
                if step >= 10:
                    r = rec[s]
                    r["t"].append(t / t_own)
                    r["torch_ratio"] = r.get("torch_ratio", []) + [t / t_torch]
                    r["calls"].append(t / t_own)
                    r["counted"] = r.get("counted", []) + [res.msign_calls]
                    r["gap"].append(res.duality_gap.item())
                    r["res"].append(res.tangent_residual.item())
            if step >= 10:
                rec_muon["own"].append(t_own)
                rec_muon["torch"].append(t_torch)
            with torch.no_grad():
                A = results[DEFAULT_SOLVER].direction
                L.weight.copy_(s_ * msign(U - lr * A, schedule="svd"))
        print(f"step {step} loss {loss.item():.4f} " + " ".join(
            f"{s}:gap={rec[s]['gap'][-1]:.1e}" for s in solvers if rec[s]["gap"] and step >= 10), flush=True)
    return rec, rec_muon


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    solvers = ["lyapunov", "admm", "projected", "dual_ascent"]
    rows = suite(solvers, args.full)
    steps = 51 if args.full else 31
    rec, muon = training(solvers, args.full, steps)
    out = {"machine": machine(), "command": "python " + " ".join(sys.argv),
           "default_solver": DEFAULT_SOLVER, "suite": rows,
           "training": {"model": f"MLP 784→{1024 if args.full else 256}→…→10, synthetic data, steps 10–{steps - 1}",
                        "own_muon_s_median": statistics.median(muon["own"]),
                        "torch_muon_bf16_s_median": statistics.median(muon["torch"])}}
    for s, r in rec.items():
        out[s] = {
            "msign_calls_per_step": statistics.mean(r["calls"]),
            "msign_calls_counted_per_step": statistics.mean(r["counted"]),
            "tangent_residual": {"median": statistics.median(r["res"]), "max": max(r["res"])},
            "duality_gap": {"median": statistics.median(r["gap"]), "max": max(r["gap"])},
            "step_ratio_vs_own_muon": statistics.median(r["t"]),
            "step_ratio_vs_torch_muon": statistics.median(r["torch_ratio"]),
        }
        print(s, json.dumps(out[s]))
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/solvers.json", "w") as f:
        json.dump(out, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for s in solvers:
            pts = [(r["msign_calls"], max(r["gap"], 1e-16)) for r in rows if r["solver"] == s]
            ax.scatter(*zip(*pts), label=s, s=12)
        ax.set_xscale("symlog")
        ax.set_yscale("log")
        ax.set_xlabel("msign calls (counted)")
        ax.set_ylabel("certified relative duality gap")
        ax.axhline(1e-4, color="k", lw=0.5)
        ax.legend()
        fig.tight_layout()
        fig.savefig("benchmarks/results/solvers.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
