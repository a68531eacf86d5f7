"""torch.compile of the functional core's hot paths: the momentum update and the closed-form
Stiefel retraction compile without graph breaks, agree with eager, and are not recompiled per step.

Graph count: torch._dynamo.utils.counters["stats"]["unique_graphs"] counts the FX graphs dynamo
produced; with fullgraph=True any graph break is an error instead of a silent second graph.
Tolerance: inductor fuses lerp/matmul epilogues (FMA, other summation order), so results agree
to a few fp32 ulps, not bitwise: rtol = atol = 1e-6 (measured max |Δ| ≈ 3e-8)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from modman.manifolds import Stiefel
from modman.optim.functional import momentum_update


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_compiled_momentum_update_and_retraction_match_eager():
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    man = Stiefel()

    step = torch.compile(momentum_update, fullgraph=True)
    buf_c, buf_e = torch.zeros(8, 4), torch.zeros(8, 4)
    for i in range(3):  # several steps: one graph, reused
        grad = torch.randn(8, 4, generator=g)
        u_c = step(grad, buf_c, 0.95, True)
        u_e = momentum_update(grad, buf_e, 0.95, True)
        torch.testing.assert_close(u_c, u_e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(buf_c, buf_e, rtol=1e-6, atol=1e-6)
    assert _graphs() == 1, counters["stats"]

    retract = torch.compile(lambda W, V: man.retract(W, V, method="closed_form"), fullgraph=True)
    for i in range(3):
        W = man.random((8, 4), generator=g)
        A = man.tangent(W, torch.randn(8, 4, generator=g))
        V = -0.05 * A / torch.linalg.matrix_norm(A, 2)
        Y_c, Y_e = retract(W, V), man.retract(W, V, method="closed_form")
        torch.testing.assert_close(Y_c, Y_e, rtol=1e-6, atol=1e-6)
    assert _graphs() == 2, counters["stats"]  # one more graph, reused for new values of the same shape


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("name", ["ManifoldMuon", "Muon", "HypersphericalDescent"])
def test_a_compiled_training_step_agrees_with_eager(name):
    """The checklist: torch.compile of a step that calls optimizer.step() runs and agrees with
    eager. The optimizer's update runs eagerly inside the compiled step (it syncs with the host
    and solves with eighs): before, dynamo recompiled its per-parameter frames until the limit
    (205 s for 4 ManifoldMuon steps of this MLP) and the AdamW fallback (the biases) kept step
    2's bias correction from step 3 on, 2.7e-2 off eager by step 6 at lr 1e-2.
    Tolerance: the compiled forward/backward differ from eager by fp32 rounding (≤ 1e-8 here)."""
    import modman

    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(6, 8), torch.nn.Flatten(), torch.nn.Linear(16, 16),
                                    torch.nn.ReLU(), torch.nn.Linear(16, 4))
        return model, getattr(modman, name)(model.modules(), lr=0.05, fallback={"lr": 1e-2})

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 6, (32, 2), generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(6)]
    runs = []
    for compiled in (True, False):
        model, opt = build()

        def train_step(x, y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        # dynamo warns once per process (torch._dynamo.utils.warn_once): forget earlier ones
        getattr(torch._dynamo.utils, "warn_once_cache", set()).clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in batches:
                step(x, y)
        # dynamo warned of "a call to a functools.lru_cache-wrapped function" (the eager update's cache)
        assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message)[:120] for w in caught]
        runs.append([p.detach().clone() for p in model.parameters()])
    for (pc, pe), (pname, _) in zip(zip(*runs), build()[0].named_parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {pname}: {m}")
