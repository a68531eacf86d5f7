"""Rules of thumb from "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) as
functions: the learning-rate rule, parameter counts and the capacity estimate.

- Learning rate: the optimal LoRA lr (α = 32, 1/r scaling, Adam) is ≈ 10× the optimal full
  fine-tuning lr (a fit of 9.8 over 14 models), ≈ 15× for runs under ~100 steps.
- Parameters: an adapter on a d_out × d_in layer has r·(d_in + d_out) parameters.
- Capacity: a network stores ≈ 2 bits per parameter; supervised fine-tuning needs up to ≈ 1 bit
  per token of first-epoch loss, reinforcement learning ≈ 1 bit per episode.
"""
from __future__ import annotations

import math

from torch import nn

from .._checks import is_finite_real, is_int
from .config import LoRAConfig, select_targets
from .layer import features

SHORT_RUN_STEPS = 100
BITS_PER_PARAMETER = 2.0


def lora_lr(full_ft_lr: float, steps: int | None = None) -> float:
    """The LoRA learning rate matching full fine-tuning at ``full_ft_lr``: 10× it, or 15× when
    ``steps`` ≤ 100 (short runs, where B has not yet grown out of its zero start).

    The ratio is the LoRA post's, measured with Adam on 4096-wide models. It grows with width:
    on modman's toy models (``benchmarks/lora.py``) the best LoRA lr was 1.25–2.5× the best
    full fine-tuning lr at d_model 128, 1.25–3.5× at 256 and 3.5–5× at 512 (README, "LoRA lr ratio") — on a
    small model start lower, or sweep. For Muon or ManifoldMuon (spectral-norm steps) no such
    ratio was measured here."""
    if not is_finite_real(full_ft_lr) or full_ft_lr <= 0:
        raise ValueError(f"full_ft_lr must be a positive finite number, got {full_ft_lr!r}")
    if steps is not None and (not is_int(steps) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    ratio = 15.0 if steps is not None and steps <= SHORT_RUN_STEPS else 10.0
    return ratio * float(full_ft_lr)


def lora_parameter_count(model: nn.Module, config: LoRAConfig) -> int:
    """Σ r·(d_in + d_out) over the layers ``config`` selects (without changing the model)."""
    return sum(config.r * sum(features(m)) for m in select_targets(model, config).values())


def rank_for_parameter_count(model: nn.Module, n_params: int, target_modules="all-linear",
                             exclude=None) -> int:
    """The smallest rank whose adapter on ``target_modules`` has at least ``n_params``
    parameters: the rank for a comparison at matched parameter count."""
    # 1.5 and True gave rank 1, NaN "cannot convert float NaN to integer" (a probe)
    if not is_int(n_params) or n_params < 1:
        raise ValueError(f"n_params must be a positive int, got {n_params!r}")
    per_rank = lora_parameter_count(model, LoRAConfig(1, target_modules=target_modules,
                                                      exclude=exclude))
    return max(1, math.ceil(n_params / per_rank))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "adapter"} parameter counts (tied weights once)."""
    seen, total, trainable, adapter = set(), 0, 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        if ".lora_A." in f".{name}" or ".lora_B." in f".{name}":
            adapter += p.numel()
    return {"total": total, "trainable": trainable, "adapter": adapter}


def capacity_bits(n_params: int, bits_per_parameter: float = BITS_PER_PARAMETER) -> float:
    """Information an adapter of ``n_params`` parameters can store (≈ 2 bits each)."""
    return float(n_params) * bits_per_parameter


def fits_capacity(n_params: int, dataset_bits: float) -> bool:
    """Whether the data's information (SFT: ≤ first-epoch loss in bits summed over tokens; RL:
    ≈ 1 bit per episode) fits in the adapter's capacity; past it LoRA falls behind full FT."""
    return dataset_bits <= capacity_bits(n_params)
