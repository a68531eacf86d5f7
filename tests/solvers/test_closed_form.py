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


def test_weight_off_the_manifold_is_certified_for_the_weight_given():
    """The dual value is computed for W as it is (WᵀW ≠ I): it stays an upper bound of the optimum
    of that W's own problem (above what newton, certified on the same W, reaches), and the gap
    reflects the distance."""
    g = torch.Generator().manual_seed(3)
    W = Stiefel().random((9, 4), generator=g, dtype=torch.float64)
    W = W @ (torch.eye(4, dtype=torch.float64) + 1e-4 * torch.randn(4, 4, generator=g, dtype=torch.float64))
    G = torch.randn(9, 4, generator=g, dtype=torch.float64)
    res = solve_manifold_muon(W, G, solver="closed_form")
    A = res.direction
    H = W.mT @ A
    # the dispatcher's one projection A − W·sym(WᵀA) is exact only for WᵀW = I: it leaves ~‖WᵀW − I‖
    # of the residual (1e-4 of 3.6e-4 here)
    assert float(torch.linalg.matrix_norm(H + H.mT) / torch.linalg.matrix_norm(A)) <= 1e-7
    assert float(torch.linalg.matrix_norm(A, 2)) <= 1 + 1e-12
    D = float(res.objective) / (1 - float(res.duality_gap))
    other = solve_manifold_muon(W, G, solver="newton", tol=1e-9)
    assert D >= float(other.objective) * (1 - 1e-12)
    assert float(res.duality_gap) <= 1e-3
