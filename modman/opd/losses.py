"""Policy-gradient losses on sampled tokens, per sequence (callers take the mean over rows).

Importance sampling (the recipe's loss): with ρ_t = exp(log π_θ(y_t) − log π_sampler(y_t)),

    L = −Σ_t mask_t · ρ_t · A_t                     (a sum over completion tokens, no length
                                                     normalisation, as in Tinker)

∇L = −Σ_t ρ_t A_t ∇log π_θ(y_t); when the learner is the sampler (ρ_t = 1 in value), this is the
plain REINFORCE gradient −Σ_t A_t ∇log π_θ(y_t). The sampler log-probs and A are detached.

PPO clipping (for several optimizer substeps on one batch):

    L = −Σ_t mask_t · min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)

SFT (off-policy distillation on someone else's samples): L = −Σ_t mask_t log π_θ(y_t).

Masked positions (the prompt, padding after <eos>) contribute exactly nothing: they are
selected out with ``torch.where`` before the sum, so even a non-finite advantage there cannot leak.
"""
from __future__ import annotations

import torch


def _check(learner, mask, *others):
    for other in others:
        if other.shape != learner.shape:
            raise ValueError(f"shape mismatch: {tuple(other.shape)} vs {tuple(learner.shape)}")
    if mask.shape != learner.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(learner.shape)}")


def importance_sampling_loss(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                             advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) −Σ_t ρ_t A_t over the masked completion tokens (module docstring)."""
    _check(learner_logprobs, mask, sampler_logprobs, advantages)
    zero = torch.zeros((), dtype=learner_logprobs.dtype)
    log_ratio = torch.where(mask, learner_logprobs - sampler_logprobs.detach(), zero)
    terms = torch.exp(log_ratio) * torch.where(mask, advantages.detach(), zero)
    return -torch.where(mask, terms, zero).sum(-1)


def ppo_clip_loss(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                  advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_eps: float = 0.2) -> torch.Tensor:
    """(B,) −Σ_t min(ρA, clip(ρ, 1−ε, 1+ε)A) over the masked completion tokens."""
    _check(learner_logprobs, mask, sampler_logprobs, advantages)
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must lie in (0, 1), got {clip_eps!r}")
    zero = torch.zeros((), dtype=learner_logprobs.dtype)
    ratio = torch.exp(torch.where(mask, learner_logprobs - sampler_logprobs.detach(), zero))
    adv = torch.where(mask, advantages.detach(), zero)
    terms = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    return -torch.where(mask, terms, zero).sum(-1)


def sft_loss(learner_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) −Σ_t log π_θ(y_t) over the masked tokens: cross-entropy on given samples."""
    _check(learner_logprobs, mask)
    zero = torch.zeros((), dtype=learner_logprobs.dtype)
    return -torch.where(mask, learner_logprobs, zero).sum(-1)
