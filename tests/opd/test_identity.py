"""The per-prefix identity behind OPD, for a categorical student s = softmax(θ) and teacher t:

    Σ_x s(x)·∇log s(x)·(log t(x) − log s(x)) = −∇KL(s‖t)

(exact, by enumeration over the vocabulary), and the sampled estimator built from the package's
advantages and importance-sampling loss converges to it."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from modman.opd import importance_sampling_loss, teacher_advantages


def _kl(theta, teacher_logp):
    logp = theta.log_softmax(-1)
    return (logp.exp() * (logp - teacher_logp)).sum()


def _exact_estimator_expectation(theta, teacher_logp):
    """Σ_x s(x)·∇_θ[−loss(x)] with the package's detached advantages and IS loss, one token."""
    V = theta.shape[0]
    total = torch.zeros_like(theta)
    s = theta.detach().softmax(-1)
    for x in range(V):
        th = theta.detach().clone().requires_grad_(True)
        lp = th.log_softmax(-1)[x].reshape(1, 1)
        mask = torch.ones(1, 1, dtype=torch.bool)
        adv = teacher_advantages(lp, teacher_logp[x].reshape(1, 1), mask)
        loss = importance_sampling_loss(lp, lp.detach(), adv, mask).sum()
        (grad,) = torch.autograd.grad(-loss, th)
        total += s[x] * grad
    return total


@given(st.integers(2, 7), st.integers(0, 2 ** 31 - 1), st.floats(0.1, 4.0))
def test_expectation_is_minus_grad_kl(V, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    theta = (scale * torch.randn(V, generator=gen, dtype=torch.float64)).requires_grad_(True)
    teacher_logp = (scale * torch.randn(V, generator=gen, dtype=torch.float64)).log_softmax(-1)
    (grad_kl,) = torch.autograd.grad(_kl(theta, teacher_logp), theta)
    expectation = _exact_estimator_expectation(theta, teacher_logp)
    torch.testing.assert_close(expectation, -grad_kl, rtol=1e-10, atol=1e-12)


def test_score_mean_is_zero_so_the_inner_log_s_derivative_vanishes():
    # Σ_x s(x) ∇log s(x) = 0: why the detached advantage loses nothing at a fixed prefix.
    theta = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
    s = theta.detach().softmax(-1)
    total = sum(s[x] * torch.autograd.grad(theta.log_softmax(-1)[x], theta)[0] for x in range(4))
    torch.testing.assert_close(total, torch.zeros(4, dtype=torch.float64), atol=1e-15, rtol=0)


def test_sampled_estimator_converges_to_minus_grad_kl():
    V, N = 5, 40_000
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(V, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher_logp = (2 * torch.randn(V, generator=gen, dtype=torch.float64)).log_softmax(-1)
    (grad_kl,) = torch.autograd.grad(_kl(theta, teacher_logp), theta)

    x = torch.multinomial(theta.detach().softmax(-1), N, replacement=True, generator=gen)
    lp = theta.log_softmax(-1)[x].reshape(N, 1)
    mask = torch.ones(N, 1, dtype=torch.bool)
    adv = teacher_advantages(lp, teacher_logp[x].reshape(N, 1), mask)
    loss = importance_sampling_loss(lp, lp.detach(), adv, mask).mean()
    (estimate,) = torch.autograd.grad(-loss, theta)

    # Exact per-coordinate standard error of the mean, by enumeration of the single-sample
    # estimator g(x) = ∇log s(x)·(log t(x) − log s(x)).
    s = theta.detach().softmax(-1)
    logs = s.log()
    g = torch.stack([((torch.arange(V) == k).double() - s) * (teacher_logp[k] - logs[k])
                     for k in range(V)])
    var = (s[:, None] * g ** 2).sum(0) - (s[:, None] * g).sum(0) ** 2
    stderr = (var / N).sqrt()
    assert torch.all((estimate + grad_kl).abs() <= 5 * stderr + 1e-12), (estimate, -grad_kl)
    # And it is not trivially close: the signal is many standard errors away from zero.
    assert grad_kl.abs().max() > 20 * stderr.max()


def test_undetached_advantage_changes_the_gradient():
    # The pitfall the detach guards against: differentiating through A adds
    # E[∇(log t − log s)] = −E[∇log s] ... per sample −∇log s(x), which is not the policy gradient.
    theta = torch.tensor([0.5, -0.5, 1.5], dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()
    lp = theta.log_softmax(-1)
    adv = teacher_advantages(lp[None], teacher_logp[None], torch.ones(1, 3, dtype=torch.bool))
    assert not adv.requires_grad
    # Per-sample gradients differ with and without the detach (here for token 0).
    with_detach = torch.autograd.grad(lp[0] * adv[0, 0], theta, retain_graph=True)[0]
    without = torch.autograd.grad(lp[0] * (teacher_logp[0] - lp[0]), theta)[0]
    assert not torch.allclose(with_detach, without)
    assert math.isfinite(float(with_detach.sum()))
