"""The best iterate of a solver that is not monotone, by a cheap estimate of its certified gap.

For a symmetric Λ and A ≈ msign(Z), Z = Gn − 2WΛ, with H = WᵀA + AᵀW and B = WᵀGn:
- D(Λ) = ‖Z‖_* (≈ ⟨Z, A⟩, or the sum of Z's singular values where the solver has them) bounds
  the optimum from above;
- the projected direction A − ½WH is tangent, with objective ⟨Gn, A⟩ − ½⟨sym B, H⟩ and spectral
  norm ≤ ‖A‖₂ + ½‖H‖_F, so dividing by 1 + ½‖H‖_F makes a feasible objective: a lower bound.
Their relative distance estimates the gap the certificate will report, in O(mn + n²) per matrix
(the certificate itself costs Grams and an eigh). Per matrix of a batch, so one matrix's stall
never chooses another's iterate.
"""
from __future__ import annotations

import torch


def estimated_gap(D: torch.Tensor, objective: torch.Tensor, sym_b: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(D − lower)/D per matrix, lower = (objective − ½⟨sym B, H⟩)/(1 + ½‖H‖_F) (module docstring)."""
    lower = (objective - 0.5 * (sym_b * H).sum((-2, -1))) / (1 + 0.5 * torch.linalg.matrix_norm(H))
    return (D - lower) / D.clamp(min=torch.finfo(D.dtype).tiny)


def keep_best(best, gap: torch.Tensor, A: torch.Tensor, dual: torch.Tensor):
    """(gap, A, Λ) of the best iterate so far, per matrix of a batch (ties keep the earlier one)."""
    if best is None:
        return gap, A, dual
    better = gap < best[0]
    pick = better[..., None, None]
    return torch.where(better, gap, best[0]), torch.where(pick, A, best[1]), torch.where(pick, dual, best[2])
