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
