"""Su's fixed-point iteration: one polar decomposition and one Lyapunov solve per step
[Su Jianlin, "Steepest descent on manifolds (3): Muon + Stiefel", kexue.fm/archives/11221].

Optimality of the subproblem: A = msign(Z) with Z = Gn − 2WΛ, and A tangent. Writing the polar
decomposition Z = A·P, P = (ZᵀZ)^{1/2}, and freezing P, the tangency of A' = (Gn − 2WΛ')P⁻¹
(WᵀA' + A'ᵀW = 0, multiplied by P on both sides) is the Lyapunov equation

    P·Λ' + Λ'·P = ½ (P·B + Bᵀ·P),      B = WᵀGn,

solved exactly in P's eigenbasis (P = V diag(d) Vᵀ, C = VᵀBV):
Λ'_ij = (d_i C_ij + d_j C_ji) / (2(d_i + d_j)); pairs with d_i = d_j = 0 take ½ sym(C)_ij.

One step = the Gram ZᵀZ (n×n), one eigh of it (giving P and A = Z·V·diag(1/d)·Vᵀ with singular
values below 10·√eps·d_max dropped), and the Lyapunov solve (two n×n products). We count each
step as one msign call (an eigh-based polar factor); the benchmark converts it to measured
msign-equivalents by timing.

When it converges: a fixed point is optimal, but convergence is not guaranteed. Measured here:
linear, ~2–3× per step on full-rank random G; stalls near a gap of 1e-2 when G is rank-deficient
or m ≈ n (P singular or nearly so). The certificate reports the stall; the solver returns the
best iterate by an O(n²) gap estimate: with H = WᵀA + AᵀW, ⟨Gn, A⟩ = D(Λ) + ⟨Λ, H⟩, projecting
A costs ½⟨sym B, H⟩ of objective and at most ½‖H‖_F of spectral norm.
"""
from __future__ import annotations

import torch

from .best_iterate import estimated_gap, keep_best
from .result import sym
from .types import SolverOutput


def _polar_eigh(Z):
    """A = msign(Z), its singular values d and right singular vectors V, from eigh(ZᵀZ)."""
    d2, V = torch.linalg.eigh(sym(Z.mT @ Z))
    d = d2.clamp(min=0).sqrt()
    # eigh resolves d² to about eps·d_max², hence d to about √eps·d_max: drop what is below.
    thr = d.amax(-1, keepdim=True) * 10 * torch.finfo(Z.dtype).eps ** 0.5
    keep = d > thr
    inv = torch.where(keep, 1 / torch.where(keep, d, torch.ones_like(d)), torch.zeros_like(d))
    A = Z @ ((V * inv.unsqueeze(-2)) @ V.mT)
    return A, d * keep, V


def solve_lyapunov(W, Gn, *, tol, max_iters, warm_start):
    B = W.mT @ Gn
    if warm_start is not None and "dual" in warm_start:
        dual = warm_start["dual"].to(Gn.dtype)
    else:
        dual = 0.5 * sym(B)
    best = None
    iterations = 0
    for _ in range(max(1, max_iters)):
        A, d, V = _polar_eigh(Gn - 2 * W @ dual)
        iterations += 1
        H = W.mT @ A
        H = H + H.mT
        D = d.sum(-1)
        # per matrix of a batch (by the batch's worst estimate, one matrix's stall chose every
        # other's iterate: a 9×8 problem certified 1.2e-1 batched with a nearly normal partner,
        # 1.2e-2 alone; a probe); ⟨Gn, A⟩ = D + ⟨Λ, H⟩ for the exact polar factor
        best = keep_best(best, estimated_gap(D, D + (dual * H).sum((-2, -1)), sym(B), H), A, dual)
        if bool((best[0] <= tol).all()):
            break
        C = V.mT @ B @ V
        num = d.unsqueeze(-1) * C
        num = num + num.mT
        den = 2 * (d.unsqueeze(-1) + d.unsqueeze(-2))
        lam = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), sym(C))
        dual = sym(V @ lam @ V.mT)
    _, A, dual = best
    return SolverOutput(direction=A, dual=dual, iterations=iterations, msign_calls=iterations, state={"dual": dual})
