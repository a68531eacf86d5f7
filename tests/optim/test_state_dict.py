"""state_dict, serialization, deepcopy, hooks and repr (TORCH_OPTIM_CHECKLIST.md)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from modman.optim import ManifoldMuon

from ._helpers import FAMILY, Problem, assert_refused_with_nothing_changed, assert_same, make_opt, snapshot, assert_unchanged

# ManifoldMuon also with the dual ascent, whose warm start (the dual) is carried across steps
CONFIGS = [("manifold_muon", {}), ("manifold_muon", {"solver": "dual_ascent", "max_iters": 4}),
           ("muon", {}), ("hyperspherical", {})]
IDS = ["manifold_muon", "manifold_muon-dual_ascent", "muon", "hyperspherical"]


def _named(prob):
    return [("layer.weight", prob.W), ("layer.bias", prob.b)]


def _resume_matches(kind, kw, transport):
    prob = Problem(kind)
    opt = make_opt(kind, _named(prob), **kw)
    prob.train(opt, 10)
    sd = opt.state_dict()
    twin = prob.clone(kind)
    opt2 = make_opt(kind, _named(twin), **kw)
    opt2.load_state_dict(transport(sd))
    assert_same(opt.state_dict(), opt2.state_dict(), "state_dict after load")
    prob.train(opt, 10)
    twin.train(opt2, 10)
    for p, q in zip(prob.params, twin.params):
        assert_same(p, q, "parameters 10 steps after resume")
    assert_same(opt.state_dict(), opt2.state_dict(), "state_dict 10 steps after resume")
    return opt, opt2


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_exact_resume_from_state_dict(kind, kw):
    opt, _ = _resume_matches(kind, kw, copy.deepcopy)
    assert [g["param_names"] for g in opt.state_dict()["param_groups"]] == [["layer.weight"], ["layer.bias"]]
    if kw.get("solver") == "dual_ascent":
        dual = opt.state[opt.param_groups[0]["params"][0]]["dual"]
        assert dual.shape == (4, 4) and torch.equal(dual, dual.mT), "the warm-start dual is saved"


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_torch_save_and_load_weights_only(kind, kw):
    def transport(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    opt, opt2 = _resume_matches(kind, kw, transport)  # (asserts the resumed run is bitwise the same)
    assert opt2.state and all(torch.equal(opt.state[p]["momentum"], opt2.state[q]["momentum"])
                              for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"]))


@pytest.mark.parametrize("kind", FAMILY)
def test_bf16_state_keeps_fp32_momentum_through_load(kind):
    prob = Problem(kind, dtype=torch.bfloat16)
    opt = make_opt(kind, prob.params)
    prob.train(opt, 3)
    assert opt.state[prob.W]["momentum"].dtype == torch.float32
    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[twin.W]["momentum"].dtype == torch.float32
    assert_same(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("kind", FAMILY)
def test_older_state_dict_without_newer_options_loads(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    prob.train(opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    newer = ("flatten", "lr_scale", "max_iters", "tol", "ns_dtype", "radius")  # options added over time
    for g in sd["param_groups"]:
        for key in newer:
            g.pop(key, None)
    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params)
    opt2.load_state_dict(sd)
    for g, g_ref in zip(opt2.param_groups, opt.param_groups):
        for key in newer:  # backfilled: the defaults (and the group's own structure)
            assert g[key] == g_ref[key], key
    prob.train(opt, 3)
    twin.train(opt2, 3)
    for p, q in zip(prob.params, twin.params):
        assert_same(p, q)


def test_older_pickled_optimizer_gets_new_attributes():
    prob = Problem("manifold_muon")
    opt = make_opt("manifold_muon", prob.params, nonfinite="skip")
    state = opt.__getstate__()
    for key in ("nonfinite", "on_manifold_tol", "project_on_init", "last_step_stats"):
        state.pop(key)
    old = ManifoldMuon.__new__(ManifoldMuon)
    old.__setstate__(state)
    assert old.nonfinite == "raise" and old.on_manifold_tol == 1e-5 and old.last_step_stats == {}
    prob.train(old, 1)


def _mismatches(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    prob.train(opt, 2)
    good = opt.state_dict()
    bad = []
    sd = copy.deepcopy(good)  # one group too many
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    bad.append(("groups", sd))
    sd = copy.deepcopy(good)  # a parameter too many in a group
    sd["param_groups"][0]["params"].append(99)
    bad.append(("parameter", sd))
    sd = copy.deepcopy(good)  # momentum of another shape
    pid = sd["param_groups"][0]["params"][0]
    sd["state"][pid]["momentum"] = torch.zeros(3, 3)
    bad.append(("shape", sd))
    sd = copy.deepcopy(good)  # a group of another kind (state from an optimizer with other roles)
    sd["param_groups"][0]["algorithm"] = "adamw"
    bad.append(("algorithm", sd))
    sd = copy.deepcopy(good)  # an entry the step does not keep (AdamW's moments in the constrained group)
    sd["state"][pid]["exp_avg"] = torch.zeros(prob.W.shape)
    bad.append(("another optimizer", sd))
    sd = copy.deepcopy(good)  # the fallback's step count of another shape (it raised mid-step, after updates)
    sd["state"][sd["param_groups"][1]["params"][0]]["step"] = torch.zeros(2)
    bad.append(("shape", sd))
    sd = copy.deepcopy(good)  # a damaged checkpoint: NaN momentum would reach the weights at the next step
    sd["state"][pid]["momentum"][0, 0] = float("nan")
    bad.append(("non-finite", sd))
    sd = copy.deepcopy(good)  # and a NaN second moment of the fallback made its weights NaN silently
    sd["state"][sd["param_groups"][1]["params"][0]]["exp_avg_sq"][0] = float("inf")
    bad.append(("non-finite", sd))
    for dtype in (torch.int64, torch.complex64):  # (loaded and cast: an integer or complex momentum; a probe)
        sd = copy.deepcopy(good)
        sd["state"][pid]["momentum"] = sd["state"][pid]["momentum"].to(dtype)
        bad.append(("expected a real floating tensor", sd))
    sd = copy.deepcopy(good)  # and an integer second moment of the fallback
    fallback_state = sd["state"][sd["param_groups"][1]["params"][0]]
    fallback_state["exp_avg_sq"] = fallback_state["exp_avg_sq"].round().to(torch.int64)
    bad.append(("expected a real floating tensor", sd))
    sd = copy.deepcopy(good)  # another optimizer's groups (torch.optim.AdamW's have no "algorithm")
    for g in sd["param_groups"]:
        g.pop("algorithm")
    bad.append(("not a modman state_dict", sd))
    sd = {"state": {}, "param_groups": [{"params": [0], "lr": 1e-3}]}  # another optimizer's, one group
    bad.append(("1 parameter groups without modman's 'algorithm' key", sd))  # (was: "a checkpoint of another model?")
    return prob, opt, bad


@pytest.mark.parametrize("kind", FAMILY)
def test_mismatched_state_dict_refused_with_nothing_changed(kind):
    prob, opt, bad = _mismatches(kind)
    n_hooks = len(opt._optimizer_load_state_dict_pre_hooks)
    for what, sd in bad:
        given = copy.deepcopy(sd)
        snap = snapshot(opt, prob.params)
        groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        with pytest.raises(ValueError, match=what):
            opt.load_state_dict(sd)
        assert_unchanged(opt, prob.params, snap)
        assert groups_before == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        assert_same(given, sd, "the given state_dict")
        assert len(opt._optimizer_load_state_dict_pre_hooks) == n_hooks, "the checking hook must not stay"
    prob.train(opt, 1)  # still usable


@pytest.mark.parametrize("kind", FAMILY)
def test_load_state_dict_does_not_mutate_its_argument(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    prob.train(opt, 2)
    sd = opt.state_dict()
    given = copy.deepcopy(sd)
    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params)
    opt2.load_state_dict(sd)
    twin.train(opt2, 2)
    assert_same(given, sd)


@pytest.mark.parametrize("kind", FAMILY)
def test_deepcopy_keeps_every_public_attribute(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params, nonfinite="skip",
                   **({"on_manifold_tol": 1e-4} if kind != "muon" else {}))
    prob.train(opt, 2)
    dup = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(dup) if not k.startswith("_")}
    for key in public - {"state", "param_groups"}:
        assert_same(getattr(opt, key), getattr(dup, key), key)
    assert_same(opt.state_dict(), dup.state_dict())
    # independent: stepping the copy leaves the original alone
    snap = snapshot(opt, prob.params)
    for p in dup.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    dup.step()
    assert_unchanged(opt, prob.params, snap)


@pytest.mark.parametrize("kind", FAMILY)
def test_step_hooks_fire_in_order(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    log = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: log.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: log.append("global post")),
        opt.register_step_pre_hook(lambda o, a, k: log.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: log.append("post")),
    ]
    try:
        closure = prob.closure(opt)
        opt.step(lambda: log.append("step") or closure())
    finally:
        for h in handles:
            h.remove()
    assert log == ["global pre", "pre", "step", "post", "global post"]
    log.clear()
    prob.train(opt, 1)
    assert log == [], "removed hooks must not fire"


@pytest.mark.parametrize("kind", FAMILY)
def test_state_dict_hooks_fire(kind):
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    prob.train(opt, 1)
    log = []
    opt.register_state_dict_pre_hook(lambda o: log.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: log.append("sd post") or {**sd, "extra": 1})
    sd = opt.state_dict()
    assert sd["extra"] == 1 and log == ["sd pre", "sd post"]

    def pre(o, sd):  # a user pre-hook rewrites the dict; the checks must see its result
        log.append("load pre")
        sd = copy.deepcopy(sd)
        sd.pop("extra")
        for g in sd["param_groups"]:
            g["lr"] = 0.125
        return sd

    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params)
    opt2.register_load_state_dict_pre_hook(pre)
    opt2.register_load_state_dict_post_hook(lambda o: log.append("load post"))
    opt2.load_state_dict(sd)
    assert log[2:] == ["load pre", "load post"]
    assert all(g["lr"] == 0.125 for g in opt2.param_groups)


@pytest.mark.parametrize("kind", FAMILY)
def test_repr_lists_the_groups(kind):
    prob = Problem(kind)
    text = repr(make_opt(kind, prob.params))
    cls = {"manifold_muon": "ManifoldMuon", "muon": "Muon", "hyperspherical": "HypersphericalDescent"}[kind]
    assert text.startswith(cls) and "Parameter Group 0" in text and "Parameter Group 1" in text
    assert "algorithm: adamw" in text


def test_named_params_keep_names_in_stats_and_state_dict():
    prob = Problem("manifold_muon")
    opt = make_opt("manifold_muon", _named(prob))
    prob.train(opt, 1)
    assert list(opt.last_step_stats) == ["layer.weight"]
    assert "layer.weight" in opt.describe() and "layer.bias" in opt.describe()


def test_unnamed_params_get_distinct_names_across_groups():
    a, b = Problem("manifold_muon", seed=0), Problem("manifold_muon", seed=1)
    opt = make_opt("manifold_muon", [{"params": [a.W]}, {"params": [b.W]}])
    a.W.grad, b.W.grad = torch.ones_like(a.W), torch.ones_like(b.W)
    opt.step()
    assert len(opt.last_step_stats) == 2


def test_default_solver_is_bitwise_reproducible_and_resumes_exactly():
    """Two identical runs of the default solver (anderson, on m ≥ 2n shapes where its Anderson
    least squares runs), and a run resumed from a state_dict, give the same bits. LAPACK's gelsy,
    torch's default lstsq driver on CPU, returned different bits for identical inputs: identical
    20-step runs differed by ~2e-7, a resumed transformer by 3e-4 (a user probe)."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 48, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(48, 8, bias=False))

    def train(net, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()

    runs = []
    for _ in range(3):
        net = model()
        opt = ManifoldMuon(net.modules(), lr=0.05)
        train(net, opt, 12, 1)
        runs.append([p.detach().clone() for p in net.parameters()])
    for other in runs[1:]:
        for p, q in zip(runs[0], other):
            assert_same(p, q, "identical runs")
    net, twin = model(), model()
    opt = ManifoldMuon(net.modules(), lr=0.05)
    train(net, opt, 6, 1)
    twin.load_state_dict(net.state_dict())
    opt2 = ManifoldMuon(twin.modules(), lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(net, opt, 6, 2)
    train(twin, opt2, 6, 2)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert_same(p, q, "resumed run")


def test_a_torch_muon_checkpoint_continues_bitwise_in_modman_muon():
    """modman.Muon matches torch.optim.Muon's arithmetic, so a run can move over mid-training: the
    checkpoint's momentum_buffer is Muon's momentum. It loaded silently with the momentum lost (the
    resumed run 0.041 off torch's after 3 steps); other coefficients than modman's are refused."""
    from modman.optim import Muon

    g = torch.Generator().manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(8, 4, generator=g)), torch.nn.Parameter(torch.randn(6, 6, generator=g))]
    grads = [[torch.randn(w.shape, generator=g) for w in theirs] for _ in range(6)]
    ref = torch.optim.Muon(theirs, lr=0.02)
    for t in range(3):
        for w, gr in zip(theirs, grads[t]):
            w.grad = gr.clone()
        ref.step()
    ours = [torch.nn.Parameter(w.detach().clone()) for w in theirs]
    opt = Muon(ours, lr=0.02)
    opt.load_state_dict(ref.state_dict())
    assert all(torch.equal(opt.state[q]["momentum"], ref.state[w]["momentum_buffer"]) for w, q in zip(theirs, ours))
    assert "ns_coefficients" not in opt.param_groups[0]
    # keys torch has not stay as the group sets them (they were reset to the constructor's defaults)
    tuned = Muon([torch.nn.Parameter(torch.randn(8, 4))], lr=0.02, ns_schedule="polar_express", ns_dtype="float32")
    tuned.load_state_dict(torch.optim.Muon([torch.nn.Parameter(torch.randn(8, 4))], lr=0.03).state_dict())
    group = tuned.param_groups[0]
    assert (group["ns_schedule"], group["ns_dtype"], group["lr"]) == ("polar_express", "float32", 0.03)
    for t in range(3, 6):
        for w, q, gr in zip(theirs, ours, grads[t]):
            w.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        opt.step()
    for w, q in zip(theirs, ours):
        assert torch.equal(w, q), "the continued run is torch's, bitwise"
    other = torch.optim.Muon([torch.nn.Parameter(torch.randn(8, 4))], lr=0.02, ns_coefficients=(3.0, -3.2, 1.2))
    fresh = Muon([torch.nn.Parameter(torch.randn(8, 4))], lr=0.02)
    with pytest.raises(ValueError, match="ns_coefficients"):
        fresh.load_state_dict(other.state_dict())


def test_an_fp64_checkpoint_loads_into_fp32_weights_with_fp32_state():
    """torch casts floating state to the parameter's dtype; modman kept the saved fp64 momentum and
    dual next to fp32 weights (every later step mixed precisions)."""
    prob = Problem("manifold_muon", dtype=torch.float64)
    opt = make_opt("manifold_muon", prob.params)
    prob.train(opt, 2)
    W32, b32 = (torch.nn.Parameter(p.detach().float()) for p in prob.params)
    opt32 = make_opt("manifold_muon", [W32, b32])
    opt32.load_state_dict(opt.state_dict())
    assert {k: v.dtype for k, v in opt32.state[W32].items() if k in ("momentum", "dual")} == \
        {"momentum": torch.float32, "dual": torch.float32}
    assert opt32.state[b32]["exp_avg"].dtype == torch.float32


def test_a_conv_weights_momentum_has_the_weights_shape_and_an_old_matrix_one_loads():
    """torch's optimizers keep state in the parameter's shape; a Conv weight's momentum was its
    (out, in·k) matrix. A state_dict saved that way still loads (reshaped) and resumes bitwise."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 2)
    twin = copy.deepcopy(conv)
    opt = make_opt("manifold_muon", conv.modules())
    x = torch.randn(4, 3, 6, 6)

    def train(module, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            module(x).square().mean().backward()
            optimizer.step()

    train(conv, opt, 2)
    assert opt.state[conv.weight]["momentum"].shape == conv.weight.shape
    sd = copy.deepcopy(opt.state_dict())
    pid = sd["param_groups"][0]["params"][0]
    sd["state"][pid]["momentum"] = sd["state"][pid]["momentum"].reshape(5, 12)  # as saved before
    with torch.no_grad():
        for p, q in zip(twin.parameters(), conv.parameters()):
            p.copy_(q)
    opt2 = make_opt("manifold_muon", twin.modules())
    opt2.load_state_dict(sd)
    assert opt2.state[twin.weight]["momentum"].shape == twin.weight.shape
    train(conv, opt, 2)
    train(twin, opt2, 2)
    assert torch.equal(conv.weight, twin.weight)


@pytest.mark.parametrize("kind", FAMILY)
def test_load_post_hooks_see_the_state_the_step_keeps(kind):
    """Post-hooks ran on torch's cast of the state, before modman restored it: a hook zeroing a
    bf16 model's momentum was undone (fp32 momentum copied back over it), one clearing the state
    made the load fail with KeyError('momentum')."""
    prob = Problem(kind, dtype=torch.bfloat16)
    opt = make_opt(kind, prob.params)
    prob.train(opt, 3)
    sd = opt.state_dict()
    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params)
    seen = []

    def zero_state(optimizer):
        for st in optimizer.state.values():
            seen.extend(v.dtype for k, v in st.items() if k in ("momentum", "exp_avg"))
            for key in ("momentum", "exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].zero_()

    handle = opt2.register_load_state_dict_post_hook(zero_state)
    opt2.load_state_dict(sd)
    handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert all(float(v.abs().max()) == 0 for st in opt2.state.values() for k, v in st.items()
               if k in ("momentum", "exp_avg", "exp_avg_sq"))
    opt3 = make_opt(kind, prob.clone(kind).params)
    opt3.register_load_state_dict_post_hook(lambda optimizer: optimizer.state.clear())
    opt3.load_state_dict(sd)  # restart the momentum after loading: KeyError before
    assert not opt3.state


@pytest.mark.parametrize("kind", FAMILY)
def test_a_saved_group_without_some_hyperparameters_keeps_the_optimizers(kind):
    """A saved fallback group without lr ran AdamW at the constrained groups' lr (0.1, not its
    0.001); without betas or eps the next step raised KeyError."""
    prob = Problem(kind)
    opt = make_opt(kind, prob.params, fallback={"lr": 1e-3})
    prob.train(opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    fallback = sd["param_groups"][1]
    assert fallback["algorithm"] == "adamw"
    for key in ("lr", "betas", "eps"):
        del fallback[key]
    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params, fallback={"lr": 1e-3})
    opt2.load_state_dict(sd)
    assert {k: opt2.param_groups[1][k] for k in ("lr", "betas", "eps")} == \
        {k: opt.param_groups[1][k] for k in ("lr", "betas", "eps")}
    prob.train(opt, 2)
    twin.train(opt2, 2)
    assert_same(prob.b, twin.b)


def test_a_transposed_weights_momentum_of_the_other_orientation_is_refused():
    """Conv1D momentum (stored (in, out)) was never saved as its (out, in) matrix: that shape
    loaded, reshaped (not transposed), scrambling it."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = conv1d(24, 16)  # weight (16, 24): nx = 16 in, nf = 24 out
    opt = make_opt("manifold_muon", layer.modules())
    layer(torch.randn(3, 16)).square().sum().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    pid = sd["param_groups"][0]["params"][0]
    sd["state"][pid]["momentum"] = sd["state"][pid]["momentum"].mT.contiguous()
    with pytest.raises(ValueError, match=r"momentum.*shape \(24, 16\), expected \(16, 24\)"):
        make_opt("manifold_muon", copy.deepcopy(layer).modules()).load_state_dict(sd)


def test_a_grouped_convolution_checkpoint_from_before_the_group_view_loads():
    """Before 2026-12-07 a grouped convolution's weight was stepped as its flattened matrix: its
    group saved flatten=True and a dual of that matrix. Such a checkpoint was refused ("flatten=True
    in the state dict and 'groups=4' in the optimizer", no way around it; a review). It loads: the
    momentum (the weight's shape) carries over, the flattened matrix's dual is dropped (a warm start
    only), and the next step runs."""
    import copy
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(8, 16, 3, groups=4), torch.nn.Flatten(), torch.nn.Linear(16 * 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ManifoldMuon(model.modules(), lr=0.05)
        fresh = ManifoldMuon(model.modules(), lr=0.05)
    x = torch.randn(5, 8, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    gi = next(i for i, g in enumerate(old["param_groups"]) if g["flatten"] == "groups=4")
    pid = old["param_groups"][gi]["params"][0]
    old["param_groups"][gi]["flatten"] = True
    old["state"][pid]["dual"] = torch.zeros(6, 6)  # the flattened 16×6 matrix's dual
    fresh.load_state_dict(old)
    conv = model[0].weight
    assert fresh.param_groups[gi]["flatten"] == "groups=4"
    assert torch.equal(fresh.state[conv]["momentum"], opt.state[conv]["momentum"])
    assert "dual" not in fresh.state[conv]
    fresh.zero_grad()
    model(x).square().mean().backward()
    fresh.step()
    assert fresh.state[conv]["dual"].shape == (4, 4, 4)  # the batched view's own warm start
    assert float(torch.as_tensor(fresh.last_step_stats["0.weight"]["duality_gap"]).max()) <= 1e-4


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_a_state_dict_with_number_steps_loads_and_resumes(kind, kw):
    """torch's test_load_nontensor_step: a fallback group's ``step`` saved as a Python number loads
    as a tensor (it was refused: "has shape float, expected ()"), and the run resumes bitwise."""
    def numbers(sd):
        sd = copy.deepcopy(sd)
        for st in sd["state"].values():
            if "step" in st:
                st["step"] = st["step"].item()
        assert any(isinstance(st.get("step"), float) for st in sd["state"].values())
        return sd

    _, opt2 = _resume_matches(kind, kw, numbers)
    assert all(isinstance(st["step"], torch.Tensor) for st in opt2.state.values() if "step" in st)


@pytest.mark.parametrize("kind", ["manifold_muon", "muon", "hyperspherical"])
def test_an_added_group_of_an_algorithm_it_does_not_run_is_refused_at_once(kind):
    """add_param_group took any algorithm/manifold pair: with an unknown algorithm, or
    manifold_muon without a manifold, the next step failed halfway, after the earlier groups had
    stepped; a "muon" group labelled Stiefel stepped off the manifold it claimed (an audit)."""
    prob = Problem(kind)
    opt = make_opt(kind, _named(prob))
    prob.train(opt, 2)
    before = snapshot(opt, prob.params)
    extra = torch.nn.Parameter(torch.randn(5, 3))
    for group in ({"algorithm": "bogus"}, {"algorithm": "manifold_muon", "manifold": "sphere"},
                  {"algorithm": "muon", "manifold": "stiefel"}):
        with pytest.raises(ValueError, match="runs \\(manifold, algorithm\\) in"):
            opt.add_param_group({"params": [extra], **group})
        assert_unchanged(opt, prob.params, before)
        assert len(opt.param_groups) == len(before[1]["param_groups"])


def test_stepping_a_meta_parameter_names_it():
    """Before: "Tensor.item() cannot be called on meta tensors", from the finiteness check."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = make_opt("manifold_muon", model.modules(), project_on_init=False, budget="uniform")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"step: (weight|bias) is on the meta device"):
        opt.step()
    for p in model.parameters():
        p.grad = None
    opt.step()  # without gradients nothing is stepped, as by torch


# a hyperparameter the constructor refuses, per family member: (group index, key, value, error)
_BAD_SETTINGS = {
    "manifold_muon": [(0, "solver", "nope", ValueError), (0, "tol", -1.0, ValueError), (0, "lr", float("nan"), ValueError),
                      (0, "scale", -2.0, ValueError), (0, "nesterov", "yes", TypeError), (1, "betas", (0.9, 1.5), ValueError)],
    "muon": [(0, "lr", float("nan"), ValueError), (0, "ns_dtype", "int8", ValueError), (1, "betas", (0.9, 1.5), ValueError)],
    "hyperspherical": [(0, "lr", float("nan"), ValueError), (0, "radius", -1.0, ValueError),
                       (1, "betas", (0.9, 1.5), ValueError)],
}


@pytest.mark.parametrize("kind", FAMILY)
def test_a_state_dict_with_a_hyperparameter_the_constructor_refuses_is_refused(kind):
    """load_state_dict took a solver 'nope', a NaN lr, betas (0.9, 1.5), …; the next step then failed
    after earlier groups had stepped, or (a NaN lr under Muon) made the weights NaN (a probe)."""
    prob = Problem(kind)
    opt = make_opt(kind, _named(prob))
    prob.train(opt, 2)
    for gi, key, value, error in _BAD_SETTINGS[kind]:
        sd = opt.state_dict()
        sd["param_groups"][gi][key] = value
        assert_refused_with_nothing_changed(opt, prob.params, lambda: opt.load_state_dict(sd), error,
                                            f"parameter group {gi} of the state dict: .*{key}.*nothing was loaded")
    prob.train(opt, 1)


@pytest.mark.parametrize("kind", FAMILY)
def test_a_bad_hyperparameter_set_on_a_group_is_refused_before_any_weight_moves(kind):
    """A scheduler or a user writes param_groups between steps: a NaN lr (LambdaLR) or an unknown
    solver failed inside the group loop, after earlier groups had stepped (a probe)."""
    for gi, key, value, error in _BAD_SETTINGS[kind]:
        prob = Problem(kind)
        opt = make_opt(kind, _named(prob))
        prob.train(opt, 2)
        opt.param_groups[gi][key] = value
        prob.closure(opt)()
        assert_refused_with_nothing_changed(opt, prob.params, opt.step, error,
                                            f"parameter group {gi}: .*no weight was changed")


@pytest.mark.parametrize("kind", FAMILY)
def test_a_model_moved_to_fp64_after_construction_steps_on(kind):
    """model.double() mid-training: the fp32 momentum met fp64 weights, and the AdamW fallback
    failed after the matrices had stepped (a probe). The step recasts the state, as a load does."""
    prob = Problem(kind)
    opt = make_opt(kind, _named(prob))
    prob.train(opt, 3)
    twin = prob.clone(kind)
    opt2 = make_opt(kind, _named(twin))
    opt2.load_state_dict(opt.state_dict())
    for pr in (prob, twin):
        for p in pr.params:
            p.data = p.data.double()
    opt2.load_state_dict(opt2.state_dict())  # the known way: a load casts the state to the weights'
    prob.train(opt, 3)
    twin.train(opt2, 3)
    for p, q in zip(prob.params, twin.params):
        assert p.dtype == torch.float64
        assert_same(p, q, "parameters after model.double()")
    assert_same(opt.state_dict(), opt2.state_dict(), "state after model.double()")


def test_load_keeps_solver_extras_in_fp64():
    """torch's load casts every floating state entry to the weight's dtype; the solver's own entries
    (newton's μ and subspace size) are restored as saved, fp64 (a review: they came back fp32)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 64, bias=False)
    opt = make_opt("manifold_muon", [("w", lin.weight)], solver="newton")
    for _ in range(2):
        lin.weight.grad = torch.randn_like(lin.weight)
        opt.step()
    opt2 = make_opt("manifold_muon", [("w", lin.weight)], solver="newton", project_on_init=False)
    opt2.load_state_dict(opt.state_dict())
    for k in ("mu", "subspace"):
        assert opt.state[lin.weight][k].dtype == torch.float64, k
        assert_same(opt2.state[lin.weight][k], opt.state[lin.weight][k], k)


def test_a_device_move_is_seen_and_the_state_follows_it():
    """No GPU here: a meta parameter stands for the other device. Floating state and the solver's
    entries follow p (the entries keeping fp64), AdamW's step count stays on the CPU, as torch keeps it."""
    from modman.optim.base import _moved_since, _recast_state

    p = torch.empty(6, 4, device="meta")
    state = {"momentum": torch.randn(6, 4), "dual": torch.randn(4, 4), "mu": torch.tensor(0.5, dtype=torch.float64),
             "step": torch.tensor(3.0)}
    assert _moved_since(p, state)
    _recast_state(p, state)
    assert state["momentum"].is_meta and state["dual"].is_meta and state["mu"].is_meta
    assert state["mu"].dtype == torch.float64 and not state["step"].is_meta
    assert not _moved_since(p, state)


@pytest.mark.parametrize("kind", FAMILY)
def test_a_gradient_of_the_wrong_shape_is_refused_naming_it_before_any_weight_moves(kind):
    prob = Problem(kind)
    opt = make_opt(kind, [("layer.bias", prob.b), ("layer.weight", prob.W)])
    prob.closure(opt)()
    prob.W.grad.data = torch.randn(4, 4)  # (torch checks a .grad assignment, not .grad.data)
    assert_refused_with_nothing_changed(opt, prob.params, opt.step, RuntimeError,
                                        r"gradient of layer.weight has shape \(4, 4\), the parameter \(6, 4\)")


@pytest.mark.parametrize("kind", FAMILY)
def test_a_skipped_step_leaves_no_stale_statistics(kind):
    prob = Problem(kind)
    opt = make_opt(kind, _named(prob), nonfinite="skip")
    prob.train(opt, 1)
    assert opt.last_step_stats or kind != "manifold_muon"
    prob.closure(opt)()
    prob.b.grad[0] = float("nan")
    opt.step()
    assert opt.last_step_skipped and opt.last_step_stats == {}


@pytest.mark.parametrize("kind", FAMILY)
def test_every_family_member_takes_foreach(kind):
    """foreach=False was a TypeError for Muon and HypersphericalDescent (only a group key reached it)."""
    runs = []
    for foreach in (None, False):
        prob = Problem(kind)
        opt = make_opt(kind, _named(prob), foreach=foreach)
        assert all(g["foreach"] is foreach for g in opt.param_groups)
        prob.train(opt, 3)
        runs.append(prob.params)
    for p, q in zip(*runs):
        assert_same(p, q, "foreach=None against foreach=False (CPU: the same arithmetic)")
