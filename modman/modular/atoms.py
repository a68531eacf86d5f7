"""Atoms: one parameter each, with its manifold, its norm in RMS units, and its own-norm factor.

For a weight W ∈ R^{d_out×d_in} on the Stiefel manifold with common singular value s
(s = 1 unscaled, s = √(d_out/d_in) for ``scale="rms"``):

    Linear/Conv   N(ΔW) = ‖ΔW‖_{RMS→RMS} = √(d_in/d_out)·‖ΔW‖₂   (tight: ΔW x for x along the top
                  right singular vector); sensitivity = ‖W‖_{RMS→RMS} = s·√(d_in/d_out).
                  Own norm: ‖ΔW‖₂ unscaled (factor √(d_in/d_out)), RMS→RMS scaled (factor 1).
                  Conv weights are flattened to (out, in·k…): each output position is W_flat times
                  one input patch, whose RMS is at most the largest per-position RMS of the input.
    Embedding     rows on spheres of radius r: output row RMS = r/√d; N(ΔE) = maxᵣ‖ΔE_r‖₂/√d;
                  own norm maxᵣ‖ΔE_r‖₂ (factor 1/√d); not homogeneous (the input is an index).
    Bias          y = x + b: N(Δb) = ‖Δb‖₂/√d, independent of the input.
    Gain          y = g ⊙ x: N(Δg) = ‖Δg‖_∞ (tight for x concentrated on one coordinate);
                  sensitivity ‖g‖_∞ at the gains given at construction.

Frozen weights (``frozen=True``; from_torch sets it for requires_grad=False): the optimizer neither
steps nor projects them, so they are not on a manifold; they still act on the signal, so their
sensitivity and output bound are read from the weight as it is (Linear/Conv: √(d_in/d_out)·‖W‖₂;
Embedding: the largest row norm as the radius), and from_torch gives them mass 0.

Biases and gains are trained by the optimizer's AdamW fallback, which ignores lr_scale; they are
atoms of mass 0 by default ("passengers": outside the norm and the budget). Give them a mass to
put them inside the norm.
"""
from __future__ import annotations

import math

import torch

from .._checks import is_finite_real
from .module import Atom, ModularError

SCALES = (None, "rms")


def _check_scale(scale):
    if scale not in SCALES:
        raise ValueError(f"scale must be None (unscaled Stiefel, spectral norm) or 'rms' "
                         f"(RMS→RMS norm), as in ManifoldMuon; got {scale!r}")


def _spectral(M: torch.Tensor) -> torch.Tensor:
    """‖M‖₂ in fp64: NaN for an M holding a NaN, ∞ for one holding an infinity (LAPACK's SVD
    raises on either)."""
    M = M.detach().to(torch.float64)
    if not bool(torch.isfinite(M).all()):
        return torch.tensor(math.nan if bool(M.isnan().any()) else math.inf, dtype=torch.float64)
    return torch.linalg.matrix_norm(M, ord=2)


def _read(name: str, param: torch.Tensor, what: str, reduce) -> float:
    """float(reduce(the parameter's values)): the one place an atom reads them, refused by name where
    there are none (the meta device: torch's "Tensor.item() cannot be called on meta tensors"
    named no parameter) or they are not finite (a NaN LayerNorm gain was blamed on the weight
    before it: "0.weight: its budget is undefined …"; both a probe)."""
    if param.is_meta:
        raise ModularError(f"{name!r} is on the meta device (no values yet), and its {what} is read from them: "
                           "describe or budget the model once the weights are materialised (after "
                           "model.to_empty(...) and their initialisation or loading)")
    values = param.detach()
    value = float(reduce(values.to(torch.float64))) if values.numel() else 0.0
    if not math.isfinite(value):
        bad = torch.nonzero(~torch.isfinite(values))
        if not len(bad):  # finite entries whose norm overflows fp64 (a bias at 1e200: an IndexError, a review)
            raise ModularError(f"{name!r} is too large for its {what} to be computed in fp64 (entries up to "
                               f"{float(values.abs().max()):.3g}); check the model's weights (a diverged run, a bad "
                               "checkpoint)")
        where = tuple(bad[0].tolist())
        where = where[0] if len(where) == 1 else where
        raise ModularError(f"{name!r} holds a non-finite value (index {where}: {float(values[where])}), so its "
                           f"{what} is undefined; check the model's weights (a diverged run, a bad checkpoint)")
    return value


def _check_not_empty(name: str, param: torch.Tensor) -> None:
    """Linear(4, 0) failed with ZeroDivisionError, Linear(0, 4) as "its budget is undefined … a zero
    input bound" (a probe)."""
    if param.numel() == 0:
        raise ModularError(f"{name!r} has shape {tuple(param.shape)}: an empty weight has no norm (nothing passes "
                           "through it); drop the layer, or describe the model without it")


class MatrixAtom(Atom):
    """A Stiefel weight used as x ↦ W x (Linear, or Conv with W flattened to (out, in·k…)).

    ``transposed=True``: a 2-D weight stored as (d_in, d_out) and used as x ↦ Wᵀx (transformers'
    Conv1D in GPT-2); changes are given in the stored shape."""

    constrained = True

    def __init__(self, name, param, mass=1.0, scale=None, kind="linear", frozen=False, transposed=False):
        super().__init__(name, param, mass)
        _check_scale(scale)
        if param.ndim < 2 or transposed and param.ndim != 2:
            raise ValueError(f"{name} has shape {tuple(param.shape)}; a matrix atom needs ≥ 2 dims "
                             "(exactly 2 when transposed)")
        _check_not_empty(name, param)
        self.scale = scale
        self.kind = kind
        self.transposed = bool(transposed)
        self.d_out, self.d_in = (param.shape[1], param.shape[0]) if transposed else \
            (param.shape[0], math.prod(param.shape[1:]))
        if frozen:  # as it is: ‖W‖_{RMS→RMS} = √(d_in/d_out)·‖W‖₂
            s = _read(name, param, "spectral norm (a frozen weight's sensitivity)",
                      lambda W: _spectral(self._matrix(W)))
        else:  # on the manifold every singular value is s
            s = 1.0 if scale is None else math.sqrt(self.d_out / self.d_in)
        self.sensitivity = s * math.sqrt(self.d_in / self.d_out)

    def bound(self, rho):
        return self.sensitivity * rho

    def _matrix(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the parameter's shape) as the (d_out, d_in) operator."""
        return t.mT if self.transposed else t.reshape(self.d_out, self.d_in)

    def rms_norm(self, delta):
        return math.sqrt(self.d_in / self.d_out) * _spectral(self._matrix(delta))

    def own_factor(self):
        return math.sqrt(self.d_in / self.d_out) if self.scale is None else 1.0

    def own_norm_name(self):
        return "spectral" if self.scale is None else "rms→rms"


class EmbeddingAtom(Atom):
    """Rows of E on spheres of radius ``radius`` (ManifoldMuon's default radius is 1); a frozen
    embedding's radius is its largest row norm."""

    homogeneous = False
    constrained = True
    sensitivity = 0.0  # the input is an index: no input change to propagate

    def __init__(self, name, param, mass=1.0, radius=1.0, frozen=False):
        super().__init__(name, param, mass)
        _check_not_empty(name, param)
        if frozen:
            radius = _read(name, param, "largest row norm (a frozen embedding's output bound)",
                           lambda E: torch.linalg.vector_norm(E, dim=-1).max())
        elif not (is_finite_real(radius) and radius > 0):
            raise ValueError(f"embedding_radius of {name!r} must be a finite number > 0 (the row-sphere radius), "
                             f"got {radius!r}")
        self.radius = float(radius)
        self.dim = param.shape[-1]

    def bound(self, rho):
        return self.radius / math.sqrt(self.dim)

    def rms_norm(self, delta):
        return torch.linalg.vector_norm(delta.detach().to(torch.float64), dim=-1).max() / math.sqrt(self.dim)

    def own_factor(self):
        return 1.0 / math.sqrt(self.dim)

    def own_norm_name(self):
        return "ℓ2 per row"


class BiasAtom(Atom):
    """y = x + b (sensitivity 1)."""

    homogeneous = False

    def __init__(self, name, param, mass=0.0):
        super().__init__(name, param, mass)
        self.dim = param.numel()
        self._norm()  # refused here, by name, rather than at the first bound

    def _norm(self) -> float:
        return _read(self.name, self.param, "norm (it bounds the next layer's input)", torch.linalg.vector_norm)

    def bound(self, rho):
        return rho + self._norm() / math.sqrt(self.dim)

    def rms_norm(self, delta):
        return torch.linalg.vector_norm(delta.detach().to(torch.float64)) / math.sqrt(self.dim)

    def own_factor(self):
        return 1.0 / math.sqrt(self.dim)

    def own_norm_name(self):
        return "ℓ2"


class GainAtom(Atom):
    """y = g ⊙ x (norm gains); sensitivity ‖g‖_∞ at construction."""

    def __init__(self, name, param, mass=0.0):
        super().__init__(name, param, mass)
        self.sensitivity = _read(name, param, "largest entry (its sensitivity)", lambda g: g.abs().max())

    def bound(self, rho):
        return self.sensitivity * rho

    def rms_norm(self, delta):
        return delta.detach().to(torch.float64).abs().max()

    def own_factor(self):
        return 1.0

    def own_norm_name(self):
        return "ℓ∞"
