"""MNIST-1D training curves per manifold-Muon solver (run with OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 python benchmarks/mnist1d_solvers.py [--steps 1000] [--seeds 0,1]

The blog's kind of run (``modman.experiments.mnist1d``: bias-free ReLU MLP 40→128→128→10, batch
512, lr 0.1 decaying linearly to 0, every layer on the Stiefel manifold, budget "uniform"), once
per solver and seed, on the same data and initialisation. An accurate solver should not change
what is learned — only what a step costs; the inexact ones (``projected``; ``dual_ascent`` as
published) may. Records test-accuracy curves, final accuracies, the median optimizer step and the
median over steps of the largest certified gap. Writes benchmarks/results/mnist1d_solvers.json and
a plot next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

from modman.data import load_mnist1d
from modman.experiments.mnist1d import train
from modman.experiments.machine import machine  # noqa: E402

SOLVERS = ("closed_form", "anderson", "newton", "projected", "dual_ascent")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "mnist1d_solvers.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_mnist1d()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    runs = {}
    for solver in args.solvers.split(","):
        per_seed = []
        for seed in seeds:
            r = train("manifold_muon", steps=args.steps, seed=seed, data=data, eval_every=max(1, args.steps // 20),
                      optimizer_options={"solver": solver})
            curve = [(h["step"], h["test_acc"]) for h in r.history if "test_acc" in h]
            per_seed.append({"seed": seed, "test_acc": r.test_acc, "train_acc": r.train_acc,
                             "optimizer_s_per_step": r.optimizer_seconds_per_step,
                             "median_max_gap": r.duality_gap, "curve": curve})
            gap = "n/a" if r.duality_gap is None else f"{r.duality_gap:.1e}"
            print(f"{solver:12s} seed {seed}: test {r.test_acc:.3f} train {r.train_acc:.3f} "
                  f"step {r.optimizer_seconds_per_step * 1e3:.1f} ms gap {gap}", flush=True)
        runs[solver] = {"per_seed": per_seed,
                        "test_acc_mean": statistics.mean(s["test_acc"] for s in per_seed),
                        "optimizer_s_per_step_median": statistics.median(s["optimizer_s_per_step"] for s in per_seed),
                        "median_max_gap": None if None in [s["median_max_gap"] for s in per_seed]
                        else statistics.median(s["median_max_gap"] for s in per_seed)}
    out = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python " + " ".join(sys.argv),
           "machine": machine(), "setup": "modman.experiments.mnist1d.train('manifold_muon', solver=s): MLP "
           "40→128→128→10, batch 512, lr 0.1 linear decay, budget 'uniform'; same seeds for every solver",
           "steps": args.steps, "seeds": seeds, "solvers": runs, "wall_s": time.time() - t0}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    plot(runs, os.path.splitext(args.out)[0] + ".png")


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for solver, r in runs.items():
        for i, s in enumerate(r["per_seed"]):
            steps, acc = zip(*s["curve"])
            ax.plot(steps, acc, color=f"C{list(runs).index(solver)}", alpha=0.8,
                    label=f"{solver} ({r['optimizer_s_per_step_median'] * 1e3:.0f} ms/step)" if i == 0 else None)
    ax.set_xlabel("step"); ax.set_ylabel("test accuracy"); ax.legend(fontsize=8)
    ax.set_title("MNIST-1D, ManifoldMuon per solver")
    fig.tight_layout(); fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
