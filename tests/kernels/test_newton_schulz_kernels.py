"""Triton Newton–Schulz kernels against the torch path and a float64 reference.

Accuracy bars (issue 6), each an error against float64 arithmetic on the same (rounded) input,
compared with the error of the torch path in the same dtype:
  fp16 / bf16: mean and max absolute error ≤ 1.05 × the torch path's;
  fp32:        mean ≤ 5 ×, max ≤ 15 × (tl.dot's reduction order differs from the BLAS one).
In the interpreter bf16 tiles are upcast to fp32 after loading (upstream triton#11584), so native
bf16 tl.dot is tested only when these tests run on a GPU.

The bars are tested per product (each kernel against one torch product: a probe measured ratios
of exactly 1.000 in fp16 and bf16 over 6 seeds) and over the first 1–3 iterations. Over a whole
10-iteration msign, 1-ulp differences compound: that probe measured max-error ratios up to 1.6
(fp16) and 1.9 (bf16) on some seeds (mean ratios ≤ 1.03 on all), while the torch path against
itself with another summation order (rows and columns permuted) reached 1.29 — the max bar is
below the noise of the reduction order there, so it is not asserted for whole runs.
"""
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import DEVICE, INTERPRETED, PACKAGED

from modman import kernels, msign
from modman.linalg import coefficients
from modman.linalg import newton_schulz as torch_newton_schulz

BARS = {torch.float32: (5.0, 15.0), torch.float16: (1.05, 1.05), torch.bfloat16: (1.05, 1.05)}
DTYPES = list(BARS)
# The shapes named by the issue: tiny, odd, tall and wide, batched, and several tiles per side.
SHAPES = [(1, 1), (17, 5), (63, 130), (130, 63), (3, 40, 24), (257, 129)]
PE = coefficients("polar_express", 8)


def _errors(result, reference):
    diff = (result.double().cpu() - reference).abs()
    return diff.mean().item(), diff.max().item()


def _bar_failures(result, torch_result, reference, dtype, what, terms=1.0) -> list[str]:
    """The bars (module docstring) the kernel's result misses, as messages; [] when it meets them."""
    mean_bar, max_bar = BARS[dtype]
    k_mean, k_max = _errors(result, reference)
    t_mean, t_max = _errors(torch_result, reference)
    # The ratio bar needs a statistic: with fewer than 16 entries an error is one or a few draws of
    # rounding, and the torch path can be lucky (seen on an H100: 1×1 fp32, three iterations, torch
    # 1.8e-7 against 2.3e-6, both within rounding). There the bar is the forward-error bound of
    # the computation instead: unit roundoff × the sum of the magnitudes of its terms (``terms``,
    # Σ |a| + |b| + |c| over the iterations for Newton–Schulz) × the result's size. Otherwise the
    # bar is the plain ratio.
    floor = 0.0
    if reference.numel() < 16:
        floor = torch.finfo(dtype).eps / 2 * terms * reference.abs().max().item()
    if os.environ.get("MODMAN_REPORT_ERRORS"):
        print(f"ERR {what} {dtype} mean {k_mean:.3e}/{t_mean:.3e}={k_mean / max(t_mean, 1e-300):.3f} "
              f"max {k_max:.3e}/{t_max:.3e}={k_max / max(t_max, 1e-300):.3f}")
    failures = []
    if not k_mean <= mean_bar * t_mean + floor:
        failures.append(f"{what}: mean error {k_mean:.3e} vs torch {t_mean:.3e}")
    if not k_max <= max_bar * t_max + floor:
        failures.append(f"{what}: max error {k_max:.3e} vs torch {t_max:.3e}")
    return failures


def _random(shape, dtype, seed=0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    if normalise:  # σ_max ≤ ‖X Xᵀ‖_F^{1/2}, as msign normalises
        G = X @ X.mT if X.shape[-2] <= X.shape[-1] else X.mT @ X
        X = X / (torch.linalg.matrix_norm(G, keepdim=True).sqrt() * 1.01)
    return X.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 130×63 is the tall case; 257×129 enters as its wide orientation, as newton_schulz uses it (the
# tall one's 257² Gram matrix would triple the interpreter's time and test nothing new).
@pytest.mark.parametrize("shape", [s if s != (257, 129) else (129, 257) for s in SHAPES], ids=str)
def test_gram_matches_float64_within_bar(shape, dtype):
    X = _random(shape, dtype)
    reference = X.double().cpu() @ X.double().cpu().mT
    failures = _bar_failures(kernels.gram(X), X @ X.mT, reference, dtype, "X Xᵀ")
    assert not failures, failures


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (17, 17), (63, 63), (3, 40, 40), (129, 129)], ids=str)
def test_gram_poly_matches_float64_within_bar(shape, dtype):
    A = _random(shape, torch.float64)
    S = (A @ A.mT).to(dtype)  # symmetric, as in the iteration
    b, c = PE[0][1], PE[0][2]
    Sd = S.double().cpu()
    reference = b * Sd + c * Sd @ Sd
    torch_result = torch.baddbmm(S.unsqueeze(0) if S.ndim == 2 else S, S.unsqueeze(0) if S.ndim == 2 else S,
                                 S.unsqueeze(0) if S.ndim == 2 else S, beta=b, alpha=c).reshape(S.shape)
    failures = _bar_failures(kernels.gram_poly(S, b, c), torch_result, reference, dtype, "b·S + c·S²", abs(b) + abs(c))
    assert not failures, failures


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (63, 130), (3, 24, 40), (129, 257)], ids=str)
def test_apply_poly_matches_float64_within_bar(shape, dtype):
    X = _random(shape, dtype)
    S = X.double() @ X.double().mT
    B = (PE[0][1] * S + PE[0][2] * S @ S).to(dtype)
    a = PE[0][0]
    reference = a * X.double().cpu() + B.double().cpu() @ X.double().cpu()
    X3, B3 = (X, B) if X.ndim == 3 else (X[None], B[None])
    torch_result = torch.baddbmm(X3, B3, X3, beta=a, alpha=1.0).reshape(X.shape)
    terms = abs(a) + B.double().abs().max().item()
    failures = _bar_failures(kernels.apply_poly(B, X, a), torch_result, reference, dtype, "a·X + B X", terms)
    assert not failures, failures


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_newton_schulz_matches_torch_path_within_bar(shape, dtype):
    """The whole iteration (Polar Express tuples) against torch's, both vs float64 iterations."""
    # The interpreter is slow: 3 iterations for small shapes (errors compound from the 2nd), 2 at
    # 130, 1 at 257×129.
    steps = 3 if max(shape) < 100 else 2 if max(shape) < 200 else 1
    coeffs = PE[:steps]
    X = _random(shape, dtype)
    X3 = X if X.ndim == 3 else X[None]
    # The contract orients m ≤ n; the torch path is given the same orientation.
    Xw = X3.mT if X3.shape[-2] > X3.shape[-1] else X3
    torch_result = torch_newton_schulz(Xw, coeffs)
    reference = torch_newton_schulz(Xw.double().cpu(), coeffs)
    result = kernels.newton_schulz(Xw, coeffs)
    assert result.shape == Xw.shape and result.dtype == dtype
    terms = sum(abs(a) + abs(b) + abs(c) for a, b, c in coeffs)
    failures = _bar_failures(result, torch_result, reference, dtype, f"newton_schulz {steps} its", terms)
    assert not failures, failures


def test_tall_input_is_iterated_transposed():
    X = _random((40, 17), torch.float32)
    assert torch.equal(kernels.newton_schulz(X, PE[:3]), kernels.newton_schulz(X.mT.contiguous(), PE[:3]).mT)


def test_non_contiguous_inputs_give_the_same_bits():
    base = _random((2, 50, 80), torch.float32)
    strided = torch.empty(2, 80, 100, device=DEVICE).mT[:, :50, ::1]  # column-major, padded
    strided[:] = base
    assert not strided.is_contiguous()
    assert torch.equal(kernels.gram(strided), kernels.gram(base))
    assert torch.equal(kernels.newton_schulz(strided, PE[:2]), kernels.newton_schulz(base, PE[:2]))
    sliced = _random((60, 160), torch.float32)[::2, ::2]  # strides (320, 2)
    assert torch.equal(kernels.newton_schulz(sliced, PE[:2]), kernels.newton_schulz(sliced.contiguous(), PE[:2]))


def test_batched_equals_one_by_one():
    X = _random((3, 40, 24), torch.float16)
    batched = kernels.newton_schulz(X, PE[:3])
    for i in range(3):
        assert torch.equal(batched[i], kernels.newton_schulz(X[i], PE[:3]))


def test_gram_mirrors_off_diagonal_tiles():
    """Only tiles on and below the diagonal band are computed: those above are exact transposes."""
    from modman.kernels import _triton_ns as impl

    X = _random((300, 70), torch.float32)
    S = kernels.gram(X)
    # The band is BLOCK_N wide (R row tiles share one diagonal block); entries at least one band
    # width below the diagonal lie in mirrored tiles whatever the chosen configuration.
    configs = [impl.INTERPRETER_SYM] if INTERPRETED else \
        [impl.FALLBACK_SYM] + [c.kwargs for c in impl._sym_configs(torch.cuda.get_device_capability()[0])]
    band = max(c["BLOCK_N"] for c in configs)
    lower = torch.tril(torch.ones(300, 300, dtype=torch.bool, device=DEVICE), diagonal=-band)
    assert lower.any()
    assert torch.equal(S[lower], S.mT[lower])
    assert torch.allclose(S, X @ X.mT, rtol=1e-5, atol=1e-5)


def _fixed_config(impl, kind: str, monkeypatch) -> dict:
    """The fixed configuration the launches will use, to override in a test: the interpreter's,
    or on a GPU the fallback with autotuning switched off (so loop flattening is compiled too)."""
    if INTERPRETED:
        return getattr(impl, f"INTERPRETER_{kind}")
    monkeypatch.setenv("MODMAN_TRITON_AUTOTUNE", "0")
    return getattr(impl, f"FALLBACK_{kind}")


@pytest.mark.parametrize("tiles", [(32, 32, False), (32, 64, False), (16, 64, False), (32, 64, True)], ids=str)
def test_gram_is_right_for_every_tile_ratio(tiles, monkeypatch):
    """R = BLOCK_N / BLOCK_M of 1, 2 and 4, on sizes that leave the last group of row tiles partial;
    and a persistent grid (a few programs walking all tiles, across the batch)."""
    from modman.kernels import _triton_ns as impl

    config = _fixed_config(impl, "SYM", monkeypatch)
    monkeypatch.setitem(config, "BLOCK_M", tiles[0])
    monkeypatch.setitem(config, "BLOCK_N", tiles[1])
    monkeypatch.setitem(config, "PERSISTENT", tiles[2])
    for shape in [(2, 70, 33), (97, 20), (1, 5)]:
        X = _random(shape, torch.float32, seed=shape[0])
        m = shape[-2]
        poison = lambda: torch.full((*shape[:-2], m, m), float("nan"), device=DEVICE)  # noqa: E731
        S = kernels.gram(X, out=poison())  # every entry must be written
        assert torch.allclose(S, X @ X.mT, rtol=1e-5, atol=1e-5), (tiles, shape)
        P = kernels.gram_poly(S, 0.5, -2.0, out=poison())
        assert torch.allclose(P, 0.5 * S - 2.0 * S @ S, rtol=1e-4, atol=1e-4), (tiles, shape)


def test_persistent_apply_walks_every_tile(monkeypatch):
    from modman.kernels import _triton_ns as impl

    monkeypatch.setitem(_fixed_config(impl, "APPLY", monkeypatch), "PERSISTENT", True)
    B, X = _random((3, 40, 40), torch.float32, seed=3), _random((3, 40, 70), torch.float32, seed=4)
    Y = kernels.apply_poly(B, X, 0.75, out=torch.full_like(X, float("nan")))
    assert torch.allclose(Y, 0.75 * X + B @ X, rtol=1e-5, atol=1e-5)


def _tma_comparable(monkeypatch) -> None:
    """Descriptor loads on for the launches that follow, on a GPU with the fixed configuration so
    that the autotuner cannot pick different tiles for the two load paths."""
    from modman.kernels import _triton_ns as impl

    if not INTERPRETED:
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("descriptor (TMA) loads need a Hopper or newer GPU")
        monkeypatch.setenv("MODMAN_TRITON_AUTOTUNE", "0")
    if not impl._HAS_DESCRIPTORS:
        pytest.skip("this Triton has no tl.make_tensor_descriptor")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tma_loads_give_the_same_bits_as_pointer_loads(dtype, monkeypatch):
    """Descriptor (TMA) loads read the same tiles as masked pointer loads, zero padding included:
    on shapes whose rows end inside a tile, where the flat row descriptors run into the next
    matrix of the batch and the 3-D one of X must stop at its own matrix; and on padded rows
    (row stride > row length), where the K bound must be the length, not the stride."""
    from modman.kernels import _triton_ns as impl

    _tma_comparable(monkeypatch)
    used = []
    launch = impl._launch
    monkeypatch.setattr(impl, "_launch", lambda *a, **flags: used.append(flags["TMA"]) or launch(*a, **flags))
    padded = _random((3, 40, 32), dtype, seed=9)[:, :, :24]
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("MODMAN_TRITON_TMA", setting)
        assert impl.tma_wanted(0 if INTERPRETED else 9, 1) == (setting == "1")
        for name, X in [("batch", _random((2, 40, 24), dtype, seed=2)), ("wide", _random((72, 136), dtype, seed=3)),
                        ("square", _random((3, 40, 40), dtype, seed=4)), ("padded", padded)]:
            used.clear()
            S = kernels.gram(X)
            B = kernels.gram_poly(S, 0.5, -1.0)
            Y = kernels.apply_poly(B, X, 0.3)
            assert used == [setting == "1"] * 3, (name, used)  # the load path really taken
            results[setting, name] = (S, B, Y, kernels.newton_schulz(X, PE[:2]))
    for (setting, name), pointer in results.items():
        if setting == "0":
            assert all(torch.equal(p, t) for p, t in zip(pointer, results["1", name])), name


def test_tma_loads_keep_a_nan_in_its_own_matrix(monkeypatch):
    _tma_comparable(monkeypatch)
    monkeypatch.setenv("MODMAN_TRITON_TMA", "1")
    X = _random((2, 40, 24), torch.float32)  # 40 rows: the second matrix starts inside a tile
    X[1, 0, 5] = float("nan")
    out = kernels.newton_schulz(X, PE[:2])
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert torch.equal(out[0], kernels.newton_schulz(X[0], PE[:2]))


def test_tma_layout_rule():
    """Descriptors need unit stride along rows and 16-byte aligned strides; flat ones also need
    the matrices of a batch stacked without gaps. Anything else takes the pointer loads."""
    from modman.kernels import _triton_ns as impl

    assert impl.tma_layout(torch.empty(2, 8, 4), flat=True)
    assert not impl.tma_layout(torch.empty(2, 8, 6), flat=True)  # 24-byte rows
    assert impl.tma_layout(torch.empty(2, 8, 8, dtype=torch.bfloat16), flat=True)
    assert not impl.tma_layout(torch.empty(2, 8, 8).mT, flat=False)  # column-major
    padded = torch.empty(2, 12, 8)[:, :8]  # gaps between the matrices
    assert impl.tma_layout(padded, flat=False) and not impl.tma_layout(padded, flat=True)
    assert not impl.tma_layout(torch.empty(33)[1:].view(1, 4, 8), flat=True)  # base off by 4 bytes
    assert not impl.tma_layout(torch.empty(36).as_strided((2, 4, 4), (18, 4, 1)), flat=False)  # 72-byte batch stride
    assert not impl.tma_layout(torch.empty(8).expand(3, 40, 8), flat=True)  # broadcast rows and matrices
    assert not impl.tma_layout(torch.empty(320).as_strided((3, 40, 8), (0, 8, 1)), flat=False)  # one matrix thrice
    assert not impl.tma_layout(torch.empty(64).as_strided((1, 4, 8), (32, 4, 1)), flat=True)  # overlapping rows


def test_tma_is_chosen_for_large_launches_on_hopper(monkeypatch):
    from modman.kernels import _triton_ns as impl

    if not impl._HAS_DESCRIPTORS:
        pytest.skip("this Triton has no tl.make_tensor_descriptor")
    monkeypatch.setattr(impl, "INTERPRETED", False)
    monkeypatch.delenv("MODMAN_TRITON_TMA", raising=False)
    assert impl.tma_wanted(9, impl.TMA_MIN_WORK) and impl.tma_wanted(10, 2**40)
    assert not impl.tma_wanted(9, impl.TMA_MIN_WORK - 1)  # small launches: descriptors cost more than they save
    assert not impl.tma_wanted(8, 2**40)  # Ampere has no tensor memory accelerator
    monkeypatch.setenv("MODMAN_TRITON_TMA", "0")
    assert not impl.tma_wanted(9, 2**40)
    monkeypatch.setenv("MODMAN_TRITON_TMA", "1")
    assert impl.tma_wanted(8, 1)  # forced: the layout alone decides
    monkeypatch.setenv("MODMAN_TRITON_TMA", "off")
    with pytest.raises(ValueError, match="MODMAN_TRITON_TMA"):
        impl.tma_wanted(9, 2**40)


def test_input_is_not_modified():
    X = _random((30, 50), torch.bfloat16)
    before = X.clone()
    kernels.newton_schulz(X, PE[:3])
    assert torch.equal(X, before)


def test_gram_matrix_argument_skips_the_first_product():
    X = _random((20, 33), torch.float32)
    S = kernels.gram(X)
    assert torch.equal(kernels.newton_schulz(X, PE[:2], gram_matrix=S), kernels.newton_schulz(X, PE[:2]))
    with pytest.raises(ValueError, match="gram_matrix"):
        kernels.newton_schulz(X, PE[:2], gram_matrix=S[:5, :5])


def test_autotune_configurations_are_well_formed(monkeypatch):
    """Every configuration: BLOCK_N a multiple of BLOCK_M (the band needs R = BLOCK_N / BLOCK_M
    whole), and MODMAN_TRITON_PERSISTENT=0 drops exactly the persistent ones."""
    from modman.kernels import _triton_ns as impl

    for major in (8, 9):
        sym, apply = impl._sym_configs(major), impl._apply_configs(major)
        assert all(c.kwargs["BLOCK_N"] % c.kwargs["BLOCK_M"] == 0 for c in sym)
        monkeypatch.setenv("MODMAN_TRITON_PERSISTENT", "0")
        for configs in (sym, apply):
            kept = impl._without_persistent(configs)
            assert kept and not any(c.kwargs["PERSISTENT"] for c in kept)
            assert len(kept) == sum(not c.kwargs["PERSISTENT"] for c in configs)
        monkeypatch.delenv("MODMAN_TRITON_PERSISTENT")
        assert impl._without_persistent(sym) == sym


@pytest.mark.skipif(INTERPRETED, reason="CUDA graphs need a GPU")
def test_graph_replay_equals_eager_launches(monkeypatch):
    from modman.kernels import _graphs

    kernels.clear_graph_cache()
    X1, X2 = _random((2, 96, 160), torch.bfloat16, seed=1), _random((2, 96, 160), torch.bfloat16, seed=2)
    assert _graphs.wanted(X1)
    first = kernels.newton_schulz(X1, PE[:4])  # first sight of the key: eager, nothing captured
    assert not _graphs._cache
    second = kernels.newton_schulz(X2, PE[:4])  # second: captured, then replayed
    assert len(_graphs._cache) == 1
    again = kernels.newton_schulz(X1, PE[:4])  # replay with other data in the static input
    assert torch.equal(first, again) and first.data_ptr() != again.data_ptr()  # no aliasing
    gram = kernels.gram(X1)
    with_gram = [kernels.newton_schulz(X1, PE[:4], gram_matrix=gram) for _ in range(3)]
    assert all(torch.equal(first, r) for r in with_gram)
    monkeypatch.setenv("MODMAN_TRITON_GRAPHS", "0")
    assert not _graphs.wanted(X1)
    assert torch.equal(second, kernels.newton_schulz(X2, PE[:4]))
    monkeypatch.delenv("MODMAN_TRITON_GRAPHS")
    # The byte budget drops the least recently used graphs: room for the last three of these.
    shapes = [(1, m, 24) for m in (8, 9, 10, 11)]
    sizes = [_graphs._bytes(torch.empty(s, device="meta")) for s in shapes]
    monkeypatch.setattr(_graphs, "MAX_BYTES", sum(sizes[1:]) + 1)
    monkeypatch.setattr(_graphs, "wanted", lambda Y: True)
    for shape in shapes:
        for _ in range(2):
            kernels.newton_schulz(_random(shape, torch.float32), PE[:2])
    assert [k[0] for k in _graphs._cache] == shapes[1:]
    kernels.clear_graph_cache()
    assert not _graphs._cache


# --- msign end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (3, 24, 40), (2, 2, 40, 24)], ids=str)
def test_msign_triton_backend_matches_torch_backend(shape):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(*shape, generator=g).to(DEVICE)
    # Four iterations (not the default ten) keep the interpreter's run short; same schedule.
    with_triton = msign(X, backend="triton", steps=4)
    with_torch = msign(X, backend="torch", steps=4)
    reference = msign(X.double().cpu(), backend="torch", steps=4)
    assert with_triton.shape == X.shape and with_triton.dtype == X.dtype
    failures = _bar_failures(with_triton, with_torch, reference, torch.float32, "msign fp32")
    assert not failures, failures
    # Both are orthogonal to the schedule's accuracy, so they agree closely in absolute terms too.
    assert (with_triton - with_torch).abs().max().item() < 1e-4


def test_msign_bf16_compute_matches_torch_backend():
    # A batch, so that the mean error averages over enough entries to be a stable statistic.
    X = torch.randn(4, 40, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = dict(compute_dtype=torch.bfloat16, schedule="polar_express", steps=4)
    with_triton = msign(X, backend="triton", **kw)
    with_torch = msign(X, backend="torch", **kw)
    reference = msign(X.double().cpu(), backend="torch", steps=4)
    failures = _bar_failures(with_triton, with_torch, reference, torch.bfloat16, "msign bf16")
    assert not failures, failures


def test_auto_backend_stays_on_torch_on_cpu():
    X = torch.randn(8, 8)
    assert torch.equal(msign(X, backend="auto"), msign(X, backend="torch"))


# --- availability and bad input -----------------------------------------------------------------

def test_available_and_worth_it():
    assert kernels.available()
    assert not kernels.worth_it(torch.empty(2048, 2048))  # CPU: never chosen by "auto"
    fake = types.SimpleNamespace(is_cuda=True, ndim=3, shape=(8, 1024, 4096), dtype=torch.bfloat16)
    assert kernels.worth_it(fake)
    assert not kernels.worth_it(types.SimpleNamespace(is_cuda=True, ndim=2, shape=(512, 4096), dtype=torch.bfloat16))
    # fp32 runs without tensor cores in the kernels: measured slower than cuBLAS, so never "auto".
    assert not kernels.worth_it(types.SimpleNamespace(is_cuda=True, ndim=3, shape=(8, 1024, 4096), dtype=torch.float32))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 4, 4), (2, 0, 3), (2, 3, 0)], ids=str)
def test_empty_inputs(shape):
    X = torch.empty(shape, device=DEVICE)
    out = kernels.newton_schulz(X, PE[:2])
    assert out.shape == X.shape
    assert msign(X, backend="triton").shape == X.shape
    if shape == (5, 0):  # five empty rows: their Gram matrix is the 5×5 zero matrix
        assert torch.equal(kernels.gram(X), torch.zeros(5, 5, device=DEVICE))


def test_nan_stays_in_its_own_matrix():
    X = _random((2, 20, 30), torch.float32)
    X[0, 3, 4] = float("nan")
    out = kernels.newton_schulz(X, PE[:3])  # a fixed number of launches: cannot hang
    assert torch.isnan(out[0]).all()
    assert torch.equal(out[1], kernels.newton_schulz(X[1], PE[:3]))
    assert torch.isnan(msign(X, backend="triton")[0]).all()


def test_mismatched_and_unsupported_inputs():
    X = _random((10, 20), torch.float32)
    B = torch.eye(10, device=DEVICE)
    with pytest.raises(TypeError, match="float16"):
        kernels.apply_poly(B, X.half(), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        kernels.newton_schulz(X.double(), PE[:1])
    with pytest.raises(ValueError, match="2-D"):
        kernels.newton_schulz(X[0], PE[:1])
    with pytest.raises(ValueError, match="apply_poly needs"):
        kernels.apply_poly(torch.eye(9, device=DEVICE), X, 1.0)
    with pytest.raises(TypeError, match="gram_matrix"):
        kernels.newton_schulz(X, PE[:1], gram_matrix=kernels.gram(X).half())
    with pytest.raises(TypeError, match="out"):
        kernels.gram(X, out=torch.empty(10, 10, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="overlap"):
        S = kernels.gram(X)
        kernels.gram_poly(S, 1.0, 1.0, out=S)
    with pytest.raises(ValueError, match="sharing memory"):  # (a 10×10 result of one value before)
        kernels.gram(X, out=torch.empty(1, 1, device=DEVICE).expand(10, 10))
    with pytest.raises(ValueError, match="sharing memory"):
        kernels.apply_poly(B, X, 1.0, out=torch.empty(10, 1, device=DEVICE).expand(10, 20))
    empty = kernels.apply_poly(torch.empty(0, 0, device=DEVICE), torch.empty(0, 6, device=DEVICE), 1.0,
                               out=torch.empty(0, 1, device=DEVICE).expand(0, 6))  # nothing is written: fine
    assert empty.shape == (0, 6)
    with pytest.raises(TypeError, match="compute_dtype=torch.float32"):
        kernels.gram(X.double())
    with pytest.raises(ValueError, match="3 numbers"):
        kernels.newton_schulz(X, [(1.0, 2.0)])
    with pytest.raises(ValueError, match="finite"):
        kernels.newton_schulz(X, [(1.0, float("nan"), 0.0)])


def test_an_input_that_requires_grad_is_refused_outside_no_grad():
    """The kernels record no autograd graph: before, gram/gram_poly/apply_poly returned a result
    without grad_fn and a backward silently missed them."""
    X = _random((10, 20), torch.float32).requires_grad_()
    S = torch.eye(10, device=DEVICE)
    for call in (lambda: kernels.gram(X), lambda: kernels.gram_poly(S.clone().requires_grad_(), 1.0, 1.0),
                 lambda: kernels.apply_poly(S, X, 1.0),
                 lambda: kernels.newton_schulz(X, PE[:1])):
        with pytest.raises(ValueError, match="requires grad, and the kernels record no autograd graph"):
            call()
    with torch.no_grad():
        assert torch.equal(kernels.gram(X), kernels.gram(X.detach()))


def test_available_follows_how_the_kernels_were_made(monkeypatch):
    """TRITON_INTERPRET=1 set after the kernels were made does not make them interpreted."""
    assert kernels.available()
    monkeypatch.setattr(kernels._impl(), "INTERPRETED", False)  # (_impl makes the kernels)
    assert kernels.available() == torch.cuda.is_available()


def test_old_triton_is_a_clear_error(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.2.0")  # tl.range has no flatten= before 3.3
    with pytest.raises(RuntimeError, match="Triton ≥ 3.3, found 3.2.0"):
        kernels.gram(_random((4, 6), torch.float32))


def _without_interpreter(code: str) -> str:
    """stdout of ``code`` run in a fresh Python without TRITON_INTERPRET (modman registered)."""
    setup = "import sys; sys.path.insert(0, sys.argv[1]); from _register import register; register()\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", setup + code, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cpu_without_interpreter_is_a_clear_error():
    """backend="triton" on a CPU tensor without TRITON_INTERPRET=1: a RuntimeError naming it."""
    out = _without_interpreter(
        "import torch; from modman import msign\n"
        "try:\n"
        "    msign(torch.randn(4, 6), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    assert out.startswith("RuntimeError:") and "TRITON_INTERPRET=1" in out, out


def test_interpreter_requested_after_triton_was_imported_is_a_clear_error():
    """TRITON_INTERPRET=1 set after `import triton`: available() said True and the first call failed
    inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel"; a probe). Now it
    says False, and a call, an empty input and msign's up-front check all name the cause."""
    out = _without_interpreter(
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from modman import kernels, msign\n"
        "print('available', kernels.available())\n"
        "for call in (lambda: kernels.gram(torch.randn(4, 6)), lambda: msign(torch.randn(4, 6), backend='triton'),\n"
        "             lambda: msign(torch.zeros(0, 6), backend='triton')):\n"
        "    try:\n"
        "        call()\n"
        "        print('no error')\n"
        "    except RuntimeError as e:\n"
        "        print('RuntimeError:', 'imported before it was set' in str(e))\n"
    )
    assert out.split("\n")[:4] == ["available False"] + ["RuntimeError: True"] * 3, out


def test_msign_checks_the_triton_backend_whatever_the_input():
    """An empty X returned before the check and schedule='svd' ignored the backend (a probe); an
    fp64 compute dtype named X's dtype although X was fp32."""
    from modman import msign

    with pytest.raises(ValueError, match="schedule='svd' is an exact SVD"):
        msign(torch.randn(4, 6), backend="triton", schedule="svd")
    with pytest.raises(TypeError, match="the kernels compute in .* not torch.float64"):
        msign(torch.randn(4, 6), backend="triton", compute_dtype=torch.float64)
    assert msign(torch.zeros(0, 6), backend="triton").shape == (0, 6)  # the interpreter is on here


def test_packaged_as_modman_kernels():
    """The installed modman must ship kernels/ as modman.kernels (pyproject package-dir mapping)."""
    assert PACKAGED, ("modman.kernels is not importable from the installed package: pyproject's "
                      "packages.find(include=['modman*']) does not pick up the package-dir mapping "
                      "'modman.kernels' = 'kernels'; list the packages explicitly")
