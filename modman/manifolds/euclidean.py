"""Euclidean space: every point is on the manifold, every vector is tangent."""
from __future__ import annotations

import torch

from ._shared import check_tensor, random_shape

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

    @staticmethod
    def _check_pair(W: torch.Tensor, V: torch.Tensor, names: str, where: str) -> None:
        """W and a tangent-side tensor of W's shape, as Sphere and Stiefel take them (V of shape
        (3,) at W (4, 3) was broadcast by retract, one vector added to every row; a probe)."""
        check_tensor(W, names[0], where)
        check_tensor(V, names[1], where)
        if V.shape != W.shape:
            raise ValueError(f"{where}: {names[1]} must have W's shape {tuple(W.shape)}, got {tuple(V.shape)}")

    def project(self, W: torch.Tensor) -> torch.Tensor:
        check_tensor(W, "W", "Euclidean.project")
        return W.clone()

    def tangent(self, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        self._check_pair(W, V, "WV", "Euclidean.tangent")
        return V

    def tangent_residual(self, W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        self._check_pair(W, A, "WA", "Euclidean.tangent_residual")
        return torch.zeros((), dtype=A.dtype, device=A.device)

    def retract(self, W: torch.Tensor, V: torch.Tensor, method: str = "add") -> torch.Tensor:
        if method != "add":  # as Stiefel and Sphere refuse a method they do not have
            raise ValueError(f"Euclidean.retract: unknown method {method!r}; the only one is 'add' (W + V)")
        self._check_pair(W, V, "WV", "Euclidean.retract")
        return W + V

    def distance(self, W: torch.Tensor) -> torch.Tensor:
        check_tensor(W, "W", "Euclidean.distance")
        return torch.zeros((), dtype=W.dtype, device=W.device)

    def random(self, *size, shape=None, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        # random(64, 32), random((64, 32)) (as torch.randn) or random(shape=(64, 32)); random(()) a scalar
        if not size and shape is None:  # (torch.randn() itself raised, listing its overloads)
            raise TypeError("Euclidean.random: give a shape, as random(64, 32) or random(shape=(64, 32))")
        shape = random_shape(size, shape, "Euclidean.random")
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)  # (randn(*()) raised)
