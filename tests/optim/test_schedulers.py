"""torch's momentum-cycling schedulers (OneCycleLR, CyclicLR) on the family."""
from __future__ import annotations

import pytest
import torch

from ._helpers import FAMILY, Problem, make_opt


@pytest.mark.parametrize("kind", FAMILY)
@pytest.mark.parametrize("scheduler", ["one_cycle", "cyclic"])
def test_cycle_momentum_drives_the_momentum_the_constrained_weights_use(kind, scheduler):
    """torch cycles betas[0] in every group when "betas" is in optimizer.defaults, "momentum"
    otherwise. The fallback's betas were in the defaults, so the constrained groups' momentum
    never moved; now it does, as for torch.optim.Muon, and the AdamW fallback keeps its betas."""
    prob = Problem(kind)
    opt = make_opt(kind, prob.params)
    assert "betas" not in opt.defaults and "momentum" in opt.defaults
    if scheduler == "one_cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1 if g["algorithm"] != "adamw" else 1e-3
                                                                 for g in opt.param_groups], total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4)
    seen = []
    for _ in range(5):
        prob.train(opt, 1, scheduler=sched)
        seen.append([g["momentum"] for g in opt.param_groups if g["algorithm"] != "adamw"])
    assert len({m for step in seen for m in step}) > 1, "momentum is cycled"
    fallback = [g for g in opt.param_groups if g["algorithm"] == "adamw"]
    assert fallback and all(tuple(g["betas"]) == (0.9, 0.95) for g in fallback)
    # the step reads the cycled value: a twin whose momentum is put back steps elsewhere
    twin = prob.clone(kind)
    opt2 = make_opt(kind, twin.params)
    opt2.load_state_dict(opt.state_dict())
    for g in opt2.param_groups:
        g["momentum"] = opt2.defaults["momentum"]
    prob.train(opt, 1)
    twin.train(opt2, 1)
    assert not torch.equal(prob.W, twin.W)


@pytest.mark.parametrize("kind", FAMILY)
def test_one_tensor_lr_for_a_model_is_reduced_once_per_plateau(kind):
    """``lr=torch.tensor(…)`` for ``model.modules()`` fills every role group; torch's
    add_param_group shares the one tensor, and ReduceLROnPlateau updates a tensor lr in place
    group by group: one plateau cut it by 0.5³ with three constrained groups. Each group now
    has its own tensor; the result equals a float lr's."""
    lrs = []
    for lr in (0.1, torch.tensor(0.1)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
        opt = make_opt(kind, model.modules(), lr=lr, budget="uniform") if kind == "manifold_muon" \
            else make_opt(kind, model.modules(), lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        for _ in range(3):
            sched.step(1.0)  # no improvement after the first: one cut per step from then on
        lrs.append([float(g["lr"]) for g in opt.param_groups])
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-6)  # a tensor lr is fp32
    assert lrs[0][0] == pytest.approx(0.1 * 0.5**2)


def test_a_loaded_tensor_lr_is_the_optimizers_own():
    """A tensor lr loaded from a state_dict was the dict's own object (shared by every group of a
    checkpoint saved while they shared it): a scheduler's in-place update reached the caller's
    dict and compounded over the groups."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    opt = make_opt("muon", model.modules(), lr=torch.tensor(0.1))
    sd = opt.state_dict()
    shared = torch.tensor(0.1)
    for g in sd["param_groups"][:2]:
        g["lr"] = shared  # as an older version saved it
    opt2 = make_opt("muon", model.modules(), lr=torch.tensor(0.1))
    opt2.load_state_dict(sd)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt2, factor=0.5, patience=0)
    sched.step(1.0)
    sched.step(1.0)  # no improvement: one cut
    assert float(shared) == pytest.approx(0.1)
    assert [float(g["lr"]) for g in opt2.param_groups[:2]] == pytest.approx([0.05, 0.05])
