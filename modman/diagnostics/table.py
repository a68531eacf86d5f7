"""``spectrum_table``: one line per weight matrix, for a terminal or a log.

Columns: parameter, shape (the matrix view after → when it differs; ᵀ: seen transposed), σ_min, σ_max, condition
number, stable rank, distance to the weight's manifold (unscaled Stiefel unless told otherwise),
the manifold, and how the numbers were obtained ("svd" exact; "lanczos" estimates, printed as the
bounds they are: σ_max, κ and the distance to Stiefel from below (≥), σ_min and stable rank from
above (≤) — σ_min's can be far off: 1.14 against a true 0.032 on a 300×300 Gaussian, a probe; see
``spectra.py``; a sphere's distance, from row norms, and Euclidean space's are exact either way).
"""
from __future__ import annotations

import math

from ..manifolds import Stiefel
from .spectra import EXACT_MAX_DIM, is_transposed_view, manifold_label, matrices_and_manifolds, matrix_stats


def _shape(p, W) -> str:
    s = "×".join(map(str, p.shape))
    if is_transposed_view(p, W):
        return f"{s} → {'×'.join(map(str, W.shape))}ᵀ"  # seen transposed (Conv1D), square ones too
    return s if tuple(p.shape) == tuple(W.shape) else f"{s} → {'×'.join(map(str, W.shape))}"


# Lanczos's one-sided estimates, in the table's column order: the true value is ≤ or ≥ the one shown
_BOUNDS = {"sigma_min": "≤", "sigma_max": "≥", "condition": "≥", "stable_rank": "≤", "distance": "≥"}


def _marker(key: str, st: dict, manifold) -> str:
    """Where the true value lies relative to the one shown: ≤/≥ for an estimate from Lanczos's Ritz
    values, nothing for an exact value (every value of an SVD, a sphere's distance from its row
    norms, Euclidean space's 0) or a non-finite one."""
    if st["exact"] or not math.isfinite(st[key]) or (key == "distance" and not isinstance(manifold, Stiefel)):
        return ""
    return _BOUNDS[key]


def _num(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.4g}"


def spectrum_table(model_or_named_params, manifolds=None, *, exact_max_dim: int = EXACT_MAX_DIM) -> str:
    """A text table of the spectra of every matrix parameter.

    Args:
        model_or_named_params: an nn.Module, a mapping name → tensor, or (name, tensor) pairs.
        manifolds: the reference manifold per weight for the distance column: None (unscaled
            Stiefel, where manifold Muon keeps every σ at 1), one manifold, a mapping, or a
            modman optimizer (each parameter's own manifold and matrix view; parameters it does not
            hold, e.g. frozen ones, count as Euclidean); see ``resolve_manifolds``.
        exact_max_dim: matrices with min(m, n) above this get Lanczos estimates instead of an SVD.

    Raises ValueError when there is no parameter with ≥ 2 dimensions.
    """
    mats, resolved = matrices_and_manifolds(model_or_named_params, manifolds)
    if not mats:
        raise ValueError("spectrum_table: no matrix parameters (none with ≥ 2 dimensions and at least one "
                         "entry: an empty one, e.g. a Linear(0, n)'s weight, has no spectrum)")
    rows = [("parameter", "shape", "σ_min", "σ_max", "cond", "stable rank", "distance", "manifold", "method")]
    for name, p, W in mats:
        st = matrix_stats(W, resolved[name], exact_max_dim=exact_max_dim)
        rows.append((name, _shape(p, W), *(_marker(k, st, resolved[name]) + _num(st[k]) for k in _BOUNDS),
                     manifold_label(resolved[name]), "svd" if st["exact"] else "lanczos"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
