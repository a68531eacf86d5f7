"""What modman's arguments accept as numbers: Python's and numpy's, never a bool.

A bool is an ``int`` to Python, so ``rank=True`` would pass an int check as 1 and ``lr=True`` a
float check as 1.0: every check here refuses it. numpy scalars (``np.int64(8)``, ``np.float32``)
pass, as they do in torch's own argument checks.
"""
from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (Python or numpy, integers included, inf and NaN too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """A finite real number (Python or numpy, integers included), not a bool."""
    return is_real(value) and math.isfinite(value)


def shape_from(args: tuple, where: str) -> tuple[int, ...]:
    """A shape given as torch.randn takes one: ``f(64, 32)`` or ``f((64, 32))`` (a tuple, list or
    torch.Size), as a tuple of Python ints ≥ 0; a TypeError naming ``where`` otherwise."""
    dims = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
    if not all(is_int(d) and d >= 0 for d in dims):
        raise TypeError(f"{where}: shape must be non-negative ints, as f(64, 32) or f((64, 32)); got {args!r}")
    return tuple(int(d) for d in dims)
