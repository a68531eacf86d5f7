"""Tare (modula's mass allocation): a subtree's weights share a fixed total mass.

Invariants: taring leaves the coefficients inside a subtree unchanged and is the same as scaling
every inner mass by M/μ; with modula's residual blocks x ↦ (1 − 1/B)x + (1/B)·block(x) tared to
mass M, every coefficient (hence every lr_scale) is independent of the number of blocks B ≥ 1;
the tared norm is still well normed (and tight) on the torch model."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.modular import ModularError, Parallel, Scale, Tare, activation, budget, compose, from_torch, tare
from modman.modular.atoms import MatrixAtom
from modman.modular.bonds import identity

from .helpers import aligned_search, massive, output_change, put_on_manifold, rms_rows, unit_rms
from .models import ModulaResMLP, mlp

masses = st.floats(0.05, 20.0)


def atom(name, mass=1.0, d=4):
    return MatrixAtom(name, torch.zeros(d, d), mass, scale="rms")


def coefficients(tree):
    return {p.atom.name: p.coefficient for p in tree.placements()}


def modula_tree(B, M, m_in=1.0, m_out=1.0, inner_mass=1.0):
    """inp, relu, B blocks (1 − 1/B)·id + (1/B)·relu∘W tared to M, out — built by hand."""
    def block(i):
        return Parallel(Scale(1 - 1 / B, identity()) if B > 1 else identity(),
                        Scale(1 / B, compose(atom(f"b{i}", inner_mass), activation("relu"))), combine="sum") \
            if B > 1 else Scale(1.0, compose(atom(f"b{i}", inner_mass), activation("relu")))
    blocks = tare(compose(*(block(i) for i in range(B))), M)
    return compose(atom("inp", m_in), activation("relu"), blocks, atom("out", m_out))


@given(ms=st.lists(masses, min_size=1, max_size=5), M=masses)
def test_tare_keeps_inner_coefficients(ms, M):
    inner = compose(*(compose(atom(f"w{i}", m), activation("gelu")) for i, m in enumerate(ms)))
    assert coefficients(Tare(inner, M)) == pytest.approx(coefficients(inner), rel=1e-12)
    assert Tare(inner, M).mass == M and Tare(inner, M).sensitivity == inner.sensitivity


@given(ms=st.lists(masses, min_size=1, max_size=4), M=masses, a=masses, b=masses)
def test_tare_equals_scaled_masses(ms, M, a, b):
    """compose(x, tare(m, M), y) has the coefficients of compose(x, m', y) with m' = m's masses × M/μ."""
    mu = sum(ms)

    def chain(factor):
        return compose(*(compose(atom(f"w{i}", m * factor), activation("relu")) for i, m in enumerate(ms)))

    left = compose(atom("x", a), tare(chain(1.0), M), atom("y", b))
    right = compose(atom("x", a), chain(M / mu), atom("y", b))
    assert coefficients(left) == pytest.approx(coefficients(right), rel=1e-9)
    assert left.mass == pytest.approx(a + M + b)


@given(B=st.integers(2, 16), M=masses, inner=masses)
def test_modula_blocks_depth_independent(B, M, inner):
    """Block coefficient (μ/(M/B))·(1/B) = μ/M and input/output μ = 2 + M, whatever B ≥ 2."""
    c = coefficients(modula_tree(B, M, inner_mass=inner))
    mu = 2 + M
    assert c["inp"] == pytest.approx(mu) and c["out"] == pytest.approx(mu)
    for i in range(B):
        assert c[f"b{i}"] == pytest.approx(mu / M)


def test_untared_blocks_starve_input_and_output():
    """Without tare the input/output share 1/(B + 2) vanishes with depth (why modula tares)."""
    for B in (2, 8):
        model = ModulaResMLP(6, 8, 3, blocks=B).double()
        b = budget(model, scale="rms")
        assert b["inp.weight"] == pytest.approx(1 / (B + 2)) and b["out.weight"] == pytest.approx(1 / (B + 2))


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_from_torch_tare_budget_is_depth_independent(act):
    """The traced torch model with its blocks tared: every lr_scale is the same for B = 2, 4, 8."""
    g = activation(act).sensitivity
    seen = []
    for B in (2, 4, 8):
        model = ModulaResMLP(6, 8, 3, blocks=B, act=act).double()
        b = budget(model, scale="rms", tare={"blocks": 1.0})
        assert sorted(b) == sorted(n for n, _ in model.named_parameters())
        seen.append((b["inp.weight"], b["out.weight"], [v for k, v in b.items() if k.startswith("blocks")]))
    # the input layer's change passes relu (g) and B blocks of sensitivity (1 − 1/B) + g/B
    for (inp, out, blocks), B in zip(seen, (2, 4, 8)):
        assert out == pytest.approx(1 / 3)
        assert inp == pytest.approx(1 / (3 * g * (1 - 1 / B + g / B) ** B))
        assert len(blocks) == B
    assert len({s[1] for s in seen}) == 1
    if act == "relu":
        assert all(s[0] == pytest.approx(1 / 3) and s[2] == pytest.approx([1 / 3] * len(s[2])) for s in seen)


def test_tare_on_plain_mlp_sequential_and_refusals():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.ReLU(),
                                                    torch.nn.Linear(8, 8, bias=False), torch.nn.ReLU()),
                                torch.nn.Linear(8, 3, bias=False))
    b = budget(model, scale="rms", tare={"2": 1.0})
    assert b["0.weight"] == pytest.approx(1 / 3) and b["3.weight"] == pytest.approx(1 / 3)
    assert b["2.0.weight"] == pytest.approx(1 / 6) and b["2.2.weight"] == pytest.approx(1 / 6)
    with pytest.raises(ModularError, match="not a submodule"):
        budget(model, tare={"hidden": 1.0})
    with pytest.raises(ModularError, match="mass > 0"):
        budget(model, tare={"2": 0.0})
    with pytest.raises(ValueError, match="> 0"):
        Tare(atom("a"), -1.0)
    # a container without weights stays weightless (no phantom mass)
    empty = ModulaResMLP(6, 8, 3, blocks=0).double()
    assert budget(empty, scale="rms", tare={"blocks": 1.0}) == pytest.approx({"inp.weight": 0.5, "out.weight": 0.5})
    assert sorted(budget(mlp([6, 8, 3]), scale="rms").values()) == pytest.approx([0.5, 0.5])


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 4), width=st.integers(2, 8), M=st.sampled_from([0.25, 1.0, 4.0]),
       scale=st.sampled_from([None, "rms"]), act=st.sampled_from(["relu", "gelu", "tanh"]),
       seed=st.integers(0, 2**16))
def test_tared_resmlp_well_normed(B, width, M, scale, act, seed):
    """‖J·Δw‖_RMS ≤ ‖Δw‖ under the tared norm (jvp oracle), for random Δw on the torch model."""
    model = ModulaResMLP(5, width, 3, blocks=B, act=act).double()
    gen = torch.Generator().manual_seed(seed)
    put_on_manifold(model, from_torch(model, scale=scale), gen)
    tree = from_torch(model, scale=scale, tare={"blocks": M})
    x = unit_rms((4, 5), gen)
    names = [p.atom.name for p in massive(tree)]
    for only in (None, [names[seed % len(names)]]):
        deltas = {p.atom.name: torch.randn(p.atom.param.shape, generator=gen, dtype=torch.float64)
                  for p in massive(tree) if only is None or p.atom.name in only}
        lhs = float(rms_rows(output_change(model, x, deltas)))
        assert lhs <= float(tree.norm(deltas)) * (1 + 1e-6)


def test_tared_resmlp_tight():
    torch.manual_seed(0)
    model = ModulaResMLP(6, 6, 4, blocks=3).double()
    gen = torch.Generator().manual_seed(1)
    put_on_manifold(model, from_torch(model, scale="rms"), gen, identity=True)
    tree = from_torch(model, scale="rms", tare={"blocks": 1.0})
    x = unit_rms((1, 6), gen, positive=True)
    assert aligned_search(model, tree, x) >= 0.5
