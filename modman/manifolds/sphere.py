"""Spheres of radius r along the last dimension (one sphere per row; a vector is one row).

Used for embedding tables (each row a token vector of fixed norm) and for hyperspherical descent.
- Projection: r·w/‖w‖ (a zero row has no nearest point: it is refused).
- Tangent space at w: {v : wᵀv = 0}; projection P(g) = g − w(wᵀg)/r².
- Retraction: r·(w + v)/‖w + v‖.
Normalising computes r·y/‖y‖ with y = w/max_i|wᵢ| (the same point, as w/‖w‖ is scale-invariant):
‖w‖ itself overflows in fp32 for entries near 1e19 and underflows to 0 near 1e-23.
All methods need real floating tensors (an integer result would be truncated). Rows are
independent and computed by arithmetic alone (no factorisation, unlike Stiefel's projection), so
a row with a NaN or Inf comes out NaN, as from torch.nn.functional.normalize, and the other rows
are unaffected (the hyperspherical step relies on it to leave such a row alone); ``distance`` is
NaN for it, as Stiefel's is. A tensor without entries maps to one of the same shape, at distance 0.
"""
from __future__ import annotations

import math

import torch

from .._checks import is_finite_real
from ..linalg.msign import resolve_compute_dtype
from ._shared import (check_random_dtype, check_real_floating, max_abs, random_shape, residual_ratio,
                      unit_peak)


class Sphere:
    name = "sphere"

    def __init__(self, radius: float = 1.0):
        if isinstance(radius, torch.Tensor) and radius.numel() == 1 and radius.dtype != torch.bool:
            radius = radius.item()
        if not (is_finite_real(radius) and radius > 0):  # (float() took True as 1.0)
            raise ValueError(f"Sphere radius must be a positive finite float, got {radius!r}")
        self.radius = float(radius)

    def __repr__(self) -> str:
        return f"Sphere(radius={self.radius!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Sphere) and other.radius == self.radius

    def __hash__(self):
        return hash(("sphere", self.radius))

    def check_shape(self, shape, name: str = "w") -> None:
        if len(shape) < 1 or shape[-1] < 1:
            raise ValueError(f"Sphere needs a non-empty last dimension; {name} has shape {tuple(shape)}")

    @staticmethod
    def _unit_scaled(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, c): each row of X in the compute dtype divided by c = its max |entry| (1 for a zero
        row), so that ‖y‖ ∈ [1, √n] is computed without overflow or underflow of the squares."""
        X = X.to(resolve_compute_dtype(X.dtype, None))
        amax = max_abs(X, -1, keepdim=True)
        c = torch.where(amax > 0, amax, torch.ones_like(amax))
        return X / c, c

    def _normalize(self, X: torch.Tensor) -> torch.Tensor:
        """r·x/‖x‖ = r·y/‖y‖ per row (y from ``_unit_scaled``; a zero row gives 0/0 = NaN)."""
        Y, _ = self._unit_scaled(X)
        norms = torch.linalg.vector_norm(Y, dim=-1, keepdim=True)
        return Y.mul_(self.radius).div_(norms)  # (r·y)/‖y‖ as before, in place: Y is ours

    def _check_pair(self, W: torch.Tensor, V: torch.Tensor, names: str, where: str) -> None:
        """W and a tangent-side tensor of W's shape (V of shape (3,) at W (4, 3) was broadcast
        silently, one vector for every row)."""
        check_real_floating(W, names[0], where)
        check_real_floating(V, names[1], where)
        if V.shape != W.shape:
            raise ValueError(f"{where}: {names[1]} must have W's shape {tuple(W.shape)}, got {tuple(V.shape)}")

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """r·w/‖w‖ per row; a zero row has no nearest point and is refused (ValueError); a row with a
        NaN or Inf gives a NaN row (see the module docstring)."""
        check_real_floating(W, "W", "Sphere.project")
        if W.numel() == 0:  # no rows, or rows without entries: nothing to project (a row max raised)
            return W.clone()
        if bool((W == 0).all(dim=-1).any()):
            raise ValueError("Sphere.project: a zero row has no nearest point on the sphere")
        return self._normalize(W).to(W.dtype)

    def tangent(self, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        self._check_pair(W, V, "WV", "Sphere.tangent")
        # with U = W/r, which is O(1) on the sphere: r² under- or overflowed beyond r ≈ 1e∓19 in fp32
        # (a tangent of inf, NaN weights), and fp16 products overflowed at r = 300 (a probe)
        out = torch.result_type(W, V)
        compute = resolve_compute_dtype(out, None)
        U, Vc = W.to(compute) / self.radius, V.to(compute)
        return (Vc - U * (U * Vc).sum(-1, keepdim=True)).to(out)

    def tangent_residual(self, W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """‖(⟨wᵢ, aᵢ⟩/r)ᵢ‖ / ‖A‖_F over the rows of each matrix (0 for A = 0, NaN for a NaN), at any
        radius and size of A; in the compute dtype (fp32 for bf16/fp16, as ``distance``)."""
        self._check_pair(W, A, "WA", "Sphere.tangent_residual")
        compute = resolve_compute_dtype(torch.result_type(W, A), None)
        # scale-free: A at unit size and each row's ⟨w, a⟩ divided by r before the norm squares it
        # (w/r is O(1) on the sphere); unscaled, the products over- or underflowed in fp32: NaN at
        # r = 1e20, and a false 0 for a radial A at r = 1e-25 (a probe). The row dots by einsum
        # and no W/r, so one table-sized temporary (A at unit size): sphere_step reports this for
        # whole embedding tables every step, and each such temporary cost ~20–50 ms on 32000×512
        # (CPU; 49 → 71 ms for the residual with it, ~3 % of that step, a review)
        Au = unit_peak(A.to(compute))
        num = torch.linalg.vector_norm(torch.einsum("...j,...j->...", W.to(compute), Au) / self.radius, dim=-1)
        den = torch.linalg.vector_norm(Au, dim=(-2, -1)) if A.ndim >= 2 else torch.linalg.vector_norm(Au)
        return residual_ratio(num, den)

    def retract(self, W: torch.Tensor, V: torch.Tensor, method: str = "normalize") -> torch.Tensor:
        """r·(w + v)/‖w + v‖ per row; "polar" is the same map (a row's polar factor is w/‖w‖).

        A row with w + v = 0 (v = −w, not a tangent step) has no point to normalise and comes out
        NaN, as a row with a NaN does; it is not refused as ``project`` refuses a zero row, since
        sphere_step retracts whole tables and then keeps their zero (padding) rows as they were."""
        if method not in ("normalize", "polar"):
            raise ValueError(f"Sphere.retract: unknown method {method!r}; choose 'normalize' or 'polar' (the same map)")
        self._check_pair(W, V, "WV", "Sphere.retract")
        X = W + V
        if X.numel() == 0:  # (as in project)
            return X
        return self._normalize(X).to(X.dtype)

    def distance(self, W: torch.Tensor, skip_zero_rows: bool = False) -> torch.Tensor:
        """max over rows of |‖w‖/r − 1| (over the nonzero rows with ``skip_zero_rows``: an
        embedding's padding row is zero by design); NaN if a row has a NaN or Inf, 0 for a tensor
        without entries."""
        check_real_floating(W, "W", "Sphere.distance")
        compute = resolve_compute_dtype(W.dtype, None)
        if W.numel() == 0:
            return torch.zeros(W.shape[:-2], dtype=compute, device=W.device)
        # two reductions and no row-sized temporaries: sphere_step reports this for whole embedding
        # tables every step (scaling every row first made it 34× slower on 32000×512)
        norms = torch.linalg.vector_norm(W, dim=-1, dtype=compute)
        amax = max_abs(W, -1).to(compute)  # 0 exactly for a zero row
        lost = ((norms == 0) & (amax > 0)) | (torch.isinf(norms) & torch.isfinite(amax))
        if bool(lost.any()):  # the squares under- or overflowed (rows near 1e±20 in fp32): those scaled
            Y, c = self._unit_scaled(W)
            norms = torch.where(lost, c.squeeze(-1) * torch.linalg.vector_norm(Y, dim=-1), norms)
        # an Inf entry: its row's distance is NaN, as Stiefel.distance's (its norm's |inf − 1| was inf)
        d = torch.where(torch.isinf(amax), torch.full_like(norms, math.nan), (norms / self.radius - 1).abs())
        if skip_zero_rows:  # rows exactly zero: a tiny row is not padding
            d = torch.where(amax == 0, torch.zeros_like(d), d)  # (a NaN row stays NaN)
        return d.amax(dim=-1) if W.ndim >= 1 else d

    def random(self, *size, shape=None, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        # random(64, 32), random((64, 32)) (as torch.randn) or random(shape=(64, 32))
        shape = random_shape(size, shape, "Sphere.random")
        self.check_shape(shape)
        check_random_dtype(dtype, self.radius, "radius", "Sphere.random")
        G = torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)
        return (self.radius * G / torch.linalg.vector_norm(G, dim=-1, keepdim=True)).to(dtype)
