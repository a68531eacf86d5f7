"""On-policy distillation vs RL vs SFT from the same start, forgetting recovery, and optimizers.

    python benchmarks/opd.py [--parts headline,forgetting,optimizers] [--workers 2]
                             [--lrs 2.5e-4,5e-4,1e-3,2e-3,4e-3] [--seeds 0,1,2] [--cap 120]

Headline (issue 10): the teacher is ``pretrain(TEACHER_RECIPE)`` (d_model 64, 2 layers, 1500
steps; 3-digit addition with a 4-digit reversed answer + <eos>: a 5-token completion). The
student (d_model 48, 2 layers) is ``pretrain(STUDENT_RECIPE)`` (400 steps, still on the loss
plateau) followed by a brief SFT on teacher samples,
stopped at the first check where its held-out accuracy is >= 25 % of the teacher's (it must stay
<= 50 %; the script refuses otherwise). From that start, OPD, RL and SFT run with AdamW at every lr
of the sweep and every seed, with the same prompts and samples per step (``--prompts`` x
``--group``) and a step cap fixed before the run, until the greedy held-out accuracy (first
``--eval-prompts`` test prompts, checked every ``--eval-every`` steps) reaches 95 % of the
teacher's. Per method the best lr is the one with the smallest median steps over seeds (a run
that misses the cap counts as infinite); a method whose best median is infinite reports null.

Forgetting: the teacher model is fine-tuned (SFT on correct answers) on a new task (subtraction by
default) until its addition accuracy falls below half the original and the new task reaches
``--ft-new-target``; then, from that model, (a) OPD with the
original model as teacher on addition prompts and (b) SFT on the model's own samples of addition
prompts, the same number of steps; both report addition and modular accuracy and the KL to the
original on the model's samples.

Optimizers: OPD from the headline start with AdamW, Muon and ManifoldMuon (solver "projected"),
one seed, a 3-value lr sweep each.

Writes benchmarks/results/opd.json (``steps_to_target``, ``lr``, ``seeds``, ``cap`` and the full
record) and benchmarks/results/opd_*.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from toy_pretrain import machine  # noqa: E402  (the shared machine-info record)

from modman import ManifoldMuon, Muon  # noqa: E402
from modman.opd import OPDConfig, Trainer  # noqa: E402
from modman.toy import TinyCausalLM, tasks  # noqa: E402
from modman.toy.pretrain import Recipe, pretrain  # noqa: E402

# The teacher: d_model 64, 2 layers, the "base" recipe's schedule (1500 steps), ~100 % held out.
# (The d_model 128 "base" checkpoint trains ~6x slower on this shared 2-core machine.)
TEACHER_RECIPE = Recipe(name="opd-teacher", d_model=64, n_layers=2, n_heads=4, steps=1500)
# The student: smaller (d_model 48), 400 steps: still on the loss plateau before addition
# clicks (the same recipe reaches 100 % by step 750 of a 900-step run).
STUDENT_RECIPE = Recipe(name="opd-student", d_model=48, n_layers=2, n_heads=4, steps=400)


def make_optimizer(name: str, lr: float, fallback_lr: float):
    if name == "adamw":
        return lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    if name == "muon":
        return lambda m: Muon(m.modules(), lr=lr, weight_decay=0.0,
                              fallback=dict(lr=fallback_lr, weight_decay=0.0))
    if name == "manifold_muon":
        # project_on_init=False: a pretrained student is not on the manifold; the first steps
        # then retract it there (see the optimizer's docs).
        return lambda m: ManifoldMuon(m.modules(), lr=lr, solver="projected", budget="uniform",
                                      project_on_init=False,
                                      fallback=dict(lr=fallback_lr, weight_decay=0.0))
    raise ValueError(name)


def run_one(job: dict) -> dict:
    """One training run from the saved start; returns its accuracy curve and steps to target."""
    torch.set_num_threads(1)
    task = tasks.addition(3)
    student = TinyCausalLM.load(job["start"])
    teacher = TinyCausalLM.load(job["teacher"])
    config = OPDConfig(objective=job["objective"], prompts_per_step=job["prompts"],
                       group_size=job["group"], eval_every=job["eval_every"],
                       eval_prompts=job["eval_prompts"], seed=job["seed"])
    torch.manual_seed(job["seed"])
    trainer = Trainer(student, task, config, teacher=teacher,
                      optimizer=make_optimizer(job["optimizer"], job["lr"], job["fallback_lr"]))
    start = time.perf_counter()
    records, error = [], None
    try:
        trainer.train(job["cap"], target_accuracy=job["target"])
    except (RuntimeError, FloatingPointError) as exc:
        # A failed run (e.g. an optimizer's linear algebra) is recorded, not fatal to the sweep.
        error = f"{type(exc).__name__} at step {trainer.step_count + 1}: {exc}"[:500]
    records = trainer.history
    curve = [(r["step"], r["accuracy"]) for r in records if "accuracy" in r]
    hit = next((s for s, a in curve if a >= job["target"]), None)
    return {**{k: job[k] for k in ("objective", "optimizer", "lr", "seed")},
            "steps_to_target": hit, "curve": curve,
            "teacher_kl": [r.get("teacher_kl", r.get("teacher_kl_forward")) for r in records],
            "seconds": time.perf_counter() - start, "steps_run": len(records), "error": error}


def best_lr(runs: list[dict], lrs: list[float]) -> dict:
    """Per lr the median over seeds (a miss counts as +inf); the lr with the smallest median.
    Ties (in particular all misses) go to the higher median final accuracy, then the smaller lr."""
    medians, finals = {}, {}
    for lr in lrs:
        chosen = [r for r in runs if r["lr"] == lr]
        if chosen:
            medians[lr] = statistics.median(
                math.inf if r["steps_to_target"] is None else r["steps_to_target"] for r in chosen)
            finals[lr] = statistics.median(r["curve"][-1][1] if r["curve"] else 0.0
                                           for r in chosen)
    if not medians:
        return {"lr": None, "median_steps": None, "medians": {}}
    lr = min(medians, key=lambda k: (medians[k], -finals[k], k))
    finite = lambda v: None if math.isinf(v) else v  # noqa: E731
    return {"lr": lr, "median_steps": finite(medians[lr]),
            "medians": {str(k): finite(v) for k, v in medians.items()},
            "median_final_accuracy": {str(k): v for k, v in finals.items()}}


def lower_thresholds(runs: list[dict], lrs: list[float], methods: list[str],
                     thresholds=(0.5, 0.6, 0.7, 0.8, 0.9)) -> dict:
    """Steps to lower accuracy thresholds, from the recorded curves: per threshold and method,
    the best lr's median over seeds (as for the target). Read-only on the runs."""
    out = {}
    for thr in thresholds:
        per = {}
        for m in methods:
            shifted = [dict(r, steps_to_target=next((s for s, a in r["curve"] if a >= thr), None))
                       for r in runs if r["objective"] == m]
            per[m] = best_lr(shifted, lrs)
        out[str(thr)] = {m: {"steps": v["median_steps"], "lr": v["lr"]} for m, v in per.items()}
    return out


def build_start(teacher, task, eval_prompts, teacher_acc, out_dir, log):
    """The plateau student, then SFT on teacher samples until >= 25 % of the teacher."""
    student = pretrain(STUDENT_RECIPE)
    trainer = Trainer(student, task, OPDConfig(objective="sft", prompts_per_step=32, group_size=1,
                                               eval_every=5, eval_prompts=eval_prompts,
                                               seed=1234),
                      teacher=teacher, optimizer=make_optimizer("adamw", 2e-3, 2e-3))
    acc = trainer.evaluate()
    history = [(0, acc)]
    while acc < 0.25 * teacher_acc and trainer.step_count < 1000:
        record = trainer.step()
        if "accuracy" in record:
            acc = record["accuracy"]
            history.append((record["step"], acc))
            log(f"  start SFT step {record['step']}: accuracy {acc:.3f}")
    if not acc <= 0.5 * teacher_acc:
        raise RuntimeError(f"start accuracy {acc:.3f} overshot 50 % of the teacher's "
                           f"{teacher_acc:.3f}; use a smaller eval interval")
    student.eval()
    # "The teacher is in the student's support": the student's log-prob of the teacher's greedy
    # answers on the held-out prompts.
    batch = task.encode(task.test_prompts()[:eval_prompts])
    out = teacher.generate(batch.prompt_ids, task.max_new_tokens, temperature=0.0,
                           eos_token_id=task.tokenizer.eos_token_id,
                           attention_mask=batch.prompt_mask)
    from modman.opd import completion_logprobs
    from modman.opd.rollouts import Rollouts
    full_mask = torch.cat((batch.prompt_mask, out.completion_mask.long()), 1)
    r = Rollouts(out.sequences, full_mask, out.completion_ids, out.completion_mask,
                 out.logprobs, torch.zeros(len(batch), dtype=torch.bool), out.prompt_length,
                 batch.prompts, 1)
    with torch.no_grad():
        lp = completion_logprobs(student, r)
    token_lp = lp[out.completion_mask]
    path = Path(out_dir) / "start"
    student.save(path)
    return path, {"sft_steps": trainer.step_count, "accuracy": acc, "history": history,
                  "teacher_answer_logprob_per_token_mean": float(token_lp.mean()),
                  "teacher_answer_logprob_per_token_min": float(token_lp.min())}


def forgetting(teacher, args, log) -> dict:
    """Fine-tune on modular addition until addition degrades; then OPD vs self-SFT."""
    torch.manual_seed(0)
    old = tasks.addition(3)
    new = {"subtraction": tasks.subtraction(3),
           "modular_addition": tasks.modular_addition(3, 97)}[args.new_task]
    old_batch = old.encode(old.test_prompts()[:args.eval_prompts])
    new_batch = new.encode(new.test_prompts()[:args.eval_prompts])
    evaluate = lambda m: (old.evaluate(m, old_batch), new.evaluate(m, new_batch))  # noqa: E731
    original_old, original_new = evaluate(teacher)
    model = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    import numpy as np
    rng = np.random.default_rng(0)
    ft_steps, acc_old, acc_new = 0, original_old, original_new
    ft_curve = [(0, acc_old, acc_new)]
    model.train()
    # Until the old task has lost half its accuracy and the new one is learned (or a cap).
    while ((acc_old >= 0.5 * original_old or acc_new < args.ft_new_target)
           and ft_steps < args.ft_cap):
        batch = new.sample(32, rng, "train")
        loss = model(batch.input_ids, batch.labels, attention_mask=batch.attention_mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ft_steps += 1
        if ft_steps % 10 == 0:
            model.eval()
            acc_old, acc_new = evaluate(model)
            model.train()
            ft_curve.append((ft_steps, acc_old, acc_new))
            log(f"  fine-tune step {ft_steps}: addition {acc_old:.3f}, {new.name} {acc_new:.3f}")
    del gen
    model.eval()
    result = {"new_task": new.name,
              "original": {"addition": original_old, "new_task": original_new},
              "fine_tune": {"steps": ft_steps, "lr": args.ft_lr, "curve": ft_curve,
                            "batch": 32, "addition": acc_old, "new_task": acc_new}}
    for name, config in (("opd", OPDConfig(objective="opd", prompts_per_step=args.prompts,
                                           group_size=args.group, eval_every=0, seed=0)),
                         ("sft_self", OPDConfig(objective="sft", sft_source="student",
                                                prompts_per_step=args.prompts,
                                                group_size=args.group, eval_every=0, seed=0))):
        student = copy.deepcopy(model)
        trainer = Trainer(student, old, config, teacher=teacher,
                          optimizer=make_optimizer("adamw", args.recover_lr, args.recover_lr))
        curve = []
        for step in range(1, args.recover_steps + 1):
            record = trainer.step()
            if step % 10 == 0 or step == args.recover_steps:
                student.eval()
                a_old, a_new = evaluate(student)
                curve.append({"step": step, "addition": a_old, "new_task": a_new,
                              "kl_to_original": record["teacher_kl"]})
                log(f"  {name} step {step}: addition {a_old:.3f}, {new.name} {a_new:.3f}, "
                    f"KL to original {record['teacher_kl']:.3f}")
        result[name] = {"lr": args.recover_lr, "steps": args.recover_steps, "curve": curve,
                        **{k: curve[-1][k] for k in ("addition", "new_task",
                                                     "kl_to_original")}}
    return result


def plot(result: dict, out_prefix: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    head = result.get("headline")
    if head:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, info in head["best"].items():
            if info["lr"] is None:
                continue
            for run in head["runs"]:
                if run["objective"] == method and run["lr"] == info["lr"]:
                    steps, accs = zip(*run["curve"]) if run["curve"] else ((), ())
                    ax.plot(steps, accs, label=f"{method} lr={info['lr']:g} seed={run['seed']}",
                            alpha=0.8)
        ax.axhline(head["target_accuracy"], color="k", ls="--", lw=0.8, label="target")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = f"{out_prefix}_headline.png"
        fig.savefig(path, dpi=120)
        written.append(os.path.relpath(path, ROOT.parent))
    fg = result.get("forgetting")
    if fg:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("opd", "sft_self"):
            c = fg[name]["curve"]
            ax.plot([p["step"] for p in c], [p["addition"] for p in c], label=f"{name}: addition")
            ax.plot([p["step"] for p in c], [p["new_task"] for p in c], ls="--",
                    label=f"{name}: {fg['new_task']}")
        ax.axhline(fg["original"]["addition"], color="k", lw=0.8, label="original addition")
        ax.set_xlabel("recovery step")
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{out_prefix}_forgetting.png"
        fig.savefig(path, dpi=120)
        written.append(os.path.relpath(path, ROOT.parent))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="headline,forgetting,optimizers")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lrs", default="6.25e-5,1.25e-4,2.5e-4,5e-4,1e-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="opd,rl,sft")
    parser.add_argument("--cap", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--muon-lrs", default="5e-3,1e-2,2e-2")
    parser.add_argument("--manifold-lrs", default="2.5e-2,5e-2,1e-1")
    parser.add_argument("--new-task", default="subtraction",
                        choices=["subtraction", "modular_addition"])
    parser.add_argument("--ft-lr", type=float, default=1e-4)
    parser.add_argument("--ft-new-target", type=float, default=0.0)
    parser.add_argument("--ft-cap", type=int, default=400)
    parser.add_argument("--recover-lr", type=float, default=2.5e-4)
    parser.add_argument("--recover-steps", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "results" / "opd.json"))
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute the summaries and plots of an existing --out")
    args = parser.parse_args()
    if args.summarize:
        out = Path(args.out)
        merged = json.loads(out.read_text())
        head = merged["headline"]
        methods = sorted({r["objective"] for r in head["runs"]})
        head["best"] = {m: best_lr([r for r in head["runs"] if r["objective"] == m],
                                   head["lrs_swept"]) for m in methods}
        merged["steps_to_target"] = {m: head["best"][m]["median_steps"] for m in methods}
        merged["lr"] = {m: head["best"][m]["lr"] for m in methods}
        merged["steps_to_accuracy"] = lower_thresholds(head["runs"], head["lrs_swept"], methods)
        merged["best_accuracy_within_cap"] = {
            m: max(a for r in head["runs"] if r["objective"] == m for _, a in r["curve"])
            for m in methods}
        merged["plots"] = plot(merged, out.with_suffix(""))
        merged.setdefault("commands", {})["summarize"] = "python " + " ".join(
            [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        out.write_text(json.dumps(merged, indent=1) + "\n")
        print(json.dumps({k: merged[k] for k in ("steps_to_target", "steps_to_accuracy",
                                                   "best_accuracy_within_cap")}, indent=1))
        return
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    wall = time.perf_counter()

    task = tasks.addition(3)
    teacher = pretrain(TEACHER_RECIPE)
    teacher.eval()
    eval_batch = task.encode(task.test_prompts()[:args.eval_prompts])
    teacher_acc = task.evaluate(teacher, eval_batch)
    target = 0.95 * teacher_acc
    log(f"teacher accuracy {teacher_acc:.3f} on {args.eval_prompts} held-out prompts; "
        f"target {target:.3f}")
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": machine(),
        "task": "addition(3), reversed answer: 4 digits + <eos>",
        "teacher": {"recipe": "opd-teacher (d_model 64, 2 layers, 1500 steps)",
                    "recipe_hash": TEACHER_RECIPE.hash(), "accuracy": teacher_acc},
        "target_accuracy": target,
        "cap": args.cap, "seeds": seeds,
        "per_step": {"prompts": args.prompts, "group_size": args.group,
                     "sequences": args.prompts * args.group,
                     "max_new_tokens": task.max_new_tokens},
        "eval": {"prompts": args.eval_prompts, "every": args.eval_every},
    }
    tmp = tempfile.mkdtemp(prefix="opd_bench_")
    teacher_path = teacher.save(Path(tmp) / "teacher")
    common = None
    if "headline" in parts or "optimizers" in parts:
        start_path, start_info = build_start(teacher, task, args.eval_prompts, teacher_acc, tmp,
                                             log)
        result["student_start"] = {
            "recipe": "opd-student (d_model 48, 2 layers, 400 steps) + SFT on teacher samples "
                      "(32/step, AdamW 2e-3)", "recipe_hash": STUDENT_RECIPE.hash(), **start_info,
            "fraction_of_teacher": start_info["accuracy"] / teacher_acc}
        log(f"student start accuracy {start_info['accuracy']:.3f} after "
            f"{start_info['sft_steps']} SFT steps")
        common = dict(start=str(start_path), teacher=str(teacher_path), prompts=args.prompts,
                      group=args.group, eval_every=args.eval_every,
                      eval_prompts=args.eval_prompts, target=target, cap=args.cap)

    def save():
        # Parts may run as separate processes (--parts): merge into what is already there, so
        # each keeps its own keys and command.
        result["seconds_" + "+".join(parts)] = time.perf_counter() - wall
        merged = json.loads(out.read_text()) if out.exists() else {}
        commands = {**merged.get("commands", {}), **{part: result["command"] for part in parts}}
        merged.update(result)
        merged["commands"] = commands
        tmp_out = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp_out.write_text(json.dumps(merged, indent=1) + "\n")
        tmp_out.replace(out)

    import multiprocessing
    with ProcessPoolExecutor(max_workers=args.workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        if "headline" in parts:
            jobs = [dict(common, objective=m, optimizer="adamw", lr=lr, fallback_lr=lr, seed=s)
                    for s in seeds for lr in lrs for m in methods]
            runs = []
            # Record after every finished run, so an interrupted sweep still leaves exactly
            # what was run (and its partial medians) in the JSON.
            for run in pool.map(run_one, jobs):
                runs.append(run)
                log(f"  {run['objective']:>4} lr={run['lr']:g} seed={run['seed']}: "
                    f"{run['steps_to_target']} steps ({run['seconds']:.0f} s)")
                best = {m: best_lr([r for r in runs if r["objective"] == m], lrs)
                        for m in methods}
                result["headline"] = {"runs": runs, "best": best, "target_accuracy": target,
                                      "lrs_swept": lrs, "optimizer": "AdamW (weight_decay 0)",
                                      "complete": len(runs) == len(jobs),
                                      "runs_done": len(runs), "runs_planned": len(jobs)}
                result["steps_to_target"] = {m: best[m]["median_steps"] for m in methods}
                result["lr"] = {m: best[m]["lr"] for m in methods}
                opd = result["steps_to_target"].get("opd")
                rl = result["steps_to_target"].get("rl")
                result["rl_over_opd"] = (None if opd is None else
                                         (f">{args.cap / opd:.1f}" if rl is None else rl / opd))
                save()
        if "optimizers" in parts:
            earlier = json.loads(out.read_text()) if out.exists() else {}
            best_adamw = ((result.get("lr") or earlier.get("lr") or {}).get("opd")) or 1e-3
            grid = {"adamw": [best_adamw],
                    "muon": [float(x) for x in args.muon_lrs.split(",")],
                    "manifold_muon": [float(x) for x in args.manifold_lrs.split(",")]}
            jobs = [dict(common, objective="opd", optimizer=name, lr=lr, fallback_lr=best_adamw,
                         seed=seeds[0]) for name, values in grid.items() for lr in values]
            runs = list(pool.map(run_one, jobs))
            for run in runs:
                log(f"  opd {run['optimizer']} lr={run['lr']:g}: {run['steps_to_target']} steps")
            result["optimizers"] = {
                "seed": seeds[0], "fallback_lr (AdamW group)": best_adamw, "runs": runs,
                "best": {name: best_lr([r for r in runs if r["optimizer"] == name], values)
                         for name, values in grid.items()},
                "manifold_muon_solver": "projected"}
            save()
    if "forgetting" in parts:
        result["forgetting"] = forgetting(teacher, args, log)
        save()
    save()
    merged = json.loads(out.read_text())
    merged["plots"] = plot(merged, out.with_suffix(""))
    out.write_text(json.dumps(merged, indent=1) + "\n")
    log(json.dumps({k: result.get(k) for k in ("steps_to_target", "lr", "rl_over_opd", "cap")}))


if __name__ == "__main__":
    main()
