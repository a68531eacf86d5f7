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
    ({"layer0.weight": 0.5, "2.weight": 0.5}, r"'layer0.weight', which is no parameter of the model; the weights it "
                                              r"budgets are \['0.weight', '2.weight'\]"),
    ({"_orig_mod.module.0.weight": 0.5, "2.weight": 0.5}, "drop torch.compile's '_orig_mod.'"),
    ({"_orig_mod.0.weight": 0.5, "_orig_mod.2.weight": 0.5}, "drop torch.compile's '_orig_mod.'"),
    ({"module.0.weight": 0.5, "module.2.weight": 0.5}, "DDP's 'module.'"),
    ({"0.weight": 0.5, "2.weight": 0.5, "0.bias": 7.0}, r"'0.bias', which the AdamW fallback trains"),
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


def test_tied_frozen_and_moved_weights_in_a_budget():
    """A tied alias and a frozen weight are refused saying so; a weight roles= moved to the fallback
    is ignored, as budget="modular" ignores it (the README's callable recipe with roles=)."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(10, 6), nn.Linear(6, 6, bias=False)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.mid(self.emb(x)))

    with pytest.raises(ValueError, match=r"'head.weight', the same tensor as 'emb.weight' \(tied: name that\)"):
        _build({"emb.weight": 1.0, "mid.weight": 1.0, "head.weight": 0.5}, Tied())
    model = _model()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0.weight', which is frozen \(requires_grad=False"):
        _build({"0.weight": 0.5, "2.weight": 0.5}, model)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(model.modules(), budget=lambda m: modular_budget(m), roles={"2.weight": "fallback"})
    assert _scales(opt) == {"0.weight": pytest.approx(modular_budget(model)["0.weight"], rel=1e-12, abs=0)}


def test_zero_dimensional_tensor_scales_are_numbers():
    assert _scales(_build({"0.weight": torch.tensor(0.25), "2.weight": torch.tensor(1)})) == {
        "0.weight": 0.25, "2.weight": 1.0}


def test_auto_with_a_weight_of_mass_zero_and_a_spread_warns_and_steps_uniformly():
    """The spread among the weights that move, not against the held one's 0 (ZeroDivisionError
    before, a review): a declared description giving one weight mass 0."""
    from modman.modular import MatrixAtom, compose
    from modman.modular.declarations import DECLARATIONS, declare

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Linear(4, 4, bias=False) for _ in range(3))

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    @declare(Deep)
    def _describe(module, prefix, opts):
        return compose(MatrixAtom("a.weight", module.a.weight, 1.0, opts.scale),  # masses 1 : 5000 give a
                       MatrixAtom("b.weight", module.b.weight, 5000.0, opts.scale),  # spread of 5000
                       MatrixAtom("c.weight", module.c.weight, 0.0, opts.scale))

    try:
        torch.manual_seed(0)
        scales = modular_budget(Deep())
        positive = [v for v in scales.values() if v > 0]
        assert scales["c.weight"] == 0.0 and max(positive) > 1e3 * min(positive)
        with pytest.warns(UserWarning, match=r"would span .*×, from .* for 'a.weight' to .* for 'b.weight'"):
            opt = ManifoldMuon(Deep().modules(), project_on_init=False)
        assert set(_scales(opt).values()) == {1.0}
    finally:
        DECLARATIONS.pop(f"{Deep.__module__}.{Deep.__qualname__}", None)
