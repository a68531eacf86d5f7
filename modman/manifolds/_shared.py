"""What Stiefel, Sphere and Euclidean share: argument checks and the pieces of a scale-free
tangent residual."""
from __future__ import annotations

import torch

from .._checks import shape_from
from ..linalg.blocked import power_of_two_floor
from ..linalg.msign import check_floating


def check_tensor(x, name: str, where: str) -> None:
    """Refuse what is not a tensor by name: a float or a nested list failed inside with an
    AttributeError ('float' object has no attribute 'is_floating_point'; a probe)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")


def check_real_floating(x, name: str, where: str) -> None:
    """A tensor with a real floating dtype (see ``check_floating``)."""
    check_tensor(x, name, where)
    check_floating(x, name, where)


def random_shape(size: tuple, shape, where: str) -> tuple[int, ...]:
    """The shape a ``random`` was given: positionally as torch.randn takes it, random(64, 32) or
    random((64, 32)), or as ``shape=`` — not both (random(4, 2, shape=(3, 3)) returned a 3×3
    point, the 4, 2 ignored; a probe)."""
    if size and shape is not None:
        raise TypeError(f"{where}: give the shape once, positionally or as shape=; got {size!r} and shape={shape!r}")
    return shape_from(size if shape is None else (shape,), where)


def check_random_dtype(dtype, size: float, what: str, where: str) -> None:
    """A real floating dtype whose normal range holds ``size`` (the radius or scale, which bounds
    the entries): an integer dtype truncated the point to zeros, and fp16 rounded a radius of 1e20
    to ±inf entries (a probe); a subnormal one keeps only a few bits of every entry."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be a real floating dtype, got {dtype!r}")
    info = torch.finfo(dtype)
    if not info.tiny <= size <= info.max:
        raise ValueError(f"{where}: {what} {size!r} is outside the normal range of {dtype} "
                         f"[{info.tiny:.3g}, {info.max:.3g}]; use a wider dtype")


def max_abs(X: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """max |x| over ``dim`` (NaN where a NaN is), from amax and amin: no X-sized temporary as
    X.abs() makes, and on CPU 7 ms on 32000×512 rows where an ord=inf vector_norm took 55
    (sphere_step runs this on whole embedding tables every step)."""
    return torch.maximum(X.amax(dim=dim, keepdim=keepdim), X.amin(dim=dim, keepdim=keepdim).neg())


def unit_peak(A: torch.Tensor) -> torch.Tensor:
    """A divided by the power of two at its largest entry, per matrix (per vector for a 1-D A):
    exact, and the largest entry then lies in [1, 2), so squares and products with an O(1) point
    neither overflow nor underflow. A residual is linear in A, so this does not change it."""
    if A.numel() == 0:  # (no entry has a maximum)
        return A
    return A / power_of_two_floor(max_abs(A, (-2, -1) if A.ndim >= 2 else -1, keepdim=True))


def residual_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/‖A‖ with den = ‖A‖: 0 for A = 0, NaN where either is NaN (a NaN A read 0 when the test
    was den > 0)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))
