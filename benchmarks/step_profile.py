"""Where the time of one ManifoldMuon step goes, on one matrix (run with OMP_NUM_THREADS=1).

A bias-free Linear(n, m) is fitted to random targets for ``--warm`` steps (the solver's warm start
and the momentum as in training); then modman.Muon (fp32, Keller's 5 steps: the peer of issue 4's
bar and of benchmarks/solvers.py, 0.5 msign-equivalents) and ManifoldMuon (defaults) step the same
gradient in interleaved rounds, and one
ManifoldMuon step runs under torch.profiler: its operators by self time, grouped by input shapes.
A diagnosis of issue 4's wall-clock bar (≤ 2× modman's own Muon), not a speed claim.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py [--shape 1024 784] [--rounds 5] [--out PATH]
Writes benchmarks/results/step_profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import warnings

import torch
from torch.profiler import profile

import modman
from modman.experiments.machine import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=2, default=(1024, 784), metavar=("M", "N"))
    ap.add_argument("--warm", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "step_profile.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, n = args.shape
    lin = torch.nn.Linear(n, m, bias=False)
    X, Y = torch.randn(256, n), torch.randn(256, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon([lin.weight])
    for _ in range(args.warm):
        lin.weight.grad = None
        ((lin(X) - Y) ** 2).mean().backward()
        opt.step()
    W = torch.nn.Parameter(lin.weight.detach().clone())
    muon = modman.Muon([W], ns_dtype="float32", ns_schedule="keller")  # (as benchmarks/solvers.py's own Muon)
    W.grad = lin.weight.grad.clone()
    times = {"muon_fp32": [], "manifold_muon": []}
    for _ in range(args.rounds):
        for name, o in (("muon_fp32", muon), ("manifold_muon", opt)):
            t = time.perf_counter()
            o.step()
            times[name].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    with profile(record_shapes=True) as prof:
        opt.step()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "input_shapes": str(e.input_shapes), "calls": e.count,
            "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total} for e in events[:args.top]]
    stats = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in next(iter(opt.last_step_stats.values())).items()}
    result = {"machine": machine(), "threads": 1, "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python "
              + " ".join(sys.argv), "setup": __doc__.split("\n\n")[1].strip(), "shape": [m, n],
              "step_s_median": median, "ratio_vs_own_muon": median["manifold_muon"] / median["muon_fp32"],
              "profiled_step_s": total / 1e6, "last_step_stats": stats, "top_ops": ops}
    print(f"{m}×{n}: Muon fp32 {median['muon_fp32'] * 1e3:.0f} ms, ManifoldMuon {median['manifold_muon'] * 1e3:.0f} ms "
          f"({result['ratio_vs_own_muon']:.2f}×); gap {stats['duality_gap']:.1e}")
    for o in ops:
        print(f"  {o['share'] * 100:5.1f}%  {o['self_s'] * 1e3:7.1f} ms  {o['calls']:3d}×  {o['op']:<26} {o['input_shapes'][:70]}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
