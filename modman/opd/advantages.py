"""Per-token advantages: the teacher as a dense reward, the task as a sparse one.

Per-token reward of completion token t (y ~ student s, teacher t, coefficient β = ``kl_coef``):

    r_t = −β·(log s(y_t | y_<t) − log t(y_t | y_<t))

and the advantage is its discounted return A_t = Σ_{k≥t} γ^{k−t} r_k (γ = ``discount``).

γ = 0 (the recipe's default) gives A_t = r_t: each token is pushed towards the teacher by its own
log-ratio only. At a fixed prefix this is exact: Σ_x s(x)·∇log s(x)·(log t(x) − log s(x)) =
−∇KL(s‖t), because Σ_x s(x)∇log s(x) = ∇Σ_x s(x) = 0 removes the derivative of the log s inside
the KL. Over whole sequences it is biased: the expectation of the γ = 0 estimator is

    −Σ_t E_{y<t ~ S}[ ∇_θ KL(s(·|y<t) ‖ t(·|y<t)) ]      (the prefix distribution held fixed),

so it ignores how the token chosen now changes the KLs of later positions. γ = 1 restores the
unbiased score-function estimator of −∇KL(S‖T) for the sequence distributions S, T
(tests/opd/test_enumeration.py checks both statements by exact enumeration). The recipe accepts
the bias for lower variance: a myopic, per-token distillation signal.

RL: the sequence reward R (e.g. exact match, 0/1) is centred within each group of G samples of the
same prompt, Â = R − mean_group(R), and every completion token gets Â (the GRPO/REINFORCE-with-
baseline form; no division by the group's std, so a group that all agree trains nothing).

Advantages are always returned detached: a gradient through them would differentiate the
reward, which is not the policy gradient.
"""
from __future__ import annotations

import torch

from .._checks import is_finite_real, is_int, is_real


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = Σ_{k≥t, mask_k} γ^{k−t} r_k along the last dim; 0 where mask is False."""
    if not (is_real(discount) and 0.0 <= discount <= 1.0):  # (True passed as γ = 1)
        raise ValueError(f"discount must lie in [0, 1], got {discount!r}")
    r = torch.where(mask, rewards, torch.zeros_like(rewards))
    if discount == 0.0:
        return r
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + discount * running
        out[..., t] = running
    return torch.where(mask, out, torch.zeros_like(out))


def teacher_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                       mask: torch.Tensor, *, kl_coef: float = 1.0,
                       discount: float = 0.0) -> torch.Tensor:
    """OPD's advantages: returns of r_t = −kl_coef·(log s − log t), detached (module docstring)."""
    if student_logprobs.shape != teacher_logprobs.shape or student_logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logprobs.shape)}, teacher "
                         f"{tuple(teacher_logprobs.shape)}, mask {tuple(mask.shape)}")
    if not is_finite_real(kl_coef):  # (NaN gave NaN advantages)
        raise ValueError(f"kl_coef must be a finite number, got {kl_coef!r}")
    reward = -kl_coef * (student_logprobs.detach() - teacher_logprobs.detach())
    return discounted_returns(reward, mask, discount)


def group_centred_advantages(rewards: torch.Tensor, group_size: int, mask: torch.Tensor, *,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RL advantages: R_i − mean of R over i's group, broadcast over i's completion tokens (B, T),
    in ``dtype`` (the policy's log-prob dtype: an fp64 policy's 1/3 was off by 4e-8 in fp32), on
    the mask's device."""
    if not is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    rewards = rewards.detach().to(device=mask.device, dtype=torch.float64)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (B,) with B a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    if mask.ndim != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be (B, T) for the {rewards.shape[0]} rewards, got {tuple(mask.shape)}")
    grouped = rewards.view(-1, int(group_size))
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1).to(dtype)
    return torch.where(mask, centred[:, None].expand_as(mask), torch.zeros((), dtype=dtype, device=mask.device))
