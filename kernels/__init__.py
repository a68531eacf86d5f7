"""modman.kernels: Triton kernels for quintic Newton–Schulz, the inner loop of msign.

One iteration on X (m×n, m ≤ n, σ_max ≤ 1) with coefficients (a, b, c):

    S = X Xᵀ;   B = b·S + c·S²;   X ← a·X + B X

maps every singular value x through p(x) = a x + b x³ + c x⁵. Its cost is 4m²n + 2m³ flops; S and
S² are symmetric, so the kernels compute only the tiles on and below the diagonal and mirror them
(2m²n + 2m³ → m²n + m³ for those two products: ideally 1.5× fewer flops per iteration when m = n).
The b·S and a·X terms are fused into the epilogues of the products, so an iteration is three
kernel launches for the whole batch and no elementwise passes.

This package imports without Triton and without a GPU; Triton is imported on first use. The
kernels run on CUDA, or on CPU through Triton's interpreter when TRITON_INTERPRET=1 was set before
triton was first imported (correct but slow: a tool for tests, not for speed).

Public API: ``available``, ``worth_it``, ``newton_schulz`` (the contract msign relies on), and the
single products ``gram``, ``gram_poly``, ``apply_poly``.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Sequence

import torch

from . import _graphs

__all__ = ["available", "worth_it", "newton_schulz", "gram", "gram_poly", "apply_poly", "clear_graph_cache"]

clear_graph_cache = _graphs.clear

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# backend="auto" uses the kernels for 16-bit compute from this size on. Measured on an H100
# (benchmarks/results/kernels-nvidia-h100-80gb-hbm3.json, bf16, the whole default msign):
# 2.2–2.9× eager torch at 1024² (launch-bound; the kernels replay a CUDA graph, 0.86–0.97× torch
# in one), 1.06–1.27× at 1024²×8 and 2048², 1.29–1.42× from 2048²×8 to 8192². Smaller sizes were
# not measured.
MIN_DIM_AUTO = 1024
# fp32 products run as IEEE fp32 (no tf32), without tensor cores: there the kernels were 0.52× of
# cuBLAS at 1024² on the H100 (…-float32.json), so "auto" keeps fp32 on torch.
AUTO_DTYPES = (torch.bfloat16, torch.float16)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """True when Triton is installed and has somewhere to run: a CUDA GPU, or the interpreter."""
    if not _triton_importable():
        return False
    if torch.cuda.is_available():
        return True
    # once the kernels exist, whether they were made interpreted decides
    impl = sys.modules.get(f"{__name__}._triton_ns")
    return impl.INTERPRETED if impl is not None else _interpreting()


def _interpreting() -> bool:
    """Whether Triton runs (or, not imported yet, will run) in its interpreter: once imported,
    whether its own tl.* helpers were made interpreted decides — TRITON_INTERPRET set after the
    import does not make them so."""
    if "triton" not in sys.modules:
        return _interpreter_requested()
    import triton.language as tl
    kind = type(getattr(tl, "cdiv", None)).__name__
    if kind in ("InterpretedFunction", "JITFunction"):
        return kind == "InterpretedFunction"
    return _interpreter_requested()  # a Triton whose helpers are not jit functions: the environment says


def check_backend(X: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise the error a kernel launch would for X computed in ``dtype``, before any work (msign
    checks backend="triton" up front, so that an empty X or an early return does not pass it)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the kernels compute in {SUPPORTED_DTYPES}, not {dtype} (msign: pass "
                        "compute_dtype=torch.float32, or backend='torch')")
    _check_device(X, _impl())


def worth_it(X: torch.Tensor) -> bool:
    """Whether backend="auto" should use the kernels for X: a bf16/fp16 CUDA tensor, min dim ≥ 1024."""
    return bool(X.is_cuda and X.ndim >= 2 and X.dtype in AUTO_DTYPES and min(X.shape[-2:]) >= MIN_DIM_AUTO)


MIN_TRITON = (3, 3)  # tl.range(flatten=…), used by the persistent kernels


def _impl():
    """The kernel module, imported on first use; raises a clear error when it cannot run."""
    try:
        import triton
    except ImportError as e:  # triton missing or broken
        raise RuntimeError(
            "modman.kernels needs Triton (pip install 'modman[triton]'); "
            f"importing it failed: {e}. Use msign(..., backend='torch') instead."
        ) from e
    version = tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit())
    if version < MIN_TRITON:
        raise RuntimeError(f"modman.kernels needs Triton ≥ {'.'.join(map(str, MIN_TRITON))}, found "
                           f"{triton.__version__}; upgrade it or use msign(..., backend='torch').")
    from . import _triton_ns
    return _triton_ns


def _on_device(T: torch.Tensor):
    """Launch on T's GPU: Triton launches on the current device, which need not be T's."""
    return torch.cuda.device(T.device) if T.is_cuda else contextlib.nullcontext()


def _check_device(X: torch.Tensor, impl) -> None:
    if X.is_cuda:
        if impl.INTERPRETED:
            raise RuntimeError(
                "Triton was imported with TRITON_INTERPRET=1, so its kernels run in the CPU "
                "interpreter and cannot take CUDA tensors; unset TRITON_INTERPRET for GPU runs."
            )
        return
    if X.device.type != "cpu":
        raise RuntimeError(f"modman.kernels runs on CUDA (or CPU via the interpreter), got {X.device}")
    if not impl.INTERPRETED:
        hint = (" TRITON_INTERPRET=1 is set now, but triton was imported before it was set."
                if _interpreter_requested() else "")
        raise RuntimeError(
            "Triton kernels need a CUDA tensor; on CPU they run only in Triton's interpreter, "
            "enabled by setting the environment variable TRITON_INTERPRET=1 before triton is "
            f"first imported (for tests; it is slow).{hint} Use msign(..., backend='torch') on CPU."
        )


def _check_matrix(name: str, T: torch.Tensor) -> None:
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
    if T.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2-D (m, n) or 3-D (batch, m, n), got shape {tuple(T.shape)}")
    if T.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {T.dtype}; the kernels support {SUPPORTED_DTYPES} (msign: pass "
                        "compute_dtype=torch.float32, or backend='torch')")
    if T.requires_grad and torch.is_grad_enabled():  # (the result silently had no grad_fn)
        raise ValueError(f"{name} requires grad, and the kernels record no autograd graph; call them under "
                         "torch.no_grad(), or use msign(..., backend='torch')")


def _same(name_a: str, A: torch.Tensor, name_b: str, B: torch.Tensor) -> None:
    if A.dtype != B.dtype:
        raise TypeError(f"{name_a} is {A.dtype} but {name_b} is {B.dtype}; cast them to one dtype")
    if A.device != B.device:
        raise ValueError(f"{name_a} is on {A.device} but {name_b} is on {B.device}")


def _overlaps(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the storage ranges of A and B intersect (conservative: byte ranges)."""
    if A.numel() == 0 or B.numel() == 0:
        return False
    def span(T):
        lo = T.data_ptr()
        hi = lo + sum((s - 1) * st for s, st in zip(T.shape, T.stride())) * T.element_size() + T.element_size()
        return lo, hi
    (a0, a1), (b0, b1) = span(A), span(B)
    return a0 < b1 and b0 < a1


def _non_overlapping(T: torch.Tensor) -> bool:
    """Sufficient for no two elements of T sharing memory: ordered by stride, each dimension's
    stride reaches past the whole extent of the smaller ones (dimensions of size 1 aside)."""
    if T.numel() == 0:
        return True  # nothing is written
    reach = 0
    dims = [(size, stride) for size, stride in zip(T.shape, T.stride()) if size > 1]
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _as3(T: torch.Tensor) -> torch.Tensor:
    return T.unsqueeze(0) if T.ndim == 2 else T


def _out(out: torch.Tensor | None, shape, like: torch.Tensor, inputs: Sequence[torch.Tensor]):
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    _check_matrix("out", out)
    _same("out", out, "the input", like)
    if tuple(_as3(out).shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if not _non_overlapping(out):  # (an expanded out was written by every program at once)
        raise ValueError(f"out has elements sharing memory (strides {tuple(out.stride())}); pass a fresh tensor")
    if any(_overlaps(out, T) for T in inputs):
        # The kernels read their inputs while other programs write the output: in place is a race.
        raise ValueError("out must not overlap the inputs (the kernels are not in place)")
    return _as3(out)


def gram(X: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """S = X Xᵀ per matrix of the batch, computing half the tiles and mirroring them."""
    _check_matrix("X", X)
    impl = _impl()
    _check_device(X, impl)
    X3 = _as3(X)
    S = _out(out, (X3.shape[0], X3.shape[1], X3.shape[1]), X3, [X3])
    if S.numel():
        with _on_device(X3):
            impl.launch_sym(X3, S, 1.0, 0.0, None)
    return S if X.ndim == 3 else S[0]


def gram_poly(S: torch.Tensor, b: float, c: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """B = b·S + c·S² for a symmetric S (only S's symmetry makes S² = S Sᵀ; it is not checked)."""
    _check_matrix("S", S)
    if S.shape[-1] != S.shape[-2]:
        raise ValueError(f"S must be square, got shape {tuple(S.shape)}")
    impl = _impl()
    _check_device(S, impl)
    S3 = _as3(S)
    B = _out(out, tuple(S3.shape), S3, [S3])
    if B.numel():
        with _on_device(S3):
            impl.launch_sym(S3, B, float(c), float(b), S3)
    return B if S.ndim == 3 else B[0]


def apply_poly(B: torch.Tensor, X: torch.Tensor, a: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Y = a·X + B X, for B (m×m) and X (m×n), batched alike."""
    _check_matrix("B", B)
    _check_matrix("X", X)
    _same("B", B, "X", X)
    if B.ndim != X.ndim or B.shape[:-2] != X.shape[:-2] or B.shape[-1] != B.shape[-2] \
            or B.shape[-1] != X.shape[-2]:
        raise ValueError(f"apply_poly needs B (…, m, m) and X (…, m, n); got {tuple(B.shape)} and {tuple(X.shape)}")
    impl = _impl()
    _check_device(X, impl)
    B3, X3 = _as3(B), _as3(X)
    Y = _out(out, tuple(X3.shape), X3, [B3, X3])
    if Y.numel():
        with _on_device(X3):
            impl.launch_apply(B3, X3, Y, float(a))
    return Y if X.ndim == 3 else Y[0]


def _check_coeffs(coeffs) -> list[tuple[float, float, float]]:
    try:
        out = [tuple(float(v) for v in abc) for abc in coeffs]
    except (TypeError, ValueError) as e:
        raise TypeError(f"coeffs must be a sequence of (a, b, c) number triples: {e}") from e
    for abc in out:
        if len(abc) != 3:
            raise ValueError(f"each coefficient tuple needs 3 numbers (a, b, c), got {abc}")
        if not all(math.isfinite(v) for v in abc):
            raise ValueError(f"coefficients must be finite, got {abc}")
    return out


def newton_schulz(
    X: torch.Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    *,
    gram_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quintic Newton–Schulz iterations with Triton kernels; the contract of msign(backend="triton").

    For each (a, b, c) in ``coeffs``:  S = X Xᵀ;  B = b·S + c·S²;  X ← a·X + B X.

    Args:
        X: (b, m, n) or (m, n), fp32/fp16/bf16, already scaled so that σ_max ≤ 1. Any strides.
            A tall X (m > n) is iterated as Xᵀ, whose Gram matrix is the small one; the result is
            transposed back (p(Xᵀ) = p(X)ᵀ for an odd matrix polynomial).
        coeffs: one (a, b, c) per iteration.
        gram_matrix: optionally X Xᵀ for the first iteration (in X's orientation with m ≤ n),
            as msign's normalisation already computes it.

    On CUDA, a launch-bound run (batch·m²·n ≤ 2³³) is captured into a CUDA graph the second
    time its shape is seen and replayed after that (``modman.kernels._graphs``): the same
    kernels and configurations as an eager launch on a contiguous copy of X, so the same bits.

    Returns:
        A new tensor of X's shape and dtype; X is not modified. No autograd graph is recorded, so
        an X that requires grad is refused outside ``torch.no_grad()`` (as by gram, gram_poly and
        apply_poly).
        A NaN anywhere in a matrix spreads to that whole matrix (the iteration count is fixed,
        so NaN input cannot cause a hang).
    """
    _check_matrix("X", X)
    coeffs = _check_coeffs(coeffs)
    impl = _impl()
    _check_device(X, impl)
    if X.numel() == 0 or not coeffs:
        return X.clone()
    transposed = X.shape[-2] > X.shape[-1]
    Y = _as3(X.mT if transposed else X)
    batch, m, n = Y.shape
    if gram_matrix is not None:
        _check_matrix("gram_matrix", gram_matrix)
        _same("gram_matrix", gram_matrix, "X", X)
        if tuple(_as3(gram_matrix).shape) != (batch, m, m):
            raise ValueError(f"gram_matrix must have shape {(batch, m, m)} (the small Gram matrix), "
                             f"got {tuple(gram_matrix.shape)}")
        gram_matrix = _as3(gram_matrix)

    Y = _graphs.run(_iterate, Y, coeffs, gram_matrix) if _graphs.wanted(Y) else _iterate(Y, coeffs, gram_matrix)
    if X.ndim == 2:
        Y = Y[0]
    return Y.mT if transposed else Y


def _iterate(Y: torch.Tensor, coeffs: list, gram_matrix: torch.Tensor | None) -> torch.Tensor:
    """The launches of ``newton_schulz`` on a checked (batch, m, n) Y with m ≤ n: 3 per iteration."""
    impl = _impl()
    batch, m, n = Y.shape
    if impl.tma_wanted(impl._mode(Y)[1], batch * m * m * n) and (n * Y.element_size()) % 16 == 0:
        Y = Y.contiguous()  # descriptor loads need unit stride along rows: one copy, then every launch uses them
    S = torch.empty((batch, m, m), dtype=Y.dtype, device=Y.device)
    B = torch.empty_like(S)
    buffers = [torch.empty((batch, m, n), dtype=Y.dtype, device=Y.device) for _ in range(min(2, len(coeffs)))]
    with _on_device(Y):
        for i, (a, b, c) in enumerate(coeffs):
            if i == 0 and gram_matrix is not None:
                S_i = gram_matrix
            else:
                impl.launch_sym(Y, S, 1.0, 0.0, None)
                S_i = S
            impl.launch_sym(S_i, B, c, b, S_i)
            # Ping-pong between two buffers: the product reads Y while writing the other one.
            nxt = buffers[i % 2]
            impl.launch_apply(B, Y, nxt, a)
            Y = nxt
    return Y
