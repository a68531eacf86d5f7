"""msign: accuracy bars of issue 2, properties, dtype policy, batching, errors, frozen literal."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman import msign
from modman.linalg import SCHEDULES, coefficients, default_steps

from .oracle import polar_svd, svdvals64


def spectrum_matrix(m, n, sv, dtype=torch.float32, seed=0):
    """U diag(sv) Vᵀ with Haar-random U (m×k), V (n×k), k = len(sv), built in fp64."""
    g = torch.Generator().manual_seed(seed)
    k = len(sv)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.as_tensor(sv, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype), U, V


def log_spectrum(k, kappa):
    return torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)


def flat_spectrum(k, kappa):
    s = torch.ones(k, dtype=torch.float64)
    s[-1] = 1.0 / kappa
    return s


def max_dev(Y):
    return float(np.abs(svdvals64(Y) - 1).max())


# --- the accuracy bar --------------------------------------------------------------

BAR_SHAPES = [(512, 256), (256, 512), (300, 300), (257, 129)]


@pytest.mark.parametrize("shape", BAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spectrum", ["log", "flat"])
def test_bar_fp32_kappa_1e3_default_schedule(shape, spectrum):
    m, n = shape
    k = min(m, n)
    sv = (log_spectrum if spectrum == "log" else flat_spectrum)(k, 1e3)
    X, U, V = spectrum_matrix(m, n, sv * 3.7, seed=m + n)
    assert default_steps("polar_express") <= 12
    Y = msign(X)
    assert Y.dtype == torch.float32 and Y.shape == X.shape
    assert max_dev(Y) <= 1e-5
    # and it is the polar factor, not just some orthogonal matrix
    assert (Y.double() - U @ V.T).abs().max().item() <= 1e-4


def test_rank_k_null_space_bound_fp32():
    # rank 4 of 64×32 and 200×120: the null singular values must stay ≤ 1e-2
    for (m, n, k) in [(64, 32, 4), (120, 200, 7), (96, 96, 50)]:
        sv = torch.linspace(1.0, 0.1, k, dtype=torch.float64)
        X, U, V = spectrum_matrix(m, n, sv, seed=k)
        Y = msign(X)
        s = svdvals64(Y)
        assert np.abs(s[:k] - 1).max() <= 1e-5
        assert s[k:].max() <= 1e-2
        # the range is right: Y ≈ U_k V_kᵀ
        assert (Y.double() - U @ V.T).abs().max().item() <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", ["polar_express", "keller", "convergent", "svd"])
def test_zero_maps_to_zero(dtype, schedule):
    X = torch.zeros(3, 7, 5, dtype=dtype)
    Y = msign(X, schedule=schedule)
    assert Y.dtype == dtype and Y.shape == X.shape
    assert torch.equal(Y, torch.zeros_like(X))


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e-38, 1e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scales(scale, dtype):
    X, U, V = spectrum_matrix(40, 24, log_spectrum(24, 1e2), dtype=torch.float64, seed=1)
    Xs = (X * scale).to(dtype)
    assert torch.isfinite(Xs).all()
    Y = msign(Xs)
    assert torch.isfinite(Y).all()
    ref = U @ V.T
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (Y.double() - ref).abs().max().item() <= tol * 10
    assert max_dev(Y) <= tol


@pytest.mark.parametrize("dtype, compute, scale", [
    (torch.float32, torch.float16, 1e6), (torch.float32, torch.float16, 1e-9),
    (torch.float64, torch.float32, 1e300), (torch.float64, torch.float32, 1e-300),
    (torch.float64, torch.bfloat16, 1e-300)])
def test_scale_free_in_a_narrower_compute_dtype(dtype, compute, scale):
    """msign(cX) = msign(X): X was cast to the compute dtype before its division by max|X|, so an
    fp32 gradient at 1e5 (fp16 loss scaling) came back NaN in fp16 and an fp64 one at 1e-300 all
    zeros in fp32 (a probe)."""
    X, _, _ = spectrum_matrix(40, 24, log_spectrum(24, 1e2), dtype=torch.float64, seed=3)
    X = X.to(dtype)
    Y = msign(X * scale, compute_dtype=compute)
    assert torch.isfinite(Y).all()
    torch.testing.assert_close(Y, msign(X, compute_dtype=compute), rtol=0, atol=1e-2 if compute != torch.float32 else 1e-6)


def test_fp16_compute_of_a_dominant_rank_one_matrix_is_not_zero():
    """Its Gram's norm bound (up to m·n for ones plus noise) overflowed fp16, the scale became ∞
    and msign 0: modman.Muon(ns_dtype="float16") stepped nothing (a probe). 300²: the bound is
    ~9e4, past fp16's 65504 (at 256² it was 59936, under it: a review's mutants survived)."""
    g = torch.Generator().manual_seed(0)
    X = torch.ones(300, 300) + 0.01 * torch.randn(300, 300, generator=g)
    Y = msign(X, compute_dtype=torch.float16)
    ref = msign(X)
    assert torch.isfinite(Y).all() and Y.abs().max() > 0.1
    assert (Y - ref).norm() / ref.norm() < 0.05


def test_zero_and_svd_in_a_narrower_compute_dtype():
    """The division by max|X| before the cast: a zero matrix stays 0 (not 0/0), and the SVD
    schedule is scale-free too (fp64 at 1e-300 in fp32 was 0.79 off without it; a review)."""
    X, _, _ = spectrum_matrix(20, 12, log_spectrum(12, 1e2), dtype=torch.float64, seed=5)
    batch = torch.stack([X, torch.zeros_like(X)])
    Y = msign(batch * 1e-300, compute_dtype=torch.float32)
    assert torch.equal(Y[1], torch.zeros_like(X)) and torch.isfinite(Y).all()
    torch.testing.assert_close(msign(X * 1e-300, schedule="svd", compute_dtype=torch.float32),
                               msign(X, schedule="svd", compute_dtype=torch.float32), rtol=0, atol=1e-5)


def test_fp32_to_bf16_takes_no_extra_pass():
    """bf16 has fp32's exponents: no division before the cast (it cost 7× the cast; a review)."""
    from modman.linalg.msign import within_range

    X = torch.randn(8, 4)
    assert within_range(X, torch.bfloat16) is X and within_range(X, torch.float16) is not X


def test_extreme_scales_bf16():
    X, U, V = spectrum_matrix(40, 24, log_spectrum(24, 1e2), dtype=torch.float64, seed=2)
    for scale in (1e-30, 1e30):
        Y = msign((X * scale).bfloat16())
        assert Y.dtype == torch.bfloat16 and torch.isfinite(Y).all()
        assert max_dev(Y) <= 2e-2  # bf16 output rounding only


def test_zero_matrix_inside_batch_does_not_poison_others():
    X, U, V = spectrum_matrix(12, 6, log_spectrum(6, 10.0), seed=3)
    B = torch.stack([X, torch.zeros_like(X), 1e-30 * X, 1e30 * X])
    Y = msign(B)
    assert torch.isfinite(Y).all()
    assert torch.equal(Y[1], torch.zeros_like(X))
    for i in (0, 2, 3):
        assert (Y[i].double() - U @ V.T).abs().max().item() <= 1e-5


# --- schedules -----------------------------------------------------------------------------

def test_keller_does_not_converge_but_stays_in_its_band():
    X, _, _ = spectrum_matrix(128, 64, log_spectrum(64, 1e2), seed=4)
    s = svdvals64(msign(X, schedule="keller", steps=12))
    assert s.min() >= 0.6 and s.max() <= 1.2
    assert np.abs(s - 1).max() >= 0.05  # it really is the non-convergent quintic


def test_newton_schulz_takes_one_matrix_as_a_batch_of_one():
    from modman.linalg import newton_schulz
    X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)) / 8
    coeffs = coefficients("polar_express", 3)
    assert torch.equal(newton_schulz(X, coeffs), newton_schulz(X[None], coeffs)[0])
    with pytest.raises(ValueError, match="newton_schulz: X must be"):
        newton_schulz(X[0], coeffs)


def test_keller_band_at_condition_number_1000():
    """The docstring's band at κ = 1000 (it claimed [0.68, 1.13] at any κ; a probe measured 0.415)."""
    X, _, _ = spectrum_matrix(64, 48, log_spectrum(48, 1e3), seed=0)
    s = svdvals64(msign(X, schedule="keller"))
    assert 0.35 <= s.min() < 0.6 and s.max() <= 1.21


def test_convergent_schedule_polishes_nearly_orthogonal_input():
    sv = 1 + 0.2 * (torch.rand(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5)
    X, U, V = spectrum_matrix(64, 32, sv, dtype=torch.float64, seed=5)
    Y = msign(X, schedule="convergent")
    assert (Y - U @ V.T).abs().max().item() <= 1e-12


def test_svd_schedule_is_exact_and_rank_aware():
    X, U, V = spectrum_matrix(30, 20, torch.tensor([3.0, 2.0, 1e-3, 1e-6]), dtype=torch.float64, seed=6)
    Y = msign(X, schedule="svd")
    assert (Y - U @ V.T).abs().max().item() <= 1e-9
    s = svdvals64(Y)
    assert s[4:].max() <= 1e-12


def test_steps_zero_is_normalisation_only_and_steps_change_result():
    X, _, _ = spectrum_matrix(16, 8, log_spectrum(8, 1e2), dtype=torch.float64, seed=7)
    Y0 = msign(X, steps=0)
    assert svdvals64(Y0).max() <= 1.0
    assert not torch.allclose(msign(X, steps=3), msign(X, steps=10))


@settings(max_examples=60)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["gaussian", "flat", "rank1", "log"]),
       st.integers(0, 2**31 - 1))
def test_property_gram_normalisation_bounds_sigma_max_and_is_tight_on_a_flat_spectrum(m, n, kind, seed):
    """msign's normalisation divides by min(‖S‖_F, ‖S‖_∞)^{1/2}, S = X Xᵀ: an upper bound of σ_max
    (never above 1/safety after it), and σ_max exactly on a flat spectrum, where ‖S‖_F alone was
    n^{1/4} too large (a flat-top spectrum ended 10 iterations at max|σ−1| = 5.9e-5 on 2048²)."""
    from modman.linalg.msign import _normalise

    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    sv = {"gaussian": None, "flat": torch.ones(k, dtype=torch.float64), "rank1": torch.tensor([1.0]),
          "log": log_spectrum(k, 1e3)}[kind]
    X = torch.randn(m, n, generator=g, dtype=torch.float64) if sv is None else spectrum_matrix(
        m, n, sv, dtype=torch.float64, seed=seed)[0]
    Y = X.mT if m > n else X
    safety = SCHEDULES["polar_express"][2]
    Yn, gram = _normalise(Y[None], "gram", safety)
    s_max = float(svdvals64(Yn[0]).max())
    assert s_max <= (1 + 1e-12) / safety
    torch.testing.assert_close(gram, Yn @ Yn.mT, rtol=1e-12, atol=1e-14)
    if kind == "flat":  # X Xᵀ = I (the Gram side is the small one): ‖S‖_∞ = λ_max = 1, ‖S‖_F = √k
        assert s_max >= (1 - 1e-9) / safety


# --- dtype policy, shapes, batching --------------------------------------------------------

@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_input_computed_in_fp32(low):
    X, _, _ = spectrum_matrix(48, 32, log_spectrum(32, 1e2), seed=8)
    Xl = X.to(low)
    Y = msign(Xl)
    assert Y.dtype == low and Y.shape == Xl.shape
    # computed in fp32: identical to the fp32 computation on the same (upcast) input, rounded once
    assert torch.equal(Y, msign(Xl.float()).to(low))
    # and different from an iteration carried out in the low precision itself
    assert not torch.equal(Y, msign(Xl, compute_dtype=low))


def test_fp32_never_computed_in_bf16_unless_asked():
    X, U, V = spectrum_matrix(64, 48, log_spectrum(48, 1e2), seed=9)
    Y = msign(X)
    assert Y.dtype == torch.float32
    assert torch.equal(Y, msign(X, compute_dtype=torch.float32))
    assert max_dev(Y) <= 1e-5  # impossible in bf16
    Yb = msign(X, compute_dtype=torch.bfloat16)
    assert Yb.dtype == torch.float32  # output keeps X's dtype even when asked to compute in bf16
    assert max_dev(Yb) > 1e-4  # it really was computed in bf16


def test_fp64_computed_in_fp64():
    X, U, V = spectrum_matrix(64, 48, log_spectrum(48, 1e2), dtype=torch.float64, seed=10)
    Y = msign(X)
    assert Y.dtype == torch.float64
    assert (Y - U @ V.T).abs().max().item() <= 1e-11


@pytest.mark.parametrize("schedule", ["polar_express", "keller", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_equals_per_matrix(schedule, dtype):
    g = torch.Generator().manual_seed(11)
    for shape in [(2, 3, 10, 6), (4, 6, 10), (2, 7, 7)]:
        X = torch.randn(*shape, generator=g, dtype=dtype)
        Y = msign(X, schedule=schedule)
        assert Y.shape == X.shape and Y.dtype == dtype
        flat_X, flat_Y = X.reshape(-1, *shape[-2:]), Y.reshape(-1, *shape[-2:])
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for x, y in zip(flat_X, flat_Y):
            assert (msign(x, schedule=schedule) - y).abs().max().item() <= tol


def test_non_contiguous_and_transposed_views():
    X, U, V = spectrum_matrix(20, 12, log_spectrum(12, 1e2), dtype=torch.float64, seed=12)
    Yt = msign(X.mT)  # a non-contiguous wide view
    assert (Yt - (U @ V.T).T).abs().max().item() <= 1e-11
    assert torch.allclose(msign(X.mT.contiguous()), Yt, atol=1e-13, rtol=0)


def test_empty_input():
    for shape in [(0, 4), (3, 0), (2, 0, 5)]:
        X = torch.zeros(shape)
        assert msign(X).shape == X.shape


# --- errors ---------------------------------------------------------------------------------

def test_clear_errors():
    with pytest.raises(ValueError, match="2 dimensions"):
        msign(torch.ones(5))
    with pytest.raises(ValueError):
        msign(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        msign(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        msign(torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError):
        msign(np.ones((3, 3)))
    with pytest.raises(ValueError, match="schedule"):
        msign(torch.ones(3, 3), schedule="nope")
    with pytest.raises(ValueError, match="no Newton–Schulz coefficients"):  # (a bare KeyError: 'svd')
        coefficients("svd", 2)
    for steps in (None, 3):  # with steps given, an unknown name was a bare KeyError (a probe)
        with pytest.raises(ValueError, match=r"unknown msign schedule 'Keller'; choose from \['convergent'"):
            msign(torch.randn(4, 4), schedule="Keller", steps=steps)
    with pytest.raises(ValueError, match="backend"):
        msign(torch.ones(3, 3), backend="cuda-magic")
    with pytest.raises(ValueError, match="steps"):
        msign(torch.ones(3, 3), steps=-1)


def test_schedule_table_is_the_published_one():
    from .oracle import PE_SAFE

    table = SCHEDULES["polar_express"][0]
    assert len(table) == 8
    for got, want in zip(table, PE_SAFE):
        assert got == pytest.approx(want, rel=1e-15)
    assert SCHEDULES["keller"][0][0] == (3.4445, -4.7750, 2.0315)


# --- Hypothesis properties -------------------------------------------------------------------

@st.composite
def spectral_inputs(draw):
    """(X in dtype, U, V, k) over tall, wide, square, odd and rank-deficient shapes, κ ≤ 1e3."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["tall", "wide", "square", "odd"]))
    a = draw(st.integers(2, 40))
    b = draw(st.integers(1, 40))
    if kind == "tall":
        m, n = a + b, a
    elif kind == "wide":
        m, n = a, a + b
    elif kind == "square":
        m = n = a
    else:
        m, n = 2 * (a // 2) + 1, 2 * (b // 2) + 1
    kmax = min(m, n)
    k = draw(st.integers(1, kmax))  # k < kmax: rank-deficient
    log_kappa = draw(st.floats(0.0, 3.0))
    log_scale = draw(st.sampled_from([0.0, -20.0, 20.0, draw(st.floats(-3, 3))]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    sv = 10 ** (-log_kappa * torch.rand(k, generator=g, dtype=torch.float64))
    sv[0] = 1.0
    if k > 1:
        sv[-1] = 10 ** -log_kappa
    X, U, V = spectrum_matrix(m, n, sv * 10**log_scale, dtype=dtype, seed=seed)
    return X, U, V, k


@settings(max_examples=40)
@given(spectral_inputs())
def test_property_orthogonal_on_range_bounded_on_null_space(case):
    X, U, V, k = case
    Y = msign(X)
    assert Y.shape == X.shape and Y.dtype == X.dtype
    assert torch.isfinite(Y).all()
    s = svdvals64(Y)
    tol = 1e-5 if X.dtype == torch.float32 else 1e-9
    assert np.abs(s[:k] - 1).max() <= tol
    if len(s) > k:
        assert s[k:].max() <= 1e-2
    # the polar factor itself: right subspaces, not merely orthogonal
    err = (Y.double() - U @ V.T).abs().max().item()
    assert err <= (1e-2 if len(s) > k else 100 * tol)


@given(spectral_inputs())
def test_property_transpose_and_scale_equivariance(case):
    X, _, _, k = case
    Y = msign(X)
    tol = 1e-5 if X.dtype == torch.float32 else 1e-11
    if k < min(X.shape):
        tol = 2e-2  # the null space holds amplified rounding noise (≤ 1e-2 by the bar above)
    assert (msign(X.mT) - Y.mT).abs().max().item() <= tol
    assert (msign(-X) + Y).abs().max().item() <= tol
    assert (msign(4.0 * X) - Y).abs().max().item() <= tol


# --- frozen regression literal ------------------------------------------------------------------

# msign(X) at the default schedule in fp64 for the 8×4 input below (κ ≈ 3e4, deliberately beyond
# convergence of the default so that a change of schedule, step count or normalisation moves it).
# Frozen when issue 2 was implemented; change only together with a documented schedule change.
FROZEN_8x4 = [
    [0.17608608994852162, 0.3330246778953957, 0.4289889201606562, 0.31202820937607334],
    [0.36214635889964636, 0.5014499400951565, 0.35248222880278424, 0.03692937784745784],
    [0.4844339256636495, 0.2735306477441245, -0.2697326827409813, -0.3013008884164498],
    [0.3336823085118574, -0.2840836613658815, -0.41666945454477067, 0.15740004624906476],
    [-0.1481799408787239, -0.40348711003760757, 0.33439632260412655, 0.15943380957562078],
    [-0.4839315024838913, 0.24890440700578276, 0.16935456196041956, -0.30213776242317514],
    [-0.04432796360007178, 0.278678238095857, -0.4078007294625616, 0.24524570540267715],
    [0.4834373071864679, -0.42391409890532944, 0.372217043379644, -0.179129836134114],
]


def frozen_input():
    k = torch.arange(32, dtype=torch.float64)
    i, j = k.div(4, rounding_mode="floor"), k % 4
    return (torch.sin(0.37 * (i + 1) * (j + 1) + 0.1 * i * i) * torch.pow(10.0, -1.5 * j)).reshape(8, 4)


def test_frozen_literal_default_msign_8x4():
    X = frozen_input()
    want = torch.tensor(FROZEN_8x4, dtype=torch.float64)
    assert (msign(X) - want).abs().max().item() <= 1e-10
    assert (msign(X.mT) - want.mT).abs().max().item() <= 1e-10
    # the literal is sensitive: one step more or fewer, or another normalisation, moves it
    for other in (msign(X, steps=default_steps("polar_express") - 1),
                  msign(X, steps=default_steps("polar_express") + 1),
                  msign(X, normalization="frobenius")):
        assert (other - want).abs().max().item() > 1e-6


# --- argument types; SVD at extreme scales --------------------------------------------------

@pytest.mark.parametrize("compute_dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_floating_compute_dtype_refused(compute_dtype):
    # msign(X, compute_dtype=torch.int32) used to return zeros: every iterate truncated
    with pytest.raises(TypeError, match="compute_dtype"):
        msign(torch.randn(4, 3), compute_dtype=compute_dtype)


@pytest.mark.parametrize("steps", [2.7, 3.0, True, np.bool_(True), "3"])
def test_steps_must_be_an_int(steps):
    # steps=2.7 used to run int(2.7) = 2 steps without a word
    with pytest.raises(TypeError, match="steps"):
        msign(torch.randn(4, 3), steps=steps)


def test_steps_accepts_numpy_integers():
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(msign(X, steps=np.int64(3)), msign(X, steps=3))


@pytest.mark.parametrize("scale", [1e38, 1e-38, 1e-44])
def test_svd_schedule_at_extreme_fp32_scales(scale):
    # fp32 LAPACK SVD of entries near 1e38 overflowed to a zero polar factor
    X, U, V = spectrum_matrix(12, 7, log_spectrum(7, 10), dtype=torch.float64, seed=3)
    Xs = (X / X.abs().max() * scale).to(torch.float32)
    Y = msign(Xs, schedule="svd")
    ref = polar_svd(Xs)  # fp64 oracle of the fp32 input as stored
    tol = 1e-5 if scale > 1e-40 else 1e-2  # at 1e-44 the input keeps only a few bits per entry
    assert (Y.double() - ref).abs().max().item() <= tol


def test_the_triton_backend_refuses_an_input_that_needs_a_gradient():
    """The kernels are not differentiable: their output had no grad_fn and backward() raised
    far from the cause. Refused here (before any Triton import, so on any machine); the torch
    backend stays differentiable, and under no_grad the request is not refused for that reason."""
    X = torch.randn(6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="backend='triton' is not differentiable and X requires grad"):
        msign(X, backend="triton")
    msign(X, backend="torch").sum().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all()
    with torch.no_grad():
        try:
            msign(X, backend="triton")
        except ValueError:
            raise AssertionError("refused under no_grad")
        except (RuntimeError, ImportError):
            pass  # no Triton / no interpreter on this machine: refused for that, not for autograd


@pytest.mark.parametrize("schedule", ["polar_express", "keller", "convergent", "svd"])
def test_a_zero_matrix_in_a_batch_has_a_finite_gradient(schedule):
    """msign(0) = 0, and its gradient was NaN (√0 under a discarded where; the SVD of equal
    singular values), which poisoned every gradient of a loss summed over the batch (a probe)."""
    X = torch.zeros(2, 4, 3, dtype=torch.float64)
    X[1] = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X.requires_grad_(True)
    weights = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Y = msign(X, schedule=schedule)
    (Y * weights).sum().backward()
    assert not Y[0].any() and torch.isfinite(X.grad).all() and not X.grad[0].any()
    alone = X.detach()[1].clone().requires_grad_(True)
    (msign(alone, schedule=schedule) * weights[1]).sum().backward()
    torch.testing.assert_close(X.grad[1], alone.grad, rtol=1e-9, atol=0)


def test_the_svd_schedule_in_half_precision_and_its_steps():
    """compute_dtype=bf16 with schedule='svd' raised NotImplementedError from LAPACK; steps=3
    with it was ignored without a word (a probe)."""
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    exact = polar_svd(X.double())
    for dtype in (torch.bfloat16, torch.float16):
        Y = msign(X, schedule="svd", compute_dtype=dtype)
        assert Y.dtype == X.dtype and (Y.double() - exact).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="steps has no meaning for schedule='svd'"):
        msign(X, schedule="svd", steps=3)


def test_newton_schulz_releases_the_gram_before_the_new_iterate():
    """Each iteration holds X, B = bS + cS² and the new X: S is released once B is made (msign of
    a square matrix peaked at 6× its size with S kept, 5× now: X/max|X|, the normalised X and its
    Gram, then three iterates). Same arithmetic: the result is bitwise that of the loop below."""
    from modman.diagnostics import peak_temporary_bytes
    from modman.linalg.msign import _normalise

    n = 256
    X = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    out = {}
    report = peak_temporary_bytes(lambda: out.setdefault("Y", msign(X)))
    assert 3 * X.nbytes <= report.peak_bytes <= 5 * X.nbytes, report.summary(X.nbytes)
    Y, S = _normalise(X[None], "gram", SCHEDULES["polar_express"][2])
    for i, (a, b, c) in enumerate(coefficients("polar_express", default_steps("polar_express"))):
        S = S if i == 0 else Y @ Y.mT
        Y = torch.baddbmm(Y, torch.baddbmm(S, S, S, beta=b, alpha=c), Y, beta=a)
    assert torch.equal(out["Y"], Y[0])
