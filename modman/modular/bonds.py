"""Bonds: weightless modules (mass 0) with their stated sensitivities and output bounds.

Elementwise activations, sensitivity = max |φ'| of the unscaled torch function:
    ReLU 1;  tanh 1;  GELU (exact erf form) Φ(x) + xφ(x), largest at x = √2: 1.1289;
    SiLU σ(x)(1 + x(1 − σ(x))), largest at x ≈ 2.3994: 1.0998.
Each satisfies |φ(x)| ≤ |x|, so the output RMS is at most the input's (bound ρ ↦ ρ).
GELU's tanh approximation peaks at ≈ 1.1290 — below the 1.1289 + 1e-4 used for both.

Normalisation (RMSNorm, LayerNorm without their gain/bias) maps x to x/rms(x) (after centering
for LayerNorm): output RMS 1, Jacobian (I − x̂x̂ᵀ/d)/rms(x), so its sensitivity is 1/r for inputs
of RMS (LayerNorm: standard deviation) ≥ r. It is not Lipschitz near 0: r is a stated assumption
(``norm_min_rms``), not a theorem.

Softmax attention is not globally Lipschitz (Kim et al. 2021). ``attention`` states the
assumption under which it is budgeted, as its budget-table line says: softmax(qkᵀ/√d)v treated
as 1-Lipschitz in (q, k, v) jointly (modula's convention for its 1/d-scaled attention). With the
pattern held fixed that holds in the values (a convex combination of value rows: output RMS ≤
the values' bound); the change through queries and keys is not bounded. Tracing refuses
attention; only a declaration (``declarations.py``) uses it.
"""
from __future__ import annotations

from .._checks import is_finite_real
from .module import Bond

# max |φ'(x)| of each activation, rounded up in the 4th decimal (MATH.md §4)
ACTIVATION_SENSITIVITY = {
    "relu": 1.0,
    "tanh": 1.0,
    "gelu": 1.1289 + 1e-4,
    "silu": 1.0998 + 1e-4,
    "identity": 1.0,
}


def activation(kind: str) -> Bond:
    if kind not in ACTIVATION_SENSITIVITY:
        raise ValueError(f"unknown activation {kind!r}; known: {sorted(ACTIVATION_SENSITIVITY)}")
    return Bond(kind, ACTIVATION_SENSITIVITY[kind], lambda rho: rho)


def identity(name: str = "identity") -> Bond:
    """Flattening (merging vectors), dropout in eval, casts: the RMS of a merged vector is at most
    the largest of its parts', so the bound and the sensitivity are 1. Not a reshape that splits
    vectors (nn.Unflatten, a view to (B, C, H, W)): the parts' RMS can be √(d/k) times the whole's —
    ``convert`` refuses those."""
    return Bond(name, 1.0, lambda rho: rho)


def normalize(kind: str = "rmsnorm", min_rms: float = 1.0, layer: str = "") -> Bond:
    if not (is_finite_real(min_rms) and min_rms > 0):
        raise ValueError(f"norm_min_rms must be a positive number (the assumed smallest RMS of a "
                         f"normalisation layer's input), got {min_rms!r}")
    # LayerNorm centres first: its assumption is on the standard deviation, which can be small at
    # RMS 1 (an input of RMS 1 and small spread gave Lipschitz 70; a probe)
    measure = "standard deviation (centred RMS)" if kind == "layernorm" else "RMS"
    bond = Bond(f"{layer} ({kind})" if layer else kind, 1.0 / min_rms, lambda rho: 1.0,
                assumption=f"{kind}: inputs have {measure} ≥ {min_rms:g} (sensitivity 1/{min_rms:g})")
    bond.min_rms = float(min_rms)  # checked against the input bound the tree computes (budget.py)
    return bond


def attention() -> Bond:
    return Bond("attention", 1.0, lambda rho: rho,
                assumption="attention: softmax(qkᵀ/√d)v treated as 1-Lipschitz in (q, k, v) jointly "
                           "(modula's convention for its 1/d-scaled attention; not a bound for torch's 1/√d)")
