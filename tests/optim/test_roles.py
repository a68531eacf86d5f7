"""ManifoldMuon given modules (API.md "Optimizers"): roles, construction-time projection,
describe(), last_step_stats, persistent state size."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from modman.manifolds import Sphere, Stiefel
from modman.solvers import SOLVERS
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


def test_a_module_override_reaches_a_weight_tied_to_an_earlier_module():
    # the head's weight is the embedding's, assigned under emb.weight: {net.head: ...} must still
    # reach it (it was silently ignored: the README's advice for leaving a tied head unconstrained)
    torch.manual_seed(0)
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(net.modules(), solver="projected", roles={net.head: "fallback"})
        assert _roles(opt)["emb.weight"] == ("euclidean", "adamw")
        # a class speaks for the owner the weight is assigned under only (the embedding)
        opt = ManifoldMuon(net.modules(), solver="projected", roles={nn.Linear: "fallback"})
        assert _roles(opt)["emb.weight"] == ("sphere", "hyperspherical")
        with pytest.raises(ValueError, match="tied weight emb.weight = head.weight"):
            ManifoldMuon(net.modules(), roles={net.head: "fallback", net.emb: "stiefel"})


def test_construction_projects_onto_the_exact_polar_factor_in_one_warning_naming_each_weight():
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
    assert len(moved) == 1, "one warning for all the weights moved (a deep model got one per weight)"
    lines = moved[0].splitlines()
    assert lines[0].endswith(f"moved {len(mats) + 1} weights onto their manifolds (project_on_init=False keeps "
                             "weights as loaded):")
    assert sorted(line.split(" → ")[0].strip() for line in lines[1:]) == sorted(list(mats) + ["emb.weight"])
    assert all("(distance was" in line for line in lines[1:])
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
    with pytest.warns(UserWarning, match=r"0\.weight → sphere"):
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
    net, opt, _, _ = _build(budget={"lin.weight": 0.5, "conv.weight": 1.0, "conv1.weight": 1.0, "emb.weight": 1.0,
                                    "experts.w": 1.0})
    table = opt.describe().splitlines()
    assert table[0].split() == ["parameter", "shape", "manifold", "lr", "×", "lr_scale", "solver"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == set(_roles(opt))
    assert "6×4" in rows["lin.weight"] and "Stiefel" in rows["lin.weight"] and "projected" in rows["lin.weight"]
    assert "0.05" in rows["lin.weight"].split() and "0.1" in rows["conv.weight"].split()
    assert "sphere" in rows["emb.weight"] and "AdamW" in rows["lin.bias"]
    assert "3×6×4" in rows["experts.w"]


def test_describe_marks_how_a_weight_is_seen_as_a_matrix():
    """A grouped convolution's blocks, a 0-D parameter's shape (an empty cell before)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 8, 3, groups=2)
            self.temperature = nn.Parameter(torch.tensor(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = {line.split()[0]: line for line in ManifoldMuon(M().modules()).describe().splitlines()[2:]}
    assert "per group (2 blocks)" in rows["dw.weight"]
    assert rows["temperature"].split()[1] == "scalar"


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


class _Shapes(nn.Module):
    """A square, a tall, a wide weight and a square expert stack."""

    def __init__(self):
        super().__init__()
        self.square, self.tall, self.wide = nn.Linear(8, 8), nn.Linear(8, 20), nn.Linear(20, 8)
        self.experts = nn.Parameter(torch.randn(2, 8, 8))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_keeps_the_state_within_twice_the_weight(solver):
    """API.md: momentum, dual and solver extras total ≤ 2·numel(W), in fixed shapes. newton kept two
    scalars (subspace size, μ) next to a square W's n×n dual: 2n² + 2 elements."""
    torch.manual_seed(0)
    net = _Shapes()
    opt = _quiet(ManifoldMuon, net.modules(), solver=solver, lr=0.05, budget="uniform")

    def state_shapes():
        return {name: {k: tuple(v.shape) for k, v in opt.state[p].items()}
                for g in opt.param_groups if g["algorithm"] != "adamw"
                for name, p in zip(g["param_names"], g["params"])}

    _step(net, opt, 2)
    params = dict(net.named_parameters())
    for name, shapes in state_shapes().items():
        numel = sum(math.prod(shape) for shape in shapes.values())
        assert numel <= 2 * params[name].numel(), (solver, name, shapes)
    before = state_shapes()
    _step(net, opt, 2)
    assert state_shapes() == before, "the state keeps its shapes"


def test_after_steps_weights_are_on_their_manifolds():
    net, opt, _, _ = _build()
    _step(net, opt, 5)
    assert float(Stiefel().distance(net.lin.weight.detach())) <= 1e-5
    assert float(Stiefel().distance(net.conv.weight.detach().reshape(3, -1))) <= 1e-5
    assert float(Stiefel().distance(net.conv1.weight.detach().reshape(3, -1))) <= 1e-5
    assert float(Stiefel().distance(net.experts.w.detach()).max()) <= 1e-5
    assert float(Sphere().distance(net.emb.weight.detach())) <= 1e-5


class Body(nn.Module):
    """A model whose layers sit inside containers: body (a Sequential) and head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _names(opt):
    return [n for g in opt.param_groups for n in g["param_names"]]


def _quiet(cls, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(params, **kw)


def test_container_modules_are_expanded_to_their_submodules():
    """[net.body, net.head] used to optimise head's direct parameters only (body's were silently
    dropped); [net] raised "no trainable parameters" and net "'Body' object is not iterable"."""
    torch.manual_seed(0)
    net = Body()
    reference = _quiet(ManifoldMuon, net.modules(), solver="projected")
    for params in ([net], net, (m for m in [net])):
        opt = _quiet(ManifoldMuon, params, solver="projected")
        assert _names(opt) == _names(reference)
        assert [g["lr_scale"] for g in opt.param_groups] == [g["lr_scale"] for g in reference.param_groups]
    assert sorted(_names(reference)) == sorted(n for n, _ in net.named_parameters())
    opt = _quiet(ManifoldMuon, [net.body, net.head], solver="projected")
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in net.parameters()}, "every trainable parameter, each once"
    # two separate modules: named under an nn.ModuleList of them, in the order given
    assert _roles(opt) == {"0.0.weight": ("stiefel", "manifold_muon"), "0.2.weight": ("stiefel", "manifold_muon"),
                           "1.weight": ("stiefel", "manifold_muon"), "0.0.bias": ("euclidean", "adamw"),
                           "0.2.bias": ("euclidean", "adamw"), "1.bias": ("euclidean", "adamw")}
    # a module given with one that contains it adds nothing and keeps the container's names
    opt = _quiet(ManifoldMuon, [net.body[0], net], solver="projected")
    assert sorted(_names(opt)) == sorted(_names(reference))


def test_a_single_sequential_is_its_whole_tree_not_its_children():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    opt = _quiet(Muon, seq)
    assert _names(opt) == _names(_quiet(Muon, seq.modules()))
    assert set(_names(opt)) == {n for n, _ in seq.named_parameters()}


def test_separate_modules_never_share_a_name():
    """model.children() named both Linear weights "weight": last_step_stats kept one of them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = _quiet(ManifoldMuon, net.children(), solver="projected", lr=0.05)
    assert _names(opt) == ["0.weight", "2.weight", "0.bias", "2.bias"], "positions in the order given"
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert set(opt.last_step_stats) == {"0.weight", "2.weight"}
    assert len(opt.describe().splitlines()) == 2 + 4


def test_budget_for_separate_modules():
    """No single model describes separate modules: "auto" warns and steps every weight lr,
    "modular" refuses; a callable gets the ModuleList whose names are the optimizer's."""
    from modman.modular import ModularError

    torch.manual_seed(0)
    net = Body()
    with pytest.warns(UserWarning, match="separate"):
        opt = ManifoldMuon([net.body, net.head], solver="projected", project_on_init=False)
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)
    with pytest.raises(ModularError, match="separate"):
        ManifoldMuon([net.body, net.head], budget="modular")
    seen = {}

    def budget(model):
        seen.update(model.named_parameters())
        return {"0.0.weight": 1.0, "0.2.weight": 1.0, "1.weight": 0.5}

    opt = ManifoldMuon([net.body, net.head], solver="projected", budget=budget, project_on_init=False)
    assert set(seen) == set(_names(opt))
    assert {n: g["lr_scale"] for g in opt.param_groups for n in g["param_names"] if g["algorithm"] != "adamw"} == {
        "0.0.weight": 1.0, "0.2.weight": 1.0, "1.weight": 0.5}


def test_float_scale_steps_uniformly_with_a_warning_instead_of_failing():
    """A positive float scale is valid (API.md) but modman.modular knows None and "rms" only: the
    default budget raised the modular ValueError ("scale must be None or 'rms'") for any model."""
    torch.manual_seed(0)
    net = Body()
    with pytest.warns(UserWarning, match="scale"):
        opt = ManifoldMuon(net, scale=2.0, solver="projected", project_on_init=False)
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))


def test_compiled_model_gets_the_eager_names_and_learning_rates():
    """torch.compile(model).modules() named every weight "_orig_mod.…" and, the wrapper being
    unknown to modman.modular, silently replaced the per-layer budget by lr for every weight."""
    eager = _quiet(ManifoldMuon, _mlp().modules(), solver="projected")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = ManifoldMuon(torch.compile(_mlp()).modules(), solver="projected")
        also = ManifoldMuon(torch.compile(_mlp()), solver="projected")
    assert not [w for w in caught if "budget" in str(w.message)]
    for opt in (compiled, also):
        assert _names(opt) == _names(eager)
        assert [g["lr_scale"] for g in opt.param_groups] == [g["lr_scale"] for g in eager.param_groups]
    assert len({g["lr_scale"] for g in eager.param_groups if g["algorithm"] != "adamw"}) > 1, "a real budget"
    model = _mlp()
    model[2] = torch.compile(model[2])  # a compiled submodule
    opt = _quiet(ManifoldMuon, model.modules(), solver="projected", budget="uniform")
    assert _names(opt) == _names(eager)


def test_frozen_parameters_are_left_out_and_added_when_unfrozen():
    """Frozen parameters are not projected or optimised (a LoRA base model must stay as loaded);
    once unfrozen, add_param_group({"params": model.modules()}) adds exactly them, by role."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0].requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    opt = _quiet(ManifoldMuon, net.modules(), solver="projected", lr=0.1)
    assert _names(opt) == ["2.weight", "2.bias"]
    assert_bitwise(net[0].weight, frozen, "a frozen weight is not projected")
    net[0].requires_grad_(True)
    with pytest.warns(UserWarning, match=r"moved 0\.weight onto the stiefel"):
        opt.add_param_group({"params": net.modules()})
    assert _roles(opt) == {"2.weight": ("stiefel", "manifold_muon"), "2.bias": ("euclidean", "adamw"),
                           "0.weight": ("stiefel", "manifold_muon"), "0.bias": ("euclidean", "adamw")}
    before = net[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(net[0].weight, before) and "0.weight" in opt.last_step_stats
    assert float(Stiefel().distance(net[0].weight.detach())) <= 1e-5
    with pytest.raises(ValueError, match="no trainable parameters"):
        opt.add_param_group({"params": net.modules()})  # nothing new to add


@pytest.mark.parametrize("form", ["parameters", "named_parameters", "group", "add_param_group"])
def test_frozen_parameters_given_as_tensors_are_not_projected(form):
    """API.md: parameters with requires_grad=False are skipped. Given as tensors (the usual
    ``model.parameters()`` of a frozen base) a frozen weight was overwritten by its polar factor,
    with a "moved" warning; it now stays bitwise in its group, as torch keeps it. Unfrozen and
    given a gradient, its first step lands it on the manifold."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if form == "add_param_group":
            opt = ManifoldMuon([net[2].weight], lr=0.1, solver="projected")
            opt.add_param_group({"params": [net[0].weight, net[0].bias]})
        else:
            params = {"parameters": net.parameters(), "named_parameters": net.named_parameters(),
                      "group": [{"params": list(net.parameters())}]}[form]
            opt = ManifoldMuon(params, lr=0.1, solver="projected")
    assert_bitwise(net[0].weight, frozen, "a frozen weight given as a tensor is not projected")
    assert not [w for w in caught if "moved" in str(w.message) and "0.weight" in str(w.message)]
    assert any(p is net[0].weight for g in opt.param_groups for p in g["params"]), "kept in its group"
    net[0].weight.requires_grad_(True)
    net(torch.randn(16, 8)).pow(2).sum().backward()
    opt.step()
    assert float(Stiefel().distance(net[0].weight.detach())) <= 1e-5


@pytest.mark.parametrize("role", ["euclidean", "stiefel", "sphere", "fallback"])
@pytest.mark.parametrize("by", ["instance", "class"])
def test_a_module_role_override_is_for_its_matrices_not_its_bias(role, by):
    """``roles={linear: "euclidean"}`` raised "1.bias … cannot live on 'euclidean'", and
    ``{linear: "sphere"}`` put the bias on the unit sphere (norm 0.47 → 1). A module's or class's
    role goes to its matrices; its bias stays in the fallback, bitwise, unless named."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    biases = [net[0].bias.detach().clone(), net[2].bias.detach().clone()]
    opt = _quiet(ManifoldMuon, net.modules(), lr=0.1, solver="projected", budget="uniform",
                 roles={net[2] if by == "instance" else nn.Linear: role})
    roles = _roles(opt)
    want = {"euclidean": ("euclidean", "muon"), "stiefel": ("stiefel", "manifold_muon"),
            "sphere": ("sphere", "hyperspherical"), "fallback": ("euclidean", "adamw")}[role]
    assert roles["2.weight"] == want
    assert roles["0.weight"] == (want if by == "class" else ("stiefel", "manifold_muon"))
    assert roles["0.bias"] == roles["2.bias"] == ("euclidean", "adamw")
    assert_bitwise(net[0].bias, biases[0], "bias untouched by construction")
    assert_bitwise(net[2].bias, biases[1], "bias untouched by construction")
    named = _quiet(ManifoldMuon, net.modules(), lr=0.1, solver="projected", budget="uniform",
                   roles={"2.bias": "sphere"})
    assert _roles(named)["2.bias"] == ("sphere", "hyperspherical"), "a bias named explicitly takes its role"


class _PeftLikeLoRA(nn.Module):
    """A PEFT-style LoRA layer: base Linear plus lora_A/lora_B ModuleDicts of bias-free Linears."""

    def __init__(self, d_in, d_out, r, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(torch.randn(r, d_in, generator=g))
            self.lora_B["default"].weight.copy_(torch.randn(d_out, r, generator=g))

    def delta(self):
        return self.lora_B["default"].weight @ self.lora_A["default"].weight


@pytest.mark.parametrize("d_in, r", [(12, 3), (3, 5)])  # a wide A, and a tall one (r > d_in, PEFT allows it)
@pytest.mark.parametrize("scale", [None, "rms"])
def test_moving_a_lora_A_onto_stiefel_keeps_B_times_A(d_in, r, scale):
    layer = _PeftLikeLoRA(d_in, 7, r)
    before = layer.delta().detach().clone()
    B_before = layer.lora_B["default"].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ManifoldMuon(layer.modules(), scale=scale, budget="uniform")
    # B·A and the outputs are unchanged: nothing to report (the LoRA factory filtered the note by its text)
    assert not [w for w in caught if "moved" in str(w.message)], [str(w.message) for w in caught]
    manifold = {n: g["manifold"] for g in opt.param_groups for n in g["param_names"]}
    assert manifold == {"lora_A.default.weight": "stiefel", "lora_B.default.weight": "euclidean"}
    A = layer.lora_A["default"].weight.detach()
    assert float(Stiefel(scale).distance(A)) < 1e-6
    torch.testing.assert_close(layer.delta().detach(), before, rtol=1e-5, atol=1e-5)
    # a rescaling, not a blow-up: T Tᵀ is singular for a tall A, and a solve with it made ‖B‖ 9 → 800
    assert float(layer.lora_B["default"].weight.norm()) < 10 * float(B_before.norm())


def test_data_parallel_wrappers_are_seen_through():
    """ManifoldMuon(DataParallel(model).modules()) named every weight module.… and found no modular
    budget, so every layer stepped lr instead of its share (DistributedDataParallel alike: the
    two-rank test in test_distributed.py checks it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def layout(opt):
        return [(n, g["lr_scale"], g["manifold"]) for g in opt.param_groups for n in g["param_names"]]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = layout(ManifoldMuon(copy.deepcopy(model).modules()))
        wrapped = layout(ManifoldMuon(nn.DataParallel(model).modules()))
    assert wrapped == plain and plain[0][0] == "0.weight" and plain[0][1] < 1


def _block_diagonal_singular_values(conv: nn.Module) -> torch.Tensor:
    """The singular values of a grouped convolution's operator: block diagonal in its groups, each
    block the (out/G, in/G·k…) flattened weight of one group (float64, exact SVD)."""
    w = conv.weight.detach().double()
    blocks = w.reshape(conv.groups, w.shape[0] // conv.groups, -1)
    return torch.linalg.svdvals(torch.block_diag(*blocks))


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(32, 32, 3, groups=32), lambda: nn.Conv1d(16, 16, 3, groups=16),
                                  lambda: nn.Conv1d(8, 16, 3, groups=4), lambda: nn.Conv2d(4, 8, 3, groups=2),
                                  lambda: nn.Conv2d(32, 16, 1, groups=4)],
                         ids=["depthwise2d", "depthwise1d", "grouped-tall", "grouped-wide", "grouped-1x1"])
@pytest.mark.parametrize("cls", [ManifoldMuon, Muon])
def test_grouped_convolution_steps_each_group_as_its_own_matrix(conv, cls):
    """A grouped convolution's operator is block diagonal: its flattened (out, in/G·k…) weight
    on the Stiefel manifold left a depthwise Conv2d(32, 32, 3, groups=32) with singular values
    0.37–0.67 (a user probe). Each group's block is its own matrix, batched, for the optimizer and
    the diagnostics alike; ManifoldMuon keeps every singular value of the operator at 1."""
    from modman.diagnostics import named_matrices

    torch.manual_seed(0)
    layer = conv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(layer.modules(), lr=0.05)
    group = next(g for g in opt.param_groups if layer.weight in g["params"])
    assert group["flatten"] == f"groups={layer.groups}"
    blocks = named_matrices(layer)[0][2]
    assert blocks.shape == (layer.groups, layer.out_channels // layer.groups, layer.weight[0].numel())
    x = torch.randn(4, layer.in_channels, *([6] * (layer.weight.ndim - 2)))
    for _ in range(5):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    if cls is ManifoldMuon:
        sv = _block_diagonal_singular_values(layer)
        assert float((sv - 1).abs().max()) <= 1e-5, sv
        assert float(torch.as_tensor(opt.last_step_stats["weight"]["duality_gap"]).max()) <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = cls(layer.modules(), lr=0.05)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(restored.state[layer.weight]["momentum"], opt.state[layer.weight]["momentum"])


def test_depthwise_convolution_of_1x1_kernels_goes_to_the_fallback():
    """Each group of Conv2d(C, C, 1, groups=C) is a 1×1 matrix, on the Stiefel manifold {±1}: no
    constrained step can move it, so it is named in the fallback warning like Linear(1, 1)."""
    layer = nn.Conv2d(8, 8, 1, groups=8)
    with pytest.warns(UserWarning, match=r"weight \(Conv2d, 8×1×1×1\)"):
        opt = ManifoldMuon(layer.modules(), lr=0.05, budget="uniform")
    assert next(g for g in opt.param_groups if layer.weight in g["params"])["algorithm"] == "adamw"
