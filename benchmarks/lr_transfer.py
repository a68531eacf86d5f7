"""Learning-rate transfer on MNIST-1D: does the best lr stay put as width and depth grow?

Models (depth = number of Linear layers, logits multiplied by a fixed OUT_MULT, part of the
model, so the modular budget sees it as a scalar multiple):
- ``mlp``: a bias-free ReLU MLP, 40 → width → … → 10. The modular budget gives each of its L
  layers the share 1/L (default masses), so lr_scale = 1/(L·OUT_MULT).
- ``resmlp``: modula's ResMLP (Large et al. 2024): 40 → width, ReLU, B = depth − 2 blocks
  h ↦ (1 − 1/B)·h + (1/B)·relu(W h), width → 10, with the stack of blocks tared to mass 1
  (``budget(model, tare={"blocks": 1.0})``): every lr_scale is then independent of B ≥ 1. At
  depth 2 it is the MLP (same weights for a seed), so both share the depth-2 runs.
Optimizers: ManifoldMuon(scale="rms", budget from modman.modular.budget) and AdamW
(torch.optim.AdamW, default PyTorch init). Each (optimizer, model, width, depth, lr) is trained
for STEPS steps of batch BATCH with a linear decay to 0, for SEEDS seeds; the score is the median
over seeds of the final full-train-set cross-entropy. The lr grid is a √2 lattice extended until
the best lr is strictly inside it. Reported per axis: the shift of the best lr (max/min), a
sub-grid estimate (parabola through the minimum and its neighbours in log lr), and a bootstrap
over seeds (resampled with replacement per configuration).

    OMP_NUM_THREADS=1 python benchmarks/lr_transfer.py          # quick (300 steps)
    OMP_NUM_THREADS=1 python benchmarks/lr_transfer.py --full   # 1000 steps, more widths
    # split over processes: runs go to a shared cache (results/lr_transfer_runs_*.jsonl)
    python benchmarks/lr_transfer.py --opt manifold_muon --arch mlp --no-write & ...

Prints a table and writes benchmarks/results/lr_transfer.json and lr_transfer.png (with --grid 4:
lr_transfer_grid4.json and .png; with --out-mult 32: lr_transfer_out32.json and .png; elsewhere with
--out-dir).
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
from modman.experiments.machine import machine  # noqa: E402

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


class Block(nn.Module):
    """h ↦ (1 − 1/B)·h + (1/B)·relu(W h): modula's residual block with a 1/B multiplier
    (sensitivity (1 − 1/B) + 1/B·1 = 1, output bound ρ ↦ ρ)."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)
        self.a = 1.0 / blocks

    def forward(self, h):
        return h * (1 - self.a) + torch.relu(self.lin(h)) * self.a


class ResMLP(nn.Module):
    """40 → width, ReLU, B = depth − 2 residual blocks, width → 10 (depth = #Linear, as for MLP).
    At depth 2 there are no blocks and the model (weights included, for a given seed) is MLP's."""

    def __init__(self, width: int, depth: int, d_in: int = 40, d_out: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, width, bias=False)
        self.blocks = nn.Sequential(*(Block(width, depth - 2) for _ in range(depth - 2)))
        self.out = nn.Linear(width, d_out, bias=False)

    def forward(self, x):
        return self.out(self.blocks(torch.relu(self.inp(x)))) * OUT_MULT


ARCHS = {"mlp": MLP, "resmlp": ResMLP}
# modula's mass allocation for residual networks: input and output layers mass 1, the stack of
# blocks tared to total mass 1 (blocks.tare() in modula's ResMLP/GPT)
BUDGET_OPTIONS = {"mlp": {}, "resmlp": {"tare": {"blocks": 1.0}}}


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


def train(opt_name, arch, width, depth, lr, seed, x, y, steps, batch):
    torch.manual_seed(seed)
    model = ARCHS[arch](width, depth)
    if opt_name == "manifold_muon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "moved onto the manifold" at init
            opt = modman.ManifoldMuon(model.modules(), lr=lr, scale="rms", solver=SOLVER,
                                      budget=budget(model, scale="rms", **BUDGET_OPTIONS[arch]))
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


class Runs:
    """Per-seed final losses, cached in a JSONL file shared by parallel processes (--opt/--arch)."""

    def __init__(self, path: Path, args, x, y):
        self.path, self.args, self.x, self.y = path, args, x, y
        self.cache: dict[str, float] = {}
        self.replayed, self.trained = 0, 0  # runs read from the cache, runs trained now (in the JSON)
        self.trained_now: set[str] = set()  # (a run trained now and asked for again is not a replay)

    def key(self, opt_name, arch, width, depth, k, seed):
        arch = "mlp" if depth == 2 else arch  # ResMLP at depth 2 is MLP (same weights for a seed)
        # the solver is part of a ManifoldMuon run's key: without it, a run with another SOLVER
        # replayed the projected solver's losses and wrote them under its own name (an audit)
        opt_name = f"{opt_name}:{SOLVER}" if opt_name == "manifold_muon" else opt_name
        return f"{opt_name}|{arch}|{width}|{depth}|{_half_steps(k)}|{seed}|{self.args.steps}|{self.args.batch}|{OUT_MULT}"

    def refresh(self):
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line another process is writing
                    continue
                key = r["key"]
                if key.startswith("manifold_muon|"):  # written before the solver was in the key: all "projected"
                    key = "manifold_muon:projected|" + key[len("manifold_muon|"):]
                self.cache[key] = r["loss"]

    def losses(self, opt_name, arch, width, depth, k):
        """Final losses of every seed at lr = LATTICE[opt]·2^(k/PER_OCTAVE)."""
        self.refresh()
        out = []
        for seed in range(self.args.seeds):
            key = self.key(opt_name, arch, width, depth, k, seed)
            self.replayed += key in self.cache and key not in self.trained_now
            if key not in self.cache:
                self.trained += 1
                self.trained_now.add(key)
                lr = _lr(opt_name, k)
                loss = train(opt_name, arch, width, depth, lr, seed, self.x, self.y, self.args.steps, self.args.batch)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "loss": loss}) + "\n")
                self.cache[key] = loss
            out.append(self.cache[key])
        return out


def _median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def sweep(runs, opt_name, arch, width, depth, log):
    """Median final loss over seeds on the lr grid, extended until the minimum is interior.

    The grid is the lattice LATTICE[opt]·2^(k/PER_OCTAVE) for every configuration (so best lrs
    of different configurations differ by whole grid steps); START[...] only says where to begin."""
    k0 = START.get((opt_name, arch if depth != 2 else "mlp", depth), 0) * PER_OCTAVE // 2
    per_seed: dict[int, list[float]] = {}

    def score(k):
        if k not in per_seed:
            per_seed[k] = runs.losses(opt_name, arch, width, depth, k)
            lr = _lr(opt_name, k)
            log(f"  {opt_name:14s} {arch:6s} w={width:<4d} L={depth} lr={lr:.4g} "
                f"median loss={_median(per_seed[k]):.4f}")
        return _median(per_seed[k])

    for k in range(k0 - 2, k0 + 3):
        score(k)
    for _ in range(6 * PER_OCTAVE):  # up to six octaves beyond the start
        med = {k: _median(v) for k, v in per_seed.items()}
        best = min(med, key=med.get)
        lo, hi = min(med), max(med)
        if best == lo:
            score(lo - 1)
        elif best == hi:
            score(hi + 1)
        else:
            break
    ks = sorted(per_seed)
    med = [_median(per_seed[k]) for k in ks]
    best = ks[min(range(len(ks)), key=med.__getitem__)]
    return {"grid": [_lr(opt_name, k) for k in ks], "k": ks, "median_loss": med,
            "per_seed_loss": [per_seed[k] for k in ks],
            "best_lr": _lr(opt_name, best), "best_loss": min(med),
            "best_lr_fit": _parabola_argmin(ks, med, opt_name),
            "interior": ks[0] < best < ks[-1]}


def _parabola_argmin(ks, med, opt_name):
    """Sub-grid estimate of the best lr: vertex of the parabola through the minimum and its two
    neighbours in (log lr, loss) (None unless the minimum is interior and the parabola convex)."""
    i = min(range(len(ks)), key=med.__getitem__)
    if i == 0 or i == len(ks) - 1:
        return None
    a, b, c = med[i - 1], med[i], med[i + 1]
    curv = a - 2 * b + c
    if curv <= 0:
        return None
    off = 0.5 * (a - c) / curv  # in grid steps, within (−½, ½)
    return _lr(opt_name, ks[i] + off)


def bootstrap_shift(res_by_value, opt_name, n=2000, seed=0):
    """Best-lr shift (max/min over the axis) with the seeds resampled with replacement, per
    configuration (the same resampled seeds at every lr of one configuration, as the seeds share
    init and batches across lrs). Returns percentiles and the share of resamples below 2×."""
    import random

    rng = random.Random(seed)
    shifts = []
    for _ in range(n):
        best = []
        for r in res_by_value.values():
            n_seeds = len(r["per_seed_loss"][0])
            pick = [rng.randrange(n_seeds) for _ in range(n_seeds)]
            med = [_median([losses[j] for j in pick]) for losses in r["per_seed_loss"]]
            best.append(r["k"][min(range(len(med)), key=med.__getitem__)])
        shifts.append(2 ** ((max(best) - min(best)) / PER_OCTAVE))
    shifts.sort()

    def q(p):
        return shifts[min(len(shifts) - 1, int(p * len(shifts)))]

    return {"p05": q(0.05), "median": q(0.5), "p95": q(0.95), "share_below_2x": sum(v < 2 - 1e-9 for v in shifts) / n,
            "resamples": n}


# lr lattice per optimizer (as in the first run: centres 0.5 and 3e-3), and where each sweep
# starts, in √2 steps (the previous run's optimum, to save time; the grid is still extended
# until interior). The grid has PER_OCTAVE points per doubling (--grid: 2, a √2 grid, or 4).
PER_OCTAVE = 2


def _lr(opt_name: str, k: float) -> float:
    return LATTICE[opt_name] * 2 ** (k / PER_OCTAVE)


def _half_steps(k: int) -> str:
    """Grid index k in √2 steps, the runs cache's unit, so that finer grids reuse √2-grid runs."""
    half = k * 2 / PER_OCTAVE
    return str(int(half)) if half == int(half) else repr(half)


LATTICE = {"manifold_muon": 0.5, "adamw": 3e-3}
START = {("manifold_muon", "mlp", 8): 7, ("adamw", "mlp", 8): 3,
         **{(o, "resmlp", d): 3 for o in ("manifold_muon", "adamw") for d in (4, 6, 8, 10)}}
# Reported depth spans (name: (#Linear from, #Linear to)). depth_2_8 is the bar's 2 → 8 in
# Linear layers. ResMLP's depth 2 has no block (total mass 2: input and output); from depth 3 on
# the blocks are tared to mass 1 (total mass 3 at every depth), so depth_3_8 compares members of
# one mass allocation, and blocks_2_8 is the bar's 2 → 8 counted in residual blocks, modula's
# depth for residual networks (#Linear = blocks + 2).
DEPTH_SPANS = {"depth_2_8": ("2", "8"), "depth_3_8": ("3", "8"), "blocks_2_8": ("4", "10")}
DESCRIPTIONS = {
    "mlp": "bias-free ReLU MLP 40→width…→10, depth = #Linear",
    "resmlp": "40→width, ReLU, depth−2 residual blocks h ↦ (1−1/B)h + (1/B)·relu(W h), width→10; "
              "depth = #Linear; ManifoldMuon budget with the blocks tared to mass 1 (modula's ResMLP)",
}


def main():
    global PER_OCTAVE, OUT_MULT
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--opt", choices=["manifold_muon", "adamw"], action="append",
                    help="only these optimizers (runs are cached, so parallel processes can split the work)")
    ap.add_argument("--arch", choices=list(ARCHS), action="append", help="only these architectures")
    ap.add_argument("--no-write", action="store_true", help="fill the runs cache only")
    ap.add_argument("--grid", type=int, choices=[2, 4], default=2,
                    help="lr grid points per doubling: 2 (a √2 grid) or 4 (a 2^¼ grid)")
    ap.add_argument("--out-mult", type=float, default=OUT_MULT,
                    help="the models' fixed logit multiplier (results go to a file named after it)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS,
                    help="folder for the JSON and the plot (default benchmarks/results; the runs cache stays there)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    PER_OCTAVE = args.grid
    OUT_MULT = args.out_mult
    args.steps = args.steps or (1000 if args.full else 300)
    widths = [64, 128, 256, 512] if args.full else [64, 512]
    depths = {"mlp": [2, 4, 8] if args.full else [2, 8], "resmlp": [2, 3, 4, 6, 8, 10]}
    base_width, base_depth = 64, 2
    opts = args.opt or ["manifold_muon", "adamw"]
    archs = args.arch or list(ARCHS)
    x, y = load_data()
    t0 = time.time()
    RESULTS.mkdir(exist_ok=True)
    runs = Runs(RESULTS / f"lr_transfer_runs_s{args.steps}_b{args.batch}.jsonl", args, x, y)

    def log(msg):
        print(msg, flush=True)

    results = {}
    for opt_name in opts:
        results[opt_name] = {}
        for arch in archs:
            res = {"depth": {}}
            if arch == "mlp":  # the width axis at depth 2 (ResMLP at depth 2 is the same model)
                res["width"] = {str(w): sweep(runs, opt_name, arch, w, base_depth, log) for w in widths}
            for d in depths[arch]:
                res["depth"][str(d)] = sweep(runs, opt_name, arch, base_width, d, log)
            for axis in [a for a in ("width", "depth") if a in res]:
                best = [r["best_lr"] for r in res[axis].values()]
                res[f"{axis}_shift"] = max(best) / min(best)
                fits = [r["best_lr_fit"] for r in res[axis].values()]
                res[f"{axis}_shift_fit"] = max(fits) / min(fits) if all(fits) else None
                res[f"{axis}_shift_bootstrap"] = bootstrap_shift(res[axis], opt_name)
                if axis == "depth":
                    for name, (lo, hi) in DEPTH_SPANS.items():
                        if lo not in res[axis] or hi not in res[axis]:
                            continue
                        ends = {k: res[axis][k] for k in (lo, hi)}
                        b = [r["best_lr"] for r in ends.values()]
                        res[f"{name}_shift"] = max(b) / min(b)
                        res[f"{name}_shift_bootstrap"] = bootstrap_shift(ends, opt_name)
            results[opt_name][arch] = res
    if args.no_write:
        return
    out = {
        "command": " ".join(["python"] + sys.argv),
        "machine": machine(),
        "solver": SOLVER, "default_solver_at_run": DEFAULT_SOLVER,
        "steps": args.steps, "batch": args.batch, "seeds": args.seeds, "out_mult": OUT_MULT,
        "grid_ratio": 2 ** (1 / PER_OCTAVE), "schedule": "linear decay to 0",
        "models": DESCRIPTIONS, "base": {"width": base_width, "depth": base_depth},
        "manifold_muon": "ManifoldMuon(scale='rms', budget=modman.modular.budget(model, scale='rms', **BUDGET_OPTIONS[arch]))",
        "budget_options": BUDGET_OPTIONS,
        "adamw": "torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0)",
        "results": results,
        "best_lr_shift": {o: {a: {k: v for k, v in r.items() if "shift" in k} for a, r in results[o].items()}
                          for o in results},
        "all_interior": all(r["interior"] for o in results for a in results[o] for axis in ("width", "depth")
                            for r in results[o][a].get(axis, {}).values()),
        "seconds": time.time() - t0,
        "runs_cache": runs.path.name,
        # how many of the runs behind these results were read from runs_cache (trained by an earlier
        # invocation, possibly of older code, on the machine that wrote them) and how many trained now
        "runs_replayed_from_cache": runs.replayed, "runs_trained_now": runs.trained,
    }
    print()
    print(f"{'optimizer':<14} {'arch':<7} {'axis':<6} {'value':>6} {'best lr':>9} {'fit':>9} {'loss':>8} interior")
    for o in results:
        for a, res in results[o].items():
            for axis in [ax for ax in ("width", "depth") if ax in res]:
                for v, r in res[axis].items():
                    fit = f"{r['best_lr_fit']:.4g}" if r["best_lr_fit"] else "-"
                    print(f"{o:<14} {a:<7} {axis:<6} {v:>6} {r['best_lr']:>9.4g} {fit:>9} {r['best_loss']:>8.4f} "
                          f"{r['interior']}")
                bs = res[f"{axis}_shift_bootstrap"]
                print(f"{o:<14} {a:<7} {axis:<6} shift of best lr: {res[axis + '_shift']:.3g}× (bootstrap over seeds "
                      f"5–95 %: {bs['p05']:.3g}–{bs['p95']:.3g}×, share < 2×: {bs['share_below_2x']:.2f})")
    name = "lr_transfer" + ("" if PER_OCTAVE == 2 else f"_grid{PER_OCTAVE}") + (
        "" if OUT_MULT == 8.0 else f"_out{OUT_MULT:g}")
    (args.out_dir / f"{name}.json").write_text(json.dumps(out, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        panels = [(o, a, axis) for o in results for a in results[o] for axis in ("width", "depth")
                  if axis in results[o][a]]
        fig, axes = plt.subplots(len(results), 3, figsize=(14, 3.6 * len(results)), squeeze=False)
        for ax, (o, a, axis) in zip(axes.flat, panels):
            res = results[o][a]
            for v, r in res[axis].items():
                ax.plot(r["grid"], r["median_loss"], marker="o", label=f"{axis} {v}")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
            ax.set_title(f"{o} {a}: {axis} (best-lr shift {res[axis + '_shift']:.2g}×)", fontsize=9)
            ax.set_xlabel("lr")
            ax.set_ylabel("median final train loss")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out_dir / f"{name}.png", dpi=110)
    except Exception as exc:  # the JSON is the result; a missing plot is reported, not fatal
        print(f"plot not written: {exc}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
