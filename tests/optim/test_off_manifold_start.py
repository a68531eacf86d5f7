"""project_on_init=False on weights far from the manifold (pretrained-like): steps stay finite
and the first step lands the weight on the manifold."""
import warnings

import torch
from torch import nn

from modman import ManifoldMuon
from modman.manifolds import Stiefel


def test_far_off_manifold_weights_step_onto_it_without_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # singular values far above √(5/3), where the polish diverges
    before = Stiefel().distance(model[0].weight).item()
    assert before > 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(model.modules(), lr=0.05, project_on_init=False, budget="uniform")
    x, y = torch.randn(64, 16), torch.randint(0, 8, (64,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for p in model.parameters():
            assert torch.isfinite(p).all()
    for layer in (model[0], model[2]):
        assert Stiefel().distance(layer.weight).item() <= 1e-5
