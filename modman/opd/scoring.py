"""Per-token log-probabilities of given tokens, and the teacher/student contract.

For a causal LM with logits z_{b,c} at column c, the log-probability of the token at column p is

    log π(x_{b,p} | x_{b,<p}) = z_{b,p−1}[x_{b,p}] − logsumexp(z_{b,p−1})

so the teacher's score of completion token t is read from the logits one column before it.
Only those gathered values leave :func:`gather_logprobs`: the (batch, time, vocab) logits live
only inside the forward that makes them (never stored, never returned), which is what keeps
teacher scoring at O(batch·time) memory between steps.

The contract between teacher and student:
- the same vocabulary (the same size, and the same tokenizer when both are given); a mismatch
  raises, because scoring one model's token ids with another's vocabulary gives numbers that
  look plausible and mean nothing;
- when the teacher renders its own prompt, the completion tokens it scores must be exactly the
  student's sampled tokens; :func:`teacher_logprobs` reads them back from the teacher's input and
  refuses any difference (a prompt rendered differently shifts or re-tokenises the completion and
  silently biases the teacher's log-probs).
"""
from __future__ import annotations

from typing import Callable

import torch

from .._modes import kept_modes
from .rollouts import Rollouts

# A teacher's own rendering: (prompts, rollouts) → (input_ids, attention_mask, completion_start)
# with completion_start (B,) the column of each row's first completion token.
TeacherRender = Callable[[list[str], Rollouts], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def vocab_size(model) -> int:
    """The vocabulary size a model scores over: config.vocab_size, else the output head's rows."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None) is not None:
        return int(config.vocab_size)
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    raise TypeError(f"cannot tell the vocabulary size of {type(model).__name__}: give it a "
                    f"config.vocab_size or an lm_head Linear")


def context_length(model) -> int | None:
    """The longest input a model reads: config.max_len (modman.toy's learned positions, a hard
    limit), else None (transformers' max_position_embeddings is a soft one for RoPE models)."""
    value = getattr(getattr(model, "config", None), "max_len", None)
    return value if isinstance(value, int) else None


def _check_teacher_context(teacher, length: int) -> None:
    limit = context_length(teacher)
    if limit is not None and length > limit:
        raise ValueError(f"the teacher reads at most {limit} tokens but the sequences it must score "
                         f"hold {length} (prompt + completion): give the teacher a longer context or "
                         "the trainer a smaller max_new_tokens")


def check_same_vocabulary(student, teacher, student_tokenizer=None,
                          teacher_tokenizer=None) -> None:
    """Raise ValueError unless student and teacher share one vocabulary."""
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise ValueError(f"teacher and student vocabularies differ: student has {vs} tokens, "
                         f"teacher {vt}; on-policy distillation scores the student's token ids "
                         f"with the teacher, so they must share one tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        a = getattr(student_tokenizer, "alphabet", None)
        b = getattr(teacher_tokenizer, "alphabet", None)
        if a != b or student_tokenizer.vocab_size != teacher_tokenizer.vocab_size:
            raise ValueError("teacher and student tokenizers differ (same size, different "
                             "token ↔ text maps): refusing to score one with the other")


def gather_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor, *, with_entropy: bool = False):
    """log π(input_ids[b, p] | input_ids[b, <p]) at each column p = positions[b, t] ≥ 1.

    Returns (B, T) log-probs (differentiable if grad is on) in the logits' dtype promoted to at
    least fp32 (bf16 → fp32, fp64 stays fp64), and with ``with_entropy`` also the
    (B, T) entropy −Σ_v π_v log π_v of the predictive distribution at those positions
    (detached: a metric, not a loss).
    """
    if positions.ndim != 2 or positions.shape[0] != input_ids.shape[0]:
        raise ValueError(f"positions must be (batch, T) with batch {input_ids.shape[0]}, got "
                         f"{tuple(positions.shape)}")
    if positions.numel() and int(positions.min()) < 1:
        raise ValueError("a position must be >= 1: column 0 has no preceding logits")
    logits = model(input_ids, attention_mask=attention_mask).logits
    V = logits.shape[-1]
    if vocab_size(model) != V:
        raise ValueError(f"model returned {V} logits per position but declares {vocab_size(model)}")
    index = (positions - 1).clamp(max=input_ids.shape[1] - 1)
    # (B, T, V) in at least fp32: bf16/fp16 logits are upcast for the logsumexp, fp64 stays fp64.
    picked = logits.gather(1, index[..., None].expand(-1, -1, V))
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    del logits
    targets = input_ids.gather(1, positions.clamp(max=input_ids.shape[1] - 1))
    log_z = picked.logsumexp(-1)
    logprobs = picked.gather(-1, targets[..., None]).squeeze(-1) - log_z
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        p_log_p = picked.softmax(-1) * (picked - log_z[..., None])
        entropy = -p_log_p.sum(-1)
    return logprobs, entropy


def completion_logprobs(model, rollouts: Rollouts, *, with_entropy: bool = False):
    """Per-token log-probs of the rollouts' completion tokens under ``model`` (masked to 0)."""
    out = gather_logprobs(model, rollouts.sequences, rollouts.attention_mask,
                          rollouts.completion_positions, with_entropy=with_entropy)
    mask = rollouts.completion_mask
    if with_entropy:
        lp, ent = out
        return lp.masked_fill(~mask, 0.0), ent.masked_fill(~mask, 0.0)
    return out.masked_fill(~mask, 0.0)


@torch.no_grad()
def teacher_logprobs(teacher, rollouts: Rollouts, *, render: TeacherRender | None = None
                     ) -> torch.Tensor:
    """The teacher's log-prob of every sampled completion token, in one no-grad forward.

    With ``render=None`` the teacher reads the student's own sequences. With a ``render``
    (the teacher's prompt format) it reads its own input; the tokens at the completion columns
    must equal the sampled tokens wherever the completion mask is set, or ValueError.
    """
    with kept_modes(teacher, False):  # (every submodule's own mode back after)
        if render is None:
            _check_teacher_context(teacher, rollouts.sequences.shape[1])
            lp = gather_logprobs(teacher, rollouts.sequences, rollouts.attention_mask,
                                 rollouts.completion_positions)
        else:
            ids, mask, start = render(rollouts.prompts, rollouts)
            B, T = rollouts.completion_ids.shape
            start = torch.as_tensor(start, device=ids.device).reshape(-1)
            if ids.shape[0] != B or start.shape[0] != B:
                raise ValueError(f"teacher render returned {ids.shape[0]} rows and "
                                 f"{start.shape[0]} starts for {B} rollouts")
            positions = start[:, None] + torch.arange(T, device=ids.device)
            cmask = rollouts.completion_mask
            if bool((positions[cmask] >= ids.shape[1]).any()):
                raise ValueError("teacher render is too short to hold the completion")
            seen = ids.gather(1, positions.clamp(max=ids.shape[1] - 1))
            bad = (seen != rollouts.completion_ids) & cmask
            if bool(bad.any()):
                row = int(bad.any(1).nonzero()[0])
                raise ValueError(
                    f"teacher render misaligns the completion: row {row} reads "
                    f"{seen[row][cmask[row]].tolist()} where the student sampled "
                    f"{rollouts.completion_ids[row][cmask[row]].tolist()}")
            _check_teacher_context(teacher, ids.shape[1])
            lp = gather_logprobs(teacher, ids, mask, positions.clamp(max=ids.shape[1] - 1))
    return lp.masked_fill(~rollouts.completion_mask, 0.0)
