"""The exact reduction of the n×n dual to the subspace a low-rank gradient spans.

Tall W (WᵀW = I), Gn = W·B + G⊥ with B = WᵀGn and N = G⊥ᵀG⊥ (n×n, as in ``newton.py``). Every
direction is A = W K + X with K = WᵀA skew and WᵀX = 0, and the subproblem reads

    maximise ⟨skew B, K⟩ + ⟨G⊥, X⟩   subject to   ‖[K; X]‖₂ ≤ 1,  K skew.

Let Π project onto S = col(B) + row(B) + range(N) = range(BBᵀ + BᵀB + N), of dimension k ≤ 2r
for a gradient of rank r (a batch of r samples, the first steps of momentum). Compressing a
feasible (K, X) to (ΠKΠ, XΠ) keeps K skew, keeps the norm ≤ 1 ([ΠKΠ; XΠ] = diag(Π, I)·[K; X]·Π
is a product with contractions) and keeps the objective (skew B and G⊥ live on S on the sides
that meet K and X). So the subproblem is solved exactly on S: with U (n×k) an orthonormal basis,
the k×k problem (B' = UᵀBU, N' = UᵀNU) is the same kind of problem, and its solution lifts as

    K = U K' Uᵀ,   R = U R' Uᵀ   (A = W K + G⊥ R),   Λ = U Λ' Uᵀ.

The dual value of the lifted Λ is computed on the full problem (one fp64 eigvalsh of the n×n
CᵀC + N), so what lies outside S only by rounding (an fp32 momentum is low-rank only to its
rounding) is counted in the certificate rather than assumed away.

Cost: one fp64 eigh of the n×n matrix BBᵀ + BᵀB + N to find S (about one fixed-point map), then
everything inner runs at size k: the cubic work shrinks by (k/n)³. Used when k ≤ ``MAX_FRACTION``·n.
A gradient whose S filled the space once keeps it filled (momentum only adds directions), so the
caller can skip the test from then on (the ``subspace`` entry of the solver state).
"""
from __future__ import annotations

import torch

from .result import sym

MAX_FRACTION = 0.75
_RTOL = 1e-12  # eigenvalues of BBᵀ + BᵀB + N below this fraction of the largest are outside S


def subspace_basis(Gw: torch.Tensor, N: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(U, flops): an orthonormal basis U (n×k) of S when k ≤ MAX_FRACTION·n, else None."""
    n = Gw.shape[-1]
    P = sym(Gw @ Gw.mT + Gw.mT @ Gw + N)
    lam, V = torch.linalg.eigh(P)
    flops = 2 * 4.0 * n**3 + 20.0 * n**3
    if not float(lam[-1]) > 0:
        return None, flops  # G = 0: nothing to reduce, and nothing learnt about later gradients
    keep = lam > _RTOL * lam[-1]
    k = int(keep.sum())
    if k > MAX_FRACTION * n:
        return None, flops
    return V[:, keep], flops


def solve_on_subspace(core, Gw: torch.Tensor, N: torch.Tensor, dual: torch.Tensor | None, tol: float,
                      *, try_subspace: bool = True, dual_value=None):
    """Run ``core(Gw, N, dual, tol, dual_value=…) -> (K, R, Λ, D, info, flops)`` on S when that
    pays (there without ``dual_value``: the core works in S's coordinates), else as is.

    Returns the same tuple in full coordinates, D the full problem's dual value of the dual that
    certified (the core's ``certificate_dual``, else Λ) — by ``dual_value(Λ)`` when given (D for
    W as it is, newton.frame_dual_value), else by the n×n identity — and ``info["subspace"]`` set
    to k (n without the reduction).
    """
    n = Gw.shape[-1]
    U, flops = subspace_basis(Gw, N) if try_subspace else (None, 0.0)
    if U is None:
        # a core that takes ``dual_value`` uses it for its own D's and reports the certified one as
        # info["certificate_value"] (anderson: no second eigvalsh for the same dual)
        K, R, lam, D, info, c = core(Gw, N, dual, tol, dual_value=dual_value)
        # n marks a gradient that filled the space (the test is skipped from then on); a zero
        # gradient says nothing about the next one, so it is marked 0 and the test runs again
        info["subspace"] = 0 if try_subspace and not bool(Gw.any() or N.any()) else n
        cert = info.pop("certificate_dual", None)
        certified = info.pop("certificate_value", None)
        if certified is not None:
            D = certified
        elif dual_value is not None:
            D = dual_value(lam if cert is None else cert)
            c += 2 * 4.0 * n**3 + 10.0 * n**3
        return K, R, lam, D, info, flops + c
    k = U.shape[-1]
    Gr = U.mT @ Gw @ U
    Nr = sym(U.mT @ N @ U)
    K, R, lam, _, info, c = core(Gr, Nr, None if dual is None else U.mT @ dual.double() @ U, tol)
    K, R, lam = U @ K @ U.mT, U @ R @ U.mT, sym(U @ lam @ U.mT)
    # the dual value on the full problem of the lifted dual that certified the reduced one (the
    # core's ``certificate_dual``, else Λ): what lies outside S (rounding) is counted
    cert = info.pop("certificate_dual", None)
    lam_c = lam if cert is None else sym(U @ cert @ U.mT)
    if dual_value is not None:
        D = dual_value(lam_c)
        c += 4.0 * n**3  # Lᵀ(Z − 2Λ), on top of the identity's cost counted below
    else:
        C = Gw - 2 * lam_c
        D = float(torch.linalg.eigvalsh(sym(C.mT @ C + N)).clamp(min=0).sqrt().sum())
    info["subspace"] = k
    return K, R, lam, D, info, flops + c + 2 * 4.0 * n * n * k * 4 + 4.0 * n**3 + 10.0 * n**3
