"""Square W (m = n): the subproblem has a closed form, zero iterations.

With W orthogonal every A is W·K for some K, tangency means K skew, and ⟨G, WK⟩ = ⟨WᵀG, K⟩ =
⟨skew(WᵀG), K⟩. Hence A = W·msign(skew(WᵀG)) with value ‖skew(WᵀG)‖_*, and Λ = ½ sym(WᵀG)
attains it: Gn − 2WΛ = W skew(WᵀGn). For odd n, skew(WᵀG) is singular; msign leaves that
direction at zero. One msign call.
"""
from __future__ import annotations

from ..linalg import msign
from .result import sym
from .types import SolverOutput


def solve_closed_form(W, Gn, *, tol, max_iters, warm_start, schedule="polar_express", msign_dtype=None):
    if W.shape[-2] != W.shape[-1]:
        raise ValueError(f"solver='closed_form' needs a square W, got shape {tuple(W.shape)}")
    M = W.mT @ Gn
    skew = 0.5 * (M - M.mT)
    A = W @ msign(skew, schedule=schedule, compute_dtype=msign_dtype)
    dual = 0.5 * sym(M)
    return SolverOutput(direction=A, dual=dual, iterations=0, msign_calls=1, state={"dual": dual})
