"""Benchmark every manifold-Muon solver side by side (run with OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 python benchmarks/solvers.py                 # H = 256, ~15 min on 1 busy core
    OMP_NUM_THREADS=1 python benchmarks/solvers.py --hidden 1024 --steps 51 --suite-large   # the issue's size
    python benchmarks/solvers.py --device cuda --hidden 4096 --steps 40 --skip-suite   # on a GPU

(1) Suite: certified duality gap and tangent residual vs msign calls for every solver in
    modman.solvers.SOLVERS at caps max_iters ∈ {1, 4, 16, default}, cold start, fp32, on
    64×16 and 256×64 (and 1024×256 with --suite-large), full-rank and rank-n/8 G (closed_form,
    which has no iterations, once per problem), and on square 64×64 and 256×256.
(2) Training with warm starts: for every solver s, modman.ManifoldMuon(model.modules(),
    solver=s, budget="uniform", lr=0.05) on its own copy of a bias-free MLP 784→H→H→10, next to
    modman.Muon(ns_dtype="float32", ns_schedule="keller") (own Muon, same precision as the
    solvers) and torch.optim.Muon (as shipped, bf16) on identical copies; every optimizer sees
    the same batch, the order of the optimizers rotates every step (A B C …, B C … A, …).
    Step times are opt.step() wall times; the median over the timed steps (≥ --warmup) is
    divided by the own/torch Muon medians. Per-matrix statistics come from
    optimizer.last_step_stats (msign_calls, gap, residual); msign_equivalents (the solver's flop
    model, certificate included where it uses certify_gram) are captured by wrapping the solver
    entry point the optimizer calls (it keeps that number only, so neither time nor memory is added
    to the measured step).
    closed_form is timed in training like the others.
    --device cuda: models, data and the suite on the GPU; every timed step is bracketed by
    torch.cuda.synchronize(), and each optimizer's peak memory above what was allocated before its
    step (torch.cuda.max_memory_allocated: tensors only, not cuSOLVER's own workspaces) is
    recorded per step; the results go to results/solvers-<gpu>.json unless --out says otherwise.
Writes benchmarks/results/solvers.json and solvers.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import re
import statistics
import sys
import time

import torch

import modman
import modman.optim.functional as F
from modman.manifolds import Stiefel
from modman.solvers import DEFAULT_SOLVER, SOLVERS, solve_manifold_muon
from modman.experiments.machine import machine  # noqa: E402


def suite(solvers, large, device):
    shapes = [(64, 16), (256, 64)] + ([(1024, 256)] if large else [])
    rows = []
    g = torch.Generator().manual_seed(0)

    def run(W, G, s, cap, m, n, rank):
        W, G = W.to(device), G.to(device)
        t = clock(device)
        res = solve_manifold_muon(W, G, solver=s, max_iters=cap)
        dt = clock(device) - t
        row = {"shape": [m, n], "rank": rank, "solver": s, "max_iters": cap, "msign_calls": res.msign_calls,
               "msign_equivalents": res.msign_equivalents, "gap": res.duality_gap.item(),
               "tangent_residual": res.tangent_residual.item(), "solve_s": dt}
        rows.append(row)
        print(f"suite {m}x{n} {rank:4s} {s:12s} cap={cap!s:4s} calls={res.msign_calls:4d} "
              f"meq={res.msign_equivalents or 0:6.1f} gap={row['gap']:.2e} res={row['tangent_residual']:.1e}", flush=True)

    for m, n in shapes:
        for rank in ("full", "low"):
            W = Stiefel().random((m, n), generator=g)
            r = n if rank == "full" else max(1, n // 8)
            G = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
            for s in solvers:
                for cap in ((None,) if s == "closed_form" else (1, 4, 16, None)):
                    run(W, G, s, cap, m, n, rank)
    for n in (64, 256):
        W = Stiefel().random((n, n), generator=g)
        G = torch.randn(n, n, generator=g)
        for s in solvers:
            run(W, G, s, None, n, n, "full")
    return rows


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (a GPU step returns before it runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def training(solvers, hidden, steps, warmup, lr, slow_steps, device):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(784, hidden, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10, bias=False)).to(device)
    names = list(solvers) + ["own_muon", "torch_muon"]
    models = {k: copy.deepcopy(base) for k in names}
    opts = {s: modman.ManifoldMuon(models[s].modules(), solver=s, budget="uniform", lr=lr) for s in solvers}
    opts["own_muon"] = modman.Muon(models["own_muon"].modules(), lr=lr, ns_dtype="float32", ns_schedule="keller")
    opts["torch_muon"] = torch.optim.Muon(list(models["torch_muon"].parameters()), lr=lr)
    X = torch.randn(2048, 784).to(device)
    y = (X[:, :10] @ torch.randn(10, 10).to(device)).argmax(1)
    cuda = device.type == "cuda"

    captured = []
    real = F.solve_manifold_muon

    def spy(W, G, **kw):
        res = real(W, G, **kw)
        captured.append(res.msign_equivalents)  # a number: holding (W, G, res) raised the measured peak
        return res

    F.solve_manifold_muon = spy
    times = {k: [] for k in names}
    mats = {s: [] for s in solvers}
    loss_log = {k: [] for k in names}
    peaks = {k: [] for k in names}  # bytes above the step's starting allocation (CUDA only)
    for step in range(steps):
        idx = torch.randint(0, 2048, (128,)).to(device)
        k = step % len(names)
        order = names[k:] + names[:k]
        for name in order:
            if name in slow_steps and step >= slow_steps[name]:
                continue
            model, opt = models[name], opts[name]
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            captured.clear()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t = clock(device)
            opt.step()
            dt = clock(device) - t
            loss_log[name].append(loss.item())
            if step >= warmup:
                times[name].append(dt)
                if cuda:
                    peaks[name].append(torch.cuda.max_memory_allocated(device) - before)
            if name in solvers:
                meqs = list(captured)
                stats = opt.last_step_stats
                row = {"step": step, "matrices": {}}
                for (pname, st), meq in zip(stats.items(), meqs):
                    row["matrices"][pname] = {k2: float(st[k2]) for k2 in ("msign_calls", "duality_gap", "tangent_residual", "iterations")}
                    row["matrices"][pname]["msign_equivalents"] = meq
                if step >= warmup:
                    mats[name].append(row)
        print(f"step {step} " + " ".join(f"{n}={times[n][-1]:.2f}s" if step >= warmup and times[n] and len(times[n]) else f"{n}:loss={loss_log[n][-1]:.3f}"
                                          for n in names if loss_log[n]), flush=True)
    F.solve_manifold_muon = real
    return times, mats, loss_log, peaks


def summarize(times, mats, loss_log, solvers, peaks, largest_bytes):
    own, tm = statistics.median(times["own_muon"]), statistics.median(times["torch_muon"])
    out = {}

    def peak_x(name):  # CUDA only: the largest step peak over the timed steps, × the largest weight
        return max(peaks[name]) / largest_bytes if peaks.get(name) else None
    for s in solvers:
        rows = [m for r in mats[s] for m in r["matrices"].values()]
        n_mat = len(mats[s][0]["matrices"])
        t = statistics.median(times[s])
        gaps = [m["duality_gap"] for m in rows]
        res = [m["tangent_residual"] for m in rows]
        out[s] = {
            "msign_calls_per_step": statistics.mean(m["msign_calls"] for m in rows),
            "msign_calls_per_step_definition": "optimizer.last_step_stats[name]['msign_calls'], mean per matrix per step",
            "msign_equivalents_per_step": statistics.mean(m["msign_equivalents"] for m in rows),
            "iterations_per_step": statistics.mean(m["iterations"] for m in rows),
            # numbers (API.md's keys), the worst case over every matrix of every timed step
            "tangent_residual": max(res),
            "tangent_residual_median": statistics.median(res),
            "duality_gap": max(gaps),
            "duality_gap_median": statistics.median(gaps),
            "residual_and_gap_definition": "tangent_residual and duality_gap: the maximum over every matrix "
                                           "of every timed step; *_median: their median",
            "step_ratio_vs_own_muon": t / own,
            "step_ratio_vs_torch_muon": t / tm,
            "step_s_median": t,
            "timed_steps": len(times[s]),
            "matrices_per_step": n_mat,
            "final_loss": loss_log[s][-1],
            "step_peak_x_largest_weight": peak_x(s),
            "per_matrix": {name: {"msign_equivalents": statistics.mean(r["matrices"][name]["msign_equivalents"] for r in mats[s]),
                                  "duality_gap_max": max(r["matrices"][name]["duality_gap"] for r in mats[s])}
                           for name in mats[s][0]["matrices"]},
        }
    out["_muon"] = {"own_muon_step_s_median": own, "torch_muon_step_s_median": tm,
                    "own_muon_step_peak_x_largest_weight": peak_x("own_muon"),
                    "torch_muon_step_peak_x_largest_weight": peak_x("torch_muon"),
                    "own_muon_final_loss": loss_log["own_muon"][-1], "torch_muon_final_loss": loss_log["torch_muon"][-1]}
    return out


def plot(rows, summary, solvers, path, where="1 thread"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in solvers:
        pts = [(r["msign_equivalents"] or r["msign_calls"], max(r["gap"], 1e-16)) for r in rows if r["solver"] == s]
        if pts:
            a1.scatter(*zip(*pts), label=s, s=14)
    a1.set_xscale("log"); a1.set_yscale("log")
    a1.set_xlabel("msign equivalents (suite, cold start)"); a1.set_ylabel("certified relative duality gap")
    a1.axhline(1e-4, color="k", lw=0.5); a1.legend(fontsize=8)
    names = [s for s in solvers if s in summary] + ["own_muon", "torch_muon"]
    vals = [summary[s]["step_s_median"] for s in solvers if s in summary] + [summary["_muon"]["own_muon_step_s_median"],
                                                                          summary["_muon"]["torch_muon_step_s_median"]]
    a2.bar(names, vals); a2.set_yscale("log"); a2.set_ylabel(f"median optimizer step (s), {where}")
    a2.tick_params(axis="x", rotation=30)
    fig.tight_layout(); fig.savefig(path, dpi=100)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=26)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--slow-steps", type=int, default=None,
                    help="stop stepping dual_ascent and admm after this many steps (they are the slowest)")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--skip-suite", action="store_true")
    ap.add_argument("--suite-large", action="store_true")
    ap.add_argument("--suite-only", action="store_true",
                    help="run only the suite and replace the 'suite' rows of an existing --out file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", default=None, help="default: results/solvers.json, on a GPU results/solvers-<gpu>.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.out is None:
        results = pathlib.Path(__file__).resolve().parent / "results"
        gpu = "" if device.type == "cpu" else "-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        args.out = str(results / f"solvers{gpu}.json")
    torch.set_num_threads(args.threads)
    solvers = args.solvers.split(",")
    t0 = time.time()
    rows = [] if args.skip_suite else suite(solvers, args.suite_large, device)
    if args.suite_only:
        with open(args.out) as f:
            out = json.load(f)
        out["suite"] = rows
        out["suite_command"] = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python " + " ".join(sys.argv)
        out["suite_wall_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        plot(rows, {k: v for k, v in out.items() if k in solvers or k == "_muon"}, solvers, os.path.splitext(args.out)[0] + ".png")
        return
    slow = {s: args.slow_steps for s in ("dual_ascent", "admm")} if args.slow_steps else {}
    times, mats, loss_log, peaks = training(solvers, args.hidden, args.steps, args.warmup, args.lr, slow, device)
    summary = summarize(times, mats, loss_log, solvers, peaks, 4 * max(784, args.hidden) * args.hidden)
    out = {"machine": machine(), "threads": torch.get_num_threads(),
           "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python " + " ".join(sys.argv),
           "default_solver": DEFAULT_SOLVER, "device": str(device),
           "training": {"model": f"bias-free MLP 784→{args.hidden}→{args.hidden}→10, synthetic data (2048×784 Gaussian, "
                                 f"labels argmax of a random 10×10 map of the first 10 inputs), batch 128",
                        "issue_size_note": "the issue's size is H = 1024; it did not fit this machine's time budget" if args.hidden < 1024 and device.type == "cpu" else None,
                        "optimizers": {"solvers": "modman.ManifoldMuon(model.modules(), solver=s, budget='uniform', lr=%g)" % args.lr,
                                       "own_muon": "modman.Muon(model.modules(), lr=%g, ns_dtype='float32', ns_schedule='keller')" % args.lr,
                                       "torch_muon": "torch.optim.Muon(model.parameters(), lr=%g) (as shipped: bf16 Newton–Schulz)" % args.lr},
                        "steps": args.steps, "warmup": args.warmup,
                        "timed_steps": f"{args.warmup}–{args.steps - 1}",
                        "slow_solvers_steps": {s: f"{args.warmup}–{args.slow_steps - 1}" for s in slow} or None,
                        "order": "all optimizers every step on the same batch, order rotated by one each step"},
           "wall_s": None}
    out.update({k: v for k, v in summary.items()})
    out["suite"] = rows
    out["wall_s"] = time.time() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'solver':12s} {'msign/step':>10s} {'gap med':>9s} {'gap max':>9s} {'res med':>9s} {'res max':>9s} {'/own':>7s} {'/torch':>7s}")
    for s in solvers:
        r = summary[s]
        f = lambda v: "n/a" if v is None else f"{v:.2f}"
        print(f"{s:12s} {r['msign_calls_per_step']:10.1f} {r['duality_gap_median']:9.1e} {r['duality_gap']:9.1e} "
              f"{r['tangent_residual_median']:9.1e} {r['tangent_residual']:9.1e} {f(r['step_ratio_vs_own_muon']):>7s} {f(r['step_ratio_vs_torch_muon']):>7s}")
    print(json.dumps(summary["_muon"]))
    where = "1 thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    plot(rows, summary, solvers, os.path.splitext(args.out)[0] + ".png", where)


if __name__ == "__main__":
    main()
