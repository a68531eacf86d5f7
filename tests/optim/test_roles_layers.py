"""Roles of layers beyond Linear/Conv/Embedding (roles.py's table), found by a user probe of
``ManifoldMuon(model.modules())``: transformers' GPT-2 Conv1D went to the AdamW fallback (the
whole of GPT-2 under Muon), EmbeddingBag too, non-expert 3-D tensors became expert stacks,
1×1 "manifolds" that cannot move were constrained, every fallback matrix went unreported, and
a roles= typo was ignored."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import modman
from modman.optim.roles import assign_modules, expand_modules

FALLBACK = ("euclidean", "adamw")
STIEFEL = ("stiefel", "manifold_muon")
SPHERE = ("sphere", "hyperspherical")


def _roles(opt):
    return {n: (g["manifold"], g["algorithm"]) for g in opt.param_groups for n in g["param_names"]}


def _build(model, cls=modman.ManifoldMuon, **kw):
    """The optimizer on model.modules() and the fallback warnings it gave (construction's
    "moved … onto" warnings are not what these tests are about)."""
    if cls is modman.ManifoldMuon:
        kw = {"solver": "projected", "budget": "uniform", **kw}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls(model.modules(), **kw)
    return opt, [w for w in caught if "AdamW fallback" in str(w.message)]


def _step_alike(pairs, x, r, steps: int = 2) -> None:
    """Step each (module, optimizer) pair on the loss ⟨m(x), r⟩, whose gradient rᵀx is generic and
    full rank (‖m(x)‖² would give W·xᵀx, normal to the manifold, plus a rank-1 tangent part)."""
    pairs = list(pairs)
    for _ in range(steps):
        for m, opt in pairs:
            opt.zero_grad()
            (m(x) * r).sum().backward()
            opt.step()


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _train_gpt2(model, opt, steps):
    """A few language-model steps on one fixed batch; the model's parameters by name."""
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return dict(model.named_parameters())


CONV1D_WEIGHTS = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                  "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


def test_gpt2_conv1d_weights_are_stiefel_and_stay_on_it_while_training():
    model = _tiny_gpt2()
    opt, fallback_warnings = _build(model, lr=0.02)
    roles = _roles(opt)
    for name in CONV1D_WEIGHTS:
        assert roles[name] == STIEFEL, name
    assert roles["transformer.wte.weight"] == SPHERE and roles["transformer.wpe.weight"] == SPHERE
    assert roles["transformer.h.0.attn.c_attn.bias"] == FALLBACK
    assert roles["transformer.h.0.ln_1.weight"] == FALLBACK
    assert fallback_warnings == [], "every GPT-2 matrix has a constrained role"
    # Conv1D stores its weight (in, out) = (nx, nf): the optimizer sees it through its transpose
    views = {a.name: a.view for a in assign_modules(expand_modules([model]))}
    assert {n for n, v in views.items() if v == "transposed"} == set(CONV1D_WEIGHTS)
    table = {line.split()[0]: line for line in opt.describe().splitlines()[2:]}
    assert all("of the transpose" in table[n] for n in CONV1D_WEIGHTS)  # (shown as stored, in × out)
    assert not any("transpose" in line for n, line in table.items() if n not in CONV1D_WEIGHTS)

    params = _train_gpt2(model, opt, 3)
    for name in CONV1D_WEIGHTS:
        s = torch.linalg.svdvals(params[name].detach().double())
        assert float((s - 1).abs().max()) <= 1e-5, (name, s)
    assert set(CONV1D_WEIGHTS) <= set(opt.last_step_stats), "stepped on the manifold, not by AdamW"


def test_gpt2_under_muon_steps_the_conv1d_weights_with_muon():
    opt, _ = _build(_tiny_gpt2(), cls=modman.Muon)
    roles = _roles(opt)
    for name in CONV1D_WEIGHTS:
        assert roles[name] == ("euclidean", "muon"), name


def test_embedding_bag_rows_are_spheres_like_embedding_rows():
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 3))
    opt, _ = _build(model)
    assert _roles(opt)["0.weight"] == SPHERE
    rows = model[0].weight.detach().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(10), rtol=0, atol=1e-6)


class _VitLikeEmbeddings(nn.Module):
    """ViT's token and position tables (one matrix each, not stacks), an nn.Bilinear, expert
    stacks with their per-expert biases (E, 1, d)."""

    def __init__(self, d=8, experts=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.randn(1, 17, d))
        self.bilinear = nn.Bilinear(d, d, 4)
        self.w_in = nn.Parameter(torch.randn(experts, 2 * d, d))
        self.b_in = nn.Parameter(torch.zeros(experts, 1, 2 * d))


def test_only_real_expert_stacks_are_batched_stiefel():
    opt, _ = _build(_VitLikeEmbeddings())
    roles = _roles(opt)
    assert roles["cls_token"] == FALLBACK
    assert roles["position_embeddings"] == FALLBACK
    assert roles["bilinear.weight"] == FALLBACK
    assert roles["b_in"] == FALLBACK
    assert roles["w_in"] == STIEFEL


def test_per_expert_biases_are_not_listed_as_matrices_sent_to_the_fallback():
    """GPT-OSS's gate_up_proj_bias (E, out) was named among "parameter(s) of ≥ 2 dims" going to the
    fallback (noise: it is a bias); a bare matrix still is."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 8))
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 16))
            self.mixing = nn.Parameter(torch.randn(4, 4))

    opt, fallback_warnings = _build(Experts())
    assert _roles(opt)["gate_up_proj_bias"] == FALLBACK
    [message] = [str(w.message) for w in fallback_warnings]
    assert "mixing" in message and "gate_up_proj_bias" not in message and message.startswith("1 parameter")


def test_mixtral_experts_are_still_batched_stiefel():
    """A guard for the tightened rule (it passes on the old code too): transformers' Mixtral
    experts, (E, 2·d_ff, d) and (E, d, d_ff), stay stacks of Stiefel matrices."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)
    model = transformers.MixtralForCausalLM(config)
    stacks = [n for n, p in model.named_parameters() if p.ndim == 3]
    opt, _ = _build(model)
    roles = _roles(opt)
    assert len(stacks) >= 2
    for name in stacks:
        assert roles[name] == STIEFEL, name


def _degenerate():
    return nn.Sequential(nn.Linear(1, 1), nn.Conv2d(1, 1, 1), nn.Embedding(5, 1), nn.Linear(1, 3))


def test_one_by_one_matrices_and_dim_1_embeddings_go_to_the_fallback_unless_asked():
    opt, fallback_warnings = _build(_degenerate())
    roles = _roles(opt)
    assert roles["0.weight"] == FALLBACK, "a 1×1 matrix: the Stiefel manifold is ±1"
    assert roles["1.weight"] == FALLBACK, "Conv2d(1, 1, 1): 1×1 once flattened"
    assert roles["2.weight"] == FALLBACK, "rows on the sphere S⁰ = ±1"
    assert roles["3.weight"] == STIEFEL, "3×1: a sphere S², room to move"
    assert len(fallback_warnings) == 1
    assert all(name in str(fallback_warnings[0].message) for name in ("0.weight", "1.weight", "2.weight"))
    # no advice to constrain a ±1 manifold (a review found roles={Linear: "stiefel"} suggested)
    assert '"stiefel"' not in str(fallback_warnings[0].message)
    asked, _ = _build(_degenerate(), roles={"0.weight": "stiefel", nn.Conv2d: "stiefel", "2.weight": "sphere"})
    roles = _roles(asked)
    assert roles["0.weight"] == STIEFEL and roles["1.weight"] == STIEFEL and roles["2.weight"] == SPHERE


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 4))  # a bare 2-D parameter


class _LoRALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)


def _unreported_model():
    return nn.ModuleDict({
        "attn": nn.MultiheadAttention(8, 2),
        "lstm": nn.LSTM(4, 4),
        "gru": nn.GRU(4, 4),
        "up": nn.ConvTranspose1d(2, 3, 3),
        "wn": parametrizations.weight_norm(nn.Linear(4, 4)),
        "custom": _Custom(),
        "one": nn.Linear(1, 1),
        "lora": _LoRALinear(),
        "norm": nn.LayerNorm(8),
    })


def test_matrices_sent_to_the_fallback_are_reported_in_one_warning():
    model = _unreported_model()
    opt, fallback_warnings = _build(model)
    expected = {"attn.in_proj_weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "gru.weight_ih_l0",
                "gru.weight_hh_l0", "up.weight", "wn.parametrizations.weight.original0",
                "wn.parametrizations.weight.original1", "custom.table", "one.weight"}
    roles = _roles(opt)
    assert {n for n, p in model.named_parameters() if p.ndim >= 2 and roles[n] == FALLBACK} == expected
    assert roles["lora.lora_B.default.weight"] == ("euclidean", "muon")
    assert len(fallback_warnings) == 1, [str(w.message) for w in fallback_warnings]
    message = str(fallback_warnings[0].message)
    assert message.startswith(f"{len(expected)} parameter"), message
    assert "attn.in_proj_weight (MultiheadAttention" in message and "lstm.weight_ih_l0 (LSTM" in message
    assert 'roles={MultiheadAttention: "stiefel"}' in message and '"attn.in_proj_weight": "stiefel"' in message
    assert "lora_B" not in message and "norm.weight" not in message and "in_proj_bias" not in message
    # giving them the fallback explicitly keeps them there, silently
    opt, fallback_warnings = _build(_unreported_model(), roles={name: "fallback" for name in expected})
    assert fallback_warnings == []


def test_the_fallback_warning_names_the_users_line():
    """Construction and add_param_group reach roles.py at different depths: the warning still
    points at the line that called the optimizer, not at modman."""
    with pytest.warns(UserWarning, match="AdamW fallback") as record:
        opt = modman.ManifoldMuon(nn.Sequential(nn.LSTM(4, 4)).modules(), solver="projected", budget="uniform")
    assert [w.filename for w in record if "of ≥ 2 dims go to" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match="AdamW fallback") as record:
        opt.add_param_group({"params": nn.Sequential(nn.GRU(4, 4)).modules()})
    assert [w.filename for w in record if "of ≥ 2 dims go to" in str(w.message)] == [__file__]


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_roles_names_and_modules_that_match_nothing_are_refused():
    model = _Tied()
    with pytest.raises(ValueError, match=re.escape("['body.wieght']")) as err:
        _build(model, roles={"body.wieght": "euclidean"})
    assert "body.weight" in str(err.value), "the name meant is suggested"
    with pytest.raises(ValueError, match="not among the given modules"):
        _build(model, roles={nn.Linear(4, 4): "euclidean"})
    # a frozen parameter's name and a class the model lacks are not typos
    opt, _ = _build(model, roles={"frozen.weight": "fallback", nn.Conv2d: "fallback", model.body: "euclidean"})
    assert _roles(opt)["body.weight"] == ("euclidean", "muon")
    # a tied weight's second name is one of its names: the role applies to it
    opt, _ = _build(model, roles={"head.weight": "stiefel"})
    assert _roles(opt)["emb.weight"] == STIEFEL


def test_gpt2_conv1d_with_rms_scale_reads_d_out_from_the_last_dim():
    """scale="rms" puts the singular values at √(d_out/d_in); Stiefel reads (out, in) from a torch
    layout, and Conv1D stores (in, out): c_fc (16 → 64) came out at 0.5 instead of 2."""
    model = _tiny_gpt2()
    opt, _ = _build(model, lr=0.02, scale="rms")
    params = _train_gpt2(model, opt, 2)
    for name in CONV1D_WEIGHTS:
        W = params[name].detach().double()
        s = torch.linalg.svdvals(W)
        want = (W.shape[1] / W.shape[0]) ** 0.5  # (nx, nf) = (d_in, d_out)
        assert float((s / want - 1).abs().max()) <= 1e-5, (name, want, s)


@pytest.mark.parametrize("nx, nf", [(8, 32), (32, 8)])
@pytest.mark.parametrize("cls, kw", [(modman.ManifoldMuon, {"solver": "projected", "budget": "uniform", "scale": "rms"}),
                                     (modman.ManifoldMuon, {"solver": "closed_form", "budget": "uniform"}),
                                     (modman.Muon, {"weight_decay": 0.0}), (modman.HypersphericalDescent, {})],
                         ids=["manifold_muon_rms", "manifold_muon", "muon", "hyperspherical"])
def test_a_conv1d_steps_as_the_linear_it_is_stored_transposed(nx, nf, cls, kw):
    """Conv1D stores (in, out); every optimizer must see (out, in) as for nn.Linear: Hyperspherical
    normalised each input's weights instead of each output neuron's (0.68 off the Linear after one
    step), Muon's lr ratio √max(1, d_out/d_in) was inverted (1.9e-2 off)."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    c, lin = conv1d(nf, nx), nn.Linear(nx, nf)
    with torch.no_grad():
        c.weight.normal_()
        lin.weight.copy_(c.weight.T)
        lin.bias.copy_(c.bias)
    # a generic full-rank gradient rᵀx (‖m(x)‖² would give W·xᵀx, normal to the manifold, plus a
    # rank-1 tangent part: a face of optimal steps, where the two layouts' rounding picks different points)
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(64, nx, generator=g), torch.randn(64, nf, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [cls(nn.Sequential(m).modules(), lr=0.05, **kw) for m in (c, lin)]
    _step_alike(zip((c, lin), opts), x, r)
    torch.testing.assert_close(c.weight.detach().T, lin.weight.detach(), rtol=1e-5, atol=1e-6)
    assert opts[0].state[c.weight]["momentum"].shape == c.weight.shape


class _Experts(nn.Module):
    """A mixture's expert stack as transformers writes one: (E, in, out) applied as x @ W[e] when
    ``is_transposed`` (GPT-OSS), (E, out, in) applied as F.linear otherwise; ``has_gate`` and
    ``is_transposed`` are the attributes transformers' use_experts_implementation sets."""
    has_gate = False

    def __init__(self, W_out_in: torch.Tensor, is_transposed: bool):
        super().__init__()
        self.is_transposed = is_transposed
        self.w = nn.Parameter(W_out_in.mT.clone() if is_transposed else W_out_in.clone())

    def forward(self, x):  # x: (E, batch, in)
        return x @ self.w if self.is_transposed else x @ self.w.mT


@pytest.mark.parametrize("d_in, d_out", [(8, 24), (24, 8)])
@pytest.mark.parametrize("cls, kw", [(modman.ManifoldMuon, {"solver": "projected", "budget": "uniform", "scale": "rms"}),
                                     (modman.Muon, {"weight_decay": 0.0}), (modman.HypersphericalDescent, {})],
                         ids=["manifold_muon_rms", "muon", "hyperspherical"])
def test_an_expert_stack_stored_in_out_steps_as_the_one_stored_out_in(d_in, d_out, cls, kw):
    """GPT-OSS stores its experts (E, in, out): scale="rms" gave gate_up_proj singular values
    √(in/out) = 0.58 instead of 1.73, Hyperspherical normalised inputs' weights, Muon's lr ratio
    was inverted (a probe). Its is_transposed stacks are seen through their transpose."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, d_out, d_in, generator=g)
    a, b = _Experts(W, is_transposed=True), _Experts(W, is_transposed=False)
    x, r = torch.randn(3, 32, d_in, generator=g), torch.randn(3, 32, d_out, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [cls(m.modules(), lr=0.05, **kw) for m in (a, b)]
    assert [g["algorithm"] for g in opts[0].param_groups] == [g["algorithm"] for g in opts[1].param_groups] != ["adamw"]
    _step_alike(zip((a, b), opts), x, r)
    torch.testing.assert_close(a.w.detach().mT, b.w.detach(), rtol=1e-5, atol=1e-6)
    if kw.get("scale") == "rms":
        s = torch.linalg.svdvals(b.w.detach().double())
        torch.testing.assert_close(s, torch.full_like(s, (d_out / d_in) ** 0.5), rtol=1e-5, atol=0)


def test_one_roles_serves_param_groups_of_modules():
    """roles= is checked against the modules of every group together: a key of one group's module
    is no stranger to the others (it raised "not among the given modules" per group)."""
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon([{"params": body.modules()}, {"params": head.modules(), "lr": 0.2}],
                                  solver="projected", roles={head: "euclidean", "0.weight": "stiefel"})
    algorithms = {n: g["algorithm"] for g in opt.param_groups for n in g["param_names"]}
    assert algorithms["weight"] == "muon" and algorithms["0.weight"] == "manifold_muon"
    with pytest.raises(ValueError, match="names no parameter"):
        modman.ManifoldMuon([{"params": body.modules()}, {"params": head.modules()}], roles={"0.wieght": "stiefel"})
    with pytest.raises(ValueError, match="roles= needs modules"):
        modman.ManifoldMuon(list(body.parameters()), roles={nn.Linear: "euclidean"})  # ignored before


@pytest.mark.parametrize("cls, role", [(modman.Muon, "sphere"), (modman.HypersphericalDescent, "euclidean")])
def test_a_role_the_optimizer_does_not_run_is_refused(cls, role):
    """Muon(roles={nn.Linear: "sphere"}) stepped the Linear with AdamW, silently."""
    with pytest.raises(ValueError, match=f"has no '{role}' role .*0.weight"):
        cls(nn.Sequential(nn.Linear(4, 4)).modules(), roles={nn.Linear: role})


def test_a_sparse_embedding_is_refused_at_construction():
    """Embedding(sparse=True) was accepted and refused at the first step."""
    with pytest.raises(TypeError, match=r"0\.weight: Embedding\(sparse=True\)"):
        modman.ManifoldMuon(nn.Sequential(nn.Embedding(10, 4, sparse=True)).modules())


def test_adding_unfrozen_layers_reports_only_the_new_fallback_matrices():
    """add_param_group({"params": model.modules()}) after unfreezing reported again the fallback
    matrices already in the optimizer."""
    model = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 4))
    model[1].requires_grad_(False)
    with pytest.warns(UserWarning, match="AdamW fallback"):
        opt = modman.ManifoldMuon(model.modules(), solver="projected", budget="uniform")
    model[1].requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.add_param_group({"params": model.modules()})
    assert not [w for w in caught if "AdamW fallback" in str(w.message)]
    assert [w.filename for w in caught if "moved 1.weight" in str(w.message)] == [__file__], \
        "the construction warning names the user's line from add_param_group too"


def test_a_model_with_nothing_to_constrain_says_so():
    """A model of norms and biases only became AdamW at the fallback's lr without a word."""
    model = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="no parameter of the given modules has a constrained role; all 4 go"):
        opt = modman.ManifoldMuon(model.modules(), lr=0.1)
    assert [g["algorithm"] for g in opt.param_groups] == ["adamw"]


class _GptOssLikeExperts(nn.Module):
    """transformers' experts layout with is_transposed: (E, in, out) stacks and (E, out) biases."""
    has_gate = True
    is_transposed = True

    def __init__(self, E=3, d_in=8, d_out=24):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, d_in, d_out))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, d_out))


def test_only_transformers_experts_stacks_are_read_transposed():
    """is_transposed alone (no has_gate) is not transformers' mark; the (E, out) bias is no stack."""
    from modman.optim.roles import matrix_view

    class NotExperts(nn.Module):
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 24))

    m, e = NotExperts(), _GptOssLikeExperts()
    assert matrix_view(m, "w", m.w) is None
    assert matrix_view(e, "gate_up_proj", e.gate_up_proj) == "transposed"
    assert matrix_view(e, "gate_up_proj_bias", e.gate_up_proj_bias) is None


def test_a_checkpoint_of_transposed_experts_from_before_their_view_loads():
    """Saved with flatten=None (read (E, in, out) as stored) it was refused as another structure: the
    momentum (the weight's shape) carries over, the solver's warm start is dropped (a review)."""
    torch.manual_seed(0)
    e = _GptOssLikeExperts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon(e.modules(), lr=0.05, budget="uniform")
    x, r = torch.randn(3, 16, 8), torch.randn(3, 16, 24)
    _step_alike([(lambda x: x @ e.gate_up_proj + e.gate_up_proj_bias[:, None], opt)], x, r, steps=1)
    sd = opt.state_dict()
    group = next(g for g in sd["param_groups"] if g["algorithm"] == "manifold_muon")
    assert group["flatten"] == "transposed"
    group["flatten"] = None  # as saved before
    pid = group["params"][0]
    momentum = sd["state"][pid]["momentum"].clone()
    opt.load_state_dict(sd)
    state = opt.state[e.gate_up_proj]
    assert torch.equal(state["momentum"], momentum) and set(state) == {"momentum"}
    _step_alike([(lambda x: x @ e.gate_up_proj + e.gate_up_proj_bias[:, None], opt)], x, r, steps=1)
