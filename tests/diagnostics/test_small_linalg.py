"""The tracker's CPU linear algebra (NumPy/SciPy) against torch.linalg in float64, and the
tracker's CPU path against its torch path (the one GPUs take) on the same weights."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.diagnostics import SpectrumTracker
from modman.diagnostics import small_linalg as sl


def _matrix(m, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, n, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_gram_eigenvalues_are_the_squared_singular_values(m, n, seed):
    W = _matrix(m, n, seed)
    s = torch.linalg.svdvals(W)  # descending, min(m, n) of them
    ev = sl.gram_eigenvalues(W)
    assert len(ev) == min(m, n) and ev == sorted(ev)
    np.testing.assert_allclose(ev, (s**2).flip(0).numpy(), rtol=1e-10, atol=1e-12 * float(s[0]) ** 2)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), seed=st.integers(0, 10**6), iters=st.integers(1, 4))
def test_iterations_are_one_sided_and_converge(m, n, seed, iters):
    """Power iteration bounds λ_max from below, inverse iteration λ_min from above (Rayleigh
    quotients), at any number of iterations; from a cold start with many they reach the exact
    eigenvalues. ‖D‖₂ by power iteration on D is a lower bound too."""
    X = _matrix(m, n, seed)
    exact = torch.linalg.eigvalsh(X.mT @ X if m >= n else X @ X.mT)
    lo, hi = float(exact[0]), float(exact[-1])
    g = sl.gram_upper(X.numpy())
    k = g.shape[0]
    top, _ = sl.top_eigenvalue(g, np.linspace(1.0, 2.0, k), iters)
    assert top <= hi * (1 + 1e-12)
    bottom, v = sl.bottom_eigenvalue(g, np.linspace(1.0, 2.0, k), iters)
    if v is not None:  # positive definite: a factor exists
        assert bottom >= lo - 1e-9 * hi
    norm, _ = sl.spectral_norm(X.numpy(), np.linspace(1.0, 2.0, n), iters)
    assert norm <= math.sqrt(hi) * (1 + 1e-12)


def test_iterations_converge_from_a_cold_start():
    X = _matrix(30, 12, 7)
    exact = torch.linalg.eigvalsh(X.mT @ X)
    g = sl.gram_upper(X.numpy())
    top, _ = sl.top_eigenvalue(g, np.linspace(1.0, 2.0, 12), 500)
    bottom, _ = sl.bottom_eigenvalue(g, np.linspace(1.0, 2.0, 12), 200)
    assert top == pytest.approx(float(exact[-1]), rel=1e-10)
    assert bottom == pytest.approx(float(exact[0]), rel=1e-10)
    norm, _ = sl.spectral_norm(X.numpy(), np.linspace(1.0, 2.0, 12), 500)
    assert norm == pytest.approx(math.sqrt(float(exact[-1])), rel=1e-10)


def test_bottom_of_a_singular_gram_is_zero():
    X = _matrix(6, 3, 0) @ _matrix(3, 8, 1)  # rank 3 in exact arithmetic; its Gram XXᵀ is 6×6
    g = sl.gram_upper(X.numpy())
    bottom, _ = sl.bottom_eigenvalue(g, np.ones(6), 2)  # rounding may leave a tiny positive pivot
    assert 0.0 <= bottom <= 1e-12 * float(np.trace(g))
    X[0] = 0.0  # a zero row of the wide X: the Gram XXᵀ has a zero pivot, no Cholesky factor
    bottom, v = sl.bottom_eigenvalue(sl.gram_upper(X.numpy()), np.ones(6), 2)
    assert v is None and bottom == 0.0


@pytest.mark.parametrize("shape", [(48, 40), (40, 48), (33, 33)], ids=str)
def test_tracker_cpu_path_equals_its_torch_path(shape):
    """Same iterations from the same start, two libraries: the σ extremes and the update scalars
    agree to rounding, warm starts included."""
    W0 = _matrix(*shape, 3).float()
    W1 = W0 + 1e-2 * _matrix(*shape, 4).float()
    G = _matrix(*shape, 5).float()
    cpu = SpectrumTracker({"w": W0.clone()})
    ref = SpectrumTracker({"w": W0.clone()})
    for W in (W0, W1, W0):  # a cold start, then warm ones
        a = cpu._gram_extremes_cpu("w", W)
        b = ref._gram_extremes_torch("w", W)
        assert a == pytest.approx(b, rel=1e-9)
    assert isinstance(cpu._vectors["w", "top"], np.ndarray) and isinstance(ref._vectors["w", "top"], torch.Tensor)
    assert cpu._gram_extremes("w", W1) == pytest.approx(ref._gram_extremes_torch("w", W1), rel=1e-9)  # CPU dispatch
    for exact in (True, False, False):
        D = W1 - W0
        _, a = cpu._update_metrics_cpu("w", D, G, exact)
        _, b = ref._update_metrics_torch("w", D, G, exact)
        assert a == pytest.approx(b.tolist(), rel=1e-4, abs=1e-6)  # fp32 sums in different orders


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_weight_is_recorded_as_nan_not_raised(bad):
    """LAPACK fails to converge on a NaN Gram: the tracker records NaN statistics instead of
    stopping the training loop, for exact (small) and estimated (large) weights alike, on
    record steps with and without spectra."""
    model = torch.nn.Sequential(torch.nn.Linear(96, 80, bias=False), torch.nn.Linear(80, 5, bias=False))
    params = dict(model.named_parameters())
    params["stack"] = torch.nn.Parameter(torch.randn(2, 30, 20))  # a stack: the torch path
    tracker = SpectrumTracker(params, every=1, spectrum_every=2)
    before = {name: W.clone() for name, W in tracker._copy_weights().items()}
    with torch.no_grad():
        model[0].weight[3, 4] = bad
        model[1].weight[2, 7] = bad
        params["stack"][1, 3, 4] = bad
    for step in (1, 2):  # an estimated record, then a spectrum step
        tracker.record(step, before=before)
    for name in ("0.weight", "1.weight", "stack"):
        values = tracker.tracking.params[name].values
        for key in ("sigma_max", "sigma_min", "condition", "stable_rank", "distance", "update_norm"):
            assert all(math.isnan(v) for v in values[key]), (name, key, values[key])


@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_a_zero_matrix_or_update_does_not_freeze_the_warm_start(path):
    """A zero W (or ΔW) leaves a zero power-iteration vector, which would stay zero for ever:
    the next record must start cold and find the real σ_max and ‖ΔW‖₂."""
    W = _matrix(80, 70, 8).float()
    G = _matrix(80, 70, 9).float()
    tracker = SpectrumTracker({"w": W.clone()})
    extremes = tracker._gram_extremes_cpu if path == "cpu" else tracker._gram_extremes_torch
    update = tracker._update_metrics_cpu if path == "cpu" else tracker._update_metrics_torch
    assert extremes("w", torch.zeros_like(W))[0] == 0.0
    assert extremes("w", W)[0] == pytest.approx(float(torch.linalg.matrix_norm(W.double(), ord=2)), rel=1e-3)
    update("w", torch.zeros_like(W), G, False)
    D = 1e-2 * _matrix(80, 70, 10).float()
    upd = update("w", D, G, False)[1][0]
    assert float(upd) == pytest.approx(float(torch.linalg.matrix_norm(D.double(), ord=2)), rel=0.2)


def test_record_gathers_every_weight_its_own_update_scalars():
    """One record over 2-D weights (NumPy path) and stacks (torch path), one weight without a
    gradient and one without its weights-before: each gets its own ‖ΔW‖₂ (exact, as on a
    spectrum step), ‖G‖_F and alignment −⟨ΔW, G⟩/(‖ΔW‖_F ‖G‖_F)."""
    shapes = {"a": (30, 20), "s1": (2, 12, 10), "b": (16, 24), "s2": (3, 8, 6)}
    W = {k: _matrix(int(np.prod(v[:-1])), v[-1], i).float().reshape(v) for i, (k, v) in enumerate(shapes.items())}
    params = {k: torch.nn.Parameter(w.clone()) for k, w in W.items()}
    before = {k: (w - 1e-2 * _matrix(int(np.prod(w.shape[:-1])), w.shape[-1], 20 + i).float().reshape(w.shape))
              for i, (k, w) in enumerate(W.items()) if k != "b"}
    for i, k in enumerate(("a", "s1", "b")):  # s2 has no gradient
        params[k].grad = _matrix(int(np.prod(W[k].shape[:-1])), W[k].shape[-1], 40 + i).float().reshape(W[k].shape)
    tracker = SpectrumTracker(params)
    tracker.record(5, before=before, exact=True)
    for k, p in params.items():
        values = {key: v[-1] for key, v in tracker.tracking.params[k].values.items()}
        G = p.grad
        assert (math.isnan(values["grad_norm"]) if G is None
                else values["grad_norm"] == pytest.approx(float(G.double().norm()), rel=1e-5)), k
        if k not in before:
            assert math.isnan(values["update_norm"]) and math.isnan(values["update_alignment"])
            continue
        D = (p.detach() - before[k]).double()
        exact = float(torch.linalg.matrix_norm(D, ord=2).max())
        assert values["update_norm"] == pytest.approx(exact, rel=1e-4), k
        if G is None:
            assert math.isnan(values["update_alignment"])
        else:
            cos = -float((D * G.double()).sum()) / (float(D.norm()) * float(G.double().norm()))
            assert values["update_alignment"] == pytest.approx(cos, rel=1e-4, abs=1e-6), k


def test_a_stack_with_one_bad_matrix_reports_nan():
    """A stack reports its worst matrix; a NaN in one of them must not hide behind max()."""
    from modman.diagnostics.spectra import stats_from_floats
    from modman.manifolds import Stiefel

    stats = stats_from_floats(torch.empty(2, 4, 3), [2.0, math.nan], [1.0, math.nan], [5.0, math.nan], Stiefel())
    assert all(math.isnan(v) for v in stats.values())
    stats = stats_from_floats(torch.empty(2, 4, 3), [2.0, 3.0], [1.0, 0.5], [5.0, 9.0], Stiefel())
    assert stats["sigma_max"] == 3.0 and stats["sigma_min"] == 0.5 and stats["condition"] == 6.0
