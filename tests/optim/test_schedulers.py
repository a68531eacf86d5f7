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
