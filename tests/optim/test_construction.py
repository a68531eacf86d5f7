"""Construction: what the family refuses, and that a refusal changes nothing (TORCH_OPTIM_CHECKLIST)."""
from __future__ import annotations

import warnings

import pytest
import torch

from modman.optim import HypersphericalDescent, ManifoldMuon, Muon

from ._helpers import FAMILY, Problem, bits, make_opt


@pytest.mark.parametrize("kind", FAMILY)
def test_params_must_be_an_iterable_of_tensors_or_dicts(kind):
    W = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(TypeError, match="iterable"):
        make_opt(kind, W)  # a bare tensor
    with pytest.raises(TypeError):
        make_opt(kind, 3)
    with pytest.raises(TypeError, match="only optimize Tensors"):
        make_opt(kind, [W, "not a tensor"])
    with pytest.raises(TypeError, match="ordered collections"):
        make_opt(kind, [{"params": {W}}])  # a set has no stable order
    with pytest.raises(ValueError, match="empty"):
        make_opt(kind, [])


@pytest.mark.parametrize("kind", FAMILY)
def test_duplicate_parameter_warns_and_shared_parameter_refused(kind):
    W = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        make_opt(kind, [W, W])
    with pytest.raises(ValueError, match="more than one parameter group"):
        make_opt(kind, [{"params": [W]}, {"params": [W]}])


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
def test_negative_hyperparameters_refused_naming_them(kind, key):
    W = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=key):
        make_opt(kind, [W], **{key: -0.1})
    with pytest.raises(ValueError, match=key):  # per group too, not only the defaults
        make_opt(kind, [{"params": [W], key: -0.1}])
    with pytest.raises(ValueError, match=key):
        make_opt(kind, [W], **{key: float("nan")})


@pytest.mark.parametrize("kind", FAMILY)
def test_momentum_below_one_and_tensor_lr_one_element(kind):
    W = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="momentum"):
        make_opt(kind, [W], momentum=1.0)
    with pytest.raises(ValueError, match="one element"):
        make_opt(kind, [W], lr=torch.tensor([0.1, 0.2]))
    make_opt(kind, [W], lr=torch.tensor([[0.1]]))  # a 2-D one-element tensor is fine


@pytest.mark.parametrize("kind", FAMILY)
def test_complex_parameters_and_sparse_gradients_refused(kind):
    Z = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        make_opt(kind, [Z])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = make_opt(kind, [{"params": [emb.weight], "algorithm": "adamw"}] if kind == "muon" else [emb.weight])
    emb(torch.tensor([1, 2])).sum().backward()
    before = bits(emb.weight)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(bits(emb.weight), before)


@pytest.mark.parametrize("kind", ["manifold_muon", "muon"])
def test_manifold_that_cannot_hold_the_parameter_named_at_construction(kind):
    bias = torch.nn.Parameter(torch.randn(6))
    W = torch.nn.Parameter(torch.randn(6, 4))  # off the manifold: would be projected
    before = bits(W)
    manifold = "stiefel" if kind == "manifold_muon" else "euclidean"
    with pytest.raises(ValueError, match=r"head\.bias.*cannot live on"):
        make_opt(kind, [{"params": [("w", W)]}, {"params": [("head.bias", bias)], "manifold": manifold}])
    assert torch.equal(bits(W), before), "a refused construction must not have projected W"


def test_bad_options_refused_at_construction_naming_them():
    W = torch.nn.Parameter(torch.randn(6, 4))
    before = bits(W)
    for kwargs, pattern in [
        ({"solver": "no_such_solver"}, "solver"),
        ({"scale": -1.0}, "scale"),
        ({"scale": "spectral"}, "scale"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"fallback": {"lr": 1e-3, "momentum": 0.9}}, "fallback"),
        ({"fallback": {"lr": -1e-3}}, "fallback lr"),
        ({"fallback": {"betas": (0.9, 1.0)}}, "betas"),
        ({"on_manifold_tol": -1.0}, "on_manifold_tol"),
        ({"budget": "modular"}, "budget"),  # needs modules
    ]:
        with pytest.raises(ValueError, match=pattern):
            ManifoldMuon([W], **kwargs)
        assert torch.equal(bits(W), before), kwargs
    with pytest.raises(ValueError, match="radius"):
        HypersphericalDescent([W], radius=0.0)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([W], ns_dtype="int8")
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([W], adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="manifold"):
        ManifoldMuon([{"params": [W], "manifold": "hyperbolic"}])
    with pytest.raises(ValueError, match="does not handle"):
        Muon([{"params": [W], "manifold": "sphere"}])


def test_params_must_not_mix_modules_and_tensors():
    lin = torch.nn.Linear(4, 6)
    with pytest.raises(TypeError, match="mix"):
        ManifoldMuon([lin, lin.weight])


def test_refused_projection_names_the_weight_with_every_weight_untouched(monkeypatch):
    """All projections are computed before any is written. (A zero embedding row was the refused
    case until it became a padding row that stays zero: test_roles.py.)"""
    from modman.manifolds import Sphere

    def refuse(self, W):
        raise ValueError("no nearest point")

    monkeypatch.setattr(Sphere, "project", refuse)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Embedding(5, 4))
    before = [bits(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"1\.weight"):
        ManifoldMuon(model.modules(), solver="projected")
    assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", FAMILY)
def test_add_param_group_splits_by_role_and_refuses_bad_groups(kind):
    prob = Problem(kind)
    opt = make_opt(kind, [prob.W])
    n_groups = len(opt.param_groups)
    W2 = torch.nn.Parameter(torch.randn(5, 3))
    b2 = torch.nn.Parameter(torch.randn(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.add_param_group({"params": [W2, b2], "lr": 0.01})
    moved = [str(w.message) for w in caught if "moved" in str(w.message)]
    assert len(moved) == (0 if kind == "muon" else 1) and all("param1" in m for m in moved), moved
    added = opt.param_groups[n_groups:]
    algorithms = {id(p): g["algorithm"] for g in added for p in g["params"]}
    assert algorithms[id(b2)] == "adamw" and algorithms[id(W2)] != "adamw"
    assert all(g["lr"] == 0.01 for g in added if g["algorithm"] != "adamw")
    groups_before = len(opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, 3))], "lr": -1.0})
    assert len(opt.param_groups) == groups_before, "a refused group must not stay in param_groups"
