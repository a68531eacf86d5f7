"""transformers' Conv1D (GPT-2: a Linear whose weight is stored (in, out)), weights given mass 0,
and non-finite changes in ``Module.norm``: regressions from a probe of modman.modular.

Oracles: the same network built from nn.Linear (its budget, its norm of the transposed change),
exact spectral norms in float64, and the definition of steepest descent under the modular norm
(an atom outside the norm does not move)."""
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from modman import ManifoldMuon
from modman.modular import MatrixAtom, budget, budget_table, from_torch

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def _twins(scale=None):
    """GPT-2 style Conv1D layers and the nn.Linear network computing the same function."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(32, 16), nn.GELU(), Conv1D(4, 32)).double()
    lin = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).double()
    with torch.no_grad():
        for c, l in ((conv[0], lin[0]), (conv[2], lin[2])):
            l.weight.copy_(c.weight.T)
            l.bias.copy_(c.bias)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(conv(x), lin(x), atol=1e-12, rtol=0)
    return conv, lin


@pytest.mark.parametrize("scale", [None, "rms"])
def test_conv1d_gets_the_budget_of_the_linear_network_it_equals(scale):
    """Before: no rule, and tracing failed ("<built-in function add> is called with 0 tensor
    inputs"); a description with MatrixAtom read the stored (in, out) as (out, in): 4× the scales."""
    conv, lin = _twins()
    got, want = budget(conv, scale=scale), budget(lin, scale=scale)
    assert set(got) == set(want) == {"0.weight", "2.weight"}
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=0)
    rows = [[(line.split()[0], line.split()[-1]) for line in budget_table(m, scale=scale).splitlines()[2:]]
            for m in (conv, lin)]
    assert len(rows[0]) >= 4 and rows[0] == rows[1]


def test_conv1d_norm_takes_changes_in_the_stored_shape():
    conv, lin = _twins()
    tree_c, tree_l = from_torch(conv), from_torch(lin)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        d0 = torch.randn(16, 32, generator=g, dtype=torch.float64)
        d2 = torch.randn(32, 4, generator=g, dtype=torch.float64)
        got = tree_c.norm({"0.weight": d0, "2.weight": d2})
        want = tree_l.norm({"0.weight": d0.T, "2.weight": d2.T})
        assert float(got) == pytest.approx(float(want), rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="shape"):
        tree_c.norm({"0.weight": torch.zeros(32, 16, dtype=torch.float64)})


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_a_transposed_matrix_atom_measures_the_operator_it_applies(n_in, n_out, seed):
    """MatrixAtom(transposed=True) on a stored (d_in, d_out) weight equals MatrixAtom on its
    transpose: sensitivity, own factor, and the norm of every change (exact SVD of Δᵀ)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_in, n_out, generator=g, dtype=torch.float64)
    for scale in (None, "rms"):
        t = MatrixAtom("w", w, scale=scale, transposed=True)
        plain = MatrixAtom("w", w.T.contiguous(), scale=scale)
        assert (t.d_out, t.d_in) == (n_out, n_in)
        assert t.sensitivity == plain.sensitivity and t.own_factor() == plain.own_factor()
        delta = torch.randn(n_in, n_out, generator=g, dtype=torch.float64)
        exact = math.sqrt(n_in / n_out) * torch.linalg.svdvals(delta.T)[0]
        assert float(t.rms_norm(delta)) == pytest.approx(float(exact), rel=1e-12, abs=0)


def test_manifold_muon_steps_each_conv1d_weight_by_its_modular_share():
    """lr × lr_scale in the spectral norm, measured in float64 on the (out, in) operator."""
    conv, lin = _twins()
    scales = budget(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the weights are moved onto the manifold first
        opt = ManifoldMuon(conv.modules(), lr=1e-3, budget="modular")
    assert {g["param_names"][0]: g["lr_scale"] for g in opt.param_groups if g["algorithm"] != "adamw"} == \
        pytest.approx(scales, rel=1e-12, abs=0)
    before = {n: p.detach().clone() for n, p in conv.named_parameters()}
    conv(torch.randn(8, 16, dtype=torch.float64)).square().sum().backward()
    opt.step()
    for name, scale in scales.items():
        moved = torch.linalg.svdvals((dict(conv.named_parameters())[name].detach() - before[name]).T)[0]
        assert float(moved) == pytest.approx(1e-3 * scale, rel=1e-3), name


def test_a_description_leaving_out_a_conv1d_weight_is_refused():
    """Before: accepted (the check covered torch's layers only) and the optimizer stepped the
    forgotten Stiefel weight lr × 1 among weights at 0.35."""
    from modman.modular import ModularError

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.out = Conv1D(16, 16), nn.Linear(16, 4, bias=False)

        def forward(self, x):
            return self.out(torch.relu(self.c(x)))

    def forget(mod, prefix, opts):
        return MatrixAtom("out.weight", mod.out.weight, 1.0, opts.scale)

    with pytest.raises(ModularError, match=r"never places the trainable parameters \['c.weight', 'c.bias'\]"):
        budget(Block(), custom={Block: forget})


# --------------------------------------------------------------------------- mass 0
def test_a_weight_of_mass_zero_gets_lr_scale_zero_and_does_not_move():
    """Outside the norm (any change to it has norm ∞), steepest descent under the norm leaves it
    where it is. Before: budget() left it out, ManifoldMuon stepped it lr × 1 on Stiefel, and the
    table called it "fallback", though the fallback never trained it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                          nn.Linear(8, 8, bias=False))
    masses = {"2.weight": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero is not a spread of ∞ (nor "frozen"): no warning
        scales = budget(model, masses=masses)
    assert scales["2.weight"] == 0.0 and scales["0.weight"] > 0 and scales["4.weight"] > 0
    row = next(line for line in budget_table(model, masses=masses).splitlines() if line.startswith("2.weight"))
    assert row.split()[-1] == "0" and "∞" in row.split() and "fallback" not in row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(model.modules(), lr=0.1, budget=lambda m: budget(m, masses=masses))
    held = model[2].weight.detach().clone()
    moving = model[0].weight.detach().clone()
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()
    assert torch.equal(model[2].weight, held)
    assert not torch.equal(model[0].weight, moving)


# ---------------------------------------------------------------------- Module.norm
def test_norm_of_a_nan_change_is_nan_everywhere_and_of_nothing_is_fp64():
    """Before: a NaN change to a passenger (bias) read 0 — torch.where(n > 0, ∞, 0) took NaN as
    no change — and a NaN change to a Conv weight raised LinAlgError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3))
    tree = from_torch(model)
    nan = float("nan")
    for name, p in model.named_parameters():
        got = tree.norm({name: torch.full_like(p, nan)})
        assert torch.isnan(got), name
    assert float(tree.norm({"0.bias": torch.ones(4)})) == math.inf
    assert float(tree.norm({"0.weight": torch.full_like(model[0].weight, math.inf)})) == math.inf  # not NaN
    assert float(tree.norm({"0.bias": torch.zeros(4)})) == 0.0
    empty = tree.norm({})
    assert empty.dtype == torch.float64 and float(empty) == 0.0
