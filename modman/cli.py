"""The `modman` command: the blog's experiment on MNIST-1D, one optimizer after another.

    modman                       # defaults: MLP 40→128→128→10, 1000 steps, all optimizers
    modman --steps 300 --optimizers manifold_muon,adamw --out runs/

Prints train/test accuracy, milliseconds per step and each weight's singular-value range, and
writes singular_values.png and results.json to the output folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from .experiments.machine import machine
from .solvers import DEFAULT_SOLVER


def parse_args(argv=None) -> argparse.Namespace:
    from .experiments.mnist1d import available_optimizers

    p = argparse.ArgumentParser(prog="modman", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"modman {__version__} (torch {torch.__version__})")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    p.add_argument("--width", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--depth", type=int, default=3, help="number of linear layers (default 3)")
    p.add_argument("--batch-size", type=int, default=512, help="batch size (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batches (default 0)")
    p.add_argument("--optimizers", default=",".join(available_optimizers()),
                   help=f"comma-separated, from {','.join(available_optimizers())} (default: all)")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                   help="learning rate for one optimizer, e.g. --lr adamw=3e-3 (repeatable)")
    p.add_argument("--solver", default=DEFAULT_SOLVER,
                   help=f"ManifoldMuon's subproblem solver (default {DEFAULT_SOLVER!r}, the library's: certified gap "
                        "≤ 1e-4; 'projected' is one msign per step and reports the gap it leaves, ~0.1)")
    p.add_argument("--out", default="modman-out", help="output folder (default ./modman-out)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--logit-scale", type=float, default=1.0,
                   help="multiply the logits in the loss (default 1, the blog's model as it is; the README's "
                        "fix for a constrained head is 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    from .solvers import SOLVERS

    if args.solver not in SOLVERS:
        p.error(f"--solver: unknown solver {args.solver!r}; choose from {','.join(sorted(SOLVERS))}")
    known = available_optimizers()
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not args.optimizers:  # "--optimizers ," would run nothing, then fail to plot nothing
        p.error(f"--optimizers: no optimizer named; choose from {','.join(known)}")
    for o in args.optimizers:
        if o not in known:
            p.error(f"--optimizers: unknown optimizer {o!r}; choose from {','.join(known)}")
    repeated = sorted({o for o in args.optimizers if args.optimizers.count(o) > 1})
    if repeated:  # (the same run twice, two identical rows)
        p.error(f"--optimizers: {','.join(repeated)} named twice")
    if args.solver != DEFAULT_SOLVER and "manifold_muon" not in args.optimizers:  # (ignored without a word)
        p.error(f"--solver {args.solver}: manifold_muon is not among --optimizers {','.join(args.optimizers)}")
    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name in lrs:  # (the last one won silently)
            p.error(f"--lr: the learning rate of {name} is given twice")
        try:
            lrs[name] = float(value)
        except ValueError:
            p.error(f"--lr expects NAME=LR, got {item!r}")
        if name not in known:
            p.error(f"--lr: unknown optimizer {name!r}")
        if name not in args.optimizers:  # (it was ignored without a word)
            p.error(f"--lr {item}: {name} is not among --optimizers {','.join(args.optimizers)}")
        if not (math.isfinite(lrs[name]) and lrs[name] >= 0):  # torch would refuse it mid-run
            p.error(f"--lr: the learning rate of {name} must be a finite number ≥ 0, got {value!r}")
    args.lr = lrs
    for flag in ("steps", "width", "depth", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be ≥ 1")
    if not (math.isfinite(args.logit_scale) and args.logit_scale > 0):
        p.error(f"--logit-scale must be a finite number > 0, got {args.logit_scale}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be ≥ 1 (leave it out for all cores), got {args.threads}")
    problem = _out_problem(args.out)
    if problem:  # found now, not after the whole training run
        p.error(f"--out {args.out!r}: {problem}")
    return args


def _out_problem(path: str) -> str | None:
    """Why the output folder ``path`` cannot be created or written, or None. Checks without
    creating anything: ``path`` must be a writable folder, or its nearest existing ancestor one."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a folder"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, so no folder can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable"
    return None


def sv_range(values: list[float]) -> str:
    """[σ_min, σ_max] to three decimals; below 0.01 in scientific notation (σ_min 8e-5 printed as
    0.000), NaN for a diverged run's weights."""
    def fmt(v: float) -> str:
        return f"{v:.3f}" if v == 0 or abs(v) >= 1e-2 else f"{v:.2e}"

    if any(math.isnan(v) for v in values):
        return "[nan]"
    return f"[{fmt(min(values))}, {fmt(max(values))}]"


def main(argv=None) -> int:
    from .data import load_mnist1d
    from .experiments.mnist1d import train

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:  # what parse_args cannot see without creating it (e.g. a read-only file system as root)
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        print(f"modman: error: --out {args.out!r}: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(2) from None
    data = load_mnist1d(seed=42)
    print(f"MNIST-1D: {len(data['x'])} train / {len(data['x_test'])} test, MLP "
          f"{'→'.join(['40'] + [str(args.width)] * (args.depth - 1) + ['10'])} (no biases, ReLU), batch {args.batch_size}, "
          f"{args.steps} steps, lr → 0 linearly, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
          + (f", logits ×{args.logit_scale:g} in the loss" if args.logit_scale != 1 else ""))
    results = []
    start = time.time()
    where = machine()  # before training (its load average is the one the run started with)
    for name in args.optimizers:
        options = {"solver": args.solver} if name == "manifold_muon" else None
        r = train(name, steps=args.steps, width=args.width, depth=args.depth, batch_size=args.batch_size,
                  lr=args.lr.get(name), seed=args.seed, data=data, progress=not args.no_progress,
                  eval_every=max(1, args.steps // 10), optimizer_options=options, logit_scale=args.logit_scale)
        results.append(r)
    print()
    header = (f"{'optimizer':<14}{'lr':>8}{'train acc':>11}{'test acc':>10}{'ms/step':>9}{'ms/opt':>8}{'gap':>9}"
              "  singular values per weight")
    print(header)
    print("-" * len(header))
    for r in results:
        ranges = "  ".join(f"{k.split('.')[0]}:{sv_range(v)}" for k, v in r.singular_values.items())
        print(f"{r.optimizer:<14}{r.lr:>8.3g}{r.train_acc:>11.3f}{r.test_acc:>10.3f}"
              f"{r.seconds_per_step * 1e3:>9.2f}{r.optimizer_seconds_per_step * 1e3:>8.2f}"
              f"{'' if r.duality_gap is None else format(r.duality_gap, '.1e'):>9}  {ranges}")
    if "manifold_muon" in args.optimizers:
        print("gap: median over steps of the worst certified relative duality gap of ManifoldMuon's subproblem "
              f"(solver {args.solver!r})")
    _print_diagnostics(results)
    png = os.path.join(args.out, "singular_values.png")
    _plot(results, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": " ".join(["modman"] + list(sys.argv[1:] if argv is None else argv)),
                   "machine": where,
                   "args": {k: v for k, v in vars(args).items()}, "seconds": time.time() - start,
                   "runs": [{"optimizer": r.optimizer, "lr": r.lr, "train_acc": r.train_acc, "test_acc": r.test_acc,
                             "seconds_per_step": r.seconds_per_step,
                             "optimizer_seconds_per_step": r.optimizer_seconds_per_step,
                             "duality_gap_median": r.duality_gap,
                             "singular_values": r.singular_values, "history": r.history} for r in results]},
                  f, indent=1)
    print(f"\nwrote {png} and {os.path.join(args.out, 'results.json')} ({time.time() - start:.0f} s)")
    return 0


def _print_diagnostics(results) -> None:
    try:
        from .diagnostics import spectrum_table
    except ImportError:
        return
    for r in results:
        print(f"\n{r.optimizer}:")
        print(spectrum_table(r.model))


def _plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results):
        for name, sv in r.singular_values.items():
            ax.plot(range(1, len(sv) + 1), sv, marker=".", label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"{r.optimizer} (test {r.test_acc:.2f})")
        ax.set_xlabel("index")
    axes[0][0].set_ylabel("singular value")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
