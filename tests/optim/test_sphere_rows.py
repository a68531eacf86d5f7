"""Rows on spheres (HypersphericalDescent, ManifoldMuon's embeddings): regressions from a probe.

Oracles: the float64 closed forms — the tangent projection u − ŵ(ŵᵀu) at ŵ = r·w/‖w‖, and the
angle a step of length lr turns a row of radius r by, atan(lr/r)."""
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modman import HypersphericalDescent, ManifoldMuon
from modman.manifolds import Sphere


@given(st.sampled_from([1e-30, 1e-23, 1e-3, 1.0, 300.0, 1e19, 1e25]), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_the_tangent_projection_at_any_radius_and_dtype(radius, seed, dtype):
    """Before: r² under- or overflowed (fp32 beyond r ≈ 1e∓19: a tangent of inf, NaN weights) and
    fp16 products overflowed at r = 300."""
    if dtype == torch.float16 and not 1e-3 <= radius <= 300:
        radius = 300.0  # fp16 holds no rows at those radii
    g = torch.Generator().manual_seed(seed)
    sphere = Sphere(radius)
    W = sphere.random((4, 6), generator=g, dtype=torch.float64)
    V = torch.randn(4, 6, generator=g, dtype=torch.float64) * radius
    unit = W / W.norm(dim=-1, keepdim=True)
    exact = V - unit * (unit * V).sum(-1, keepdim=True)
    got = sphere.tangent(W.to(dtype), V.to(dtype))
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    err = (got.double() - exact).norm() / V.norm()
    assert err.item() <= 64 * torch.finfo(dtype).eps


def test_a_row_off_its_sphere_steps_lr_from_its_nearest_point():
    """project_on_init=False: a row as loaded (norm 4, or 0.08) lands on its sphere and turns by
    atan(lr/r) from its nearest point. Before: the tangent formula at ‖w‖ ≠ r gave 0.1–0.9° for rows
    of norm 4 and 39–66° for rows of norm 0.08, instead of atan(0.1) = 5.71°."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 16)
    with torch.no_grad():
        emb.weight[:3] *= 4 / emb.weight[:3].norm(dim=-1, keepdim=True)
        emb.weight[3:] *= 0.08 / emb.weight[3:].norm(dim=-1, keepdim=True)
    before = emb.weight.detach().double().clone()
    opt = ManifoldMuon(emb.modules(), lr=0.1, project_on_init=False, budget="uniform")
    (emb(torch.arange(6)) * torch.randn(6, 16)).sum().backward()  # (not parallel to the rows)
    opt.step()
    after = emb.weight.detach().double()
    assert torch.allclose(after.norm(dim=-1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    cos = (before * after).sum(-1) / before.norm(dim=-1)
    turned = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
    assert torch.allclose(turned, torch.full((6,), math.degrees(math.atan(0.1)), dtype=torch.float64), atol=1e-3)


def test_rows_on_their_sphere_step_as_before_and_rows_without_gradient_stay_as_loaded():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(5, 8)
    with torch.no_grad():
        emb.weight[0] *= 3.0  # off its sphere, never looked up: as loaded
    loaded = emb.weight.detach().clone()
    opt = HypersphericalDescent([emb.weight], lr=0.05, project_on_init=False)
    with torch.no_grad():
        emb.weight[1:] /= emb.weight[1:].norm(dim=-1, keepdim=True)
    on_sphere = emb.weight.detach().clone()
    (emb(torch.tensor([1, 2])) * torch.randn(2, 8)).sum().backward()
    opt.step()
    assert torch.equal(emb.weight[0], loaded[0]) and torch.equal(emb.weight[3:], on_sphere[3:])
    assert not torch.equal(emb.weight[1:3], on_sphere[1:3])


def test_an_embedding_whose_max_norm_shrinks_the_rows_is_refused():
    """Before: accepted; every forward renormalised the rows to max_norm in place after each step
    put them at the radius, so the model never saw the sphere (steps of 8–11.5° instead of 5.7°).
    Judged against the radius of the group the weight lands in, for tied weights too, with the
    ℓp norm of norm_type (unit ℓ2 rows of width d reach ℓ1 norm √d)."""
    def seq(**kw):
        return torch.nn.Sequential(torch.nn.Embedding(10, 4, **kw))

    with pytest.raises(ValueError, match=r"0: Embedding\(max_norm=0.5, norm_type=2\) shrinks rows the optimizer "
                                         r"keeps on the sphere of radius 1"):
        ManifoldMuon(seq(max_norm=0.5).modules())
    with pytest.raises(ValueError, match=r"radius 3 \(their ℓ2 norms reach 3\)"):
        HypersphericalDescent([{"params": seq(max_norm=2.0).modules(), "radius": 3.0}])
    with pytest.raises(ValueError, match=r"norm_type=1\) .* reach 2\)"):
        ManifoldMuon(seq(max_norm=1.0, norm_type=1.0).modules())
    with pytest.raises(ValueError, match=r"norm_type=0\) .* reach inf\)"):  # (a ZeroDivisionError, a review)
        ManifoldMuon(seq(max_norm=1.0, norm_type=0.0).modules())

    class Tied(torch.nn.Module):  # the Linear first: its role (Stiefel under ManifoldMuon, a sphere here)
        def __init__(self):
            super().__init__()
            self.head, self.emb = torch.nn.Linear(4, 10, bias=False), torch.nn.Embedding(10, 4, max_norm=0.5)
            self.head.weight = self.emb.weight

    with pytest.raises(ValueError, match=r"emb: Embedding\(max_norm=0.5"):
        HypersphericalDescent(Tied().modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (weights moved onto the spheres)
        ManifoldMuon(seq(max_norm=1.0).modules())  # harmless: unit rows are never renormalised
        HypersphericalDescent([{"params": seq(max_norm=0.7).modules(), "radius": 0.5}])
        ManifoldMuon(seq(max_norm=0.5).modules(), roles={"0.weight": "fallback"})


def test_one_vector_on_a_sphere_off_it_steps_from_its_nearest_point():
    """A 1-D parameter on a sphere (project_on_init=False, norm 3): the review of the row-wise
    projection found it crashing (index_put of a (1, d) value into a vector)."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(6))
    with torch.no_grad():
        p.mul_(3 / p.norm())
    before = p.detach().double().clone()
    opt = HypersphericalDescent([{"params": [p], "manifold": "sphere"}], lr=0.1, project_on_init=False)
    (p * torch.randn(6)).sum().backward()
    opt.step()
    after = p.detach().double()
    assert abs(after.norm().item() - 1) < 1e-6
    turned = math.degrees(math.acos(min(1.0, (before @ after).item() / before.norm().item())))
    assert turned == pytest.approx(math.degrees(math.atan(0.1)), abs=1e-3)
