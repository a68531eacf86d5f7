"""Per-step overhead where the maths is cheap: many small parameters (run with OMP_NUM_THREADS=1).

Models, all tiny so that Python and kernel launches dominate:
  - "norms": 500 LayerNorm(32) and one Linear(32, 32) — 1001 fallback tensors, one matrix;
  - "mlp": 200 Linear(32, 32) with biases — 200 same-shape matrices and 200 biases.
Optimizers: ManifoldMuon (defaults, and foreach=False), modman.Muon (ns_dtype="float32"),
torch.optim.AdamW (foreach=True, and the for-loop). Gradients are fixed random tensors, so the
times are optimizer.step() alone; each optimizer steps its own copy, in interleaved rounds, and
the median over rounds is reported with its ratio to torch's foreach AdamW from the same run.
Construction: ManifoldMuon(model.modules(), budget="uniform", project_on_init=False) on MLPs of
500, 1000 and 2000 Linear(16, 16) layers (one param group per matrix).

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--rounds 15] [--out PATH]
Writes benchmarks/results/step_overhead.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import time
import warnings

import torch

import modman
from modman.experiments.machine import machine


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"norms": torch.nn.Sequential(*[torch.nn.LayerNorm(32) for _ in range(500)], torch.nn.Linear(32, 32)),
            "mlp": torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(200)])}


OPTIMIZERS = {
    "manifold_muon": lambda m: modman.ManifoldMuon(m.modules()),
    "manifold_muon_foreach_false": lambda m: modman.ManifoldMuon(m.modules(), foreach=False),
    "muon_fp32": lambda m: modman.Muon(m.modules(), ns_dtype="float32"),
    "torch_adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), foreach=True),
    "torch_adamw_loop": lambda m: torch.optim.AdamW(m.parameters(), foreach=False),
}


def step_times(base: torch.nn.Module, rounds: int) -> dict[str, float]:
    runs = {}
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in base.parameters()]
    for name, make in OPTIMIZERS.items():
        m = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make(m)
        for p, gr in zip(m.parameters(), grads):
            p.grad = gr.clone()
        opt.step()  # state made, first-step work done
        runs[name] = (opt, [])
    for _ in range(rounds):
        for name, (opt, times) in runs.items():
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    return {name: statistics.median(times) for name, (_, times) in runs.items()}


def construction_times(layers=(500, 1000, 2000)) -> dict[str, float]:
    out = {}
    for n in layers:
        m = torch.nn.Sequential(*[torch.nn.Linear(16, 16, bias=False) for _ in range(n)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            modman.ManifoldMuon(m.modules(), budget="uniform", project_on_init=False)
            out[str(n)] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "step_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    construction_times((10,))  # imports and lazy set-up out of the timed runs
    result = {"machine": machine(), "threads": 1, "modman": modman.__file__,
              "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python " + " ".join(sys.argv),
              "setup": __doc__.split("\n\n")[1].strip(), "steps": {}}
    for name, model in models().items():
        times = step_times(model, args.rounds)
        peer = times["torch_adamw_foreach"]
        result["steps"][name] = {k: {"step_s_median": v, "ratio_vs_torch_adamw_foreach": v / peer} for k, v in times.items()}
        print(name, " ".join(f"{k}={v * 1e3:.1f}ms ({v / peer:.2f}×)" for k, v in times.items()), flush=True)
    result["construction_s"] = construction_times()
    print("construction", " ".join(f"{k} layers {v * 1e3:.0f} ms" for k, v in result["construction_s"].items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
