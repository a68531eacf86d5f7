"""On-policy distillation vs RL vs SFT from the same start, forgetting recovery, and optimizers.

    python benchmarks/opd.py [--parts headline,diagnosis,forgetting,optimizers] [--workers 2]
                             [--lrs 6.25e-5,1.25e-4,2.5e-4,5e-4,1e-3] [--seeds 0,1,2] [--cap 500]

Headline (issue 10): the teacher is ``pretrain(TEACHER_RECIPE)`` (d_model 64, 2 layers, 1500
steps; 3-digit addition with a 4-digit reversed answer + <eos>: a 5-token completion). The
student (d_model 48, 2 layers) is ``pretrain(STUDENT_RECIPE)`` (400 steps, still on the loss
plateau) followed by a brief SFT on teacher samples,
stopped at the first check where its held-out accuracy is >= 25 % of the teacher's (it must stay
<= 50 %; the script refuses otherwise). The student architecture can reach the target: the same
recipe run to 900 steps reaches 100 %, and SFT from this start passes 95 % (see the results).
From that start, OPD, RL and SFT run with AdamW at every lr of one shared sweep (5 values, 2x
apart) and every seed, with the same prompts and samples per step (``--prompts`` x ``--group``
= 32 sequences of 5 tokens) and a step cap fixed before the run (500 since the 2nd run; the first
used 200, where no method reached the target), until the greedy held-out accuracy (first
``--eval-prompts`` test prompts, checked every ``--eval-every`` steps) reaches 95 % of the
teacher's. Per method the best lr is the one with the smallest median steps over seeds (a run
that misses the cap counts as infinite); a method whose best median is infinite reports null.
``rl_over_opd`` is RL's median steps over OPD's; when RL misses the cap and OPD does not it is
the string ">cap/OPD" (a lower bound), and null when OPD misses too.

Why OPD is slow here (diagnosed, no bug found in advantages, masks, <eos> or alignment): the
teacher puts log-prob -20 to -36 on wrong digits, so a wrong sampled token's advantage
-(log s - log t) is ~30x a right token's; the sampled estimator is heavy-tailed (gradient norm
~300 against RL's ~10) and AdamW's second moment is set by that tail. ``--parts diagnosis``
measures this: the advantages' quantiles at the start, and OPD with the exact per-prefix
expectation of the same gradient (full-vocabulary reverse KL on the student's sampled prefixes)
at OPD's best lr: it reaches 90 % in 275 steps where the sampled estimator needs 485 (best lr)
-- the token-level variance costs ~2x -- yet it too stays below 95 % within the cap, while SFT
on (near-deterministic, hence always correct) teacher samples gets the full answer as a dense
target every step. And with a 5-token answer (3 informative digits) a per-token reward carries
little more than the 0/1 sequence reward: the blog's 7-10x is for long reasoning traces.

``--task keyvalue`` runs the headline on recall of a fixed 256-key table with 8-digit values (a
9-token completion, teacher and student recipes in HEADLINE_TASKS), where a per-token reward
should matter more than on a 4-digit sum. ``--task addition5`` is 5-digit addition (a 7-token
completion; the d_model 64 teacher needs 4000 steps, the student 1000 are still on the plateau).
``--task substitution`` maps a random 16-letter string through a different fixed cipher at each
position (a 17-token completion of 16 independent characters, 416 facts): the long answer where
a 0/1 sequence reward says least about which token is wrong. A shared cipher is learned all at
once (in a single-seed probe the start SFT jumped from 0 to 98 % in 5 steps), hence one per
position.
``--start-fraction`` sets where the start SFT stops (default 0.25 of the teacher; the bar allows
up to 0.5): a start far below the teacher is where a 0/1 sequence reward is rare and RL has the
least signal. ``--grad-clip`` clips every method's gradient norm alike (none by default); at 1.0
it lets OPD take lrs where its heavy-tailed advantages otherwise collapse it. Settings other
than the defaults write results/opd_<task>[_teacher_ls<ε>][_start<f>][_clip<c>].json.

Forgetting: the teacher model is fine-tuned (SFT on correct answers, AdamW ``--ft-lr``) on a new
task (key-value lookup by default: prompts of letters) with ``--ft-old-fraction`` of each batch
from addition (the blog's mid-training mixed chat data in; without it one step of the new task
already breaks addition's format), until the new task reaches ``--ft-new-target`` and addition
has fallen below ``--ft-old-below`` of the original (or ``--ft-cap``); then, from that model, (a)
OPD with the original model as teacher on addition prompts and (b) SFT on the model's own
samples of addition prompts, the same number of steps, each at each of ``--recover-lrs``; both
report addition and new-task accuracy and the KL to the original (per sequence, on a fixed set
of held-out addition prompts, 4 samples each).

Optimizers: OPD from the headline start with AdamW (the headline's best OPD lr), Muon and
ManifoldMuon (solver "projected"), one seed, a small lr sweep each, the headline's cap and
target; final and best accuracy, steps to target and seconds per step.

Writes benchmarks/results/opd.json (``steps_to_target``, ``lr``, ``seeds``, ``cap`` and the full
record) and benchmarks/results/opd_*.png. ``--promote FILE`` makes another setting's headline
opd.json's top-level one (the substitution setting, which meets the goal), keeping addition(3)'s
under ``addition_headline``.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
from modman.experiments.machine import machine  # noqa: E402

from modman import ManifoldMuon, Muon  # noqa: E402
from modman.lora import LoRAConfig, apply_lora, unload_lora  # noqa: E402
from modman.opd import OPDConfig, Trainer  # noqa: E402
from modman.toy import TinyCausalLM, tasks  # noqa: E402
from modman.toy.pretrain import Recipe, pretrain  # noqa: E402

# The teacher: d_model 64, 2 layers, the "base" recipe's schedule (1500 steps), ~100 % held out.
# (The d_model 128 "base" checkpoint trains ~6x slower on this shared 2-core machine.)
TEACHER_RECIPE = Recipe(name="opd-teacher", d_model=64, n_layers=2, n_heads=4, steps=1500)
# The student: smaller (d_model 48), 400 steps: still on the loss plateau before addition
# clicks (the same recipe reaches 100 % by step 750 of a 900-step run).
STUDENT_RECIPE = Recipe(name="opd-student", d_model=48, n_layers=2, n_heads=4, steps=400)

# The headline's tasks (--task): (description, task, teacher recipe, student recipe). keyvalue is
# a fixed table of 256 keys with 8-digit values (a 9-token completion): a dense per-token reward
# says which digit is wrong, where the 0/1 sequence reward only says that one is.
KV = {"n_keys": 256, "value_len": 8}
A5 = {"n_digits": 5, "format": "reversed"}
SUB = {"length": 16, "per_position": True}
HEADLINE_TASKS = {
    "addition": ("addition(3), reversed answer: 4 digits + <eos>", lambda: tasks.addition(3),
                 TEACHER_RECIPE, STUDENT_RECIPE),
    "keyvalue": ("keyvalue(256 keys of 4 letters, 8-digit values): recall of a fixed table, "
                 "9-token completion", lambda: tasks.keyvalue(**KV),
                 Recipe(name="opd-kv-teacher", task="keyvalue", task_kwargs=KV, d_model=64,
                        n_layers=2, n_heads=4, steps=1500),
                 # 60 steps: the format and a few values, far below the teacher
                 Recipe(name="opd-kv-student", task="keyvalue", task_kwargs=KV, d_model=48,
                        n_layers=2, n_heads=4, steps=60, warmup_steps=20)),
    # Five digits: a 7-token completion. The d_model 64 teacher needs 4000 steps to leave the
    # plateau (1500 leave it at 0 %); the 1000-step student is still on it.
    "addition5": ("addition(5), reversed answer: 6 digits + <eos>", lambda: tasks.addition(5),
                  Recipe(name="opd5-teacher", task_kwargs=A5, d_model=64, n_layers=2, n_heads=4,
                         steps=4000),
                  Recipe(name="opd5-student", task_kwargs=A5, d_model=48, n_layers=2, n_heads=4,
                         steps=1000)),
    # A 17-token completion of independent characters (a different substitution cipher at each of
    # 16 positions: 416 facts): the long answer where a per-token reward should matter most. The
    # teacher reaches 100 % at 2000 steps (in a probe, 800 left it at 3 %).
    "substitution": ("substitution(16, per position): a fixed cipher per position of a random "
                     "16-letter string, 17-token completion", lambda: tasks.substitution(**SUB),
                     Recipe(name="opd-sub-teacher", task="substitution", task_kwargs=SUB,
                            d_model=64, n_layers=2, n_heads=4, max_len=40, steps=2000),
                     Recipe(name="opd-sub-student", task="substitution", task_kwargs=SUB,
                            d_model=48, n_layers=2, n_heads=4, max_len=40, steps=300)),
}


# The headline's keys (API.md: opd.json's "steps_to_target", "lr", "seeds", "cap") and what they
# depend on. ``--promote`` copies them from another setting's file into opd.json.
HEADLINE_KEYS = ("task", "teacher", "target_accuracy", "cap", "seeds", "per_step", "eval",
                 "student_start", "steps_to_target", "lr", "rl_over_opd", "steps_to_accuracy",
                 "best_accuracy_within_cap")
OWN_HEADLINE = "addition_headline"


def promote(src: Path, dst: Path) -> None:
    """Make ``src``'s headline (another setting's results file) the top-level headline of ``dst``
    (opd.json), moving ``dst``'s own headline keys under OWN_HEADLINE the first time; the
    forgetting and optimizer parts of ``dst`` stay as they are, on their own task."""
    source, merged = json.loads(src.read_text()), json.loads(dst.read_text())
    missing = [k for k in ("steps_to_target", "lr", "seeds", "cap") if k not in source]
    if missing:
        raise ValueError(f"{src} has no headline result (missing {missing})")
    if "promoted_from" not in merged:
        merged[OWN_HEADLINE] = {k: merged[k] for k in HEADLINE_KEYS if k in merged}
    for k in HEADLINE_KEYS:  # nothing of an earlier headline survives at the top level
        merged.pop(k, None)
    merged.update({k: source[k] for k in HEADLINE_KEYS if k in source})
    merged["promoted_from"] = src.name
    merged["promoted_note"] = (f"the top-level headline keys are {src.name}'s (the setting that "
                               f"meets the goal); 'headline' (the runs), 'diagnosis', 'forgetting' "
                               f"and 'optimizers' are on addition(3), whose own headline summary "
                               f"is '{OWN_HEADLINE}'")
    dst.write_text(json.dumps(merged, indent=1) + "\n")


def own_headline(merged: dict) -> dict:
    """The part of a results file that holds its own headline keys: the top level, or
    OWN_HEADLINE once another setting's headline has been promoted into it."""
    return merged.setdefault(OWN_HEADLINE, {}) if "promoted_from" in merged else merged


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
    task = HEADLINE_TASKS[job["task"]][1]()
    student = TinyCausalLM.load(job["start"])
    teacher = TinyCausalLM.load(job["teacher"])
    config = OPDConfig(objective=job["objective"], prompts_per_step=job["prompts"],
                       group_size=job["group"], eval_every=job["eval_every"],
                       eval_prompts=job["eval_prompts"], seed=job["seed"],
                       grad_clip=job.get("grad_clip"))
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
            "max_accuracy": max((a for _, a in curve), default=None),
            "seconds": time.perf_counter() - start, "steps_run": len(records),
            "seconds_per_step": (time.perf_counter() - start) / max(len(records), 1),
            "error": error}


def rl_over_opd(opd, rl, cap):
    """RL's median steps to target over OPD's: a number when both reach it; ">x" (a lower
    bound, RL missed the cap, x = cap / OPD's steps) when only OPD does; None otherwise."""
    if opd is None:
        return None
    return f">{cap / opd:.1f} (lower bound: RL missed the {cap}-step cap)" if rl is None \
        else rl / opd


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


def build_start(teacher, task, eval_prompts, teacher_acc, out_dir, log, recipe=STUDENT_RECIPE,
                fraction: float = 0.25):
    """The plateau student, then SFT on teacher samples until >= ``fraction`` of the teacher."""
    student = pretrain(recipe)
    trainer = Trainer(student, task, OPDConfig(objective="sft", prompts_per_step=32, group_size=1,
                                               eval_every=5, eval_prompts=eval_prompts,
                                               seed=1234),
                      teacher=teacher, optimizer=make_optimizer("adamw", 2e-3, 2e-3))
    acc = trainer.evaluate()
    history = [(0, acc)]
    while acc < fraction * teacher_acc and trainer.step_count < 1000:
        record = trainer.step()
        if "accuracy" in record:
            acc = record["accuracy"]
            history.append((record["step"], acc))
            log(f"  start SFT step {record['step']}: accuracy {acc:.3f}")
    if acc < fraction * teacher_acc:
        raise RuntimeError(f"the start SFT stopped at its cap of {trainer.step_count} steps with "
                           f"accuracy {acc:.3f}, below {fraction:g} of the teacher's {teacher_acc:.3f}")
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


def diagnose(start_path, teacher_path, args, lr, target, log) -> dict:
    """Why OPD is slow here: the advantages' distribution at the start, and OPD with the exact
    per-prefix expectation of its gradient (full-vocabulary reverse KL at the student's sampled
    prefixes: the same expected update as the sampled-token estimator, without its token-level
    variance), same prompts, samples, lr, cap and evaluation as the headline's OPD."""
    import numpy as np
    from modman.opd import completion_logprobs, sample_rollouts, teacher_logprobs
    torch.manual_seed(0)
    task, tok = tasks.addition(3), tasks.addition(3).tokenizer
    student, teacher = TinyCausalLM.load(start_path), TinyCausalLM.load(teacher_path)
    teacher.requires_grad_(False)
    batch = task.sample(256, np.random.default_rng(0), "train")
    r = sample_rollouts(student, batch.prompt_ids, batch.prompt_mask, batch.prompts, group_size=1,
                        max_new_tokens=task.max_new_tokens, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s_lp, t_lp = completion_logprobs(student, r), teacher_logprobs(teacher, r)
    mask = r.completion_mask
    adv = (t_lp - s_lp)[mask]
    qs = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    out = {"advantage_quantiles_at_start": dict(zip(map(str, qs), torch.quantile(
               adv, torch.tensor(qs)).tolist())),
           "teacher_logprob_of_sampled_tokens_quantiles_at_start": dict(zip(
               map(str, qs[:4]), torch.quantile(t_lp[mask], torch.tensor(qs[:4])).tolist())),
           "samples": int(mask.shape[0]),
           "per_position_fraction_teacher_logprob_below_-5": [
               float((t_lp[:, j][mask[:, j]] < -5).float().mean()) for j in range(mask.shape[1])]}
    # The exact-expectation variant.
    model = TinyCausalLM.load(start_path)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    eval_batch = task.encode(task.test_prompts()[:args.eval_prompts])
    curve, hit, start = [], None, time.perf_counter()
    for step in range(1, args.cap + 1):
        b = task.sample(args.prompts, rng, "train")
        r = sample_rollouts(model, b.prompt_ids, b.prompt_mask, b.prompts, group_size=args.group,
                            max_new_tokens=task.max_new_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, generator=gen)
        index = (r.completion_positions - 1)[..., None]

        def logp(m):
            z = m(r.sequences, attention_mask=r.attention_mask).logits
            return z.gather(1, index.expand(-1, -1, z.shape[-1])).float().log_softmax(-1)

        with torch.no_grad():
            t_all = logp(teacher)
        model.train()
        s_all = logp(model)
        kl = (s_all.exp() * (s_all - t_all)).sum(-1)
        loss = torch.where(r.completion_mask, kl, torch.zeros(())).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            model.eval()
            acc = task.evaluate(model, eval_batch)
            curve.append((step, acc))
            if acc >= target:
                hit = step
                break
    out["exact_expectation_opd"] = {
        "lr": lr, "seed": 0, "steps_to_target": hit, "curve": curve,
        "max_accuracy": max((a for _, a in curve), default=None),
        "seconds": time.perf_counter() - start,
        "what": "loss = sum_t KL(s(.|prefix_t) || t(.|prefix_t)) over the student's sampled "
                "prefixes (full vocabulary): the expectation of OPD's discount-0 gradient"}
    log(f"  diagnosis: exact-expectation OPD lr={lr:g}: {hit} steps, best "
        f"{out['exact_expectation_opd']['max_accuracy']}")
    return out


def kl_to_reference(model, reference, task, batch, samples: int = 4, seed: int = 0) -> float:
    """KL(model ‖ reference) per sequence on ``batch``'s prompts: the mean over ``samples``
    temperature-1 completions per prompt of Σ_t (log model − log reference), a fixed set of
    held-out prompts and a fixed sampling seed (an unbiased estimate, much less noisy than
    one training step's 32 samples)."""
    from modman.opd import completion_logprobs, sample_rollouts, teacher_logprobs
    tok = task.tokenizer
    r = sample_rollouts(model, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                        group_size=samples, max_new_tokens=task.max_new_tokens,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        lp = completion_logprobs(model, r)
    return float((lp - teacher_logprobs(reference, r)).sum(1).mean())


def forgetting(teacher, args, log, seed: int = 0) -> dict:
    """Fine-tune on a new task until it is learned and addition has degraded; then OPD (the
    original model as teacher, addition prompts) vs SFT on the model's own addition samples."""
    torch.manual_seed(seed)
    old = tasks.addition(3)
    new = {"subtraction": tasks.subtraction(3),
           "modular_addition": tasks.modular_addition(3, 97),
           # prompts of letters, not digits: the model can tell the tasks apart
           "keyvalue": tasks.keyvalue(256, value_len=4)}[args.new_task]
    old_batch = old.encode(old.test_prompts()[:args.eval_prompts])
    new_batch = new.encode(new.test_prompts()[:args.eval_prompts])
    kl_batch = old.encode(old.test_prompts()[:args.kl_prompts])
    evaluate = lambda m: (old.evaluate(m, old_batch), new.evaluate(m, new_batch))  # noqa: E731
    original_old, original_new = evaluate(teacher)
    # The teacher object was frozen by earlier Trainers (requires_grad False): the copy is not.
    model = copy.deepcopy(teacher).requires_grad_(True)
    if args.ft_lora:  # LoRA fine-tune (the base frozen), merged into a plain model afterwards
        apply_lora(model, LoRAConfig(args.ft_lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.ft_lr,
                            weight_decay=0.0)
    import numpy as np
    rng = np.random.default_rng(seed)
    ft_steps, acc_old, acc_new = 0, original_old, original_new
    ft_curve = [(0, acc_old, acc_new)]
    model.train()
    # SFT on correct answers of the new task, with a fraction --ft-old-fraction of each batch
    # from the old task (the blog's mid-training mixed chat data into the documents), until the
    # new task is learned (>= --ft-new-target) and the old one has fallen below --ft-old-below of
    # its accuracy, or the cap.
    n_old = round(args.ft_old_fraction * args.ft_batch)
    degraded = lambda acc: acc < args.ft_old_below * original_old  # noqa: E731
    while (not degraded(acc_old) or acc_new < args.ft_new_target) and ft_steps < args.ft_cap:
        batch = new.sample(args.ft_batch - n_old, rng, "train")
        loss = model(batch.input_ids, batch.labels, attention_mask=batch.attention_mask).loss
        if n_old:  # the mean over both tasks' sequences, each task's loss a per-token mean
            extra = old.sample(n_old, rng, "train")
            loss_old = model(extra.input_ids, extra.labels, attention_mask=extra.attention_mask).loss
            loss = (loss * (args.ft_batch - n_old) + loss_old * n_old) / args.ft_batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ft_steps += 1
        if ft_steps % 25 == 0:
            model.eval()
            acc_old, acc_new = evaluate(model)
            model.train()
            ft_curve.append((ft_steps, acc_old, acc_new))
            log(f"  fine-tune step {ft_steps}: addition {acc_old:.3f}, {new.name} {acc_new:.3f}")
    model.eval()
    if args.ft_lora:
        model = unload_lora(model, merge=True).requires_grad_(True)
    ft_kl = kl_to_reference(model, teacher, old, kl_batch)
    result = {"seed": seed, "new_task": new.name,
              "original": {"addition": original_old, "new_task": original_new},
              "fine_tune": {"steps": ft_steps, "lr": args.ft_lr, "curve": ft_curve,
                            "batch": args.ft_batch, "new_task_target": args.ft_new_target,
                            "lora_rank": args.ft_lora or None,
                            "old_task_fraction": args.ft_old_fraction,
                            "old_below": args.ft_old_below,
                            "reached": bool(degraded(acc_old) and acc_new >= args.ft_new_target),
                            "addition": acc_old, "new_task": acc_new,
                            "kl_to_original": ft_kl},
              "kl_to_original_definition":
                  f"KL(model || original) per sequence on the model's own temperature-1 samples "
                  f"of the first {args.kl_prompts} held-out addition prompts x 4"}
    log(f"  after fine-tune: addition {acc_old:.3f}, {new.name} {acc_new:.3f}, "
        f"KL to original {ft_kl:.2f}")
    configs = {"opd": OPDConfig(objective="opd", prompts_per_step=args.prompts,
                                group_size=args.group, eval_every=0, seed=seed),
               "sft_self": OPDConfig(objective="sft", sft_source="student",
                                     prompts_per_step=args.prompts, group_size=args.group,
                                     eval_every=0, seed=seed)}
    start_point = {"addition": acc_old, "new_task": acc_new, "kl_to_original": ft_kl}
    sweep = {name: [recover(model, teacher, old, new.name, config, lr, evaluate, kl_batch,
                            start_point, args.recover_steps, log)
                    for lr in (float(x) for x in args.recover_lrs.split(","))]
             for name, config in configs.items()}
    # Per method, the lr whose final model is best on both tasks together (the largest sum of
    # the two accuracies): the goal is the old task back without losing the new one.
    for name, runs in sweep.items():
        result[name] = max(runs, key=lambda r: r["addition"] + r["new_task"])
    result["recovery_sweep"] = {name: [{k: r[k] for k in ("lr", "addition", "new_task",
                                                          "kl_to_original")} for r in runs]
                                for name, runs in sweep.items()}
    result["recovery_lr_rule"] = "per method, the lr maximizing final addition + new-task accuracy"
    result["recover_steps"] = args.recover_steps
    return result


def recover(model, teacher, old, new_name, config, lr, evaluate, kl_batch, start_point: dict,
            steps: int, log) -> dict:
    """``steps`` of ``config``'s objective from a copy of ``model`` (AdamW at ``lr``), with the
    original ``teacher``, on the old task's prompts; both tasks' accuracy and the KL to the
    original every 10 steps."""
    student = copy.deepcopy(model)
    trainer = Trainer(student, old, config, teacher=teacher,
                      optimizer=make_optimizer("adamw", lr, lr))
    curve = [{"step": 0, **start_point}]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step()
        if step % 10 == 0 or step == steps:
            student.eval()
            a_old, a_new = evaluate(student)
            kl = kl_to_reference(student, teacher, old, kl_batch)
            curve.append({"step": step, "addition": a_old, "new_task": a_new, "kl_to_original": kl})
            log(f"  {config.objective} lr {lr:g} step {step}: addition {a_old:.3f}, "
                f"{new_name} {a_new:.3f}, KL to original {kl:.3f}")
    return {"lr": lr, "steps": steps, "curve": curve, "seconds": time.perf_counter() - start,
            **{k: curve[-1][k] for k in ("addition", "new_task", "kl_to_original")}}


def forgetting_summary(runs: list[dict]) -> dict:
    """Each seed's end points and lrs (after the fine-tune; OPD and SFT at their chosen lr) and their
    medians over seeds; the curves and sweeps are kept for the first seed only."""
    keys = ("addition", "new_task", "kl_to_original")
    per_seed = [{"seed": r["seed"], "fine_tune_steps": r["fine_tune"]["steps"],
                 "fine_tune_reached": r["fine_tune"]["reached"],
                 **{stage: {k: r[stage][k] for k in ("lr", *keys)}
                    for stage in ("fine_tune", "opd", "sft_self")}} for r in runs]
    median = {stage: {k: statistics.median(s[stage][k] for s in per_seed) for k in keys}
              for stage in ("fine_tune", "opd", "sft_self")}
    return {"per_seed": per_seed, "median_over_seeds": median}


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
        fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
        for name, color in (("opd", "C0"), ("sft_self", "C3")):
            c = fg[name]["curve"]
            steps = [p["step"] for p in c]
            ax.plot(steps, [p["addition"] for p in c], color=color, label=f"{name}: addition")
            ax.plot(steps, [p["new_task"] for p in c], color=color, ls="--",
                    label=f"{name}: {fg['new_task']}")
            ax_kl.plot(steps, [p["kl_to_original"] for p in c], color=color, label=name)
        ax.axhline(fg["original"]["addition"], color="k", lw=0.8, label="original addition")
        ax.set_xlabel("recovery step (from the fine-tuned model)")
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.legend(fontsize=7)
        ax_kl.set_xlabel("recovery step")
        ax_kl.set_ylabel("KL(model || original) per sequence")
        ax_kl.legend(fontsize=7)
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
    parser.add_argument("--cap", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="clip each step's gradient norm (all methods alike); none by default")
    parser.add_argument("--start-fraction", type=float, default=0.25,
                        help="the student start is SFT'd until it reaches this fraction of the "
                             "teacher's accuracy (the bar allows up to 0.5)")
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--muon-lrs", default="6.25e-4,1.25e-3,2.5e-3,5e-3")
    parser.add_argument("--manifold-lrs", default="2.5e-3,5e-3,1e-2,2e-2")
    parser.add_argument("--new-task", default="keyvalue",
                        choices=["subtraction", "modular_addition", "keyvalue"])
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--ft-lora", type=int, default=0,
                        help="fine-tune the new task with LoRA of this rank (0: every weight)")
    parser.add_argument("--ft-batch", type=int, default=32)
    parser.add_argument("--ft-new-target", type=float, default=0.8)
    parser.add_argument("--ft-old-fraction", type=float, default=0.125,
                        help="fraction of each fine-tuning batch drawn from the old task")
    parser.add_argument("--ft-old-below", type=float, default=0.9,
                        help="the fine-tune stops once the old task is below this fraction of "
                             "its original accuracy (and the new one is learned)")
    parser.add_argument("--ft-cap", type=int, default=2000)
    parser.add_argument("--ft-seeds", default="0,1,2",
                        help="seeds of the forgetting part (fine-tune data and order, recovery)")
    parser.add_argument("--recover-lrs", default="3.125e-5,6.25e-5,1.25e-4,2.5e-4",
                        help="recovery lrs (OPD and SFT each); per method the best is reported")
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--kl-prompts", type=int, default=128)
    parser.add_argument("--task", default="addition", choices=list(HEADLINE_TASKS),
                        help="the headline's task (diagnosis and forgetting: addition only)")
    parser.add_argument("--teacher-smoothing", type=float, default=0.0,
                        help="label smoothing of the teacher's pretraining (0: the plain recipe, "
                             "which puts log-prob -20..-36 on wrong digits)")
    parser.add_argument("--out", default=None,
                        help="default results/opd.json for the addition task and plain teacher, "
                             "else results/opd_<task>[_teacher_ls<ε>].json (parts merge into "
                             "--out, so other settings must not share it)")
    parser.add_argument("--promote", default=None, metavar="FILE",
                        help="copy FILE's headline (another setting's results) into --out's top "
                             "level (default opd.json), keeping --out's own under "
                             f"'{OWN_HEADLINE}'; runs nothing")
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute the summaries and plots of an existing --out")
    args = parser.parse_args()
    if not 0.0 < args.start_fraction <= 0.5:
        parser.error(f"--start-fraction must be in (0, 0.5] (the bar: at most half the "
                     f"teacher's accuracy), got {args.start_fraction}")
    if args.out is None:
        # One file per setting: each option left at its default adds nothing to the name.
        suffix = "".join(f"_{tag}{getattr(args, dest):g}" for tag, dest in (
            ("teacher_ls", "teacher_smoothing"), ("start", "start_fraction"), ("clip", "grad_clip"))
            if getattr(args, dest) != parser.get_default(dest))
        name = "opd" if (args.task, suffix) == ("addition", "") else f"opd_{args.task}{suffix}"
        args.out = str(ROOT / "results" / f"{name}.json")
    if args.promote:
        promote(Path(args.promote), Path(args.out))
        return
    if args.summarize:
        out = Path(args.out)
        merged = json.loads(out.read_text())
        own = own_headline(merged)
        head = merged["headline"]
        methods = sorted({r["objective"] for r in head["runs"]})
        head["best"] = {m: best_lr([r for r in head["runs"] if r["objective"] == m],
                                   head["lrs_swept"]) for m in methods}
        own["steps_to_target"] = {m: head["best"][m]["median_steps"] for m in methods}
        own["lr"] = {m: head["best"][m]["lr"] for m in methods}
        own["steps_to_accuracy"] = lower_thresholds(head["runs"], head["lrs_swept"], methods)
        own["best_accuracy_within_cap"] = {
            m: max(a for r in head["runs"] if r["objective"] == m for _, a in r["curve"])
            for m in methods}
        opd, rl = own["steps_to_target"].get("opd"), own["steps_to_target"].get("rl")
        own["rl_over_opd"] = rl_over_opd(opd, rl, own["cap"])
        merged["plots"] = plot({**merged, **own}, out.with_suffix(""))
        merged.setdefault("commands", {})["summarize"] = "python " + " ".join(
            [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        out.write_text(json.dumps(merged, indent=1) + "\n")
        print(json.dumps({k: own[k] for k in ("steps_to_target", "steps_to_accuracy",
                                                "best_accuracy_within_cap")}, indent=1))
        return
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"headline", "diagnosis", "forgetting", "optimizers"})
    if unknown:  # before the minutes of pretraining, and before save() rewrites --out
        parser.error(f"--parts: unknown {unknown}; choose from headline, diagnosis, forgetting, optimizers")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    wall = time.perf_counter()

    description, make_task, teacher_recipe, student_recipe = HEADLINE_TASKS[args.task]
    if args.task != "addition" and ({"diagnosis", "forgetting"} & set(parts)):
        raise SystemExit("--parts diagnosis and forgetting are defined on addition; use --task addition")
    task = make_task()
    teacher_recipe = dataclasses.replace(teacher_recipe, label_smoothing=args.teacher_smoothing)
    teacher = pretrain(teacher_recipe)
    teacher.eval()
    eval_batch = task.encode(task.test_prompts()[:args.eval_prompts])
    teacher_acc = task.evaluate(teacher, eval_batch)
    target = 0.95 * teacher_acc
    log(f"teacher accuracy {teacher_acc:.3f} on {args.eval_prompts} held-out prompts; "
        f"target {target:.3f}")
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": machine(),
        "task": description,
        "teacher": {"recipe": f"{teacher_recipe.name} (d_model {teacher_recipe.d_model}, "
                              f"{teacher_recipe.n_layers} layers, {teacher_recipe.steps} steps, label "
                              f"smoothing {teacher_recipe.label_smoothing:g})",
                    "recipe_hash": teacher_recipe.hash(), "accuracy": teacher_acc},
        "target_accuracy": target,
        "cap": args.cap, "seeds": seeds,
        "per_step": {"prompts": args.prompts, "group_size": args.group,
                     "grad_clip": args.grad_clip,
                     "sequences": args.prompts * args.group,
                     "max_new_tokens": task.max_new_tokens},
        "eval": {"prompts": args.eval_prompts, "every": args.eval_every},
    }
    tmp = tempfile.mkdtemp(prefix="opd_bench_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the teacher and start checkpoints
    teacher_path = teacher.save(Path(tmp) / "teacher")
    common = None
    if "headline" in parts or "optimizers" in parts or "diagnosis" in parts:
        start_path, start_info = build_start(teacher, task, args.eval_prompts, teacher_acc, tmp,
                                             log, student_recipe, args.start_fraction)
        result["student_start"] = {
            "recipe": f"{student_recipe.name} (d_model {student_recipe.d_model}, "
                      f"{student_recipe.n_layers} layers, {student_recipe.steps} steps) "
                      "+ SFT on teacher samples (32/step, AdamW 2e-3)",
            "recipe_hash": student_recipe.hash(), **start_info,
            "sft_until_fraction": args.start_fraction,
            "fraction_of_teacher": start_info["accuracy"] / teacher_acc}
        log(f"student start accuracy {start_info['accuracy']:.3f} after "
            f"{start_info['sft_steps']} SFT steps")
        common = dict(task=args.task, start=str(start_path), teacher=str(teacher_path),
                      prompts=args.prompts, group=args.group, eval_every=args.eval_every,
                      eval_prompts=args.eval_prompts, target=target, cap=args.cap,
                      grad_clip=args.grad_clip)

    def save():
        # Parts may run as separate processes (--parts): merge into what is already there, so
        # each keeps its own keys and command.
        result["seconds_" + "+".join(parts)] = time.perf_counter() - wall
        merged = json.loads(out.read_text()) if out.exists() else {}
        commands = {**merged.get("commands", {}), **{part: result["command"] for part in parts}}
        machines = {**merged.get("machines", {}), **{part: result["machine"] for part in parts}}
        # a promoted file's top-level headline is another setting's: this run's goes beside it
        own_headline(merged).update({k: v for k, v in result.items() if k in HEADLINE_KEYS})
        merged.update({k: v for k, v in result.items() if k not in HEADLINE_KEYS})
        merged["commands"], merged["machines"] = commands, machines
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
                result["rl_over_opd"] = rl_over_opd(result["steps_to_target"].get("opd"),
                                                    result["steps_to_target"].get("rl"), args.cap)
                save()
        if "optimizers" in parts:
            earlier = own_headline(json.loads(out.read_text())) if out.exists() else {}
            best_adamw = ((result.get("lr") or earlier.get("lr") or {}).get("opd")) or 1e-3
            grid = {"adamw": [best_adamw],
                    "muon": [float(x) for x in args.muon_lrs.split(",")],
                    "manifold_muon": [float(x) for x in args.manifold_lrs.split(",")]}
            jobs = [dict(common, objective="opd", optimizer=name, lr=lr, fallback_lr=best_adamw,
                         seed=seeds[0]) for name, values in grid.items() for lr in values]
            runs = list(pool.map(run_one, jobs))
            for run in runs:
                log(f"  opd {run['optimizer']} lr={run['lr']:g}: {run['steps_to_target']} steps, "
                    f"best accuracy {run['max_accuracy']}, {run['seconds_per_step']:.3f} s/step, "
                    f"error {run['error']}")
            result["optimizers"] = {
                "seed": seeds[0], "fallback_lr (AdamW group)": best_adamw, "runs": runs,
                "best": {name: best_lr([r for r in runs if r["optimizer"] == name], values)
                         for name, values in grid.items()},
                "manifold_muon_solver": "projected",
                "summary": {f"{r['optimizer']} lr={r['lr']:g}": {
                    "steps_to_target": r["steps_to_target"],
                    "final_accuracy": r["curve"][-1][1] if r["curve"] else None,
                    "max_accuracy": r["max_accuracy"], "seconds_per_step": r["seconds_per_step"],
                    "steps_run": r["steps_run"], "error": r["error"]} for r in runs},
                "cap": args.cap, "target_accuracy": common["target"]}
            save()
    if "diagnosis" in parts:
        earlier = own_headline(json.loads(out.read_text())) if out.exists() else {}
        lr = ((result.get("lr") or earlier.get("lr") or {}).get("opd")) or 2.5e-4
        result["diagnosis"] = diagnose(start_path, teacher_path, args, lr, target, log)
        save()
    if "forgetting" in parts:
        runs = [forgetting(teacher, args, log, int(seed)) for seed in args.ft_seeds.split(",")]
        result["forgetting"] = {**runs[0], **forgetting_summary(runs)}
        save()
    save()
    merged = json.loads(out.read_text())
    merged["plots"] = plot({**merged, **own_headline(merged)}, out.with_suffix(""))
    out.write_text(json.dumps(merged, indent=1) + "\n")
    log(json.dumps({k: result.get(k) for k in ("steps_to_target", "lr", "rl_over_opd", "cap")}))


if __name__ == "__main__":
    main()
