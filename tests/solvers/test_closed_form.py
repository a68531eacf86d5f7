"""The closed form A = msign(skew(G Wᵀ))·W (modman/solvers/closed_form.py) against independent
fp64 references: the identity max ⟨G, A⟩ = ‖skew(G Wᵀ)‖_* against the cvxpy SDP, the solver's
value and its dual against numpy SVDs of the full m×m and m×n matrices."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from modman.manifolds import Stiefel
from modman.solvers import solve_manifold_muon

from core.oracle import polar_svd, sdp_bracket, svdvals64
from core.test_subproblem import check_certificate, problems, tall
from solvers.problems import low_rank


def skew_nuclear(W: torch.Tensor, G: torch.Tensor) -> float:
    """‖skew(G Wᵀ)‖_* of a tall pair, by numpy's SVD of the m×m matrix (fp64)."""
    M = 0.5 * (G.double() @ W.double().mT - W.double() @ G.double().mT)
    return float(svdvals64(M).sum())


@pytest.mark.parametrize("shape", [(8, 4), (6, 3), (7, 5), (5, 5), (9, 2), (5, 4), (7, 1)])
@pytest.mark.parametrize("rank", [1, 2, None])
def test_the_identity_against_the_sdp(shape, rank):
    """The optimum of the subproblem (SDP) is ‖skew(G Wᵀ)‖_*, and Ω·W with Ω the exact polar
    factor of skew(G Wᵀ) is feasible and attains it — m < 2n, m ≥ 2n, square, rank-deficient."""
    g = torch.Generator().manual_seed(10 * shape[0] + shape[1] + (rank or 0))
    W = Stiefel().random(shape, generator=g, dtype=torch.float64)
    G = low_rank(shape, rank or shape[1], g)
    G = G / G.norm()
    lo, hi = sdp_bracket(W, G)
    value = skew_nuclear(W, G)
    assert lo - 1e-6 <= value <= hi + 1e-6
    Omega = polar_svd(0.5 * (G @ W.mT - W @ G.mT))
    A = Omega @ W
    H = W.mT @ A
    assert float((H + H.mT).abs().max()) <= 1e-12
    assert float(torch.linalg.matrix_norm(A, 2)) <= 1 + 1e-12
    assert float((G * A).sum()) == pytest.approx(value, rel=1e-10, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(max_dim=12))
def test_value_and_dual_match_the_svd_oracle(prob):
    """Every shape, rank, scale and dtype: the objective is ‖skew(G Wᵀ)‖_* to rounding (the SVD of
    the m×m matrix, fp64), and the returned dual Λ is optimal: ‖Gn − 2WΛ‖_* (numpy SVD) is that
    same value."""
    W, G = prob
    res = solve_manifold_muon(W, G, solver="closed_form")
    obj, gap = check_certificate(W, G, res)
    W64, G64 = tall(W.double()), tall(G.double())
    gn = float(torch.linalg.matrix_norm(G64))
    if gn == 0:
        return
    value = skew_nuclear(W64, G64 / gn)
    tol = 1e-9 if W.dtype == torch.float64 else 2e-5
    assert obj / gn == pytest.approx(value, rel=tol, abs=1e-12)
    lam = res.state["dual"].double()
    D = float(svdvals64(G64 / gn - 2 * W64 @ lam).sum())
    assert D == pytest.approx(value, rel=tol * 10, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(200, 150), (150, 200), (300, 60), (120, 119)])
def test_larger_shapes_at_rounding(shape, dtype):
    """No iteration to stop early: the certified gap is at the precision's rounding on shapes where
    the fixed point needed a continuation (m < 2n) as on the others."""
    g = torch.Generator().manual_seed(shape[0])
    W = Stiefel().random(shape, generator=g, dtype=torch.float64).to(dtype)
    G = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    res = solve_manifold_muon(W, G, solver="closed_form")
    check_certificate(W, G, res)
    assert res.duality_gap.item() <= (1e-10 if dtype == torch.float64 else 1e-5)
    assert res.iterations == 0


def reported_dual_value(res) -> float:
    """D(Λ) as the certificate used it, in units of G."""
    return float(res.dual_value.double())


@pytest.mark.parametrize("kind", ["off_manifold", "square_off_manifold", "rank_deficient"])
def test_dual_value_is_that_of_the_weight_given(kind):
    """D(Λ) is ‖G − 2WΛ‖_* for W as it is (numpy SVD), so weak duality holds for that W even when
    WᵀW ≠ I: off the manifold, and for a rank-deficient W (where the frame's n×n identity once
    certified gap 0 for a direction above the optimum)."""
    g = torch.Generator().manual_seed(3)
    shape = {"off_manifold": (9, 4), "square_off_manifold": (6, 6), "rank_deficient": (7, 3)}[kind]
    n = shape[1]
    W = Stiefel().random(shape, generator=g, dtype=torch.float64)
    if kind == "rank_deficient":
        W = W @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    else:
        W = W @ (torch.eye(n, dtype=torch.float64) + 1e-4 * torch.randn(n, n, generator=g, dtype=torch.float64))
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    res = solve_manifold_muon(W, G, solver="closed_form")
    lam = res.state["dual"]
    D = float(svdvals64(G - 2 * float(G.norm()) * W @ lam).sum())
    assert reported_dual_value(res) == pytest.approx(D, rel=1e-12)
    assert float(torch.linalg.matrix_norm(res.direction, 2)) <= 1 + 1e-12
    if kind != "rank_deficient":
        # the dispatcher's one projection A − W·sym(WᵀA) is exact only for WᵀW = I: it leaves
        # ~‖WᵀW − I‖ of the residual; the gap reflects the distance
        assert float(res.tangent_residual) <= 1e-7 and float(res.duality_gap) <= 1e-3


@pytest.mark.parametrize("shape", [(120, 100), (300, 60), (80, 80)])
def test_graded_spectrum_keeps_its_small_directions(shape):
    """A gradient whose singular values fall from 1 to 1e-12: the polar factor drops only what its
    eigh cannot resolve (below 1e-5 of the largest), so the certified gap stays ≤ 2e-5 (a drop
    threshold of 1e-3 gives ~1e-3 here)."""
    m, n = shape
    g = torch.Generator().manual_seed(m)
    W = Stiefel().random(shape, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    G = (U * torch.logspace(0, -12, n, dtype=torch.float64)) @ V.mT
    res = solve_manifold_muon(W, G, solver="closed_form")
    check_certificate(W, G, res)
    assert float(res.duality_gap) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_get_a_feasible_direction(dtype):
    """Solved in fp32 and rounded to the weight's dtype: still ‖A‖₂ ≤ 1 (the rounding is absorbed
    by the certificate's rescale) and ``direction_norm`` does not under-report it."""
    g = torch.Generator().manual_seed(1)
    for shape in [(40, 30), (64, 16), (30, 30)]:
        W = Stiefel().random(shape, generator=g, dtype=torch.float64).to(dtype)
        G = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        res = solve_manifold_muon(W, G, solver="closed_form")
        norm = float(torch.linalg.matrix_norm(res.direction.double(), 2))
        assert norm <= 1 + 1e-6 and norm <= float(res.direction_norm) + 1e-6
        assert 0 <= float(res.duality_gap) <= 1


def test_batched_equals_per_matrix():
    g = torch.Generator().manual_seed(4)
    for shape in [(3, 9, 4), (2, 5, 5), (2, 7, 5)]:
        W = Stiefel().random(shape, generator=g, dtype=torch.float64)
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        G[0] = 0  # a zero matrix in the batch
        rb = solve_manifold_muon(W, G, solver="closed_form")
        for i in range(shape[0]):
            ri = solve_manifold_muon(W[i], G[i], solver="closed_form")
            torch.testing.assert_close(rb.direction[i], ri.direction, atol=1e-12, rtol=0)
            torch.testing.assert_close(rb.duality_gap[i], ri.duality_gap, atol=1e-15, rtol=1e-6)  # (gaps ~1e-15)


@pytest.mark.parametrize("solver", ["closed_form", "anderson"])
@pytest.mark.parametrize("shape", [(40, 30), (30, 30), (100, 20)])
def test_a_weight_that_requires_grad_is_solved_like_a_plain_tensor(solver, shape):
    """Called directly on an nn.Parameter with grad mode on (outside an optimizer's no_grad), the
    solve runs and returns the direction it returns for the plain tensor (a review found the
    closed form's mm(out=…) raising there)."""
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    W = Stiefel().random(shape, generator=g, dtype=torch.float64)
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    plain = solve_manifold_muon(W, G, solver=solver)
    with torch.enable_grad():
        res = solve_manifold_muon(torch.nn.Parameter(W.clone()), G, solver=solver)
    assert not res.direction.requires_grad and not res.duality_gap.requires_grad  # no graph kept
    torch.testing.assert_close(res.direction, plain.direction, rtol=0, atol=1e-12)
    assert float(res.duality_gap) == pytest.approx(float(plain.duality_gap), rel=1e-6, abs=1e-15)
    assert float(plain.duality_gap) <= 1e-5


@pytest.mark.parametrize("n, k", [(30, 0), (30, 7), (200, 150)])
def test_the_closed_form_dual_is_exactly_symmetric_and_dual_value_symmetrises_any_other(n, k):
    """D(Λ) reads an exactly symmetric fp64 Λ as it is (no n×n copy) and symmetrises any other:
    the weak-duality bound holds for symmetric Λ only, and an asymmetric one read as it is gave
    578.8 against 424.3 (a review's mutant)."""
    from modman.solvers.closed_form import closed_form_core
    from modman.solvers.result import dual_value, sym

    g = torch.Generator().manual_seed(n + k)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    P = torch.randn(k, n, generator=g, dtype=torch.float64)
    lam = closed_form_core(B, P)[2]
    assert torch.equal(lam, lam.mT)
    m = n + max(k, 3)
    W = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    Gn = torch.randn(m, n, generator=g, dtype=torch.float64)
    skewed = lam + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
    assert torch.equal(dual_value(W, Gn, skewed), dual_value(W, Gn, sym(skewed)))
    assert torch.equal(dual_value(W, Gn, skewed.float()), dual_value(W, Gn, sym(skewed.float().double())))
