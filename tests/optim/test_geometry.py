"""Geometry of a step (API.md): weights stay on the Stiefel manifold and each step's length in
the weight's own norm is lr × lr_scale (spectral for scale=None, RMS→RMS for scale="rms")."""
from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from modman.manifolds import Stiefel
from modman.optim import ManifoldMuon

shapes = st.sampled_from([(6, 4), (4, 6), (5, 5), (12, 3), (2, 5, 3)])


def _opt(W, **kw):
    return ManifoldMuon([W], solver="projected", **kw)


@given(shape=shapes, seed=st.integers(0, 2**16), lr=st.sampled_from([0.02, 0.1, 0.3]),
       scale=st.sampled_from([None, "rms"]))
def test_fp32_weights_stay_on_the_manifold(shape, seed, lr, scale):
    g = torch.Generator().manual_seed(seed)
    man = Stiefel(scale)
    W = torch.nn.Parameter(man.random(shape, generator=g))
    opt = _opt(W, lr=lr, scale=scale)
    for _ in range(8):
        W.grad = torch.randn(shape, generator=g)
        opt.step()
    assert float(man.distance(W.detach()).max()) <= 1e-5  # exact singular values (SVD)


def _rms_to_rms(D):
    """‖D‖_{RMS→RMS} = √(d_in/d_out)·‖D‖₂ for a (d_out, d_in) matrix."""
    return math.sqrt(D.shape[-1] / D.shape[-2]) * torch.linalg.matrix_norm(D, 2)


@given(shape=shapes, seed=st.integers(0, 2**16), lr=st.sampled_from([1e-3, 1e-2]),
       lr_scale=st.sampled_from([0.5, 1.0]), scale=st.sampled_from([None, "rms"]))
def test_step_length_is_lr_times_lr_scale_in_the_weights_norm(shape, seed, lr, lr_scale, scale):
    """fp64 weights: the tangent step −ηsA has length η exactly; the chord after retraction differs
    at second order (for a partial isometry A, ‖ΔW‖ = 2 sin(arctan(η)/2) = η(1 − 3η²/8 + …); an
    inexact solver's A is not one, adding O(η²)), so the tolerance is rtol = η."""
    g = torch.Generator().manual_seed(seed)
    man = Stiefel(scale)
    W = torch.nn.Parameter(man.random(shape, generator=g, dtype=torch.float64))
    opt = ManifoldMuon([{"params": [W], "lr_scale": lr_scale}], lr=lr, scale=scale, solver="dual_ascent",
                       max_iters=3)
    eta = lr * lr_scale
    norm = (lambda D: torch.linalg.matrix_norm(D, 2)) if scale is None else _rms_to_rms
    for _ in range(3):
        W.grad = torch.randn(shape, generator=g, dtype=torch.float64)
        before = W.detach().clone()
        opt.step()
        length = norm(W.detach() - before)
        assert torch.allclose(length, torch.full_like(length, eta), rtol=eta, atol=0), (length, eta)
