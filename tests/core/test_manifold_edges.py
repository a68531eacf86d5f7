"""Stiefel, Sphere and Euclidean at the edges: NaN/Inf input, tensors without entries, bf16/fp16
input, mismatched shapes and unknown arguments (a probe of papercuts).

Convention under test for non-finite input: what factors a matrix (Stiefel.project, the "polar"
and "qr" retractions) refuses it with a ValueError naming the method and the argument; row-wise
arithmetic (Sphere) gives a NaN row and leaves the other rows alone; distances are NaN."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modman.manifolds import Euclidean, Sphere, Stiefel

STIEFELS = [Stiefel(), Stiefel("rms"), Stiefel(2.0)]


@st.composite
def bad_matrices(draw):
    """(manifold, W with one NaN or ±Inf entry, a finite W of the same shape)."""
    M = draw(st.sampled_from(STIEFELS))
    shape = draw(st.sampled_from([(6, 4), (4, 6), (5, 5), (2, 6, 3)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    good = torch.randn(shape, generator=g, dtype=draw(st.sampled_from([torch.float32, torch.float64])))
    bad = good.clone()
    bad.view(-1)[draw(st.integers(0, good.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return M, bad, good


@given(bad_matrices())
def test_stiefel_factorisations_refuse_non_finite_input_naming_method_and_argument(case):
    # before: torch's _LinAlgError about linalg.svd (for Inf: "ill-conditioned"), a RuntimeError
    M, bad, good = case
    with pytest.raises(ValueError, match=r"^Stiefel\.project: W contains NaN or Inf$"):
        M.project(bad)
    for method in ("polar", "qr"):
        with pytest.raises(ValueError, match=r"^Stiefel\.retract: W contains NaN or Inf$"):
            M.retract(bad, torch.zeros_like(bad), method=method)
        with pytest.raises(ValueError, match=r"^Stiefel\.retract: V contains NaN or Inf$"):
            M.retract(M.project(good), bad, method=method)
    # arithmetic carries it through, and the distance says so
    assert not bool(torch.isfinite(M.retract(M.project(good), bad, method="closed_form")).all())
    assert not bool(torch.isfinite(M.tangent(M.project(good), bad)).all())
    assert torch.isnan(M.distance(bad)).any()


@given(shape=st.sampled_from([(5, 3), (2, 4, 3), (3,)]), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       seed=st.integers(0, 2**31 - 1))
def test_sphere_non_finite_row_is_nan_alone_and_its_distance_nan(shape, value, seed):
    """A row with a NaN or Inf projects and retracts to a NaN row and every other row as if alone
    (what the hyperspherical step relies on); its distance is NaN, as Stiefel's (an Inf gave inf)."""
    S = Sphere(2.0)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g, dtype=torch.float64) + 0.1
    rows = W.reshape(-1, shape[-1])
    i = int(torch.randint(rows.shape[0], (1,), generator=g))
    bad = rows.clone()
    bad[i, int(torch.randint(shape[-1], (1,), generator=g))] = value
    others = torch.arange(rows.shape[0]) != i
    for out in (S.project(bad), S.retract(bad, torch.zeros_like(bad))):
        assert bool(torch.isnan(out[i]).all())
        want = 2.0 * rows[others] / rows[others].norm(dim=-1, keepdim=True)
        assert torch.allclose(out[others], want, rtol=1e-12, atol=1e-12)
    assert math.isnan(float(S.distance(bad)))
    assert math.isnan(float(S.distance(bad, skip_zero_rows=True)))


EMPTY = [(0, 4), (4, 0), (0, 0), (2, 0, 3), (0, 3, 4)]


@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("M", STIEFELS, ids=repr)
def test_stiefel_without_entries_maps_empty_to_empty_at_distance_zero(M, shape):
    # before: distance IndexError ((0, 4)) or TypeError ((0, 0): gram64 of no rows is None),
    # Stiefel("rms") ZeroDivisionError (√(m/0)) in every method
    W = torch.zeros(shape)
    for out in (M.project(W), M.tangent(W, W), M.polish(W),
                *(M.retract(W, W, method=m) for m in ("polar", "qr", "closed_form"))):
        assert out.shape == shape and out.dtype == W.dtype
    d = M.distance(W)
    assert d.shape == shape[:-2] and bool((d == 0).all())
    assert M.distance(W.double()).dtype == torch.float64


@pytest.mark.parametrize("shape", EMPTY + [(0,)])
def test_sphere_without_entries_maps_empty_to_empty_at_distance_zero(shape):
    # before: project((0, 0)) and distance of any of these raised IndexError (a max over no entries)
    S = Sphere()
    W = torch.zeros(shape)
    for out in (S.project(W), S.tangent(W, W), S.retract(W, W)):
        assert out.shape == shape
    d = S.distance(W)
    assert d.shape == shape[:-2] and bool((d == 0).all())


@st.composite
def low_precision_points(draw):
    M = draw(st.sampled_from(STIEFELS))
    shape = draw(st.sampled_from([(64, 32), (32, 64), (16, 16), (3, 24, 8)]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    W = M.random(shape, generator=g, dtype=torch.float64)
    near = W + 1e-2 * M.scale_for(shape) * torch.randn(shape, generator=g, dtype=torch.float64)
    return M, W.to(dtype), near.to(dtype), torch.randn(shape, generator=g).to(dtype)


def close_to_rounded(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """x is ref rounded to x's dtype, up to fp32 arithmetic: within half an ulp of x's dtype plus
    1e-5·max|ref|. Computed in bf16 itself, the errors were ~eps_bf16·max|ref| (4e-3)."""
    ref = ref.double()
    bound = torch.finfo(x.dtype).eps / 2 * ref.abs() + 1e-5 * ref.abs().max()
    return bool(((x.double() - ref).abs() <= bound).all())


@given(low_precision_points())
def test_stiefel_tangent_polish_gram_deviation_compute_low_precision_in_fp32(case):
    """For bf16/fp16 input the result is the fp64 one (on the same stored values) rounded to the
    input's dtype: computed in fp32, as project and distance are. Before, bf16 arithmetic left a
    tangent residual 1.7× and a polished weight's distance 3× those of fp32 (a probe)."""
    M, W, near, V = case
    T = M.tangent(W, V)
    assert T.dtype == W.dtype and close_to_rounded(T, M.tangent(W.double(), V.double()))
    P = M.polish(near)
    assert P.dtype == W.dtype and close_to_rounded(P, M.polish(near.double()))
    g = M.gram_deviation(near)  # a monitor's number, in fp32 as distance's
    assert g.dtype == torch.float32 and close_to_rounded(g.to(W.dtype), M.gram_deviation(near.double()))


def test_sphere_refuses_a_v_of_another_shape():
    # before: V (3,) or (1, 3) at W (4, 3) was broadcast, the same vector for every row
    S = Sphere()
    W = S.random(4, 3, generator=torch.Generator().manual_seed(0))
    for V in (torch.randn(3), torch.randn(1, 3), torch.randn(4, 3, 1)):
        for name, fn in (("tangent", S.tangent), ("retract", S.retract), ("tangent_residual", S.tangent_residual)):
            with pytest.raises(ValueError, match=rf"Sphere\.{name}: [VA] must have W's shape \(4, 3\)"):
                fn(W, V)


def test_unknown_retraction_methods_are_refused_listing_the_accepted_ones():
    # before: Euclidean took any method; Sphere's message said only 'normalize' though it takes 'polar'
    with pytest.raises(ValueError, match=r"Euclidean\.retract: unknown method 'bogus'.*'add'"):
        Euclidean().retract(torch.zeros(2), torch.zeros(2), method="bogus")
    assert torch.equal(Euclidean().retract(torch.ones(2), torch.ones(2), method="add"), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match=r"Sphere\.retract: unknown method 'qr'; choose 'normalize' or 'polar'"):
        Sphere().retract(torch.ones(3), torch.zeros(3), method="qr")
    W = Sphere().random(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sphere().retract(W, 0.1 * W, method="polar"), Sphere().retract(W, 0.1 * W))


def test_euclidean_random_without_a_shape_says_so():
    # before: torch.randn's overload list (a TypeError naming no modman method)
    with pytest.raises(TypeError, match=r"Euclidean\.random: give a shape"):
        Euclidean().random()
    assert Euclidean().random(()).shape == () and Euclidean().random(2, 3).shape == (2, 3)


# --- tangent_residual is scale-free -------------------------------------------------------------

def _residual64(kind: str, U: torch.Tensor, A: torch.Tensor) -> float:
    """The residual from its formula in fp64 at unit scale (U = W/s, a tall U for Stiefel, and
    A/max|A|), where nothing over- or underflows: the oracle for the pair at any scale."""
    A = A / A.abs().max()
    H = U.mT @ A
    num = (U * A).sum(-1).norm() if kind == "sphere" else (H + H.mT).norm()
    return float(num / A.norm())


@given(kind=st.sampled_from(["sphere", "stiefel"]), w_exp=st.integers(-30, 30), a_exp=st.integers(-30, 30),
       tangent=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_tangent_residual_is_scale_free_at_extreme_scales(kind, w_exp, a_exp, tangent, seed):
    """‖⟨w, a⟩/r‖/‖A‖ (and ‖UᵀA + AᵀU‖/‖A‖) depend on neither the radius / scale nor the size of
    A, so an fp32 point at radius 1e±30 with a direction of 1e±30 has the residual of the same
    pair at unit scale. Before, the unscaled products over- or underflowed: Sphere(1e20) gave NaN
    for an exact tangent and for a radial A, Sphere(1e-25) 0 for a radial A, Stiefel(scale=1e20)
    0 for a tangent and NaN for a non-tangent A (a probe)."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, 64) if kind == "sphere" else (16, 8)
    unit = Sphere() if kind == "sphere" else Stiefel()
    W1 = unit.random(shape, generator=g, dtype=torch.float64)
    A1 = torch.randn(shape, generator=g, dtype=torch.float64)
    if tangent:
        A1 = unit.tangent(W1, A1)
    elif kind == "sphere":
        A1 = W1 + 0.1 * A1  # nearly radial: far from tangent
    c = 10.0 ** w_exp
    M = Sphere(c) if kind == "sphere" else Stiefel(c)
    W, A = (c * W1).float(), (10.0 ** a_exp * A1).float()
    got = float(M.tangent_residual(W, A))
    want = _residual64(kind, W.double() / c, A.double())
    assert math.isfinite(got)
    assert abs(got - want) <= 1e-5 * max(1.0, want)
    if not tangent:
        assert got > 0.5  # a residual of order 1, not a false 0


def test_tangent_residual_zero_direction_is_zero_and_nan_direction_nan():
    for M, W in ((Sphere(), Sphere().random(3, 4)), (Stiefel(), Stiefel().random(6, 4))):
        assert float(M.tangent_residual(W, torch.zeros_like(W))) == 0.0
        bad = torch.full_like(W, math.nan)  # before: 0, as for A = 0 (NaN > 0 is False)
        assert math.isnan(float(M.tangent_residual(W, bad)))
        empty = torch.zeros(2, 0, 3)  # (A has no largest entry to scale by)
        assert torch.equal(M.tangent_residual(empty, empty), torch.zeros(2))


# --- the closed-form retraction and tangent_residual compute bf16/fp16 in fp32 ------------------

@given(low_precision_points())
def test_stiefel_closed_form_and_tangent_residual_compute_low_precision_in_fp32(case):
    """The closed-form retraction of bf16/fp16 W, V is the fp64 one of the same stored values
    rounded to their dtype, as the other methods' (the module docstring's promise); it ran in bf16,
    2.9e-3 off the manifold where fp32 then rounding is 1.7e-3 (a probe). closed_form_factor
    returns its n×n factor in fp32; tangent_residual, a monitor's number as distance, in fp32."""
    M, W, near, V = case
    step = M.tangent(W, V)
    step = (0.05 * M.scale_for(W.shape) * step.double() / torch.linalg.matrix_norm(step.double(), 2)[..., None, None]
            ).to(W.dtype)
    R = M.retract(W, step, method="closed_form")
    assert R.dtype == W.dtype and close_to_rounded(R, M.retract(W.double(), step.double(), method="closed_form"))
    F = M.closed_form_factor(W.shape, step)
    assert F.dtype == torch.float32
    assert torch.allclose(F.double(), M.closed_form_factor(W.shape, step.double()), rtol=1e-4, atol=1e-7)
    X = M.apply_closed_form(W + step, F)
    assert X.dtype == W.dtype and close_to_rounded(X, M.apply_closed_form((W + step).double(), F.double()))
    res = M.tangent_residual(W, step)
    assert res.dtype == torch.float32
    want = M.tangent_residual(W.double(), step.double())
    assert torch.allclose(res.double(), want, rtol=1e-4, atol=1e-6)


def test_sphere_tangent_residual_of_low_precision_is_computed_in_fp32():
    S = Sphere(300.0)
    g = torch.Generator().manual_seed(0)
    W = S.random(4, 64, generator=g, dtype=torch.float16)
    A = torch.randn(4, 64, generator=g).half()
    res = S.tangent_residual(W, A)
    assert res.dtype == torch.float32
    assert torch.allclose(res.double(), S.tangent_residual(W.double(), A.double()), rtol=1e-5)


# --- bad arguments are refused by name (a probe) -------------------------------------------------

@pytest.mark.parametrize("M", [Stiefel(), Sphere()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_random_refuses_a_non_floating_dtype(M, dtype):
    # before: Stiefel().random(4, 2, dtype=torch.int64) was all zeros (the point truncated)
    with pytest.raises(TypeError, match=rf"{type(M).__name__}\.random: dtype must be a real floating dtype, got torch"):
        M.random(4, 2, dtype=dtype)


@pytest.mark.parametrize("M", [Stiefel(), Sphere(), Euclidean()], ids=repr)
def test_random_refuses_a_shape_given_twice(M):
    # before: random(4, 2, shape=(3, 3)) returned a 3×3 point, the 4, 2 ignored
    with pytest.raises(TypeError, match=rf"{type(M).__name__}\.random: give the shape once"):
        M.random(4, 2, shape=(3, 3))


@pytest.mark.parametrize("M, dtype", [(Sphere(1e20), torch.float16), (Sphere(1e40), torch.float32),
                                      (Sphere(1e-10), torch.float16), (Stiefel(1e5), torch.float16),
                                      (Stiefel(1e39), torch.float32)], ids=repr)
def test_random_refuses_a_scale_its_dtype_cannot_hold(M, dtype):
    # before: Sphere(1e20).random(2, 3, dtype=torch.float16) was all ±inf
    what = "radius" if isinstance(M, Sphere) else "scale"
    with pytest.raises(ValueError, match=rf"{type(M).__name__}\.random: {what} .* {dtype}"):
        M.random(2, 3, dtype=dtype)
    M.random(2, 3, dtype=torch.float64)  # which holds it


@pytest.mark.parametrize("call, name", [
    pytest.param(lambda: Stiefel().tangent(torch.eye(3), 1.0), "V", id="st.tangent"),
    pytest.param(lambda: Stiefel().project([[1.0, 0.0], [0.0, 1.0]]), "W", id="st.project"),
    pytest.param(lambda: Stiefel().retract(torch.eye(3), None), "V", id="st.retract"),
    pytest.param(lambda: Stiefel().polish([[1.0]]), "W", id="st.polish"),
    pytest.param(lambda: Stiefel().distance(2.0), "W", id="st.distance"),
    pytest.param(lambda: Stiefel().tangent_residual([[1.0]], torch.eye(1)), "W", id="st.tangent_residual"),
    pytest.param(lambda: Stiefel().gram_deviation(1.0), "W", id="st.gram_deviation"),
    pytest.param(lambda: Stiefel().closed_form_factor((3, 3), 1.0), "V", id="st.closed_form_factor"),
    pytest.param(lambda: Stiefel().apply_closed_form(1.0, torch.eye(3)), "X", id="st.apply_closed_form-X"),
    pytest.param(lambda: Stiefel().apply_closed_form(torch.eye(3), None), "factor", id="st.apply_closed_form-F"),
    pytest.param(lambda: Sphere().project([1.0, 0.0]), "W", id="sp.project"),
    pytest.param(lambda: Sphere().tangent(torch.ones(3), 1.0), "V", id="sp.tangent"),
    pytest.param(lambda: Sphere().retract([1.0], torch.ones(1)), "W", id="sp.retract"),
    pytest.param(lambda: Sphere().distance(1.0), "W", id="sp.distance"),
    pytest.param(lambda: Euclidean().retract(torch.ones(3), 1.0), "V", id="eu.retract"),
])
def test_non_tensor_arguments_are_refused_naming_them(call, name):
    # before: AttributeError ('float' object has no attribute 'is_floating_point')
    with pytest.raises(TypeError, match=rf"\.\w+: {name} must be a torch\.Tensor, got "):
        call()


def test_stiefel_polish_and_gram_deviation_refuse_bad_counts_and_vectors():
    st_ = Stiefel()
    W = st_.random(8, 4, generator=torch.Generator().manual_seed(0))
    # before: steps=-1 did nothing, steps=True polished once, a 1-D W an IndexError
    for steps, error in ((-1, ValueError), (True, TypeError), (1.5, TypeError), (None, TypeError)):
        with pytest.raises(error, match=r"Stiefel\.polish: steps must be an int ≥ 0, got"):
            st_.polish(W, steps=steps)
    assert torch.equal(st_.polish(W, steps=0), W)
    with pytest.raises(ValueError, match="Stiefel needs a matrix"):
        st_.polish(torch.ones(4))
    # before: iters=-3 returned ‖E v‖ of the unnormalised start vector
    for iters, error in ((-3, ValueError), (0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match=r"Stiefel\.gram_deviation: iters must be an int ≥ 1, got"):
            st_.gram_deviation(W, iters=iters)
    with pytest.raises(ValueError, match="Stiefel needs a matrix"):
        st_.gram_deviation(torch.ones(4))


def test_euclidean_refuses_a_v_of_another_shape():
    # before: V (3,) at W (4, 3) was broadcast, one vector added to every row, where Sphere and
    # Stiefel refuse it
    E = Euclidean()
    for name, fn in (("retract", E.retract), ("tangent", E.tangent), ("tangent_residual", E.tangent_residual)):
        with pytest.raises(ValueError, match=rf"Euclidean\.{name}: [VA] must have W's shape \(4, 3\), got \(3,\)"):
            fn(torch.randn(4, 3), torch.randn(3))


def test_sphere_retract_to_zero_row_is_nan_not_an_error():
    """retract(w, −w) leaves no point to normalise: the row comes out NaN, as a NaN row does, and
    the other rows are unaffected. It is not refused as project's zero row is: the hyperspherical
    step retracts whole tables and keeps its zero (padding) rows as they were."""
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    V = torch.tensor([[-1.0, 0.0], [0.5, 0.0]])
    out = Sphere().retract(W, V)
    assert bool(torch.isnan(out[0]).all())
    assert torch.allclose(out[1], torch.tensor([0.5, 2.0]) / math.sqrt(4.25))
