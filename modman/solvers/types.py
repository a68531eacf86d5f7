"""What a solver function returns to the dispatcher, before certification."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SolverOutput:
    direction: torch.Tensor  # candidate A (tall), not necessarily feasible
    dual: torch.Tensor  # symmetric Λ in units of the normalised gradient, certifies A
    iterations: int
    msign_calls: int
    state: dict = field(default_factory=dict)
    # optional, for solvers that certify through the n×n identity (``certify_gram``):
    dual_value: torch.Tensor | None = None  # fp64 D(Λ) = ‖Gn − 2WΛ‖_* for W as it is
    msign_equivalents: float | None = None  # cost in msign-equivalents (solver's own model)
    sym_gn: torch.Tensor | None = None  # fp64 sym(WᵀGn) (…, n, n): what A's tangent residual adds to ⟨Gn, A⟩
