"""msign: the polar factor of a matrix, msign(X) = U Vᵀ for the thin SVD X = U Σ Vᵀ.

Newton–Schulz computes it with matrix products only. Orient X so that the Gram matrix is the
small one (m ≤ n), scale it so every singular value lies in (0, 1], then repeat

    S = X Xᵀ;   X ← a·X + (b·S + c·S²)·X

which maps every singular value x through the odd quintic p(x) = a x + b x³ + c x⁵.

Normalisation. The usual bound σ_max ≤ ‖X‖_F is loose by up to √rank, which pushes the small
singular values below the schedule's design interval (Polar Express assumes σ ≥ 1e-3·σ_max).
We use the tighter bound σ_max² = λ_max(X Xᵀ) ≤ min(‖X Xᵀ‖_F, ‖X Xᵀ‖_∞), from the Gram matrix
that the first iteration needs anyway (n² more work). ‖X Xᵀ‖_F^{1/2} = (Σσ⁴)^{1/4} alone is loose
by n^{1/4} on a flat spectrum (X Xᵀ ≈ c·I, where the largest row sum is tight; elsewhere the
smaller of the two, e.g. 1.8× against 4.75× loose on a 512² flat-top spectrum): a flat-top
spectrum at κ = 1e3 ended 10 iterations at max|σ − 1| = 5.9e-5 on 2048² and 1.7e-5 on
4096×1536, its smallest σ pushed below the design floor. A prior division by max|X| keeps
1e-30 and 1e30 inputs inside the floating-point range, and an all-zero matrix maps to zero.
"""
from __future__ import annotations


import torch

from .._checks import is_int
from .schedules import SCHEDULES, check_schedule, coefficients, default_steps

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating(x: torch.Tensor, name: str, where: str) -> None:
    """Refuse a tensor without a real floating dtype: computing in fp32 and casting the result
    back to an integer (or bool) dtype would truncate it silently, e.g. a polar factor to zeros."""
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must have a real floating dtype, got {x.dtype}")


def resolve_compute_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    """fp32/fp64 compute in their own precision, bf16/fp16 in fp32, unless told otherwise."""
    if compute_dtype is not None:
        if compute_dtype not in _FLOAT_TYPES:  # an integer iteration would truncate every iterate
            raise TypeError(f"compute_dtype must be one of {_FLOAT_TYPES}, got {compute_dtype!r}")
        return compute_dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def msign(
    X: torch.Tensor,
    *,
    schedule: str = "polar_express",
    steps: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str = "auto",
    normalization: str = "gram",
) -> torch.Tensor:
    """Polar factor of the last two dimensions of ``X``, batched over leading dimensions.

    Args:
        X: a floating tensor with at least two dimensions, of any orientation.
        schedule: ``"polar_express"`` (default; converges), ``"keller"`` (Muon's fixed quintic;
            after its 5 steps singular values end in about [0.68, 1.13] for a condition number up
            to 100, in [0.39, 1.20] at 1000: it does not converge), ``"convergent"`` (the quintic with
            p(1) = 1, p'(1) = p''(1) = 0, for polishing nearly orthogonal inputs), or ``"svd"``
            (exact, in fp32 at least; singular values below rank tolerance map to zero; no steps).
        steps: number of Newton–Schulz iterations; ``None`` uses the schedule's default.
        compute_dtype: dtype of the iteration; defaults to X's dtype for fp32/fp64 and to fp32
            for bf16/fp16 (an fp32 input is never silently computed in bf16).
        backend: ``"torch"``, ``"triton"`` (fused kernels, see ``modman.kernels``; not
            differentiable: refused for an X that needs a gradient) or ``"auto"`` (Triton on CUDA
            when installed, for bf16/fp16 compute and a matrix large enough to win, and X needs no
            gradient; torch otherwise).
        normalization: ``"gram"`` (σ_max ≤ min(‖XXᵀ‖_F, ‖XXᵀ‖_∞)^{1/2}, default) or
            ``"frobenius"`` (σ_max ≤ ‖X‖_F, as in the published reference code).

    Returns:
        A tensor of X's shape and dtype: a matrix with a NaN or an infinity gives NaN from the
        iterations (the SVD raises torch's LinAlgError), a zero matrix zeros.
    """
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"msign expects a torch.Tensor, got {type(X).__name__}")
    if X.ndim < 2:
        raise ValueError(f"msign needs at least 2 dimensions, got shape {tuple(X.shape)}")
    if X.dtype not in _FLOAT_TYPES:
        raise TypeError(f"msign supports real floating dtypes {_FLOAT_TYPES}, got {X.dtype}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if normalization not in ("gram", "frobenius"):
        raise ValueError(f"normalization must be 'gram' or 'frobenius', got {normalization!r}")
    check_schedule(schedule)  # (with steps given, an unknown name was a bare KeyError)
    if steps is None:
        steps = default_steps(schedule)
    elif is_int(steps):  # numpy integers too
        steps = int(steps)
    else:  # int(2.7) would run 2 steps without a word; True would run 1
        raise TypeError(f"steps must be an int or None, got {steps!r} ({type(steps).__name__})")
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    if schedule == "svd" and steps:  # (ignored silently before)
        raise ValueError(f"steps has no meaning for schedule='svd' (an exact SVD), got {steps}")
    dtype = resolve_compute_dtype(X.dtype, compute_dtype)
    if schedule == "svd" and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # LAPACK has no half-precision SVD ("linalg_svd_cpu" not implemented)
    needs_grad = X.requires_grad and torch.is_grad_enabled()
    if backend == "triton" and needs_grad:  # (the kernels' output silently had no grad_fn)
        raise ValueError("msign: backend='triton' is not differentiable and X requires grad; use "
                         "backend='torch', or call it under torch.no_grad()")
    if backend == "triton":  # checked whatever X is: an empty X or the SVD returned without a word
        if schedule == "svd":
            raise ValueError("backend='triton' runs Newton–Schulz iterations and schedule='svd' is an exact SVD; "
                             "use backend='torch' or 'auto' for it")
        from modman import kernels

        kernels.check_backend(X, dtype)
    if X.numel() == 0:
        return X.clone()
    if schedule == "svd":
        return _msign_svd(within_range(X, dtype).to(dtype)).to(X.dtype)

    transposed = X.shape[-2] > X.shape[-1]
    Y = X.mT if transposed else X
    batch_shape = Y.shape[:-2]
    Y = within_range(Y.reshape(-1, *Y.shape[-2:]), dtype).to(dtype)
    Y, gram = _normalise(Y, normalization, SCHEDULES[schedule][2])
    coeffs = coefficients(schedule, steps)
    if not needs_grad and _use_triton(Y, backend):
        from modman import kernels

        Y = kernels.newton_schulz(Y, coeffs, gram_matrix=gram)
    else:
        Y = newton_schulz(Y, coeffs, gram=gram)
    Y = Y.reshape(*batch_shape, *Y.shape[-2:])
    if transposed:
        Y = Y.mT
    if needs_grad:
        # msign(0) = 0, a convention at a discontinuity: its gradient is 0 too (the iteration's
        # derivative at 0 is the product of the schedule's linear coefficients, ~1e4 here)
        zero = X.detach().eq(0).flatten(-2).all(-1)[..., None, None]
        Y = torch.where(zero, torch.zeros_like(Y), Y)
    return Y.to(X.dtype)


def newton_schulz(
    X: torch.Tensor, coeffs: list[tuple[float, float, float]], gram: torch.Tensor | None = None
) -> torch.Tensor:
    """Quintic Newton–Schulz iterations on a batch X of shape (b, m, n) (or one matrix (m, n)),
    m ≤ n, ‖X‖₂ ≤ 1.

    ``gram`` may carry X Xᵀ for the first iteration. Three batched products per iteration:
    X Xᵀ, S² (fused with b·S by baddbmm) and (b·S + c·S²)·X (fused with a·X). S is released
    before the new X is made, so the iteration holds three matrices of X's size, not four.
    """
    if X.ndim == 2:  # (baddbmm failed on it with a bare IndexError, a probe)
        return newton_schulz(X[None], coeffs, None if gram is None else gram[None])[0]
    if X.ndim != 3:
        raise ValueError(f"newton_schulz: X must be (b, m, n) or (m, n), got shape {tuple(X.shape)}")
    for i, (a, b, c) in enumerate(coeffs):
        S = gram if (i == 0 and gram is not None) else X @ X.mT
        S = torch.baddbmm(S, S, S, beta=b, alpha=c)
        X = torch.baddbmm(X, S, X, beta=a, alpha=1.0)
    return X


def within_range(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """X divided by max|X| per matrix, in X's own dtype, where ``dtype`` has a narrower exponent
    range than X's (fp32 → fp16, fp64 → fp32/bf16): msign(cX) = msign(X), and the cast alone made
    an fp32 X at 1e5 NaN in fp16 and an fp64 one at 1e-300 zero in fp32 (a probe). X itself
    otherwise (``_normalise`` divides by max|X| after the cast, in the compute dtype), also for
    fp32 → bf16: the same exponents (bf16's largest value is 0.4 % below fp32's), where the extra
    pass cost 7× the cast (a review)."""
    wide, narrow = torch.finfo(X.dtype), torch.finfo(dtype)
    if narrow.max >= wide.max / 2 and narrow.tiny <= wide.tiny:
        return X
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    return X / torch.where(amax > 0, amax, torch.ones_like(amax))


def _normalise(Y: torch.Tensor, normalization: str, safety: float):
    """Scale each matrix of the batch so that σ_max ≤ 1/safety; return it and its Gram."""
    amax = Y.abs().amax(dim=(-2, -1), keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    Y = Y / amax
    if normalization == "frobenius":
        norm = torch.linalg.matrix_norm(Y, keepdim=True) * safety
        return Y / torch.where(norm > 0, norm, torch.ones_like(norm)), None
    gram = Y @ Y.mT
    # λ_max(S) ≤ ‖S‖_F and ≤ ‖S‖_∞ (the largest absolute row sum) for symmetric S: the Frobenius
    # bound is loose by up to √n on a flat spectrum (S ≈ c·I), where the row sums are tight.
    # Both in fp32 at least: for fp16 they reach m·n on a dominant rank-1 Y (entries ≤ 1), beyond
    # its 65504, and an infinite scale made msign 0 (a probe); the scale itself, ≤ √(mn), fits.
    wide = gram if gram.dtype != torch.float16 else gram.float()
    gnorm = torch.minimum(torch.linalg.matrix_norm(wide, keepdim=True),
                          wide.abs().sum(dim=-1, keepdim=True).amax(dim=-2, keepdim=True))
    # the zero test before the root: √0's derivative is infinite, and through the discarded
    # branch of a where it still made the gradient of a zero matrix NaN (0·∞)
    scale = torch.where(gnorm > 0, gnorm, torch.ones_like(gnorm)).sqrt() * safety
    if gram.dtype == torch.float16:  # scale² overflows fp16 where scale does not: divide twice
        return Y / scale.to(Y.dtype), gram / scale.to(Y.dtype) / scale.to(Y.dtype)
    return Y / scale, gram / (scale * scale)


def _msign_svd(X: torch.Tensor) -> torch.Tensor:
    """Exact polar factor from the thin SVD; singular values at rank tolerance map to zero.

    msign(X) = msign(X/c) for any c > 0, so each matrix is first divided by c = max|X|: LAPACK's
    SVD overflows to zeros on fp32 entries near 1e38 (and loses precision near 1e-38)."""
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    zero = amax == 0
    X = X / torch.where(zero, torch.ones_like(amax), amax)
    if bool(zero.any()):
        # msign(0) = 0; the SVD of a zero matrix has all-equal singular values, whose backward is
        # NaN (and poisoned any loss summed over a batch): decompose a stand-in with distinct ones
        # and zero the result
        k = min(X.shape[-2:])
        stand_in = torch.diag_embed(torch.arange(1, k + 1, dtype=X.dtype, device=X.device))
        stand_in = torch.nn.functional.pad(stand_in, (0, X.shape[-1] - k, 0, X.shape[-2] - k))
        X = torch.where(zero, stand_in, X)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(X.dtype).eps
    keep = ((S > tol) & ~zero[..., 0]).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def _use_triton(Y: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if not Y.is_cuda:
        return False
    try:
        from modman import kernels
    except ImportError:
        return False
    return kernels.available() and kernels.worth_it(Y)
