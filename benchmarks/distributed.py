"""ManifoldMuon's step under data parallelism: ``distributed=True`` against one process.

The model is the solver issue's MLP (784→1024→1024→10 by default, bias-free, batch 128). Three
set-ups on the same machine, side by side in one run:

- ``one process, T threads`` for T = 1 and T = world size (the fair peer of W ranks on W cores);
- ``W ranks × 1 thread``, gloo, ``distributed=True``: each rank solves its share of the matrices.

Every rank computes the same forward/backward on the same batch (identical gradients, as DDP's
all-reduce would give), then the timed ``optimizer.step()`` starts after a barrier; a rank's step
ends when the owners' broadcasts have arrived, and the set-up's time for that step is the slowest
rank's. Medians over the timed steps after warm-up. The ranks' final weights are checked bitwise
equal to each other and to the one-process run.

    python benchmarks/distributed.py [--world 2] [--hidden 1024] [--steps 8] [--warmup 4]
        [--out benchmarks/results/distributed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from modman.experiments.machine import machine  # noqa: E402

import modman  # noqa: E402


def build(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, hidden, bias=False),
                         nn.ReLU(), nn.Linear(hidden, 10, bias=False))


def timed_steps(hidden: int, steps: int, warmup: int, distributed: bool) -> tuple[list[float], nn.Module]:
    """Seconds of each timed optimizer step (after ``warmup``) and the trained model."""
    model = build(hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "moved … onto the stiefel manifold": the same in every set-up
        opt = modman.ManifoldMuon(model.modules(), lr=0.05, budget="uniform", distributed=distributed)
    gen = torch.Generator().manual_seed(1)
    X, w = torch.randn(2048, 784, generator=gen), torch.randn(784, 10, generator=gen)
    y = (X @ w).argmax(1)
    times = []
    for step in range(warmup + steps):
        idx = torch.randint(0, 2048, (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        if distributed:
            dist.barrier()
        t = time.perf_counter()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return times, model


def rank_main(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world)
    times, model = timed_steps(args.hidden, args.steps, args.warmup, distributed=True)
    torch.save({"times": times, "weights": [p.detach() for p in model.parameters()]},
               pathlib.Path(args.tmp) / f"rank{args.rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the ranks (then they are killed)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "distributed.json"))
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--init", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    for name, least in (("world", 2), ("hidden", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name} must be ≥ {least}, got {getattr(args, name)}")
    if args.rank is not None:
        return rank_main(args)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the work

    results = {}
    reference = None
    for threads in sorted({1, args.world}):
        torch.set_num_threads(threads)
        times, model = timed_steps(args.hidden, args.steps, args.warmup, distributed=False)
        results[f"one process, {threads} thread{'s' * (threads > 1)}"] = statistics.median(times)
        if threads == 1:
            reference = [p.detach() for p in model.parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(args.world),
                                   "--hidden", str(args.hidden), "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--init", f"{tmp}/init", "--tmp", tmp], env=env)
                 for r in range(args.world)]
        # every rank waited for, within a deadline, and none left running: a rank that failed left
        # the others in a collective, and the first failure ended the wait for the rest (an audit)
        deadline = time.monotonic() + args.timeout
        try:
            codes = [proc.wait(timeout=max(deadline - time.monotonic(), 0)) for proc in procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if codes is None or any(codes):
            raise SystemExit(f"a rank failed or ran past --timeout {args.timeout} s (exit codes {codes})")
        ranks = [torch.load(f"{tmp}/rank{r}.pt") for r in range(args.world)]
    per_step = [max(rk["times"][i] for rk in ranks) for i in range(args.steps)]
    label = f"{args.world} ranks × 1 thread, distributed=True"
    results[label] = statistics.median(per_step)
    bitwise = all(torch.equal(a, b) for rk in ranks for a, b in zip(rk["weights"], reference))
    one = results["one process, 1 thread"]
    peer = results[f"one process, {args.world} thread{'s' * (args.world > 1)}"]
    out = {
        "command": "python " + " ".join(sys.argv),
        "what": f"median seconds of ManifoldMuon.step() (default solver) on MLP 784→{args.hidden}→{args.hidden}→10, "
                f"batch 128, steps {args.warmup}…{args.warmup + args.steps - 1}",
        "machine": machine(threads=1),
        "seconds_per_step": results,
        "speedup_vs_one_thread": one / results[label],
        "speedup_vs_same_cores_threads": peer / results[label],
        "ranks_bitwise_equal_one_process": bitwise,
    }
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
