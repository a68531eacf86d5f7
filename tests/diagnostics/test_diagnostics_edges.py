"""Diagnostics papercuts found by a probe: plots that failed after opening a figure, bound markers
on exact table values, spectral_norm of fp64 weights, the tracker's lifetime, unclear errors."""
import re
import warnings

import matplotlib
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from modman.diagnostics import SpectrumTracker, singular_values, spectral_norm, spectrum_table
from modman.diagnostics.plots import plot_history, plot_metric

matplotlib.use("Agg")


def _tracked_run():
    torch.manual_seed(0)
    m = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tracker = SpectrumTracker(m, every=1).attach(opt)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(5, 4)).sum().backward()
        opt.step()
    tracker.detach()
    return tracker.tracking


@pytest.mark.parametrize("call, error, message", [
    (lambda run: plot_metric({"a": run}, "bogus"), KeyError, r"plot_metric: unknown metric 'bogus'; choose from"),
    (lambda run: plot_history({"a": [{"loss": 1.0}]}), ValueError, r"plot_history: row 0 of 'a' .* 'step'"),
    (lambda run: plot_history({"a": [{"step": 0, "loss": 1.0}, 3.0]}), ValueError, r"row 1 of 'a' is 3\.0"),
], ids=["bad-metric", "row-without-step", "row-not-a-dict"])
def test_a_failing_plot_leaves_no_figure_open(call, error, message):
    """The figure was created before the inputs were checked: a KeyError ('step', bare, for a
    history row without one) left it open in pyplot's registry, where notebooks pile them up."""
    import matplotlib.pyplot as plt

    run = _tracked_run()
    before = plt.get_fignums()
    with pytest.raises(error, match=message):
        call(run)
    assert plt.get_fignums() == before


def _columns(table: str) -> dict[str, dict[str, str]]:
    """{parameter: {column: cell}} of a spectrum_table (cells are separated by two spaces or more)."""
    header, _, *rows = (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_only_values_from_ritz_estimates_carry_bound_markers():
    """On the Lanczos path a sphere's distance (exact, from row norms) was printed "≥7.7e-08" and a
    Euclidean one "≥0"; the σ's, κ, stable rank and a Stiefel distance are the estimates' bounds."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(50, 8), "lin": nn.Linear(8, 8, bias=False),
                           "free": nn.Linear(8, 6, bias=False)})
    kinds = {"emb.weight": "sphere", "lin.weight": "stiefel", "free.weight": "euclidean"}
    rows = _columns(spectrum_table(model, kinds, exact_max_dim=1))
    for name, kind in kinds.items():
        row = rows[name]
        assert row["method"] == "lanczos" and row["manifold"] == kind
        assert row["σ_min"][0] == "≤" and row["σ_max"][0] == "≥" and row["cond"][0] == "≥"
        assert row["stable rank"][0] == "≤"
        assert row["distance"].startswith("≥") == (kind == "stiefel") and row["distance"][0] != "≤"
    assert rows["free.weight"]["distance"] == "0"
    exact = _columns(spectrum_table(model, kinds))
    assert not any(c[:1] in "≤≥" for row in exact.values() for c in row.values())


@given(shape=st.sampled_from([(7, 5), (5, 7), (16, 16), (3, 6, 4)]), seed=st.integers(0, 2**31 - 1),
       exponent=st.integers(-300, 300))
def test_spectral_norm_of_fp64_weights_is_fp64_accurate(shape, seed, exponent):
    """Small matrices are exact: for an fp64 W to fp64 precision against svdvals (it was computed
    from an fp32 Gram, 1.7e-7 relative off)."""
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.0**exponent
    want = float(torch.linalg.svdvals(W)[..., 0].max())
    assert spectral_norm(W) == pytest.approx(want, rel=1e-13)


def test_tracker_as_a_context_manager_detaches_on_exit():
    """Hooks held the tracker until detach(); deleting it left them recording."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        m(torch.randn(5, 4)).sum().backward()
        opt.step()

    with SpectrumTracker(m, every=1).attach(opt) as tracker:
        step()
        step()
    assert tracker.tracking.params["weight"].steps == [0, 1]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    step()
    assert tracker.tracking.params["weight"].steps == [0, 1]


@pytest.mark.parametrize("form", ["hooks", "callback"])
def test_a_failing_record_releases_the_weights_copied_before_the_step(form, monkeypatch):
    """A record raising kept the copy of every weight taken before the step until the next one."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tracker = SpectrumTracker(m, every=2)
    if form == "hooks":
        tracker.attach(opt)

    def fail(*args, **kwargs):
        raise RuntimeError("record failed")

    for step in range(3):
        opt.zero_grad()
        m(torch.randn(5, 4)).sum().backward()
        if step == 2:
            monkeypatch.setattr(tracker, "_record", fail)
            with pytest.raises(RuntimeError, match="record failed"):
                opt.step() if form == "hooks" else (opt.step(), tracker(step))
        else:
            opt.step()
            if form == "callback":
                tracker(step)
    assert tracker._snapshot is None
    tracker.detach()


def test_unclear_errors_of_the_diagnostics_are_named():
    # singular_values of a vector raised IndexError; spectrum_table of an empty Linear said "none
    # with ≥ 2 dimensions", although its weight has two
    with pytest.raises(ValueError, match=r"singular_values needs a matrix .* shape \(5,\)"):
        singular_values(torch.randn(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: initialising a zero-element tensor is a no-op)
        empty = nn.Linear(0, 3)
    with pytest.raises(ValueError, match=r"empty one, e\.g\. a Linear\(0, n\)'s weight, has no spectrum"):
        spectrum_table(empty)
