"""Same-shape matrices stepped as stacks (``optim/batching.py``): as if each were stepped alone."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import modman.optim.functional as F
from modman import ManifoldMuon
from modman.manifolds import Stiefel
from modman.optim.batching import MATRIX_BYTES, STACK_BYTES, plan_stacks
from modman.solvers import SEPARABLE_SOLVERS, SOLVERS


def build(layers, foreach, lr_scales=None, **kw):
    """ManifoldMuon over ``layers``, one param group per layer (so each may have its own lr_scale)."""
    scales = lr_scales or [1.0] * len(layers)
    groups = [{"params": [layer], "lr_scale": s} for layer, s in zip(layers, scales)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ManifoldMuon(groups, lr=kw.pop("lr", 0.05), foreach=foreach, **kw)


def train(make_layers, foreach, steps, seed=0, zero=(), lr_scales=None, **kw):
    """A few steps on random losses, one independent input per layer; ``zero``: (step, layer) pairs
    whose gradient is exactly zero that step."""
    torch.manual_seed(seed)
    layers = make_layers()
    opt = build(layers, foreach, lr_scales, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        opt.zero_grad()
        loss = 0
        for i, layer in enumerate(layers):
            shape = (8, layer.in_channels, 5) if isinstance(layer, nn.Conv1d) else (8, layer.in_features)
            x = torch.randn(shape, generator=gen).to(layer.weight.dtype)
            weight = 0.0 if (step, i) in zero else torch.rand((), generator=gen).item() + 0.1
            loss = loss + weight * layer(x).float().square().mean()
        loss.backward()
        opt.step()
    return layers, opt


# how far one stacked step may land from one-at-a-time steps from the same state where batched
# products round apart: a few roundings of the dtype (one bf16 ulp at the weights' ~0.2). Over
# many steps the runs drift further apart than rounding — within the solver's own accuracy: a
# 1e-16 difference in one fp64 step grew to 1e-5 in three (the closed form's fp64 directions are
# that sensitive where its certified gap is ~1e-6) — so runs are compared one step at a time.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-3}


def assert_same(a, b, exact=True):
    """Weights, state and stats of two runs equal (bitwise when ``exact``)."""
    (layers_a, opt_a), (layers_b, opt_b) = a, b

    def same(x, y, what):
        if exact:
            assert torch.equal(x, y), what
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=TOLERANCE[layers_a[0].weight.dtype], msg=what)

    for la, lb in zip(layers_a, layers_b):
        pa, pb = la.weight, lb.weight
        same(pa, pb, "weight")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert list(sa) == list(sb)
        for k in sa:
            same(sa[k], sb[k], k)
    for k in ("iterations", "msign_calls"):
        # work counts are the stack's, per matrix (the solvers report a batch's mean, rounded up):
        # one value for the stack, between the fewest and the most of its matrices alone
        stacked = {stats[k] for stats in opt_a.last_step_stats.values()}
        alone = [stats[k] for stats in opt_b.last_step_stats.values()]
        assert stacked == set() if not alone else (len(stacked) == 1 and min(alone) <= stacked.pop() <= max(alone)), \
            (k, stacked, alone)  # (a 1×1 Linear weight goes to the fallback: no stats)
    for name, stats in opt_a.last_step_stats.items():
        other = opt_b.last_step_stats[name]
        assert list(stats) == list(other)
        for k in ("tangent_residual", "duality_gap"):
            same(torch.as_tensor(stats[k]), torch.as_tensor(other[k]), (name, k))
        assert torch.as_tensor(stats["distance_to_manifold"]).shape == ()
        # a power-iteration estimate: the batched products round apart
        torch.testing.assert_close(torch.as_tensor(stats["distance_to_manifold"]),
                                   torch.as_tensor(other["distance_to_manifold"]), rtol=0.05, atol=1e-7)


def linears(shape, count, dtype=torch.float32):
    return lambda: [nn.Linear(shape[1], shape[0], bias=False).to(dtype) for _ in range(count)]


class SolveSpy:
    """Counts solve_manifold_muon calls by the optimizer and the batch size of each."""

    def __init__(self, monkeypatch):
        self.sizes = []
        real = F.solve_manifold_muon

        def spy(W, G, **kw):
            self.sizes.append(W.shape[0] if W.ndim == 3 else 1)
            return real(W, G, **kw)

        monkeypatch.setattr(F, "solve_manifold_muon", spy)


SHAPES = [(32, 32), (128, 32), (32, 128), (48, 40), (100, 7)]


@pytest.mark.parametrize("solver", sorted(SEPARABLE_SOLVERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_stacked_fp32_runs_are_bitwise_those_of_one_matrix_at_a_time(solver, shape, monkeypatch):
    # tall (the reduced form and its subspace), wide, square (the closed form), odd; lr_scales
    # differing per matrix and a matrix resting (zero gradient) in some steps
    # (matrix 1 rests from its first step: alone it gets no solve and no warm start)
    spy = SolveSpy(monkeypatch)
    run = dict(steps=5, zero={(0, 1), (1, 0), (3, 2)}, lr_scales=[1.0, 0.5, 2.0], solver=solver)
    stacked = train(linears(shape, 3), None, **run)
    # one solve of all three per step — but at step 1 matrix 1 has no warm start yet, the others
    # have: two stacks' keys
    assert spy.sizes == [3, 2, 1, 3, 3, 3]
    assert_same(stacked, train(linears(shape, 3), False, **run))


def one_step_both_ways(make, dtype, seed=0, **run):
    """From the state of a few one-at-a-time steps (warm starts, momentum), one more step with
    foreach=True and one with foreach=False: (layers, optimizer) of each."""
    import copy

    layers, opt = train(make, False, seed=seed, **run)
    gen = torch.Generator().manual_seed(seed + 7)
    grads = [0.1 * torch.randn(layer.weight.shape, generator=gen).to(dtype) for layer in layers]
    grads[-1].zero_()  # a resting matrix in the stack
    out = []
    for foreach in (True, False):
        la, oa = copy.deepcopy((layers, opt))
        for group in oa.param_groups:
            group["foreach"] = foreach
        for layer, g in zip(la, grads):
            layer.weight.grad = g.clone()
        oa.step()
        out.append((la, oa))
    return out


@pytest.mark.parametrize("solver", sorted(SEPARABLE_SOLVERS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_stacked_step_matches_one_matrix_at_a_time(solver, shape, dtype):
    stacked, alone = one_step_both_ways(linears(shape, 3, dtype), dtype, steps=3, zero={(1, 0)},
                                        lr_scales=[1.0, 0.5, 2.0], solver=solver)
    assert_same(stacked, alone, exact=False)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), count=st.integers(2, 4), seed=st.integers(0, 2**16),
       solver=st.sampled_from(sorted(SEPARABLE_SOLVERS)), lr=st.sampled_from([1e-3, 0.05, 0.3]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_stacked_step_agrees_with_single_steps_on_any_shape(m, n, count, seed, solver, lr, dtype):
    scales = [0.5 + i for i in range(count)]
    stacked, alone = one_step_both_ways(linears((m, n), count, dtype), dtype, seed=seed, steps=2,
                                        zero={(1, count - 1)}, lr_scales=scales, solver=solver, lr=lr)
    assert_same(stacked, alone, exact=False)


def test_conv_linear_and_transposed_weights_stack_by_layout(monkeypatch):
    # a Conv1d (out 6, in 4·k 3 → 6×12) and a Linear 12→6: the same contiguous 6×12 matrix, one
    # stack; two Linears whose weights are stored transposed (non-contiguous) another — each
    # written back into its own parameter
    def make():
        odd = [nn.Linear(12, 6, bias=False) for _ in range(2)]
        for layer in odd:
            layer.weight = nn.Parameter(torch.randn(12, 6).t())
        return [nn.Conv1d(4, 6, 3, bias=False), nn.Linear(12, 6, bias=False), *odd]

    spy = SolveSpy(monkeypatch)
    a = train(make, True, steps=3)
    assert spy.sizes == [2, 2] * 3
    assert not a[0][2].weight.is_contiguous()
    assert_same(a, train(make, False, steps=3))


def test_stack_state_is_each_matrix_own_tensor():
    # warm starts split back into separate tensors (not views of one stacked buffer, which a
    # checkpoint would save whole for every matrix)
    layers, opt = train(linears((40, 10), 3), True, steps=2)
    for layer in layers:
        dual = opt.state[layer.weight]["dual"]
        assert dual.shape == (10, 10)
        assert dual.untyped_storage().nbytes() == dual.numel() * dual.element_size()


def test_foreach_false_and_unseparable_solvers_step_one_matrix_at_a_time(monkeypatch):
    spy = SolveSpy(monkeypatch)
    train(linears((16, 8), 3), False, steps=2)
    assert spy.sizes == [1] * 6
    spy.sizes.clear()
    for solver in sorted(set(SOLVERS) - SEPARABLE_SOLVERS):
        train(linears((16, 8), 3), None, steps=1, solver=solver)
        assert spy.sizes == [1] * 3, solver
        spy.sizes.clear()
    # a group's own foreach=False keeps its matrix out of the stack of the others
    layers = linears((16, 8), 3)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon([{"params": [layers[0]], "foreach": False}, {"params": [layers[1], layers[2]]}])
    sum(layer(torch.randn(4, 8)).square().sum() for layer in layers).backward()
    opt.step()
    assert sorted(spy.sizes) == [1, 2]


def test_stacks_never_exceed_the_cap(monkeypatch):
    # stacks of at most STACK_BYTES (1 MiB) of matrices of at most MATRIX_BYTES (64 KiB): twenty
    # 128×128 fp32 (64 KiB each) in stacks of 16 and 4; five 256×128 (128 KiB) and two 512×512 alone
    assert (STACK_BYTES, MATRIX_BYTES) == (1 << 20, 64 << 10)
    spy = SolveSpy(monkeypatch)
    layers = ([nn.Linear(128, 128, bias=False) for _ in range(20)] + [nn.Linear(128, 256, bias=False) for _ in range(5)]
              + [nn.Linear(512, 512, bias=False) for _ in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(layers, budget="uniform")
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(spy.sizes, reverse=True) == [16, 4] + [1] * 7
    assert plan_stacks(["a"] * 5, [3] * 5, cap=7) == [[0, 1], [2, 3]]  # (the fifth alone)
    assert plan_stacks(["a"] * 3, [3, 9, 3], cap=20, largest=8) == [[0, 2]]


def test_plan_groups_equal_keys_in_order_and_drops_singletons():
    keys = ["x", "y", "x", "z", "y", "x"]
    assert plan_stacks(keys, [1] * 6, cap=10) == [[0, 2, 5], [1, 4]]
    assert plan_stacks(keys, [1] * 6, cap=2) == [[0, 2], [1, 4]]
    assert plan_stacks(["x", "x"], [5, 5], cap=4) == []  # each over the cap: alone
    assert plan_stacks(["x", None, "x", None], [1] * 4, cap=10) == [[0, 2]]  # None: never stacked


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_foreach_must_be_none_or_bool(bad):
    layer = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="foreach"):
        ManifoldMuon(layer.modules(), foreach=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(nn.Linear(4, 4).modules())
    with pytest.raises(TypeError, match="foreach"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "foreach": bad})
    opt.param_groups[0]["foreach"] = bad  # set later: refused at the step, before anything changes
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    before = [p.clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(TypeError, match="foreach"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"])) and not opt.state
    state = opt.state_dict()
    state["param_groups"][0]["foreach"] = bad
    opt.param_groups[0]["foreach"] = None
    with pytest.raises(TypeError, match="foreach"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["foreach"] is None


def test_a_failing_stack_names_its_parameters():
    layers = linears((8, 8), 3)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(nn.Sequential(*layers).modules())
    with torch.no_grad():
        layers[1].weight[0, 0] = float("nan")  # a corrupt checkpoint
    for layer in layers:
        layer.weight.grad = torch.ones_like(layer.weight)
    with pytest.raises(ValueError, match="W contains NaN") as info:
        opt.step()
    if hasattr(info.value, "__notes__"):
        assert info.value.__notes__ == ["ManifoldMuon stepped these as one stack, in this order: 0.weight, 1.weight, "
                                        "2.weight (foreach=False steps them one by one)"]


def test_gpt2_conv1d_weights_stack_in_their_transposed_layout(monkeypatch):
    # transformers' Conv1D stores (in, out): its matrix is a transposed view. Stacked as contiguous
    # copies its products rounded apart from the view's — one ulp at the first step, 1e-5 after 20
    # (a probe with a causal-LM loss; random gradients happened to round alike)
    import transformers
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def run(foreach):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = ManifoldMuon(model.modules(), lr=0.02, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            tokens = torch.randint(0, 128, (4, 32), generator=gen)
            opt.zero_grad()
            model(tokens, labels=tokens).loss.backward()
            opt.step()
        return model, opt

    spy = SolveSpy(monkeypatch)
    (a, opt_a), (b, opt_b) = run(True), run(False)
    assert 2 in spy.sizes  # the two blocks' same-shape Conv1D weights shared solves
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert all(torch.equal(opt_a.state[pa][k], opt_b.state[pb][k]) for k in opt_a.state[pa]), name


def test_each_decision_of_the_step_is_per_matrix_of_a_stack():
    # one stack of five 40×24 fp32 matrices: a plain one; one whose step is below its rounding
    # (lr_scale 1e-12: stays bitwise); one far off the manifold (×3, project_on_init=False: projected
    # after the retraction); one slightly off (×(1 + 4e-5): polished); one stored transposed with
    # momentum 0.5 and no Nesterov — each as it steps alone
    def run(foreach, steps=2):
        torch.manual_seed(0)
        Q = [torch.linalg.qr(torch.randn(40, 24))[0] for _ in range(5)]
        Q[2], Q[3] = Q[2] * 3.0, Q[3] * (1 + 4e-5)
        params = [nn.Parameter(q.clone()) for q in Q[:4]] + [nn.Parameter(Q[4].t().contiguous())]
        groups = [{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 1e-12}, {"params": [params[2]]},
                  {"params": [params[3]]},
                  {"params": [params[4]], "flatten": "transposed", "momentum": 0.5, "nesterov": False}]
        opt = ManifoldMuon(groups, lr=0.05, foreach=foreach, project_on_init=False)
        gen = torch.Generator().manual_seed(1)
        start = [p.detach().clone() for p in params]
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, start, opt

    stacked, start, opt = run(None)
    alone, _, _ = run(False)
    for a, b in zip(stacked, alone):
        assert torch.equal(a, b)
    stacked, _, opt = run(None, steps=1)  # the step that projects and polishes
    for name, p in zip(("param0", "param1", "param2", "param3", "param4"), stacked):
        # the drift reported is that of the weight as stepped (polished or projected), not before
        drift = Stiefel().gram_deviation(p.detach().mT if name == "param4" else p.detach()) / 2
        torch.testing.assert_close(torch.as_tensor(opt.last_step_stats[name]["distance_to_manifold"]), drift,
                                   rtol=0.05, atol=1e-8)
    assert torch.equal(stacked[1], start[1])  # below rounding: bitwise where it was
    assert not torch.equal(stacked[3], start[3])
    assert float(opt.last_step_stats["param2"]["distance_to_manifold"]) < 1e-5  # landed


def test_groups_differing_in_tol_scale_or_solver_stack_apart(monkeypatch):
    spy = SolveSpy(monkeypatch)
    layers = linears((16, 8), 8)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon([{"params": layers[:2]}, {"params": layers[2:4], "tol": 1e-3},
                            {"params": layers[4:6], "scale": "rms"}, {"params": layers[6:], "max_iters": 5}],
                           budget="uniform")
    for layer in layers:
        layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    assert spy.sizes == [2, 2, 2, 2]
    # a solver switched mid-run: its warm-start entries differ (newton keeps more), stale ones go
    make = linears((48, 16), 3)

    def run(foreach):
        torch.manual_seed(0)
        layers = make()
        opt = build(layers, foreach, solver="newton")
        gen = torch.Generator().manual_seed(2)
        for step in range(4):
            if step == 2:
                for group in opt.param_groups[1:]:
                    group["solver"] = "anderson"
            for layer in layers:
                layer.weight.grad = torch.randn(layer.weight.shape, generator=gen)
            opt.step()
        return layers, opt

    (a, opt_a), (b, opt_b) = run(True), run(False)
    for la, lb in zip(a, b):
        assert torch.equal(la.weight, lb.weight)
        assert list(opt_a.state[la.weight]) == list(opt_b.state[lb.weight])
    assert "mu" in opt_a.state[a[0].weight] and "mu" not in opt_a.state[a[1].weight]


@pytest.mark.parametrize("sharing", ["listed twice", "views of one tensor"])
def test_parameters_sharing_memory_step_one_after_the_other(sharing):
    # one at a time the second step starts where the first left the memory; in a stack both would
    # start from the same weights and the last write would win
    def run(foreach):
        torch.manual_seed(0)
        if sharing == "listed twice":
            weight, other = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16, 8))
            params = [weight, weight, other]
        else:
            base = torch.randn(2, 16, 8)
            params = [nn.Parameter(base[0]), nn.Parameter(base[0]), nn.Parameter(torch.randn(16, 8))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = ManifoldMuon([{"params": params}], foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        return params

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_state_is_made_in_parameter_order():
    layers = [nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(8, 16)]  # the last two stack
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(nn.Sequential(*layers).modules())
    sum(layer(torch.randn(2, 8)).sum() for layer in layers).backward()
    opt.step()
    order = [p for g in opt.param_groups for p in g["params"]]
    assert list(opt.state) == order
    assert list(opt.state_dict()["state"]) == list(range(len(order)))


@pytest.mark.parametrize("foreach", [True, False])
def test_far_off_weights_land_unless_their_gradient_is_normal(foreach):
    # project_on_init=False, two weights 3× off the manifold: one with a gradient normal to it
    # (G = W, an L2 penalty's: A = 0, gap 0) stays bitwise where it is; the other lands
    torch.manual_seed(0)
    params = [nn.Parameter(3 * torch.linalg.qr(torch.randn(40, 24))[0]) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon([{"params": params}], lr=1e-30, project_on_init=False, foreach=foreach)
    start = params[0].detach().clone()
    params[0].grad = params[0].detach().clone()
    params[1].grad = torch.randn(40, 24)
    opt.step()
    assert torch.equal(params[0], start)
    assert float(Stiefel().gram_deviation(params[1].detach())) < 1e-5


@pytest.mark.parametrize("other", [{"foreach": False}, {"solver": "admm"}])
def test_storage_shared_with_a_matrix_stepped_alone_keeps_the_order(other):
    # A and B share memory; A's group steps one at a time (foreach=False, or a solver never stacked)
    # and comes first: B must step after it, not in a stack before it
    def run(foreach):
        torch.manual_seed(0)
        A = nn.Parameter(torch.linalg.qr(torch.randn(16, 8))[0])
        B = nn.Parameter(A.data)
        C = nn.Parameter(torch.linalg.qr(torch.randn(16, 8))[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = ManifoldMuon([{"params": [A], **other}, {"params": [B, C]}], lr=0.1, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for p in (A, B, C):
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        return A, C

    for a, b in zip(run(None), run(False)):
        assert torch.equal(a, b)


def test_a_non_finite_closed_form_in_one_member_projects_that_member_only(monkeypatch):
    # the 0/0 of a step just above underflow, forced on the first matrix of the step: it takes the
    # exact projection, its stack-mates their closed form, as each would alone
    real = Stiefel.apply_closed_form

    def run(foreach):
        armed = [True]

        def broken_first(X, factor):
            out = real(X, factor)
            if armed[0]:
                (out[0] if out.ndim == 3 else out).fill_(float("nan"))
                armed[0] = False
            return out

        monkeypatch.setattr(Stiefel, "apply_closed_form", staticmethod(broken_first))
        torch.manual_seed(0)
        params = [nn.Parameter(torch.linalg.qr(torch.randn(40, 24))[0]) for _ in range(3)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = ManifoldMuon([{"params": [p]} for p in params], lr=0.05, foreach=foreach)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return params

    for a, b in zip(run(None), run(False)):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())
