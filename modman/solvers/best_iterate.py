"""The best iterate of a solver that is not monotone, by a cheap estimate of its certified gap.

For a symmetric Λ and A ≈ msign(Z), Z = Gn − 2WΛ, with H = WᵀA + AᵀW and B = WᵀGn:
- D(Λ) = ‖Z‖_* (≈ ⟨Z, A⟩, or the sum of Z's singular values where the solver has them) bounds
  the optimum from above;
- the projected direction A − ½WH is tangent, with objective ⟨Gn, A⟩ − ½⟨sym B, H⟩ and spectral
  norm ≤ ‖A‖₂ + ½‖H‖_F, so dividing by 1 + ½‖H‖_F makes a feasible objective: a lower bound.
Their relative distance estimates the gap the certificate will report, in O(mn + n²) per matrix
(the certificate itself costs Grams and an eigh): an estimate, not a bound, since A is msign's
approximation (‖A‖₂ ≤ 1 and ⟨Z, A⟩ = ‖Z‖_* only to its accuracy). Per matrix of a batch, so one
matrix's stall never chooses another's iterate.
"""
from __future__ import annotations

import math

import torch


def estimated_gap(D: torch.Tensor, objective: torch.Tensor, sym_b: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(D − lower)/D per matrix, lower = (objective − ½⟨sym B, H⟩)/(1 + ½‖H‖_F) (module docstring);
    for D ≤ 0 (Z = 0, or an estimate rounded below 0) 0 where lower ≥ D, else ∞, and NaN as ∞: never
    a best iterate by accident (D < 0 divided by a tiny clamp gave −huge, a review)."""
    lower = (objective - 0.5 * (sym_b * H).sum((-2, -1))) / (1 + 0.5 * torch.linalg.matrix_norm(H))
    positive = D > 0
    gap = (D - lower) / torch.where(positive, D, torch.ones_like(D))
    gap = torch.where(positive, gap, torch.where(lower >= D, torch.zeros_like(D), torch.full_like(D, math.inf)))
    return gap.nan_to_num(nan=math.inf, posinf=math.inf)


def keep_best(best, gap: torch.Tensor, A: torch.Tensor, dual: torch.Tensor):
    """(gap, A, Λ) of the best iterate so far, per matrix of a batch (ties keep the earlier one)."""
    if best is None:
        return gap, A, dual
    better = gap < best[0]
    pick = better[..., None, None]
    return torch.where(better, gap, best[0]), torch.where(pick, A, best[1]), torch.where(pick, dual, best[2])
