"""Euclidean space: every point is on the manifold, every vector is tangent."""
from __future__ import annotations

import torch

from .._checks import shape_from

class Euclidean:
    name = "euclidean"

    def __repr__(self) -> str:
        return "Euclidean()"

    def __eq__(self, other) -> bool:
        return isinstance(other, Euclidean)

    def __hash__(self):
        return hash("euclidean")

    def check_shape(self, shape, name: str = "w") -> None:
        return None

    def project(self, W: torch.Tensor) -> torch.Tensor:
        return W.clone()

    def tangent(self, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return V

    def tangent_residual(self, W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=A.dtype, device=A.device)

    def retract(self, W: torch.Tensor, V: torch.Tensor, method: str = "add") -> torch.Tensor:
        if method != "add":  # as Stiefel and Sphere refuse a method they do not have
            raise ValueError(f"Euclidean.retract: unknown method {method!r}; the only one is 'add' (W + V)")
        return W + V

    def distance(self, W: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=W.dtype, device=W.device)

    def random(self, *size, shape=None, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        # random(64, 32), random((64, 32)) (as torch.randn) or random(shape=(64, 32)); random(()) a scalar
        if not size and shape is None:  # (torch.randn() itself raised, listing its overloads)
            raise TypeError("Euclidean.random: give a shape, as random(64, 32) or random(shape=(64, 32))")
        shape = shape_from(size if shape is None else (shape,), "Euclidean.random")
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)  # (randn(*()) raised)
