"""result.lambda_max_at_most and gram_lambda_max_bound: Cholesky-proven upper bounds of λ_max,
checked against eigvalsh."""
import numpy as np
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.solvers.result import gram_lambda_max_bound, lambda_max_at_most


@st.composite
def symmetric_with_top(draw):
    """A symmetric n×n fp64 H with chosen eigenvalues (a cluster at the top, as the Grams of
    solver directions have) and a shift τ placed relative to λ_max."""
    n = draw(st.integers(1, 60))
    g = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    cluster = draw(st.integers(1, n))
    lam = np.concatenate([top * (1 - g.uniform(0, 1e-7, cluster)), top * g.uniform(-1, 1, n - cluster)])
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    rel = draw(st.sampled_from([-1e-3, -1e-9, 0.0, 1e-9, 1e-6, 1e-2]))
    return torch.from_numpy(H), top * (1 + rel)


@settings(max_examples=200, deadline=None)
@given(symmetric_with_top())
def test_bound_is_an_upper_bound_and_found_when_clear(case):
    H, tau = case
    lmax = float(scipy.linalg.eigvalsh(H.numpy())[-1])  # an independent LAPACK (numpy's OpenBLAS)
    slack = 1e-13 * max(abs(lmax), 1.0) * H.shape[-1]  # the oracle's own rounding
    bound = lambda_max_at_most(H, tau)
    if bound is not None:
        assert bound >= lmax - slack
        assert bound <= tau * (1 + 1e-9) + 1e-300  # the rounding margin stays small
    # a clear margin either way decides the answer
    if tau > lmax + 1e-6 * abs(tau):
        assert bound is not None
    if tau < lmax - 1e-6 * abs(lmax):
        assert bound is None


def test_singular_shift_never_claims_less_than_lambda_max():
    """τ = λ_max exactly (τI − H singular): either no bound or one at least λ_max."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 64, 200):
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        Q = torch.linalg.qr(A)[0]
        lam = torch.linspace(-1, 1, n, dtype=torch.float64)
        lam[-1] = 1.0
        H = (Q * lam) @ Q.mT
        H = (H + H.mT) / 2
        bound = lambda_max_at_most(H, 1.0)
        assert bound is None or bound >= float(torch.linalg.eigvalsh(H)[-1])


@st.composite
def direction_grams(draw):
    """Batched Grams AᵀA of directions a solver could return: fp32 partial isometries (rank r,
    rounded to fp32), as certify_gram hands them over (scaled by 1/(1 + √n·eps)) or scaled short
    or long by s, as fp64 (…, n, n)."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    m = n + draw(st.integers(0, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    delta = n**0.5 * torch.finfo(torch.float32).eps
    grams = []
    for _ in range(b):
        r = draw(st.integers(1, n))
        U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
        s = draw(st.sampled_from([1 / (1 + delta), 1 / (1 + delta), 1.0, 1 + 1e-7, 1 - 1e-4, 0.5, 1.5, 0.0]))
        A = (s * U @ V.mT).float().double()
        grams.append(A.mT @ A)
    return torch.stack(grams)


@settings(max_examples=150, deadline=None)
@given(direction_grams())
def test_gram_bound_is_an_upper_bound_and_tight(gram):
    """Every Gram: the bound is at least λ_max (scipy's eigvalsh, the oracle) and overstates it by
    at most 10·√n·eps₃₂ (a direction of length ≈ 1 reported at 1) — so a short direction (0.5, or
    1 − 1e-4) is reported at its own length. Isometries scaled as certify_gram scales them need no
    eigvalsh; an fp64 eps (rounding term e ≫ √n·eps₆₄) always takes the eigvalsh."""
    n = gram.shape[-1]
    eps = torch.finfo(torch.float32).eps
    bound, measured = gram_lambda_max_bound(gram.clone(), eps)
    lmax = torch.tensor([scipy.linalg.eigvalsh(g.numpy())[-1] for g in gram], dtype=torch.float64)
    slack = 1e-13 * n * lmax.clamp(min=1.0)
    assert (bound >= lmax - slack).all()
    assert (bound <= lmax + 10 * n**0.5 * eps + slack).all()
    delta = n**0.5 * eps
    scaled_isometry = (lmax <= 1 - delta) & (lmax >= 1 - 3 * delta)
    assert measured <= int((~scaled_isometry).sum())
    exact, m64 = gram_lambda_max_bound(gram.clone(), torch.finfo(torch.float64).eps)
    assert m64 == gram.shape[0] and (exact >= lmax - slack).all() and (exact <= lmax + slack).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3), st.integers(1, 60), st.sampled_from(["noise", "rank1", "neg_rank1", "zero"]),
       st.integers(0, 2**31 - 1))
def test_symmetric_norm_bound_is_an_upper_bound_and_tight_on_noise(b, n, kind, seed):
    """The certified value divides by 1 + a bound of ‖sym(WᵀA)‖₂: never below the spectral norm
    (scipy's eigvalsh), never above the Frobenius norm, and within 4× of it on rounding noise
    (the Frobenius norm alone is √n/2 times it there)."""
    from modman.solvers.result import _symmetric_norm_bound

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, n, n, generator=g, dtype=torch.float64) * 1e-7
    if kind in ("rank1", "neg_rank1"):  # (a bound of λ_max alone passed rank1: a mutation audit)
        v = torch.randn(b, n, 1, generator=g, dtype=torch.float64)
        X = v @ v.mT if kind == "rank1" else -(v @ v.mT)
    elif kind == "zero":
        X = torch.zeros(b, n, n, dtype=torch.float64)
    S = (X + X.mT) / 2
    bound = _symmetric_norm_bound(S)
    spectral = torch.tensor([float(np.abs(scipy.linalg.eigvalsh(s.numpy())).max()) for s in S], dtype=torch.float64)
    fro = torch.linalg.matrix_norm(S)
    assert (bound >= spectral * (1 - 1e-12)).all() and (bound <= fro * (1 + 1e-12) + 1e-300).all()
    if kind == "noise" and n >= 16:
        assert (bound <= 4 * spectral).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(0, 8), st.sampled_from([1e-3, 1.0, 1e3]), st.integers(0, 2**31 - 1))
def test_make_feasible_projects_and_rescales_into_the_unit_ball(n, extra, scale, seed):
    """make_feasible (public): tangent at W, ‖·‖₂ ≤ 1, and the projection itself when that is
    already in the ball (an unrescaled result passed every other test: a mutation audit)."""
    from modman.solvers import make_feasible

    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(n + extra, n, generator=g, dtype=torch.float64)).Q
    A = scale * torch.randn(n + extra, n, generator=g, dtype=torch.float64)
    out = make_feasible(W, A)
    assert float(torch.linalg.matrix_norm(W.mT @ out + out.mT @ W)) <= 1e-12 * max(1.0, float(A.norm()))
    assert float(torch.linalg.matrix_norm(out, 2)) <= 1 + 1e-12
    P = A - W @ ((W.mT @ A + A.mT @ W) / 2)
    if float(torch.linalg.matrix_norm(P, 2)) <= 1:
        torch.testing.assert_close(out, P, rtol=1e-12, atol=1e-15)
    else:
        torch.testing.assert_close(out, P / torch.linalg.matrix_norm(P, 2), rtol=1e-9, atol=1e-15)
