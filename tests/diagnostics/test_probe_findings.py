"""Findings of a probe of modman.diagnostics: a tracker attached to one of two optimizers, NaN or
huge weights on paths that did not scale or check them, parametrized and lazy layers, run names
that collide once made str, unreadable files, plot_trajectories given several runs, unchecked
arguments."""
import math
import warnings

import matplotlib
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from modman.diagnostics import (SpectrumTracker, lanczos_svals, load_tracking, save_tracking, singular_values,
                                spectral_norm, spectrum_table)
from modman.diagnostics.plots import plot_trajectories

matplotlib.use("Agg")


@pytest.mark.parametrize("adamw_first", [True, False], ids=["adamw-steps-first", "muon-steps-first"])
def test_weights_another_optimizer_steps_have_unknown_update_metrics(adamw_first):
    """torch.optim.Muon's setup (Muon for the hidden matrices, AdamW for the embedding and head),
    tracker attached to Muon: the embedding's update_norm read 0 (the hooks saw it unchanged
    between Muon's pre- and post-hook) though AdamW moved it by 0.06."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 20))
    tokens, labels = torch.randint(0, 20, (16, 4)), torch.randint(0, 20, (16,))
    muon = torch.optim.Muon([model[2].weight], lr=0.02)
    adamw = torch.optim.AdamW([model[0].weight, model[2].bias, model[4].weight, model[4].bias], lr=1e-2)
    tracker = SpectrumTracker(model, every=1, spectrum_every=1).attach(muon)  # (exact update norms)
    callback = SpectrumTracker(model, every=1, spectrum_every=1)  # the documented way to see both
    for step in range(2):
        muon.zero_grad()
        adamw.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        hidden_before, emb_before = model[2].weight.detach().clone(), model[0].weight.detach().clone()
        for opt in ((adamw, muon) if adamw_first else (muon, adamw)):
            opt.step()
        callback(step)
    emb, hidden = tracker.tracking.params["0.weight"], tracker.tracking.params["2.weight"]
    assert all(math.isnan(v) for v in emb.values["update_norm"] + emb.values["update_alignment"])
    assert emb.update_exact == [False, False]
    assert all(v > 0 for v in emb.values["grad_norm"])  # its gradient is known all the same
    true = torch.linalg.matrix_norm((model[2].weight.detach() - hidden_before).double(), 2).item()
    assert hidden.values["update_norm"][-1] == pytest.approx(true, rel=1e-4)
    assert all(math.isfinite(v) for v in hidden.values["update_alignment"])
    true = torch.linalg.matrix_norm((model[0].weight.detach() - emb_before).double(), 2).item()
    assert callback.tracking.params["0.weight"].values["update_norm"][-1] == pytest.approx(true, rel=1e-4)


def test_a_tracked_tensor_sharing_the_stepped_weights_storage_is_measured():
    """{"w": weight.detach()} (the documented name → tensor form) is the weight the optimizer steps:
    its update read NaN when the held weights were matched by identity (a review)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    tracker = SpectrumTracker({"w": lin.weight.detach()}, every=1, spectrum_every=1).attach(opt)
    before = lin.weight.detach().clone()
    lin(torch.randn(3, 6)).square().sum().backward()
    opt.step()
    true = torch.linalg.matrix_norm((lin.weight.detach() - before).double(), 2).item()
    assert tracker.tracking.params["w"].values["update_norm"][-1] == pytest.approx(true, rel=1e-4)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_spectral_norm_of_a_large_matrix_with_a_nan_or_inf_is_nan(bad):
    """Above exact_max_dim the Lanczos path raised "lanczos_svals: W contains NaN or Inf" where
    the docstring (and the exact path) say NaN."""
    torch.manual_seed(0)
    W = torch.randn(2, 20, 10)
    W[1, 0, 0] = bad
    assert math.isnan(spectral_norm(W, exact_max_dim=4))
    assert math.isnan(spectral_norm(W, exact_max_dim=64))  # the exact path, as before


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_singular_values_in_fp32_of_a_huge_or_tiny_finite_matrix(scale):
    """The fp32 Gram of W itself overflowed at 1e20 (NaN, for a finite W) and flushed to 0 at 1e-25."""
    torch.manual_seed(0)
    W = torch.randn(3, 4, 3, dtype=torch.float64) * scale
    s = singular_values(W, torch.float32)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(W), rtol=1e-5, atol=0)


def _weight_normed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), parametrizations.weight_norm(nn.Conv1d(4, 5, 3)))


@pytest.mark.parametrize("call", [spectrum_table, SpectrumTracker], ids=["table", "tracker"])
def test_a_parametrized_weight_is_named_in_a_warning(call):
    """weight_norm's v (5×4×3) was read as five 4×3 matrices and its g (5×1×1) as five 1×1 ones,
    silently: the statistics of stored tensors, not of the weight the layer applies."""
    with pytest.warns(UserWarning, match=r"1\.parametrizations\.weight\.original0, "
                                         r"1\.parametrizations\.weight\.original1: .*parametriz.*\(1\.weight\)"):
        call(_weight_normed())


def test_an_unparametrized_model_gets_no_parametrization_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectrum_table(nn.Sequential(nn.Linear(6, 4), nn.Conv1d(4, 5, 3)))


@pytest.mark.parametrize("call", [spectrum_table, SpectrumTracker], ids=["table", "tracker"])
def test_a_lazy_layer_before_its_first_forward_is_refused_by_name(call):
    """A LazyLinear's UninitializedParameter (ndim 1) was left out silently: a tracker built then
    never tracked the layer."""
    model = nn.Sequential(nn.Linear(4, 5), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"1\.weight.*forward"):
        call(model)
    with pytest.raises(ValueError, match=r"lazy\.w.*forward"):
        call({"lazy.w": nn.parameter.UninitializedParameter(), "w": torch.randn(3, 2)})
    model(torch.randn(2, 4))
    assert "1.weight" in SpectrumTracker(model).tracking.params


def test_run_names_that_are_the_same_once_made_str_are_refused(tmp_path):
    """{1: a, "1": b} saved one run, silently (meta already refused such keys)."""
    a, b = SpectrumTracker({"w": torch.randn(4, 3)}), SpectrumTracker({"w": torch.randn(4, 3)})
    with pytest.raises(TypeError, match=r"runs has keys 1 and '1', the same once made str"):
        save_tracking(tmp_path / "two.pt", {1: a, "1": b})
    assert not (tmp_path / "two.pt").exists()


@pytest.mark.parametrize("content", [b"hello", b""], ids=["text", "empty"])
def test_loading_a_file_that_is_not_a_tracking_file_names_it(tmp_path, content):
    """A text file raised a bare KeyError: 101 from torch.load."""
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"notes\.pt is not a readable modman tracking file.*torch\.load raised"):
        load_tracking(path)


def test_plot_trajectories_refuses_several_runs():
    """Given {"adamw": a, "muon": b} it drew a's trajectories alone, silently."""
    import matplotlib.pyplot as plt

    runs = {}
    for name, scale in (("adamw", 1.0), ("muon", 3.0)):
        runs[name] = SpectrumTracker({"w": scale * torch.randn(6, 4)}, every=1)
        runs[name].record(0)
        runs[name].record(1)
    before = plt.get_fignums()
    with pytest.raises(ValueError, match=r"plot_trajectories takes one run.*'adamw', 'muon'"):
        plot_trajectories(runs)
    assert plt.get_fignums() == before
    fig = plot_trajectories({"adamw": runs["adamw"]})  # one run, in a dict, as before
    assert len(fig.axes[0].get_lines()) == 4 + 1  # its 4 singular values and the line at 1
    plt.close(fig)


def test_unchecked_arguments_are_refused_by_name():
    """lanczos_svals took rtol=nan (no step converges; max_iters ran silently) and
    SpectrumTracker(exact_max_dim="x") failed in a bare int()."""
    with pytest.raises(ValueError, match="rtol"):
        lanczos_svals(torch.randn(20, 10), rtol=math.nan)
    for bad in ("x", 1.5, None, True):
        with pytest.raises(TypeError, match="exact_max_dim"):
            SpectrumTracker(nn.Linear(4, 3), exact_max_dim=bad)
