"""The rank-revealing tall reduction of the subproblem (MATH.md §3).

For tall W (m×n, WᵀW = I) write Gn = W·B + G⊥ with B = WᵀGn, G⊥ = (I − WWᵀ)Gn. An optimal A lies
in span[W, Q], Q (m×k) orthonormal, Q ⟂ W, spanning G⊥ (k = rank G⊥ ≤ min(n, m − n)), so the
problem becomes the (n+k)×n one with W_r = [I; 0] and G_r = [B; QᵀGn], and a reduced solution
lifts back as A = W·A_top + Q·A_bot (the dual Λ is the same n×n matrix in both).

Rank is revealed by eigh of G⊥ᵀG⊥ in fp64 (a plain thin QR of a rank-deficient G⊥ returns
columns that are not orthogonal to W, MATH.md §3), threshold √eps·‖Gn‖; Q is then
re-orthogonalised against W twice with a QR after each pass ("twice is enough"). Directions of
G⊥ below the threshold are dropped: that only loosens the certificate, which the dispatcher
computes on the full problem. Worth it when n + k < m; we use it when m ≥ 2n (then n + k ≤ m
holds for every k, and the inner solver works on at most half the rows).
Extra memory: Q (m×k) and G⊥ (m×n) during setup, at most 2·numel(W).
"""
from __future__ import annotations

import torch


def reduce_tall(W: torch.Tensor, Gn: torch.Tensor):
    """(W_r, G_r, Q) for tall W, Gn of shape (…, m, n)."""
    n = W.shape[-1]
    B = W.mT @ Gn
    G_perp = Gn - W @ B
    gram = G_perp.double().mT @ G_perp.double()
    evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.mT))
    thr = torch.finfo(Gn.dtype).eps * (torch.linalg.matrix_norm(Gn.double()) ** 2).clamp(min=1e-300)
    k = int((evals > thr[..., None]).sum(-1).max()) if evals.numel() else 0
    k = max(k, 1)  # keep one column so shapes stay non-empty; an extra orthonormal column is harmless
    basis = evecs[..., -k:].to(Gn.dtype)
    Q = G_perp @ basis
    for _ in range(2):
        Q = Q - W @ (W.mT @ Q)
        Q = torch.linalg.qr(Q).Q
    R = Q.mT @ Gn
    eye = torch.eye(n, dtype=W.dtype, device=W.device).expand(*W.shape[:-2], n, n)
    zeros = torch.zeros(*W.shape[:-2], k, n, dtype=W.dtype, device=W.device)
    return torch.cat([eye, zeros], -2), torch.cat([B, R], -2), Q


def lift(W: torch.Tensor, Q: torch.Tensor, A_r: torch.Tensor) -> torch.Tensor:
    n = W.shape[-1]
    return W @ A_r[..., :n, :] + Q @ A_r[..., n:, :]
