"""Triton kernels for quintic Newton–Schulz (imported only through ``modman.kernels``).

One iteration on X (m×n, m ≤ n) is  S = X Xᵀ;  B = b·S + c·S²;  X ← a·X + B X.  Three kernels:

- ``_sym_kernel`` computes C = α·A Aᵀ + β·D for A (M×K) and a symmetric D (M×M). C is symmetric,
  so only the tiles on and below a diagonal band are computed and each tile strictly below it is
  also stored transposed into its mirror position: about half the work of a full product. Tiles
  may be rectangular (BLOCK_N = R·BLOCK_M): Hopper reaches its best rate with 128×256 tiles, which
  a square-tile triangle could not use. With A = X, α = 1, β = 0 it is the Gram matrix X Xᵀ; with
  A = D = S (symmetric, so S² = S Sᵀ), α = c, β = b it is the polynomial B = b·S + c·S², the b·S
  term fused into the epilogue.
- ``_apply_kernel`` computes Y = a·X + B X, a plain GEMM with the a·X term fused into the epilogue.

All products accumulate in fp32 and round once on store, in the dtype of the output (the compute
dtype: fp32, fp16 or bf16). fp32 products use input_precision="ieee": tf32 would lose the
accuracy the torch path keeps. Offsets are int64, so matrices and batches past 2³¹ elements
address correctly. Inputs may have any strides. Every kernel writes to a buffer distinct from its
inputs (checked by the public functions), which is what makes autotuning safe: the autotuner runs a
kernel several times, and an in-place kernel would read its own output on the second run.

Interpreter (TRITON_INTERPRET=1, CPU): the interpreter computes a bf16 tl.dot on the raw 16-bit
patterns (upstream triton#11584), so bf16 tiles are upcast to fp32 after loading (flag INTERP_BF16). That is
exact — a bf16×bf16 product is representable in fp32, which is what tensor cores accumulate — so
the interpreter path computes the same quantity as the native one; it is an interpreter-only code
path, and native bf16 tl.dot is exercised only on a GPU. The interpreter also truncates fp32 → bf16
casts instead of rounding to nearest, so the same flag rounds bf16 outputs on the bits.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _interpreting

# Whether Triton runs in its interpreter: it decides when a function is decorated, and its own
# tl.* helpers were decorated when triton was first imported. TRITON_INTERPRET=1 set after that made
# this module's kernels interpreted but left tl.cdiv compiled, and the first call failed inside Triton
# ("Cannot call @triton.jit'd outside of the scope of a kernel"): so the helpers decide.
INTERPRETED = _interpreting()


@triton.jit
def _to_output(acc, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Round an fp32 tile to the output dtype, to nearest even.

    The interpreter truncates fp32 → bf16 casts (round toward zero, twice the error of rounding
    to nearest), so in interpreter bf16 mode the rounding is done on the bits: add 0x7FFF plus the
    lowest kept bit, then drop the low 16 bits. NaN is kept NaN explicitly (a NaN with only low
    payload bits would otherwise round into the infinity pattern).
    """
    if INTERP_BF16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(acc != acc, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return acc.to(dtype)


@triton.jit
def _sym_kernel(
    A, D, C,
    M, K, n_batch,
    sa_b, sa_r, sa_c,
    sd_b, sd_r, sd_c,
    sc_b, sc_r, sc_c,
    alpha, beta,
    HAS_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    TMA: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """C = alpha·A Aᵀ (+ beta·D) for the tiles on and below a diagonal band, mirrored above it.

    Tiles are BLOCK_M × BLOCK_N with BLOCK_N = R·BLOCK_M. Row tile i (rows i·BLOCK_M …) takes the
    column tiles j = 0 … i // R. Tile j = i // R holds the diagonal: the R row tiles sharing it
    cover an R·BLOCK_M square diagonal block, each entry once, so they store without mirroring.
    Every tile j < i // R lies strictly below the diagonal and is also stored transposed into its
    mirror position. Row tiles come in groups of R with p + 1 tiles each in group p, so tile t of
    a matrix lies in group p = ⌊(√(8⌊t/R⌋ + 1) − 1)/2⌋. Tiles past the last row tile (a partial
    last group) are fully masked.

    Each program takes tiles pid, pid + programs, …: one tile when the grid has one program per
    tile; with PERSISTENT a grid of one program per SM walks the tiles with the tile and K loops
    flattened, so the next tile's loads overlap this tile's epilogue. ``n_batch`` also keys the
    autotuner.

    With TMA (Hopper on, a contiguous A with 16-byte aligned rows) the operand tiles are loaded by
    tensor-memory-accelerator descriptors over A viewed as one (n_batch·M) × K matrix. A row tile
    that runs past row M of its matrix reads the next matrix's rows, but those only reach output
    rows ≥ M, which are never stored; along K the descriptor's bound is exact and pads with zeros.
    """
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "BLOCK_N must be a multiple of BLOCK_M")
    R: tl.constexpr = BLOCK_N // BLOCK_M
    # Pointer steps along K in int64: BLOCK_K × a stride past 2²⁴ would wrap in int32.
    a_step = BLOCK_K * tl.cast(sa_c, tl.int64)
    n_rows = tl.cdiv(M, BLOCK_M)
    n_groups = tl.cdiv(n_rows, R)
    per_batch = R * (n_groups * (n_groups + 1) // 2)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    if TMA:
        a_desc = tl.make_tensor_descriptor(A, shape=[n_batch * M, K], strides=[sa_r, 1], block_shape=[BLOCK_M, BLOCK_K])
        at_desc = tl.make_tensor_descriptor(A, shape=[n_batch * M, K], strides=[sa_r, 1], block_shape=[BLOCK_N, BLOCK_K])
    for tile in tl.range(tl.program_id(0), n_batch * per_batch, tl.num_programs(0), flatten=PERSISTENT):
        batch = tile // per_batch
        t = tile % per_batch
        u = t // R
        # The float square root can be off by one near perfect squares; the two corrections fix it.
        p = ((tl.sqrt((8 * u + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        p = tl.where((p + 1) * (p + 2) // 2 <= u, p + 1, p)
        p = tl.where(p * (p + 1) // 2 > u, p - 1, p)
        o = t - R * (p * (p + 1) // 2)
        i = R * p + o // (p + 1)
        j = o % (p + 1)

        batch64 = batch.to(tl.int64)
        a_mat = A + batch64 * sa_b
        c_mat = C + batch64 * sc_b
        rows = (i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (j * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < M
        col_ok = cols < M
        a_ptrs = a_mat + rows[:, None] * sa_r + ks[None, :] * sa_c
        at_ptrs = a_mat + ks[:, None] * sa_c + cols[None, :] * sa_r

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if TMA:
                a = a_desc.load([batch * M + i * BLOCK_M, k0])
                at = at_desc.load([batch * M + j * BLOCK_N, k0]).T
            else:
                k_ok = ks < K - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(at_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                a_ptrs += a_step
                at_ptrs += a_step
            if INTERP_BF16:
                a = a.to(tl.float32)
                at = at.to(tl.float32)
            acc = tl.dot(a, at, acc, input_precision=PRECISION)

        out_ok = row_ok[:, None] & col_ok[None, :]
        acc = acc * alpha
        if HAS_D:
            d = tl.load(D + batch64 * sd_b + rows[:, None] * sd_r + cols[None, :] * sd_c, mask=out_ok, other=0.0)
            acc += beta * d.to(tl.float32)
        out = _to_output(acc, C.dtype.element_ty, INTERP_BF16)
        tl.store(c_mat + rows[:, None] * sc_r + cols[None, :] * sc_c, out, mask=out_ok)
        # The mirror (the tile transposed), except for the band, whose tiles are stored once.
        # (A scalar condition is folded into the row bound: the interpreter rejects a mask
        # combined with a scalar boolean.)
        mirror_ok = rows < tl.where(j == i // R, 0, M)
        tl.store(c_mat + cols[:, None] * sc_r + rows[None, :] * sc_c, tl.trans(out),
                 mask=col_ok[:, None] & mirror_ok[None, :])


@triton.jit
def _apply_kernel(
    B, X, Y,
    M, N, n_batch,
    sb_b, sb_r, sb_c,
    sx_b, sx_r, sx_c,
    sy_b, sy_r, sy_c,
    a_coef,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
    TMA: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Y = a·X + B X for B (M×M) and X (M×N); tiles walked as in ``_sym_kernel``.

    With TMA, B is read as one (n_batch·M) × M matrix (rows past a matrix's end reach only
    unstored output rows, as in ``_sym_kernel``), but X through a 3-D descriptor: its rows are
    the contraction, where the next matrix's rows would be summed in (and a NaN there would
    spread), so each matrix is bounded on its own and padded with zeros.
    """
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_batch = tiles_m * tiles_n
    b_step = BLOCK_K * tl.cast(sb_c, tl.int64)
    x_step = BLOCK_K * tl.cast(sx_r, tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    if TMA:
        b_desc = tl.make_tensor_descriptor(B, shape=[n_batch * M, M], strides=[sb_r, 1], block_shape=[BLOCK_M, BLOCK_K])
        x_desc = tl.make_tensor_descriptor(X, shape=[n_batch, M, N], strides=[sx_b, sx_r, 1], block_shape=[1, BLOCK_K, BLOCK_N])
    for tile in tl.range(tl.program_id(0), n_batch * per_batch, tl.num_programs(0), flatten=PERSISTENT):
        batch = tile // per_batch
        t = tile % per_batch
        # Grouped ordering: GROUP_M row-tiles sweep the columns together, so the X column panels
        # they share stay in L2.
        pid_m, pid_n = tl.swizzle2d(t // tiles_n, t % tiles_n, tiles_m, tiles_n, GROUP_M)

        batch64 = batch.to(tl.int64)
        x_mat = X + batch64 * sx_b
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < M
        col_ok = cols < N
        b_ptrs = B + batch64 * sb_b + rows[:, None] * sb_r + ks[None, :] * sb_c
        x_ptrs = x_mat + ks[:, None] * sx_r + cols[None, :] * sx_c

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            if TMA:
                b = b_desc.load([batch * M + pid_m * BLOCK_M, k0])
                x = x_desc.load([batch, k0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:
                k_ok = ks < M - k0
                b = tl.load(b_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                b_ptrs += b_step
                x_ptrs += x_step
            if INTERP_BF16:
                b = b.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(b, x, acc, input_precision=PRECISION)

        out_ok = row_ok[:, None] & col_ok[None, :]
        x_tile = tl.load(x_mat + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=out_ok, other=0.0)
        acc += a_coef * x_tile.to(tl.float32)
        tl.store(Y + batch64 * sy_b + rows[:, None] * sy_r + cols[None, :] * sy_c,
                 _to_output(acc, Y.dtype.element_ty, INTERP_BF16), mask=out_ok)


# --- configurations ---------------------------------------------------------------------------
# The fixed fallback is used in the interpreter (autotuning there would only cost time), when
# MODMAN_TRITON_AUTOTUNE=0, and on GPUs older than Ampere. Interpreter tiles are small so that the
# test shapes (tens to a few hundred rows) exercise several tiles, the diagonal band, the mirrored
# stores, a partial last group of row tiles, and the masks.
FALLBACK_SYM = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, PERSISTENT=False, num_warps=4, num_stages=3)
FALLBACK_APPLY = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False, num_warps=4, num_stages=3)
INTERPRETER_SYM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, PERSISTENT=False)
INTERPRETER_APPLY = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, PERSISTENT=False)
# A persistent grid in the interpreter: few programs, so that each walks several tiles.
INTERPRETER_PROGRAMS = 3


def _sym_configs(major: int, tma: bool = False) -> list:
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent); BLOCK_N a multiple of BLOCK_M.
    if tma:  # Hopper with descriptor loads: the winners of a sweep at 2048²×8 … 8192² on an H100
        grid = [(128, 256, 64, 3, 8, False), (128, 256, 64, 3, 8, True), (128, 256, 64, 4, 8, False),
                (128, 256, 64, 4, 8, True), (128, 128, 64, 4, 8, False), (128, 128, 64, 4, 8, True),
                (64, 128, 64, 4, 4, False), (64, 64, 64, 4, 4, False)]
    elif major >= 9:  # Hopper: 128×256 wgmma tiles with two warp groups, deep pipelines
        grid = [(128, 256, 64, 3, 8, False), (128, 256, 64, 4, 8, False), (128, 256, 64, 3, 8, True),
                (128, 256, 64, 4, 8, True), (128, 256, 128, 2, 8, False), (128, 256, 128, 2, 8, True),
                (128, 128, 64, 4, 8, False), (128, 128, 128, 3, 8, False),
                (64, 128, 64, 4, 4, False), (64, 64, 128, 3, 4, False), (64, 256, 64, 4, 4, False)]
    else:  # Ampere (sm80/86/89): less shared memory per SM, so shallower pipelines
        grid = [(128, 128, 32, 4, 4, False), (128, 128, 32, 3, 8, False), (128, 256, 32, 3, 8, False),
                (64, 128, 32, 4, 4, False), (64, 64, 32, 4, 4, False), (64, 64, 64, 3, 4, False)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PERSISTENT=p), num_stages=s, num_warps=w)
            for bm, bn, bk, s, w, p in grid]


def _apply_configs(major: int, tma: bool = False) -> list:
    if tma:
        grid = [(128, 256, 64, 3, 8, False), (128, 256, 64, 3, 8, True), (128, 256, 64, 4, 8, False),
                (128, 256, 64, 4, 8, True), (128, 128, 64, 4, 8, True), (64, 128, 64, 4, 4, False),
                (64, 64, 64, 4, 4, False)]
    elif major >= 9:
        grid = [(128, 256, 64, 3, 8, False), (128, 256, 64, 3, 8, True), (128, 256, 32, 4, 8, True),
                (128, 256, 128, 2, 8, False), (128, 256, 64, 4, 8, True),
                (128, 128, 64, 4, 8, False), (128, 128, 64, 3, 4, False), (128, 256, 32, 4, 8, False),
                (64, 256, 64, 4, 4, False), (128, 64, 64, 4, 4, False), (64, 128, 64, 4, 4, False),
                (64, 64, 64, 4, 4, False)]
    else:
        grid = [(128, 128, 32, 4, 8, False), (128, 256, 32, 3, 8, False), (128, 64, 32, 4, 4, False),
                (64, 128, 32, 4, 4, False), (128, 128, 64, 3, 8, False), (64, 64, 32, 4, 4, False)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=p),
                          num_stages=s, num_warps=w)
            for bm, bn, bk, s, w, p in grid]


def _without_persistent(configs: list) -> list:
    """MODMAN_TRITON_PERSISTENT=0 drops the persistent configurations (for a Triton build whose
    loop flattening fails to compile them)."""
    if os.environ.get("MODMAN_TRITON_PERSISTENT", "1") != "0":
        return configs
    return [c for c in configs if not c.kwargs["PERSISTENT"]]


_TUNED: dict = {}


def _tuned(kind: str, major: int, tma: bool):
    """Autotuned wrapper of a kernel for a GPU generation and load path, built on first use."""
    key = (kind, major, tma)
    if key not in _TUNED:
        if kind == "sym":
            _TUNED[key] = triton.autotune(_without_persistent(_sym_configs(major, tma)), key=["M", "K", "n_batch", "HAS_D", "sa_r", "sa_c"])(_sym_kernel)
        else:
            _TUNED[key] = triton.autotune(_without_persistent(_apply_configs(major, tma)), key=["M", "N", "n_batch", "sx_r", "sx_c"])(_apply_kernel)
    return _TUNED[key]


def _mode(X: torch.Tensor):
    """(autotune?, GPU major) for a launch on X's device."""
    if INTERPRETED:
        return False, 0
    major = torch.cuda.get_device_capability(X.device)[0]
    autotune = os.environ.get("MODMAN_TRITON_AUTOTUNE", "1") != "0" and major >= 8
    return autotune, major


_SMS: dict = {}


def _programs(tiles: int, meta: dict, device: torch.device) -> tuple:
    """The launch grid: a program per tile, or with PERSISTENT at most one per SM."""
    if not meta["PERSISTENT"]:
        return (tiles,)
    if INTERPRETED:
        return (min(tiles, INTERPRETER_PROGRAMS),)
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return (min(tiles, _SMS[device]),)


def _dot_flags(dtype: torch.dtype):
    interp_bf16 = INTERPRETED and dtype == torch.bfloat16
    # "ieee" keeps fp32 products in fp32 (no tf32); it is also right for bf16 tiles upcast in the interpreter.
    # For native 16-bit tiles the precision flag does not apply; "tf32" is the neutral default.
    precision = "ieee" if (dtype == torch.float32 or interp_bf16) else "tf32"
    return interp_bf16, precision


# --- tensor-memory-accelerator loads (Hopper) -------------------------------------------------
# Descriptor loads free the registers and instructions that pointer loads spend on addresses and
# masks. Measured on an H100 (bf16, benchmarks/results/kernels-nvidia-h100-80gb-hbm3*.json), the
# whole default msign at 4096²×8 ran 1.34× torch with them and 1.15× without (MODMAN_TRITON_TMA=0;
# separate runs, each against torch timed in the same run; an earlier pointer-load run gave 1.28×);
# per product X Xᵀ took 0.92 ms and b·S + c·S² 1.06 ms, against 0.97 and 1.15 ms with pointer
# loads. Each program builds its descriptors in global memory first, which does not pay on small
# launches: at 1024², batch 1 (a CUDA-graph
# replay) the run took 0.30 ms with them against 0.26 ms without, so they start at TMA_MIN_WORK
# (batch·m²·k; 1024²×8 and 2048² gained). MODMAN_TRITON_TMA=0 turns them off; =1 forces them
# wherever the layout allows, whatever the size, the interpreter included (for tests).
_HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
TMA_MIN_WORK = 2**32


def tma_wanted(major: int, work: int) -> bool:
    """Whether a launch of ``work`` = batch·m²·k on a GPU of this generation (0: the interpreter)
    uses descriptor loads (when its tensors' layout allows, see ``tma_layout``)."""
    setting = os.environ.get("MODMAN_TRITON_TMA", "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"MODMAN_TRITON_TMA must be 'auto', '0' or '1', got {setting!r}")
    if setting == "0" or not _HAS_DESCRIPTORS:
        return False
    return setting == "1" or (not INTERPRETED and major >= 9 and work >= TMA_MIN_WORK)


# Descriptor shapes and the kernels' tile coordinates (batch·M + row) are 32-bit: a flat view stays
# below this many rows, the largest tile included.
_MAX_FLAT_ROWS = 2**31 - 256


def tma_layout(T: torch.Tensor, flat: bool) -> bool:
    """Whether a 3-D tensor can be read through a descriptor: unit stride along rows, the other
    strides and the base 16-byte aligned (the hardware's rule), and no overlap (each stride at
    least the extent of the dimension inside it: no expanded, broadcast rows or matrices).
    ``flat`` descriptors view the batch as one tall matrix, which also needs the matrices
    stacked without gaps and fewer than 2³¹ rows in all."""
    size = T.element_size()
    batch, rows, cols = T.shape
    if T.stride(2) != 1 or T.data_ptr() % 16 or (T.stride(1) * size) % 16 or (T.stride(0) * size) % 16:
        return False
    if (rows > 1 and T.stride(1) < cols) or (batch > 1 and T.stride(0) < rows * T.stride(1)):
        return False
    return not flat or ((batch == 1 or T.stride(0) == rows * T.stride(1)) and batch * rows < _MAX_FLAT_ROWS)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a kernel builds on the device (128 bytes each)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Kernels that build descriptors need Triton's allocator; keep one the user has set. (Ours is
    set in the caller's context, where the user's other Triton kernels will find it too: it is
    torch's caching allocator on the current stream, as Triton's own examples use.)"""
    try:
        from triton.runtime import _allocation
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # a Triton whose internals moved: set ours
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _launch(kind: str, kernel, grid, args: tuple, X: torch.Tensor, config: dict | None, **flags) -> None:
    """Launch with ``config`` when given (for checking one configuration), else autotuned or with
    the fixed configuration of the interpreter or the fallback."""
    if flags["TMA"] and not INTERPRETED:
        _ensure_allocator()
    if config is None:
        autotune, major = _mode(X)
        if autotune:
            _tuned(kind, major, flags["TMA"])[grid](*args, **flags)
            return
        fixed = {"sym": (INTERPRETER_SYM, FALLBACK_SYM), "apply": (INTERPRETER_APPLY, FALLBACK_APPLY)}[kind]
        config = fixed[0] if INTERPRETED else fixed[1]
    kernel[grid](*args, **flags, **config)


def launch_sym(A: torch.Tensor, C: torch.Tensor, alpha: float, beta: float, D: torch.Tensor | None,
               config: dict | None = None, tma: bool | None = None):
    """C ← alpha·A Aᵀ + beta·D on 3-D tensors; C must not overlap A or D (checked by the caller).
    ``tma``: descriptor loads; by default where ``tma_wanted`` and ``tma_layout`` allow."""
    batch, M, K = A.shape
    if tma is None:
        tma = tma_wanted(_mode(A)[1], batch * M * M * K) and tma_layout(A, flat=True)
    elif tma and not tma_layout(A, flat=True):
        raise ValueError(f"tma=True needs a descriptor-compatible A (see tma_layout); strides {A.stride()}")
    interp_bf16, precision = _dot_flags(A.dtype)
    Dv = D if D is not None else C  # a valid pointer that the kernel never reads when HAS_D=False
    args = (A, Dv, C, M, K, batch, *A.stride(), *Dv.stride(), *C.stride(), float(alpha), float(beta))

    def grid(meta):
        ratio = meta["BLOCK_N"] // meta["BLOCK_M"]
        groups = triton.cdiv(triton.cdiv(M, meta["BLOCK_M"]), ratio)
        return _programs(batch * ratio * (groups * (groups + 1) // 2), meta, A.device)

    _launch("sym", _sym_kernel, grid, args, A, config, HAS_D=D is not None, TMA=tma,
            INTERP_BF16=interp_bf16, PRECISION=precision)


def launch_apply(B: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, a: float, config: dict | None = None,
                 tma: bool | None = None):
    """Y ← a·X + B X on 3-D tensors; Y must not overlap B or X (checked by the caller)."""
    batch, M, N = X.shape
    if tma is None:
        tma = tma_wanted(_mode(X)[1], batch * M * M * N) and tma_layout(B, flat=True) and tma_layout(X, flat=False)
    elif tma and not (tma_layout(B, flat=True) and tma_layout(X, flat=False)):
        raise ValueError(f"tma=True needs descriptor-compatible B and X (see tma_layout); strides "
                         f"{B.stride()} and {X.stride()}")
    interp_bf16, precision = _dot_flags(X.dtype)
    args = (B, X, Y, M, N, batch, *B.stride(), *X.stride(), *Y.stride(), float(a))

    def grid(meta):
        return _programs(batch * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta, X.device)

    _launch("apply", _apply_kernel, grid, args, X, config, TMA=tma, INTERP_BF16=interp_bf16, PRECISION=precision)
