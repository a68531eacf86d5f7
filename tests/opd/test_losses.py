"""The policy-gradient losses: ratio 1 with gradient A·∇log π at sampler == learner, PPO clipping,
and no gradient through the prompt or padding."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from modman.opd import (completion_logprobs, group_centred_advantages, importance_sampling_loss,
                        ppo_clip_loss, sample_rollouts, sft_loss, teacher_advantages)

from .helpers import TOKENIZER, left_padded_prompts, tiny_model


@given(st.integers(0, 2 ** 31 - 1), st.integers(1, 4), st.integers(1, 6))
def test_ratio_is_one_with_gradient_a_grad_logpi(seed, B, T):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, T, dtype=torch.float64, generator=gen, requires_grad=True)
    adv = torch.randn(B, T, dtype=torch.float64, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7
    for loss_fn in (importance_sampling_loss, ppo_clip_loss):
        lp = torch.nn.functional.logsigmoid(theta)  # any differentiable log-prob
        loss = loss_fn(lp, lp.detach(), adv, mask)
        expected_value = -(adv * mask).sum(-1)  # ρ = 1 exactly
        torch.testing.assert_close(loss.detach(), expected_value, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
        (expected,) = torch.autograd.grad(-(adv * mask * lp).sum(), theta)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_ppo_clips_the_ratio():
    lp = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^{0.5}, e^{-0.5}
    sampler = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = ppo_clip_loss(lp, sampler, adv, mask, clip_eps=0.2)
    # Both tokens moved beyond the clip in their advantage's direction: value clipped, no grad.
    torch.testing.assert_close(loss, torch.tensor([-(1.2 * 1.0) - (0.8 * -1.0)]))
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_prompt_and_padding_get_no_gradient():
    model = tiny_model(0)
    prompts = ["12+3=", "7="]
    ids, mask = left_padded_prompts([TOKENIZER.encode(p, bos=True) for p in prompts])
    rollouts = sample_rollouts(model, ids, mask, prompts, group_size=4, max_new_tokens=8,
                               eos_token_id=TOKENIZER.eos_token_id,
                               generator=torch.Generator().manual_seed(1))
    cmask = rollouts.completion_mask
    assert not cmask.all(), "the test needs rows that stopped early"
    grads = {}

    def capture(module, inputs, output):
        output.retain_grad()
        grads["logits"] = output
    handle = model.lm_head.register_forward_hook(capture)
    lp = completion_logprobs(model, rollouts)
    handle.remove()
    # Huge advantages on the masked positions must change nothing.
    adv = torch.where(cmask, torch.randn(cmask.shape), torch.full(cmask.shape, 1e30))
    for loss in (importance_sampling_loss(lp, rollouts.sampler_logprobs, adv, cmask),
                 sft_loss(lp, cmask)):
        grads["logits"].grad = None
        loss.sum().backward(retain_graph=True)
        g = grads["logits"].grad.abs().sum(-1)  # (B, L): gradient reaching each column's logits
        Lp = rollouts.prompt_length
        # Columns that predict a prompt token, or predict a masked completion position.
        predicts_completion = torch.zeros_like(g, dtype=torch.bool)
        predicts_completion[:, Lp - 1:Lp - 1 + cmask.shape[1]] = cmask
        assert torch.isfinite(g).all()
        assert (g[~predicts_completion] == 0).all()
        assert (g[predicts_completion] > 0).all()


def test_group_centred_advantages_and_returns():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[True, True, False]] * 6)
    adv = group_centred_advantages(rewards, 3, mask)
    assert torch.allclose(adv[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    assert (adv[:, 2] == 0).all()
    # Discounted returns of the teacher reward, by hand: r = [1, 2, 3] (masked 4th), γ = 0.5.
    s = torch.tensor([[-1.0, -2.0, -3.0, -9.0]])
    t = torch.zeros(1, 4)
    m = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(teacher_advantages(s, t, m, discount=0.5),
                               torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0]]))
    torch.testing.assert_close(teacher_advantages(s, t, m, kl_coef=2.0),
                               torch.tensor([[2.0, 4.0, 6.0, 0.0]]))
