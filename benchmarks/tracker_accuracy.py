"""Accuracy of SpectrumTracker's estimates between spectrum steps (issue 7), against exact values.

For each optimizer, one MNIST-1D run of the default MLP 40→128→128→10 with the tracker as
train()'s callback (every 10 steps, exact spectra every 100). After every record the callback
also computes, outside the timed tracker, the exact σ_max, σ_min (torch.linalg.svdvals in fp64),
distance to the tracker's manifold and ‖ΔW‖₂ of each weight the tracker estimated (the 128×128 layer; the other two get exact
spectra at every record), and reports the relative errors of the estimated records:
median and maximum per quantity. The estimates are one-sided (σ_max, distance and ‖ΔW‖₂ from
below, σ_min from above in exact arithmetic): "past_the_bound" is the largest relative error on the wrong
side, which rounding keeps near κ²·1e-16 for σ_min.

    python benchmarks/tracker_accuracy.py [--steps 1000] [--every 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from modman.data import load_mnist1d
from modman.diagnostics import SpectrumTracker
from modman.experiments.mnist1d import available_optimizers, train
from modman.experiments.machine import machine  # noqa: E402


class Checked:
    """train()'s callback: the tracker, then exact values for every estimated record."""

    def __init__(self, every: int):
        self.every, self.tracker, self.before = every, None, None
        self.errors = {"sigma_max": [], "sigma_min": [], "distance": [], "update_norm": []}
        self.wrong_side = {key: 0.0 for key in self.errors}  # the largest relative step past the bound

    def __call__(self, step, model, optimizer):
        if self.tracker is None:
            self.tracker = SpectrumTracker(model, every=self.every)
        due = self.tracker.due(step)
        self.tracker(step, model, optimizer)
        if due:
            for name, p, shape in self.tracker._params:
                track = self.tracker.tracking.params[name]
                W = p.detach().reshape(shape).double()
                if not track.exact[-1]:
                    s = torch.linalg.svdvals(W)
                    self._compare("sigma_max", track.values["sigma_max"][-1], float(s[0]), below=True)
                    self._compare("sigma_min", track.values["sigma_min"][-1], float(s[-1]), below=False)
                    # to the tracker's manifold (exact: the fp64 Gram's eigenvalues); what the tracker
                    # is for under ManifoldMuon, where σ_max, σ_min are 1 ± 1e-6 and their relative
                    # errors say nothing
                    exact_distance = float(self.tracker._manifolds[name].distance(W))
                    self._compare("distance", track.values["distance"][-1], exact_distance, below=True)
                    if self.before is not None and step % self.tracker.spectrum_every:
                        exact = float(torch.linalg.matrix_norm(W - self.before[name], ord=2))
                        self._compare("update_norm", track.values["update_norm"][-1], exact, below=True)
        self.before = ({name: p.detach().reshape(shape).double().clone() for name, p, shape in self.tracker._params}
                       if self.tracker.due(step + 1) else None)

    def _compare(self, key, estimate, exact, below):
        if exact > 0:
            self.errors[key].append(abs(estimate - exact) / exact)
            past = (estimate - exact if below else exact - estimate) / exact
            self.wrong_side[key] = max(self.wrong_side[key], past)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tracker_accuracy.json"))
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the work
    if not 1 <= args.every <= args.steps:
        ap.error(f"need 1 ≤ --every ≤ --steps, got --every {args.every} --steps {args.steps}")
    data = load_mnist1d()
    rows = {}
    for name in available_optimizers():
        options = {"solver": "projected"} if name == "manifold_muon" else None
        cb = Checked(args.every)
        train(name, steps=args.steps, data=data, eval_every=0, callback=cb, optimizer_options=options)
        rows[name] = {key: {"median": statistics.median(v), "max": max(v), "records": len(v),
                            "past_the_bound": cb.wrong_side[key]}
                      for key, v in cb.errors.items() if v}
        print(name, json.dumps(rows[name]))
    out = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(torch.get_num_threads()),
        "model": "MLP 40→128→128→10 (bias-free ReLU), batch 512, MNIST-1D; the 128×128 layer is estimated",
        "every": args.every, "steps": args.steps,
        "results": rows,
        "notes": "relative error |estimate − exact| / exact over the records that used estimates; "
                 "past_the_bound: the largest relative error on the wrong side of the one-sided bound",
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
