"""Tracking overhead (issue 7): SpectrumTracker every k steps against a full training step.

For each optimizer of ``modman.experiments.mnist1d.available_optimizers()`` (manifold Muon with
the fast "projected" solver, the worst case for the ratio, and with the default solver in
--full), one MNIST-1D run of the default MLP 40→128→128→10 with the tracker as train()'s callback.
train() times forward + backward + optimizer step without the callback; the callback is timed
around it in the same run, so the ratio compares side by side on the same (noisy) machine:

    overhead = (total tracker time / steps) / median training step time     (bar: < 10 %)

Also the cost of one record (the step where the tracker does its work) in training steps.
Median over --repeats runs after a warm-up run.

    python benchmarks/tracking_overhead.py [--steps 200] [--every 10] [--repeats 3] [--threads N] [--full]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from modman.data import load_mnist1d
from modman.diagnostics import SpectrumTracker
from modman.experiments.mnist1d import available_optimizers, train
from modman.experiments.machine import machine  # noqa: E402


class TimedTracker:
    """train()'s callback: builds the tracker on the model train() made, times every call."""

    def __init__(self, every: int):
        self.every, self.tracker, self.seconds, self.record_seconds = every, None, 0.0, []

    def __call__(self, step, model, optimizer):
        t0 = time.perf_counter()
        if self.tracker is None:
            self.tracker = SpectrumTracker(model, every=self.every)
        self.tracker(step, model, optimizer)
        dt = time.perf_counter() - t0
        self.seconds += dt
        if self.tracker.due(step):
            self.record_seconds.append(dt)


def run(name, options, args, data):
    cb = TimedTracker(args.every)
    result = train(name, steps=args.steps, data=data, eval_every=0, callback=cb, optimizer_options=options)
    per_step = cb.seconds / args.steps
    return {"step_s": result.seconds_per_step, "tracker_s_per_step": per_step,
            "overhead": per_step / result.seconds_per_step,
            "record_in_steps": statistics.median(cb.record_seconds) / result.seconds_per_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--full", action="store_true", help="also manifold Muon with the default solver")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tracking_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    configs = [("manifold_muon[projected]", "manifold_muon", {"solver": "projected"})]
    if args.full:
        configs.append(("manifold_muon[default]", "manifold_muon", None))
    configs += [(n, n, None) for n in available_optimizers() if n != "manifold_muon"]
    rows = {}
    for label, name, options in configs:
        run(name, options, argparse.Namespace(steps=max(2 * args.every, 20), every=args.every), data)  # warm-up
        reps = [run(name, options, args, data) for _ in range(args.repeats)]
        rows[label] = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        rows[label]["overhead_runs"] = [r["overhead"] for r in reps]
    print(f"tracking every {args.every} steps, {args.steps} steps × {args.repeats} runs, {args.threads} threads")
    print(f"{'optimizer':26s} {'step ms':>9s} {'tracker ms/step':>16s} {'overhead':>9s} {'one record (steps)':>19s}")
    for label, r in rows.items():
        print(f"{label:26s} {r['step_s'] * 1e3:9.2f} {r['tracker_s_per_step'] * 1e3:16.3f} "
              f"{100 * r['overhead']:8.1f}% {r['record_in_steps']:19.2f}")
    out = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(args.threads),
        "model": "MLP 40→128→128→10 (bias-free ReLU), batch 512, MNIST-1D",
        "every": args.every, "steps": args.steps, "repeats": args.repeats,
        "bar": "overhead < 0.10 for every optimizer",
        "results": rows,
        "notes": "overhead = tracker seconds per training step / median step (forward+backward+step); "
                 "medians over repeats on a shared machine",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
