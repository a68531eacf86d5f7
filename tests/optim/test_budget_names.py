"""ManifoldMuon's ``budget=`` dict or callable: every constrained weight gets its lr_scale, and a
name that matches nothing, names a fallback parameter, or is left out is refused by name.

Before (a probe of modman.modular): unknown names were ignored and every weight they missed
stepped lr × 1 without a word — a budget keyed by a compiled model's own named_parameters()
("_orig_mod.0.weight") set every scale to 1; a callable returning None raised "'NoneType' object
has no attribute 'items'"."""
import math
import warnings

import pytest
import torch
from torch import nn

from modman import ManifoldMuon
from modman.modular import ModularError, budget as modular_budget


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _build(budget, model=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weights moved onto the manifold
        return ManifoldMuon((model or _model()).modules(), lr=0.1, solver="projected", budget=budget)


def _scales(opt):
    return {g["param_names"][0]: g["lr_scale"] for g in opt.param_groups if g["algorithm"] != "adamw"}


def test_a_complete_dict_sets_every_scale():
    assert _scales(_build({"0.weight": 0.25, "2.weight": 0.0})) == {"0.weight": 0.25, "2.weight": 0.0}
    assert _scales(_build(lambda m: {"0.weight": 2, "2.weight": 0.5})) == {"0.weight": 2.0, "2.weight": 0.5}


@pytest.mark.parametrize("budget, match", [
    ({"layer0.weight": 0.5, "2.weight": 0.5}, r"does not constrain: \['layer0.weight'\]; its constrained weights "
                                              r"are \['0.weight', '2.weight'\]"),
    ({"_orig_mod.0.weight": 0.5, "_orig_mod.2.weight": 0.5}, "drop torch.compile's '_orig_mod.'"),
    ({"module.0.weight": 0.5, "module.2.weight": 0.5}, "DDP's 'module.'"),
    ({"0.weight": 0.5, "2.weight": 0.5, "0.bias": 7.0}, r"\['0.bias'\], which the AdamW fallback trains"),
    ({"0.weight": 0.5}, r"gives no lr_scale for \['2.weight'\]"),
    ({"0.weight": 0.5, "2.weight": -1.0}, r"budget\['2.weight'\] must be a finite number ≥ 0"),
    ({"0.weight": 0.5, "2.weight": math.nan}, r"budget\['2.weight'\] must be a finite number ≥ 0"),
    ({"0.weight": True, "2.weight": 1.0}, r"budget\['0.weight'\] must be a finite number ≥ 0"),
    (lambda m: {"0.weight": 1.0}, r"budget=<lambda>\(model\) gives no lr_scale for \['2.weight'\]"),
])
def test_wrong_names_and_values_are_refused_naming_them(budget, match):
    with pytest.raises(ValueError, match=match):
        _build(budget)


@pytest.mark.parametrize("returned", [None, [("0.weight", 1.0)], 0.5])
def test_a_callable_returning_no_mapping_is_a_type_error_naming_budget(returned):
    with pytest.raises(TypeError, match=rf"budget=<lambda>\(model\) returned {type(returned).__name__}, not a dict"):
        _build(lambda m: returned)


def test_a_compiled_models_budget_is_keyed_by_the_eager_names():
    """budget(compiled) names the eager model's parameters, which the optimizer uses too."""
    model = _model()
    compiled = torch.compile(model)
    scales = modular_budget(compiled)
    assert set(scales) == {"0.weight", "2.weight"}
    assert _scales(_build(scales, compiled)) == scales


class Custom(nn.Module):
    """A bare 2-D weight the optimizer constrains by roles=, and a Linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.out(torch.relu(x @ self.w.T))


def _forget_w(module, prefix, opts):
    from modman.modular import MatrixAtom

    return MatrixAtom("out.weight", module.out.weight, 1.0, opts.scale)


def test_a_modular_description_that_leaves_out_a_constrained_weight_is_refused_or_uniform():
    """"modular" refuses; "auto" warns and steps uniformly. Before: the weight left out stepped
    lr × 1 among weights at their modular share."""
    from modman.modular.declarations import declare

    torch.manual_seed(0)
    model = Custom()
    declare(Custom)(_forget_w)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ModularError, match=r"no lr_scale for the constrained weights \['w'\]"):
                ManifoldMuon(model.modules(), budget="modular", roles={"w": "stiefel"})
        with pytest.warns(UserWarning, match=r"no modular budget for this model .*\['w'\]"):
            opt = ManifoldMuon(model.modules(), budget="auto", roles={"w": "stiefel"}, project_on_init=False)
        assert _scales(opt) == {"w": 1.0, "out.weight": 1.0}
    finally:
        from modman.modular.declarations import DECLARATIONS

        DECLARATIONS.pop(f"{Custom.__module__}.{Custom.__qualname__}", None)
