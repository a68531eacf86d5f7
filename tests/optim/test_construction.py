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
    message = r"'stiefel' needs a non-empty matrix; head\.bias" if kind == "manifold_muon" else r"head\.bias.*cannot live on"
    with pytest.raises(ValueError, match=message):
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


@pytest.mark.parametrize("cls, kwargs, error, pattern", [
    (ManifoldMuon, {"tol": -1}, ValueError, "tol"),
    (ManifoldMuon, {"tol": "x"}, ValueError, "tol"),
    (ManifoldMuon, {"max_iters": 2.5}, ValueError, "max_iters"),
    (ManifoldMuon, {"max_iters": -1}, ValueError, "max_iters"),
    (ManifoldMuon, {"nesterov": "no"}, TypeError, "nesterov"),
    (ManifoldMuon, {"fallback": {"betas": (0.9,)}}, ValueError, "fallback betas"),
    (ManifoldMuon, {"fallback": {"eps": -1}}, ValueError, "fallback eps"),
    (ManifoldMuon, {"scale": -1}, ValueError, "Invalid scale"),
    (ManifoldMuon, {"scale": float("nan")}, ValueError, "Invalid scale"),
    (Muon, {"ns_schedule": "foo"}, ValueError, "ns_schedule"),
    (Muon, {"ns_schedule": "svd"}, ValueError, "torch_arithmetic=False"),  # torch's arithmetic needs coefficients
    (Muon, {"ns_steps": -1}, ValueError, "ns_steps"),
    (Muon, {"ns_steps": 0}, ValueError, "ns_steps"),
    (Muon, {"ns_steps": "5"}, ValueError, "ns_steps"),
    (Muon, {"torch_arithmetic": "yes"}, TypeError, "torch_arithmetic"),
    (HypersphericalDescent, {"nesterov": None}, TypeError, "nesterov"),
])
def test_hyperparameters_refused_at_construction_not_at_the_first_step(cls, kwargs, error, pattern):
    """Each of these was accepted and failed at the first step() (or never), some with messages
    naming no argument; also refused when the model has no weight that would read it, and per group."""
    W = torch.nn.Parameter(torch.randn(6, 4))
    before = bits(W)
    with pytest.raises(error, match=pattern):
        cls([W], **kwargs)
    with pytest.raises(error, match=pattern):
        cls(torch.nn.LayerNorm(4), **kwargs)  # fallback parameters only
    assert torch.equal(bits(W), before)
    group_kwargs = {k: v for k, v in kwargs.items() if k not in ("fallback", "scale")}
    if group_kwargs:
        with pytest.raises(error, match=pattern):
            cls([{"params": [W], **group_kwargs}])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([torch.nn.Parameter(torch.randn(6, 4))])
        groups = len(opt.param_groups)
        with pytest.raises(error, match=pattern):
            opt.add_param_group({"params": [W], **group_kwargs})
        assert len(opt.param_groups) == groups and torch.equal(bits(W), before)


def test_valid_solver_options_still_accepted():
    W = torch.nn.Parameter(torch.randn(6, 4))
    g = make_opt("manifold_muon", [W], tol=0, max_iters=0).param_groups[0]
    assert (g["tol"], g["max_iters"]) == (0, 0)
    g = make_opt("manifold_muon", [W], tol=torch.tensor(1e-3), max_iters=5, nesterov=False, scale=2).param_groups[0]
    assert float(g["tol"]) == pytest.approx(1e-3) and (g["max_iters"], g["nesterov"], g["scale"]) == (5, False, 2.0)
    g = Muon([W], ns_schedule="svd", torch_arithmetic=False, ns_steps=None).param_groups[0]
    assert (g["ns_schedule"], g["torch_arithmetic"], g["ns_steps"]) == ("svd", False, None)
    b = torch.nn.Parameter(torch.randn(4))
    opt = Muon([W, b], ns_schedule="polar_express", ns_steps=3, fallback={"betas": [0.8, 0.9], "eps": 0.0})
    fallback = next(g for g in opt.param_groups if g["algorithm"] == "adamw")
    assert list(fallback["betas"]) == [0.8, 0.9] and fallback["eps"] == 0.0
    assert opt.param_groups[0]["ns_steps"] == 3


def _body_and_head():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    return body, torch.nn.Linear(8, 3)


def _quiet_add(opt, group):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*moved .* onto the")
        opt.add_param_group(group)


@pytest.mark.parametrize("kind", FAMILY)
def test_add_param_group_of_tensors_to_an_optimizer_built_from_modules(kind):
    """torch refused it ("all optimizer param groups should be with/without names"): the tensors
    now get the names describe() gives unnamed parameters, "param{k}" by position."""
    body, head = _body_and_head()
    opt = make_opt(kind, body.modules())
    _quiet_add(opt, {"params": list(head.parameters()), "lr": 0.01})
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names[-2:] == ["param4", "param5"] and len(set(names)) == len(names)
    head(body(torch.randn(2, 4))).sum().backward()
    opt.step()
    if kind != "muon":
        assert "param4" in opt.last_step_stats
    rows = {line.split()[0] for line in opt.describe().splitlines()[2:]}
    assert {"param4", "param5"} <= rows


@pytest.mark.parametrize("kind", FAMILY)
def test_add_param_group_of_modules_assigns_roles_per_layer(kind):
    body, head = _body_and_head()
    opt = make_opt(kind, body.modules())
    n = len(opt.param_groups)
    _quiet_add(opt, {"params": head.modules(), "lr": 0.01})  # also a module alone: {"params": head}
    added = {name: g for g in opt.param_groups[n:] for name in g["param_names"]}
    assert set(added) == {"weight", "bias"}
    assert added["bias"]["algorithm"] == "adamw" and added["weight"]["algorithm"] != "adamw"
    assert added["weight"]["lr"] == 0.01
    conv = torch.nn.Conv2d(2, 3, 2)
    _quiet_add(opt, {"params": conv})
    assert [g.get("flatten") for g in opt.param_groups if "weight_1" in g["param_names"]] == [True], \
        "a Conv weight is flattened as at construction; a taken name is made unique"
    # an optimizer without names takes the modules' parameters without names
    body, head = _body_and_head()
    opt = make_opt(kind, list(body.parameters()))
    _quiet_add(opt, {"params": [head]})
    assert not any("param_names" in g for g in opt.param_groups)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for m in (body, head) for p in m.parameters()}


def test_add_param_group_of_named_pairs_keeps_the_names():
    body, head = _body_and_head()
    opt = make_opt("manifold_muon", body.modules())
    _quiet_add(opt, {"params": [("head." + n, p) for n, p in head.named_parameters()]})
    assert [n for g in opt.param_groups for n in g["param_names"]][-2:] == ["head.weight", "head.bias"]


def test_add_param_group_refused_in_its_second_part_leaves_the_optimizer_as_it_was():
    """A group splits into one group per role; a refusal in any of them removes all."""
    body, head = _body_and_head()
    opt = make_opt("manifold_muon", body.modules())
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [head.weight, body[0].bias]})  # the bias is in already
    assert len(opt.param_groups) == n


def test_params_in_dict_groups_may_be_modules():
    body, head = _body_and_head()
    opt = make_opt("manifold_muon", [{"params": body.modules()}, {"params": head, "lr": 0.01},
                                     {"params": [torch.nn.Parameter(torch.randn(5))]}])
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names == ["0.weight", "2.weight", "0.bias", "2.bias", "weight", "bias", "param6"]


def test_a_non_finite_weight_is_refused_by_name_with_nothing_changed():
    """A NaN weight raised a bare LinAlgError from the projection's eigh, naming no parameter."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    with torch.no_grad():
        net[1].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"cannot move 1\.weight .* NaN or infinite"):
        make_opt("manifold_muon", net.modules())
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p.isnan(), q.isnan()) and torch.equal(p.nan_to_num(), q.nan_to_num())


@pytest.mark.parametrize("form", ["modules", "parameters", "named_parameters"])
def test_lazy_modules_are_refused_until_initialised(form):
    """Roles depend on shapes: a LazyLinear's parameters gave torch's message from deep inside the
    role table (or the projection); the refusal names them and says what to do."""
    net = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    params = {"modules": net.modules(), "parameters": net.parameters(), "named_parameters": net.named_parameters()}[form]
    with pytest.raises(ValueError, match="lazy module .* not initialised .* one forward pass"):
        ManifoldMuon(params, lr=0.1)
    net(torch.randn(2, 5))
    assert make_opt("manifold_muon", net.modules()).param_groups  # once initialised, it builds


def test_an_all_zero_weight_is_moved_with_a_warning_that_says_so():
    """A zero-initialised layer has no nearest point on the manifold; the warning said only
    "distance was 1"."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    torch.nn.init.zeros_(net[1].weight)
    with pytest.warns(UserWarning, match=r"1\.weight → stiefel \(distance was 1; it was all zeros.*arbitrary point") \
            as caught:
        ManifoldMuon(net.modules(), lr=0.1, solver="projected")
    lines = [line for w in caught for line in str(w.message).splitlines() if "0.weight" in line]
    assert lines and not any("all zeros" in line for line in lines)
    assert net[1].weight.any(), "it is a point of the manifold now"


@pytest.mark.parametrize("form", ["module", "tensors"])
def test_a_groups_lr_is_for_its_constrained_weights_not_their_biases(form):
    """{"params": m[2], "lr": 0.2} ran m[2].bias with AdamW at lr 0.2 (a spectral step length
    taken as an AdamW lr); it takes the fallback's lr. A group of biases alone sets their lr."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    head = m[2] if form == "module" else [m[2].weight, m[2].bias]
    opt = make_opt("manifold_muon", [{"params": head, "lr": 0.2}, {"params": [m[0].bias], "lr": 0.03}],
                   fallback={"lr": 1e-3, "betas": (0.8, 0.9)})
    lrs = {(g["algorithm"], len(g["params"])): g["lr"] for g in opt.param_groups}
    assert lrs[("manifold_muon", 1)] == 0.2
    fallback = [g for g in opt.param_groups if g["algorithm"] == "adamw"]
    assert [g["lr"] for g in fallback] == [1e-3, 0.03], "head's bias: the fallback lr; a bias-only group: its own"
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in fallback)
    b0 = m[2].bias.detach().clone()
    m(torch.randn(16, 4)).sum().backward()
    opt.step()
    assert float((m[2].bias - b0).abs().max()) <= 1.01e-3, "AdamW's first step moves each entry by about its lr"


def test_a_deep_model_gets_one_construction_warning_naming_every_moved_weight():
    """A 6-layer transformer gave 44 "moved … onto" warnings, one per weight."""
    from modman.toy import TinyCausalLM

    model = TinyCausalLM(32, 16, 6, 2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ManifoldMuon(model.modules(), lr=0.1, solver="projected", budget="uniform")
    moved = [str(w.message) for w in caught if "onto their manifolds" in str(w.message) or "onto the" in str(w.message)]
    assert len(moved) == 1
    lines = moved[0].splitlines()
    matrices = sum(p.ndim >= 2 for p in model.parameters())  # 7 per layer, the embedding and the head
    assert f"moved {matrices} weights onto their manifolds" in lines[0]
    assert len(lines) == 1 + matrices and all("(distance was " in line for line in lines[1:])


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("key", ["maximize", "capturable", "fused", "differentiable"])
def test_torch_flags_in_a_group_are_refused_not_ignored(kind, key):
    """torch's optimizers take maximize/capturable/fused/differentiable; modman's do not. As
    constructor arguments they are a TypeError (as for torch.optim.Muon); in a param group they
    were stored and ignored — maximize=True on the AdamW fallback descended where torch.optim.AdamW
    ascends (a user probe). Refused by name, at construction and in add_param_group, nothing
    added; False stays accepted."""
    W, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=f"{key}=True is not supported"):
        make_opt(kind, [{"params": [W]}, {"params": [b], key: True}])
    opt = make_opt(kind, [{"params": [W], key: False}])
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=f"{key}=True is not supported"):
        opt.add_param_group({"params": [b], key: True})
    assert len(opt.param_groups) == groups
    saved = opt.state_dict()
    saved["param_groups"][0][key] = True
    with pytest.raises(ValueError, match=f"state dict: {key}=True is not supported"):
        opt.load_state_dict(saved)
    opt.param_groups[0][key] = True  # set later: refused by the step, nothing changed
    W.grad = torch.ones_like(W)
    before = W.detach().clone()
    with pytest.raises(ValueError, match=f"{key}=True is not supported"):
        opt.step()
    assert torch.equal(W.detach(), before) and not opt.state


@pytest.mark.parametrize("cls", [ManifoldMuon, Muon, HypersphericalDescent])
@pytest.mark.parametrize("manifold, shape", [("stiefel", (6,)), ("stiefel", (4, 0)), ("sphere", (0,))])
def test_a_manifold_asked_for_a_parameter_it_cannot_hold_is_refused_by_its_name(cls, manifold, shape):
    """HypersphericalDescent runs "stiefel" as row spheres: a bias asked onto Stiefel went onto one
    sphere; Muon named the manifold it maps "stiefel" to ('euclidean')."""
    W = torch.nn.Parameter(torch.randn(5, 3))
    p = torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=rf"manifold '{manifold}' needs a non-empty .*; odd has shape"):
        cls([{"params": [("w", W)]}, {"params": [("odd", p)], "manifold": manifold}])
    # unnamed: by its place in the group ("a parameter" named none of several; a probe)
    with pytest.raises(ValueError, match=rf"needs a non-empty .*; the group's parameter 1 has shape"):
        cls([{"params": [torch.nn.Parameter(torch.randn(4, 3)), p], "manifold": manifold}])


@pytest.mark.parametrize("cls", [ManifoldMuon, Muon, HypersphericalDescent])
@pytest.mark.parametrize("form", ["modules", "parameters"])
def test_empty_weights_go_to_the_fallback_and_the_step_runs(cls, form):
    """A Linear(0, 4) weight went onto Stiefel, and ManifoldMuon's step raised "W and G are empty"
    after the weights before it were updated."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(0, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model.modules() if form == "modules" else model.parameters(), lr=0.05)
    roles = {id(p): g["algorithm"] for g in opt.param_groups for p in g["params"]}
    assert roles[id(model[1].weight)] == "adamw" and roles[id(model[0].weight)] != "adamw"
    before = model[0].weight.detach().clone()
    model[0](torch.randn(8, 3)).sum().backward()
    model[1].weight.grad = torch.zeros(4, 0)
    opt.step()
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("cls", [ManifoldMuon, HypersphericalDescent])
@pytest.mark.parametrize("form", ["modules", "parameters"])
def test_a_meta_device_model_is_refused_naming_what_reads_the_values(cls, form):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    params = model.modules() if form == "modules" else model.parameters()
    # (it offered project_on_init=False, which builds an optimizer of the meta tensors: to_empty then
    # replaces the parameters, and that optimizer stepped nothing, silently; a probe)
    with pytest.raises(ValueError, match="meta device .*once the weights are materialised .*to_empty replaces"):
        cls(params)
    kw = dict(budget="uniform") if cls is ManifoldMuon else {}
    opt = cls(model.modules(), project_on_init=False, **kw)  # still builds (for swapped-in-place materialisation)
    assert any(g["algorithm"] != "adamw" for g in opt.param_groups)


@pytest.mark.parametrize("cls", [ManifoldMuon, HypersphericalDescent])
def test_weight_decay_shows_zero_where_the_norm_is_fixed_added_groups_too(cls):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls([{"params": model[0].modules(), "weight_decay": 0.3}])
        opt.add_param_group({"params": model[1].modules(), "weight_decay": 0.3})
    shown = sorted((g["algorithm"], g["weight_decay"]) for g in opt.param_groups)
    assert all(wd == (0.3 if alg == "adamw" else 0.0) for alg, wd in shown), shown


@pytest.mark.parametrize("cls", [ManifoldMuon, Muon])
@pytest.mark.parametrize("how", ["roles", "group"])
def test_an_empty_weight_given_a_constrained_role_is_refused_at_construction(cls, how):
    """roles= or a group's manifold sent a Linear(0, 4) weight to a constrained step, which raised
    ("W and G are empty", or a ZeroDivisionError) after updating the weights before it."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(0, 4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"1\.weight of shape \(4, 0\) is empty"):
        if how == "roles":
            cls(model.modules(), roles={"1.weight": "stiefel" if cls is ManifoldMuon else "euclidean"})
        else:
            cls([{"params": [("0.weight", model[0].weight)]},
                 {"params": [("1.weight", model[1].weight)], "manifold": "euclidean"}])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_named_modules_are_taken_as_the_modules():
    """ManifoldMuon(model.named_modules()) raised torch's "optimizer can only optimize Tensors, but
    one of the params is …Sequential", which did not say that modules() was meant."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Embedding(7, 6), torch.nn.LayerNorm(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named, plain = ManifoldMuon(model.named_modules()), ManifoldMuon(model.modules())
    layout = [[(g["param_names"], g["manifold"], g["algorithm"]) for g in opt.param_groups] for opt in (named, plain)]
    assert layout[0] == layout[1]
    assert {g["manifold"] for g in named.param_groups} == {"stiefel", "sphere", "euclidean"}


@pytest.mark.parametrize("native, ns_dtype, warns", [(False, "bfloat16", True), (True, "bfloat16", False),
                                                     (None, "bfloat16", False), (False, "float32", False)])
def test_muon_says_when_bf16_newton_schulz_is_emulated_on_this_cpu(monkeypatch, native, ns_dtype, warns):
    """torch.optim.Muon's bf16 arithmetic (modman.Muon's default) is emulated on a CPU without
    avx512_bf16/AMX: ~50× slower than fp32 (solvers_h1024.json), which a user met as 12.7 s steps."""
    import modman.optim.family as family

    monkeypatch.setattr(family, "native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Muon(torch.nn.Linear(8, 4).modules(), ns_dtype=ns_dtype)
    emulated = [w for w in caught if "emulated" in str(w.message)]
    assert len(emulated) == int(warns)
    if warns:
        assert "ns_dtype='float32'" in str(emulated[0].message)


def test_native_bf16_reads_the_cpu_flags(tmp_path, monkeypatch):
    import modman._cpu as cpu

    info = tmp_path / "cpuinfo"
    for flags, want in (("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True), ("amx_tile amx_bf16", True)):
        info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
        monkeypatch.setattr(cpu, "_CPUINFO", str(info))
        assert cpu.native_bf16() is want and cpu.cpu_info()[0] == "Some CPU"
    monkeypatch.setattr(cpu, "_CPUINFO", str(tmp_path / "absent"))
    assert cpu.native_bf16() is None


def test_muon_warns_for_an_added_bf16_group_too(monkeypatch):
    import modman.optim.family as family

    monkeypatch.setattr(family, "native_bf16", lambda: False)
    opt = Muon([torch.nn.Parameter(torch.randn(4, 3))], ns_dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, 3))], "ns_dtype": "bfloat16"})
    assert sum("emulated" in str(w.message) for w in caught) == 1


def test_building_with_zero_imported_keeps_no_deleted_local_alive():
    """The ZeRO check read every calling frame's locals, and on Python 3.11–3.12 that snapshot
    kept a variable the caller deleted alive until the caller returned (a review)."""
    import gc
    import weakref

    import torch.distributed.optim  # noqa: F401  (imports ZeRO's module: the check then runs)

    class Big:
        pass

    big = Big()
    ref = weakref.ref(big)
    ManifoldMuon(torch.nn.Linear(4, 3).modules())
    del big
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_muon_steps_with_the_exact_svd_schedule(ns_dtype):
    """ns_schedule='svd' with torch_arithmetic=False is accepted at construction, but Muon's
    default ns_steps=5 made msign refuse the step (a review): the SVD has no steps."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Muon(lin.modules(), ns_schedule="svd", torch_arithmetic=False, ns_dtype=ns_dtype, weight_decay=0.0,
                   lr=0.1)
    before = lin.weight.detach().clone()
    (lin(torch.randn(8, 6)) * torch.randn(8, 4)).sum().backward()  # a gradient of full rank 4
    opt.step()
    step = (before - lin.weight.detach()).double()
    # an exact polar factor scaled by lr·√max(1, d_out/d_in): every singular value the same
    sv = torch.linalg.svdvals(step)
    assert float((sv - sv[0]).abs().max()) <= 1e-6 and sv[0].item() == pytest.approx(0.1, rel=1e-5, abs=0)


def test_construction_checks_groups_against_a_running_set_not_every_earlier_group(monkeypatch):
    """torch's add_param_group gathers every earlier group's parameters for each new one: quadratic
    over one group per matrix (2000 layers spent 3.0 of 3.5 s there, a probe). At construction
    torch sees each group alone; the cross-group checks still refuse what torch refuses."""
    seen = []
    original = torch.optim.Optimizer.add_param_group

    def spy(self, group):
        seen.append(len(self.param_groups))
        return original(self, group)

    monkeypatch.setattr(torch.optim.Optimizer, "add_param_group", spy)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    opt = ManifoldMuon(model.modules())
    assert len(opt.param_groups) == 7 and set(seen) == {0}
    # later groups are checked by torch against all the others, as before
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight], "algorithm": "adamw"})
    W = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        ManifoldMuon([{"params": [W]}, {"params": [W]}])


def test_construction_keeps_torchs_names_check_and_a_nan_in_any_dtype_is_found():
    W, V = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="with/without names"):  # (it built, then every add_param_group failed)
        ManifoldMuon([{"params": [W], "param_names": ["w"]}, {"params": [V]}])
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float32))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = ManifoldMuon([{"params": [a, b], "algorithm": "adamw"}])
    before = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
