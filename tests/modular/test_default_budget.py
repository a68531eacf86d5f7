"""ManifoldMuon's default budget: modular when given modules, uniform for tensors."""
import warnings

import pytest
import torch
from torch import nn

from modman import ManifoldMuon
from modman.modular import budget


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 4, bias=False))


def _scales(opt):
    return {g["param_names"][0]: g["lr_scale"] for g in opt.param_groups if g["algorithm"] == "manifold_muon"}


@pytest.mark.parametrize("scale", [None, "rms"])
def test_modules_default_to_the_modular_budget(scale):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(model.modules(), scale=scale)
    want = budget(model, scale=scale)
    assert _scales(opt) == pytest.approx(want)
    assert len(set(round(v, 12) for v in want.values())) >= 1 and all(v < 1 for v in want.values())


def test_tensors_default_to_uniform():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(model.parameters())
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)


def test_untraceable_model_falls_back_to_uniform_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    model = Branchy()
    with pytest.warns(UserWarning, match="no modular budget"):
        opt = ManifoldMuon(model.modules())
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)
    with pytest.raises(Exception):
        ManifoldMuon(model.modules(), budget="modular")
