"""Budgets: the composition arithmetic by hand, equal shares for a plain ReLU MLP, and one
ManifoldMuon step moving every weight by lr × lr_scale in its own norm."""
import math
import warnings

import pytest
import torch
from torch import nn

import modman
from modman.modular import (ModularError, Parallel, Scale, activation, budget, budget_table, compose,
                            repeat)
from modman.modular.atoms import MatrixAtom

from .models import ResidualMLP, mlp


def atom(name, d=4, mass=1.0):
    return MatrixAtom(name, torch.zeros(d, d), mass, scale="rms")


def coefficients(tree):
    return {p.atom.name: p.coefficient for p in tree.placements()}


def test_composition_rule_by_hand():
    # m2 ∘ m1 with μ1 = 1, μ2 = 3 and sens(m2) = 2 (a ×2 scalar inside m2): s1 = (4/1)·2, s2 = 4/3
    m1, m2 = atom("a", mass=1.0), Scale(2.0, atom("b", mass=3.0))
    tree = compose(m1, m2)
    c = coefficients(tree)
    assert tree.mass == 4.0 and tree.sensitivity == 2.0
    assert c["a"] == pytest.approx(8.0)
    assert c["b"] == pytest.approx(4 / 3 * 2.0)  # the scalar multiple scales the inner norm too


def test_parallel_and_repeat_by_hand():
    tree = Parallel(atom("a", mass=1.0), atom("b", mass=3.0), combine="sum")
    assert coefficients(tree) == pytest.approx({"a": 4.0, "b": 4 / 3})
    assert tree.sensitivity == 2.0 and tree.mass == 4.0
    chain = repeat(lambda i: compose(atom(f"w{i}"), activation("gelu")), 3)
    g = activation("gelu").sensitivity
    c = coefficients(chain)
    assert c == pytest.approx({"w0": 3 * g ** 3, "w1": 3 * g ** 2, "w2": 3 * g})
    assert chain.sensitivity == pytest.approx(g ** 3)


def test_activation_sensitivities_against_scipy():
    from scipy.optimize import minimize_scalar
    from scipy.special import erf

    def gelu_d(x):
        return 0.5 * (1 + erf(x / math.sqrt(2))) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def silu_d(x):
        s = 1 / (1 + math.exp(-x))
        return s * (1 + x * (1 - s))

    for fn, kind, argmax in ((gelu_d, "gelu", math.sqrt(2)), (silu_d, "silu", 2.3994)):
        r = minimize_scalar(lambda x: -fn(x), bounds=(0, 5), method="bounded", options={"xatol": 1e-10})
        assert r.x == pytest.approx(argmax, abs=1e-3)
        assert -r.fun <= activation(kind).sensitivity <= -r.fun + 2e-4
    xs = torch.linspace(-6, 6, 20001, dtype=torch.float64, requires_grad=True)
    for f, kind in ((torch.relu, "relu"), (torch.tanh, "tanh"), (torch.nn.functional.gelu, "gelu")):
        (d,) = torch.autograd.grad(f(xs).sum(), xs)
        assert float(d.abs().max()) <= activation(kind).sensitivity


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_equal_shares_relu_mlp(depth):
    model = mlp([16] * (depth + 1))
    b = budget(model, scale="rms")
    assert sorted(b) == sorted(n for n, _ in model.named_parameters())
    assert all(v == pytest.approx(1 / depth, rel=1e-12) for v in b.values())


@pytest.mark.parametrize("scale", [None, "rms"])
def test_one_step_follows_multipliers(scale):
    """After one step at lr = 1e-3 each weight moved lr × lr_scale in its own norm (within 5 %)."""
    torch.manual_seed(0)
    model = mlp([12, 16, 16, 8, 5]).float()
    lr = 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon(model.modules(), lr=lr, scale=scale, budget=budget(model, scale=scale))
    expected = budget(model, scale=scale)
    if scale is None:  # the string route (ManifoldMuon's default scale)
        assert expected == budget(model) and expected != {n: 1.0 for n in expected}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(64, 12)), torch.randint(0, 5, (64,)))
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        delta = (p.detach() - before[name]).double()
        d_out, d_in = delta.shape
        own = torch.linalg.matrix_norm(delta, ord=2) * (1.0 if scale is None else math.sqrt(d_in / d_out))
        assert float(own) / lr == pytest.approx(expected[name], rel=0.05), name


def test_modular_string_budget_reaches_optimizer():
    model = mlp([8, 8, 8, 8]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon(model.modules(), lr=0.1, budget="modular")
    scales = {g["param_names"][0]: g["lr_scale"] for g in opt.param_groups if g["algorithm"] != "adamw"}
    assert scales == pytest.approx(budget(model))


def test_residual_budget_by_hand():
    # inp, then x + a·f2(relu(f1(x))), then out; masses 1 each (μ = 4), a = 0.5
    model = ResidualMLP(8, 8, 8, blocks=1, a=0.5).double()
    b = budget(model, scale="rms")
    # inp: (4/1)·sens(residual = 1 + 0.5)·sens(out = 1) = 6, input bound 1
    # out: 4/1, but its input bound is the residual's output bound 1 + 0.5·1 = 1.5 → 6
    # f1: parallel share (4/2)·sens(out) = 2, branch share 2/2, within it (2/1)·sens(relu, f2, ×0.5) = 1 → 2
    # f2: 2·(2/1)·sens(×0.5) = 2
    assert b["inp.weight"] == pytest.approx(1 / 6)
    assert b["out.weight"] == pytest.approx(1 / 6)
    assert b["f1.0.weight"] == pytest.approx(1 / 2)
    assert b["f2.0.weight"] == pytest.approx(1 / 2)


def test_budget_table_lists_every_parameter():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    text = budget_table(model, lr=0.1)
    for name, _ in model.named_parameters():
        assert name in text
    assert "fallback" in text and "assumes layernorm" in text


def test_zero_mass_tree_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ModularError, match="no weight of positive mass"):
        budget(model, masses={"0.weight": 0.0})
    with pytest.raises(ModularError, match="no weight of positive mass"):
        budget(nn.Sequential(nn.ReLU()))
