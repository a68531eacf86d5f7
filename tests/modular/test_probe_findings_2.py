"""Regressions from a second report-only probe of modman.modular: subclasses of known layers that
override forward, layers reading different feature axes (flatten(2), multi-dim normalized_shape),
float rounding in the unmet-assumption check, LayerNorm's stated assumption, meta and non-finite
biases and gains, and the hand-built tree's and options' checks.

Oracles: torch.func.jvp on the torch model (helpers.aligned_search) and hand computations of the
composition rules (module.py's docstring)."""
import math
import warnings

import pytest
import torch
from torch import nn

from modman.modular import (MatrixAtom, ModularError, Parallel, activation, budget, budget_table, compose,
                            from_torch)
from modman.modular.budget import checked_budget, unmet_assumptions

from .helpers import aligned_search, put_on_manifold, unit_rms

TOL = 1 + 1e-6


# ------------------------------------------------------------------ subclasses overriding forward
class Residual(nn.Sequential):
    """A residual block written as an nn.Sequential: x + (its layers)(x)."""

    def forward(self, x):
        return x + super().forward(x)


class Scaled(nn.Sequential):
    def forward(self, x):
        return 10.0 * super().forward(x)


def _around(block):
    return nn.Sequential(nn.Linear(8, 16, bias=False), block, nn.Linear(16, 4, bias=False)).double()


def _inner():
    return nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False)


def test_a_sequential_subclass_with_its_own_forward_is_traced():
    """Residual(nn.Sequential) was described as its children's plain composition: the residual
    path was dropped (every lr_scale 0.25, a probe measured 1.2× past the weight bound). By hand,
    scale="rms", μ = 4: 0.weight's change passes the block (1 + 1) and 2.weight (1): c = 4·2 → 1/8;
    the inner weights have c = (4/2)·(2/1) = 4 → 1/4; 2.weight sees inputs of RMS ≤ 2: c·ρ = 4·2."""
    model = _around(Residual(*_inner()))
    assert budget(model, scale="rms") == pytest.approx(
        {"0.weight": 0.125, "1.0.weight": 0.25, "1.2.weight": 0.25, "2.weight": 0.125})


@pytest.mark.parametrize("block", [Residual, Scaled])
def test_sequential_subclasses_are_well_normed(block):
    model = _around(block(*_inner()))
    tree = from_torch(model, scale="rms")
    put_on_manifold(model, tree, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert aligned_search(model, tree, unit_rms((6, 8), torch.Generator().manual_seed(1))) <= TOL
    if block is Scaled:
        assert tree.sensitivity == pytest.approx(10.0)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 10.0


class ScaledEmbedding(nn.Embedding):
    """The pattern of transformers' *ScaledWordEmbedding: rows × √d in forward."""

    def __init__(self, n, d):
        super().__init__(n, d)
        self.embed_scale = d ** 0.5

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class ClampedReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 3


@pytest.mark.parametrize("layer, base", [(ScaledLinear(16, 16, bias=False), "Linear"),
                                         (ScaledEmbedding(16, 16), "Embedding"),
                                         (ClampedReLU(), "ReLU")])
def test_a_known_layer_subclass_with_its_own_forward_is_refused_by_name(layer, base):
    """ScaledLinear(nn.Linear) (output × 10) was budgeted as a plain Linear: a probe measured 9.3×
    past the weight bound; a scaled embedding 4× (√16)."""
    cls = type(layer).__name__
    model = nn.Sequential(nn.Linear(16, 16, bias=False), layer, nn.Linear(16, 4, bias=False))
    if isinstance(layer, nn.Embedding):
        model = nn.Sequential(layer, nn.Linear(16, 4, bias=False))
    where = "'0'" if isinstance(layer, nn.Embedding) else "'1'"
    with pytest.raises(ModularError) as info:
        from_torch(model)
    message = str(info.value)
    assert message.startswith(f"{where} ({cls}) is an nn.{base} with its own forward"), message
    assert f"custom={{{cls}: fn}}" in message and f"declare({cls})" in message, message
    # a custom description of the class is taken instead of the refusal
    def scaled(m, prefix, opts):
        return compose(MatrixAtom(f"{prefix}.weight", m.weight), activation("identity"))
    if isinstance(layer, nn.Linear):
        assert set(budget(model, custom={ScaledLinear: scaled})) == {"0.weight", "1.weight", "2.weight"}


def test_a_known_layer_subclass_inside_a_traced_forward_is_refused_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mid = nn.Linear(4, 8, bias=False), ScaledLinear(8, 8, bias=False)

        def forward(self, x):
            h = self.inp(x)
            return h + self.mid(h)

    with pytest.raises(ModularError, match=r"^'mid' \(ScaledLinear\) is an nn.Linear with its own forward"):
        from_torch(Net())


def test_a_known_layer_subclass_keeping_torchs_forward_is_described():
    class Named(nn.Linear):
        def __init__(self, d_in, d_out):
            super().__init__(d_in, d_out, bias=False)
            self.tag = "head"

    class Wrapped(nn.Sequential):
        pass

    model = Wrapped(nn.Linear(8, 8, bias=False), nn.ReLU(), Named(8, 4))
    assert budget(model) == budget(nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False)))


def test_transformers_scaled_word_embedding_is_refused():
    bart = pytest.importorskip("transformers.models.bart.modeling_bart")
    emb = bart.BartScaledWordEmbedding(20, 16, padding_idx=0, embed_scale=4.0)
    with pytest.raises(ModularError, match=r"'0' \(BartScaledWordEmbedding\) is an nn.Embedding with its own"):
        from_torch(nn.Sequential(emb, nn.Linear(16, 4, bias=False)))


# ------------------------------------------------------------------ feature axes
C, H, W = 9, 2, 2


@pytest.mark.parametrize("flatten", [nn.Flatten(start_dim=2), nn.Flatten(0), nn.Flatten(1, 2), nn.Flatten(-2)])
def test_a_flatten_other_than_start_dim_1_is_refused(flatten):
    """Conv2d → Flatten(start_dim=2) → Linear(H·W) was accepted as a merge, though flatten(2) of a
    (B, C, H, W) activation keeps C and makes positions the trailing axis the Linear reads (a
    probe measured 1.5× past the weight bound)."""
    model = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), flatten, nn.Linear(H * W, 3, bias=False))
    with pytest.raises(ModularError, match=r"'1': flatten\(start_dim=.*, end_dim=.*\).*no shapes"):
        from_torch(model)


class _Flat(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.head, self.how = nn.Conv2d(C, C, 1, bias=False), nn.Linear(H * W, 3, bias=False), how

    def forward(self, x):
        return self.head(self.how(self.conv(x)))


@pytest.mark.parametrize("how", [lambda h: torch.flatten(h, 2), lambda h: h.flatten(2), lambda h: h.flatten(),
                                 lambda h: torch.flatten(h, start_dim=-2), lambda h: h.flatten(1, 2),
                                 lambda h: torch.flatten(h, 1, end_dim=2)])
def test_a_traced_flatten_other_than_start_dim_1_is_refused(how):
    with pytest.raises(ModularError, match=r"flatten\(start_dim=.*, end_dim=.*\).*no shapes"):
        from_torch(_Flat(how))


@pytest.mark.parametrize("how", [lambda h: torch.flatten(h, 1), lambda h: h.flatten(1), lambda h: h.flatten(1, -1),
                                 lambda h: torch.flatten(h, start_dim=1, end_dim=-1)])
def test_flatten_from_dim_1_is_still_described(how):
    model = _Flat(how)
    model.head = nn.Linear(C * H * W, 3, bias=False)
    assert {a.name for a in from_torch(model).atoms()} == {"conv.weight", "head.weight"}
    assert {a.name for a in from_torch(nn.Sequential(model.conv, nn.Flatten(), model.head)).atoms()} == \
        {"0.weight", "2.weight"}


@pytest.mark.parametrize("norm", [nn.LayerNorm([4, 6, 6]), nn.LayerNorm((6, 6), bias=False)]
                         + ([nn.RMSNorm([6, 6])] if hasattr(nn, "RMSNorm") else []))
def test_a_normalisation_over_several_dims_is_refused(norm):
    """LayerNorm([C, H, W]) normalises the whole block, not each position's features: a probe
    measured a per-position RMS of 6 at its output against the tree's bound 1."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), norm, nn.Conv2d(4, 5, 1, bias=False))
    with pytest.raises(ModularError, match=r"^'1' \((LayerNorm|RMSNorm)\) normalises over the last \d dims"):
        from_torch(model)


def test_a_normalisation_over_the_last_dim_is_still_described():
    for norm in (nn.LayerNorm(8), nn.LayerNorm((8,)), nn.LayerNorm([8])):
        assert len(from_torch(nn.Sequential(nn.Linear(4, 8, bias=False), norm)).atoms()) == 3


class _ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(16, 16, 1, bias=False), nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)))


@pytest.mark.parametrize("model, reader, writer", [
    (nn.Sequential(nn.Conv1d(16, 16, 1, bias=False), nn.Linear(8, 4, bias=False)), "'1.weight'", "'0.weight'"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Dropout(), nn.LayerNorm(6)), "3 (layernorm)", "'0.weight'"),
    (_ConvThenLinear(), "'fc.weight'", "'conv.weight'"),
])
def test_a_last_dim_layer_fed_by_a_convolution_is_refused(model, reader, writer):
    """Conv1d(16, 16, 1) → Linear over the length axis: the Linear reads positions, not channels, and
    a probe measured 2× past the weight bound (√C in the worst case)."""
    with pytest.raises(ModularError) as info:
        from_torch(model)
    message = str(info.value)
    assert message.startswith(f"{reader} reads its features on the last dim, but is fed by {writer}, a "
                              "convolution"), message
    assert "torch.flatten(x, 1)" in message, message


def test_a_convolution_fed_by_a_last_dim_layer_is_refused():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.GELU(), nn.Conv1d(8, 4, 3))
    with pytest.raises(ModularError, match=r"^'3.weight' is a convolution reading its features \(channels\) on "
                                           r"dim 1, but is fed by '1.weight', which writes them on the last dim"):
        from_torch(model)


def test_layers_on_one_axis_or_flattened_between_are_still_described():
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(16, 2))
    assert len(from_torch(convs).atoms()) == 6
    residual = nn.Sequential(nn.Conv1d(3, 4, 1), Residual(nn.Conv1d(4, 4, 1), nn.ReLU()), nn.Flatten(),
                             nn.LayerNorm(20), nn.Linear(20, 2))
    assert len(from_torch(residual).atoms()) == 8
    at_the_input = nn.Sequential(Residual(nn.Conv1d(3, 3, 1), nn.ReLU()), nn.Linear(5, 2))  # x + conv(x)
    with pytest.raises(ModularError, match=r"^'1.weight' reads its features on the last dim, but is fed by "
                                           r"'0.0.weight', a convolution"):
        from_torch(at_the_input)
    lm = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    assert len(from_torch(lm).atoms()) == 7
    # a custom description's layout is its own (it may permute inside): not judged
    permuting = nn.Sequential(nn.Conv1d(3, 4, 1, bias=False), nn.Linear(5, 2, bias=False))
    assert set(budget(permuting, custom={"1": lambda m, prefix, opts: MatrixAtom(f"{prefix}.weight", m.weight)})) \
        == {"0.weight", "1.weight"}


# ------------------------------------------------------------------ float rounding in the assumption check
@pytest.mark.parametrize("d_in, d_out", [(64, 192), (128, 384), (512, 1536), (1, 3)])
def test_rms_scaled_linear_meets_a_unit_norm_assumption_despite_rounding(d_in, d_out):
    """√(d_out/d_in)·√(d_in/d_out) = 0.9999999999999999 for these widths: "assumption unmet … at
    most 1, below the assumed 1" was printed and warned (a probe: 246 of 1024 width pairs ≤ 32)."""
    assert math.sqrt(d_out / d_in) * math.sqrt(d_in / d_out) < 1  # the rounding this is about
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.LayerNorm(d_out), nn.Linear(d_out, 2))
    assert unmet_assumptions(from_torch(model, scale="rms")) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget(model, scale="rms")
    # a real shortfall is still named
    assert unmet_assumptions(from_torch(model, scale="rms", norm_min_rms=1 + 1e-9))


# ------------------------------------------------------------------ LayerNorm's stated assumption
def test_the_layernorm_assumption_is_on_the_standard_deviation():
    """The table printed "layernorm: inputs have RMS ≥ 1", but LayerNorm centres first: an input of
    RMS 1 and small spread has Lipschitz constant 70 (a probe); the bound needs std ≥ r."""
    table = budget_table(nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2)))
    assert "assumes layernorm: inputs have standard deviation (centred RMS) ≥ 1 (sensitivity 1/1)" in table
    assert "inputs have RMS" not in table
    table = budget_table(nn.Sequential(nn.Linear(4, 16), nn.RMSNorm(16), nn.Linear(16, 2)), norm_min_rms=0.5)
    assert "assumes rmsnorm: inputs have RMS ≥ 0.5 (sensitivity 1/0.5)" in table


# ------------------------------------------------------------------ meta and non-finite values
def test_meta_biases_and_gains_are_refused_by_name():
    """from_torch and budget on the meta device failed with torch's "Tensor.item() cannot be called
    on meta tensors", naming no parameter."""
    with torch.device("meta"):
        biased = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        normed = nn.Sequential(nn.Linear(4, 8, bias=False), nn.LayerNorm(8))
        frozen = nn.Sequential(nn.Linear(4, 8, bias=False).requires_grad_(False), nn.Linear(8, 2, bias=False))
        embedded = nn.Sequential(nn.Embedding(4, 8).requires_grad_(False), nn.Linear(8, 2, bias=False))
        plain = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    for model, name in ((biased, "0.bias"), (normed, "1.weight"), (frozen, "0.weight"), (embedded, "0.weight")):
        with pytest.raises(ModularError, match=rf"^'{name}' is on the meta device \(no values yet\)"):
            budget(model)
    assert budget(plain) == pytest.approx(budget(plain.to_empty(device="cpu")))  # shapes alone suffice


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["0.bias", "1.weight", "1.bias"])
def test_a_non_finite_gain_or_bias_is_named(bad, where):
    """A NaN LayerNorm gain was blamed on 0.weight ("its budget is undefined … a zero input bound
    means nothing reaches it"), an infinite one on 2.weight; a NaN bias gave a budget silently."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with torch.no_grad():
        dict(model.named_parameters())[where][3] = bad
    with pytest.raises(ModularError, match=rf"^'{where}' holds a non-finite value \(index 3: {bad}\)"):
        budget(model)


def test_an_fp64_bias_whose_norm_overflows_is_named():
    """Finite entries whose fp64 norm overflows: a bare IndexError looking for a non-finite entry
    (a review)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).double()
    with torch.no_grad():
        model[0].bias.fill_(1e200)
    with pytest.raises(ModularError, match=r"^'0.bias' is too large for its"):
        budget(model)


def test_a_norm_named_rmsnorm_with_an_int_normalized_shape_is_described():
    """torch's convention: normalized_shape d means (d,); a user's RMSNorm keeping the int failed
    with "'int' object is not iterable" (a review)."""
    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.normalized_shape, self.weight = d, nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    model = nn.Sequential(nn.Linear(4, 8, bias=False), RMSNorm(8), nn.Linear(8, 2, bias=False))
    assert set(budget(model)) == {"0.weight", "2.weight"}


def test_a_non_finite_frozen_weight_is_named():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
    model[0].requires_grad_(False)
    with pytest.raises(ModularError, match=r"^'0.weight' holds a non-finite value \(index \(1, 2\): nan\)"):
        budget(model)


# ------------------------------------------------------------------ names, hand-built trees, options
def test_a_custom_atom_named_after_another_parameter_takes_its_own_name():
    """A custom description naming its atom "0.weight" for layer 2's weight (a copy-paste slip)
    dropped 2.weight's entry from the budget silently: names are corrected by identity."""
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    slip = budget(model, custom={"2": lambda m, prefix, opts: MatrixAtom("0.weight", m.weight)})
    assert slip == pytest.approx(budget(model))


def test_a_hand_built_tree_placing_a_parameter_twice_is_refused():
    """budget() of a hand-built tree skipped from_torch's check: W placed twice gave {'W': 0.5}."""
    W = torch.zeros(8, 8, requires_grad=True)
    for tree in (compose(MatrixAtom("W", W), activation("relu"), MatrixAtom("W", W)),
                 Parallel(MatrixAtom("A", W), MatrixAtom("B", W))):
        for f in (budget, checked_budget, budget_table):
            with pytest.raises(ModularError, match=r"^parameter '[WB]' is used twice \(as '[WA]' and '[WB]'"):
                f(tree)


def test_a_hand_built_tree_with_two_atoms_of_one_name_is_refused():
    tree = compose(MatrixAtom("W", torch.zeros(8, 8)), activation("relu"), MatrixAtom("W", torch.zeros(4, 8)))
    with pytest.raises(ModularError, match=r"two atoms are named 'W'"):
        budget(tree)


@pytest.mark.parametrize("mass", ["abc", "2", None, -1.0, math.nan, True, torch.ones(2)])
def test_a_bad_mass_is_refused_by_name(mass):
    """masses={"0.weight": "abc"} failed in float() ("could not convert string to float"), None with
    a TypeError, and "2" was taken as 2."""
    with pytest.raises(ModularError, match=r"^masses\['0.weight'\] must be a finite number ≥ 0, got "):
        budget(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), masses={"0.weight": mass})


@pytest.mark.parametrize("value", ["x", 0.0, math.inf])
def test_a_bad_norm_min_rms_is_refused_without_a_norm_layer_too(value):
    """norm_min_rms="x" was taken by a model without a normalisation layer (a probe)."""
    with pytest.raises(ValueError, match=r"^norm_min_rms must be a finite number > 0"):
        budget(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), norm_min_rms=value)


def test_a_tensor_mass_is_taken_as_its_number():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert budget(model, masses={"0.weight": torch.tensor(2.0)}) == budget(model, masses={"0.weight": 2.0})


def test_a_custom_entry_that_is_not_a_function_is_refused():
    with pytest.raises(TypeError, match=r"custom\[<class 'torch.nn.modules.activation.ReLU'>\] must be a function "
                                        r"fn\(module, prefix, options\) -> Module, got int"):
        budget(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), custom={nn.ReLU: 3})


def test_a_composition_of_a_torch_layer_is_refused():
    with pytest.raises(TypeError, match=r"Compose: its argument 0 is ReLU, not a modman.modular.Module"):
        budget(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), custom={"1": lambda m, p, o: compose(nn.ReLU(), m)})
    with pytest.raises(TypeError, match=r"Parallel: its argument 1 is Tensor"):
        Parallel(activation("relu"), torch.zeros(2))


@pytest.mark.parametrize("layer", [nn.Linear(4, 0, bias=False), nn.Linear(0, 4, bias=False), nn.Embedding(4, 0)])
def test_an_empty_weight_is_refused_by_name(layer):
    """Linear(4, 0) raised ZeroDivisionError; Linear(0, 4) "its budget is undefined … a zero input bound"."""
    with pytest.raises(ModularError, match=r"^'0.weight' has shape \(\d, \d\): an empty weight"):
        budget(nn.Sequential(layer))


def test_norm_refuses_changes_not_given_by_name():
    """norm([ΔW]) failed sorting the tensors for its own message (a probe): a dict by name is asked for."""
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 2, bias=False))
    tree = from_torch(model)
    with pytest.raises(TypeError, match=r"norm\(\) takes a dict \{parameter name: change\}, got list"):
        tree.norm([torch.zeros(8, 4), torch.zeros(2, 8)])
