"""fp64 reductions over tall matrices, one block of rows at a time.

The certificate and the solvers need n×n products of m×n matrices (XᵀY) and inner products in
fp64. Casting whole fp32 operands to fp64 costs 2× their size per copy; summing the products of
row blocks cast one at a time gives the same fp64 result (to summation order) with temporaries of
at most ``BLOCK_FRACTION`` of an operand. Every function takes (…, m, n) batches.
"""
from __future__ import annotations

import math

import torch

BLOCK_FRACTION = 1 / 8  # an fp64 block of rows is at most this fraction of the fp32 operand's bytes
MIN_BLOCK_ROWS = 128  # below this a block's product is no longer an efficient GEMM


def row_blocks(m: int):
    """Slices of ⌈m/16⌉ rows (an fp64 block is then ≤ 1/8 of the fp32 operand), at least 128 rows
    each so that every block is still an efficient matrix product (on a 1024² Gram, 128-row blocks
    took 0.91× the time of 64-row ones; a 128-row fp64 block of a 1024-wide matrix is 1 MB)."""
    step = max(MIN_BLOCK_ROWS, math.ceil(m * BLOCK_FRACTION / 2))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def add_gram(out: torch.Tensor | None, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """out + XᵀY, accumulated into ``out`` in place (a new tensor when out is None): no n×n
    temporary per row block (on 1024² a fresh 8 MB product and an add per block cost 40 % of the
    Gram's time)."""
    if out is None:
        return X.mT @ Y
    if out.ndim == X.ndim == Y.ndim == 2:
        return out.addmm_(X.mT, Y)
    if out.ndim == X.ndim == Y.ndim == 3 and X.shape[0] == Y.shape[0] == out.shape[0]:
        return out.baddbmm_(X.mT, Y)
    return out.add_(X.mT @ Y)  # other batch shapes, broadcasting X against Y as matmul does


def gram64(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """XᵀY (XᵀX when Y is None) in fp64, (…, n, n), summed over row blocks."""
    out = None
    for sl in row_blocks(X.shape[-2]):
        xb = X[..., sl, :].double()
        out = add_gram(out, xb, xb if Y is None else Y[..., sl, :].double())
    return out


def power_of_two_floor(x: torch.Tensor) -> torch.Tensor:
    """Elementwise the power of two c with c ≤ x < 2c (1 where x is 0 or not finite), in x's
    dtype: dividing by it is exact (no rounding, barring underflow), so it scales a matrix by its
    largest entry to unit size without changing a bit of its mantissas."""
    ok = (x > 0) & torch.isfinite(x)
    exponent = torch.frexp(torch.where(ok, x, torch.ones_like(x))).exponent - 1
    return torch.where(ok, torch.ldexp(torch.ones_like(x), exponent), torch.ones_like(x))


def scaled_norm64(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max|X|, ‖X‖_F/max|X|) over the last two dims in fp64, each (…, 1, 1) — ‖X‖_F without
    forming it: the sum of squares of X/max|X| over fp64 row blocks, so neither overflows nor
    underflows (a plain fp32 norm overflows from ‖X‖ ≈ 1.8e19 and an fp64 one from ≈ 1.3e154, both
    lose denormal entries, and ‖X‖_F itself can exceed the fp64 maximum). The ratio is in
    [1, √(mn)], or 0 for X = 0."""
    amax = torch.linalg.vector_norm(X, ord=math.inf, dim=(-2, -1), keepdim=True).double()
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    total = torch.zeros_like(amax)
    for sl in row_blocks(X.shape[-2]):
        total += (X[..., sl, :].double() / safe).square().sum((-2, -1), keepdim=True)
    return amax, total.sqrt()


def dot64(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """⟨X, Y⟩ over the last two dims in fp64, summed over row blocks."""
    out = None
    for sl in row_blocks(X.shape[-2]):
        term = (X[..., sl, :].double() * Y[..., sl, :].double()).sum((-2, -1))
        out = term if out is None else out + term
    return out


def combine_rows(out: torch.Tensor, X: torch.Tensor, P: torch.Tensor | None = None, Y: torch.Tensor | None = None,
                 Q: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out ← X·P + Y·Q (P None: X itself; Y None: no second term; then × ``scale``, shaped (…, 1, 1)),
    each row block computed in fp64 and rounded once into ``out``'s dtype (P, Q fp64 (…, n, n)).
    ``out`` may be X or Y itself: each block is read before it is written."""
    for sl in row_blocks(X.shape[-2]):
        acc = X[..., sl, :].double()
        if P is not None:
            acc = acc @ P
        if Y is not None:
            acc = acc + Y[..., sl, :].double() @ Q
        if scale is not None:
            acc = acc * scale
        out[..., sl, :] = acc
    return out
