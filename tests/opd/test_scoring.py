"""Sampling and teacher scoring: log-probs at position t score token t, masks, EOS, the
vocabulary and alignment contracts."""
import pytest
import torch

from modman.opd import (Rollouts, check_same_vocabulary, completion_logprobs, sample_rollouts,
                        teacher_logprobs)

from .helpers import TOKENIZER, left_padded_prompts, tiny_model

EOS = TOKENIZER.eos_token_id


def _rollouts(model, seed=0, group_size=3, max_new_tokens=6):
    prompts = ["12+3=", "7=", "123+456="]
    ids, mask = left_padded_prompts([TOKENIZER.encode(p, bos=True) for p in prompts])
    return sample_rollouts(model, ids, mask, prompts, group_size=group_size,
                           max_new_tokens=max_new_tokens, eos_token_id=EOS,
                           generator=torch.Generator().manual_seed(seed))


def _prefix_oracle(model, rollouts):
    """log π(y_t | prompt, y_<t) from a separate forward of each unpadded prefix."""
    out = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float64)
    Lp = rollouts.prompt_length
    for b in range(len(rollouts)):
        prompt = rollouts.sequences[b, :Lp][rollouts.attention_mask[b, :Lp].bool()]
        for t in range(rollouts.completion_ids.shape[1]):
            if not rollouts.completion_mask[b, t]:
                continue
            prefix = torch.cat((prompt, rollouts.completion_ids[b, :t]))[None]
            logits = model(prefix).logits[0, -1].double()
            out[b, t] = logits.log_softmax(-1)[rollouts.completion_ids[b, t]]
    return out


def test_teacher_logprob_at_t_scores_token_t():
    student, teacher = tiny_model(0), tiny_model(1)
    rollouts = _rollouts(student)
    got = teacher_logprobs(teacher, rollouts)
    with torch.no_grad():
        expected = _prefix_oracle(teacher, rollouts)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)
    # A one-column shift (scoring token t with the logits of column t) must not pass.
    shifted = torch.zeros_like(got)
    shifted[:, 1:] = got[:, :-1]
    assert not torch.allclose(shifted.double(), expected, atol=1e-3)


def test_sampler_logprobs_are_the_policy_logprobs():
    student = tiny_model(2)
    rollouts = _rollouts(student, seed=3)
    with torch.no_grad():
        rescored = completion_logprobs(student, rollouts)
    torch.testing.assert_close(rescored, rollouts.sampler_logprobs, atol=2e-5, rtol=0)


def test_masks_eos_and_truncation():
    rollouts = _rollouts(tiny_model(4), seed=5, max_new_tokens=6)
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    B, T = ids.shape
    assert rollouts.sequences.shape == (B, rollouts.prompt_length + T)
    assert torch.equal(rollouts.attention_mask[:, rollouts.prompt_length:].bool(), cmask)
    for b in range(B):
        row = ids[b].tolist()
        valid = int(cmask[b].sum())
        assert cmask[b, :valid].all() and not cmask[b, valid:].any()  # a prefix of the row
        stopped = EOS in row[:valid]
        assert stopped == (not bool(rollouts.truncated[b]))
        if stopped:
            assert row.index(EOS) == valid - 1  # the mask ends on the <eos>
        else:
            assert valid == T
        assert (rollouts.sampler_logprobs[b, valid:] == 0).all()
    # Group members are adjacent copies of one prompt.
    assert rollouts.prompts == [p for p in ["12+3=", "7=", "123+456="] for _ in range(3)]


def test_eos_stops_a_row():
    # Every token embeds to the same vector c and the blocks write nothing, so the final hidden
    # state is c/rms(c) everywhere; a head that only scores <eos> (row c) makes it the argmax
    # by a margin of 10·d: every row stops after one token.
    model = tiny_model(6)
    with torch.no_grad():
        model.embed_tokens.weight.fill_(1.0)
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 10.0
    rollouts = _rollouts(model)
    assert rollouts.completion_ids.shape[1] == 1
    assert (rollouts.completion_ids[:, 0] == EOS).all() and not rollouts.truncated.any()
    assert rollouts.completion_mask.all()


def test_vocabulary_mismatch_is_refused():
    student, teacher = tiny_model(0), tiny_model(1, vocab_size=TOKENIZER.vocab_size + 1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_same_vocabulary(student, teacher)
    from modman.toy import CharTokenizer
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocabulary(student, tiny_model(1), TOKENIZER,
                              CharTokenizer(TOKENIZER.alphabet[::-1]))
    check_same_vocabulary(student, tiny_model(1), TOKENIZER, CharTokenizer())


def _render_with_prefix(prefix: str):
    """A teacher that reads "<bos>{prefix}{prompt}" then the completion, right-padded."""
    def render(prompts, rollouts: Rollouts):
        rows, starts = [], []
        for b, prompt in enumerate(prompts):
            head = TOKENIZER.encode(prefix + prompt, bos=True)
            starts.append(len(head))
            rows.append(head + rollouts.completion_ids[b].tolist())
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :starts[b]] = 1
            mask[b, starts[b]:len(r)] = rollouts.completion_mask[b, :len(r) - starts[b]].long()
        return ids, mask, torch.tensor(starts)
    return render


def test_teacher_render_aligned_gives_the_same_scores_and_misaligned_is_refused():
    student, teacher = tiny_model(0), tiny_model(1)
    rollouts = _rollouts(student)
    plain = teacher_logprobs(teacher, rollouts)
    same = teacher_logprobs(teacher, rollouts, render=_render_with_prefix(""))
    torch.testing.assert_close(same, plain, atol=2e-5, rtol=0)
    # A real re-rendering (an extra instruction) is accepted and scores different contexts.
    other = teacher_logprobs(teacher, rollouts, render=_render_with_prefix("add "))
    assert not torch.allclose(other, plain, atol=1e-4)

    def off_by_one(prompts, r):
        ids, mask, start = _render_with_prefix("")(prompts, r)
        return ids, mask, start - 1
    with pytest.raises(ValueError, match="misaligns the completion"):
        teacher_logprobs(teacher, rollouts, render=off_by_one)
