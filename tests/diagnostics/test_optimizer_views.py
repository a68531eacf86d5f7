"""Diagnostics given an optimizer as the manifolds: parameters it leaves out (frozen) are
Euclidean, each weight is viewed as the optimizer views it (Conv1d flattened), and sphere
distances skip an embedding's zero padding row. Oracles: fp64 SVD / row norms, written here."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modman import ManifoldMuon
from modman.diagnostics import SpectrumTracker, matrix_stats, spectrum_table
from modman.manifolds import Sphere


def _rows(table):
    return {line.split()[0]: line.split() for line in table.splitlines()[2:]}


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(20, 16, padding_idx=0), nn.Conv1d(5, 8, 3, padding=1), nn.Flatten(),
                      nn.Linear(8 * 16, 10))
    m[3].requires_grad_(False)  # a frozen head: the optimizer leaves it out by design
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "moved onto the manifold" warnings
        opt = ManifoldMuon(m.modules(), lr=0.05, solver="projected")
    return m, opt


def _stiefel_distance(W):  # fp64 oracle: max |σ − 1| of the flattened (out, in·k) matrix
    s = torch.linalg.svdvals(W.detach().double().reshape(W.shape[0], -1))
    return float((s - 1).abs().max())


def _sphere_distance(E, r=1.0):  # fp64 oracle over the nonzero rows
    n = E.detach().double().norm(dim=-1)
    return float((n[n > 0] / r - 1).abs().max())


def test_frozen_matrix_is_euclidean_not_an_error():
    m, opt = _model()
    rows = _rows(spectrum_table(m, manifolds=opt))
    assert rows["3.weight"][-2] == "euclidean" and float(rows["3.weight"][-3]) == 0.0
    tracker = SpectrumTracker(m, manifolds=opt)
    assert tracker.tracking.params["3.weight"].manifold == "euclidean"
    assert tracker.tracking.params["1.weight"].manifold == "stiefel"


def test_every_matrix_frozen_is_euclidean_too():
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    m[0].requires_grad_(False)
    opt = ManifoldMuon(m.modules(), lr=0.05)  # holds only the LayerNorm's gain and bias
    assert _rows(spectrum_table(m, manifolds=opt))["0.weight"][-2] == "euclidean"


def test_an_optimizer_of_another_model_is_refused():
    _, opt = _model()
    with pytest.raises(ValueError, match="none of these matrices"):
        spectrum_table(nn.Sequential(nn.Linear(4, 4)), manifolds=opt)


@pytest.mark.parametrize("given_as", ["module", "pairs", "copies"])
def test_optimizer_view_and_padding_row_in_table(given_as):
    m, opt = _model()
    src = {"module": m,
           "pairs": [(n, p) for n, p in m.named_parameters() if p.requires_grad],
           "copies": {n: p.detach().clone() for n, p in m.named_parameters()}}[given_as]  # matched by name
    rows = _rows(spectrum_table(src, manifolds=opt))
    # the Conv1d weight as the optimizer steps on it: one 8×15 matrix on Stiefel, not 8 stacked 5×3
    assert rows["1.weight"][1:4] == ["8×5×3", "→", "8×15"]
    want = _stiefel_distance(m[1].weight)
    assert want < 1e-5
    assert float(rows["1.weight"][-3]) == pytest.approx(want, rel=1e-2, abs=1e-9)
    # the embedding: its zero padding row is not a point off the sphere
    assert float(m[0].weight.detach()[0].abs().max()) == 0.0
    assert float(rows["0.weight"][-3]) == pytest.approx(_sphere_distance(m[0].weight), rel=1e-2, abs=1e-9)
    assert float(rows["0.weight"][-3]) < 1e-5


def test_optimizer_view_and_padding_row_in_every_tracker_record():
    m, opt = _model()
    pairs = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    tracker = SpectrumTracker(pairs, every=2, manifolds=opt).attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        m(torch.randint(0, 20, (4, 5), generator=g)).pow(2).mean().backward()  # (B, 5) ids: 5 channels
        opt.step()
    params = tracker.tracking.params
    assert params["1.weight"].shape == (8, 15)
    assert params["1.weight"].steps == [0, 2, 4]
    for name in ("0.weight", "1.weight"):
        assert max(params[name].values["distance"]) < 1e-5, name
    # relative: the distances are ~1e-7, where abs=1e-7 passed 0
    assert params["1.weight"].values["distance"][-1] == pytest.approx(_stiefel_distance(m[1].weight), rel=1e-6, abs=0)
    assert params["0.weight"].values["distance"][-1] == pytest.approx(_sphere_distance(m[0].weight), rel=1e-6, abs=0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 12), cols=st.integers(1, 8), zero=st.lists(st.booleans(), min_size=12, max_size=12),
       radius=st.sampled_from([1.0, 0.5, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_property_sphere_distance_is_max_over_nonzero_rows(rows, cols, zero, radius, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor(zero[:rows])
    if bool(mask.all()):
        mask[0] = False  # keep one nonzero row: the oracle's max needs one
    W[mask] = 0.0
    got = matrix_stats(W, Sphere(radius))["distance"]
    assert got == pytest.approx(_sphere_distance(W, radius), rel=1e-5, abs=1e-6)
