"""LoRA on the toy model: the learning-rate ratio to full fine-tuning, rank invariance of the
1/r factor, which layers to adapt, AdamW vs Muon vs ManifoldMuon, and PEFT interop.

    python benchmarks/lora.py [--steps 60] [--batch 32] [--seeds 0 1 2] [--phases ...]

The base is ``modman.toy.pretrain("base")`` (d_model 128, 4 layers, 3-digit addition), fine-tuned
on modular addition (mod 97) with fresh batches each step, constant lr, no weight decay. A run's
score is the loss on a fixed held-out batch after the last step. LR search per configuration:
a ×2 coarse pass on seed 0 (extended until its best is inside), a √2 refinement around it on
seed 0, then all seeds on the best point and its two √2 neighbours; the best lr is the argmin of
the seed medians, accepted only strictly inside (both √2 neighbours worse; otherwise the grid
extends). Runs are cached in benchmarks/results/lora_runs.jsonl, so an interrupted benchmark
resumes. Writes benchmarks/results/lora.json (machine, command, every measurement; ``lr_ratio``
per rank) and lora_lr.png / lora_curves.png beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from modman.lora import (LoRAConfig, TrainConfig, apply_lora, count_parameters, eval_loss_fn,
                         lora_parameter_count, optimizer_factory, rank_for_parameter_count,
                         task_data, train)
from modman.toy import pretrain, tasks

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SQRT2 = math.sqrt(2.0)


def machine() -> dict:
    cpu, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("avx", "avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
                flags = [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    return {"cpu_model": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "python": platform.python_version(), "gpu": None,
            "load_average_at_start": list(os.getloadavg())}


class Bench:
    def __init__(self, args, cache_file: Path):
        self.args = args
        self.task = tasks.modular_addition(3, 97)
        self.eval_fn = eval_loss_fn([self._eval_batch()])
        self.cache_file = cache_file
        self.cache = {}
        if self.cache_file.is_file():
            for line in self.cache_file.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.cache[record["key"]] = record

    def _eval_batch(self) -> dict:
        batch = self.task.sample(512, 12345, "test")
        return {"input_ids": batch.input_ids, "labels": batch.labels}

    def model(self):
        return pretrain("base")  # loaded from the cache: a fresh copy of the base each run

    def run(self, kind: str, lr: float, seed: int, *, r: int = 0, target="all-linear",
            optimizer: str = "adamw", alpha: float = 32, solver: str | None = None) -> dict:
        """One fine-tune; kind "full" (every parameter) or "lora". Cached by its settings."""
        key = json.dumps([kind, round(lr, 12), seed, r, target, optimizer, alpha, solver,
                          self.args.steps, self.args.batch])
        if key in self.cache:
            return self.cache[key]
        torch.manual_seed(seed)
        model = self.model()
        if kind == "lora":
            apply_lora(model, LoRAConfig(r, alpha=alpha, target_modules=target), seed=seed)
        extra = {"solver": solver} if solver else {}
        factory = optimizer_factory(optimizer, lr, weight_decay=0.0, **extra)
        data = task_data(self.task, self.args.batch, seed=seed)
        start = time.perf_counter()
        try:
            result = train(model, factory, data, TrainConfig(self.args.steps),
                           eval_fn=self.eval_fn)
            curve = [h["loss"] for h in result.history]
            final = result.history[-1]["eval_loss"]
            step_seconds = statistics.median(h["step_seconds"] for h in result.history)
        except FloatingPointError:
            curve, final, step_seconds = [], float("inf"), float("nan")
        if not math.isfinite(final):
            final = float("inf")
        record = {"key": key, "kind": kind, "lr": lr, "seed": seed, "r": r, "target": target,
                  "optimizer": optimizer, "alpha": alpha, "final_loss": final, "curve": curve,
                  "step_seconds": step_seconds, "wall": time.perf_counter() - start,
                  "trainable": count_parameters(model)["trainable"]}
        self.cache[key] = record
        with self.cache_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"  {kind:4s} r={r:<2d} {str(target):10s} {optimizer:13s} lr={lr:.3g} seed={seed} "
              f"loss={final:.4f} ({record['wall']:.0f}s)", flush=True)
        return record

    def sweep(self, lr0: float, **settings) -> dict:
        """The LR search of the module docstring; returns the grid, medians and the best lr."""
        seeds = self.args.seeds

        def loss(lr, seed):
            return self.run(lr=lr, seed=seed, **settings)["final_loss"]

        coarse = {lr0 * 2.0**k: None for k in (-1, 0, 1)}
        for _ in range(6):
            for lr in coarse:
                coarse[lr] = loss(lr, seeds[0])
            best = min(coarse, key=coarse.get)
            lrs = sorted(coarse)
            if best == lrs[0]:
                coarse[lrs[0] / 2] = None
            elif best == lrs[-1]:
                coarse[lrs[-1] * 2] = None
            else:
                break
        fine = {lr: coarse[lr] for lr in coarse}
        for lr in (best / SQRT2, best * SQRT2):
            fine[lr] = loss(lr, seeds[0])
        centre = min(fine, key=fine.get)
        medians: dict[float, float] = {}
        for _ in range(4):
            for lr in (centre / SQRT2, centre, centre * SQRT2):
                if lr not in medians:
                    medians[lr] = statistics.median(loss(lr, s) for s in seeds)
            best = min(medians, key=medians.get)
            lrs = sorted(medians)
            inside = lrs[0] < best < lrs[-1]
            if inside:
                break
            centre = best
        per_seed = {lr: [loss(lr, s) for s in seeds] for lr in sorted(medians)}
        return {"settings": settings, "coarse_seed0": {f"{k:.6g}": v for k, v in
                                                       sorted(coarse.items())},
                "grid": [float(f"{lr:.6g}") for lr in sorted(medians)],
                "median_loss": {f"{lr:.6g}": m for lr, m in sorted(medians.items())},
                "per_seed": {f"{lr:.6g}": v for lr, v in per_seed.items()},
                "best_lr": best, "best_median_loss": medians[best],
                "best_seed_range": [min(per_seed[best]), max(per_seed[best])],
                "optimum_strictly_inside": inside, "grid_spacing": SQRT2}


def interop(seed: int = 0) -> dict:
    """PEFT interop and merge parity on a tiny random LlamaForCausalLM (no download)."""
    import tempfile

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


def spread(curves: list[list[float]], upto: int) -> float:
    """Mean over the first ``upto`` steps of the range of the losses across ranks."""
    return statistics.mean(max(c[t] for c in curves) - min(c[t] for c in curves)
                           for t in range(upto))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--phases", nargs="+",
                        default=["interop", "ratio", "curves", "layers", "optimizers"])
    parser.add_argument("--out", default=str(RESULTS / "lora.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update({"command": "python " + " ".join(sys.argv), "machine": machine(),
                   "setup": {"base": "modman.toy.pretrain('base') (d_model 128, 4 layers)",
                             "task": "modular_addition(3 digits, mod 97)", "steps": args.steps,
                             "batch": args.batch, "seeds": args.seeds, "schedule": "constant",
                             "weight_decay": 0.0, "alpha": 32, "optimizer": "AdamW",
                             "score": "held-out loss (512 test problems) after the last step"}})

    def save():
        out_path.write_text(json.dumps(result, indent=2))

    cache = out_path.with_name(out_path.stem + "_runs.jsonl")
    bench = Bench(args, cache) if set(args.phases) - {"interop"} else None
    if "interop" in args.phases:
        print("== PEFT interop and merge parity", flush=True)
        result["interop"] = interop()
        save()
    if "ratio" in args.phases:
        print("== LR ratio: full fine-tuning vs LoRA (all layers, α = 32)", flush=True)
        sweeps = {"full": bench.sweep(1e-3, kind="full")}
        result["sweeps"] = sweeps
        for r in args.ranks:
            sweeps[f"lora_r{r}"] = bench.sweep(1e-2, kind="lora", r=r)
            save()
        full_lr = sweeps["full"]["best_lr"]
        result["lr_ratio"] = {str(r): sweeps[f"lora_r{r}"]["best_lr"] / full_lr
                              for r in args.ranks}
        lrs = [sweeps[f"lora_r{r}"]["best_lr"] for r in args.ranks if r >= 4]
        result["best_lora_lr_moves_between_ranks_4_16"] = max(lrs) / min(lrs) if lrs else None
        save()
    if "curves" in args.phases and "sweeps" in result:
        print("== early curves with and without the 1/r factor", flush=True)
        lr = result["sweeps"]["lora_r4"]["best_lr"]
        with_r = [bench.run("lora", lr, 0, r=r)["curve"] for r in args.ranks]
        without = [bench.run("lora", lr, 0, r=r, alpha=32 * r)["curve"] for r in args.ranks]
        upto = min(20, args.steps)
        ok = all(with_r) and all(without)
        result["curves"] = {
            "lr": lr, "ranks": args.ranks, "first_steps": upto,
            "with_1_over_r": with_r, "without_1_over_r (alpha=32r)": without,
            "mean_range_across_ranks_with": spread(with_r, upto) if ok else None,
            "mean_range_across_ranks_without": spread(without, upto) if all(without) else
            "diverged"}
        save()
    if "layers" in args.phases:
        print("== which layers: attention-only vs MLP-only vs all, matched parameters", flush=True)
        model = bench.model()
        mlp_count = lora_parameter_count(model, LoRAConfig(4, target_modules="mlp"))
        r_att = rank_for_parameter_count(model, mlp_count, "attention")
        layers = {
            "mlp_r4": bench.sweep(1e-2, kind="lora", r=4, target="mlp"),
            f"attention_r{r_att}": bench.sweep(1e-2, kind="lora", r=r_att, target="attention"),
            "all_r4": result.get("sweeps", {}).get("lora_r4")
            or bench.sweep(1e-2, kind="lora", r=4),
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
        save()
    if "optimizers" in args.phases:
        print("== optimizers on LoRA r=4, all layers", flush=True)
        opt = {"adamw": result.get("sweeps", {}).get("lora_r4")
               or bench.sweep(1e-2, kind="lora", r=4),
               "muon": bench.sweep(1e-2, kind="lora", r=4, optimizer="muon"),
               "manifold_muon": bench.sweep(2e-2, kind="lora", r=4, optimizer="manifold_muon",
                                            solver="projected")}
        rows = {}
        for name, s in opt.items():
            runs = [bench.run(lr=s["best_lr"], seed=seed, **s["settings"]) for seed in args.seeds]
            rows[name] = {"best_lr": s["best_lr"], "median_final_loss": s["best_median_loss"],
                          "seed_range": s["best_seed_range"],
                          "median_step_seconds": statistics.median(r["step_seconds"]
                                                                   for r in runs),
                          "optimum_strictly_inside": s["optimum_strictly_inside"]}
        rows["manifolds"] = {"lora_A": "Stiefel (unscaled, orthonormal rows) under ManifoldMuon "
                                       "(solver 'projected'); Euclidean for AdamW/Muon",
                             "lora_B": "Euclidean (Muon step) under ManifoldMuon",
                             "base": "frozen, never given to the optimizer"}
        result["optimizers"] = rows
        result["optimizer_sweeps"] = opt
        save()
    report(result)
    plot(result, out_path.parent)
    save()


def report(result: dict) -> None:
    if "lr_ratio" in result:
        print("\nconfig      best lr    median loss  seed range          inside")
        for name, s in result["sweeps"].items():
            lo, hi = s["best_seed_range"]
            print(f"{name:10s}  {s['best_lr']:.3g}  {s['best_median_loss']:.4f}       "
                  f"[{lo:.4f}, {hi:.4f}]  {s['optimum_strictly_inside']}")
        print("lr_ratio", {k: round(v, 2) for k, v in result["lr_ratio"].items()})
    if "curves" in result:
        c = result["curves"]
        print(f"early curves (first {c['first_steps']} steps), mean range across ranks: with 1/r "
              f"{c['mean_range_across_ranks_with']}, without {c['mean_range_across_ranks_without']}")
    if "layers" in result:
        print("layers:", json.dumps(result["layers"], indent=1))
    if "optimizers" in result:
        print("\noptimizer       best lr   median loss  s/step")
        for name, row in result["optimizers"].items():
            if name != "manifolds":
                print(f"{name:14s}  {row['best_lr']:.3g}  {row['median_final_loss']:.4f}  "
                      f"{row['median_step_seconds']:.3f}")
    if "interop" in result:
        print("interop:", json.dumps(result["interop"], indent=1))


def plot(result: dict, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sweeps" in result:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, s in result["sweeps"].items():
            points = sorted((float(k), v) for k, v in s["coarse_seed0"].items())
            ax.plot(*zip(*points), ":", alpha=0.5)
            med = sorted((float(k), v) for k, v in s["median_loss"].items())
            ax.plot(*zip(*med), "o-", label=f"{name} (best {s['best_lr']:.2g})",
                    color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("held-out loss after fine-tuning")
        ax.legend(fontsize=8)
        ax.set_title("LR sweeps (dotted: seed 0 coarse; solid: median of seeds)")
        fig.tight_layout()
        fig.savefig(folder / "lora_lr.png", dpi=120)
    if "curves" in result:
        c = result["curves"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
        for ax, key, title in ((axes[0], "with_1_over_r", "α/r (α = 32)"),
                               (axes[1], "without_1_over_r (alpha=32r)", "no 1/r (scale 32)")):
            for r, curve in zip(c["ranks"], c[key]):
                if curve:
                    ax.plot(range(1, len(curve) + 1), curve, label=f"r={r}")
            ax.set_title(f"{title}, lr {c['lr']:.2g}")
            ax.set_xlabel("step")
            ax.legend()
        axes[0].set_ylabel("training loss")
        fig.tight_layout()
        fig.savefig(folder / "lora_curves.png", dpi=120)


if __name__ == "__main__":
    main()
