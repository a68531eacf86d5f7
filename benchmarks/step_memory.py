"""Peak temporary memory of one optimizer step, in multiples of the parameter's bytes (issues 3, 4).

One Linear-shaped fp32 parameter W (m×n, a point of the Stiefel manifold) with a fixed random
gradient, for 1024×784, 1024² (the square layer of the 1024 MLP), 2048×784 and 32768×64 (an LM head). Optimizers: ManifoldMuon with each
solver of ``modman.solvers.SOLVERS`` (solver defaults),
modman's Muon (defaults: Keller quintic in bf16; and ns_dtype="float32"), torch's AdamW.

Each (shape, optimizer) runs in a fresh process (1 thread) started with glibc's mmap threshold
fixed (``modman.diagnostics.memory.RSS_ENV``), which steps three times:

1. a plain warm-up step, timed (it creates the optimizer state and faults in code pages); a step
   over --limit-s is cut short by a watchdog and recorded as skipped;
2. ``peak_temporary_bytes(opt.step)`` — live-storage accounting in a dispatch mode, the main
   number, with the ops alive at the peak — inside ``peak_rss_bytes``, the peak RSS growth
   (VmHWM − VmRSS before), which sees everything: kernel workspaces (LAPACK eigh/qr) and
   non-tensor memory (here also the mode's own Python objects) included. Same step, both methods;
3. ``peak_rss_bytes(opt.step)`` alone on the next step (``rss_plain_x``).

All are steady-state steps (state exists, warm start in place). ``peak_x`` = dispatch peak /
(m·n·4), ``rss_x`` = RSS peak of the same step / (m·n·4), ``rss_plain_x`` = RSS of the next step
without the mode. The mode's own Python objects cost ~1–7 MB of RSS (measured: rss_x − rss_plain_x
≈ 2.2× on 1024×784, 0.25× on 32768×64), so compare peak_x with rss_plain_x first: it agrees to
≤ 0.06× except where consecutive steps differ (warm-started lyapunov/anderson); an RSS clearly
above both is memory no dispatched op returned (e.g. LAPACK workspaces).

An iterative solver whose default step exceeds --limit-s is measured again with
``max_iters=--capped-iters``, noted in the row: an estimate of the default's peak, which is
usually one iteration's working set — checked where both run under the limit (2048×784,
32768×64): equal for newton, lyapunov and dual_ascent, but not for anderson (2048×784, an
earlier version: 30.4× capped vs 25.9× default).

    python benchmarks/step_memory.py [--shapes 1024x784,2048x784,32768x64] [--optimizers a,b] [--limit-s 60]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = ("1024x784", "1024x1024", "2048x784", "32768x64")


def optimizer_names() -> list[str]:
    from modman.solvers import SOLVERS

    return [f"manifold_muon:{s}" for s in SOLVERS] + ["muon", "muon_fp32", "adamw"]


def make(name: str, W, max_iters: int | None = None):
    import torch

    import modman

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("manifold_muon:"):
            return modman.ManifoldMuon([("w", W)], lr=0.01, solver=name.split(":", 1)[1], max_iters=max_iters)
        if name == "muon":
            return modman.Muon([("w", W)], lr=0.02, weight_decay=0.0)
        if name == "muon_fp32":
            return modman.Muon([("w", W)], lr=0.02, ns_dtype="float32", weight_decay=0.0)
        if name == "adamw":
            return torch.optim.AdamW([W], lr=1e-3)
    raise ValueError(name)


def worker(shape: str, name: str, limit_s: float, max_iters: int | None = None) -> dict:
    """Run in the fresh process: warm-up step, RSS step, dispatch step (module docstring)."""
    import torch

    from modman.diagnostics.memory import METHOD, RSS_ENV, peak_rss_bytes, peak_temporary_bytes

    torch.set_num_threads(1)
    m, n = (int(v) for v in shape.split("x"))
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.linalg.qr(torch.randn(m, n, generator=g))[0])
    W.grad = torch.randn(m, n, generator=g)
    unit = m * n * 4
    try:
        opt = make(name, W, max_iters)
    except ValueError as e:
        return {"skipped": f"construction refused: {e}"}
    # a step over the limit is cut short: the watchdog reports it and ends the process
    watchdog = threading.Timer(limit_s, lambda: (print("RESULT " + json.dumps(
        {"skipped": f"one step took more than {limit_s:.0f} s on 1 thread"}), flush=True), os._exit(0)))
    watchdog.daemon = True
    watchdog.start()
    t = time.perf_counter()
    try:
        opt.step()
    except ValueError as e:  # e.g. closed_form on a non-square W
        return {"skipped": f"step refused: {e}"}
    finally:
        watchdog.cancel()
    step_s = time.perf_counter() - t
    rss_ok = all(os.environ.get(k) == v for k, v in RSS_ENV.items())
    reports = []
    # the same step seen by both methods (RSS includes the dispatch mode's own small Python objects)
    rss = peak_rss_bytes(lambda: reports.append(peak_temporary_bytes(opt.step))) if rss_ok else None
    rep = reports[0] if reports else peak_temporary_bytes(opt.step)
    # and the next step by RSS alone, without the mode in the process's way
    rss_plain = peak_rss_bytes(opt.step) if rss_ok else None
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {
        "max_iters": max_iters if max_iters is not None else "solver default",
        "step_s": step_s,
        "parameter_bytes": unit,
        "peak_temporary_bytes": rep.peak_bytes,
        "peak_x": rep.peak_bytes / unit,
        "persistent_bytes": rep.persistent_bytes,
        "peak_rss_bytes": rss,
        "rss_x": rss / unit if rss is not None else None,
        "peak_rss_plain_bytes": rss_plain,
        "rss_plain_x": rss_plain / unit if rss_plain is not None else None,
        "state_bytes": state,
        "state_x": state / unit,
        "allocations": rep.allocations,
        "peak_by_op": [{"op": label, "x": b / unit, "count": c} for label, b, c in rep.peak_by_op[:6]],
        "memory_method": METHOD,
    }


def run_worker(shape: str, name: str, limit_s: float, env: dict, max_iters: int | None = None) -> dict:
    """One (shape, optimizer) in a fresh process; its result row."""
    cmd = [sys.executable, __file__, "--worker", shape, name, "--limit-s", str(limit_s)]
    if max_iters is not None:
        cmd += ["--max-iters", str(max_iters)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=10 * limit_s + 120)
    except subprocess.TimeoutExpired:
        return {"skipped": f"worker exceeded {10 * limit_s + 120:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"skipped": f"worker failed: {proc.stderr[-500:]}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--optimizers", default=None, help="comma-separated; default: all")
    p.add_argument("--limit-s", type=float, default=60.0, help="skip an optimizer whose step takes longer")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_memory.json"))
    p.add_argument("--capped-iters", type=int, default=3,
                   help="an iterative solver over the limit is measured again with this max_iters")
    p.add_argument("--worker", nargs=2, metavar=("SHAPE", "OPTIMIZER"), help=argparse.SUPPRESS)
    p.add_argument("--max-iters", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    bad = [s for s in args.shapes.split(",") if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", s)]
    if bad:
        p.error(f"--shapes takes MxN,MxN,… with positive integers, got {bad}")
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.limit_s, args.max_iters)))
        return

    from modman.experiments.machine import machine
    from modman.diagnostics.memory import METHOD, RSS_ENV, RSS_METHOD

    names = args.optimizers.split(",") if args.optimizers else optimizer_names()
    env = {**os.environ, **RSS_ENV, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = {"command": "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "machine": machine(1),
           "setup": "one fp32 parameter m×n on the Stiefel manifold, fixed random gradient; a warm-up "
                    "step, then one step per method (steady state); each (shape, optimizer) in a fresh "
                    "process, 1 thread",
           "unit": "x = bytes / (m·n·4), the parameter's own bytes",
           "memory_method": METHOD, "rss_method": RSS_METHOD, "limit_s": args.limit_s, "shapes": {}}
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)  # now, not after the work
    for shape in args.shapes.split(","):
        rows = out["shapes"].setdefault(shape, {})
        for name in names:
            t = time.perf_counter()
            row = run_worker(shape, name, args.limit_s, env)
            if row.get("skipped", "").startswith("one step took") and name.startswith("manifold_muon:"):
                # estimate the peak with fewer iterations (module docstring), and say so
                capped = run_worker(shape, name, args.limit_s, env, args.capped_iters)
                if "skipped" not in capped:
                    capped["note"] = (f"with the default max_iters {row['skipped']}; measured with "
                                      f"max_iters={args.capped_iters}")
                    row = capped
            rows[name] = row
            wall = time.perf_counter() - t
            if "skipped" in row:
                print(f"{shape:>9} {name:<26} skipped: {row['skipped']}  ({wall:.0f} s)", flush=True)
            else:
                top = row["peak_by_op"][0] if row["peak_by_op"] else {"op": "-", "x": 0}
                rss = (f"{row['rss_x']:6.2f}x (alone {row['rss_plain_x']:6.2f}x)" if row["rss_x"] is not None
                       else "     -")
                print(f"{shape:>9} {name:<26} peak {row['peak_x']:6.2f}x  rss {rss}  state {row['state_x']:5.2f}x"
                      f"  step {row['step_s']:7.2f} s  top: {top['op']} ({top['x']:.2f}x)  ({wall:.0f} s)"
                      + (f"  [{row['note']}]" if "note" in row else ""), flush=True)
            path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'optimizer':<26}" + "".join(f"{s:>22}" for s in out["shapes"]))
    print(f"{'':<26}" + "".join(f"{'peak x / rss x':>22}" for _ in out["shapes"]))
    for name in names:
        cells = []
        for s in out["shapes"]:
            r = out["shapes"][s].get(name, {})
            cells.append("skipped" if "skipped" in r else f"{r['peak_x']:.2f} / {r['rss_x'] or float('nan'):.2f}"
                         + ("*" if "note" in r else ""))
        print(f"{name:<26}" + "".join(f"{c:>22}" for c in cells))
    print("* measured with max_iters capped (the default step is over the time limit); see 'note'")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
