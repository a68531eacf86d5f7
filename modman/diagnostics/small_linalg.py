"""The tracker's small dense linear algebra on CPU, through NumPy and SciPy's BLAS and LAPACK.

A record of ``SpectrumTracker`` on a small model is a few dozen calls on matrices of a hundred
rows or so, where the cost is per call, not per flop. Measured on the MNIST-1D MLP's 128×128
layer (one thread, AMD EPYC, torch 2.13 with MKL): torch's fp64 Gram product and Cholesky took
200 and 220 µs against 120 µs each for SciPy's dsyrk and dpotrf, and a tensor operation ~7 µs
against ~3 µs for a NumPy one; the σ-extremes of that layer took 0.84 ms in torch and 0.38 ms
here. The tracker uses these functions for CPU weights and torch for GPU ones (same iterations).

Every Gram matrix here is the smaller one (XᵀX for tall X, XXᵀ for wide), and only its upper
triangle is formed (dsyrk) and read (dsymv, dpotrf).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import blas, lapack

def numpy_matrix(W: torch.Tensor, dtype=torch.float64) -> np.ndarray:
    """A CPU matrix as a NumPy array of ``dtype`` (a view when it already is one)."""
    return W.detach().to(dtype).numpy()


def gram_upper(X: np.ndarray) -> np.ndarray:
    """The smaller Gram matrix of X (XᵀX or XXᵀ); its upper triangle only is set."""
    syrk = blas.dsyrk if X.dtype == np.float64 else blas.ssyrk
    # X is row-major, i.e. Xᵀ is column-major, the order BLAS reads without a copy
    return syrk(1.0, X.T, trans=0 if X.shape[0] >= X.shape[1] else 1)


def gram_eigenvalues(W: torch.Tensor) -> list[float]:
    """σᵢ² of a CPU matrix, ascending, from its smaller fp64 Gram matrix (its exact spectrum);
    all NaN for a matrix with a NaN or an infinity (where LAPACK would fail to converge)."""
    g = gram_upper(numpy_matrix(W))
    if not np.isfinite(g).all():
        return [math.nan] * g.shape[0]
    return np.linalg.eigvalsh(g, UPLO="U").tolist()


def largest_singular_value(D: np.ndarray) -> float:
    """‖D‖₂ exactly, from the largest eigenvalue of D's smaller Gram matrix in D's dtype (NaN for
    a matrix with a NaN or an infinity)."""
    g = gram_upper(D)
    if not np.isfinite(g).all():
        return math.nan
    return math.sqrt(max(float(np.linalg.eigvalsh(g, UPLO="U")[-1]), 0.0))


def _unit(v: np.ndarray) -> np.ndarray:
    """v/‖v‖ in v's dtype; a zero vector stays zero."""
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def top_eigenvalue(g: np.ndarray, v: np.ndarray, iters: int) -> tuple[float, np.ndarray]:
    """The largest eigenvalue of the symmetric g (upper triangle) from below: ``iters`` power
    iterations from v, then the Rayleigh quotient. Returns it and the last vector."""
    for _ in range(iters):
        v = _unit(blas.dsymv(1.0, g, v))
    return float(v @ blas.dsymv(1.0, g, v)), v


def bottom_eigenvalue(g: np.ndarray, v: np.ndarray, iters: int) -> tuple[float, np.ndarray | None]:
    """The smallest eigenvalue of the symmetric positive semi-definite g from above: ``iters``
    inverse iterations from v through one Cholesky factor, then the Rayleigh quotient. A
    singular g (no factor) gives 0 and no vector."""
    factor, info = lapack.dpotrf(g, lower=0, clean=1)
    if info != 0:
        return 0.0, None
    for _ in range(iters):
        v = _unit(lapack.dpotrs(factor, v, lower=0)[0])
    return float(v @ blas.dsymv(1.0, g, v)), v


def spectral_norm(D: np.ndarray, v: np.ndarray, iters: int) -> tuple[float, np.ndarray]:
    """‖D‖₂ from below by power iteration on D itself (v ← DᵀDv, no Gram matrix), from v."""
    for _ in range(iters):
        v = _unit(D.T @ (D @ v))
    return float(np.linalg.norm(D @ v)), v
