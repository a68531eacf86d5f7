"""from_torch: what it describes, and the refusals that say what to do."""
import pytest
import torch
from torch import nn

from modman.modular import ModularError, budget, budget_table, from_torch
from modman.toy.model import TinyCausalLM

from .models import Concat, ResidualMLP


def test_names_match_named_parameters():
    for model in (ResidualMLP(5, 6, 3), Concat(4, 3, 2, 5), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())):
        names = {a.name for a in from_torch(model).atoms()}
        assert names == {n for n, _ in model.named_parameters()}


def test_residual_traced_counts_trunk_once():
    tree = from_torch(ResidualMLP(5, 6, 3, blocks=2))
    assert tree.mass == 6  # inp, 2×(f1, f2), out — each once


def test_tiny_causal_lm_declared():
    model = TinyCausalLM(vocab_size=20, d_model=16, n_layers=2, n_heads=2, max_len=8)
    b = budget(model, scale="rms")
    linear = {n for n, p in model.named_parameters() if p.ndim == 2}
    assert set(b) == linear  # gains are passengers; every matrix (and the embedding) budgeted
    assert b["layers.0.self_attn.q_proj.weight"] < b["layers.1.self_attn.q_proj.weight"]  # earlier: more sensitive path
    assert "assumes attention" in budget_table(model)


def test_tied_weights_refused():
    model = TinyCausalLM(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_len=8, tie_embeddings=True)
    with pytest.raises(ModularError, match="once per use"):
        from_torch(model)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(torch.relu(self.l(x)))


def test_parameter_used_twice_refused():
    with pytest.raises(ModularError, match="used twice"):
        from_torch(Twice())


class Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.l(x)
        return x


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.a(x, x, x)[0]


@pytest.mark.parametrize("model, message", [
    (Weird(), "bare tensor 'w'"),
    (Branchy(), "declare"),
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1)), "softmax.*not a function modman knows"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "grouped convolution"),
    (Attn(), "attention"),
])
def test_refusals_say_what_to_do(model, message):
    with pytest.raises(ModularError, match=message):
        from_torch(model)


def test_custom_description_accepted():
    from modman.modular import MatrixAtom

    tree = from_torch(Weird(), custom={Weird: lambda m, prefix, opts: MatrixAtom("w", m.w, 1.0, opts.scale)})
    assert budget(tree) == {"w": pytest.approx(1.0)}


def test_bad_options():
    with pytest.raises(ValueError, match="scale"):
        from_torch(nn.Linear(2, 2), scale="spectral")
    with pytest.raises(ModularError, match="unknown parameters"):
        from_torch(nn.Linear(2, 2), masses={"nope": 1.0})
    with pytest.raises(TypeError):
        from_torch(torch.zeros(2))


class _Decoder(nn.Module):
    """Linear → reshape into per-position vectors → Linear on each (a generator's pattern)."""

    def __init__(self, how):
        super().__init__()
        self.inp, self.out, self.how = nn.Linear(8, 8, bias=False), nn.Linear(2, 3, bias=False), how

    def forward(self, x):
        h = self.inp(x)
        h = h.view(h.shape[0], 4, 2) if self.how == "view" else h.reshape(-1, 4, 2)
        return self.out(h)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(8, 8, bias=False), nn.Unflatten(1, (4, 2)), nn.Linear(2, 3, bias=False)),
    _Decoder("view"), _Decoder("reshape"),
])
def test_a_reshape_that_may_split_vectors_is_refused(model):
    """Taken as an identity (bound ρ → ρ), a split of d features into vectors of k raised the RMS
    per position by up to √(d/k) past the bound: a probe measured Lipschitz 1.63 against a claimed
    sensitivity 0.82 on Linear(8, 8) → Unflatten(1, (4, 2)) → Linear(2, 3)."""
    with pytest.raises(ModularError, match="split"):
        from_torch(model)


class _FlattenIdiom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, bias=False), nn.Linear(3 * 4 * 4, 5, bias=False)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(h.size(0), -1))


def test_the_flatten_idiom_view_n_minus_one_is_still_described():
    assert {a.name for a in from_torch(_FlattenIdiom()).atoms()} == {"conv.weight", "head.weight"}


def test_a_traced_elementwise_product_states_its_assumption_in_the_table():
    """A traced silu(g(x)) * u(x) printed no assumption line, though the product rule is one
    (optimistic by up to √d: a probe found a GLU 8→16→8 1.75× past its weight bound)."""
    class GLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.u, self.d = (nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False),
                                      nn.Linear(16, 8, bias=False))

        def forward(self, x):
            return self.d(torch.nn.functional.silu(self.g(x)) * self.u(x))

    assert "assumes elementwise product: ‖a ⊙ b‖_RMS ≤ ‖a‖_RMS·‖b‖_RMS" in budget_table(GLU())
    assert "elementwise product" not in budget_table(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))


def test_a_normalisation_whose_input_bound_is_below_its_assumed_rms_is_named():
    """Linear(8, 16) unscaled → LayerNorm: the tree bounds the norm's input RMS by 0.71 while the
    budget assumed ≥ 1 without a word (a probe measured Lipschitz 1.95 against a claimed 1.41)."""
    widening = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 4))
    assert "assumption unmet: 1 (layernorm): its input RMS is at most 0.7071" in budget_table(widening)
    with pytest.warns(UserWarning, match=r"assumption unmet, 1 \(layernorm\)"):
        budget(widening)
    narrowing = nn.Sequential(nn.Linear(16, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 4))
    assert "assumption unmet" not in budget_table(narrowing)
    # the advice it prints clears it (rounded down: 0.707, not 0.7071), and names the layer
    line = next(t for t in budget_table(widening).splitlines() if "assumption unmet" in t)
    assert line.startswith("assumption unmet: 1 (layernorm)") and "norm_min_rms=0.707," in line
    assert "assumption unmet" not in budget_table(widening, norm_min_rms=0.707)
    from modman.toy import TinyCausalLM
    lm = TinyCausalLM(20, 32, 1, 2, 8, seed=0)  # unit embedding rows: RMS 1/√32 = 0.1768 at layers.0's norm
    assert "layers.0.input_layernorm (rmsnorm): its input RMS is at most 0.1768" in budget_table(lm)
    assert "layers.0.input_layernorm (rmsnorm)" not in budget_table(lm, embedding_radius=32 ** 0.5)


class _View(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.inp, self.out, self.shape = nn.Linear(8, 8, bias=False), nn.Linear(2, 3, bias=False), shape

    def forward(self, x):
        return self.out(self.inp(x).view(*self.shape))


def test_a_literal_leading_size_is_refused_since_it_may_split():
    """view(4, -1) of a (1, 8) activation splits it into four 2-vectors: accepted as the flatten
    idiom, Lipschitz 1.63 against a claimed 0.82 (a review)."""
    with pytest.raises(ModularError, match=r"x.size\(0\), -1"):
        from_torch(_View((4, -1)))


def test_an_intermediate_used_twice_is_named_with_the_rewrite_that_works():
    """a + f2(x) + a was refused as "tied weights or a layer called twice", though the weights are
    used once: the tracer describes a reused intermediate as two copies; 2 * a + f2(x) is accepted."""
    class Twice(nn.Module):
        def __init__(self, rewrite):
            super().__init__()
            self.f1, self.f2, self.out, self.rewrite = (nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False),
                                                        nn.Linear(4, 2, bias=False), rewrite)

        def forward(self, x):
            a = self.f1(x)
            return self.out(2 * a + self.f2(x) if self.rewrite else (a + self.f2(x)) + a)

    with pytest.raises(ModularError, match=r"one intermediate result used twice .* write 2 \* a \+ f\(x\)"):
        from_torch(Twice(rewrite=False))
    assert {a.name for a in from_torch(Twice(rewrite=True)).atoms()} == {"f1.weight", "f2.weight", "out.weight"}
