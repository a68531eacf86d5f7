"""Diagnostics of transformers' Conv1D (GPT-2's Linear stored (in, out)) and of non-finite weights."""
import math
import warnings

import pytest
import torch
from torch import nn

from modman import ManifoldMuon
from modman.diagnostics import SpectrumTracker, matrix_stats, singular_values, spectrum_table
from modman.manifolds import Stiefel

conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D


def _net():
    torch.manual_seed(0)
    return nn.Sequential(conv1d(24, 8), nn.ReLU(), conv1d(8, 24))  # 8 → 24 → 8: weights 8×24 and 24×8 stored (in, out)


def test_the_tracker_sees_conv1d_weights_as_the_optimizer_does():
    """The tracker re-viewed each weight by reshaping it to the optimizer's (out, in) shape: a
    reshape is not a transpose, and GPT-2's non-square weights recorded σ 0.56…1.42 and distance
    0.44 for weights on the manifold (the update norms were of scrambled matrices too)."""
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(net.modules(), lr=0.05, solver="projected", budget="uniform")
    tracker = SpectrumTracker(net, every=1, spectrum_every=1, manifolds=opt).attach(opt)  # exact records
    g = torch.Generator().manual_seed(1)
    before = {}
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt.zero_grad()
        (net(torch.randn(16, 8, generator=g)) * torch.randn(16, 8, generator=g)).sum().backward()
        opt.step()
    for name, p in net.named_parameters():
        if p.ndim < 2:
            continue
        track = tracker.tracking.params[name]
        assert track.shape == tuple(p.mT.shape), "(out, in)"
        s = torch.linalg.svdvals(p.detach().double())
        assert track.values["sigma_max"][-1] == pytest.approx(float(s.max()), abs=1e-6)
        assert track.values["sigma_min"][-1] == pytest.approx(float(s.min()), abs=1e-6)
        assert track.values["distance"][-1] < 1e-5
        update = float(torch.linalg.matrix_norm((p.detach() - before[name]).double(), 2))
        assert track.values["update_norm"][-1] == pytest.approx(update, rel=1e-5)


def test_a_conv1d_weight_on_the_rms_manifold_is_at_distance_zero():
    """Given the module (no optimizer), the table read the stored (in, out) layout: a weight on
    Stiefel("rms") — σ = √(d_out/d_in) of its (out, in) map — was reported at distance 2."""
    net = _net()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.copy_(Stiefel("rms").project(layer.weight.mT).mT)
    rows = {line.split()[0]: line.split() for line in spectrum_table(net, manifolds=Stiefel("rms")).splitlines()[2:]}
    for name in ("0.weight", "2.weight"):
        assert float(rows[name][-3]) < 1e-5, rows[name]
    assert rows["0.weight"][1:4] == ["8×24", "→", "24×8ᵀ"], "the table shows the transposed view"
    square = spectrum_table(nn.Sequential(conv1d(8, 8))).splitlines()[2].split()
    assert square[1:4] == ["8×8", "→", "8×8ᵀ"], "a square one too"


def test_non_finite_weights_give_nan_statistics_not_a_lapack_error():
    """spectrum_table, matrix_stats and singular_values raised LAPACK's "ill-conditioned" error,
    naming no parameter; the tracker records such a weight as NaN, and so do they now."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
        net[1].weight[1, 2] = float("inf")
    rows = {line.split()[0]: line.split() for line in spectrum_table(net).splitlines()[2:]}
    assert rows["0.weight"][2:7] == ["nan"] * 5 and rows["1.weight"][2:7] == ["nan"] * 5
    assert math.isnan(matrix_stats(net[0].weight)["sigma_max"])
    assert torch.isnan(singular_values(net[1].weight)).all()
    assert torch.isfinite(singular_values(torch.eye(3))).all()


def test_integer_and_complex_parameters_are_left_out():
    """A complex weight reported σ = [1, 0] where the true values are [2, 1.41] (its real part's);
    integer and bool parameters were tabulated as weights. Both are left out (complex ones with a
    warning: one FFT filter must not stop the table of a whole model)."""
    counts = nn.Parameter(torch.arange(12).reshape(3, 4), requires_grad=False)
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0 + 1.0j]])
    with pytest.warns(UserWarning, match="z is complex"):
        rows = spectrum_table([("counts", counts), ("z", z), ("w", torch.eye(3))]).splitlines()[2:]
    assert [line.split()[0] for line in rows] == ["w"]


def test_a_wide_non_finite_weight_gives_nan_statistics_too():
    """Past EXACT_MAX_DIM the statistics come from Lanczos, which refused the NaN naming nothing."""
    W = torch.randn(300, 300)
    W[3, 4] = float("nan")
    stats = matrix_stats(W, exact_max_dim=256)
    assert math.isnan(stats["sigma_max"]) and not stats["exact"]
    rows = {line.split()[0]: line.split() for line in spectrum_table([("w", W)], exact_max_dim=256).splitlines()[2:]}
    assert rows["w"][2:7] == ["nan"] * 5


def test_a_stacks_sigma_min_between_spectrum_steps_is_tracked_like_a_matrix():
    """A 3-D stack's σ_min came from a batched shifted power iteration: 1.6–1.9× the true value
    between spectrum steps (so κ and the distance were understated), where a 2-D weight's inverse
    iteration is within a few %. Each matrix of a stack is now estimated as a 2-D one."""
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(3, 96, 80) / 10)
    opt = torch.optim.AdamW([stack], lr=3e-3)
    tracker = SpectrumTracker([("e", stack)], every=3, spectrum_every=30).attach(opt)
    g = torch.Generator().manual_seed(1)
    ratios = []
    for step in range(31):
        opt.zero_grad()
        (stack.sum(0) * torch.randn(96, 80, generator=g)).sum().backward()
        opt.step()
        track = tracker.tracking.params["e"]
        if step % 3 == 0 and not track.exact[-1]:
            exact = float(torch.linalg.svdvals(stack.detach().double())[..., -1].min())
            ratios.append(track.values["sigma_min"][-1] / exact)
    assert len(ratios) >= 8 and all(0.999 <= r <= 1.05 for r in ratios), ratios


def test_meta_weights_are_refused_by_name():
    """A model built on the meta device has shapes and no values: spectrum_table, matrix_stats and
    SpectrumTracker failed with torch's "Cannot copy out of meta tensor; no data!" (the tracker
    only at its first record). Each now names the weight and says what to do."""
    from modman.diagnostics import SpectrumTracker, matrix_stats, spectrum_table

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    for call in (lambda: spectrum_table(model), lambda: SpectrumTracker(model, every=1)):
        with pytest.raises(ValueError, match=r"0.weight is on the meta device .*materialise the model"):
            call()
    with pytest.raises(ValueError, match="matrix_stats: W is on the meta device"):
        matrix_stats(model[0].weight)


@pytest.mark.parametrize("kappa", [1e8, 1e10, 1e14])
def test_an_fp64_weight_gets_its_small_singular_values(kappa):
    """Through the Gram, σᵢ are known to ≈ 1e-8·σ₁: an fp64 weight of κ = 1e10 read κ = ∞ and
    σ_min = 0, κ = 1e8 was 8 % off (a probe). fp64 weights get svdvals (oracle: the σ built in)."""
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(40, 30, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -math.log10(kappa), 30, dtype=torch.float64)
    W = U @ torch.diag(s) @ V.T
    st = matrix_stats(W, exact=True)
    assert st["sigma_min"] == pytest.approx(float(s[-1]), rel=1e-2, abs=0)  # (σ_min down to 1e-14)
    assert st["condition"] == pytest.approx(kappa, rel=1e-2)
    assert singular_values(W)[-1].item() == pytest.approx(float(s[-1]), rel=1e-2, abs=0)
    bad = W.clone()
    bad[0, 0] = math.nan
    assert torch.isnan(singular_values(bad)).all()


def test_the_tracker_reads_a_transposed_expert_stack_as_the_optimizer_does():
    """Expert stacks transformers marks is_transposed ((E, in, out)) were read by a reshape to
    (E, out, in), which scrambles them: σ 0.91–2.34 and distance 0.47 for a stack on Stiefel(rms)
    at σ = 1.73 (a review)."""
    import warnings

    import modman
    from modman.diagnostics import SpectrumTracker

    class Experts(torch.nn.Module):
        has_gate, is_transposed = True, True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 8, 24))

    e = Experts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = modman.ManifoldMuon(e.modules(), lr=0.05, scale="rms", budget="uniform")
        tracker = SpectrumTracker(e, manifolds=opt)
    tracker.record(0)
    track = tracker.tracking.params["gate_up_proj"]
    assert track.shape == (3, 24, 8)
    s = torch.linalg.svdvals(e.gate_up_proj.detach().mT.double())
    assert abs(track.values["sigma_max"][-1] - float(s.max())) < 1e-4
    assert abs(track.values["sigma_min"][-1] - float(s.min())) < 1e-4
    assert track.values["distance"][-1] < 1e-4
