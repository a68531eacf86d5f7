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
from scipy.linalg import blas, eigh_tridiagonal, lapack

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


def lanczos_extremes(g: np.ndarray, v: np.ndarray, steps: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(θ_min, θ_max, u_min, u_max): the extreme Ritz values of ``steps`` Lanczos steps on the
    symmetric g (upper triangle) from v, with full reorthogonalisation, and their Ritz vectors.
    One-sided: λ_min ≤ θ_min and θ_max ≤ λ_max up to rounding of order eps·‖g‖ (each θ is the
    Rayleigh quotient of its unit Ritz vector).

    Krylov methods are shift-invariant where power and inverse iteration are not: a weight on its
    manifold has a Gram spectrum 1 ± 1e-6, on which a power iteration's ratio λ₂/λ₁ is 1 − 1e-6
    and the estimates stay at the cluster's middle (a probe measured the distance 10× low), while
    Lanczos resolves it as it would the same spectrum spread over [0, 2]. Cost: ``steps``
    symmetric matrix-vector products and the reorthogonalisation (2·n·steps² flops)."""
    n = g.shape[0]
    k = min(int(steps), n)
    Q = np.zeros((n, k))
    alpha, beta = np.zeros(k), np.zeros(k)
    q = _unit(v.astype(np.float64))
    if not np.linalg.norm(q) > 0:
        q = _unit(np.linspace(1.0, 2.0, n))
    scale = 0.0
    for j in range(k):
        Q[:, j] = q
        w = blas.dsymv(1.0, g, q)
        alpha[j] = q @ w
        scale = max(scale, abs(alpha[j]))
        for _ in range(2):  # twice is enough (Kahan–Parlett): Q stays orthonormal to rounding
            w -= Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        b = float(np.linalg.norm(w))
        if j + 1 == k or b <= 1e-13 * scale:  # done, or an invariant subspace: its Ritz values are exact
            k = j + 1
            break
        beta[j], q = b, w / b
    theta, Y = eigh_tridiagonal(alpha[:k], beta[:k - 1])
    return float(theta[0]), float(theta[-1]), Q[:, :k] @ Y[:, 0], Q[:, :k] @ Y[:, -1]

