"""Per-step cost of the optimizer family on the issue's MLPs (issue 3), side by side.

MLP 784→1024→1024→10 and 784→2048→512→10 (bias-free), synthetic batch of 128. For each
optimizer: median wall time of ``optimizer.step()`` over the timed steps (after one warm-up
step), msign calls per constrained matrix, optimizer-state bytes, and the peak temporary memory
of one step. Optimizers run on identical copies of the model and alternate step by step.

Memory (peak MB): ``modman.diagnostics.peak_temporary_bytes`` around one steady-state step —
live-storage accounting in a TorchDispatchMode (CPU has no max_memory_allocated): every storage
an op allocates inside the step counts from its allocation until it is freed; storages that
existed before (parameters, gradients, state) do not. Scratch space inside a kernel (LAPACK
workspaces) is not seen; benchmarks/step_memory.py cross-checks against peak RSS.

    python benchmarks/optimizers.py [--steps 3] [--solvers projected,newton,dual_ascent] [--slow-budget S] [--merge]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import pathlib
import statistics
import sys
import time
import warnings

import torch
from torch import nn

from modman.experiments.machine import machine  # noqa: E402

import modman
from modman.diagnostics.memory import METHOD, peak_temporary_bytes


def mlp(dims):
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make(name, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("manifold_muon:"):
            return modman.ManifoldMuon(model.modules(), lr=0.05, budget="uniform", solver=name.split(":")[1])
        if name == "muon_fp32":
            return modman.Muon(model.modules(), lr=0.02, ns_dtype="float32", weight_decay=0.0)
        if name == "torch_muon":
            return torch.optim.Muon(model.parameters(), lr=0.02, weight_decay=0.0)
        if name == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-3)
    raise ValueError(name)


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def solver_override(opt, solver):
    """Within the block, every group of ``opt`` that has a subproblem solver uses ``solver``
    (None: no change)."""
    groups = [g for g in opt.param_groups if "solver" in g] if solver else []
    saved = [g["solver"] for g in groups]
    for g in groups:
        g["solver"] = solver
    try:
        yield
    finally:
        for g, s in zip(groups, saved):
            g["solver"] = s


def peak_step_bytes(opt) -> int:
    """Peak bytes allocated and alive at once during one ``opt.step()`` (dispatch accounting)."""
    return peak_temporary_bytes(opt.step, attribute=False).peak_bytes


def merged(path: pathlib.Path, new: dict) -> dict:
    """The existing results with this run's rows put in (per model, per optimizer); this run's
    alone where there are none yet."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    commands = old["command"] if isinstance(old["command"], dict) else {m: old["command"] for m in old["models"]}
    for spec, rows in new["models"].items():
        for n, row in old["models"].get(spec, {}).items():
            row.setdefault("command", commands.get(spec, old["command"]))
        old["models"].setdefault(spec, {}).update(rows)
        note = f"; rows {', '.join(rows)} replaced by: {new['command']}"
        if not commands.get(spec, "").endswith(note):  # results are written after every model
            commands[spec] = commands.get(spec, "") + note
    old["command"] = commands
    old["machine_of_last_merge"] = new["machine"]
    return old


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3, help="timed steps per optimizer")
    p.add_argument("--solvers", default="projected,newton,dual_ascent")
    p.add_argument("--models", default="784-1024-1024-10,784-2048-512-10")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps first; ManifoldMuon runs all but the last with solver 'projected' "
                        "(cheap), so momentum reaches steady state (a first gradient has rank ≤ batch, "
                        "which makes the fixed point of 'anderson' stall) before its own solver warms up")
    p.add_argument("--slow-budget", type=float, default=None,
                   help="an optimizer whose warm-up step takes longer than this many seconds is not "
                        "timed further nor memory-profiled; its row reports the warm-up step")
    p.add_argument("--profile-slow", action="store_true",
                   help="profile one step's peak temporary bytes even for optimizers over --slow-budget")
    p.add_argument("--merge", action="store_true",
                   help="replace only the rows measured now in the existing optimizers.json (each merged "
                        "row records its own command; ratios are always to the Muon rows of the same run)")
    p.add_argument("--out", type=pathlib.Path,
                   default=pathlib.Path(__file__).resolve().parent / "results" / "optimizers.json")
    args = p.parse_args()
    if args.slow_budget is not None and args.warmup < 1:
        # the budget judges the warm-up step: without one there is nothing to judge (a KeyError, an audit)
        p.error("--slow-budget needs --warmup ≥ 1: it is judged on the last warm-up step")
    args.out.parent.mkdir(parents=True, exist_ok=True)  # now, not after the work
    torch.set_num_threads(1)
    names = [f"manifold_muon:{s}" for s in args.solvers.split(",")] + ["muon_fp32", "torch_muon", "adamw"]
    out = {"command": "python " + " ".join(sys.argv), "machine": machine(), "batch": 128,
           "warmup": f"{args.warmup} untimed steps (ManifoldMuon: all but the last with solver 'projected')",
           "memory_method": "peak_temporary_bytes of one steady-state step: " + METHOD,
           "models": {}}
    g = torch.Generator().manual_seed(0)
    for spec in args.models.split(","):
        dims = [int(d) for d in spec.split("-")]
        base = mlp(dims)
        x, y = torch.randn(128, dims[0], generator=g), torch.randint(0, dims[-1], (128,), generator=g)
        models = {n: copy.deepcopy(base) for n in names}
        opts = {n: make(n, models[n]) for n in names}
        times = {n: [] for n in names}
        calls = {n: [] for n in names}
        largest = max(p.numel() * p.element_size() for p in base.parameters())
        warmup = {}
        W0 = args.warmup
        for step in range(W0 + args.steps):
            for k in range(len(names)):
                n = names[(k + step) % len(names)]  # rotate the order every step
                if step >= W0 and args.slow_budget is not None and warmup[n] > args.slow_budget:
                    continue
                if step < W0 - 1 and not n.startswith("manifold_muon:"):
                    continue  # a Muon or AdamW step costs the same at any step: warm up once
                opts[n].zero_grad()
                nn.functional.cross_entropy(models[n](x), y).backward()
                with solver_override(opts[n], "projected" if step < W0 - 1 else None):
                    t = time.perf_counter()
                    opts[n].step()
                    dt = time.perf_counter() - t
                if step == W0 - 1:
                    warmup[n] = dt
                if step >= W0:
                    times[n].append(dt)
                    st = getattr(opts[n], "last_step_stats", {})
                    c = [v["msign_calls"] for v in st.values() if "msign_calls" in v]
                    if c:
                        calls[n].append(sum(c) / len(c))
                print(f"{spec} step {step} {n}: {dt:.3f} s", flush=True)
        rows = {}
        for n in names:
            if not times[n]:  # over --slow-budget: the (cold) warm-up step is all there is
                st = getattr(opts[n], "last_step_stats", {})
                c = [v["msign_calls"] for v in st.values() if "msign_calls" in v]
                peak = None
                if args.profile_slow:
                    opts[n].zero_grad()
                    nn.functional.cross_entropy(models[n](x), y).backward()
                    peak = peak_step_bytes(opts[n])
                rows[n] = {"step_s_median": warmup[n], "timed": "warm-up step only (over --slow-budget)",
                           "msign_calls_per_matrix": statistics.mean(c) if c else None,
                           "state_bytes": state_bytes(opts[n]), "peak_temporary_bytes": peak,
                           "largest_parameter_bytes": largest}
                continue
            opts[n].zero_grad()
            nn.functional.cross_entropy(models[n](x), y).backward()
            rows[n] = {"step_s_median": statistics.median(times[n]),
                       "msign_calls_per_matrix": statistics.mean(calls[n]) if calls[n] else None,
                       "state_bytes": state_bytes(opts[n]),
                       "peak_temporary_bytes": peak_step_bytes(opts[n]),
                       "largest_parameter_bytes": largest}
        ref = rows["muon_fp32"]["step_s_median"]
        for n in names:
            rows[n]["ratio_vs_own_muon_fp32"] = rows[n]["step_s_median"] / ref
            rows[n]["ratio_vs_torch_muon"] = rows[n]["step_s_median"] / rows["torch_muon"]["step_s_median"]
        for n in names:
            rows[n]["command"] = out["command"]
        out["models"][spec] = rows
        print(f"\n{spec}: {'optimizer':<26}{'s/step':>9}{'×Muon32':>9}{'×torchMuon':>11}{'msign':>7}"
              f"{'state MB':>10}{'peak MB':>12}")
        for n, r in rows.items():
            print(f"{'':{len(spec) + 2}}{n:<26}{r['step_s_median']:>9.3f}{r['ratio_vs_own_muon_fp32']:>9.2f}"
                  f"{r['ratio_vs_torch_muon']:>11.2f}{r['msign_calls_per_matrix'] or 0:>7.1f}"
                  f"{r['state_bytes'] / 2**20:>10.1f}{(r['peak_temporary_bytes'] or 0) / 2**20:>12.1f}")
        args.out.write_text(json.dumps(merged(args.out, out) if args.merge else out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
