"""The cheap baseline: one msign of the tangent-projected gradient.

A = msign(P(Gn)), P(G) = G − W sym(WᵀG). The dual Λ₀ = ½ sym(WᵀGn) certifies it: then
Gn − 2WΛ₀ = P(Gn), so D(Λ₀) = ‖P(Gn)‖_*. msign(P(Gn)) is in general not tangent; the certificate
step projects and rescales it, and the gap says how much that cost. One msign call.
"""
from __future__ import annotations

from ..linalg import msign
from .result import sym
from .types import SolverOutput


def solve_projected(W, Gn, *, tol, max_iters, warm_start, schedule="polar_express", msign_dtype=None):
    dual = 0.5 * sym(W.mT @ Gn)
    A = msign(Gn - 2 * W @ dual, schedule=schedule, compute_dtype=msign_dtype)
    return SolverOutput(direction=A, dual=dual, iterations=1, msign_calls=1, state={"dual": dual})
