"""modman.Muon with defaults is torch.optim.Muon bit for bit; the AdamW fallback is torch.optim.AdamW."""
from __future__ import annotations

import pytest
import torch

from modman.optim import HypersphericalDescent, ManifoldMuon, Muon

from ._helpers import assert_bitwise


def _pair(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs, g


@pytest.mark.parametrize("kw", [{}, {"nesterov": False}, {"adjust_lr_fn": "match_rms_adamw"},
                                {"lr": 0.02, "weight_decay": 0.01, "momentum": 0.9}])
def test_muon_defaults_match_torch_muon_bitwise(kw):
    shapes = [(8, 4), (4, 8), (6, 6), (33, 5)]  # tall, wide, square, odd
    ours, theirs, g = _pair(shapes)
    opt = Muon(ours, **kw)
    ref = torch.optim.Muon(theirs, **kw)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            assert_bitwise(p, q, f"parameter {i} {tuple(p.shape)}")
    for p, q in zip(ours, theirs):
        assert_bitwise(opt.state[p]["momentum"], ref.state[q]["momentum_buffer"], "momentum")


@pytest.mark.filterwarnings("ignore:.*moved param0")
@pytest.mark.parametrize("cls", [ManifoldMuon, Muon, HypersphericalDescent])
def test_fallback_group_matches_torch_adamw(cls):
    shapes = [(6,), (5,), (3, 1, 2)]  # 1-D and a bare 3-D given to the fallback explicitly
    ours, theirs, g = _pair(shapes, seed=1)
    hp = {"lr": 3e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05}
    W = torch.nn.Parameter(torch.randn(6, 4, generator=g))  # a constrained weight in the same optimizer
    kw = {"solver": "projected"} if cls is ManifoldMuon else {}
    opt = cls([{"params": [W]}, {"params": ours, "algorithm": "adamw"}], fallback=hp, **kw)
    ref = torch.optim.AdamW(theirs, foreach=False, **hp)
    for _ in range(6):
        W.grad = torch.randn(W.shape, generator=g)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        # the same operations in the same order as torch's single-tensor AdamW: equal to the bit
        # here; a tolerance of 1 ulp-scale would be the contract if torch reorders its arithmetic
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale", [1e6, 1e-9])
def test_muon_in_fp16_with_torch_arithmetic_is_scale_free(scale):
    """torch's arithmetic in fp16 (an option torch.optim.Muon does not have): the momentum was cast
    before its normalisation, so at 1e6 the weight became NaN and at 1e-9 it did not move (a probe);
    it is divided by max|u| first, as msign does (torch's bf16 is left alone: the parity above)."""
    g = torch.Generator().manual_seed(0)
    W0, G = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    steps = []
    for s in (1.0, scale):
        W = torch.nn.Parameter(W0.clone())
        opt = Muon([W], ns_dtype="float16", weight_decay=0.0)
        W.grad = G * s
        opt.step()
        steps.append(W.detach() - W0)
    assert torch.isfinite(steps[1]).all()
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-4)
