"""LoRA on the toy model: the learning-rate ratio to full fine-tuning, rank invariance of the
1/r factor, which layers to adapt, AdamW vs Muon vs ManifoldMuon, and PEFT interop.

    python benchmarks/lora.py [--steps 100] [--batch 64] [--seeds 0 1 2] [--workers 2]
                              [--phases ...] [--summarize]

The base is ``modman.toy.pretrain("base")`` (d_model 128, 4 layers, 3-digit addition; ``--base
base-ls``: the same recipe with label smoothing 0.1; ``base-ls-256``, ``base-ls-512``: that at
d_model 256 and 512; see the README on the lr ratio), fine-tuned
on modular addition (mod 97; ``--task subtraction``: 3-digit subtraction) with fresh batches each
step, constant lr, no weight decay. A run's score is the loss on a fixed held-out batch (512 test
problems) after the last step.

LR search per configuration, every point on every seed (scores are seed medians):
1. coarse ×2 grid lr0·2^{-2..2} (16× wide; lr0 = 1e-3 for full fine-tuning and 1e-2 for LoRA
   unless --lr0 says otherwise), extended by ×2 at an edge until the median argmin
   is strictly inside (a 3-point start stopped at a local dip of the flat LoRA landscape);
2. √2 refinement: the two √2 neighbours of the coarse optimum;
3. the best lr is the argmin of the medians over the union grid, which then has both its √2
   neighbours measured (checked, and the grid extends by √2 if ever not).
All lrs are lr0·√2^k with the same lr0 for every LoRA sweep, so sweeps share grid points.

Runs are cached in benchmarks/results/<out>_runs_s<steps>_b<batch>.jsonl, named after --out (one
file per protocol; rerunning resumes). Writes --out (default benchmarks/results/lora.json:
machine, command, every measurement; ``lr_ratio`` per rank) and <out>_lr.png / <out>_curves.png
beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import statistics
import sys
import time
from pathlib import Path

import torch

from modman.lora import (LoRAConfig, TrainConfig, apply_lora, count_parameters, eval_loss_fn,
                         lora_parameter_count, optimizer_factory, rank_for_parameter_count,
                         task_data, train)
from modman.solvers import DEFAULT_SOLVER
from modman.toy import pretrain, tasks
from modman.toy.pretrain import RECIPES
from modman.experiments.machine import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SQRT2 = math.sqrt(2.0)


_WORKER = {}
# The fine-tuning tasks (--task): the base knows 3-digit addition; mod97 asks for (a + b) mod 97,
# subtraction for a − b, both with reversed answers.
TASKS = {"mod97": ("modular_addition(3 digits, mod 97)", lambda: tasks.modular_addition(3, 97)),
         "subtraction": ("subtraction(3 digits)", lambda: tasks.subtraction(3))}


def _worker_init(threads: int, task_name: str = "mod97") -> None:
    torch.set_num_threads(threads)
    task = TASKS[task_name][1]()
    batch = task.sample(512, 12345, "test")
    _WORKER["task"], _WORKER["task_name"] = task, task_name
    _WORKER["eval_fn"] = eval_loss_fn([{"input_ids": batch.input_ids, "labels": batch.labels}])


def _one_run(job: dict) -> dict:
    """One fine-tune; kind "full" (every parameter) or "lora". Runs in a worker process."""
    if _WORKER.get("task_name") != job["task"]:
        _worker_init(torch.get_num_threads(), job["task"])
    kind, lr, seed = job["kind"], job["lr"], job["seed"]
    torch.manual_seed(seed)
    model = pretrain(job["base"])  # loaded from the cache: a fresh copy of the base each run
    if kind == "lora":
        apply_lora(model, LoRAConfig(job["r"], alpha=job["alpha"], target_modules=job["target"]),
                   seed=seed)
    extra = {"solver": job["solver"]} if job["solver"] else {}
    factory = optimizer_factory(job["optimizer"], lr, weight_decay=0.0, **extra)
    data = task_data(_WORKER["task"], job["batch"], seed=seed)
    start = time.perf_counter()
    error = None
    try:
        result = train(model, factory, data, TrainConfig(job["steps"]),
                       eval_fn=_WORKER["eval_fn"])
        curve = [h["loss"] for h in result.history]
        final = result.history[-1]["eval_loss"]
        step_seconds = statistics.median(h["step_seconds"] for h in result.history)
    except FloatingPointError as exc:  # a diverged run scores +inf
        curve, final, step_seconds, error = [], float("inf"), float("nan"), str(exc)
    if not math.isfinite(final):
        final = float("inf")
    return {**job, "final_loss": final, "curve": curve, "step_seconds": step_seconds,
            "wall": time.perf_counter() - start, "error": error,
            "trainable": count_parameters(model)["trainable"]}


def lr_key(lr: float) -> str:
    return f"{lr:.6g}"


class Bench:
    def __init__(self, args, cache_file: Path):
        self.args = args
        self.cache_file = cache_file
        self.cache = {}
        self.reload()
        self.pool = None
        if args.workers > 1:
            import multiprocessing as mp
            self.pool = mp.get_context("spawn").Pool(args.workers, _worker_init,
                                                     (args.threads, args.task))

    def reload(self) -> None:
        """Pick up runs another process appended to the cache file."""
        if self.cache_file.is_file():
            for line in self.cache_file.read_text().splitlines():
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line being written right now
                        continue
                    self.cache.setdefault(record["key"], record)

    def model(self):
        return pretrain(self.args.base)

    def job(self, kind: str, lr: float, seed: int, *, r: int = 0, target="all-linear",
            optimizer: str = "adamw", alpha: float = 32, solver: str | None = None) -> dict:
        base, task = self.args.base, self.args.task
        # the base by its recipe hash (an edited recipe must not reuse old runs); the first
        # protocol's keys (base, mod97) carry neither, so its cache stays valid
        key = json.dumps([kind, round(lr, 12), seed, r, target, optimizer, alpha, solver,
                          self.args.steps, self.args.batch]
                         + ([f"{base}-{RECIPES[base].hash()}"] if base != "base" else [])
                         + ([task] if task != "mod97" else []))
        return {"key": key, "base": base, "task": task, "kind": kind, "lr": lr, "seed": seed,
                "r": r, "target": target, "optimizer": optimizer, "alpha": alpha, "solver": solver,
                "steps": self.args.steps, "batch": self.args.batch}

    def run_many(self, jobs: list[dict]) -> list[dict]:
        """Run the uncached jobs (in parallel with --workers), cache them, return all records."""
        if any(j["key"] not in self.cache for j in jobs):
            self.reload()
        todo, seen = [], set()
        for j in jobs:
            if j["key"] not in self.cache and j["key"] not in seen:
                todo.append(j)
                seen.add(j["key"])
        results = (self.pool.imap_unordered(_one_run, todo) if self.pool
                   else map(_one_run, todo))
        for record in results:
            self.cache[record["key"]] = record
            with self.cache_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"  {record['kind']:4s} r={record['r']:<2d} {str(record['target']):10s} "
                  f"{record['optimizer']:13s} α={record['alpha']:<4g} lr={record['lr']:.3g} "
                  f"seed={record['seed']} loss={record['final_loss']:.4f} "
                  f"({record['wall']:.0f}s){' ' + record['error'] if record['error'] else ''}",
                  flush=True)
        return [self.cache[j["key"]] for j in jobs]

    def run(self, kind: str, lr: float, seed: int, **settings) -> dict:
        return self.run_many([self.job(kind, lr, seed, **settings)])[0]

    def sweep(self, lr0: float, **settings) -> dict:
        """The LR search of the module docstring; returns the grid, medians and the best lr."""
        seeds = self.args.seeds
        per_seed: dict[float, list[float]] = {}

        def measure(lrs):
            lrs = [lr for lr in lrs if lr not in per_seed]
            jobs = [self.job(lr=lr, seed=s, **settings) for lr in lrs for s in seeds]
            records = self.run_many(jobs)
            for i, lr in enumerate(lrs):
                per_seed[lr] = [r["final_loss"] for r in records[i * len(seeds):
                                                                 (i + 1) * len(seeds)]]

        def median(lr):
            return statistics.median(per_seed[lr])

        # 1. coarse ×2 grid lr0·2^{-2..2} (at least 16× wide: a narrower one can stop at a
        # local dip of a flat, noisy landscape), all seeds, extended at an edge while the
        # median argmin is there
        coarse = [lr0 * 2.0**k for k in (-2, -1, 0, 1, 2)]
        for _ in range(8):
            measure(coarse)
            best = min(coarse, key=median)
            if best == coarse[0]:
                coarse.insert(0, coarse[0] / 2)
            elif best == coarse[-1]:
                coarse.append(coarse[-1] * 2)
            else:
                break
        coarse_inside = coarse[0] < best < coarse[-1]
        coarse_best = best
        # 2. √2 refinement around the coarse median optimum
        measure([best / SQRT2, best * SQRT2])
        # 3. best over the union grid, with both √2 neighbours measured
        for _ in range(6):
            best = min(per_seed, key=median)
            missing = [lr for lr in (best / SQRT2, best * SQRT2)
                       if not any(math.isclose(lr, x, rel_tol=1e-9) for x in per_seed)]
            if not missing:
                break
            measure(missing)
        grid = sorted(per_seed)
        inside = grid[0] < best < grid[-1] and not missing
        hi = max(per_seed[best])
        return {"settings": settings,
                "coarse_grid": [float(lr_key(lr)) for lr in coarse],
                "coarse_best_lr": coarse_best, "coarse_optimum_strictly_inside": coarse_inside,
                "grid": [float(lr_key(lr)) for lr in grid],
                "median_loss": {lr_key(lr): median(lr) for lr in grid},
                "per_seed": {lr_key(lr): per_seed[lr] for lr in grid},
                "best_lr": best, "best_median_loss": median(best),
                "best_seed_range": [min(per_seed[best]), hi],
                "neighbour_median_loss": {lr_key(best / SQRT2): median(grid[grid.index(best) - 1])
                                          if inside else None,
                                          lr_key(best * SQRT2): median(grid[grid.index(best) + 1])
                                          if inside else None},
                "lrs_with_median_within_best_seed_range": [
                    float(lr_key(lr)) for lr in grid if median(lr) <= hi],
                "optimum_strictly_inside": inside, "grid_spacing": SQRT2,
                "runs": len(grid) * len(seeds)}


def interop(seed: int = 0) -> dict:
    """PEFT interop and merge parity on a tiny random LlamaForCausalLM (no download)."""
    import tempfile

    # this folder is on sys.path when the script runs without PYTHONSAFEPATH (python puts a
    # script's folder first): its kernels.py would shadow the `kernels` package transformers imports
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]
    import peft
    import transformers

    from modman.lora import (adapters_disabled, load_adapter, lora_layers, merge_lora,
                             save_adapter)

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)

    def fresh():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()

    def batch(step):
        x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        return {"input_ids": x, "labels": x}

    def fit(model, steps=5):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(steps):
            opt.zero_grad()
            model(**batch(step)).loss.backward()
            opt.step()
        return model.eval()

    x = batch(999)["input_ids"]
    out = {"steps": 5, "model": "LlamaForCausalLM(hidden 64, 2 layers), random"}
    ours = fit(apply_lora(fresh(), LoRAConfig(8), seed=seed))
    trained_state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        logits = ours(input_ids=x).logits
        with adapters_disabled(ours):
            out["modman_adapter_logit_shift"] = float((logits - ours(input_ids=x).logits)
                                                      .abs().max())
        save_adapter(ours, tmp + "/ours")
        theirs = peft.PeftModel.from_pretrained(fresh(), tmp + "/ours").eval()
        out["modman_to_peft_max_abs_diff"] = float((theirs(input_ids=x).logits - logits)
                                                   .abs().max())
        merged = merge_lora(ours)(input_ids=x).logits
        out["merged_vs_unmerged_fp32_max_abs_diff"] = float((merged - logits).abs().max())
    with tempfile.TemporaryDirectory() as tmp:
        pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=8, lora_alpha=32,
                                                          target_modules="all-linear",
                                                          task_type="CAUSAL_LM"))
        pm.train()
        fit(pm)
        with torch.no_grad():
            peft_logits = pm(input_ids=x).logits
            with pm.disable_adapter():
                out["peft_adapter_logit_shift"] = float((peft_logits - pm(input_ids=x).logits)
                                                        .abs().max())
            pm.save_pretrained(tmp + "/theirs")
            mine = load_adapter(fresh(), tmp + "/theirs").eval()
            out["peft_to_modman_max_abs_diff"] = float((mine(input_ids=x).logits - peft_logits)
                                                       .abs().max())
    # bf16 base with fp32 adapters (the trained ones): merge in fp32 then cast (ours), and the
    # naive merge in bf16 arithmetic, each against the fp32 model with the same weights.
    with torch.no_grad():
        reference = apply_lora(fresh(), LoRAConfig(8), seed=seed)
        reference.load_state_dict(trained_state)
        exact = reference(input_ids=x).logits
        model = copy.deepcopy(reference).to(torch.bfloat16)
        for path, layer in lora_layers(model).items():  # adapters fp32, as apply_lora makes them
            for name in ("lora_A", "lora_B"):
                getattr(layer, name)["default"].weight.data = trained_state[
                    f"{path}.{name}.default.weight"].clone()
        unmerged = model(input_ids=x).logits.float()
        naive = copy.deepcopy(model)
        for layer in lora_layers(naive).values():
            delta = (layer.lora_B["default"].weight.bfloat16() @ layer.lora_A["default"].weight
                     .bfloat16()) * layer.scaling["default"]
            layer.base_layer.weight.add_(delta)
            layer.merged_adapters = ["default"]
        merged = merge_lora(model)(input_ids=x).logits.float()
        out["bf16"] = {
            "unmerged_vs_fp32_max_abs_diff": float((unmerged - exact).abs().max()),
            "merged_fp32_then_cast_vs_fp32": float((merged - exact).abs().max()),
            "merged_naive_bf16_vs_fp32": float((naive(input_ids=x).logits.float() - exact)
                                               .abs().max()),
            "merged_vs_unmerged_max_abs_diff": float((merged - unmerged).abs().max()),
            "logit_scale": float(exact.abs().max()),
        }
    return out


def coincidence(curves: list[list[float]], upto: int) -> dict:
    """How far apart the training-loss curves of different ranks are over steps 1..upto: the
    mean over steps of the range across ranks, absolute and divided by the mean loss drop
    over those steps (curve[0] − curve[upto−1], averaged over ranks)."""
    if not all(curves) or any(len(c) < upto for c in curves):
        return {"mean_range": None, "relative_to_loss_drop": None, "diverged": True}
    rng = statistics.mean(max(c[t] for c in curves) - min(c[t] for c in curves)
                          for t in range(upto))
    drop = statistics.mean(c[0] - c[upto - 1] for c in curves)
    return {"mean_range": rng, "relative_to_loss_drop": rng / drop if drop > 0 else None,
            "diverged": False}


def argmin_stability(sweep: dict, samples: int = 2000, seed: int = 0) -> dict:
    """How well the seeds pin the optimum down: resample each lr's seeds with replacement,
    take the argmin of the medians; the fraction of resamples choosing each lr."""
    import random

    rng = random.Random(seed)
    per_seed = {float(k): v for k, v in sweep["per_seed"].items()}
    counts = dict.fromkeys(per_seed, 0)
    for _ in range(samples):
        med = {lr: statistics.median(rng.choices(v, k=len(v))) for lr, v in per_seed.items()}
        counts[min(med, key=med.get)] += 1
    return {lr_key(lr): n / samples for lr, n in sorted(counts.items())}


def summarize(result: dict) -> None:
    """Post-hoc measures from recorded runs only (no training): the bootstrap argmin
    distribution of every sweep, and how often ranks 4 and 16 land within 2x of each other."""
    groups = [result.get(k, {}) for k in ("sweeps", "layer_sweeps", "optimizer_sweeps")]
    for sweeps in groups:
        for s in sweeps.values():
            s["bootstrap_argmin_fraction"] = argmin_stability(s)
            s["median_loss_spread_over_grid_excluding_diverged"] = (
                max(v for v in s["median_loss"].values() if v < 2.0)
                - min(s["median_loss"].values()))
    seen = {}
    for name, c in result.get("curves", {}).items():  # one entry per distinct lr
        if "same_lr_as" in c:
            continue
        if c["lr"] in seen:
            result["curves"][name] = {"lr": c["lr"], "same_lr_as": seen[c["lr"]]}
        else:
            seen[c["lr"]] = name
    sweeps = result.get("sweeps", {})
    if "lora_r4" in sweeps and "lora_r16" in sweeps:
        a = sweeps["lora_r4"]["bootstrap_argmin_fraction"]
        b = sweeps["lora_r16"]["bootstrap_argmin_fraction"]
        within = sum(pa * pb for la, pa in a.items() for lb, pb in b.items()
                     if max(float(la), float(lb)) / min(float(la), float(lb)) < 2 - 1e-9)
        result.setdefault("best_lora_lr_shift_r4_vs_r16", {})[
            "bootstrap_probability_shift_below_2x"] = within


def time_optimizers(args, configs: dict, steps: int = 15, rounds: int = 3) -> dict:
    """Median seconds per step of each optimizer on LoRA r=4 (and full fine-tuning), measured
    interleaved in one process (rounds × steps each) so background load hits them alike."""
    _worker_init(args.threads, args.task)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (kind, optimizer, lr, solver) in configs.items():
            torch.manual_seed(0)
            model = pretrain(args.base)
            if kind == "lora":
                apply_lora(model, LoRAConfig(4), seed=0)
            extra = {"solver": solver} if solver else {}
            result = train(model, optimizer_factory(optimizer, lr, **extra),
                           task_data(_WORKER["task"], args.batch, seed=0), TrainConfig(steps))
            times[name] += [h["step_seconds"] for h in result.history[1:]]
    return {name: statistics.median(t) for name, t in times.items()}


def curves_phase(bench, args, lr: float, lr_from: str) -> dict:
    """Training-loss curves of every rank at one lr, with α = 32 (the 1/r factor) and with
    α = 32 r (no 1/r), on every seed; the coincidence measure of :func:`coincidence`."""
    print(f"== early curves at lr {lr:.3g} ({lr_from}), with and without 1/r", flush=True)
    ranks = sorted(args.ranks)
    jobs = [bench.job("lora", lr, s, r=r, alpha=alpha)
            for s in args.seeds for r in ranks for alpha in (32, 32 * r)]
    bench.run_many(jobs)
    upto = min(args.curve_steps, args.steps)
    per_seed = {}
    for s in args.seeds:
        with_r = [bench.run("lora", lr, s, r=r)["curve"] for r in ranks]
        without = [bench.run("lora", lr, s, r=r, alpha=32 * r)["curve"] for r in ranks]
        per_seed[str(s)] = {
            "with_1_over_r": {"first_steps": coincidence(with_r, upto),
                              "all_steps": coincidence(with_r, args.steps)},
            "without_1_over_r": {"first_steps": coincidence(without, upto),
                                 "all_steps": coincidence(without, args.steps)},
            "final_loss_with": [bench.run("lora", lr, s, r=r)["final_loss"] for r in ranks],
            "final_loss_without": [bench.run("lora", lr, s, r=r, alpha=32 * r)["final_loss"]
                                   for r in ranks]}

    def med(cond, span, field):
        vals = [p[cond][span][field] for p in per_seed.values()]
        return statistics.median(vals) if all(v is not None for v in vals) else None

    summary = {cond: {span: {f: med(cond, span, f) for f in ("mean_range",
                                                             "relative_to_loss_drop")}
                      for span in ("first_steps", "all_steps")}
               for cond in ("with_1_over_r", "without_1_over_r")}
    w = summary["with_1_over_r"]["first_steps"]["mean_range"]
    wo = summary["without_1_over_r"]["first_steps"]["mean_range"]
    return {
        "lr": lr, "lr_from": lr_from, "ranks": ranks, "first_steps": upto,
        "measure": "mean over steps 1..N of the range (max - min) across ranks of the "
                   "training loss (same batches for every rank); also divided by the mean "
                   "loss drop over those steps; median over seeds",
        "without_1_over_r_means": "alpha = 32 r, i.e. scale 32 for every rank (r=1 "
                                  "identical to with)",
        "summary_median_over_seeds": summary,
        "without_over_with_first_steps": wo / w if w and wo is not None else None,
        "per_seed": per_seed,
        "curves_seed0": {
            "with_1_over_r": [bench.run("lora", lr, args.seeds[0], r=r)["curve"]
                              for r in ranks],
            "without_1_over_r": [bench.run("lora", lr, args.seeds[0], r=r,
                                           alpha=32 * r)["curve"] for r in ranks]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 4, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel")
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--curves-at", type=int, nargs="+", default=[16, 1],
                        help="ranks whose best lr the curves are run at (16: the pre-set "
                             "choice; 1: the smallest optimum, stable for every rank)")
    parser.add_argument("--timing-steps", type=int, default=15)
    parser.add_argument("--phases", nargs="+",
                        default=["interop", "ratio", "curves", "layers", "optimizers"])
    parser.add_argument("--base", default="base",
                        choices=["base", "base-ls", "base-ls-256", "base-ls-512"],
                        help="the pretrained recipe fine-tuned (base-ls: label smoothing 0.1)")
    parser.add_argument("--task", default="mod97", choices=list(TASKS),
                        help="the fine-tuning task")
    parser.add_argument("--lr0", type=float, nargs=2, default=[1e-3, 1e-2],
                        metavar=("FULL", "LORA"),
                        help="centres of the coarse grids; keep each on its default's lattice "
                             "(1e-3·√2^k, 1e-2·√2^k) so sweeps of different runs share points")
    parser.add_argument("--out", default=str(RESULTS / "lora.json"))
    parser.add_argument("--summarize", action="store_true",
                        help="no training: add the post-hoc measures to --out, report, plot")
    args = parser.parse_args()
    if args.summarize:
        out_path = Path(args.out)
        result = json.loads(out_path.read_text())
        summarize(result)
        report(result)
        plot(result, out_path.parent, out_path.stem)
        out_path.write_text(json.dumps(result, indent=2))
        return
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    cache = out_path.with_name(f"{out_path.stem}_runs_s{args.steps}_b{args.batch}.jsonl")
    recipe = RECIPES[args.base]
    pretrain(args.base)  # trained once here, before the workers load it
    setup = {"base": f"modman.toy.pretrain({args.base!r}) (d_model {recipe.d_model}, "
                     f"{recipe.n_layers} layers, label smoothing {recipe.label_smoothing})",
             "task": TASKS[args.task][0], "steps": args.steps,
             "batch": args.batch, "seeds": args.seeds, "schedule": "constant",
             "weight_decay": 0.0, "alpha": 32, "optimizer": "AdamW unless stated",
             "score": "held-out loss (512 test problems) after the last step",
             "lr0": {"full": args.lr0[0], "lora": args.lr0[1]},
             "lr_search": "coarse x2 grid lr0*2^{-2..2} on all seeds (median), extended "
                          "until the optimum is strictly inside; sqrt2 refinement around it "
                          "on all seeds; best = "
                          "argmin of seed medians with both sqrt2 neighbours measured",
             "runs_cache": cache.name}
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if result.get("setup", {}).get("steps") != args.steps or \
            result.get("setup", {}).get("batch") != args.batch:
        result = {}  # another protocol: never mix its numbers into this one
    result.update({"command": "python " + " ".join(sys.argv), "machine": machine(),
                   "setup": setup})
    result.setdefault("phases_done", [])

    def save(phase=None):
        if phase and phase not in result["phases_done"]:
            result["phases_done"].append(phase)
        result["phases_not_done"] = [p for p in args.phases if p not in result["phases_done"]]
        out_path.write_text(json.dumps(result, indent=2))

    bench = Bench(args, cache) if set(args.phases) - {"interop"} else None
    full_lr0, lora_lr0 = args.lr0
    if "interop" in args.phases:
        print("== PEFT interop and merge parity", flush=True)
        result["interop"] = interop()
        save("interop")
    if "ratio" in args.phases:
        print("== LR ratio: full fine-tuning vs LoRA (all layers, α = 32)", flush=True)
        sweeps = {"full": bench.sweep(full_lr0, kind="full")}
        result["sweeps"] = sweeps
        save()
        for r in args.ranks:
            sweeps[f"lora_r{r}"] = bench.sweep(lora_lr0, kind="lora", r=r)
            save()
        full_lr = sweeps["full"]["best_lr"]
        result["lr_ratio"] = {str(r): sweeps[f"lora_r{r}"]["best_lr"] / full_lr
                              for r in args.ranks}
        if 4 in args.ranks and 16 in args.ranks:
            a, b = sweeps["lora_r4"]["best_lr"], sweeps["lora_r16"]["best_lr"]
            result["best_lora_lr_shift_r4_vs_r16"] = {
                "r4": a, "r16": b, "factor": max(a, b) / min(a, b),
                "bar": "< 2x", "passes": max(a, b) / min(a, b) < 2}
        save("ratio")
    if "curves" in args.phases and "sweeps" in result:
        if "lr" in result.get("curves", {}):  # the single-lr layout of an earlier version
            result["curves"] = {}
        result.setdefault("curves", {})
        for at in args.curves_at:
            result["curves"][f"r{at}_optimum"] = curves_phase(
                bench, args, result["sweeps"][f"lora_r{at}"]["best_lr"], f"lora_r{at} optimum")
            save()
        save("curves")
    if "layers" in args.phases:
        print("== which layers: attention-only vs MLP-only vs all, matched parameters", flush=True)
        model = bench.model()
        mlp_count = lora_parameter_count(model, LoRAConfig(4, target_modules="mlp"))
        r_att = rank_for_parameter_count(model, mlp_count, "attention")
        layers = {
            "mlp_r4": bench.sweep(lora_lr0, kind="lora", r=4, target="mlp"),
            f"attention_r{r_att}": bench.sweep(lora_lr0, kind="lora", r=r_att,
                                               target="attention"),
            "all_r4": result.get("sweeps", {}).get("lora_r4")
            or bench.sweep(lora_lr0, kind="lora", r=4),
        }
        counts = {"mlp_r4": mlp_count,
                  f"attention_r{r_att}": lora_parameter_count(
                      model, LoRAConfig(r_att, target_modules="attention")),
                  "all_r4": lora_parameter_count(model, LoRAConfig(4))}
        att = layers[f"attention_r{r_att}"]
        result["layers"] = {
            name: {"params": counts[name], "best_lr": s["best_lr"],
                   "median_loss": s["best_median_loss"], "seed_range": s["best_seed_range"],
                   "optimum_strictly_inside": s["optimum_strictly_inside"]}
            for name, s in layers.items()}
        result["layers"]["attention_worse_than_mlp_and_all_by_more_than_seed_range"] = all(
            att["best_seed_range"][0] > layers[k]["best_seed_range"][1]
            for k in ("mlp_r4", "all_r4"))
        result["layer_sweeps"] = layers
        save("layers")
    if "optimizers" in args.phases:
        print("== optimizers on LoRA r=4, all layers", flush=True)
        opt = {"adamw": result.get("sweeps", {}).get("lora_r4")
               or bench.sweep(lora_lr0, kind="lora", r=4),
               "muon": bench.sweep(lora_lr0, kind="lora", r=4, optimizer="muon"),
               "manifold_muon": bench.sweep(lora_lr0, kind="lora", r=4,
                                            optimizer="manifold_muon", solver="projected")}
        result["optimizer_sweeps"] = opt
        save()
        print("   timing (interleaved, one process)", flush=True)
        timing = time_optimizers(args, steps=args.timing_steps, configs={
            "full_adamw": ("full", "adamw", result.get("sweeps", {}).get("full", {})
                           .get("best_lr", 1e-3), None),
            "adamw": ("lora", "adamw", opt["adamw"]["best_lr"], None),
            "muon": ("lora", "muon", opt["muon"]["best_lr"], None),
            "manifold_muon": ("lora", "manifold_muon", opt["manifold_muon"]["best_lr"],
                              "projected"),
            "manifold_muon_default": ("lora", "manifold_muon", opt["manifold_muon"]["best_lr"],
                                      DEFAULT_SOLVER)})
        rows = {}
        for name, s in opt.items():
            runs = [bench.run(lr=s["best_lr"], seed=seed, **s["settings"]) for seed in args.seeds]
            rows[name] = {"best_lr": s["best_lr"], "median_final_loss": s["best_median_loss"],
                          "seed_range": s["best_seed_range"],
                          "median_step_seconds_in_sweep_runs": statistics.median(
                              r["step_seconds"] for r in runs),
                          "median_step_seconds_interleaved": timing[name],
                          "optimum_strictly_inside": s["optimum_strictly_inside"]}
        rows["full_adamw_step_seconds_interleaved"] = timing["full_adamw"]
        rows["manifold_muon_solver"] = (
            f"projected, {timing['manifold_muon']:.3f} s/step; the default solver (modman.solvers.DEFAULT_SOLVER = "
            f"{DEFAULT_SOLVER!r}) {timing['manifold_muon_default']:.3f} s/step (interleaved timing)")
        rows["manifolds"] = {"lora_A": "Stiefel (unscaled, orthonormal rows) under ManifoldMuon "
                                       "(solver 'projected'); Euclidean for AdamW/Muon",
                             "lora_B": "Euclidean (Muon step) under ManifoldMuon",
                             "base": "frozen, never given to the optimizer"}
        rows["timing_note"] = ("2 shared CPU cores under background load (see machine); "
                               f"interleaved timing: 3 rounds x {args.timing_steps} steps per "
                               "optimizer in one process, first step of each round dropped")
        result["optimizers"] = rows
        save("optimizers")
    if bench is not None and bench.pool is not None:
        bench.pool.close()
    summarize(result)
    report(result)
    plot(result, out_path.parent, out_path.stem)
    save()


def report(result: dict) -> None:
    if "sweeps" in result:
        print("\nconfig      best lr    median loss  seed range          inside")
        for name, s in result["sweeps"].items():
            lo, hi = s["best_seed_range"]
            print(f"{name:10s}  {s['best_lr']:.3g}  {s['best_median_loss']:.4f}       "
                  f"[{lo:.4f}, {hi:.4f}]  {s['optimum_strictly_inside']}")
    if "lr_ratio" in result:
        print("lr_ratio", {k: round(v, 2) for k, v in result["lr_ratio"].items()})
        print("r4 vs r16:", result.get("best_lora_lr_shift_r4_vs_r16"))
    for name, c in result.get("curves", {}).items():
        if "same_lr_as" in c:
            print(f"curves at lr {c['lr']:.3g} ({name}): same lr as {c['same_lr_as']}")
            continue
        print(f"curves at lr {c['lr']:.3g} ({name}):", json.dumps(c["summary_median_over_seeds"]),
              "without/with (first steps):", c["without_over_with_first_steps"])
    if "layers" in result:
        print("layers:", json.dumps(result["layers"], indent=1))
    if "optimizers" in result:
        print("\noptimizer       best lr   median loss  s/step (interleaved)")
        for name, row in result["optimizers"].items():
            if isinstance(row, dict) and "best_lr" in row:
                print(f"{name:14s}  {row['best_lr']:.3g}  {row['median_final_loss']:.4f}  "
                      f"{row['median_step_seconds_interleaved']:.3f}")
    if "interop" in result:
        print("interop:", json.dumps(result["interop"], indent=1))


def plot(result: dict, folder: Path, stem: str = "lora") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sweeps" in result:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, s in result["sweeps"].items():
            med = sorted((float(k), v) for k, v in s["median_loss"].items())
            line, = ax.plot(*zip(*med), "o-", label=f"{name} (best {s['best_lr']:.2g})")
            for k, losses in s["per_seed"].items():
                ax.plot([float(k)] * len(losses), losses, ".", color=line.get_color(),
                        alpha=0.35)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("held-out loss after fine-tuning")
        ax.legend(fontsize=8)
        ax.set_title("LR sweeps (line: median of seeds; dots: seeds)")
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
        fig.tight_layout()
        fig.savefig(folder / f"{stem}_lr.png", dpi=120)
    if result.get("curves"):
        rows = [(k, c) for k, c in result["curves"].items() if "curves_seed0" in c]
        fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.3 * len(rows)), squeeze=False)
        for row, (name, c) in zip(axes, rows):
            for ax, key, title in ((row[0], "with_1_over_r", "α/r (α = 32)"),
                                   (row[1], "without_1_over_r", "no 1/r (scale 32)")):
                for r, curve in zip(c["ranks"], c["curves_seed0"][key]):
                    if curve:
                        ax.plot(range(1, len(curve) + 1), curve, label=f"r={r}")
                ax.set_title(f"{title}, lr {c['lr']:.2g} ({name}), seed 0", fontsize=9)
                ax.set_yscale("log")
                ax.set_xlabel("step")
                ax.legend(fontsize=8)
            row[0].set_ylabel("training loss")
        fig.tight_layout()
        fig.savefig(folder / f"{stem}_curves.png", dpi=120)


if __name__ == "__main__":
    main()
