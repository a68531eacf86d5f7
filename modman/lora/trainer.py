"""A small fine-tuning loop: any optimizer, lr schedule, gradient accumulation, periodic
evaluation, checkpoints with exact resume, a tqdm bar, JSON-lines metrics.

One optimizer step at index t (0-based) uses lr_g(t) = lr_g · f(t) for each param group g, with
f(t) = (t + 1)/warmup during warm-up, then 1 (``"constant"``) or (T − t)/(T − warmup)
(``"linear"``, reaching 1/(T − warmup) at the last step). Its gradient is the mean of
``grad_accum`` micro-batch losses, micro-batch m of step t being ``data(t, m)``.

Exact resume: data are a function of (t, m), not of an iterator's position, and a checkpoint
holds the trainable parameters, the optimizer state, the base lrs and the torch RNG states
(CPU and CUDA: dropout), so a run stopped after a checkpoint at step k and resumed reproduces
the uninterrupted run bitwise on the same machine. The base lrs are the checkpoint's: a resumed
run given other ones says so and keeps the checkpoint's.

A step whose loss or gradient is not finite raises FloatingPointError before the optimizer
runs: the weights and the last checkpoint stay as they were (a gradient is left to an optimizer
built with ``nonfinite="skip"``, which skips that step itself).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .._checks import is_int
from .._modes import kept_modes, record_modes, restore_modes
from .._warn import warn
from .inject import check_unmerged, lora_layers

CHECKPOINT_NAME = "trainer_state.pt"
SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps; grad_accum: micro-batches per step; eval_every /
    checkpoint_every: in steps (0 = never; a checkpoint is always written at the end when a
    checkpoint_dir is given); max_grad_norm: clip the total gradient norm (None = off)."""

    steps: int
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    max_grad_norm: float | None = None
    progress: bool = False

    def __post_init__(self):
        for name, least in (("steps", 1), ("grad_accum", 1), ("warmup_steps", 0), ("eval_every", 0),
                            ("checkpoint_every", 0)):
            value = getattr(self, name)
            # any integer type (a NumPy int from a sweep), stored as int; bools are not counts
            if not is_int(value) or value < least:
                kind = "a positive" if least else "a non-negative"
                raise ValueError(f"{name} must be {kind} int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps >= self.steps and self.schedule == "linear":
            raise ValueError(f"warmup_steps={self.warmup_steps} leaves no decay phase in "
                             f"steps={self.steps}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} > steps={self.steps}: the learning "
                             "rate would never reach its peak")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """f(t) of the module docstring."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    return (config.steps - step) / (config.steps - config.warmup_steps)


def task_data(task, batch_size: int, seed: int = 0, split: str = "train"
              ) -> Callable[[int, int], dict]:
    """``data(t, m)`` for a ``modman.toy.tasks`` task: batch_size fresh problems drawn from
    ``np.random.default_rng([seed, t, m])``, as model keyword arguments."""
    def data(step: int, micro: int) -> dict:
        batch = task.sample(batch_size, np.random.default_rng([seed, step, micro]), split)
        return {"input_ids": batch.input_ids, "labels": batch.labels}
    return data


@contextlib.contextmanager
def evaluation(model: nn.Module):
    """Eval mode (dropout off) without gradients inside; every module's mode as it was after."""
    with kept_modes(model, False), torch.no_grad():
        yield model


def eval_loss_fn(batches: list[dict]) -> Callable[[nn.Module], dict]:
    """An ``eval_fn`` returning {"loss": mean loss over fixed ``batches``}, in eval mode without
    gradients, the model's mode restored after (called directly too, as in the README, not only
    by :func:`train`: a model left in training mode gave a different loss each call)."""
    def evaluate(model: nn.Module) -> dict:
        with evaluation(model):
            losses = [float(model(**batch).loss) for batch in batches]
        return {"loss": sum(losses) / len(losses)}
    return evaluate


def _token_count(batch: dict) -> int:
    tokens = batch.get("input_ids", batch.get("labels"))
    return int(tokens.numel()) if isinstance(tokens, torch.Tensor) else 0


def _loss(output) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model's output has no loss: pass labels in the data batches")
    return loss


@dataclass
class TrainResult:
    history: list[dict]
    optimizer: torch.optim.Optimizer
    resumed_from: int

    def __repr__(self) -> str:  # the dataclass repr printed every step's record
        last = self.history[-1] if self.history else {}
        return (f"TrainResult({len(self.history)} steps, last {last.get('step')}: loss {last.get('loss')}, "
                f"resumed_from={self.resumed_from}, optimizer={type(self.optimizer).__name__})")


def train(model: nn.Module, optimizer: Callable[[nn.Module], torch.optim.Optimizer],
          data: Callable[[int, int], dict], config: TrainConfig, *,
          eval_fn: Callable[[nn.Module], dict] | None = None,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
          metrics_path: str | os.PathLike | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Fine-tune the trainable parameters of ``model``.

    Args:
        optimizer: a factory ``model -> torch.optim.Optimizer`` (see
            ``modman.lora.optimizer_factory``); its group lrs are the schedule's peak values.
        data: ``data(t, m)`` → keyword arguments for ``model`` including ``labels``; the logged
            ``tokens`` count ``input_ids`` (else ``labels``) entries.
        eval_fn: called every ``eval_every`` steps and at the end, in eval mode without
            gradients; its dict is logged with an ``eval_`` prefix.
        checkpoint_dir: where ``trainer_state.pt`` (and, for LoRA models, the adapter in
            PEFT format under ``adapter/``) are written; with ``resume`` an existing
            checkpoint there is loaded and training continues after its step.
        metrics_path: JSON-lines file, one record per step (step, loss, lr, tokens,
            tokens_per_s, seconds) plus eval_* keys on evaluation steps; on resume, records past
            the checkpoint are dropped.
        stop_after: stop (after checkpointing) once this many steps are done: simulates an
            interruption, and lets a long run proceed in pieces.

    The model trains in training mode and is handed back with every module in the mode it came
    in (a model loaded for inference, in eval mode, keeps its dropout off after training).

    Raises FloatingPointError at the first non-finite loss or gradient, naming the step; that
    step changes nothing. A checkpoint that cannot be resumed (unreadable, other parameters or
    shapes, another optimizer class) raises ValueError naming it, the model left bitwise as it was.
    """
    if not callable(optimizer):
        raise TypeError("optimizer must be a factory model -> torch.optim.Optimizer")
    check_unmerged(model, "train")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_file = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    resuming = resume and ckpt_file is not None and ckpt_file.is_file()
    state = _read_checkpoint(ckpt_file, trainable) if resuming else None
    if state is None:
        opt = optimizer(model)
        base_lrs, start = [float(g["lr"]) for g in opt.param_groups], 0
    else:
        # the optimizer's constructor may write the parameters (ManifoldMuon moves each A onto
        # Stiefel, B <- B·P) before its class can be checked against the checkpoint's: a refused
        # resume changed the model (a probe), so they are put back bitwise on refusal
        kept = {n: p.detach().clone() for n, p in trainable.items()}
        try:
            opt = optimizer(model)
            given = [float(g["lr"]) for g in opt.param_groups]
            start, base_lrs = _resume(ckpt_file, state, trainable, opt)
        except BaseException:
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(kept[name])
            raise
        del kept
        if base_lrs != given:
            warn(f"resumed from {ckpt_file} with its base lrs {base_lrs}; the optimizer "
                 f"given has {given} (start a new checkpoint_dir to train with those)")
    records: list[dict] = []
    metrics_file = None
    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        kept = []
        if start and metrics_path.is_file():
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start]
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics_file = metrics_path.open("a")
    end = config.steps if stop_after is None else min(config.steps, int(stop_after))
    bar = None
    if config.progress:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="lora", unit="step")
    clock = time.perf_counter()
    modes = record_modes(model)
    model.train()
    try:
        for step in range(start, end):
            tick = time.perf_counter()
            factor = lr_factor(step, config)
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * factor
            opt.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for micro in range(config.grad_accum):
                batch = data(step, micro)
                loss = _loss(model(**batch))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {float(loss.detach())} at step {step + 1} "
                                             f"(micro-batch {micro})")
                (loss / config.grad_accum).backward()
                total += float(loss.detach()) / config.grad_accum
                tokens += _token_count(batch)
            grads = [p.grad for p in trainable.values() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if not torch.isfinite(grad_norm) and getattr(opt, "nonfinite", "raise") != "skip":
                # AdamW would write the NaN into the weights (and the next checkpoint); an optimizer
                # built with nonfinite="skip" (modman's) skips the step itself
                raise FloatingPointError(f"non-finite gradient norm {float(grad_norm)} at step {step + 1}; "
                                         "nothing was updated")
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(grads, config.max_grad_norm, grad_norm)
            opt.step()
            step_seconds = time.perf_counter() - tick
            done = step + 1
            record = {"step": done, "loss": total, "grad_norm": float(grad_norm), "lr": base_lrs[0] * factor,
                      "tokens": tokens,
                      "step_seconds": step_seconds, "tokens_per_s": tokens / step_seconds}
            if eval_fn is not None and ((config.eval_every and done % config.eval_every == 0)
                                        or done == config.steps):
                record.update({f"eval_{k}": v for k, v in _evaluate(model, eval_fn).items()})
            record["seconds"] = time.perf_counter() - clock
            records.append(record)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if ckpt_dir is not None and ((config.checkpoint_every
                                          and done % config.checkpoint_every == 0)
                                         or done == end):
                _save_checkpoint(ckpt_dir, model, trainable, opt, done, base_lrs)
    finally:
        restore_modes(modes)
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return TrainResult(history=records, optimizer=opt, resumed_from=start)


def _evaluate(model: nn.Module, eval_fn) -> dict:
    with evaluation(model):
        result = eval_fn(model)
    if isinstance(result, (int, float)):
        result = {"value": float(result)}
    return {k: float(v) for k, v in result.items()}


def _save_checkpoint(folder: Path, model: nn.Module, trainable: dict, opt, step: int,
                     base_lrs: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "base_lrs": base_lrs,
        "params": {n: p.detach().clone() for n, p in trainable.items()},
        "optimizer": opt.state_dict(),
        "optimizer_class": type(opt).__name__,
        "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()  # dropout on a GPU
    tmp = folder / f".{CHECKPOINT_NAME}.tmp{os.getpid()}"
    torch.save(state, tmp)
    tmp.replace(folder / CHECKPOINT_NAME)  # atomic: a crash mid-write keeps the old checkpoint
    if getattr(model, "lora_configs", None):
        from .peft_format import save_adapter

        active = {n for layer in lora_layers(model).values() for n in layer.active_adapters}
        for name in sorted(active):
            save_adapter(model, folder / ("adapter" if name == "default" else f"adapter-{name}"),
                         name)


def _read_checkpoint(file: Path, trainable: dict) -> dict:
    """The state in ``file``, refused (naming it) unless it is a trainer checkpoint holding the
    model's trainable parameters in their shapes; read before the optimizer is built."""
    try:
        state = torch.load(file, weights_only=True)
    except Exception as err:  # (a truncated file: "OSError: [Errno 22] Invalid argument", no file named)
        raise ValueError(f"{file} is not a readable checkpoint ({type(err).__name__}: {err}); not resumed "
                         "(remove it or pass resume=False to start afresh)") from None
    missing = [key for key in ("step", "base_lrs", "params", "optimizer", "rng")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{file} is not a trainer checkpoint: it lacks {missing}; not resumed")
    saved = state["params"]
    if set(saved) != set(trainable):
        raise ValueError(f"{file} holds parameters {sorted(set(saved) ^ set(trainable))[:5]} "
                         "that differ from the model's trainable ones; not resumed")
    for name, tensor in saved.items():
        if tensor.shape != trainable[name].shape:
            raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model "
                             f"{tuple(trainable[name].shape)}; not resumed")
    return state


def _resume(file: Path, state: dict, trainable: dict, opt) -> tuple[int, list[float]]:
    """Load a checkpoint ``_read_checkpoint`` accepted into the parameters, ``opt`` and the RNGs;
    returns (its step, its base lrs)."""
    saved_class = state.get("optimizer_class", type(opt).__name__)
    if saved_class != type(opt).__name__:
        raise ValueError(f"{file} holds the state of {saved_class}, the optimizer given is "
                         f"{type(opt).__name__}; not resumed")
    opt.load_state_dict(state["optimizer"])
    with torch.no_grad():
        for name, tensor in state["params"].items():
            trainable[name].copy_(tensor)
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), [float(x) for x in state["base_lrs"]]
