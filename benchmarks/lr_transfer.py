"""Learning-rate transfer on MNIST-1D: does the best lr stay put as width and depth grow?

Model: a bias-free ReLU MLP, 40 → width → … → 10 (depth = number of Linear layers), logits
multiplied by a fixed OUT_MULT (part of the model, so the modular budget sees it as a scalar
multiple). Optimizers: ManifoldMuon(scale="rms", budget from modman.modular.budget) and AdamW
(torch.optim.AdamW, default PyTorch init). Each (optimizer, width, depth, lr) is trained for
STEPS steps of batch BATCH with a linear decay to 0, for SEEDS seeds; the score is the median
over seeds of the final full-train-set cross-entropy. The lr grid is spaced by √2 and extended
until the best lr is strictly inside it.

    OMP_NUM_THREADS=1 python benchmarks/lr_transfer.py          # quick (≈ 300 steps)
    OMP_NUM_THREADS=1 python benchmarks/lr_transfer.py --full   # 1000 steps, more widths

Prints a table and writes benchmarks/results/lr_transfer.json and lr_transfer.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import modman
from modman.modular import budget
from modman.solvers import DEFAULT_SOLVER
from machine import machine  # noqa: E402  (benchmarks/machine.py)

OUT_MULT = 8.0
SOLVER = "projected"
RESULTS = Path(__file__).parent / "results"


class MLP(nn.Module):
    def __init__(self, width: int, depth: int, d_in: int = 40, d_out: int = 10):
        super().__init__()
        dims = [d_in] + [width] * (depth - 1) + [d_out]
        layers = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x) * OUT_MULT


def load_data(seed: int = 0):
    try:
        from modman.data.mnist1d import load_mnist1d

        d = load_mnist1d(seed=seed)
        return d["x"].float(), d["y"].long()
    except ImportError:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        x = torch.tensor(d["x"], dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0)
        return x, torch.tensor(d["y"], dtype=torch.long)


def train(opt_name, width, depth, lr, seed, x, y, steps, batch):
    torch.manual_seed(seed)
    model = MLP(width, depth)
    if opt_name == "manifold_muon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "moved onto the manifold" at init
            opt = modman.ManifoldMuon(model.modules(), lr=lr, scale="rms", solver=SOLVER,
                                      budget=budget(model, scale="rms"))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    gen = torch.Generator().manual_seed(seed)
    lossf = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = lossf(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = float(lossf(model(x), y))
    return final if math.isfinite(final) else float("inf")


def sweep(opt_name, width, depth, center, x, y, args, log):
    """Median final loss over seeds on a √2 grid, extended until the minimum is interior."""
    scores: dict[int, float] = {}  # k → median loss at lr = center·2^(k/2)

    def score(k):
        if k not in scores:
            lr = center * 2 ** (k / 2)
            losses = sorted(train(opt_name, width, depth, lr, s, x, y, args.steps, args.batch)
                            for s in range(args.seeds))
            scores[k] = losses[len(losses) // 2]
            log(f"  {opt_name:14s} w={width:<4d} L={depth} lr={lr:.4g} median loss={scores[k]:.4f}")
        return scores[k]

    for k in range(-2, 3):
        score(k)
    for _ in range(12):
        best = min(scores, key=scores.get)
        lo, hi = min(scores), max(scores)
        if best == lo:
            score(lo - 1)
        elif best == hi:
            score(hi + 1)
        else:
            break
    best = min(scores, key=scores.get)
    ks = sorted(scores)
    interior = ks[0] < best < ks[-1]
    return {"grid": [center * 2 ** (k / 2) for k in ks], "median_loss": [scores[k] for k in ks],
            "best_lr": center * 2 ** (best / 2), "best_loss": scores[best], "interior": interior}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    args.steps = args.steps or (1000 if args.full else 300)
    widths = [64, 128, 256, 512] if args.full else [64, 512]
    depths = [2, 4, 8] if args.full else [2, 8]
    base_width, base_depth = 64, 2
    x, y = load_data()
    t0 = time.time()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    centers = {"manifold_muon": 0.5, "adamw": 3e-3}
    results = {}
    for opt_name in ("manifold_muon", "adamw"):
        res = {"width": {}, "depth": {}}
        for w in widths:
            res["width"][str(w)] = sweep(opt_name, w, base_depth, centers[opt_name], x, y, args, log)
        for d in depths:
            if d == base_depth:
                res["depth"][str(d)] = res["width"][str(base_width)]
            else:
                res["depth"][str(d)] = sweep(opt_name, base_width, d, centers[opt_name], x, y, args, log)
        for axis in ("width", "depth"):
            best = [r["best_lr"] for r in res[axis].values()]
            res[f"{axis}_shift"] = max(best) / min(best)
        results[opt_name] = res
    out = {
        "command": " ".join(["python"] + sys.argv),
        "machine": machine(),
        "solver": SOLVER, "default_solver_at_run": DEFAULT_SOLVER,
        "steps": args.steps, "batch": args.batch, "seeds": args.seeds, "out_mult": OUT_MULT,
        "grid_ratio": math.sqrt(2), "schedule": "linear decay to 0",
        "model": "bias-free ReLU MLP 40→width…→10, depth = #Linear; base width 64, base depth 2",
        "manifold_muon": "ManifoldMuon(scale='rms', budget=modman.modular.budget(model, scale='rms'))",
        "adamw": "torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0)",
        "results": results,
        "best_lr_shift": {o: {"width": results[o]["width_shift"], "depth": results[o]["depth_shift"]}
                          for o in results},
        "all_interior": all(r["interior"] for o in results for a in ("width", "depth")
                            for r in results[o][a].values()),
        "seconds": time.time() - t0,
    }
    print()
    print(f"{'optimizer':<14} {'axis':<6} {'value':>6} {'best lr':>9} {'loss':>8} interior")
    for o in results:
        for axis in ("width", "depth"):
            for v, r in results[o][axis].items():
                print(f"{o:<14} {axis:<6} {v:>6} {r['best_lr']:>9.4g} {r['best_loss']:>8.4f} {r['interior']}")
            print(f"{o:<14} {axis:<6} shift of best lr: {results[o][axis + '_shift']:.3g}×")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lr_transfer.json").write_text(json.dumps(out, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
        for i, o in enumerate(results):
            for j, axis in enumerate(("width", "depth")):
                ax = axes[i][j]
                for v, r in results[o][axis].items():
                    ax.plot(r["grid"], r["median_loss"], marker="o", label=f"{axis} {v}")
                ax.set_xscale("log")
                ax.set_title(f"{o}: {axis} (best-lr shift {results[o][axis + '_shift']:.2g}×)")
                ax.set_xlabel("lr")
                ax.set_ylabel("median final train loss")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "lr_transfer.png", dpi=110)
    except Exception as exc:  # the JSON is the result; a missing plot is reported, not fatal
        print(f"plot not written: {exc}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
