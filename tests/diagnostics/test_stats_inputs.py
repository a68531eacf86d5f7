"""matrix_stats, spectral_norm, spectrum_table and the plots on the inputs users hand them: weights
of extreme scale, manifold names, empty and complex weights, compiled and wrapped models."""
import math
import warnings

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modman import ManifoldMuon
from modman.diagnostics import (SpectrumTracker, matrix_stats, peak_temporary_bytes, spectral_norm,
                                spectrum_table)
from modman.diagnostics.plots import plot_history, plot_metric, plot_spectra
from modman.manifolds import Sphere, Stiefel

matplotlib.use("Agg")

_W = torch.randn(12, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_SV = torch.linalg.svdvals(_W)


@settings(max_examples=40, deadline=None)
@given(e=st.integers(-1000, 1000))
def test_fp64_statistics_scale_exactly_with_the_weight(e):
    """σ(2ᵉW) = 2ᵉσ(W) to rounding, for every exponent fp64 holds: an fp64 W near 1e±160 raised
    OverflowError / ZeroDivisionError (σ² overflowed or flushed to zero)."""
    st_ = matrix_stats(torch.ldexp(_W, torch.tensor(e)))
    unit = 2.0**e
    assert st_["sigma_max"] / unit == pytest.approx(float(_SV[0]), rel=1e-13)
    assert st_["sigma_min"] / unit == pytest.approx(float(_SV[-1]), rel=1e-13)
    assert st_["condition"] == pytest.approx(float(_SV[0] / _SV[-1]), rel=1e-13)
    assert st_["stable_rank"] == pytest.approx(float(_SV.square().sum() / _SV[0] ** 2), rel=1e-13)


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e-40])
def test_spectral_norm_of_fp32_weights_of_extreme_scale(scale):
    """An fp32 Gram overflowed at 1e20 (NaN) and flushed to zero at 1e-25 (0.0)."""
    W = (_W * scale).float()
    assert spectral_norm(W) == pytest.approx(float(torch.linalg.svdvals(W.double())[0]), rel=1e-6, abs=0)


def test_a_manifold_name_means_its_manifold():
    """matrix_stats(W, "stiefel") raised "max() arg is an empty sequence"."""
    W = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    for name, manifold in (("stiefel", Stiefel()), ("sphere", Sphere())):
        assert matrix_stats(W, name)["distance"] == matrix_stats(W, manifold)["distance"]
    with pytest.raises(TypeError, match="manifold must be"):
        matrix_stats(W, 3.0)
    with pytest.raises(ValueError, match="unknown manifold"):
        matrix_stats(W, "oblique")


def test_bad_matrices_are_refused_by_name():
    for bad, err, what in ((torch.zeros(0, 3), ValueError, r"non-empty matrix .* shape \(0, 3\)"),
                           (torch.zeros(3), ValueError, r"non-empty matrix .* shape \(3,\)"),
                           (torch.zeros(3, 3, dtype=torch.complex64), TypeError, "real tensor"),
                           (torch.zeros(3, 3, device="meta"), ValueError, "meta device")):
        with pytest.raises(err, match=f"spectral_norm.*{what}"):  # what is wrong, not only the name (an audit)
            spectral_norm(bad)
    with pytest.raises(TypeError, match="matrix_stats: W must be a real tensor"):
        matrix_stats(torch.ones(3, 3, dtype=torch.complex64))  # (statistics of the real part)


def test_an_empty_weight_is_left_out():
    """A Linear(0, 5) made the tracker print a LAPACK error and raise IndexError, and the table
    raise naming no parameter."""
    model = nn.Sequential(nn.Linear(0, 5), nn.Linear(5, 3))
    tracker = SpectrumTracker(model, every=1)
    tracker.record(0)
    assert list(tracker.tracking.params) == ["1.weight"]
    table = spectrum_table(model)
    assert "1.weight" in table and "0.weight" not in table


def test_a_compiled_model_is_named_as_the_optimizer_names_it():
    """The table and tracker named "_orig_mod.0.weight" where the optimizer says "0.weight", and a
    mapping of manifolds by the optimizer's names was refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(compiled.modules())
    names = [n for g in opt.param_groups for n in g["param_names"] if n.endswith("weight")]
    tracker = SpectrumTracker(compiled, manifolds={"0.weight": "stiefel"})
    assert sorted(tracker.tracking.params) == sorted(names) == ["0.weight", "2.weight"]
    assert spectrum_table(nn.DataParallel(model)).splitlines()[2].startswith("0.weight")


def test_plots_take_a_tracker_and_refuse_nothing_to_draw():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    tracker = SpectrumTracker(model, every=1)
    tracker.record(0)
    assert len(plot_metric(tracker, "sigma_max").axes) == 1  # was "not a Tracking"
    with pytest.raises(ValueError, match="params is empty"):
        plot_spectra(tracker, params=[])
    with pytest.raises(ValueError, match="keys is empty"):
        plot_history({"run": [{"step": 0, "loss": 1.0}]}, keys=())


def test_a_nan_spectrum_says_so_in_the_legend():
    model = nn.Linear(5, 4)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    tracker = SpectrumTracker(model, every=1)
    tracker.record(0)
    labels = [t.get_text() for t in plot_spectra(tracker).axes[0].get_legend().get_texts()]
    assert labels == ["run (step 0): NaN, not drawn"]


def test_meta_tensors_hold_no_memory():
    """peak_temporary_bytes counted torch.empty(10**9, device="meta") as 4 GB."""
    assert peak_temporary_bytes(lambda: torch.empty(10**6, device="meta")).peak_bytes == 0
    assert peak_temporary_bytes(lambda: torch.empty(10**3)).peak_bytes == 4000


def test_integer_and_bool_matrices_are_measured_as_their_numbers():
    W = torch.randint(-3, 4, (70, 40), generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.svdvals(W.double())
    for how in (True, False):  # the exact path and Lanczos
        assert matrix_stats(W, exact=how)["sigma_max"] == pytest.approx(float(exact[0]), rel=1e-3, abs=0)
    assert spectral_norm(W, exact_max_dim=10) == pytest.approx(float(exact[0]), rel=1e-3, abs=0)
    B = W > 0
    assert spectral_norm(B) == pytest.approx(float(torch.linalg.svdvals(B.double())[0]), rel=1e-6, abs=0)
