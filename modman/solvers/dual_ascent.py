"""The published manifold-Muon solver: subgradient descent on the dual [Bernstein 2025].

Dual: minimise over symmetric Λ  D(Λ) = ‖Gn − 2WΛ‖_*;  A(Λ) = msign(Gn − 2WΛ) and
∂D/∂Λ = −H with H = WᵀA + AᵀW, so each iteration is one msign and the step Λ ← Λ + α_k·H with
α_k = α(1 − k/K). Start Λ₀ = ½ sym(WᵀGn) (where Gn − 2WΛ₀ = P(Gn)), or the warm start. Stop
when ‖H‖_F/n < tol. One msign per iteration; subgradient descent converges slowly (measured:
residual 1e-2…3e-1 after 100 iterations, MATH.md §3) and is not monotone: the step α is sized for
a gradient mostly tangent, and one mostly normal to the manifold is thrown past the optimum. So
the default returns the best iterate (A_k with the Λ_k that made it, ``best_iterate.py``; the
last one, with Λ_{k+1}, had certified 0.80 where the first iterate, the projected baseline,
certifies 0.02: a probe), and warm-starts the next step from that Λ_k.

The reference code (thinking-machines-lab/manifolds) stores Λ_code = −Λ and writes
G + 2WΛ_code, Λ_code −= α_k H: the same algorithm. It iterates on the raw gradient G (so α is
not scale-free) with a bf16 Polar Express msign of 10 steps normalised by 1.01·‖X‖_F.
``faithful=True`` reproduces exactly that; the default normalises G first and computes msign
in the input's precision.
"""
from __future__ import annotations

import torch

from ..linalg import msign
from ..linalg.schedules import coefficients
from .best_iterate import estimated_gap, keep_best
from .result import sym
from .types import SolverOutput


def solve_dual_ascent(
    W, Gn, *, tol, max_iters, warm_start, alpha=0.01, faithful=False, G_raw=None, schedule="polar_express",
    msign_dtype=None,
):
    n = W.shape[-1]
    if faithful:
        # Iterate in the reference's units: raw G, bf16 msign, Frobenius normalisation.
        G, g_scale = G_raw, torch.linalg.matrix_norm(G_raw, keepdim=True)
        sign = _reference_msign
    else:
        G, g_scale = Gn, None
        sign = lambda Z: msign(Z, schedule=schedule, compute_dtype=msign_dtype)  # noqa: E731
    if warm_start is not None and "dual" in warm_start:
        dual = warm_start["dual"].to(G.dtype).clone()
        if g_scale is not None:
            dual = dual * g_scale
    else:
        # the reference's ¼(WᵀG + GᵀW), operation for operation (Λ = −Λ_code)
        dual = 0.25 * (W.mT @ G + G.mT @ W) if faithful else 0.5 * sym(W.mT @ G)
    iterations, best = 0, None
    A = torch.zeros_like(G)
    sym_b = None if faithful else sym(W.mT @ G)
    for k in range(max_iters):
        Z = G - 2 * W @ dual
        A = sign(Z)
        iterations += 1
        H = W.mT @ A + A.mT @ W
        if not faithful:  # (the reference returns its last iterate)
            best = keep_best(best, estimated_gap((Z * A).sum((-2, -1)), (G * A).sum((-2, -1)), sym_b, H), A, dual)
        if bool((torch.linalg.matrix_norm(H) / n < tol).all()):
            break
        dual = dual + alpha * (1 - k / max_iters) * H
    if best is not None:
        _, A, dual = best
    if g_scale is not None:
        dual = dual / g_scale.clamp(min=1e-30)
    return SolverOutput(direction=A, dual=dual, iterations=iterations, msign_calls=iterations, state={"dual": dual})


def _reference_msign(G: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """msign as the reference code evaluates it, for ``faithful=True`` only: bf16 throughout,
    X/(1.01·‖X‖_F), Polar Express tuples, Horner order X ← ((c·S + bI)·S + aI)·X, NaN → 0."""
    transpose = G.shape[-2] > G.shape[-1]
    x = G.bfloat16()
    if transpose:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01)
    for a, b, c in coefficients("polar_express", steps):
        s = x @ x.mT
        y = c * s
        y.diagonal(dim1=-2, dim2=-1).add_(b)
        y = y @ s
        y.diagonal(dim1=-2, dim2=-1).add_(a)
        x = y @ x
    if transpose:
        x = x.mT
    return torch.nan_to_num(x).to(G.dtype)  # (.float() made an fp64 solve fail on mixed dtypes)
