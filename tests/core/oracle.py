"""Independent fp64 references for the core tests (no modman code is used here).

- ``polar_svd``: the exact polar factor U Vᵀ from numpy's SVD in fp64 (rank-aware).
- ``feasible_value``: ⟨G, A⟩ of a direction made exactly feasible at a W off the manifold.
- ``sdp_bracket``: the manifold-Muon subproblem solved as an SDP with cvxpy/Clarabel,
      maximise ⟨G, A⟩  s.t.  [[I, A], [Aᵀ, I]] ⪰ 0  (‖A‖₂ ≤ 1)  and  WᵀA + AᵀW = 0,
  for a tall W (on the manifold or not); returns an fp64-certified bracket of the optimal value; the maximiser is not unique
  when G is rank-deficient, so tests compare values and feasibility, never directions.
- ``reference_msign_bf16``: the published reference msign (bf16, Frobenius normalisation with
  the 1.01 safety factor, 10 Polar Express steps), written from its formula
  x ← (aI + (bI + cS)S)x, S = xxᵀ, in the reference's order of operations.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Polar Express tuples for l = 1e-3 (arXiv:2505.16932), written out independently of
# modman.linalg.schedules; the safety factor 1.01 divides (a, b, c) by (1.01, 1.01³, 1.01⁵) for
# all but the last tuple.
_PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
PE_SAFE = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]] + [_PE_RAW[-1]]


def polar_svd(X: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Exact polar factor of each matrix of X in fp64 via numpy; σ ≤ rtol·σ_max maps to 0."""
    x = X.detach().to(torch.float64).cpu().numpy()
    U, s, Vh = np.linalg.svd(x, full_matrices=False)
    if rtol is None:
        rtol = max(x.shape[-2:]) * np.finfo(np.float64).eps
    keep = s > rtol * s.max(axis=-1, keepdims=True)
    return torch.from_numpy((U * keep[..., None, :]) @ Vh)


def svdvals64(X: torch.Tensor) -> np.ndarray:
    """Singular values in fp64, descending (LAPACK through torch)."""
    return torch.linalg.svdvals(X.detach().to(torch.float64)).cpu().numpy()


def feasible_value(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> float:
    """⟨G, A_f⟩ ≤ p* for A made exactly feasible at W as given (tall, WᵀW ≠ I allowed), in fp64
    numpy: A − W S with S solving WᵀW·S + S·WᵀW = WᵀA + AᵀW (in WᵀW's eigenbasis), so that
    Wᵀ(A − WS) is skew, then divided by max(1, ‖·‖₂). A lower bound of the optimum for that W."""
    w, g, a = (X.detach().to(torch.float64).numpy() for X in (W, G, A))
    e, V = np.linalg.eigh(w.T @ w)
    rhs = V.T @ (w.T @ a + a.T @ w) @ V
    S = V @ (rhs / (e[:, None] + e[None, :])) @ V.T
    af = a - w @ S
    af /= max(1.0, float(np.linalg.norm(af, 2)))
    return float((g * af).sum())


def sdp_bracket(W: torch.Tensor, G: torch.Tensor) -> tuple[float, float]:
    """A rigorous fp64 bracket [lo, hi] ∋ p* = max ⟨G, A⟩ over ‖A‖₂ ≤ 1, WᵀA + AᵀW = 0.

    W tall, on the manifold or not. The SDP (cvxpy/Clarabel) supplies candidates only; the
    bracket is certified here in fp64 with numpy: lo = ⟨G, A_f⟩ for the SDP's A made exactly
    feasible at W (``feasible_value``, so lo ≤ p*); hi = ‖G − 2WΛ‖_* for the symmetric Λ read
    from the equality constraint's multipliers (any symmetric Λ bounds p* from above).
    """
    import cvxpy as cp

    w = W.detach().to(torch.float64).numpy()
    g = G.detach().to(torch.float64).numpy()
    m, n = w.shape
    A = cp.Variable((m, n))
    M = cp.bmat([[np.eye(m), A], [A.T, np.eye(n)]])
    H = w.T @ A
    iu = np.triu_indices(n)
    # the symmetric constraint once per pair (i ≤ j): duplicated rows make the SDP degenerate
    eq = cp.hstack([(H + H.T)[i, j] for i, j in zip(*iu)]) == 0
    prob = cp.Problem(cp.Maximize(cp.sum(cp.multiply(g, A))), [0.5 * (M + M.T) >> 0, eq])
    prob.solve(solver=cp.CLARABEL)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE), prob.status
    lo = feasible_value(W, G, torch.from_numpy(np.asarray(A.value)))
    y = np.asarray(eq.dual_value, dtype=np.float64).reshape(-1)
    lam = np.zeros((n, n))
    lam[iu] = y
    lam = np.where(np.eye(n, dtype=bool), lam, 0.5 * lam)  # off-diagonal pairs counted twice
    lam = np.triu(lam) + np.triu(lam, 1).T
    hi = min(float(np.linalg.svd(g - 2 * w @ (sgn * lam), compute_uv=False).sum()) for sgn in (1.0, -1.0))
    hi = min(hi, float(np.linalg.svd(g, compute_uv=False).sum()))  # Λ = 0 is always valid
    assert lo <= hi + 1e-12, (lo, hi)
    return lo, hi


def reference_msign_bf16(G: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """The reference repository's msign, from its formula: bf16 throughout, output in fp32."""
    transpose = G.shape[-2] > G.shape[-1]
    x = G.bfloat16()
    if transpose:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01)
    for k in range(steps):
        a, b, c = PE_SAFE[min(k, len(PE_SAFE) - 1)]
        s = x @ x.mT
        y = c * s
        y.diagonal(dim1=-2, dim2=-1).add_(b)
        y = y @ s
        y.diagonal(dim1=-2, dim2=-1).add_(a)
        x = y @ x
    if transpose:
        x = x.mT
    return torch.nan_to_num(x).float()


def reference_dual_ascent(W, G, msign_fn, alpha=0.01, steps=100, tol=1e-6):
    """The published dual ascent (Λ_code convention), from its formula.

    Λ_code = −¼(WᵀG + GᵀW); repeat: A = msign(G + 2WΛ_code); H = WᵀA + AᵀW;
    stop if ‖H‖_F/√(n²) < tol; Λ_code −= α(1 − k/K)H. W, G tall. Returns (Λ_code, A, iterations).
    """
    lam = -0.25 * (W.mT @ G + G.mT @ W)
    A = None
    it = 0
    for k in range(steps):
        A = msign_fn(G + 2 * W @ lam)
        it += 1
        H = W.mT @ A + A.mT @ W
        if torch.linalg.matrix_norm(H) / math.sqrt(H.numel()) < tol:
            break
        lam = lam - alpha * (1 - k / steps) * H
    return lam, A, it
