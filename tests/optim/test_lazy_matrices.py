"""A matrix (or an expert of a stack) whose gradient is exactly zero this step stays bitwise where it
is under ManifoldMuon, whatever its momentum: the step is normalised, so stale momentum would move
it a full lr every step (a probe: an MoE expert with no tokens drifted 1.65 in spectral norm in 40
steps at lr 0.05). Its momentum still decays, as torch's optimizers keep state."""
import warnings

import torch
from torch import nn

from modman import ManifoldMuon
from modman.optim import functional as F


class Experts(nn.Module):
    """A mixture's expert weights as one (E, d_out, d_in) parameter, as transformers 5 stores them."""

    def __init__(self, e=3, d_out=8, d_in=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(e, d_out, d_in) / d_in**0.5)

    def forward(self, x):  # x: (E, batch, d_in)
        return torch.einsum("eoi,ebi->ebo", self.weight, x)


def _optimizer(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the initial projection's report
        return ManifoldMuon(model.modules(), lr=0.05, budget="uniform")


def test_an_expert_without_gradient_stays_bitwise_while_the_others_move():
    torch.manual_seed(0)
    model = Experts()
    opt = _optimizer(model)
    x, target = torch.randn(3, 5, 6), torch.randn(3, 5, 8)
    for _ in range(3):
        opt.zero_grad()
        (model(x) * target).sum().backward()
        opt.step()
    momentum = opt.state[model.weight]["momentum"].clone()
    warm = {k: v.clone() for k, v in opt.state[model.weight].items() if k != "momentum"}
    before = model.weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        (model(x) * target).sum().backward()
        model.weight.grad[1] = 0  # expert 1 got no tokens
        opt.step()
    after = model.weight.detach()
    assert torch.equal(after[1], before[1])
    moved = [float(torch.linalg.matrix_norm(after[e] - before[e], ord=2)) for e in (0, 2)]
    assert min(moved) > 0.1, moved
    torch.testing.assert_close(opt.state[model.weight]["momentum"][1], momentum[1] * 0.95**5, rtol=1e-6, atol=0)
    # and keeps its warm start (solved alongside with G = 0, its dual was reset to 0)
    assert warm and all(torch.equal(opt.state[model.weight][k][1], v[1]) for k, v in warm.items() if v.ndim)
    sv = torch.linalg.svdvals(after.double())
    assert float((sv - 1).abs().max()) < 1e-5  # the moved experts stayed on the manifold


def test_a_matrix_without_gradient_stays_bitwise_and_costs_no_solve():
    """zero_grad(set_to_none=False) with a layer unused this step: the layer kept moving by lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 3, bias=False))
    opt = _optimizer(model)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        (model(torch.randn(4, 6)) * torch.randn(4, 3)).sum().backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    stats = opt.last_step_stats["0.weight"]
    assert stats["msign_calls"] == 0 and stats["iterations"] == 0


def test_the_functional_core_keeps_a_zero_gradient_matrix_too():
    torch.manual_seed(0)
    W = torch.linalg.qr(torch.randn(8, 5)).Q
    state = {"momentum": torch.randn(8, 5)}
    before = W.clone()
    F.manifold_muon([W], [torch.zeros(8, 5)], [state], lr=0.1)
    assert torch.equal(W, before)
