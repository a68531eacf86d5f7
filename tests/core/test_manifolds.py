"""Stiefel (unscaled and rms, tall/wide, batched), Sphere, Euclidean: project, tangent, retract,
distance, random — checked against independent fp64 formulas."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from modman.manifolds import Euclidean, Sphere, Stiefel, get_manifold

from .oracle import polar_svd, svdvals64


def tall(X):
    return X.mT if X.shape[-2] < X.shape[-1] else X


def s_of(M: Stiefel, shape):
    if M.scale is None:
        return 1.0
    if M.scale == "rms":
        return math.sqrt(shape[-2] / shape[-1])
    return float(M.scale)


def gram_dev(X, s):
    """max |σ(X)/s − 1| in fp64, independent of the manifold's own distance()."""
    sv = torch.linalg.svdvals(X.double())
    return (sv / s - 1).abs().max().item()


def tangent_dev(W, A, s):
    """‖UᵀA + AᵀU‖_F (tall, U = W/s) in fp64."""
    U, At = tall(W.double()) / s, tall(A.double())
    H = U.mT @ At
    return torch.linalg.matrix_norm(H + H.mT).max().item()


@st.composite
def stiefel_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.sampled_from([None, "rms", 2.5]))
    kind = draw(st.sampled_from(["tall", "wide", "square", "odd"]))
    a, b = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    m, n = {"tall": (a + b, a), "wide": (a, a + b), "square": (a, a),
            "odd": (2 * (a // 2) + 1, 2 * (b // 2) + 1)}[kind]
    batch = draw(st.sampled_from([(), (3,), (2, 2)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return Stiefel(scale), (*batch, m, n), dtype, torch.Generator().manual_seed(seed)


def tol_for(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-12


@given(stiefel_cases())
def test_stiefel_random_and_project_on_manifold(case):
    M, shape, dtype, g = case
    s = s_of(M, shape)
    W = M.random(shape, generator=g, dtype=dtype)
    assert W.shape == shape and W.dtype == dtype
    assert gram_dev(W, s) <= tol_for(dtype)
    assert M.distance(W).max().item() <= tol_for(dtype)
    # project: s × the exact polar factor of a generic matrix (fp64 numpy reference)
    X = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    P = M.project(X)
    assert P.dtype == dtype and P.shape == shape
    assert (P.double() - s * polar_svd(X)).abs().max().item() <= 100 * tol_for(dtype)
    # idempotent on the manifold
    assert (M.project(P).double() - P.double()).abs().max().item() <= 10 * tol_for(dtype)


@given(stiefel_cases())
def test_stiefel_distance_is_max_singular_value_deviation(case):
    M, shape, dtype, g = case
    s = s_of(M, shape)
    X = torch.randn(shape, generator=g, dtype=dtype)
    d = M.distance(X)
    assert d.shape == shape[:-2]
    want = (torch.linalg.svdvals(X.double()) / s - 1).abs().amax(-1)
    assert torch.allclose(d.double(), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(96, 32), (32, 96), (300, 200), (2, 40, 24)]),
       st.sampled_from([1e-5, 1e-6, 3e-5]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**31 - 1))
def test_stiefel_distance_near_the_manifold_is_exact_for_the_stored_weight(shape, d, dtype, seed):
    """Near the manifold, where the distance meets tolerances of 1e-5, it is the stored weight's
    own (fp64 singular values of the fp32/bf16 tensor) to ~1e-12; fp32 singular values were off
    by up to 3e-6 (96×32 at d = 1e-5 read 7.6e-6)."""
    g = torch.Generator().manual_seed(seed)
    U = Stiefel().random(shape, generator=g, dtype=torch.float64)
    X = (U * (1 + d * torch.rand(shape[-1], generator=g, dtype=torch.float64)) if shape[-2] >= shape[-1]
         else (1 + d * torch.rand(shape[-2], 1, generator=g, dtype=torch.float64)) * U).to(dtype)
    want = (torch.as_tensor(svdvals64(X)) - 1).abs().amax(-1)  # the oracle: an fp64 SVD of the stored tensor
    got = Stiefel().distance(X)
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-11)


@given(stiefel_cases())
def test_stiefel_tangent_idempotent_and_tangent(case):
    M, shape, dtype, g = case
    s = s_of(M, shape)
    W = M.random(shape, generator=g, dtype=dtype)
    V = torch.randn(shape, generator=g, dtype=dtype)
    T = M.tangent(W, V)
    assert T.shape == shape and T.dtype == dtype
    scale_v = torch.linalg.matrix_norm(V.double()).max().item()
    tol = 10 * tol_for(dtype) * max(1.0, scale_v)
    assert tangent_dev(W, T, s) <= tol
    assert (M.tangent(W, T).double() - T.double()).abs().max().item() <= tol
    assert M.tangent_residual(W, T).max().item() <= 10 * tol_for(dtype) * 10
    # orthogonal projection: V − P(V) is normal, i.e. orthogonal to every tangent vector
    T2 = M.tangent(W, torch.randn(shape, generator=g, dtype=dtype))
    inner = ((V - T).double() * T2.double()).sum((-2, -1)).abs().max().item()
    assert inner <= tol * max(1.0, torch.linalg.matrix_norm(T2.double()).max().item())


@pytest.mark.parametrize("method", ["polar", "qr", "closed_form"])
@given(case=stiefel_cases(), eta=st.floats(1e-4, 2.0))
def test_stiefel_retractions_land_on_manifold_for_partial_isometry_steps(method, case, eta):
    """V = −η s·A, A tangent with AᵀA a projector (a partial isometry): all three retractions
    land on the manifold; the closed form equals the exact polar retraction."""
    M, shape, dtype, g = case
    s = s_of(M, shape)
    W = M.random(shape, generator=g, dtype=dtype)
    Wt = tall(W.double()) / s
    m, n = Wt.shape[-2:]
    # a tangent partial isometry: W·msign(K) with K skew, plus a W⊥ block when m > n
    K = torch.randn(*shape[:-2], n, n, generator=g, dtype=torch.float64)
    K = K - K.mT
    if m > n:
        Q = torch.linalg.qr(Wt, mode="complete")[0][..., n:]  # orthonormal basis of W⊥
        C = torch.randn(*shape[:-2], m - n, n, generator=g, dtype=torch.float64)
        A = Q @ polar_svd(C, rtol=1e-8)  # WᵀA = 0: tangent; every nonzero singular value 1
    else:
        A = Wt @ polar_svd(K, rtol=1e-8)
    V = -eta * s * A
    V = (V.mT if shape[-2] < shape[-1] else V).to(dtype)
    R = M.retract(W, V, method=method)
    assert R.shape == shape and R.dtype == dtype
    assert gram_dev(R, s) <= 100 * tol_for(dtype)
    if method == "closed_form":
        exact = M.retract(W.double(), V.double(), method="polar")
        assert (R.double() - exact).abs().max().item() <= 100 * tol_for(dtype)


@pytest.mark.parametrize("method", ["polar", "qr"])
@given(case=stiefel_cases(), eta=st.floats(1e-4, 3.0))
def test_stiefel_polar_qr_land_on_manifold_for_any_step(method, case, eta):
    M, shape, dtype, g = case
    s = s_of(M, shape)
    W = M.random(shape, generator=g, dtype=dtype)
    V = eta * s * torch.randn(shape, generator=g, dtype=dtype) / math.sqrt(max(shape[-2:]))
    R = M.retract(W, V, method=method)
    assert gram_dev(R, s) <= 100 * tol_for(dtype)
    X = tall((W + V).double())
    if method == "polar":
        assert (R.double() - s * polar_svd(W + V)).abs().max().item() <= 1e3 * tol_for(dtype)
    else:
        # Q with positive diag(R): Qᵀ(W+V) is upper triangular with a positive diagonal
        Q = tall(R.double()) / s
        Rm = Q.mT @ X
        assert torch.tril(Rm, -1).abs().max().item() <= 1e3 * tol_for(dtype) * max(1.0, X.abs().max().item())
        assert (torch.diagonal(Rm, dim1=-2, dim2=-1) > 0).all()


@given(case=stiefel_cases(), eta=st.floats(1e-3, 1.0))
def test_stiefel_closed_form_drift_matches_its_formula(case, eta):
    """For a tangent V that is not a partial isometry the closed form is inexact; the error in
    the singular values is predicted exactly by the eigenvalues μ of M = VᵀV/s²:
    σ/s = |1 − cμ|·√(1+μ), c = (1 − 1/√(1+η²))/η², η² = ‖M‖_F²/tr M."""
    M_, shape, dtype, g = case
    if dtype != torch.float64:
        return
    s = s_of(M_, shape)
    W = M_.random(shape, generator=g, dtype=dtype)
    V = M_.tangent(W, eta * s * torch.randn(shape, generator=g, dtype=dtype) / math.sqrt(max(shape[-2:])))
    R = M_.retract(W, V, method="closed_form")
    Vt = tall(V) / s
    mu = torch.linalg.eigvalsh(Vt.mT @ Vt).clamp(min=0)
    eta2 = (mu * mu).sum(-1, keepdim=True) / mu.sum(-1, keepdim=True).clamp(min=1e-300)
    c = torch.where(eta2 > 0, (1 - torch.rsqrt(1 + eta2)) / eta2.clamp(min=1e-300), torch.zeros_like(eta2))
    predicted = ((1 - c * mu).abs() * torch.sqrt(1 + mu) - 1).abs().amax(-1)
    got = (torch.linalg.svdvals(R) / s - 1).abs().amax(-1)
    assert torch.allclose(got, predicted, atol=1e-10, rtol=1e-6)
    # and the distance is nonzero in general: the drift is real, not hidden
    # MATH.md's bound: ≈ (3/4)η⁴ max σ²(1−σ²) for exactly tangent V
    sig2 = mu / eta2.clamp(min=1e-300)
    bound = 0.75 * eta2**2 * (sig2 * (1 - sig2)).abs().amax(-1, keepdim=True)
    assert (got <= bound[..., 0] * 1.05 + 1e-12).all()



@given(case=stiefel_cases(), eta=st.sampled_from([0.1, 0.03, 0.01]))
def test_stiefel_closed_form_error_in_gram_matches_the_docstring(case, eta):
    """The module docstring's error of the closed form for an exactly tangent V: ‖UᵀU − I‖₂ ≈
    (3/4)η⁴·max_t |t(η̂²/η² − t)|, t = σ² (σ: singular values of V/(ηs), η = ‖V‖₂/s, η̂² the
    code's ‖M‖_F²/tr M). It stated (3/4)η⁴·max σ²(1−σ²), which holds only with η̂ = η and is
    1.6–1.8× too small on generic tangents (a probe). Leading order: within 2 % at η ≤ 0.1."""
    M_, shape, dtype, g = case
    if dtype != torch.float64:
        return
    s = s_of(M_, shape)
    W = M_.random(shape, generator=g, dtype=dtype)
    A = tall(M_.tangent(W, torch.randn(shape, generator=g, dtype=dtype)))
    A = A / torch.linalg.matrix_norm(A, 2).clamp(min=1e-300)[..., None, None]  # (1×1: A = 0)
    t = torch.linalg.svdvals(A) ** 2
    ratio = (t * t).sum(-1, keepdim=True) / t.sum(-1, keepdim=True).clamp(min=1e-300)  # η̂²/η²
    predicted = 0.75 * eta**4 * (t * (ratio - t)).abs().amax(-1)
    V = eta * s * A
    R = tall(M_.retract(W, V.mT if shape[-2] < shape[-1] else V, method="closed_form")) / s
    got = torch.linalg.matrix_norm(R.mT @ R - torch.eye(R.shape[-1], dtype=dtype), 2)
    # a partial isometry (n = 1, a 2×2 tangent) has no error but rounding
    assert torch.allclose(got, predicted, rtol=0.02, atol=1e-13)

def test_stiefel_rms_scale_uses_torch_shape():
    M = Stiefel("rms")
    g = torch.Generator().manual_seed(0)
    for shape in [(3072, 128), (128, 3072)]:
        W = M.random(shape, generator=g, dtype=torch.float64)
        sv = svdvals64(W)
        assert abs(sv.max() - math.sqrt(shape[0] / shape[1])) <= 1e-10
        assert abs(sv.min() - math.sqrt(shape[0] / shape[1])) <= 1e-10
        # RMS→RMS operator norm 1: ‖Wx‖_rms ≤ ‖x‖_rms with equality for tall W
        x = torch.randn(shape[1], generator=g, dtype=torch.float64)
        rms = lambda v: v.norm() / math.sqrt(v.numel())  # noqa: E731
        assert rms(W @ x) <= rms(x) * (1 + 1e-12)
    # tall: WᵀW = s²I; wide: WWᵀ = s²I
    Wt = M.random((12, 3), dtype=torch.float64)
    assert torch.allclose(Wt.T @ Wt, 4.0 * torch.eye(3, dtype=torch.float64), atol=1e-12)
    Ww = M.random((3, 12), dtype=torch.float64)
    assert torch.allclose(Ww @ Ww.T, 0.25 * torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_stiefel_project_rank_deficient_still_on_manifold():
    M = Stiefel()
    X = torch.zeros(6, 4, dtype=torch.float64)
    X[0, 0] = 1.0
    assert M.distance(M.project(X)).item() <= 1e-12
    assert M.distance(M.project(torch.zeros(5, 3))).item() <= 1e-6


def test_stiefel_bf16_policy():
    M = Stiefel()
    X = torch.randn(16, 8).bfloat16()
    P = M.project(X)
    assert P.dtype == torch.bfloat16
    assert M.distance(P).item() <= 1e-2  # on the manifold up to bf16 rounding


def test_stiefel_errors():
    with pytest.raises(ValueError):
        Stiefel(scale=-1.0)
    with pytest.raises(ValueError):
        Stiefel(scale=float("nan"))
    with pytest.raises(ValueError):
        Stiefel().project(torch.ones(4))
    with pytest.raises(ValueError, match="retraction"):
        Stiefel().retract(torch.eye(3), torch.zeros(3, 3), method="cayley-ish")
    with pytest.raises(ValueError):
        get_manifold("hyperbolic")
    assert get_manifold("stiefel", scale="rms") == Stiefel("rms")


# --- Sphere ------------------------------------------------------------------------------------

@st.composite
def sphere_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    radius = draw(st.sampled_from([1.0, 0.5, 3.0]))
    shape = draw(st.sampled_from([(7,), (5, 8), (2, 3, 4), (1, 1)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return Sphere(radius), shape, dtype, torch.Generator().manual_seed(seed)


@given(sphere_cases())
def test_sphere_project_tangent_retract_distance(case):
    S, shape, dtype, g = case
    r = S.radius
    tol = tol_for(dtype) * 10
    W = S.random(shape, generator=g, dtype=dtype)
    assert W.shape == shape and W.dtype == dtype
    assert (W.double().norm(dim=-1) / r - 1).abs().max().item() <= tol
    assert S.distance(W).max().item() <= tol
    X = torch.randn(shape, generator=g, dtype=dtype) + 0.1
    P = S.project(X)
    want = r * X.double() / X.double().norm(dim=-1, keepdim=True)
    assert (P.double() - want).abs().max().item() <= tol * r
    d = S.distance(X).double()
    assert torch.allclose(d, (X.double().norm(dim=-1) / r - 1).abs().amax(-1) if X.ndim > 1
                          else (X.double().norm() / r - 1).abs(), rtol=1e-5, atol=1e-6)
    V = torch.randn(shape, generator=g, dtype=dtype)
    T = S.tangent(W, V)
    assert ((W.double() * T.double()).sum(-1)).abs().max().item() <= tol * r * max(1, V.abs().max().item()) * 10
    assert (S.tangent(W, T).double() - T.double()).abs().max().item() <= tol * 10
    R = S.retract(W, 0.3 * T)
    assert (R.double().norm(dim=-1) / r - 1).abs().max().item() <= tol


def test_sphere_zero_row_refused_and_errors():
    with pytest.raises(ValueError, match="zero"):
        Sphere().project(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        Sphere(radius=0.0)
    with pytest.raises(ValueError):
        Sphere().retract(torch.ones(3), torch.zeros(3), method="qr")


# --- Euclidean ----------------------------------------------------------------------------------

def test_euclidean_is_trivial():
    E = Euclidean()
    W = torch.randn(4, 3)
    V = torch.randn(4, 3)
    P = E.project(W)
    assert torch.equal(P, W) and P is not W
    assert torch.equal(E.tangent(W, V), V)
    assert torch.equal(E.retract(W, V), W + V)
    assert E.distance(W).item() == 0.0
    assert E.random((2, 5)).shape == (2, 5)
    assert E == get_manifold("euclidean")


# --- Sphere at extreme scales; non-floating dtypes refused -------------------------------------

@settings(max_examples=60, deadline=None)
@given(exponent=st.integers(-44, 38), dtype=st.sampled_from([torch.float32, torch.float64]),
       radius=st.sampled_from([1.0, 0.5, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_property_sphere_normalisation_is_scale_invariant(exponent, dtype, radius, seed):
    """project(c·w) and retract(c·w, 0) are r·w/‖w‖ for any c that leaves c·w finite and nonzero:
    fp32 rows of 1e30 (‖w‖² overflows) and 1e-30 (‖w‖² underflows) included. Oracle: fp64 of w."""
    S = Sphere(radius)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    X = (w * 10.0**exponent).to(dtype)
    assume(bool((X != 0).any(dim=-1).all()))  # a row flushed to zero has no nearest point
    assert bool(torch.isfinite(X).all())
    want = radius * X.double() / X.double().norm(dim=-1, keepdim=True)  # rows as stored in dtype
    # subnormal fp32 rows keep only a few bits of w: compare against themselves, not against w
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for got in (S.project(X), S.retract(X, torch.zeros_like(X))):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max().item() <= tol * radius
        assert S.distance(got).max().item() <= tol
    # distance = max |‖x‖/r − 1| without squaring overflow/underflow; a tiny row is not a zero row
    d_want = (X.double().norm(dim=-1) / radius - 1).abs().max().item()
    for d in (S.distance(X), S.distance(X, skip_zero_rows=True)):
        if d_want > torch.finfo(dtype).max:
            assert d.item() == math.inf
        else:
            assert d.item() == pytest.approx(d_want, rel=tol)


def test_sphere_zero_row_still_refused_next_to_tiny_rows():
    X = torch.tensor([[1e-30, 2e-30], [0.0, 0.0]])
    with pytest.raises(ValueError, match="zero row"):
        Sphere().project(X)
    assert torch.allclose(Sphere().project(X[:1]), torch.tensor([[1.0, 2.0]]) / 5**0.5)


_INT = torch.ones(3, 3, dtype=torch.int64)
_F = torch.eye(3)


@pytest.mark.parametrize("call", [
    lambda: Stiefel().project(_INT), lambda: Stiefel().retract(_INT, _F), lambda: Stiefel().retract(_F, _INT),
    lambda: Stiefel().retract(_INT, _F, method="qr"), lambda: Stiefel().tangent(_INT, _F),
    lambda: Stiefel().tangent_residual(_F, _INT), lambda: Stiefel().distance(_INT), lambda: Stiefel().polish(_INT),
    lambda: Stiefel().gram_deviation(_INT), lambda: Stiefel().project(_INT.bool()),
    lambda: Stiefel().project(_INT.to(torch.complex64)),
    lambda: Sphere().project(_INT), lambda: Sphere().retract(_INT, _F), lambda: Sphere().tangent(_F, _INT),
    lambda: Sphere().tangent_residual(_INT, _F), lambda: Sphere().distance(_INT),
], ids=["st.project", "st.retract", "st.retract-V", "st.qr", "st.tangent", "st.tangent_residual",
        "st.distance", "st.polish", "st.gram_deviation", "st.bool", "st.complex", "sp.project", "sp.retract",
        "sp.tangent", "sp.tangent_residual", "sp.distance"])
def test_non_floating_dtypes_refused_naming_the_dtype(call):
    # Stiefel.project(int ones) used to return all zeros: the fp32 polar factor truncated to int
    with pytest.raises(TypeError, match="floating dtype, got torch"):
        call()


@pytest.mark.parametrize("M", [Stiefel(), Sphere(), Euclidean()])
def test_random_takes_a_shape_as_torch_randn_does(M):
    """``Stiefel().random(64, 32)`` raised "takes 2 positional arguments but 3 were given"."""
    a = M.random(6, 4, generator=torch.Generator().manual_seed(0))
    b = M.random((6, 4), generator=torch.Generator().manual_seed(0))
    c = M.random(torch.Size([6, 4]), generator=torch.Generator().manual_seed(0))
    d = M.random(shape=(6, 4), generator=torch.Generator().manual_seed(0))  # as before
    assert a.shape == (6, 4) and torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    with pytest.raises(TypeError, match=f"{type(M).__name__}.random: shape"):
        M.random(6, 4.5)


def test_stiefel_pairs_must_match_and_bad_weights_are_named():
    """tangent(W (8, 4), V (4, 8)) transposed V to fit; a 1-D W raised IndexError; mixed dtypes a
    raw matmul error; distance of a NaN weight a LinAlgError (a probe)."""
    st = Stiefel()
    W = st.random(8, 4, generator=torch.Generator().manual_seed(0))
    for fn in (st.tangent, st.retract, st.tangent_residual):
        with pytest.raises(ValueError, match="must have W's shape and dtype"):
            fn(W, torch.randn(4, 8))
        with pytest.raises(ValueError, match="must have W's shape and dtype"):
            fn(W, torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Stiefel needs a matrix"):
        st.distance(torch.randn(5))
    bad = W.clone()
    bad[0, 0] = float("nan")
    stack = torch.stack([W, bad])
    d = st.distance(stack)
    assert d[0].item() < 1e-5 and math.isnan(d[1].item())
