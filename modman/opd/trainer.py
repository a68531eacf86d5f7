"""One loop, three objectives: on-policy distillation, RL, and SFT on teacher samples.

Each step draws ``prompts_per_step`` training prompts and ``group_size`` completions per prompt,
so every objective sees the same number of sampled sequences (and, up to <eos>, tokens):

- ``"opd"``: the student samples; the teacher scores every sampled token (one no-grad forward,
  gathered log-probs only); advantages are the discounted returns of
  r_t = −kl_coef·(log s(y_t) − log t(y_t)) (discount 0 by default, see advantages.py);
- ``"rl"``: the student samples; the task's exact scorer gives a 0/1 sequence reward, centred
  within each group; an optional kl_coef > 0 adds the teacher term above as shaping;
- ``"sft"``: the teacher samples (or, with ``sft_source="student"``, the student itself — the
  self-distillation control); the student minimises −Σ_t log s(y_t) on those tokens.

The policy-gradient objectives use the importance-sampling loss −Σ_t ρ_t A_t (``loss="is"``) or
PPO's clipped surrogate (``loss="ppo"``), with ``substeps`` optimizer steps per batch; the batch
loss is the mean over sequences of the per-sequence token sum. The student's log-probs in the
advantage come from the same no-grad scoring path as the teacher's, so teacher == student gives
advantages that are exactly zero (and no update); the ratio's denominator is the sampler's own
recorded log-prob.

Metrics every step (a dict, appended as one JSON line to ``log_path`` when given):
``teacher_kl`` (per-sequence Σ_t (log s − log t) on student samples: an unbiased estimate of the
sequence-level KL(S‖T); on teacher samples for SFT, ``teacher_kl_forward`` estimates KL(T‖S)),
``teacher_kl_per_token``, ``entropy`` (mean student entropy per completion token),
``completion_length``, ``fraction_truncated``, ``grad_norm`` (before clipping), ``loss``,
``reward`` (mean exact-match of the step's samples), ``sampler_mismatch`` (max |recorded
log-prob − rescored log-prob|: nonzero only by float noise when sampler == policy), and
``accuracy`` (greedy held-out exact match) every ``eval_every`` steps.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .advantages import group_centred_advantages, teacher_advantages
from .losses import importance_sampling_loss, ppo_clip_loss, sft_loss
from .rollouts import Rollouts, sample_rollouts
from .scoring import TeacherRender, check_same_vocabulary, completion_logprobs, teacher_logprobs

OBJECTIVES = ("opd", "rl", "sft")
LOSSES = ("is", "ppo")


@dataclass(frozen=True)
class OPDConfig:
    """Hyperparameters of :class:`Trainer` (see the module docstring)."""

    objective: str = "opd"
    loss: str = "is"
    group_size: int = 4
    prompts_per_step: int = 16
    max_new_tokens: int | None = None  # None: the task's budget (answer + <eos>)
    temperature: float = 1.0  # fixed: sampler log-probs must be the policy's
    kl_coef: float | None = None  # None: 1 for "opd", 0 for "rl"
    discount: float = 0.0
    substeps: int = 1
    clip_eps: float = 0.2
    sft_source: str = "teacher"
    grad_clip: float | None = None
    eval_every: int = 10
    eval_prompts: int | None = 200  # None: the task's whole test set
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("group_size", "prompts_per_step", "substeps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every!r}")
        if self.temperature != 1.0:
            raise ValueError(
                "temperature must be 1: the importance ratio divides by the sampler's log-probs, "
                "which are the trained policy's only at temperature 1 (no top-p/top-k either)")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must lie in [0, 1], got {self.discount!r}")
        if self.kl_coef is not None and not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef!r}")
        if self.sft_source not in ("teacher", "student"):
            raise ValueError(f"sft_source must be 'teacher' or 'student', got {self.sft_source!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")

    @property
    def effective_kl_coef(self) -> float:
        if self.kl_coef is not None:
            return float(self.kl_coef)
        return 1.0 if self.objective == "opd" else 0.0


OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class Trainer:
    """On-policy distillation / RL / SFT of ``student`` on ``task`` (a :mod:`modman.toy.tasks`
    task: prompts, tokenizer and exact scorer).

    Args:
        student: the model trained in place (full or LoRA: only parameters with
            requires_grad are given to the optimizer factory's model).
        task: prompt source, tokenizer and scorer.
        config: :class:`OPDConfig`.
        optimizer: a factory ``model -> optimizer`` (e.g. ``lambda m: ManifoldMuon(m.modules(),
            lr=...)``) or an optimizer already built on the student's parameters.
        teacher: fixed teacher (required by "opd" and by "sft" from the teacher); frozen here.
        teacher_render: the teacher's own prompt rendering (see scoring.TeacherRender).
        teacher_tokenizer: checked against ``task.tokenizer`` when given.
        log_path: append one JSON line of metrics per step.
        progress: show a tqdm bar in :meth:`train`.
    """

    def __init__(self, student, task, config: OPDConfig | None = None, *,
                 optimizer: OptimizerFactory | torch.optim.Optimizer,
                 teacher=None, teacher_render: TeacherRender | None = None,
                 teacher_tokenizer=None, log_path: str | Path | None = None,
                 progress: bool = False):
        self.config = config = config or OPDConfig()
        self.student, self.task, self.teacher = student, task, teacher
        needs_teacher = config.objective == "opd" or (
            config.objective == "sft" and config.sft_source == "teacher") or (
            config.objective == "rl" and config.effective_kl_coef > 0)
        if needs_teacher and teacher is None:
            raise ValueError(f"objective {config.objective!r} (kl_coef "
                             f"{config.effective_kl_coef}) needs a teacher")
        if teacher is not None:
            check_same_vocabulary(student, teacher, task.tokenizer, teacher_tokenizer)
            if teacher is student:
                raise ValueError("teacher must be a separate, fixed model (pass a copy)")
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher_render = teacher_render
        self.params = [p for p in student.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.optimizer = optimizer(student) if callable(optimizer) else optimizer
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError("optimizer must be a torch.optim.Optimizer or a factory returning one")
        self.max_new_tokens = config.max_new_tokens or task.max_new_tokens
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.log_path = Path(log_path) if log_path is not None else None
        self.progress = progress
        self.step_count = 0
        self.history: list[dict] = []
        self._eval_batch = None

    # ---------------------------------------------------------------- pieces

    def _rollouts(self, model) -> Rollouts:
        tok = self.task.tokenizer
        batch = self.task.sample(self.config.prompts_per_step, self.rng, "train")
        return sample_rollouts(model, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                               group_size=self.config.group_size,
                               max_new_tokens=self.max_new_tokens,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               generator=self.generator)

    def evaluate(self) -> float:
        """Greedy exact match on the held-out prompts (the first ``eval_prompts`` of them)."""
        if self._eval_batch is None:
            prompts = self.task.test_prompts()
            if self.config.eval_prompts is not None:
                prompts = prompts[:self.config.eval_prompts]
            self._eval_batch = self.task.encode(prompts)
        was_training = self.student.training
        self.student.eval()
        try:
            return self.task.evaluate(self.student, self._eval_batch)
        finally:
            self.student.train(was_training)

    # ---------------------------------------------------------------- one step

    def step(self) -> dict:
        cfg = self.config
        start = time.perf_counter()
        sft_from_teacher = cfg.objective == "sft" and cfg.sft_source == "teacher"
        rollouts = self._rollouts(self.teacher if sft_from_teacher else self.student)
        mask = rollouts.completion_mask
        n_tokens = mask.sum(1).float()
        rewards = self.task.score_ids(rollouts.prompts, rollouts.completion_ids, mask).float()
        metrics = {"step": self.step_count + 1, "objective": cfg.objective,
                   "completion_length": float(n_tokens.mean()),
                   "fraction_truncated": float(rollouts.truncated.float().mean()),
                   "reward": float(rewards.mean())}

        with torch.no_grad():
            student_lp, entropy = completion_logprobs(self.student, rollouts, with_entropy=True)
        metrics["entropy"] = float(entropy.sum() / n_tokens.sum().clamp(min=1))
        teacher_lp = None
        if self.teacher is not None:
            teacher_lp = teacher_logprobs(self.teacher, rollouts, render=self.teacher_render)
            log_ratio = (student_lp - teacher_lp).sum(1)
            key = "teacher_kl_forward" if sft_from_teacher else "teacher_kl"
            sign = -1.0 if sft_from_teacher else 1.0
            metrics[key] = float(sign * log_ratio.mean())
            metrics[key + "_per_token"] = float(sign * log_ratio.sum() / n_tokens.sum().clamp(min=1))
        if cfg.objective != "sft" or cfg.sft_source == "student":
            metrics["sampler_mismatch"] = float(
                (student_lp - rollouts.sampler_logprobs).abs().max()) if mask.any() else 0.0

        advantages = None
        if cfg.objective == "opd":
            advantages = teacher_advantages(student_lp, teacher_lp, mask,
                                            kl_coef=cfg.effective_kl_coef, discount=cfg.discount)
        elif cfg.objective == "rl":
            advantages = group_centred_advantages(rewards, cfg.group_size, mask)
            if cfg.effective_kl_coef > 0:
                advantages = advantages + teacher_advantages(
                    student_lp, teacher_lp, mask, kl_coef=cfg.effective_kl_coef,
                    discount=cfg.discount)

        losses, grad_norms = [], []
        self.student.train()
        for _ in range(cfg.substeps):
            learner_lp = completion_logprobs(self.student, rollouts)
            if advantages is None:
                per_seq = sft_loss(learner_lp, mask)
            elif cfg.loss == "is":
                per_seq = importance_sampling_loss(learner_lp, rollouts.sampler_logprobs,
                                                   advantages, mask)
            else:
                per_seq = ppo_clip_loss(learner_lp, rollouts.sampler_logprobs, advantages, mask,
                                        clip_eps=cfg.clip_eps)
            loss = per_seq.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms.append(_grad_norm(self.params))
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.step_count += 1
        metrics["loss"] = losses[0]
        metrics["grad_norm"] = grad_norms[0]
        if cfg.substeps > 1:
            metrics["loss_last_substep"] = losses[-1]
        if cfg.eval_every and self.step_count % cfg.eval_every == 0:
            metrics["accuracy"] = self.evaluate()
        metrics["seconds"] = time.perf_counter() - start
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(f"step {self.step_count}: metric {key} is {value}")
        self.history.append(metrics)
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics

    # ---------------------------------------------------------------- the loop

    def train(self, steps: int, *, target_accuracy: float | None = None,
              callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Run up to ``steps`` steps; stop early once an evaluation reaches ``target_accuracy``.
        Returns this call's metrics."""
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        records = []
        iterator = range(steps)
        bar = None
        if self.progress:
            from tqdm import tqdm
            iterator = bar = tqdm(iterator, desc=f"{self.config.objective}")
        for _ in iterator:
            record = self.step()
            records.append(record)
            if callback is not None:
                callback(record)
            if bar is not None:
                shown = {k: f"{record[k]:.3g}" for k in ("teacher_kl", "reward", "accuracy")
                         if k in record}
                bar.set_postfix(shown)
            if (target_accuracy is not None and "accuracy" in record
                    and record["accuracy"] >= target_accuracy):
                break
        return records

    def config_dict(self) -> dict:
        return asdict(self.config)
