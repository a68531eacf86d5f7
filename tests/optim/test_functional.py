"""The functional core (API.md: modman.optim.functional.manifold_muon) on its own."""
from __future__ import annotations

import torch

from modman.manifolds import Stiefel
from modman.optim.functional import manifold_muon


def test_functional_manifold_muon_steps_a_channels_last_conv_weight():
    g = torch.Generator().manual_seed(0)
    W = Stiefel().random((4, 12), generator=g).reshape(4, 3, 2, 2)
    W = W.contiguous(memory_format=torch.channels_last)  # flattening it needs a copy
    grad = torch.randn(4, 3, 2, 2, generator=g)
    before = W.clone()
    states = [{}]
    stats = manifold_muon([W], [grad], states, lr=0.1, solver="projected", flatten=True)
    assert not torch.equal(W, before), "the step must be written back into the parameter"
    assert float(Stiefel().distance(W.reshape(4, -1))) <= 1e-5
    assert states[0]["momentum"].shape == (4, 12) and states[0]["dual"].shape == (4, 4)
    assert set(stats[0]) == {"tangent_residual", "duality_gap", "iterations", "msign_calls", "distance_to_manifold"}
    length = torch.linalg.matrix_norm(W.reshape(4, -1) - before.reshape(4, -1), 2)
    assert abs(float(length) - 0.1) <= 0.1 * 0.1  # step length lr, to second order
