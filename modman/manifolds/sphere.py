"""Spheres of radius r along the last dimension (one sphere per row; a vector is one row).

Used for embedding tables (each row a token vector of fixed norm) and for hyperspherical descent.
- Projection: r·w/‖w‖ (a zero row has no nearest point: it is refused).
- Tangent space at w: {v : wᵀv = 0}; projection P(g) = g − w(wᵀg)/r².
- Retraction: r·(w + v)/‖w + v‖.
"""
from __future__ import annotations

import math

import torch

from ..linalg.msign import resolve_compute_dtype


class Sphere:
    name = "sphere"

    def __init__(self, radius: float = 1.0):
        radius = float(radius)
        if not math.isfinite(radius) or radius <= 0:
            raise ValueError(f"Sphere radius must be a positive finite float, got {radius}")
        self.radius = radius

    def __repr__(self) -> str:
        return f"Sphere(radius={self.radius!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Sphere) and other.radius == self.radius

    def __hash__(self):
        return hash(("sphere", self.radius))

    def check_shape(self, shape, name: str = "w") -> None:
        if len(shape) < 1 or shape[-1] < 1:
            raise ValueError(f"Sphere needs a non-empty last dimension; {name} has shape {tuple(shape)}")

    def project(self, W: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(W.to(resolve_compute_dtype(W.dtype, None)), dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("Sphere.project: a zero row has no nearest point on the sphere")
        return (self.radius * W / norms).to(W.dtype)

    def tangent(self, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return V - W * ((W * V).sum(-1, keepdim=True) / self.radius**2)

    def tangent_residual(self, W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """‖⟨w, a⟩/r‖ / ‖A‖_F over rows (0 for A = 0)."""
        num = torch.linalg.vector_norm((W * A).sum(-1) / self.radius, dim=-1)
        den = torch.linalg.vector_norm(A, dim=(-2, -1)) if A.ndim >= 2 else torch.linalg.vector_norm(A)
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    def retract(self, W: torch.Tensor, V: torch.Tensor, method: str = "normalize") -> torch.Tensor:
        if method not in ("normalize", "polar"):
            raise ValueError(f"unknown Sphere retraction {method!r}; use 'normalize'")
        X = W + V
        return self.radius * X / torch.linalg.vector_norm(X, dim=-1, keepdim=True)

    def distance(self, W: torch.Tensor, skip_zero_rows: bool = False) -> torch.Tensor:
        """max over rows of |‖w‖/r − 1| (over the nonzero rows with ``skip_zero_rows``: an
        embedding's padding row is zero by design)."""
        norms = torch.linalg.vector_norm(W.to(resolve_compute_dtype(W.dtype, None)), dim=-1)
        d = (norms / self.radius - 1).abs()
        if skip_zero_rows:
            d = torch.where(norms > 0, d, torch.zeros_like(d))
        return d.amax(dim=-1) if W.ndim >= 1 else d

    def random(self, shape, *, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        self.check_shape(shape)
        G = torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)
        return (self.radius * G / torch.linalg.vector_norm(G, dim=-1, keepdim=True)).to(dtype)
