"""Stepping behaviours of TORCH_OPTIM_CHECKLIST.md for ManifoldMuon, Muon and HypersphericalDescent."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from modman.manifolds import Stiefel
from modman.optim import HypersphericalDescent, ManifoldMuon

from ._helpers import (FAMILY, Problem, assert_bitwise, assert_refused_with_nothing_changed, assert_unchanged, bits,
                       make_opt, snapshot)


@pytest.mark.parametrize("kind", FAMILY)
def test_twenty_steps_lower_the_loss(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    losses = prob.train(opt, 20)
    assert losses[-1] < 0.75 * losses[0], losses
    for p in prob.params:  # every stepped parameter has state
        assert opt.state[p], "a stepped parameter has empty state"


@pytest.mark.parametrize("kind", FAMILY)
def test_non_contiguous_parameters_step_like_contiguous_ones(kind):
    prob = Problem(kind, shape=(6, 4))
    ref = prob.clone(kind)
    # the same values, stored transposed: W is a non-contiguous (6, 4) view of a (4, 6) tensor
    prob.W = torch.nn.Parameter(prob.W.detach().t().contiguous().t())
    assert not prob.W.is_contiguous()
    losses = prob.train(make_opt(kind, prob.params), 20)
    ref.train(make_opt(kind, ref.params), 20)
    assert losses[-1] < 0.75 * losses[0]
    assert not prob.W.is_contiguous(), "the parameter's layout must survive the steps"
    torch.testing.assert_close(prob.W, ref.W, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILY)
def test_channels_last_conv_weight_is_written_back(kind):
    """A (out, in, kh, kw) weight in channels_last cannot be flattened without a copy."""
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 2, bias=False)
    ref = torch.nn.Conv2d(3, 4, 2, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(4, 3, 2, 2, generator=g))
        conv.weight.copy_(ref.weight)
    conv = conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = torch.randn(5, 3, 4, 4, generator=g)
    opts = [make_opt(kind, m.modules()) for m in (conv, ref)]
    torch.testing.assert_close(conv.weight, ref.weight, rtol=0, atol=0)  # same projection
    before = conv.weight.detach().clone()
    for _ in range(3):
        for m, opt in zip((conv, ref), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert not torch.equal(conv.weight, before), "the step never reached the channels_last weight"
    torch.testing.assert_close(conv.weight, ref.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("make_sched", ["step_lr", "plateau"])
def test_with_lr_schedulers(kind, make_sched):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    lr0 = [g["lr"] for g in opt.param_groups]
    if make_sched == "step_lr":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        losses = prob.train(opt, 20, scheduler=sched)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=8)
        losses = []
        for _ in range(20):
            losses.append(float(opt.step(prob.closure(opt))))
            sched.step(1.0)  # a flat metric: the lr halves after 9 steps without improvement
    assert losses[-1] < 0.9 * losses[0]
    assert all(g["lr"] < lr for g, lr in zip(opt.param_groups, lr0))


@pytest.mark.parametrize("kind", FAMILY)
def test_hyperparameters_are_read_from_param_groups_every_step(kind):
    """A scheduler that sets lr to 0 must stop the next steps dead: nothing caches lr."""
    prob = Problem(kind)
    opt = make_opt(kind, prob.params, **({"weight_decay": 0.0} if kind == "muon" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    prob.train(opt, 1, scheduler=sched)
    for g in opt.param_groups:
        assert g["lr"] == 0.0
    before = [bits(p) for p in prob.params]
    prob.train(opt, 3)
    for p, b in zip(prob.params, before):
        assert torch.equal(bits(p), b)


@pytest.mark.parametrize("kind", FAMILY)
def test_two_groups_at_different_lr(kind):
    """Each group's lr is its constrained weight's step length (W moves 5× farther at 0.05 than
    at 0.01); the biases in those groups take the fallback's lr, as the constructor's lr does."""
    prob, other = Problem(kind, seed=0), Problem(kind, seed=1)
    opt = make_opt(kind, [{"params": prob.params, "lr": 0.05}, {"params": other.params, "lr": 0.01}],
                   fallback={"lr": 0.02})
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(prob.W)] == 0.05 and lrs[id(other.W)] == 0.01
    assert lrs[id(prob.b)] == lrs[id(other.b)] == 0.02
    loss = lambda: prob.loss() + other.loss()  # noqa: E731
    first = float(loss().detach())
    before = [prob.W.detach().clone(), other.W.detach().clone()]
    for step in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
        if step == 0:
            moved = [float(torch.linalg.matrix_norm(W - W0)) for W, W0 in zip((prob.W, other.W), before)]
            assert 4.5 <= moved[0] / moved[1] <= 5.5, moved
    assert float(loss().detach()) < 0.75 * first


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("lr_shape", [(), (1,), (1, 1)])
def test_tensor_lr_bitwise_equal_to_float_lr(kind, lr_shape):
    """lr as a 0-d/1-d/2-d tensor: the same bits as the float it holds, for 5 steps."""
    lr_t = torch.full(lr_shape, 0.03)  # fp32: the float it holds is 0.03 rounded to fp32
    a, b = Problem(kind), Problem(kind)
    opt_a = make_opt(kind, a.params, lr=lr_t, fallback={"lr": lr_t.clone()} if kind != "muon" else None)
    opt_b = make_opt(kind, b.params, lr=lr_t.item(), fallback={"lr": lr_t.item()} if kind != "muon" else None)
    a.train(opt_a, 5)
    b.train(opt_b, 5)
    for p, q in zip(a.params, b.params):
        assert_bitwise(p, q, "tensor lr vs float lr")


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("tiny_lr", [0.0, 1e-30])
def test_second_group_with_lr_near_zero_is_bitwise_unchanged(kind, tiny_lr):
    moving, frozen = Problem(kind, seed=0), Problem(kind, seed=1)
    wd = {"weight_decay": 0.0} if kind == "muon" else {}
    opt = make_opt(kind, [{"params": moving.params}, {"params": [frozen.W], "lr": tiny_lr}], **wd)
    before, w_moving = bits(frozen.W), bits(moving.W)
    for _ in range(5):
        opt.zero_grad()
        (moving.loss() + frozen.loss()).backward()
        opt.step()
    assert torch.equal(bits(frozen.W), before)
    assert not torch.equal(bits(moving.W), w_moving)


def test_per_group_weight_decay():
    """Muon: decoupled decay W ← (1 − lr·λ)W per group; a zero gradient isolates it."""
    g = torch.Generator().manual_seed(0)
    A = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    B = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    opt = make_opt("muon", [{"params": [A], "weight_decay": 0.5}, {"params": [B], "weight_decay": 0.0}], lr=0.1)
    a0, b0 = A.detach().clone(), bits(B)
    A.grad, B.grad = torch.zeros_like(A), torch.zeros_like(B)
    opt.step()
    torch.testing.assert_close(A.detach(), a0 * (1 - 0.1 * 0.5), rtol=0, atol=0)
    assert torch.equal(bits(B), b0)


@pytest.mark.parametrize("kind", FAMILY)
def test_parameter_without_grad_is_untouched(kind):
    prob, idle = Problem(kind, seed=0), Problem(kind, seed=1)
    opt = make_opt(kind, prob.params + idle.params)
    before = [bits(p) for p in idle.params]
    prob.train(opt, 3)
    assert all(p.grad is None for p in idle.params)
    assert all(torch.equal(bits(p), b) for p, b in zip(idle.params, before))
    assert not any(opt.state[p] for p in idle.params), "no state for a parameter never stepped"


@pytest.mark.parametrize("kind", FAMILY)
def test_step_closure_semantics(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = prob.loss()
        loss.backward()  # needs grad mode: step runs under no_grad
        return loss

    with torch.no_grad():
        out = opt.step(closure)
    assert calls == [True], "the closure runs once, under enable_grad"
    assert isinstance(out, torch.Tensor) and out.ndim == 0
    assert opt.step() is None


def _zero_grad_problem(kind, dtype=torch.float32):
    prob = Problem(kind, dtype=dtype)
    # fp32: a Stiefel point with exact ±0.0 entries (−I on top, zeros below); bf16: a random point
    # rounded to bf16, ~4e-3 off the manifold, which no zero step may "polish"
    if kind == "manifold_muon" and dtype == torch.float32:
        with torch.no_grad():
            prob.W.copy_(-torch.eye(6, 4, dtype=dtype))
    return prob


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gradients_leave_parameters_bitwise_unchanged(kind, dtype):
    prob = _zero_grad_problem(kind, dtype)
    opt = make_opt(kind, prob.params, **({"weight_decay": 0.0} if kind == "muon" else {}))
    before = [bits(p) for p in prob.params]
    for _ in range(3):
        for p in prob.params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(prob.params, before):
        assert torch.equal(bits(p), b)
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("lr", [1e-20, 1e-30, 1e-45])
def test_step_below_rounding_leaves_parameters_bitwise_unchanged(kind, lr):
    """lr·A far below the weights' ulp: W + lr·A == W, so the step must not touch W."""
    prob = Problem(kind)
    opt = make_opt(kind, [prob.W], lr=lr, **({"weight_decay": 0.0} if kind == "muon" else {}))
    before = bits(prob.W)
    prob.train(opt, 3)
    assert torch.equal(bits(prob.W), before)


def test_step_just_above_underflow_stays_finite_and_on_the_manifold():
    """W with exact zeros: lr·A = 1e-20 is representable there, but ‖VᵀV‖_F² underflows."""
    W = torch.nn.Parameter(torch.eye(6, 4))
    opt = make_opt("manifold_muon", [W], lr=1e-20)
    W.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert torch.isfinite(W).all()
    assert float(Stiefel().distance(W.detach())) <= 1e-5


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("nesterov", [True, False])
def test_gradients_are_never_modified_in_place(kind, nesterov):
    prob = Problem(kind)
    conv = torch.nn.Conv2d(2, 3, 2, bias=False)  # its gradient is reshaped to a matrix: a view
    opt = make_opt(kind, prob.params + [conv.weight], nesterov=nesterov)
    loss = prob.loss() + conv(torch.randn(2, 2, 3, 3)).square().sum()
    loss.backward()
    params = prob.params + [conv.weight]
    versions = [p.grad._version for p in params]
    values = [bits(p.grad) for p in params]
    for _ in range(3):  # the same gradients, stepped repeatedly
        opt.step()
    assert [p.grad._version for p in params] == versions
    assert all(torch.equal(bits(p.grad), v) for p, v in zip(params, values))


@pytest.mark.parametrize("kind", FAMILY)
def test_nonfinite_raise_names_the_parameter_and_changes_nothing(kind):
    prob = Problem(kind)
    opt = make_opt(kind, [("layer.W", prob.W), ("layer.b", prob.b)])
    prob.train(opt, 2)  # state exists
    opt.zero_grad()
    prob.loss().backward()
    prob.W.grad[0, 0] = float("nan")
    assert_refused_with_nothing_changed(opt, prob.params, opt.step, FloatingPointError, r"layer\.W")


@pytest.mark.parametrize("kind", FAMILY)
def test_nonfinite_skip_skips_the_step_and_recovers(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params, nonfinite="skip")
    prob.train(opt, 2)
    opt.zero_grad()
    prob.loss().backward()
    prob.b.grad[0] = math.inf
    snap = snapshot(opt, prob.params)
    assert opt.step() is None
    assert opt.last_step_skipped
    assert_unchanged(opt, prob.params, snap)
    prob.train(opt, 1)
    assert not opt.last_step_skipped
    assert not torch.equal(bits(prob.W), snap[0][0])


@pytest.mark.parametrize("kind", FAMILY)
def test_large_finite_fp64_gradients_are_stepped(kind):
    """fp64 gradients above fp32's maximum (3.4e38) are finite: the check once cast each
    gradient's max to fp32 and refused every step, naming no parameter."""
    prob = Problem(kind, dtype=torch.float64)
    opt = make_opt(kind, [("layer.W", prob.W), ("layer.b", prob.b)])
    opt.zero_grad()
    prob.loss().backward()
    for p in prob.params:
        p.grad.mul_(1e39 / p.grad.abs().max())
    before = [p.detach().clone() for p in prob.params]
    opt.step()
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in prob.params)
    assert not torch.equal(prob.W, before[0]) and not torch.equal(prob.b, before[1])


@pytest.mark.parametrize("kind", ["manifold_muon", "hyperspherical"])
def test_gradient_normal_to_the_manifold_leaves_weights_bitwise(kind):
    """The gradient of an L2 penalty λ‖W‖² is normal to the manifold: its tangent part is rounding,
    and the step used to scale that noise to a full step of lr (‖ΔW‖₂ = lr, rows moved 0.04–0.4)."""
    prob = Problem(kind)
    _assert_l2_gradient_leaves_bitwise(make_opt(kind, [("layer.W", prob.W), ("layer.b", prob.b)]), prob.W)


def _assert_l2_gradient_leaves_bitwise(opt, W):
    """Steps on grad = 2λW (λ a power of two and not) leave W's bits as they are."""
    before = bits(W)
    for lam in (1.0, 0.37):
        opt.zero_grad()
        W.grad = 2 * lam * W.detach()
        opt.step()
        assert torch.equal(bits(W), before), lam


@pytest.mark.parametrize("shape", [(64, 64), (40, 32), (20, 48)])
@pytest.mark.parametrize("drift", [0.0, 5e-6])
def test_normal_gradient_on_a_drifted_weight_with_the_default_solver(shape, drift):
    """The closed form's dual assumes WᵀW = I: on a weight 5e-6 off the manifold (as the optimizer
    keeps them) its D for G = 2λW was ~5e-5, so a floor on D missed the noise and the step went a
    full lr (a review). The tangent part is now measured for W as it is."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        U, _, Vh = torch.linalg.svd(torch.randn(shape, dtype=torch.float64), full_matrices=False)
        s = 1 + drift * torch.linspace(-1, 1, min(shape), dtype=torch.float64)
        lin.weight.copy_(((U * s) @ Vh).float())
    opt = ManifoldMuon(lin.modules(), lr=0.05, on_manifold_tol=1e-4, budget="uniform")
    _assert_l2_gradient_leaves_bitwise(opt, lin.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [True, False])
def test_normal_gradient_on_a_low_precision_weight_leaves_it_bitwise(dtype, foreach):
    """A bf16/fp16 weight is solved in fp32, and the noise cut-off took fp32's eps: the tangent part
    of 2λW, rounding of the weight's own dtype (1.4e-3 of ‖G‖ in bf16), was stepped a full lr every
    step (‖ΔW‖₂ 0.96 after 20 steps of an L2 penalty alone at lr 0.05; a probe)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 64, bias=False).to(dtype)
    opt = ManifoldMuon(lin.modules(), lr=0.05, budget="uniform", foreach=foreach)
    _assert_l2_gradient_leaves_bitwise(opt, lin.weight)
    # a real step is still taken: a gradient with a tangent part well above the cut-off
    lin.weight.grad = (2 * lin.weight.detach().float() + 0.2 * torch.randn(64, 32)).to(dtype)
    before = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(lin.weight.detach(), before)


def test_sphere_tangent_residual_is_that_of_the_direction_taken():
    """It was measured against the already-updated weight (≈ lr for fp32/fp64 rows)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(8, 16)
    opt = HypersphericalDescent(emb.modules(), lr=0.1)
    emb.weight.grad = torch.randn(8, 16)
    opt.step()
    assert float(opt.last_step_stats["weight"]["tangent_residual"]) <= 1e-6


@pytest.mark.parametrize("cls", [ManifoldMuon, HypersphericalDescent])
def test_embedding_rows_without_a_gradient_stay_where_they_are(cls):
    """The sphere step is normalised per row, so a row's stale momentum moved it a full lr every
    step: the row of a token seen once rotated 63° over the next 10 steps at lr 0.1 (a user probe).
    Rows whose gradient is exactly zero this step stay bitwise (lazy rows); the others move."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(10, 16), torch.nn.Linear(16, 3, bias=False)
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model.modules(), lr=0.1, **({"budget": "uniform", "solver": "projected"} if cls is ManifoldMuon else {}))
    for step in range(6):
        tokens = torch.tensor([[7, 1, 2]]) if step == 0 else torch.tensor([[1, 2, 3]])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(emb(tokens).mean(1)), torch.tensor([0])).backward()
        before = emb.weight.detach().clone()
        opt.step()
        if step == 0:
            assert not torch.equal(emb.weight[7], before[7]), "a row with a gradient moves"
        else:
            assert torch.equal(emb.weight[7], before[7]), f"step {step}: row 7 had no gradient"
            assert not torch.equal(emb.weight[1], before[1])
    assert float(opt.state[emb.weight]["momentum"][7].norm()) > 0, "its momentum is kept (decayed)"


@pytest.mark.parametrize("scale", [1e-25, 1e-21, 1e20, 1e30])
def test_hyperspherical_step_is_scale_free_in_the_gradient(scale):
    """The ℓ2 direction per row does not depend on the gradient's scale: at ×1e-25 the fp32 norms
    of the tangent part underflowed to 0 and no row moved (a user probe), where ManifoldMuon moved
    as at ×1. Each row is scaled by a power of two first, so the step equals the unscaled one."""
    from modman.optim import HypersphericalDescent

    torch.manual_seed(0)
    W0 = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    G = torch.randn(8, 16)
    steps = []
    for s in (1.0, scale):
        W = torch.nn.Parameter(W0.clone())
        opt = HypersphericalDescent([W], lr=0.1)
        W.grad = G * s
        opt.step()
        steps.append(W.detach() - W0)
    assert float(steps[0].abs().max()) > 1e-2
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-6)
