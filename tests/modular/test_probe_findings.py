"""Regressions from a user-level probe of modman.modular: products at input bound ρ, frozen
parameters, layers listed twice in nn.Sequential, fx arithmetic (c / h, alpha, rounding_mode),
declarations that forget a weight, dropout, and the budget's spread warning.

Oracles: torch.func.jvp on the torch model (helpers.output_change, helpers.aligned_search) and
hand computations of the composition rules (module.py's docstring)."""
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jvp

from modman.manifolds import Stiefel
from modman.modular import (ModularError, activation, budget, budget_table, compose, declare, from_torch)
from modman.modular.convert import convert
from modman.optim import ManifoldMuon
from modman.toy.model import TinyCausalLM

from .helpers import aligned_search, output_change, put_on_manifold, unit_rms
from .models import mlp

TOL = 1 + 1e-6


# ------------------------------------------------------------------ products at input bound ρ
class Gated(nn.Module):
    """h = a·A(x); out = D(B(h) ⊙ C(h)) — a scalar product (width 1), where ‖b ⊙ c‖ = ‖b‖‖c‖ exactly."""

    def __init__(self, d_in=64, a=1.0):
        super().__init__()
        self.A = nn.Linear(d_in, 1, bias=False)
        self.B = nn.Linear(1, 1, bias=False)
        self.C = nn.Linear(1, 1, bias=False)
        self.D = nn.Linear(1, 1, bias=False)
        self.a = a

    def forward(self, x):
        h = self.A(x) * self.a
        return self.D(self.B(h) * self.C(h))


class ScalarGate(nn.Module):
    """h = a·A(x); out = D(g(h) · V(h)) with a scalar gate g (broadcast): ‖g v‖_RMS = |g|·‖v‖_RMS."""

    def __init__(self, d_in, width, d_out, a):
        super().__init__()
        self.A = nn.Linear(d_in, width, bias=False)
        self.G = nn.Linear(width, 1, bias=False)
        self.V = nn.Linear(width, width, bias=False)
        self.D = nn.Linear(width, d_out, bias=False)
        self.a = a

    def forward(self, x):
        h = self.A(x) * self.a
        return self.D(torch.tanh(self.G(h)) * self.V(h))


def test_product_sensitivity_at_its_input_bound():
    """The probe's case: A: 64 → 1 (sensitivity √64 = 8 unscaled), then B(h)·C(h) at |h| ≤ 8. The
    product's constant there is 1·8 + 1·8 = 16, the tree's 8·16 = 128 — the jvp value along the
    worst input. Perturbing A alone changed the output by 2× its modular norm before."""
    torch.manual_seed(0)
    model = Gated().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(Stiefel().project(torch.randn_like(p)))
    tree = from_torch(model)
    a = model.A.weight.detach()[0]
    x = (a / a.norm() * 8).unsqueeze(0)  # unit RMS, along A's row
    with torch.no_grad():
        _, dy = jvp(model, (x,), (x,))
    assert float(dy.abs().max()) == pytest.approx(128.0)
    assert tree.sensitivity == pytest.approx(128.0)
    dA = (a / a.norm()).unsqueeze(0)
    change = float(output_change(model, x, {"A.weight": dA}).abs().max())
    assert change == pytest.approx(128.0)
    assert change <= float(tree.norm({"A.weight": dA})) * TOL


@settings(max_examples=10)
@given(d_in=st.integers(1, 8), width=st.integers(1, 6), d_out=st.integers(1, 5),
       a=st.sampled_from([0.5, 3.0, -4.0]), scale=st.sampled_from([None, "rms"]), seed=st.integers(0, 2**16))
def test_gated_models_well_normed(d_in, width, d_out, a, scale, seed):
    """‖J·Δw‖_RMS ≤ ‖Δw‖ (jvp oracle, aligned search for the worst Δw) on scalar-gated models whose
    product sees inputs of RMS ≠ 1."""
    torch.manual_seed(seed)
    for model in (ScalarGate(d_in, width, d_out, a).double(), Gated(d_in, a).double()):
        gen = torch.Generator().manual_seed(seed)
        put_on_manifold(model, from_torch(model, scale=scale), gen)
        tree = from_torch(model, scale=scale)
        x = unit_rms((3, d_in), gen)
        assert aligned_search(model, tree, x) <= TOL


# ------------------------------------------------------------------ nn.Sequential reuse
def test_layer_listed_twice_in_sequential_refused():
    lin = nn.Linear(8, 8, bias=False)
    with pytest.raises(ModularError, match="used twice"):
        from_torch(nn.Sequential(lin, nn.ReLU(), lin))
    with pytest.raises(ModularError, match="used twice"):  # and inside a traced forward's Sequential
        from_torch(nn.Sequential(nn.Sequential(lin, nn.ReLU()), lin))


# ------------------------------------------------------------------ frozen parameters
def _ln_model(gain, frozen):
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.LayerNorm(8, bias=False), nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        m[1].weight.fill_(gain)
    m[1].weight.requires_grad_(not frozen)
    return m


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_gain_still_scales_the_signal(frozen):
    """Linear → LayerNorm (gain 10) → Linear, scale="rms", μ = 2: the first weight's change passes
    normalisation (1) and the gain (10): c = 2·10; the second sees inputs of RMS ≤ 10: c·ρ = 2·10.
    A frozen gain acts in the forward exactly as a trainable one."""
    m = _ln_model(10.0, frozen)
    assert from_torch(m, scale="rms").sensitivity == pytest.approx(10.0)
    assert budget(m, scale="rms") == pytest.approx({"0.weight": 0.05, "2.weight": 0.05})


def test_frozen_weight_has_no_mass_and_its_actual_norm():
    """Layer 0 frozen: it is not trained (not in the budget, mass 0), and it is not on a manifold
    (the optimizer neither steps nor projects it), so layer 2's input bound is ‖W₀‖ as it is:
    lr_scale(2.weight) = 1/(μ/μ₂ · ρ) = 1/‖W₀‖_{RMS→RMS}."""
    torch.manual_seed(0)
    m = mlp([8, 8, 8])
    q = Stiefel().project(torch.randn(8, 8, dtype=torch.float64))
    for factor in (1.0, 3.0):
        with torch.no_grad():
            m[0].weight.copy_(factor * q)
        m[0].weight.requires_grad_(False)
        assert budget(m, scale="rms") == pytest.approx({"2.weight": 1 / factor})
        assert "frozen" in budget_table(m, scale="rms")
    with pytest.raises(ModularError, match="frozen parameter '0.weight'"):
        budget(m, masses={"0.weight": 1.0})


def test_frozen_embedding_radius_is_read_from_its_rows():
    emb = nn.Embedding(5, 4)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(5, 4))
        emb.weight[3] = torch.tensor([6.0, 0.0, 0.0, 0.0])  # the longest row: norm 6, RMS 3
    emb.weight.requires_grad_(False)
    m = nn.Sequential(emb, nn.Linear(4, 4, bias=False))
    assert budget(m, scale="rms") == pytest.approx({"1.weight": 1 / 3})


@settings(max_examples=12)
@given(d=st.lists(st.integers(1, 8), min_size=3, max_size=5), frozen=st.lists(st.booleans(), min_size=4, max_size=4),
       factor=st.sampled_from([0.3, 1.0, 4.0]), act=st.sampled_from(["relu", "gelu"]),
       scale=st.sampled_from([None, "rms"]), seed=st.integers(0, 2**16))
def test_partly_frozen_mlp_well_normed(d, frozen, factor, act, scale, seed):
    """Frozen layers left where they are (off the manifold by ``factor``), the others on it: the jvp
    change of the trainable weights stays within their modular norm, and frozen names are absent."""
    model = mlp(d, act)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    if all(frozen[:len(layers)]):
        frozen = [False] + frozen[1:]
    gen = torch.Generator().manual_seed(seed)
    put_on_manifold(model, from_torch(model, scale=scale), gen)
    with torch.no_grad():
        for lin, f in zip(layers, frozen):
            if f:
                lin.weight.mul_(factor)
                lin.weight.requires_grad_(False)
    tree = from_torch(model, scale=scale)
    assert set(budget(tree)) == {n for n, p in model.named_parameters() if p.requires_grad}
    x = unit_rms((3, d[0]), gen)
    assert aligned_search(model, tree, x) <= TOL


# ------------------------------------------------------------------ fx arithmetic
class Op(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.op = op

    def forward(self, x):
        h = self.a(x)
        return self.c({
            "recip": lambda: 2.0 / self.b(h),
            "tdiv_recip": lambda: torch.div(2.0, self.b(h)),
            "floor": lambda: torch.div(self.b(h), 2, rounding_mode="floor"),
            "add_alpha": lambda: torch.add(h, self.b(h), alpha=100.0),
            "sub_alpha": lambda: torch.sub(h, self.b(h), alpha=-100.0),
            "method_alpha": lambda: h.add(self.b(h), alpha=100.0),
            "add_ref": lambda: h + 100.0 * self.b(h),
            "const_alpha": lambda: torch.add(self.b(h), 2.0, alpha=3.0),
            "mul_kw": lambda: torch.mul(self.b(h), other=3.0),
        }[self.op]())


@pytest.mark.parametrize("op, message", [("recip", r"c / h"), ("tdiv_recip", r"c / h"), ("floor", "rounding_mode")])
def test_unbounded_divisions_refused(op, message):
    with pytest.raises(ModularError, match=message):
        from_torch(Op(op))


@pytest.mark.parametrize("op", ["add_alpha", "sub_alpha", "method_alpha"])
def test_alpha_scales_the_other_operand(op):
    """h ± α·b(h), scale="rms", μ = 3: b's change reaches c through ×|α| = 100: c_b = 3·100;
    a's through the sum 1 + 100: c_a = 3·101; c sees inputs of RMS ≤ 101: c_c·ρ = 3·101."""
    want = {"a.weight": 1 / 303, "b.weight": 1 / 300, "c.weight": 1 / 303}
    assert budget(Op(op), scale="rms") == pytest.approx(want)
    assert budget(Op("add_ref"), scale="rms") == pytest.approx(want)


def test_constant_operands_by_hand():
    # b(h) + 3·2: c sees inputs of RMS ≤ 1 + 6 → 1/(3·7); torch.mul(b(h), other=3): × 3 before c
    assert budget(Op("const_alpha"), scale="rms")["c.weight"] == pytest.approx(1 / 21)
    assert budget(Op("mul_kw"), scale="rms") == pytest.approx({"a.weight": 1 / 9, "b.weight": 1 / 9,
                                                               "c.weight": 1 / 9})


# ------------------------------------------------------------------ unplaced weights
class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8, bias=False)
        self.b = nn.Linear(8, 2, bias=False)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent: fx cannot trace it, a declaration must describe it
            h = torch.relu(h)
        return self.b(h)


class Forgetful(Two):
    pass


@declare(Two)
def _two(m, prefix, opts):
    def p(n):
        return f"{prefix}.{n}" if prefix else n
    return compose(convert(m.a, p("a"), opts), activation("relu"), convert(m.b, p("b"), opts))


@declare(Forgetful)
def _forgetful(m, prefix, opts):
    return convert(m.b, f"{prefix}.b" if prefix else "b", opts)


def test_declaration_that_forgets_a_weight_refused():
    assert budget(Two(), scale="rms") == pytest.approx({"a.weight": 0.5, "b.weight": 0.5})
    with pytest.raises(ModularError, match=r"never places the trainable parameters \['a.weight'\]"):
        budget(Forgetful())
    model = Forgetful()
    model.a.requires_grad_(False)  # frozen: nothing to budget, nothing missing
    assert budget(model, scale="rms") == pytest.approx({"b.weight": 1.0})


def test_unused_layer_refused_until_frozen():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.spare = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    model = Unused()
    with pytest.raises(ModularError, match=r"\['spare.weight', 'spare.bias'\].*requires_grad_\(False\)"):
        budget(model)
    model.spare.requires_grad_(False)
    assert budget(model, scale="rms") == pytest.approx({"a.weight": 1.0})


# ------------------------------------------------------------------ dropout
class FDrop(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.p = p

    def forward(self, x):
        return self.b(nn.functional.dropout(self.a(x), self.p, self.training))


@pytest.mark.parametrize("functional", [False, True])
def test_dropout_follows_the_mode(functional):
    """Training mode: kept entries × 1/(1 − p) = 4 (p = 0.75): a's c = 2·4, b's input bound 4 → both
    1/8; eval mode: the identity → 1/2 each. Checked against jvp for one drawn mask."""
    model = (FDrop(0.75) if functional else
             nn.Sequential(nn.Linear(8, 8, bias=False), nn.Dropout(0.75), nn.Linear(8, 8, bias=False))).double()
    first, second = ("a.weight", "b.weight") if functional else ("0.weight", "2.weight")
    assert budget(model, scale="rms") == pytest.approx({first: 1 / 8, second: 1 / 8})
    model.eval()
    assert budget(model, scale="rms") == pytest.approx({first: 1 / 2, second: 1 / 2})
    model.train()
    tree = from_torch(model, scale="rms")
    put_on_manifold(model, tree, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert aligned_search(model, tree, unit_rms((4, 8), torch.Generator().manual_seed(1))) <= TOL


# ------------------------------------------------------------------ smaller ones
def test_norm_checks_shapes():
    tree = from_torch(nn.Sequential(nn.Linear(8, 16, bias=False)))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(8, 16\).*shape \(16, 8\)"):
        tree.norm({"0.weight": torch.randn(16, 8).T})


@pytest.mark.parametrize("radius", [-1.0, 0.0, float("inf")])
def test_embedding_radius_checked(radius):
    with pytest.raises(ValueError, match="embedding_radius"):
        from_torch(nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4)), embedding_radius=radius)


def test_description_returning_a_non_module_refused():
    with pytest.raises(TypeError, match=r"description .*_bad.* of '1' \(ReLU\) returned int"):
        def _bad(mod, prefix, opts):
            return 3
        from_torch(mlp([4, 4, 4]), custom={nn.ReLU: _bad})


def test_compiled_model_is_described_as_the_eager_one():
    model = mlp([8, 16, 4])
    assert budget(torch.compile(model)) == budget(model)


class _Block(nn.Module):  # a parent fx traces (not a Sequential)
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_compiled_and_data_parallel_submodules_are_described_as_their_eager_modules():
    """A torch.compile-d submodule was traced into and refused ("Declare … OptimizedModule"), and
    named "0._orig_mod.weight" it matched no optimizer name (a probe): budget="auto" stepped lr."""
    eager_seq, eager_block = mlp([8, 16, 4]), _Block()
    want_seq, want_block = budget(eager_seq), budget(eager_block)
    seq, block = copy.deepcopy(eager_seq), copy.deepcopy(eager_block)  # (the budget reads the biases)
    seq[0] = torch.compile(seq[0])
    block.up = torch.compile(block.up)
    block.down = nn.DataParallel(block.down)
    assert budget(seq) == want_seq and set(want_seq) == {"0.weight", "2.weight"}
    assert budget(block) == want_block
    # tare names a container inside a compiled submodule by the optimizer's name (no _orig_mod)
    inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    eager = nn.Sequential(inner, nn.Linear(8, 4))
    wrapped = copy.deepcopy(eager)
    wrapped[0] = torch.compile(wrapped[0])
    assert budget(wrapped, tare={"0.2": 1.0}) == budget(eager, tare={"0.2": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no "no modular budget" warning)
        opt = ManifoldMuon(seq.modules(), lr=1.0, project_on_init=False)
    assert {n: g["lr_scale"] for g in opt.param_groups for n in g["param_names"] if g["algorithm"] != "adamw"} == want_seq


# ------------------------------------------------------------------ spread warning
def test_spread_warning_names_both_ends():
    """Each residual block multiplies the sensitivity before it: TinyCausalLM at 4 layers spans
    > 1e3, and the warning names the smallest and the largest entries."""
    model = TinyCausalLM(vocab_size=32, d_model=32, n_layers=4, n_heads=2, max_len=16)
    with pytest.warns(UserWarning, match="spans") as caught:
        b = budget(model)
    lo, hi = min(b, key=b.get), max(b, key=b.get)
    assert b[hi] / b[lo] > 1e3
    text = str(caught[0].message)
    assert repr(lo) in text and repr(hi) in text and "uniform" in text


def test_the_default_budget_steps_uniformly_where_the_modular_one_would_freeze_layers():
    """budget="auto" on TinyCausalLM (spread > 1e3×) gave layers.0 lr_scales ~1e-8: in effect
    frozen under the default. It now falls back to uniform and says why; budget="modular" keeps
    the modular budget (with budget()'s warning)."""
    from modman import ManifoldMuon

    model = TinyCausalLM(vocab_size=32, d_model=32, n_layers=4, n_heads=2, max_len=16)
    with pytest.warns(UserWarning, match=r"would span .*×.*residual blocks.*budget='modular' uses it anyway"):
        auto = ManifoldMuon(model.modules(), lr=0.1)
    assert {g["lr_scale"] for g in auto.param_groups if g["algorithm"] != "adamw"} == {1.0}
    with pytest.warns(UserWarning, match="modular budget spans"):
        modular = ManifoldMuon(model.modules(), lr=0.1, budget="modular")
    scales = {g["param_names"][0]: g["lr_scale"] for g in modular.param_groups if g["algorithm"] != "adamw"}
    with pytest.warns(UserWarning, match="spans"):
        assert scales == pytest.approx(budget(model))


class ResidualCNN(nn.Module):
    """A ResNet-style CNN without normalisation: blocks x + conv(relu(conv(x))) (a user probe)."""

    def __init__(self, blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(16, 16, 3, padding=1)) for _ in range(blocks))
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(torch.flatten(h, 1))


def test_the_default_budget_steps_uniformly_where_every_modular_scale_is_tiny():
    """The compounding can shrink every lr_scale alike: a 4-block residual CNN got 3.4e-7…3.8e-7
    (spread 1.1×, so the spread rule never fired) and 20 steps at lr 0.1 moved no weight by more
    than 8e-7 (a user probe). "auto" falls back to uniform below FROZEN_SCALE and says why; the
    modular budget itself (budget() or budget="modular") warns."""
    from modman import ManifoldMuon
    from modman.modular.budget import FROZEN_SCALE

    torch.manual_seed(0)
    model = ResidualCNN(4)
    with pytest.warns(UserWarning, match="every weight below lr/1000 .*the composition alone gives"):
        b = budget(model)
    assert max(b.values()) < FROZEN_SCALE and max(b.values()) / min(b.values()) < 1e3
    with pytest.warns(UserWarning, match=r"would all lie below 0.001.*budget='modular' uses it anyway"):
        auto = ManifoldMuon(model.modules(), lr=0.1)
    assert {g["lr_scale"] for g in auto.param_groups if g["algorithm"] != "adamw"} == {1.0}
    before = model.blocks[0][0].weight.detach().clone()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        auto.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        auto.step()
    assert float((model.blocks[0][0].weight - before).norm() / before.norm()) > 1e-2  # it trains
    with pytest.warns(UserWarning, match="every weight below lr/1000"):
        ManifoldMuon(ResidualCNN(4).modules(), lr=0.1, budget="modular")
    with warnings.catch_warnings():  # a 1-block one keeps its modular budget, silently
        warnings.simplefilter("error", UserWarning)
        assert min(budget(ResidualCNN(1)).values()) > FROZEN_SCALE / 10
    # 2 blocks: every lr_scale ≤ 1.3e-4, but the wide head's composition factor is 1.2e-3 — the
    # rule read the largest composition factor and let it through (a second review)
    with pytest.warns(UserWarning, match="every weight below lr/1000"):
        assert max(budget(ResidualCNN(2)).values()) < FROZEN_SCALE


def test_a_weight_small_by_its_own_shape_is_not_taken_for_frozen():
    """An unscaled Linear(2·10⁶, 1) alone has lr_scale 1/√(2·10⁶) = 7.1e-4 from its own shape
    factor √(d_in/d_out) — no compounding. The frozen rule took it for frozen and "auto" jumped to
    lr_scale 1 (1400× Linear(1000, 1)'s 0.0316; a review): the rule reads the composition factor."""
    from modman import ManifoldMuon

    model = nn.Linear(2_000_000, 1, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert budget(model) == {"weight": pytest.approx(2_000_000 ** -0.5)}
        opt = ManifoldMuon(model.modules(), lr=0.1, project_on_init=False)
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(2_000_000 ** -0.5)


def test_no_spread_warning_for_even_budgets():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        even = budget(mlp([8, 8, 8, 8, 8]))
        shallow = budget(TinyCausalLM(vocab_size=32, d_model=32, n_layers=1, n_heads=2, max_len=16))
    assert not [w for w in caught if "span" in str(w.message) or "lr_scale" in str(w.message)]
    for b in (even, shallow):
        assert max(b.values()) / min(b.values()) <= 1e3


def test_reading_a_weights_dtype_in_forward_is_not_using_the_weight():
    """x.to(self.fc.weight.dtype) (HF models and LoRALinear do it) was refused as "uses the bare
    tensor 'fc.weight' directly": the model had no modular budget. Reading an attribute of a
    weight is no use of its values; using the bare tensor still is refused."""
    from torch import nn as tnn

    from modman import modular

    class Cast(tnn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = tnn.Linear(4, 4, bias=False), tnn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x.to(self.fc.weight.dtype))))

    class Plain(Cast):
        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    class Bare(Cast):
        def forward(self, x):
            return self.out(torch.relu(torch.nn.functional.linear(x, self.fc.weight)))

    class Transposed(Cast):  # .T is the weight's values, not its metadata
        def forward(self, x):
            return self.out(torch.relu(x @ self.fc.weight.T))

    assert modular.budget(Cast()) == modular.budget(Plain())
    for model in (Bare(), Transposed()):
        with pytest.raises(modular.ModularError, match="bare tensor 'fc.weight'"):
            modular.budget(model)


def test_a_transpose_of_an_activation_is_refused_not_dropped():
    """getattr on an activation counted as metadata whatever the attribute, so y + y.mT lost its
    second branch and the budget was a plain model's, silently. Only dtype/device/shape/ndim are
    metadata; y.size(1)-style shape reads still are."""
    from torch import nn as tnn

    from modman import modular

    class Sym(tnn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = tnn.Linear(4, 4, bias=False), tnn.Linear(4, 2, bias=False)

        def forward(self, x):
            y = self.fc(x)
            return self.out(y + y.mT)

    class Shaped(Sym):
        def forward(self, x):
            y = self.fc(x)
            return self.out(y.reshape(y.shape[0], -1))

    with pytest.raises(modular.ModularError, match="attribute 'mT'"):
        modular.budget(Sym())
    assert set(modular.budget(Shaped())) == {"fc.weight", "out.weight"}


def test_an_unknown_function_names_the_class_to_describe():
    """The refusal said "describe the enclosing module with custom={Class: fn}" without saying
    which class (a newcomer's pooling layer)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.MaxPool1d(2))
    with pytest.raises(ModularError, match=r"max_pool1d.*describe MaxPool1d with from_torch\(model, "
                                           r"custom=\{MaxPool1d: fn\}\) or @modman.modular.declare\(MaxPool1d\)"):
        from_torch(model)


@pytest.mark.parametrize("layer, cls", [(nn.BatchNorm2d(8), "BatchNorm2d"), (nn.MaxPool2d(2), "MaxPool2d"),
                                        (nn.GroupNorm(2, 8), "GroupNorm"), (nn.LeakyReLU(), "LeakyReLU")])
def test_a_refusal_names_the_torch_layer_inside_a_custom_forward(layer, cls):
    """A torch.nn layer without a rule, called in a custom forward, was traced into: its
    F.batch_norm or bare weight was charged to the enclosing module ("describe Net … declare(Net)",
    and for GroupNorm "wrap it in a layer"), so a user declared the wrong class (a user probe)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.layer, self.fc = nn.Conv2d(3, 8, 3), layer, nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.layer(torch.relu(self.conv(x))), 1))

    with pytest.raises(ModularError) as info:
        from_torch(Net())
    message = str(info.value)
    assert f"declare({cls})" in message and f"custom={{{cls}: fn}}" in message, message
    assert "declare(Net)" not in message and "wrap it in a layer" not in message, message
    assert message.startswith("layer") or message.startswith("cannot describe layer"), message
