"""Sequence level, by exact enumeration (vocabulary 3, length 3, tabular autoregressive models):

- the discount-1 estimator's expectation equals −∇KL(S‖T) for the sequence distributions;
- the discount-0 estimator's expectation is −Σ_t E_{y<t~S}[∇KL(s(·|y<t) ‖ t(·|y<t))] with the
  prefix distribution held fixed, which differs from −∇KL(S‖T) in general: the bias is the
  ignored effect of token t on the KLs of later positions (advantages.py).
"""
import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from modman.opd import importance_sampling_loss, teacher_advantages

V, L = 3, 3
SEQUENCES = list(itertools.product(range(V), repeat=L))
PREFIXES = [p for n in range(L) for p in itertools.product(range(V), repeat=n)]
INDEX = {p: i for i, p in enumerate(PREFIXES)}  # 1 + 3 + 9 = 13 prefixes
_PREFIX_ROWS = torch.tensor([[INDEX[seq[:t]] for t in range(L)] for seq in SEQUENCES])
_TOKENS = torch.tensor(SEQUENCES)


def _all_token_logprobs(table):
    """(27, L) log π(y_t | y_<t) of every sequence, by indexing the log-softmaxed table."""
    return table.log_softmax(-1)[_PREFIX_ROWS, _TOKENS]


def _token_logprobs(table, seq):
    """(L,) log π(y_t | y_<t) for a logits table of shape (13, V)."""
    logp = table.log_softmax(-1)
    return torch.stack([logp[INDEX[seq[:t]], seq[t]] for t in range(L)])


def _models(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64))
    teacher = (scale * torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64))
    return student.requires_grad_(True), teacher


def _sequence_kl(student, teacher):
    ls, lt = _all_token_logprobs(student).sum(1), _all_token_logprobs(teacher).sum(1)
    return (ls.exp() * (ls - lt)).sum()


def _estimator_expectation(student, teacher, discount):
    """Σ_y S(y)·∇[−loss(y)] with the package's advantages (this discount) and IS loss."""
    # All 27 sequences as one batch; the weights S(y) are constants of the expectation.
    lp, lt = _all_token_logprobs(student), _all_token_logprobs(teacher)
    mask = torch.ones(len(SEQUENCES), L, dtype=torch.bool)
    adv = teacher_advantages(lp, lt, mask, discount=discount)
    per_sequence = importance_sampling_loss(lp, lp.detach(), adv, mask)
    weights = lp.detach().sum(1).exp()
    return torch.autograd.grad(-(weights * per_sequence).sum(), student)[0]


def _myopic_gradient(student, teacher):
    """−Σ_t E_{y<t~S}[∇KL_t] with the prefix probabilities held fixed (the γ = 0 target)."""
    total = 0
    ls_all, lt_all = student.log_softmax(-1), teacher.log_softmax(-1)
    for prefix in PREFIXES:
        weight = _token_logprobs(student, prefix + (0,) * (L - len(prefix)))[:len(prefix)]
        weight = weight.detach().sum().exp()
        ls, lt = ls_all[INDEX[prefix]], lt_all[INDEX[prefix]]
        total = total + weight * (ls.exp() * (ls - lt)).sum()
    return -torch.autograd.grad(total, student)[0]


@given(st.integers(0, 2 ** 31 - 1), st.floats(0.3, 3.0))
def test_discount_one_is_the_sequence_kl_gradient(seed, scale):
    student, teacher = _models(seed, scale)
    (grad_kl,) = torch.autograd.grad(_sequence_kl(student, teacher), student)
    expectation = _estimator_expectation(student, teacher, discount=1.0)
    torch.testing.assert_close(expectation, -grad_kl, rtol=1e-9, atol=1e-12)


@given(st.integers(0, 2 ** 31 - 1), st.floats(0.3, 3.0))
def test_discount_zero_is_the_myopic_per_prefix_gradient(seed, scale):
    student, teacher = _models(seed, scale)
    expectation = _estimator_expectation(student, teacher, discount=0.0)
    torch.testing.assert_close(expectation, _myopic_gradient(student, teacher),
                               rtol=1e-9, atol=1e-12)


def test_discount_zero_is_biased_for_the_sequence_kl():
    student, teacher = _models(seed=1, scale=1.5)
    (grad_kl,) = torch.autograd.grad(_sequence_kl(student, teacher), student)
    biased = _estimator_expectation(student, teacher, discount=0.0)
    gap = (biased + grad_kl).norm() / grad_kl.norm()
    assert gap > 0.05, gap
    # The bias sits only in tables whose token influences later KLs: the last position's
    # logits (prefixes of length L−1) get the exact gradient.
    last = [INDEX[p] for p in PREFIXES if len(p) == L - 1]
    torch.testing.assert_close(biased[last], -grad_kl[last], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(biased[INDEX[()]], -grad_kl[INDEX[()]], atol=1e-6)
