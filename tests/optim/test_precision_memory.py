"""bf16 parameters, and the temporary memory of a step on a very tall weight (an LM head)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from modman.manifolds import Sphere, Stiefel
from modman.optim import ManifoldMuon

from ._helpers import FAMILY, Problem, make_opt


@pytest.mark.parametrize("kind", FAMILY)
def test_bf16_parameters_step_with_fp32_momentum(kind):
    prob = Problem(kind, dtype=torch.bfloat16)
    opt = make_opt(kind, prob.params)
    losses = prob.train(opt, 20)
    assert losses[-1] < 0.75 * losses[0]
    assert prob.W.dtype == torch.bfloat16 and torch.isfinite(prob.W.float()).all()
    assert opt.state[prob.W]["momentum"].dtype == torch.float32
    if kind == "manifold_muon":
        assert opt.state[prob.W]["dual"].dtype == torch.float32
        # on the manifold to bf16 rounding (unit roundoff 2⁻⁸ ≈ 3.9e-3)
        assert float(Stiefel().distance(prob.W.detach())) <= 8e-3
    if kind == "hyperspherical":
        assert float(Sphere().distance(prob.W.detach())) <= 8e-3


def _peak_temporary_bytes(fn) -> int:
    """Peak of (allocated − freed) bytes during fn, from the CPU allocator's events.

    Method: torch.profiler with profile_memory=True records every CPU allocation and free
    ("[memory]" events with signed byte counts); the running sum in time order is the memory
    held by tensors created during fn, and its maximum is the temporary peak. Tensors that
    outlive fn (e.g. new state) count too, so the caller steps once before measuring.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation: the measurement would be vacuous"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_very_tall_weight_steps_in_order_mn_temporary_memory():
    """32768×64 fp32 (8 MiB): an m×m temporary would be 4 GiB; the step must stay O(mn).

    Measured at the time of writing: ≈15·mn·4 bytes (fp64 certificate copies, msign iterates);
    the bound 32·mn·4 bytes leaves room for solver changes while excluding anything O(m²) or O(m²n)."""
    m, n = 32768, 64
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.linalg.qr(torch.randn(m, n, generator=g))[0])  # on the manifold already
    opt = ManifoldMuon([("lm_head.weight", W)], lr=0.01, solver="projected")
    W.grad = torch.randn(m, n, generator=g)
    opt.step()  # creates the persistent state (momentum m×n, dual n×n)
    mn_bytes = m * n * 4
    peak = _peak_temporary_bytes(opt.step)
    assert peak >= mn_bytes, "a step must at least hold one m×n temporary: the accounting is broken"
    assert peak <= 32 * mn_bytes, f"peak temporary {peak / mn_bytes:.1f}·mn·4 bytes"
    assert float(Stiefel().gram_deviation(W.detach())) <= 2e-5
