"""bf16 parameters, and the temporary memory of a step on a very tall weight (an LM head)."""
from __future__ import annotations

import warnings

import pytest
import torch

from modman.diagnostics import peak_temporary_bytes
from modman.manifolds import Sphere, Stiefel
from modman.optim import ManifoldMuon, Muon

from ._helpers import FAMILY, Problem, make_opt


@pytest.mark.parametrize("kind", FAMILY)
def test_bf16_parameters_step_with_fp32_momentum(kind):
    prob = Problem(kind, dtype=torch.bfloat16)
    opt = make_opt(kind, prob.params)
    losses = prob.train(opt, 20)
    assert losses[-1] < 0.75 * losses[0]
    assert prob.W.dtype == torch.bfloat16 and torch.isfinite(prob.W.float()).all()
    assert opt.state[prob.W]["momentum"].dtype == torch.float32
    if kind == "manifold_muon":
        assert opt.state[prob.W]["dual"].dtype == torch.float32
        # on the manifold to bf16 rounding (unit roundoff 2⁻⁸ ≈ 3.9e-3)
        assert float(Stiefel().distance(prob.W.detach())) <= 8e-3
    if kind == "hyperspherical":
        assert float(Sphere().distance(prob.W.detach())) <= 8e-3


def test_very_tall_weight_steps_in_order_mn_temporary_memory():
    """32768×64 fp32 (8 MiB): an m×m temporary would be 4 GiB; the step must stay within issue #4's
    bar, 3× the parameter.

    Method: live-storage accounting in a dispatch mode (modman.diagnostics.peak_temporary_bytes;
    tests/diagnostics/test_memory.py checks it on known answers and against peak RSS). Measured
    for the default solver ("anderson"): 2.75·mn·4 bytes — u (the Nesterov input) and the
    direction A while the solver reads G in fp64 row blocks (linalg/blocked.py), then W + V and the
    retracted matrix. It was 15.0 before the certificate and the solvers stopped making whole-matrix
    fp64 copies. The lower bound says the accounting sees at least u and A."""
    m, n = 32768, 64
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.linalg.qr(torch.randn(m, n, generator=g))[0])  # on the manifold already
    opt = ManifoldMuon([("lm_head.weight", W)], lr=0.01)
    W.grad = torch.randn(m, n, generator=g)
    opt.step()  # creates the persistent state (momentum m×n, dual n×n)
    mn_bytes = m * n * 4
    r = peak_temporary_bytes(opt.step)
    assert r.peak_bytes >= 2 * mn_bytes, "a step holds u and A at least: the accounting is broken"
    assert r.peak_bytes <= 3 * mn_bytes, r.summary(mn_bytes)
    assert r.persistent_bytes <= 0.01 * mn_bytes  # a steady-state step only replaces n×n state
    assert float(Stiefel().gram_deviation(W.detach())) <= 2e-5


def test_square_weight_step_memory_does_not_regress():
    """Where n = m the step's n×n fp64 matrices (2× an fp32 parameter each) set its peak, far above
    issue #4's 3× (unmet there; README). Measured on 384² (dispatch accounting, as above): 18.0×
    while the certificate kept WᵀA and sym(WᵀA), a symmetrised copy of AᵀA and an out-of-place
    Cholesky factor alive together, and D(Λ) ran beside the closed form's K, B̄ and WᵀG; 14.3×
    then; 12.35× since S = skew(WᵀG) is released before the closed form's eigh (its rows made
    again where needed) and D(Λ) reads the exactly symmetric Λ without a copy. This guards the
    reduction (not the bar)."""
    n = 384
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.linalg.qr(torch.randn(n, n, generator=g))[0])
    opt = ManifoldMuon([("w", W)], lr=0.01)
    W.grad = torch.randn(n, n, generator=g)
    opt.step()
    r = peak_temporary_bytes(opt.step)
    assert r.peak_bytes >= 6 * n * n * 4, "the closed form holds several n×n fp64 matrices: accounting broken"
    assert r.peak_bytes <= 12.5 * n * n * 4, r.summary(n * n * 4)
    assert float(opt.last_step_stats["w"]["duality_gap"]) <= 1e-4


@pytest.mark.parametrize("stack", [(), (4,)])
@pytest.mark.parametrize("ns_dtype, bound", [("float32", 4.0), ("bfloat16", 2.5)])
def test_muon_step_holds_three_iterates_at_once(ns_dtype, bound, stack):
    """A Newton–Schulz iteration needs X, B = bS + cS² and the new X; the Gram S was kept alive
    beside them (fp32: 5.0× the parameter, bf16: 3.0×, as torch.optim.Muon's own loop). Now the
    momentum's u, the normalised X and two iterate-sized matrices: 4.0× and 2.5×; the result is
    bitwise the same arithmetic (tests/optim/test_parity.py compares it with torch.optim.Muon)."""
    n = 256
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(*stack, n, n, generator=g))  # (4, n, n): a stack of experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (bf16 emulated on this CPU)
        opt = Muon([W], lr=0.02, ns_dtype=ns_dtype)
    W.grad = torch.randn(W.shape, generator=g)
    opt.step()
    r = peak_temporary_bytes(opt.step)
    size = W.numel() * 4
    assert 2 * size <= r.peak_bytes <= bound * size, r.summary(size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fallback_parameters_step_in_fp32(dtype):
    """Biases and norm gains of an fp16/bf16 model (the AdamW fallback) are stepped in fp32 with
    fp32 moments and rounded once: in fp16, g² overflowed for |g| > 256 and eps = 1e-8 rounded to
    0, putting inf into the biases after one step (a user probe). Compared with the same step in
    fp32 on the fp32 copy of the parameters."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    ref = [p.detach().clone() for p in net.parameters()]
    net = net.to(dtype)
    opt = ManifoldMuon(net.modules(), lr=0.05, fallback={"lr": 1e-2})
    grads = [torch.randn(p.shape) * 300 for p in net.parameters()]  # g² > fp16's maximum
    for p, g in zip(net.parameters(), grads):
        p.grad = g.to(dtype)
    opt.step()
    names = dict(net.named_parameters())
    for name in ("0.bias", "1.weight", "1.bias", "2.bias"):
        p = names[name]
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32, name
        assert torch.isfinite(p.float()).all(), name
        # the first AdamW step moves every entry by lr·sign(g) (to eps), here rounded once to dtype
        i = list(names).index(name)
        expected = (ref[i].to(dtype).float() - 1e-2 * torch.sign(grads[i].to(dtype).float())).to(dtype)
        assert torch.equal(p, expected), name


def test_low_precision_fallback_moments_from_an_older_checkpoint_continue_in_fp32():
    """A state saved before the fallback kept fp32 moments holds them in the parameter's dtype
    (load_state_dict keeps saved dtypes): they are upcast at the next step, so an fp16 g² no
    longer overflows to inf (a review)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4)).half()
    opt = ManifoldMuon(net.modules(), lr=0.05)
    bias = net[0].bias
    for p in net.parameters():
        p.grad = torch.randn(p.shape).half()
    opt.step()
    for k in ("exp_avg", "exp_avg_sq"):
        opt.state[bias][k] = opt.state[bias][k].half()  # as an older version saved them
    before = bias.detach().clone()
    for p in net.parameters():
        p.grad = (torch.randn(p.shape) * 2000).half()  # g² above fp16's maximum
    opt.step()
    assert opt.state[bias]["exp_avg_sq"].dtype == torch.float32
    assert torch.isfinite(opt.state[bias]["exp_avg_sq"]).all() and torch.isfinite(bias).all()
    assert not torch.equal(bias, before)


@pytest.mark.parametrize("n", [64, 512])
def test_bf16_embedding_rows_with_generic_gradients_move(n):
    """The rounding threshold on a sphere row's tangent gradient is 8·eps·‖u‖ (no √n): with √n it
    exceeded ‖u‖ for bf16 rows of 256+ columns, which then never moved (a review)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(32, n).to(torch.bfloat16)
    opt = ManifoldMuon(emb.modules(), lr=0.05)
    before = emb.weight.detach().clone()
    emb.weight.grad = torch.randn(32, n).to(torch.bfloat16)
    opt.step()
    moved = (emb.weight != before).any(dim=1)
    assert bool(moved.all()), int(moved.sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_report_the_distance_of_the_stored_weight(dtype):
    """last_step_stats' distance_to_manifold described the fp32 result before rounding (~5e-7),
    not the bf16 weight the model holds (~2e-3 off: 3000× understated)."""
    prob = Problem("manifold_muon", dtype=dtype, shape=(48, 32))
    opt = make_opt("manifold_muon", [("w", prob.W), ("b", prob.b)])
    prob.train(opt, 2)
    reported = float(opt.last_step_stats["w"]["distance_to_manifold"])
    sv = torch.linalg.svdvals(prob.W.detach().double())
    actual = float((sv - 1).abs().max())
    assert actual > 10 * torch.finfo(torch.float32).eps, "the rounding is visible"
    assert 0.5 * actual <= reported <= 2.0 * actual, (reported, actual)


def test_bf16_weight_step_memory_does_not_regress():
    """A bf16 weight is polished every step (bf16 rounding leaves it ~2e-3 off the manifold), so
    W + V must be released before the polish: 12.09× the bf16 parameter on 4096×64 (dispatch
    accounting, as above), 14.09× while it stayed alive (a review)."""
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.linalg.qr(torch.randn(4096, 64, generator=g))[0].bfloat16())
    opt = ManifoldMuon([W], lr=0.05)
    G = torch.randn(4096, 64, generator=g).bfloat16()
    W.grad = G.clone()
    opt.step()
    W.grad = G.clone()
    r = peak_temporary_bytes(opt.step)
    assert r.peak_bytes <= 12.5 * W.numel() * 2, r.summary(W.numel() * 2)
