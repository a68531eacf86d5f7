"""ManifoldMuon given modules (API.md "Optimizers"): roles, construction-time projection,
describe(), last_step_stats, persistent state size."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from modman.manifolds import Sphere, Stiefel
from modman.optim import HypersphericalDescent, ManifoldMuon, Muon

from ._helpers import assert_bitwise, bits

STATS_KEYS = {"tangent_residual", "duality_gap", "iterations", "msign_calls", "distance_to_manifold"}


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, 4))  # a stack of 3 expert matrices
        self.gate = nn.Parameter(torch.randn(4, 4))  # a bare 2-D parameter, owned by no layer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 6)
        self.conv = nn.Conv2d(2, 3, 2)
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.experts = Experts()
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: assigned once, under its first name


def _build(cls=ManifoldMuon, **kw):
    torch.manual_seed(0)
    net = Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls(net.modules(), **({"solver": "projected"} if cls is ManifoldMuon else {}), **kw)
    moved = [str(w.message) for w in caught if "moved" in str(w.message)]
    return net, opt, before, moved


def _roles(opt):
    return {n: (g["manifold"], g["algorithm"]) for g in opt.param_groups for n in g["param_names"]}


def test_roles_from_modules():
    net, opt, _, _ = _build()
    roles = _roles(opt)
    assert roles == {
        "emb.weight": ("sphere", "hyperspherical"),
        "lin.weight": ("stiefel", "manifold_muon"),
        "conv.weight": ("stiefel", "manifold_muon"),
        "conv1.weight": ("stiefel", "manifold_muon"),
        "experts.w": ("stiefel", "manifold_muon"),
        "lin.bias": ("euclidean", "adamw"), "conv.bias": ("euclidean", "adamw"),
        "conv1.bias": ("euclidean", "adamw"), "experts.gate": ("euclidean", "adamw"),
        "norm.weight": ("euclidean", "adamw"), "norm.bias": ("euclidean", "adamw"),
        "frozen.bias": ("euclidean", "adamw"),
    }, "tied weights once, frozen weights skipped, 1-D and bare 2-D to the fallback"
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))


def test_role_overrides():
    torch.manual_seed(0)
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(net.modules(), solver="projected",
                           roles={"experts.gate": "stiefel", nn.Embedding: "fallback", net.conv: "fallback"})
    roles = _roles(opt)
    assert roles["experts.gate"][0] == "stiefel"
    assert roles["emb.weight"][1] == "adamw" and roles["conv.weight"][1] == "adamw"
    with pytest.raises(ValueError, match="unknown role"):
        ManifoldMuon(net.modules(), roles={nn.Linear: "hyperbolic"})


def test_construction_projects_onto_the_exact_polar_factor_warning_once_per_weight():
    net, opt, before, moved = _build()
    mats = {"lin.weight": lambda w: w, "conv.weight": lambda w: w.reshape(3, -1),
            "conv1.weight": lambda w: w.reshape(3, -1), "experts.w": lambda w: w}
    for name, view in mats.items():
        p = dict(net.named_parameters())[name]
        U, _, Vh = torch.linalg.svd(view(before[name]).double(), full_matrices=False)
        torch.testing.assert_close(view(p.detach()).double(), U @ Vh, rtol=0, atol=2e-6)  # SVD oracle
    emb = net.emb.weight.detach()
    torch.testing.assert_close(emb.double(), before["emb.weight"].double() / before["emb.weight"].double().norm(
        dim=1, keepdim=True), rtol=0, atol=2e-6)
    assert sorted(m.split(" moved ")[1].split(" onto")[0] for m in moved) == sorted(list(mats) + ["emb.weight"])
    assert all("distance was" in m for m in moved)
    for name in ("lin.bias", "experts.gate", "norm.weight", "frozen.weight", "frozen.bias"):
        assert_bitwise(dict(net.named_parameters())[name], before[name], name)


def test_weights_within_tolerance_are_left_bitwise_and_not_reported():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(Stiefel().random((4, 6)) * (1 + 5e-7))  # off by 5e-7 < on_manifold_tol
    before = bits(lin.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ManifoldMuon(lin.modules(), solver="projected")
    assert torch.equal(bits(lin.weight), before)


def test_low_precision_weights_at_their_rounding_are_left_bitwise():
    """A bf16 checkpoint of Stiefel weights sits ~1e-3 off the manifold (its rounding): building
    the optimizer on it must not re-project it (a resumed run then differed from the uninterrupted
    one by 4e-3 — a user probe); the tolerance is max(on_manifold_tol, 2·eps of the dtype)."""
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        lin = nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            lin.weight.copy_(Stiefel().random((32, 64)).to(dtype))
        lin = lin.to(dtype)
        assert float(Stiefel().distance(lin.weight.detach())) > 1e-5
        before = bits(lin.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ManifoldMuon(lin.modules(), solver="projected")
        assert torch.equal(bits(lin.weight), before), dtype


@pytest.mark.parametrize("family", [ManifoldMuon, HypersphericalDescent])
def test_embedding_padding_row_stays_zero(family):
    """nn.Embedding(padding_idx=0) has a zero row that never gets a gradient: construction with the
    defaults used to raise ("a zero row has no nearest point"); the row now stays exactly zero
    and every other row is put on the sphere."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 8, padding_idx=0), nn.Linear(8, 10)
    net = nn.Sequential(emb, head)
    with pytest.warns(UserWarning, match="moved 0.weight"):
        opt = family(net.modules(), lr=0.05)
    x = torch.tensor([[0, 3, 4, 0, 7]])
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x)[0], torch.tensor([1, 2, 3, 4, 5])).backward()
        opt.step()
    w = emb.weight.detach()
    assert torch.equal(w[0], torch.zeros(8))
    torch.testing.assert_close(w[1:].norm(dim=1), torch.ones(9), rtol=0, atol=1e-6)


def test_project_on_init_false_leaves_weights():
    net, opt, before, moved = _build(project_on_init=False)
    assert moved == []
    for name, p in net.named_parameters():
        assert_bitwise(p, before[name], name)


def test_muon_and_hyperspherical_roles():
    _, muon, _, moved = _build(Muon)
    roles = _roles(muon)
    assert moved == [] and roles["emb.weight"][1] == "adamw" and roles["lin.weight"] == ("euclidean", "muon")
    assert roles["experts.w"] == ("euclidean", "muon")
    _, hd, _, _ = _build(HypersphericalDescent)
    roles = _roles(hd)
    assert roles["lin.weight"] == ("sphere", "hyperspherical") and roles["experts.w"][0] == "sphere"
    assert roles["experts.gate"][1] == "adamw" and roles["emb.weight"][0] == "sphere"


def _step(net, opt, steps=2):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        for p in net.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_describe_table():
    net, opt, _, _ = _build(budget={"lin.weight": 0.5})
    table = opt.describe().splitlines()
    assert table[0].split() == ["parameter", "shape", "manifold", "lr", "×", "lr_scale", "solver"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == set(_roles(opt))
    assert "6×4" in rows["lin.weight"] and "Stiefel" in rows["lin.weight"] and "projected" in rows["lin.weight"]
    assert "0.05" in rows["lin.weight"].split() and "0.1" in rows["conv.weight"].split()
    assert "sphere" in rows["emb.weight"] and "AdamW" in rows["lin.bias"]
    assert "3×6×4" in rows["experts.w"]


def test_last_step_stats_keys_and_not_in_state_dict():
    net, opt, _, _ = _build()
    _step(net, opt)
    constrained = {n for g in opt.param_groups if g["algorithm"] != "adamw" for n in g["param_names"]}
    assert set(opt.last_step_stats) == constrained
    for name, stats in opt.last_step_stats.items():
        assert set(stats) == STATS_KEYS, name
    assert "last_step_stats" not in opt.state_dict()
    assert opt.last_step_stats["experts.w"]["duality_gap"].shape == (3,), "batched stats per expert"


def test_persistent_state_at_most_twice_the_weight():
    net, opt, _, _ = _build()
    _step(net, opt, 2)
    shapes = {}
    for g in opt.param_groups:
        if g["algorithm"] == "adamw":
            continue
        for p in g["params"]:
            numel = sum(v.numel() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
            assert numel <= 2 * p.numel(), (g["param_names"], numel, p.numel())
            shapes[id(p)] = {k: v.shape for k, v in opt.state[p].items()}
    _step(net, opt, 2)
    for g in opt.param_groups:  # fixed shapes: the state does not grow
        for p in g["params"]:
            if id(p) in shapes:
                assert shapes[id(p)] == {k: v.shape for k, v in opt.state[p].items()}


def test_after_steps_weights_are_on_their_manifolds():
    net, opt, _, _ = _build()
    _step(net, opt, 5)
    assert float(Stiefel().distance(net.lin.weight.detach())) <= 1e-5
    assert float(Stiefel().distance(net.conv.weight.detach().reshape(3, -1))) <= 1e-5
    assert float(Stiefel().distance(net.conv1.weight.detach().reshape(3, -1))) <= 1e-5
    assert float(Stiefel().distance(net.experts.w.detach()).max()) <= 1e-5
    assert float(Sphere().distance(net.emb.weight.detach())) <= 1e-5
