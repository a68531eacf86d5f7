"""Lanczos / power-iteration estimators against torch.linalg.svdvals (the issue's bar: σ_max and
stable rank within 1 % on ≥ 512×512 matrices)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.diagnostics import lanczos_svals, sigma_max_estimate, stable_rank_estimate
from modman.diagnostics.estimators import power_iteration


def _spectrum_matrix(m, n, sv, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(sv)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * sv) @ V.T).float()


def _cases():
    g = torch.Generator().manual_seed(1)
    k = torch.arange(1, 513, dtype=torch.float64)
    return {
        "gaussian_512": torch.randn(512, 512, generator=g),
        "tall_1024x512": torch.randn(1024, 512, generator=g),
        "wide_512x768": torch.randn(512, 768, generator=g),
        "power_law": _spectrum_matrix(512, 512, k**-0.5),
        "near_orthogonal": _spectrum_matrix(512, 512, 1 + 1e-3 * torch.randn(512, generator=g, dtype=torch.float64)),
        "low_rank_plus_noise": (torch.randn(512, 4, generator=g) @ torch.randn(4, 512, generator=g)
                                + 0.05 * torch.randn(512, 512, generator=g)),
        "close_top_pair": _spectrum_matrix(512, 512, torch.cat([torch.tensor([1.0, 0.999], dtype=torch.float64),
                                                                 torch.linspace(0.99, 0.01, 510, dtype=torch.float64)])),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_sigma_max_and_stable_rank_within_1_percent(name):
    W = CASES[name]
    s = torch.linalg.svdvals(W.double())
    est = lanczos_svals(W)
    true_sr = float((s**2).sum() / s[0] ** 2)
    assert abs(float(est.sigma_max) / float(s[0]) - 1) < 1e-2
    assert abs(float(est.stable_rank) / true_sr - 1) < 1e-2
    # one-sided in exact arithmetic: Ritz values lie inside [σ_min, σ_max] (up to fp32 rounding)
    assert float(est.sigma_max) <= float(s[0]) * (1 + 1e-5)
    assert float(est.sigma_min) >= float(s[-1]) * (1 - 1e-5) - 1e-5 * float(s[0])
    assert est.iterations < 512  # cheaper than the full space


def test_batched_stack_matches_each_matrix():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(2, 256, 256, generator=g) * torch.tensor([1.0, 2.0]).view(2, 1, 1)
    s = torch.linalg.svdvals(W.double())
    est = sigma_max_estimate(W)
    assert est.shape == (2,)
    torch.testing.assert_close(est, s[:, 0], rtol=1e-2, atol=0)
    sr = stable_rank_estimate(W)
    torch.testing.assert_close(sr, (s**2).sum(-1) / s[:, 0] ** 2, rtol=1e-2, atol=0)


def test_full_space_gives_every_singular_value():
    W = torch.randn(30, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = lanczos_svals(W, rtol=0, max_iters=100)
    assert est.iterations == 12
    torch.testing.assert_close(est.ritz, torch.linalg.svdvals(W), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["orthogonal", "rank_one", "zero"])
def test_breakdown_is_handled(kind):
    g = torch.Generator().manual_seed(4)
    if kind == "orthogonal":  # every σ equal: the Krylov space is invariant after one step
        W = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))[0]
    elif kind == "rank_one":
        W = torch.randn(120, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 80, generator=g, dtype=torch.float64)
    else:
        W = torch.zeros(120, 80, dtype=torch.float64)
    est = lanczos_svals(W, rtol=0, max_iters=20)
    s = torch.linalg.svdvals(W)
    assert torch.isfinite(est.ritz).all()
    torch.testing.assert_close(est.sigma_max, s[0], rtol=1e-10, atol=1e-12)
    if kind == "orthogonal":
        torch.testing.assert_close(est.sigma_min, s[-1], rtol=1e-10, atol=0)


def test_power_iteration_warm_start_converges_and_is_one_sided():
    W = _spectrum_matrix(256, 128, torch.linspace(2.0, 0.5, 128, dtype=torch.float64), seed=5)
    s = torch.linalg.svdvals(W.double())
    top, v = power_iteration(W, iters=20)
    assert float(top) <= float(s[0]) * (1 + 1e-6)
    for _ in range(10):  # warm restarts, as the tracker does between records
        top, v = power_iteration(W, v, iters=20)
    assert abs(float(top) / float(s[0]) - 1) < 1e-3
    bottom, _ = power_iteration(W, iters=200, smallest=True, shift=1.01 * float(s[0]) ** 2)
    assert float(bottom) >= float(s[-1]) * (1 - 1e-6)
    assert abs(float(bottom) / float(s[-1]) - 1) < 2e-2


@pytest.mark.parametrize("bad, error", [(torch.zeros(5), ValueError), (torch.zeros(3, 0), ValueError),
                                        (torch.ones(4, 4, dtype=torch.int64), TypeError),
                                        (torch.full((4, 4), float("nan")), ValueError), ([[1.0]], TypeError)])
def test_bad_input_raises(bad, error):
    with pytest.raises(error):
        lanczos_svals(bad)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="rtol"):
        lanczos_svals(torch.eye(4), rtol=-1)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1e-30, 1e-23, 1e-12, 1.0, 1e12, 1e19, 1e20]), st.integers(0, 2**16))
def test_lanczos_is_scale_equivariant_in_fp32_at_any_scale(c, seed):
    """σ(cW) = c·σ(W): the fp32 recurrence overflowed from ~1e19 (LinAlgError) and underflowed
    below ~1e-23 (σ_max = 0 at 1e-30); each matrix is now divided by a power of 2 near its largest
    entry and the values scaled back. Oracle: fp64 singular values of the unscaled matrix."""
    W = torch.randn(40, 12, generator=torch.Generator().manual_seed(seed))
    est = lanczos_svals((W.double() * c).float(), rtol=0.0)
    exact = torch.linalg.svdvals(W.double())
    # abs=0: pytest.approx's default absolute tolerance (1e-12) passed σ_max = 0 at these scales
    assert float(est.sigma_max) == pytest.approx(c * float(exact[0]), rel=1e-5, abs=0)
    assert float(est.frobenius_sq) == pytest.approx(c * c * float((exact ** 2).sum()), rel=1e-5, abs=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.sampled_from([1e-6, 1.0, 1e3]), st.integers(0, 2**31 - 1))
def test_symmetric_lanczos_extremes_are_one_sided_and_exact_at_full_depth(n, steps, spread, seed):
    """Ritz values of the symmetric Lanczos the tracker uses on clustered Gram spectra: within
    [λ_min, λ_max] up to rounding, the Ritz vectors' Rayleigh quotients; with steps ≥ n the exact
    extremes. Spectra 1 + spread·U(0, 1), the tracker's case at spread 1e-6 (oracle: eigvalsh)."""
    from modman.diagnostics.estimators import symmetric_lanczos_extremes

    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = 1 + spread * torch.rand(n, generator=g, dtype=torch.float64)
    G = (Q * lam) @ Q.T
    lo, hi, u_lo, u_hi = symmetric_lanczos_extremes(G, torch.randn(n, generator=g, dtype=torch.float64), steps)
    tol = 1e-12 * (1 + spread)
    assert float(lam.min()) - tol <= lo <= hi <= float(lam.max()) + tol
    for theta, u in ((lo, u_lo), (hi, u_hi)):
        assert float(u @ u) == pytest.approx(1.0, abs=1e-10)
        assert float(u @ G @ u) == pytest.approx(theta, abs=tol)
    if steps >= n:
        assert lo == pytest.approx(float(lam.min()), abs=tol) and hi == pytest.approx(float(lam.max()), abs=tol)


def test_symmetric_lanczos_on_an_exact_identity_restarts_instead_of_dividing_by_zero():
    from modman.diagnostics.estimators import symmetric_lanczos_extremes

    lo, hi, u_lo, u_hi = symmetric_lanczos_extremes(torch.eye(30, dtype=torch.float64), torch.ones(30), 24)
    assert lo == pytest.approx(1.0, abs=1e-14) and hi == pytest.approx(1.0, abs=1e-14)
    assert torch.isfinite(u_lo).all() and torch.isfinite(u_hi).all()
    with pytest.raises(ValueError, match="steps ≥ 1"):
        symmetric_lanczos_extremes(torch.eye(3, dtype=torch.float64), torch.ones(3), 0)
