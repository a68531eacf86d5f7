"""The functional core (API.md: modman.optim.functional.manifold_muon) on its own."""
from __future__ import annotations

import pytest
import torch

from modman.manifolds import Stiefel
from modman.optim import ManifoldMuon
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


def test_the_drift_stays_under_its_tolerance_measured_exactly_after_every_step():
    """The drift monitor (power iteration) runs low — up to 1.37× on 64×32 — so polishing only past
    the tolerance let the projected solver's steps at lr 0.1 reach a distance of 1.33e-5 against
    1e-5 (462 of 10⁴ steps, a claims audit measuring in fp64 after every step). The oracle here is
    an fp64 SVD of the stored weight after every step."""
    from modman.optim import functional as F

    g = torch.Generator().manual_seed(0)
    manifold = Stiefel()
    W = manifold.random((64, 32), generator=g)
    state = {"momentum": torch.zeros(64, 32)}
    worst = 0.0
    for _ in range(400):
        u = F.momentum_update(torch.randn(64, 32, generator=g), state["momentum"], 0.95, True)
        F.stiefel_step(W, u, state, lr=0.1, manifold=manifold, solver="projected", tol=None, max_iters=None,
                       drift_tol=2e-5, warm_keys=("dual",))
        worst = max(worst, float((torch.linalg.svdvals(W.double()) - 1).abs().max()))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_fallback_through_torchs_foreach_adamw_is_bitwise_the_loop(dtype, weight_decay):
    """fp32/fp64 fallback parameters step through torch's foreach AdamW, one call per group (a step
    of 1000 small tensors: 43 → 15 ms, a probe); foreach=False steps each with F.adamw_step. Both
    are AdamW's arithmetic: on CPU bit for bit the same, state included, and torch.optim.AdamW's
    (foreach=False) on the same tensors."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(dtype)

    hp = dict(lr=3e-3, weight_decay=weight_decay, eps=1e-3, betas=(0.8, 0.9))
    runs = {}
    for foreach in (True, False, "torch"):
        m = model()
        if foreach == "torch":
            fallback = [p for n, p in m.named_parameters() if not (n.endswith("weight") and p.ndim == 2)]
            opt = torch.optim.AdamW(fallback, foreach=False, **hp)
        else:
            opt = ManifoldMuon(m.modules(), foreach=foreach, fallback=hp)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
            opt.step()
        runs[foreach] = (m, opt)
    (a, opt_a), (b, opt_b), (c, _) = runs[True], runs[False], runs["torch"]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, v in opt_a.state[pa].items():
            assert torch.equal(v, opt_b.state[pb][k]), k
    for (name, x), y in zip(a.named_parameters(), c.parameters()):
        if not (name.endswith("weight") and x.ndim == 2):
            assert torch.equal(x, y), name


def test_what_the_foreach_fallback_leaves_to_the_loop(monkeypatch):
    """foreach=False, tensor betas (torch's foreach AdamW refused them, after the constrained
    weights had moved: a review) and a parameter listed twice go one at a time; the moments keep a
    channels_last parameter's strides."""
    import modman.optim.base as base

    calls = []
    real = base.adamw
    monkeypatch.setattr(base, "adamw", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))

    def step(**kw):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(2, 2, 1))
        m[1].bias.data = m[1].bias.data.clone()
        fallback = dict(kw.pop("fallback", {}))
        opt = ManifoldMuon(m.modules(), fallback=fallback, **kw)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        return opt

    step()
    assert calls == [2]  # the two biases, in one call
    step(foreach=False)
    step(fallback=dict(betas=(torch.tensor(0.9), torch.tensor(0.95))))
    assert calls == [2]
    b = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        twice = ManifoldMuon([{"params": [b, b], "algorithm": "adamw"}])
    b.grad = torch.ones(3)
    twice.step()
    assert calls == [2] and int(twice.state[b]["step"]) == 2  # stepped twice, as by torch's AdamW
    W = torch.nn.Parameter(torch.randn(1, 3, 4, 4).to(memory_format=torch.channels_last))
    opt = ManifoldMuon([{"params": [W], "algorithm": "adamw"}])
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["exp_avg"].stride() == W.stride()


def test_the_foreach_fallback_steps_in_its_groups_turn():
    """A constrained matrix that raises (a NaN weight) leaves the groups after it unstepped, as one
    at a time did: the foreach fallback runs in its group's turn, not before the loop."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = ManifoldMuon(m.modules())
    for g in opt.param_groups:
        if g["algorithm"] != "adamw":
            g["foreach"] = False  # the matrices one at a time, the fallback through foreach
    with torch.no_grad():
        m[1].weight[0, 0] = float("nan")
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    biases = [m[0].bias.detach().clone(), m[1].bias.detach().clone()]
    with pytest.raises(Exception, match="1.weight|NaN"):
        opt.step()
    assert torch.equal(m[0].bias, biases[0]) and torch.equal(m[1].bias, biases[1])
