"""Optimizers for the trainable factors of a LoRA model, as factories ``model -> Optimizer``.

Which geometry the factors get under ManifoldMuon:

- A (r × d_in, wide) on the unscaled Stiefel manifold: orthonormal rows, A Aᵀ = I. At
  construction the optimizer moves A = P·U (polar) to U and B to B·P (its rule for LoRA
  factors, ``optim/base.py``), so B·A and the model's outputs stay as they were (a fresh
  adapter, B = 0, stays a no-op; a trained or loaded one keeps its outputs), and nothing is
  written before the optimizer has accepted its arguments.
- B (d_out × r) Euclidean, stepped by Muon (msign of the momentum): it starts at 0, which is on
  no Stiefel manifold, and its scale is what the fine-tune learns.
- The frozen base is never given to the optimizer, so it is never projected.

``optimizer.last_step_stats[name]["distance_to_manifold"]`` measures where A is.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon", "manifold_muon")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return params


def lora_param_groups(model: nn.Module, a_manifold: str = "stiefel",
                      b_manifold: str = "euclidean") -> list[dict]:
    """Param groups with ``manifold`` keys for modman's optimizers: the trainable lora_A
    factors on ``a_manifold``, the lora_B factors on ``b_manifold``, anything else trainable
    (e.g. a bias) on the AdamW fallback."""
    groups = {"A": [], "B": [], "other": []}
    for name, p in _trainable(model):
        kind = name.split(".")[-3] if name.count(".") >= 2 else ""
        groups["A" if kind == "lora_A" else "B" if kind == "lora_B" else "other"].append((name, p))
    out = []
    if groups["A"]:
        out.append({"params": groups["A"], "manifold": a_manifold})
    if groups["B"]:
        out.append({"params": groups["B"], "manifold": b_manifold})
    if groups["other"]:
        out.append({"params": groups["other"], "manifold": "fallback"})
    return out


def optimizer_factory(name: str, lr: float, weight_decay: float = 0.0, **kwargs
                      ) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """A factory for the trainer: ``"adamw"`` (torch.optim.AdamW on every trainable
    parameter), ``"muon"`` (modman.Muon on the matrices, AdamW on the rest) or
    ``"manifold_muon"`` (modman.ManifoldMuon with :func:`lora_param_groups`). ``kwargs`` go to
    the optimizer (e.g. ``solver="projected"`` or ``betas``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")

    def make(model: nn.Module) -> torch.optim.Optimizer:
        if name == "adamw":
            return torch.optim.AdamW([p for _, p in _trainable(model)], lr=lr,
                                     weight_decay=weight_decay, **kwargs)
        from ..optim import ManifoldMuon, Muon

        if name == "muon":
            return Muon(_trainable(model), lr=lr, weight_decay=weight_decay, **kwargs)
        # A is moved onto Stiefel with B ← B·A·Tᵀ/s² (the optimizer's LoRA rule): B·A and the outputs
        # are unchanged, which this factory promises
        return ManifoldMuon(lora_param_groups(model), lr=lr, weight_decay=weight_decay, **kwargs)

    make.__name__ = f"{name}(lr={lr:g})"
    return make
