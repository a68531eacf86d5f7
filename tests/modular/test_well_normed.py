"""Well-normedness to first order, ‖J_w f(w, x)·Δw‖_RMS ≤ ‖Δw‖_modular, and its tightness.

The oracle is torch.func.jvp on the torch model itself (float64), independent of the module
tree that produces the norm. Models use RMS-per-example (per position for convolutions) metrics.
Excluded from the bound, by their stated assumptions: normalisation layers (inputs of RMS ≥ r),
products of activations and attention.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.modular import from_torch

from .helpers import aligned_search, massive, output_change, put_on_manifold, rms_rows, unit_rms
from .models import ConvNet, Concat, EmbedMLP, ResidualMLP, mlp

TOL = 1 + 1e-6
dims = st.integers(1, 12)
scales = st.sampled_from([None, "rms"])
acts = st.sampled_from(["relu", "gelu", "silu", "tanh"])


def random_delta(tree, gen, only=None):
    out = {}
    for p in massive(tree):
        if only is None or p.atom.name in only:
            out[p.atom.name] = torch.randn(p.atom.param.shape, generator=gen, dtype=p.atom.param.dtype)
    return out


def check_bound(model, x, scale, seed, channel_dim=-1):
    tree = from_torch(model, scale=scale)
    gen = torch.Generator().manual_seed(seed)
    put_on_manifold(model, tree, gen)
    tree = from_torch(model, scale=scale)  # sensitivities are read at the manifold point
    names = [p.atom.name for p in massive(tree)]
    # all atoms at once, and one atom alone (a single block is where a wrong coefficient shows)
    for only in (None, [names[seed % len(names)]]):
        deltas = random_delta(tree, gen, only)
        dy = output_change(model, x, deltas)
        lhs, rhs = float(rms_rows(dy, channel_dim)), float(tree.norm(deltas))
        assert lhs <= rhs * TOL, f"{type(model).__name__} {only}: ‖JΔw‖={lhs:.6g} > ‖Δw‖={rhs:.6g}"


@given(d=st.lists(dims, min_size=2, max_size=5), act=acts, scale=scales, seed=st.integers(0, 2**16))
def test_mlp_well_normed(d, act, scale, seed):
    model = mlp(d, act)
    x = unit_rms((3, d[0]), torch.Generator().manual_seed(seed))
    check_bound(model, x, scale, seed)


@settings(max_examples=12)
@given(d_in=dims, width=dims, d_out=dims, blocks=st.integers(1, 3), act=acts, scale=scales,
       a=st.sampled_from([1.0, 0.5, -2.0]), seed=st.integers(0, 2**16))
def test_residual_well_normed(d_in, width, d_out, blocks, act, scale, a, seed):
    model = ResidualMLP(d_in, width, d_out, blocks, act, a).double()
    x = unit_rms((3, d_in), torch.Generator().manual_seed(seed))
    check_bound(model, x, scale, seed)


@settings(max_examples=12)
@given(d_in=dims, w1=dims, w2=dims, d_out=dims, scale=scales, seed=st.integers(0, 2**16))
def test_concat_well_normed(d_in, w1, w2, d_out, scale, seed):
    model = Concat(d_in, w1, w2, d_out).double()
    x = unit_rms((3, d_in), torch.Generator().manual_seed(seed))
    check_bound(model, x, scale, seed)


@given(vocab=st.integers(2, 10), d=dims, d_out=dims, scale=scales, seed=st.integers(0, 2**16))
def test_embedding_well_normed(vocab, d, d_out, scale, seed):
    model = EmbedMLP(vocab, d, d_out).double()
    ids = torch.randint(0, vocab, (4,), generator=torch.Generator().manual_seed(seed))
    check_bound(model, ids, scale, seed)


@settings(max_examples=12)
@given(c_in=dims, c=dims, c_out=dims, stride=st.integers(1, 2), scale=scales, seed=st.integers(0, 2**16))
def test_conv_well_normed(c_in, c, c_out, stride, scale, seed):
    model = ConvNet(c_in, c, c_out, stride=stride).double()
    x = unit_rms((2, c_in, 7), torch.Generator().manual_seed(seed), channel_dim=1)
    check_bound(model, x, scale, seed, channel_dim=1)


# ------------------------------------------------------------------------------- tightness
@pytest.mark.parametrize("scale", [None, "rms"])
@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9)])
def test_linear_atom_tight(shape, scale):
    d_out, d_in = shape
    model = mlp([d_in, d_out])
    tree = from_torch(model, scale=scale)
    put_on_manifold(model, tree, torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(torch.randn(d_out, d_in, dtype=torch.float64), full_matrices=False)
    delta = U[:, :1] @ Vh[:1]  # rank one; the input along its right singular vector
    x = (Vh[:1] * math.sqrt(d_in))  # unit RMS
    dy = output_change(model, x, {"0.weight": delta})
    ratio = float(rms_rows(dy) / tree.norm({"0.weight": delta}))
    assert 0.99 <= ratio <= TOL


def test_embedding_atom_tight():
    model = EmbedMLP(5, 8, 3).double()
    emb = torch.nn.Sequential(model.emb)
    tree = from_torch(emb)
    put_on_manifold(emb, tree, torch.Generator().manual_seed(0))
    delta = torch.zeros(5, 8, dtype=torch.float64)
    delta[2] = torch.randn(8, dtype=torch.float64)
    dy = output_change(emb, torch.tensor([2, 0]), {"0.weight": delta})
    assert 0.99 <= float(rms_rows(dy) / tree.norm({"0.weight": delta})) <= TOL


def test_conv_atom_tight():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 5, 3, padding=1, bias=False)).double()
    tree = from_torch(model)
    put_on_manifold(model, tree, torch.Generator().manual_seed(0))
    x = unit_rms((1, 3, 6), torch.Generator().manual_seed(1), channel_dim=1)
    assert 0.99 <= aligned_search(model, tree, x, channel_dim=1) <= TOL


def test_bias_and_gain_atoms_tight_when_given_mass():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 6)).double()
    tree = from_torch(lin, masses={"0.weight": 0.0, "0.bias": 1.0})  # the bias alone carries the mass
    delta = {"0.bias": torch.randn(6, dtype=torch.float64)}
    dy = output_change(lin, unit_rms((2, 4)), delta)
    assert 0.99 <= float(rms_rows(dy) / tree.norm(delta)) <= TOL
    ln = torch.nn.Sequential(torch.nn.LayerNorm(6, elementwise_affine=True, bias=False)).double()
    tree = from_torch(ln, masses={"0.weight": 1.0})
    delta = {"0.weight": torch.zeros(6, dtype=torch.float64)}
    delta["0.weight"][1] = 0.7
    x = torch.full((1, 6), -1.0, dtype=torch.float64)
    x[0, 1] = 5.0  # normalised output concentrated on coordinate 1
    dy = output_change(ln, x, delta)
    ratio = float(rms_rows(dy) / tree.norm(delta))
    assert 0.9 <= ratio <= TOL  # after centering the concentration is (5+1)/√(36+5)·… ≈ 0.93 of √6


COMPOSITES = {
    "mlp-relu": lambda: mlp([8, 8, 8, 8], "relu"),
    "mlp-gelu": lambda: mlp([8, 8, 8], "gelu"),
    "mlp-tanh-rect": lambda: mlp([6, 10, 4], "tanh"),
    "residual": lambda: ResidualMLP(8, 8, 8, blocks=2).double(),
    "residual-scaled": lambda: ResidualMLP(8, 8, 8, blocks=1, a=0.5).double(),
    "concat": lambda: Concat(8, 4, 4, 8).double(),
    "embedding": lambda: EmbedMLP(6, 8, 8).double(),
    "conv": lambda: ConvNet(4, 4, 4).double(),
}


@pytest.mark.parametrize("scale", [None, "rms"])
@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_tightness(name, scale):
    """Some on-manifold weights, unit-RMS input and aligned Δw reach ≥ half the bound, and none
    exceeds it. Candidates: identity-like weights with a positive input (every ReLU active), and
    random weights."""
    best = 0.0
    for identity, seed in ((True, 0), (False, 1)):
        if True:
            torch.manual_seed(seed)
            model = COMPOSITES[name]()
            tree = from_torch(model, scale=scale)
            put_on_manifold(model, tree, torch.Generator().manual_seed(seed), identity=identity)
            tree = from_torch(model, scale=scale)
            gen = torch.Generator().manual_seed(seed)
            if name == "embedding":
                x = torch.randint(0, 6, (2,), generator=gen)
            elif name == "conv":
                x = unit_rms((1, 4, 5), gen, channel_dim=1, positive=identity)
            else:
                x = unit_rms((2, 8 if name != "mlp-tanh-rect" else 6), gen, positive=identity)
            r = aligned_search(model, tree, x, channel_dim=1 if name == "conv" else -1)
            assert r <= TOL, f"{name}: ratio {r} exceeds the bound"
            best = max(best, r)
    assert best >= 0.5, f"{name} ({scale}): best aligned ratio {best:.3f} < 0.5 — the bound is loose"
