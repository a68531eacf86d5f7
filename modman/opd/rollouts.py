"""Sampling completions with their per-token log-probabilities.

For prompts x⁽¹⁾…x⁽ᴾ⁾ and a group size G, :func:`sample_rollouts` draws G completions per prompt
from the policy at temperature 1, y ~ π(· | x), and records log π(yₜ | x, y₍<ₜ₎) for every sampled
token. Temperature 1 with no top-p/top-k is not a default but the contract: the recorded log-probs
are the denominators of the importance ratio exp(log π_learner − log π_sampler), which is only
right when the sampler *is* the policy being trained.

Layout of a :class:`Rollouts` (B = P·G rows, group members adjacent):

    sequences       (B, Lp + T)   left-padded prompt, then completion
    attention_mask  (B, Lp + T)   prompt mask, then completion_mask
    completion_ids  (B, T)        sampled tokens; pad after the stop token
    completion_mask (B, T)        True up to and including <eos>
    sampler_logprobs(B, T)        log π_sampler(yₜ); 0 where masked
    truncated       (B,)          the row never emitted <eos> within max_new_tokens

Completion token j sits at column Lp + j and is predicted by the logits at column Lp + j − 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import is_int
from .._modes import kept_modes

@dataclass
class Rollouts:
    """A batch of sampled completions; see the module docstring for the layout."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    truncated: torch.Tensor
    prompt_length: int
    prompts: list[str]
    group_size: int

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def completion_positions(self) -> torch.Tensor:
        """(B, T) column of each completion token in ``sequences``."""
        B, T = self.completion_ids.shape
        return (self.prompt_length + torch.arange(T, device=self.sequences.device)).expand(B, T)


def repeat_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list[str],
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Each prompt ``group_size`` times in a row (group members adjacent)."""
    if not is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    group_size = int(group_size)
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids and prompt_mask must share a (batch, length) shape, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    if len(prompts) != prompt_ids.shape[0]:
        raise ValueError(f"{len(prompts)} prompt strings for {prompt_ids.shape[0]} prompt rows")
    ids = prompt_ids.repeat_interleave(group_size, dim=0)
    mask = prompt_mask.repeat_interleave(group_size, dim=0)
    return ids, mask, [p for p in prompts for _ in range(group_size)]


@torch.no_grad()
def sample_rollouts(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    prompts: list[str], *, group_size: int, max_new_tokens: int,
                    eos_token_id: int, pad_token_id: int = 0,
                    generator: torch.Generator | None = None) -> Rollouts:
    """G = ``group_size`` temperature-1 samples per prompt from ``model`` (any module with
    :meth:`modman.toy.TinyCausalLM.generate`'s signature), with their log-probs and masks."""
    ids, mask, names = repeat_prompts(prompt_ids, prompt_mask, prompts, group_size)
    with kept_modes(model, False):  # (every submodule's own mode back after, not the model's flag)
        out = model.generate(ids, max_new_tokens, temperature=1.0, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, attention_mask=mask, generator=generator)
    cmask = out.completion_mask
    emitted_eos = ((out.completion_ids == eos_token_id) & cmask).any(dim=1)
    full_mask = torch.cat((mask.to(torch.long), cmask.to(torch.long)), dim=1)
    return Rollouts(sequences=out.sequences, attention_mask=full_mask,
                    completion_ids=out.completion_ids, completion_mask=cmask,
                    sampler_logprobs=out.logprobs, truncated=~emitted_eos,
                    prompt_length=out.prompt_length, prompts=names, group_size=group_size)
