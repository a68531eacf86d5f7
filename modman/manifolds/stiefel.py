"""The (scaled) Stiefel manifold: matrices whose singular values all equal s.

For a torch weight W ∈ R^{d_out×d_in} (batched over leading dimensions):
- tall (d_out ≥ d_in): WᵀW = s²I;  wide (d_out < d_in): WWᵀ = s²I.
- s = 1 (``scale=None``, the blog's experiment), s = √(d_out/d_in) (``scale="rms"``: the
  RMS→RMS operator norm is then 1), or a given float. s is computed from the torch (out, in)
  shape, never from the shape after the tall transpose.

Every formula is applied to U = W/s, which lies on the unscaled manifold, in the tall
orientation; wide matrices are transposed in and out.
- Tangent space at W: {A : UᵀA + AᵀU = 0}; projection P(V) = V − U sym(UᵀV).
- Retractions of W + V: "polar" and "qr" land on the manifold for any V, "closed_form" exactly
  only for the steps it is made for and otherwise off by the error stated with it:
  "polar" — the exact polar factor s·msign(W + V) via an SVD;
  "qr"    — the Q factor of W + V with the signs of diag(R) made positive;
  "closed_form" — (W + V)(I − P + P/√(1+η²)) with P = VᵀV/η², η = ‖V‖₂/s. It is the exact polar
            factor when V is tangent and V/η is a partial isometry (every nonzero singular value
            1, any rank), e.g. V = −lr·msign(·). η² is computed as η̂² = ‖M‖_F²/tr(M), M = VᵀV/s²,
            which equals η² exactly for a scaled partial isometry; otherwise WᵀW/s² errs by about
            η·‖tangent residual‖ + (3/4)η⁴·max_t |t(η̂²/η² − t)| over t = σ², σ the singular
            values of V/(ηs), to leading order. (MATH.md §2's (3/4)η⁴·max σ²(1−σ²) is this with
            η̂ = η, 1.6–1.8× too small on generic tangents, where η̂ < η: a probe.)
All methods need real floating tensors: an integer W would be projected in fp32 and truncated back;
bf16/fp16 are computed in fp32 and returned in their own dtype, except what is a number rather
than a point (``distance``, ``gram_deviation``, ``tangent_residual``) and ``closed_form_factor``'s
n×n factor, which stay in fp32. A NaN or Inf: ``project`` and the
"polar" and "qr" retractions, which factor the matrix, refuse it (ValueError naming the argument);
the arithmetic ones (tangent, "closed_form", polish) carry it through as torch arithmetic does, and
``distance`` is NaN. A matrix without entries (a 0 among its last two dimensions) maps to one of
the same shape, at distance 0.
"""
from __future__ import annotations

import math

import torch

from .._checks import is_finite_real, is_int
from ..linalg.blocked import gram64
from ..linalg.msign import resolve_compute_dtype
from ._shared import check_random_dtype, check_real_floating, random_shape, residual_ratio, unit_peak


def _sym(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.mT)


def is_wide(shape) -> bool:
    return shape[-2] < shape[-1]


def to_tall(X: torch.Tensor) -> torch.Tensor:
    """View X in the tall orientation (rows ≥ columns)."""
    return X.mT if is_wide(X.shape) else X


def _check_count(value, name: str, least: int, where: str) -> None:
    """An iteration count: an int (not a bool) ≥ ``least``."""
    if not (is_int(value) and value >= least):
        raise (ValueError if is_int(value) else TypeError)(f"{where}: {name} must be an int ≥ {least}, got {value!r}")


def _check_finite(X: torch.Tensor, name: str, where: str) -> None:
    """Refuse a NaN or Inf before an SVD or QR: LAPACK failed on it with torch's message about
    linalg.svd (calling an Inf "ill-conditioned"), naming neither the method nor the argument."""
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{where}: {name} contains NaN or Inf")


class Stiefel:
    """Matrices with every singular value equal to ``scale`` (see the module docstring)."""

    name = "stiefel"

    def __init__(self, scale: None | str | float = None):
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.dtype != torch.bool:
            scale = scale.item()
        if scale is not None and scale != "rms":
            # (float() took True as 1.0 and "2" as 2.0)
            if not (is_finite_real(scale) and scale > 0):
                raise ValueError(f"Stiefel scale must be None, 'rms' or a positive float, got {scale!r}")
            scale = float(scale)
        self.scale = scale

    def __repr__(self) -> str:
        return f"Stiefel(scale={self.scale!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Stiefel) and other.scale == self.scale

    def __hash__(self):
        return hash(("stiefel", self.scale))

    def check_shape(self, shape, name: str = "W") -> None:
        if len(shape) < 2:
            raise ValueError(f"Stiefel needs a matrix (≥ 2 dims); {name} has shape {tuple(shape)}")

    def _check_pair(self, W: torch.Tensor, V: torch.Tensor, names: str, where: str) -> None:
        """W and a tangent-side tensor of the same shape and dtype (a (4, 8) V at an (8, 4) W was
        silently transposed to fit; a 1-D W raised IndexError; mixed dtypes a raw matmul error)."""
        check_real_floating(W, names[0], where)
        check_real_floating(V, names[1], where)
        self.check_shape(W.shape)
        if V.shape != W.shape or V.dtype != W.dtype:
            raise ValueError(f"{where}: {names[1]} must have W's shape and dtype, got {tuple(V.shape)} "
                             f"{V.dtype} at W {tuple(W.shape)} {W.dtype}")

    def scale_for(self, shape) -> float:
        """The common singular value s for a weight of torch shape (..., d_out, d_in)."""
        if self.scale is None:
            return 1.0
        if self.scale == "rms":
            # a matrix without entries has no singular value to scale (√(m/0) divided by zero)
            return math.sqrt(shape[-2] / shape[-1]) if shape[-2] and shape[-1] else 1.0
        return float(self.scale)

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """Nearest point on the manifold (Frobenius): s times the exact polar factor (SVD).

        Rank-deficient W has no unique nearest point; singular directions with σ = 0 are
        completed by the SVD's singular vectors so that the result is always on the manifold.
        """
        check_real_floating(W, "W", "Stiefel.project")
        self.check_shape(W.shape)
        _check_finite(W, "W", "Stiefel.project")
        dtype = resolve_compute_dtype(W.dtype, None)
        U, _, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
        return (self.scale_for(W.shape) * (U @ Vh)).to(W.dtype)

    def tangent(self, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of V onto the tangent space at W: V − U sym(UᵀV), U = W/s."""
        self._check_pair(W, V, "WV", "Stiefel.tangent")
        s = self.scale_for(W.shape)
        compute = resolve_compute_dtype(W.dtype, None)  # bf16 products left a residual 1.7× fp32's
        U, Vt = to_tall(W).to(compute) / s, to_tall(V).to(compute)
        P = Vt - U @ _sym(U.mT @ Vt)
        return (P.mT if is_wide(W.shape) else P).to(W.dtype)

    def tangent_residual(self, W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """‖UᵀA + AᵀU‖_F / ‖A‖_F in the tall orientation (0 for A = 0, NaN for a NaN), at any scale
        and size of A; in the compute dtype (fp32 for bf16/fp16, as ``distance``)."""
        self._check_pair(W, A, "WA", "Stiefel.tangent_residual")
        compute = resolve_compute_dtype(W.dtype, None)
        # A at unit size (U = W/s is O(1) on the manifold): unscaled, the products overflowed in
        # fp32, a false 0 for a tangent and NaN for a non-tangent A at scale 1e20 (a probe)
        U, At = to_tall(W).to(compute) / self.scale_for(W.shape), unit_peak(to_tall(A).to(compute))
        H = U.mT @ At
        return residual_ratio(torch.linalg.matrix_norm(H + H.mT), torch.linalg.matrix_norm(At))

    def retract(self, W: torch.Tensor, V: torch.Tensor, method: str = "polar") -> torch.Tensor:
        """Map W + V back onto the manifold (see the module docstring for the methods)."""
        self._check_pair(W, V, "WV", "Stiefel.retract")
        if method in ("polar", "qr"):  # (not closed_form: it is compiled, and a check syncs with the host)
            _check_finite(W, "W", "Stiefel.retract")
            _check_finite(V, "V", "Stiefel.retract")
        if method == "polar":
            return self.project(W + V)
        if method == "qr":
            return self._retract_qr(W, V)
        if method == "closed_form":
            return self._retract_closed_form(W, V)
        raise ValueError(f"unknown Stiefel retraction {method!r}; choose 'polar', 'qr' or 'closed_form'")

    def _retract_qr(self, W, V):
        s = self.scale_for(W.shape)
        X = to_tall(W + V)
        dtype = resolve_compute_dtype(X.dtype, None)
        Q, R = torch.linalg.qr(X.to(dtype))
        sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        Q = (Q * sign.unsqueeze(-2) * s).to(W.dtype)
        return Q.mT if is_wide(W.shape) else Q

    def _retract_closed_form(self, W, V):
        compute = resolve_compute_dtype(W.dtype, None)
        Wc, Vc = W.to(compute), V.to(compute)  # (the same tensors in fp32/fp64)
        return self.apply_closed_form(Wc + Vc, self.closed_form_factor(W.shape, Vc)).to(W.dtype)

    def closed_form_factor(self, shape, V: torch.Tensor) -> torch.Tensor:
        """F = −c·M (n×n, tall orientation) with M = VᵀV/s², so that the closed-form retraction of
        W + V is X + X·F for X = W + V (see ``apply_closed_form``): the two halves let a caller
        overwrite V with W + V in between, holding one m×n temporary less. In the compute dtype,
        fp32 for a bf16/fp16 V: computed in bf16 the retraction landed 2.9e-3 off the manifold where
        fp32 then rounding lands 1.7e-3 (a probe)."""
        check_real_floating(V, "V", "Stiefel.closed_form_factor")
        s = self.scale_for(shape)
        Vt = to_tall(V).to(resolve_compute_dtype(V.dtype, None))
        M = (Vt.mT @ Vt) / (s * s)
        trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)
        fro2 = (M * M).sum((-2, -1))
        eta2 = fro2 / torch.where(trace > 0, trace, torch.ones_like(trace))
        # (I + η²P)^{-1/2} = I − (1 − 1/√(1+η²))·P with P = M/η²; 1 − (1+η²)^{-1/2} is written as
        # −expm1(−½·log1p(η²)) so that tiny steps neither cancel to 0 nor divide 0 by 0.
        safe = eta2 > 0
        eta2_safe = torch.where(safe, eta2, torch.ones_like(eta2))
        coef = torch.where(safe, -torch.expm1(-0.5 * torch.log1p(eta2_safe)) / eta2_safe, torch.zeros_like(eta2))
        return M * (-coef)[..., None, None]

    @staticmethod
    def apply_closed_form(X: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """X + X·F in X's orientation (X = W + V, F from ``closed_form_factor``), one new tensor in
        X's dtype (computed in fp32 for bf16/fp16, as the other methods)."""
        check_real_floating(X, "X", "Stiefel.apply_closed_form")
        check_real_floating(factor, "factor", "Stiefel.apply_closed_form")
        compute = resolve_compute_dtype(X.dtype, None)
        Xt, F = to_tall(X).to(compute), factor.to(compute)  # (no copies in fp32/fp64)
        Y = torch.baddbmm(Xt, Xt, F) if Xt.ndim == 3 else (
            torch.addmm(Xt, Xt, F) if Xt.ndim == 2 else Xt + Xt @ F)
        return (Y.mT if is_wide(X.shape) else Y).to(X.dtype)

    def polish(self, W: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Pull a nearly orthogonal W back onto the manifold without an SVD.

        Each step applies the convergent quintic p(x) = (15x − 10x³ + 3x⁵)/8 to the singular
        values of U = W/s (p(1) = 1, p'(1) = p''(1) = 0, so a deviation δ becomes O(δ³)):
        U ← U·(aI + bS + cS²) with the small Gram S = UᵀU (tall orientation). Valid for
        singular values in (0, √(5/3)); meant for drift of order 1e-5, not for projection.
        """
        check_real_floating(W, "W", "Stiefel.polish")
        self.check_shape(W.shape)
        # (steps=-1 did nothing and steps=True polished once, silently: a probe)
        _check_count(steps, "steps", 0, "Stiefel.polish")
        s = self.scale_for(W.shape)
        # in fp32 for bf16/fp16: bf16 products left the polished weight 3× further off (6e-3)
        U = to_tall(W).to(resolve_compute_dtype(W.dtype, None)) / s
        for _ in range(steps):
            S = U.mT @ U
            U = 1.875 * U + U @ (-1.25 * S + 0.375 * (S @ S))
        U = U * s
        return (U.mT if is_wide(W.shape) else U).to(W.dtype)

    def gram_deviation(self, W: torch.Tensor, iters: int = 10) -> torch.Tensor:
        """Estimate of ‖UᵀU − I‖₂ (U = W/s, tall) by power iteration: cheap drift monitor.

        ‖UᵀU − I‖₂ = max_i |σᵢ² − 1| ≈ 2·max_i |σᵢ − 1| near the manifold. Power iteration
        under-estimates; this is a monitor for re-projection, not a certificate.
        """
        check_real_floating(W, "W", "Stiefel.gram_deviation")
        self.check_shape(W.shape)
        # (iters=-3 returned ‖Ev‖ of the unnormalised start vector: a probe)
        _check_count(iters, "iters", 1, "Stiefel.gram_deviation")
        Wt = to_tall(W).to(resolve_compute_dtype(W.dtype, None))  # (a bf16 Gram errs by ~4e-3)
        s = self.scale_for(W.shape)
        E = (Wt.mT @ Wt) / (s * s)  # UᵀU for U = W/s without forming U
        E.diagonal(dim1=-2, dim2=-1).sub_(1)
        # A fixed, generic start vector (not an eigenvector of structured E, unlike all-ones).
        v = torch.cos(torch.arange(E.shape[-1], dtype=E.dtype, device=E.device) * 2.39996 + 0.5)
        v = v.expand(*E.shape[:-1]).unsqueeze(-1)
        for _ in range(iters):
            v = E @ v
            v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=1e-30)
        return torch.linalg.vector_norm(E @ v, dim=-2).squeeze(-1)  # (fp32 for bf16/fp16, as distance)

    def distance(self, W: torch.Tensor) -> torch.Tensor:
        """max_i |σᵢ(W)/s − 1| (0 on the manifold), in W's dtype (fp32 for bf16/fp16).

        σᵢ² are the eigenvalues of the fp64 Gram UᵀU (U = W/s, tall, summed over fp64 row blocks),
        to ≈ n·eps₆₄ (2e-13 at n = 1024) near the manifold, where the distance meets tolerances of
        1e-5 — fp32 singular values were off by up to 3e-6 there. NaN for a matrix with a NaN or
        an infinity, or whose Gram overflows fp64 (entries beyond ~1e150); 0 for a matrix without
        entries (no singular value is off)."""
        check_real_floating(W, "W", "Stiefel.distance")
        self.check_shape(W.shape)
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        if min(W.shape[-2:]) == 0:  # (gram64 of no rows is None, and an empty spectrum has no max)
            return torch.zeros(W.shape[:-2], dtype=dtype, device=W.device)
        s = self.scale_for(W.shape)
        gram = gram64(to_tall(W))
        finite = torch.isfinite(gram).all(dim=(-2, -1), keepdim=True)  # (NaN: a LinAlgError before)
        sq = torch.linalg.eigvalsh(torch.where(finite, gram, torch.zeros_like(gram))).clamp(min=0) / (s * s)
        dist = (sq.sqrt() - 1).abs().amax(dim=-1)
        return torch.where(finite[..., 0, 0], dist, torch.full_like(dist, math.nan)).to(dtype)

    def random(self, *size, shape=None, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """A uniformly distributed (Haar) point: the polar factor of a Gaussian matrix."""
        # random(64, 32), random((64, 32)) (as torch.randn) or random(shape=(64, 32))
        shape = random_shape(size, shape, "Stiefel.random")
        self.check_shape(shape)
        check_random_dtype(dtype, self.scale_for(shape), "scale", "Stiefel.random")
        G = torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)
        return self.project(G).to(dtype)
