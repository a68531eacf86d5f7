"""The exact low-rank reduction (modman/solvers/subspace.py): the compression lemma behind it, the
solutions it gives against the unreduced solve and the SDP oracle, and when it is used."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import modman.solvers.subspace as subspace
from modman.manifolds import Stiefel
from modman.solvers import solve_manifold_muon
from modman.solvers.anderson import CLOSED_FORM_BELOW
from modman.solvers.result import sym

from solvers.problems import low_rank
from core.oracle import sdp_bracket
from core.test_subproblem import check_certificate

BAR = 1e-4


@st.composite
def tall_low_rank(draw, max_n=12):
    n = draw(st.integers(4, max_n))
    m = n + draw(st.integers(1, 2 * n))
    r = draw(st.integers(1, (3 * n) // 8))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return Stiefel().random((m, n), generator=g, dtype=torch.float64), low_rank((m, n), r, g), r, g


@settings(max_examples=30, deadline=None)
@given(tall_low_rank())
def test_compression_keeps_feasibility_and_objective(prob):
    """For any feasible A = W K + X, compressing to (ΠKΠ, XΠ) stays feasible with the same ⟨G, A⟩."""
    W, G, r, g = prob
    m, n = W.shape
    K = torch.randn(n, n, generator=g, dtype=torch.float64)
    K = K - K.mT
    X = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = X - W @ (W.mT @ X)
    A = W @ K + X
    A = A / torch.linalg.matrix_norm(A, ord=2)
    B = W.mT @ G
    Gp = G - W @ B
    P = B @ B.mT + B.mT @ B + Gp.mT @ Gp
    lam, V = torch.linalg.eigh(sym(P))
    U = V[:, lam > 1e-10 * lam[-1]]
    assert U.shape[1] <= 2 * r
    Pi = U @ U.mT
    Kc = Pi @ (W.mT @ A) @ Pi
    Ac = W @ Kc + (A - W @ (W.mT @ A)) @ Pi
    torch.testing.assert_close(Kc, -Kc.mT, atol=1e-12, rtol=0)
    assert torch.linalg.matrix_norm(Ac, ord=2) <= 1 + 1e-12
    torch.testing.assert_close((G * Ac).sum(), (G * A).sum(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("solver", ["anderson", "newton"])
@settings(max_examples=12, deadline=None)
@given(tall_low_rank(max_n=24), st.sampled_from([torch.float64, torch.float32]), st.booleans())
def test_reduced_solve_matches_the_full_one(solver, prob, dtype, wide):
    """Used for rank r ≤ 3n/8 (k ≤ 2r ≤ 3n/4), certified by independent fp64 SVDs, and worth what the
    unreduced solve is worth (both objectives within their certified gaps of each other)."""
    W, G, r, _ = prob
    W, G = W.to(dtype), G.to(dtype)
    if wide:
        W, G = W.mT, G.mT
    n = min(W.shape)
    assume(solver != "anderson" or max(W.shape) >= CLOSED_FORM_BELOW * n)  # below, anderson is the closed form
    res = solve_manifold_muon(W, G, solver=solver)
    assert 1 <= float(res.state["subspace"]) <= 2 * r < n
    _, gap = check_certificate(W, G, res)
    assert gap <= BAR
    saved = subspace.MAX_FRACTION
    subspace.MAX_FRACTION = 0.0  # no reduction
    try:
        full = solve_manifold_muon(W, G, solver=solver)
    finally:
        subspace.MAX_FRACTION = saved
    assert float(full.state["subspace"]) == n
    d_res = res.objective / (1 - res.duality_gap)
    d_full = full.objective / (1 - full.duality_gap)
    assert float(torch.maximum(res.objective, full.objective)) <= float(torch.minimum(d_res, d_full)) * (1 + 1e-9)


@pytest.mark.parametrize("solver", ["anderson", "newton"])
@pytest.mark.parametrize("in_span", [False, True])
@pytest.mark.parametrize("shape,rank", [((9, 4), 1), ((12, 8), 2), ((10, 8), 1)])
def test_reduced_solve_against_the_sdp_oracle(shape, rank, in_span, solver):
    """in_span: G = W·M with M of low rank, so G⊥ = 0 and N = 0; S is then col(M) + row(M), which
    only BBᵀ + BᵀB reveal."""
    g = torch.Generator().manual_seed(7 * shape[0] + rank)
    W = Stiefel().random(shape, generator=g, dtype=torch.float64)
    G = W @ low_rank((shape[1], shape[1]), rank, g) if in_span else low_rank(shape, rank, g)
    res = solve_manifold_muon(W, G, solver=solver)
    if solver == "newton" or shape[0] >= CLOSED_FORM_BELOW * shape[1]:  # below, anderson is the closed form
        assert float(res.state["subspace"]) <= 2 * rank
    check_certificate(W, G, res)
    gn = G.norm().item()
    lo, hi = sdp_bracket(W, G / gn)
    assert abs(res.objective.item() / gn - lo) <= BAR * hi + 1e-6


def test_full_rank_gradient_is_solved_unreduced_and_not_tested_again(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = Stiefel().random((40, 16), generator=g, dtype=torch.float64)
    G = torch.randn(40, 16, generator=g, dtype=torch.float64)
    calls = []
    real = subspace.subspace_basis
    monkeypatch.setattr(subspace, "subspace_basis", lambda *a: calls.append(1) or real(*a))
    first = solve_manifold_muon(W, G)
    assert calls == [1] and float(first.state["subspace"]) == 16
    solve_manifold_muon(W, G * 1.01, warm_start=first.state)
    assert calls == [1]  # a full subspace stays full: the warm state skips the test
    low = low_rank((40, 16), 2, g)
    second = solve_manifold_muon(W, low)
    assert calls == [1, 1] and float(second.state["subspace"]) <= 4


def test_rounding_outside_the_subspace_stays_in_the_certificate():
    """An fp32 low-rank gradient is low-rank only to its rounding: the reduction is used, and the
    dual value it reports, objective/(1 − gap), is a true upper bound of the full problem's
    optimum (the SDP oracle's bracket), within the bar of it."""
    g = torch.Generator().manual_seed(3)
    W = Stiefel().random((30, 12), generator=g, dtype=torch.float64).float()
    G = low_rank((30, 12), 2, g).float()
    res = solve_manifold_muon(W, G)
    assert float(res.state["subspace"]) <= 4
    check_certificate(W, G, res)
    G64 = G.double()
    lo, hi = sdp_bracket(W.double(), G64 / G64.norm())
    objective = float(res.objective) / float(G64.norm())
    D = objective / (1 - float(res.duality_gap))
    assert D >= lo * (1 - 1e-6)  # an upper bound of the optimum
    assert objective <= hi * (1 + 1e-6) and (D - objective) / D <= BAR
