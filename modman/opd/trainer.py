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
loss is the mean over sequences of the per-sequence token sum. The student runs in eval mode (no
dropout) for the whole step, sampling, scoring and learning alike, so the sampled, the scored and
the differentiated policy are one network. The student's log-probs in the advantage come from the
same no-grad scoring path as the teacher's, so teacher == student gives advantages that are
exactly zero (and no gradient: an optimizer's decoupled weight decay still moves the weights); the ratio's denominator is the sampler's own recorded log-prob.
A non-finite value raises FloatingPointError before any update (see :meth:`Trainer.step`).

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

import copy
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._checks import is_finite_real, is_int, is_real
from .._modes import kept_modes
from .._warn import warn
from ..lora.inject import check_unmerged
from .advantages import group_centred_advantages, teacher_advantages
from .losses import importance_sampling_loss, ppo_clip_loss, sft_loss
from .rollouts import Rollouts, sample_rollouts
from .scoring import (TeacherRender, check_same_vocabulary, completion_logprobs, teacher_logprobs,
                      vocab_size)

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
    grad_clip: float | None = None  # None: off; else the max total gradient norm, finite > 0
    eval_every: int = 10
    eval_prompts: int | None = 200  # None: the task's whole test set
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        # Counts: any integer type (numpy's too, stored back as int so the config stays JSON- and
        # isinstance(int)-friendly downstream), never a bool or a float such as 2.5.
        for name, low, optional in (("group_size", 1, False), ("prompts_per_step", 1, False),
                                    ("substeps", 1, False), ("max_new_tokens", 1, True),
                                    ("eval_every", 0, False), ("eval_prompts", 1, True),
                                    ("seed", 0, False)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}"
                                 f"{' or None' if optional else ''}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.seed >= 2**64:  # torch.Generator's range; it failed naming nothing
            raise ValueError(f"seed must be below 2**64, got {self.seed!r}")
        if self.objective == "rl" and self.group_size < 2:
            # The task reward is centred within each group: a group of one always gets advantage
            # exactly 0, so the RL objective would silently train on nothing.
            raise ValueError("objective 'rl' needs group_size >= 2: rewards are centred within "
                             f"each group, so group_size={self.group_size} gives zero advantages")
        if self.objective == "opd" and self.kl_coef is not None and self.kl_coef == 0:
            # the advantage is −kl_coef·(log s − log t): zero everywhere, nothing would train
            raise ValueError("objective 'opd' needs kl_coef > 0 (its advantages are −kl_coef·(log s − "
                             "log t)): kl_coef=0 would train on nothing")
        if not is_real(self.temperature) or self.temperature != 1.0:  # (True == 1.0)
            raise ValueError(
                "temperature must be 1: the importance ratio divides by the sampler's log-probs, "
                "which are the trained policy's only at temperature 1 (no top-p/top-k either)")
        # Reals: numpy's too, stored back as float (a numpy scalar in the config made the default
        # torch.load, weights_only, refuse a saved Trainer.state_dict()).
        for name in ("temperature", "kl_coef", "discount", "clip_eps", "grad_clip"):
            if is_real(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        if not (is_real(self.discount) and 0.0 <= self.discount <= 1.0):
            raise ValueError(f"discount must lie in [0, 1], got {self.discount!r}")
        if self.kl_coef is not None and not (is_finite_real(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0 or None, got {self.kl_coef!r}")
        if not (is_real(self.clip_eps) and 0 < self.clip_eps < 1):
            raise ValueError(f"clip_eps must lie in (0, 1), got {self.clip_eps!r}")
        if self.grad_clip is not None and not (is_finite_real(self.grad_clip) and self.grad_clip > 0):
            # A negative max norm flips the gradient (ascent) and NaN poisons every weight.
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got "
                             f"{self.grad_clip!r}")
        if self.sft_source not in ("teacher", "student"):
            raise ValueError(f"sft_source must be 'teacher' or 'student', got {self.sft_source!r}")

    @property
    def effective_kl_coef(self) -> float:
        if self.kl_coef is not None:
            return float(self.kl_coef)
        return 1.0 if self.objective == "opd" else 0.0


OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


_SAMPLE_CALL = "generate(prompt_ids, max_new_tokens, temperature=, eos_token_id=, pad_token_id=, attention_mask=, generator=)"


def _check_sampler(model, role: str) -> None:
    """The rollouts call ``model.generate`` as modman.toy.TinyCausalLM's (``_SAMPLE_CALL``):
    refuse a sampler (the student, or the teacher for SFT on its samples) whose generate cannot
    take that call — a transformers model's takes a generation config second, and failed deep
    inside with "'int' object has no attribute 'max_length'"."""
    generate = getattr(model, "generate", None)
    try:
        params = inspect.signature(generate).parameters
        inspect.signature(generate).bind(None, 1, temperature=1.0, eos_token_id=0, pad_token_id=0,
                                         attention_mask=None, generator=None)
        ok = list(params)[1:2] != ["generation_config"]
    except (TypeError, ValueError):  # not callable, or the call does not bind
        ok = False
    if not ok:
        raise TypeError(f"the {role} samples its rollouts through {_SAMPLE_CALL}, the signature of "
                        f"modman.toy.TinyCausalLM.generate; {type(model).__name__}'s generate takes another "
                        "(a transformers model needs a wrapper with that signature)")


def _check_finite(step: int, name: str, value) -> None:
    finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else (
        not isinstance(value, float) or math.isfinite(value))
    if not finite:
        raise FloatingPointError(f"step {step}: non-finite {name}; nothing was updated")


def _device(model) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def _grad_norm(params) -> float:
    # At least fp32 (a bf16 norm is coarse), fp64 kept (no overflow that fp64 did not have).
    norms = [p.grad.detach().to(torch.promote_types(p.grad.dtype, torch.float32)).norm()
             for p in params if p.grad is not None]
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
        if not isinstance(config, OPDConfig):
            raise TypeError(f"config must be an OPDConfig, got {type(config).__name__}")
        self.student, self.task, self.teacher = student, task, teacher
        # Check everything before changing anything: the teacher is frozen only once all pass.
        v_student, v_task = vocab_size(student), task.tokenizer.vocab_size
        if v_student != v_task:
            # Sampled ids must decode with the task's tokenizer (a larger head samples ids it
            # cannot decode) and its prompt ids must embed (a smaller one cannot).
            raise ValueError(f"the student's vocabulary has {v_student} tokens but the task's "
                             f"tokenizer has {v_task}: they must be equal")
        sft_from_teacher = config.objective == "sft" and config.sft_source == "teacher"
        _check_sampler(student, "student")
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
            # copy.copy(student), or a teacher given the student's embedding: freezing the teacher
            # would freeze those weights of the student (a probe); a frozen one shared to save
            # memory stays allowed (a review)
            in_teacher = {id(p) for p in teacher.parameters()}
            shared = [name for name, p in student.named_parameters(remove_duplicate=False)
                      if id(p) in in_teacher and p.requires_grad]
            if shared:
                raise ValueError(f"the teacher shares {len(shared)} parameter(s) with the student "
                                 f"({', '.join(shared[:4])}{', …' if len(shared) > 4 else ''}): freezing the "
                                 "teacher would freeze them; pass a separate copy (copy.deepcopy)")
            devices = _device(student), _device(teacher)
            if None not in devices and devices[0] != devices[1]:
                # the teacher scores the student's token ids as they are, on the student's device
                raise ValueError(f"the student is on {devices[0]} and the teacher on {devices[1]}: "
                                 "put both on one device")
            if sft_from_teacher:
                _check_sampler(teacher, "teacher")
        self.params = [p for p in student.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        check_unmerged(student, "Trainer")
        self.optimizer = optimizer(student) if callable(optimizer) else optimizer
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError("optimizer must be a torch.optim.Optimizer or a factory returning one")
        trainable = {id(p) for p in self.params}
        if not any(id(p) in trainable for group in self.optimizer.param_groups
                   for p in group["params"]):
            raise ValueError("optimizer holds none of the student's trainable parameters (was it "
                             "built on another model, or a copy?): training would change nothing")
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher_render = teacher_render
        self.max_new_tokens = config.max_new_tokens or task.max_new_tokens
        if self.max_new_tokens < task.max_new_tokens:
            warn(f"max_new_tokens={self.max_new_tokens} is shorter than the task's answers "
                 f"({task.max_new_tokens} tokens with <eos>): rollouts that need them are truncated "
                 "and score 0")
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
        with kept_modes(self.student, False):
            return self.task.evaluate(self.student, self._eval_batch)

    # ---------------------------------------------------------------- one step

    def step(self) -> dict:
        """One batch: sample, score, then ``substeps`` optimizer steps; returns the metrics.

        The student runs in eval mode for the whole step (sampling, the no-grad scoring of the
        advantage and the learner's forward of the loss), then gets its previous mode back.
        Dropout is off everywhere, so the policy that samples, the one in the reward
        −(log s − log t) and the one differentiated are one deterministic network: teacher ==
        student gives exactly zero advantages, and the importance ratio of the first substep is
        1 up to float noise (as in TRL, which disables dropout for on-policy training).

        A non-finite log-prob, advantage, metric, loss or gradient norm raises FloatingPointError
        before the optimizer sees it: the student's weights, the optimizer's state and
        ``step_count`` are left as they were (with ``substeps`` > 1, the earlier substeps' updates
        are undone). Only the sampling RNGs have moved on.
        """
        with kept_modes(self.student, False):  # (every submodule's mode back after, not only the model's)
            return self._step()

    def _step(self) -> dict:
        cfg = self.config
        step = self.step_count + 1
        start = time.perf_counter()
        sft_from_teacher = cfg.objective == "sft" and cfg.sft_source == "teacher"
        rollouts = self._rollouts(self.teacher if sft_from_teacher else self.student)
        mask = rollouts.completion_mask
        n_tokens = mask.sum(1).float()
        rewards = self.task.score_ids(rollouts.prompts, rollouts.completion_ids, mask).float()
        metrics = {"step": step, "objective": cfg.objective,
                   "completion_length": float(n_tokens.mean()),
                   "fraction_truncated": float(rollouts.truncated.float().mean()),
                   "reward": float(rewards.mean())}

        with torch.no_grad():
            student_lp, entropy = completion_logprobs(self.student, rollouts, with_entropy=True)
        _check_finite(step, "student log-prob", student_lp)
        metrics["entropy"] = float(entropy.sum() / n_tokens.sum().clamp(min=1))
        teacher_lp = None
        if self.teacher is not None:
            teacher_lp = teacher_logprobs(self.teacher, rollouts, render=self.teacher_render)
            _check_finite(step, "teacher log-prob", teacher_lp)
            log_ratio = (student_lp - teacher_lp).sum(1)
            key = "teacher_kl_forward" if sft_from_teacher else "teacher_kl"
            sign = -1.0 if sft_from_teacher else 1.0
            metrics[key] = float(sign * log_ratio.mean())
            metrics[key + "_per_token"] = float(sign * log_ratio.sum() / n_tokens.sum().clamp(min=1))
        if cfg.objective != "sft" or cfg.sft_source == "student":
            _check_finite(step, "sampler log-prob", rollouts.sampler_logprobs)
            metrics["sampler_mismatch"] = float(
                (student_lp - rollouts.sampler_logprobs).abs().max()) if mask.any() else 0.0

        advantages = None
        if cfg.objective == "opd":
            advantages = teacher_advantages(student_lp, teacher_lp, mask,
                                            kl_coef=cfg.effective_kl_coef, discount=cfg.discount)
        elif cfg.objective == "rl":
            advantages = group_centred_advantages(rewards, cfg.group_size, mask, dtype=student_lp.dtype)
            if cfg.effective_kl_coef > 0:
                advantages = advantages + teacher_advantages(
                    student_lp, teacher_lp, mask, kl_coef=cfg.effective_kl_coef,
                    discount=cfg.discount)
        if advantages is not None:
            _check_finite(step, "advantage", advantages)
        for key, value in metrics.items():
            _check_finite(step, f"metric {key}", value)

        # Later substeps start from updated weights and may diverge: keep what undoes them.
        saved = None
        if cfg.substeps > 1:
            saved = ([p.detach().clone() for p in self.params],
                     copy.deepcopy(self.optimizer.state_dict()))
        losses, grad_norms = [], []
        try:
            for _ in range(cfg.substeps):
                learner_lp = completion_logprobs(self.student, rollouts)
                if advantages is None:
                    per_seq = sft_loss(learner_lp, mask)
                elif cfg.loss == "is":
                    per_seq = importance_sampling_loss(learner_lp, rollouts.sampler_logprobs,
                                                       advantages, mask)
                else:
                    per_seq = ppo_clip_loss(learner_lp, rollouts.sampler_logprobs, advantages,
                                            mask, clip_eps=cfg.clip_eps)
                loss = per_seq.mean()
                _check_finite(step, "loss", loss)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = _grad_norm(self.params)
                # A finite loss can still back-propagate to an overflowing gradient.
                _check_finite(step, "grad_norm", grad_norm)
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                losses.append(float(loss.detach()))
                grad_norms.append(grad_norm)
        except FloatingPointError:
            self.optimizer.zero_grad(set_to_none=True)  # no non-finite gradient left behind
            if saved is not None:
                with torch.no_grad():
                    for p, old in zip(self.params, saved[0]):
                        p.copy_(old)
                self.optimizer.load_state_dict(saved[1])
            raise
        self.step_count = step
        metrics["loss"] = losses[0]
        metrics["grad_norm"] = grad_norms[0]
        if cfg.substeps > 1:
            metrics["loss_last_substep"] = losses[-1]
        if cfg.eval_every and self.step_count % cfg.eval_every == 0:
            metrics["accuracy"] = self.evaluate()
        metrics["seconds"] = time.perf_counter() - start
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
        if not is_int(steps) or steps < 0:
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

    # ---------------------------------------------------------------- resuming

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the student's frozen weights and the task: the step
        count, both sampling RNGs (the prompts' NumPy generator and the rollouts' torch one), the
        metrics history (a copy of the list), the optimizer's state and the student's trainable
        parameters by name, with the config to check against. As torch's state_dicts, it holds
        references to live tensors: ``torch.save`` it (or deep-copy it) to keep a snapshot.

            torch.save(trainer.state_dict(), "opd.pt")
            # later: the same student base, task, config and optimizer factory
            trainer = Trainer(student, task, config, teacher=teacher, optimizer=factory)
            trainer.load_state_dict(torch.load("opd.pt"))
            trainer.train(steps_left)    # the run continues as if never interrupted
        """
        return {"step_count": self.step_count, "config": self.config_dict(),
                "rng": self.rng.bit_generator.state, "generator": self.generator.get_state(),
                "history": list(self.history), "optimizer": self.optimizer.state_dict(),
                "student": {name: p.detach() for name, p in self.student.named_parameters()
                            if p.requires_grad}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. Everything is checked before anything changes: a
        different config (naming the fields), trainable parameters that differ in name or shape or
        hold NaN/Inf (in the student's dtype), RNG states of another kind, a history that is not a
        list of records, NaN/Inf in the optimizer's state (torch's optimizers load it unchecked and
        the next step writes it into the weights) or an optimizer state the optimizer refuses raise
        and leave the trainer, the student and the optimizer as they were."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from Trainer.state_dict(), got {type(state).__name__}")
        missing = {"step_count", "config", "rng", "generator", "history", "optimizer",
                   "student"} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}: not a Trainer.state_dict()")
        ours = self.config_dict()
        differ = sorted(k for k in set(ours) | set(state["config"])
                        if ours.get(k) != state["config"].get(k))
        if differ:
            raise ValueError("the state was saved with another config: " + ", ".join(
                f"{k} {state['config'].get(k)!r} (saved) vs {ours.get(k)!r} (here)" for k in differ))
        if not is_int(state["step_count"]) or state["step_count"] < 0:
            raise ValueError(f"state['step_count'] must be an int >= 0, got {state['step_count']!r}")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = state["rng"]
            torch.Generator().set_state(state["generator"])
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"state['rng'] / state['generator'] are not generator states: {err}") from None
        own = {name: p for name, p in self.student.named_parameters() if p.requires_grad}
        saved = state["student"]
        if set(saved) != set(own):
            raise ValueError(f"the student's trainable parameters differ: saved only "
                             f"{sorted(set(saved) - set(own))[:5]}, here only {sorted(set(own) - set(saved))[:5]}")
        for name, value in saved.items():
            if not isinstance(value, torch.Tensor) or value.shape != own[name].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state['student'][{name!r}] has shape {shape}, the student's "
                                 f"{tuple(own[name].shape)}")
            if not bool(torch.isfinite(value.to(own[name].dtype)).all()):  # (fp64 1e300 is inf in fp32)
                raise ValueError(f"state['student'][{name!r}] holds NaN or Inf (in {own[name].dtype})")
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError(f"state['history'] must be a list of metric dicts, got {type(history).__name__}")
        optimizer_state = state["optimizer"].get("state", {}) if isinstance(state["optimizer"], dict) else {}
        for pid, entries in optimizer_state.items():
            for key, value in (entries.items() if isinstance(entries, dict) else ()):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"state['optimizer'] holds NaN or Inf in {key!r} of parameter {pid}")
        self.optimizer.load_state_dict(state["optimizer"])  # raises before changing anything
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        self.history = copy.deepcopy(history)
        self.step_count = int(state["step_count"])
