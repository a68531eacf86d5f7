"""ADMM with spectral clipping for the manifold-Muon subproblem [after S. Buchanan, MATH.md §3].

Solves  maximise ⟨Gn, A⟩  s.t.  A ∈ T = {A : WᵀA + AᵀW = 0},  ‖A‖₂ ≤ 1  by splitting A = Ω,
A in the tangent space and Ω in the spectral unit ball, with the scaled multiplier U:

    A ← P_T(Ω − U + Gn/ρ)          P_T(X) = X − W sym(WᵀX)        (two products)
    Ω ← clip(A + U)                 singular values min(σ, 1)         (two msign calls)
    U ← U + A − Ω

Spectral clipping from msign only: with O = msign(Y) and O₂ = msign(Y − O),
U·min(Σ, 1)·Vᵀ = ½(Y + O − O₂·Oᵀ·(Y − O)), since O₂Oᵀ(Y − O) = U|Σ − I|Vᵀ.

Dual certificate: at a fixed point Gn − ρU lies in the normal cone of T, i.e. Gn − ρU = 2WΛ with
Λ symmetric, so Λ = ½ sym(Wᵀ(Gn − ρU)) is returned (and certified by the dispatcher).
Warm start: from ``state["dual"]`` (Λ) we set ρU₀ = Gn − 2WΛ and Ω₀ = A₀ = the tangent part of
msign(Gn − 2WΛ) — the optimum when Λ is optimal. ``state`` holds only Λ (n×n).

Cost per iteration: two msign calls plus four m×n×n products. Convergence: ADMM converges for
every ρ > 0 (convex problem, Boyd et al. 2011 §3.2) at an O(1/k) rate; MATH.md measured 60–110
iterations to 1e-8 at a good ρ. Gn has ‖Gn‖_F = 1, so its singular values are ~1/√n; ρ is set
relative to that scale (ρ = rho·‖P(Gn)‖₂). Stops when the primal and dual residuals
‖A − Ω‖_F and ρ‖ΔΩ‖_F fall below tol·√n (the standard ADMM criterion), checked every iteration.
"""
from __future__ import annotations

import torch

from ..linalg import msign
from .result import spectral_norm, sym
from .types import SolverOutput


def spectral_clip(Y: torch.Tensor, sign) -> torch.Tensor:
    """U·min(Σ, 1)·Vᵀ for Y = UΣVᵀ, using two calls of ``sign`` (an msign)."""
    O = sign(Y)
    E = Y - O
    return 0.5 * (Y + O - sign(E) @ (O.mT @ E))


def solve_admm(W, Gn, *, tol, max_iters, warm_start, rho=1.0, schedule="polar_express", msign_dtype=None):
    sign = lambda Z: msign(Z, schedule=schedule, compute_dtype=msign_dtype)  # noqa: E731
    tangent = lambda X: X - W @ sym(W.mT @ X)  # noqa: E731
    if warm_start is not None and "dual" in warm_start:
        dual = warm_start["dual"].to(Gn.dtype)
    else:
        dual = 0.5 * sym(W.mT @ Gn)
    Z = Gn - 2 * W @ dual
    # ρ in units of the problem: the spectral scale of the projected gradient (1 if G = 0).
    scale = spectral_norm(tangent(Gn)).clamp(min=torch.finfo(Gn.dtype).tiny)[..., None, None]
    rho_t = rho * scale
    U = Z / rho_t
    Omega = spectral_clip(tangent(sign(Z)), sign)
    calls = 3
    n = W.shape[-1]
    iterations = 0
    for _ in range(max_iters):
        A = tangent(Omega - U + Gn / rho_t)
        Omega_old = Omega
        Omega = spectral_clip(A + U, sign)
        U = U + A - Omega
        calls += 2
        iterations += 1
        primal = torch.linalg.matrix_norm(A - Omega) / n**0.5
        dual_res = (rho_t[..., 0, 0] * torch.linalg.matrix_norm(Omega - Omega_old)) / n**0.5
        if bool(((primal <= tol * scale[..., 0, 0]) & (dual_res <= tol * scale[..., 0, 0])).all()):
            break
    dual = 0.5 * sym(W.mT @ (Gn - rho_t * U))
    return SolverOutput(direction=Omega, dual=dual, iterations=iterations, msign_calls=calls, state={"dual": dual})
