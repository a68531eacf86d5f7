"""The tracker in training loops users write: sparse gradients, compiled optimizer steps, a record
that fails halfway, numpy values in a run's history and meta, and which update norms are exact."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from modman.diagnostics import SpectrumTracker, load_tracking, save_tracking


def _lengths(tracking):
    """{weight: the lengths of every per-record list} (equal across weights after whole records)."""
    return {name: [len(t.steps), len(t.exact), len(t.update_exact), *map(len, t.values.values())]
            for name, t in tracking.params.items()}


def test_a_sparse_gradient_is_recorded_as_its_dense_equivalent():
    """nn.Embedding(sparse=True) made the post-hook raise "reshape is not implemented for sparse
    tensors" inside opt.step, after the weights had moved."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3)
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SpectrumTracker(model, every=1).attach(opt)
    for _ in range(2):
        opt.zero_grad()
        head(emb(torch.tensor([1, 3, 3]))).square().sum().backward()
        dense_norm = float(emb.weight.grad.to_dense().double().norm())
        opt.step()
    recorded = tracker.tracking.params["emb.weight"].values["grad_norm"][-1]
    assert recorded == pytest.approx(dense_norm, rel=1e-6)
    assert tracker.tracking.params["emb.weight"].steps == [0, 1]


def test_a_record_that_fails_halfway_leaves_no_part_of_itself(monkeypatch):
    """A record appended a weight's statistics before the next weight failed, leaving steps and
    values of different lengths (plot_metric then failed on the mismatch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SpectrumTracker(model, every=1).attach(opt)
    real, calls = tracker._update_metrics, []

    def second_weight_fails(name, *args):
        calls.append(name)
        if len(calls) == 4:  # step 1, second weight
            raise RuntimeError("injected")
        return real(name, *args)

    monkeypatch.setattr(tracker, "_update_metrics", second_weight_fails)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(2, 6)).sum().backward()
        if step == 1:
            with pytest.raises(RuntimeError, match="injected"):
                opt.step()
        else:
            opt.step()
    lengths = _lengths(tracker.tracking)
    assert lengths == {name: [2] * len(v) for name, v in lengths.items()}
    assert tracker.tracking.params["0.weight"].steps == [0, 2]  # the failed step still counted


def test_the_hooks_are_not_traced_into_a_compiled_optimizer_step():
    """Under torch.compile(opt.step) dynamo traced the tracker's record: 42 graphs instead of 1,
    and recompilations on its float norms."""
    from torch._dynamo.utils import counters

    graphs = {}
    for track in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        tracker = SpectrumTracker(net, every=2).attach(opt) if track else None
        step = torch.compile(opt.step, backend="eager")
        for _ in range(6):
            opt.zero_grad()
            net(torch.randn(5, 8)).square().sum().backward()
            step()
        graphs[track] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs[True] == graphs[False]
    assert tracker.tracking.params["0.weight"].steps == [0, 2, 4]
    assert all(math.isfinite(v) for v in tracker.tracking.params["0.weight"].values["update_norm"])


def test_numpy_values_in_history_and_meta_save_as_plain_numbers(tmp_path):
    """np.float64 passed the float check and was pickled as a numpy object, which
    load_tracking (weights_only) then refused; np.int64 was refused as "not a number"."""
    model = nn.Linear(4, 3)
    tracker = SpectrumTracker(model, every=1, meta={"lr": np.float64(0.1), "seed": np.int64(3), "opt": "sgd"})
    tracker.record(0)
    tracker.tracking.history.append({"step": np.int64(0), "loss": np.float64(1.5), "acc": np.float32(0.25),
                                     "done": np.bool_(True), "t": torch.tensor(2.0)})
    run = load_tracking(save_tracking(tmp_path / "t.pt", tracker))["run"]
    assert run.history == [{"step": 0, "loss": 1.5, "acc": 0.25, "done": True, "t": 2.0}]
    assert [type(v) for v in run.history[0].values()] == [int, float, float, bool, float]
    assert run.meta == {"lr": 0.1, "seed": 3, "opt": "sgd"}


def test_meta_like_vars_of_args_round_trips(tmp_path):
    """None, tuples, lists and dicts load with weights_only too (meta=vars(args) holds them); a
    first version of the numpy conversion refused them."""
    meta = {"betas": (0.9, np.float64(0.95)), "note": None, "layers": [np.int64(2), 3],
            "opt": {"lr": np.float32(0.5), "name": "sgd"}}
    tracker = SpectrumTracker(nn.Linear(4, 3), every=1, meta=meta)
    tracker.record(0)
    run = load_tracking(save_tracking(tmp_path / "t.pt", tracker))["run"]
    assert run.meta == {"betas": (0.9, 0.95), "note": None, "layers": [2, 3], "opt": {"lr": 0.5, "name": "sgd"}}
    assert type(run.meta["betas"][1]) is float and type(run.meta["layers"][0]) is int


def test_meta_subclasses_are_saved_as_their_plain_bases(tmp_path):
    """np.str_, a str Enum and a namedtuple were saved as such and refused by load_tracking."""
    import collections
    import enum

    class Mode(str, enum.Enum):
        FAST = "fast"

    Pair = collections.namedtuple("Pair", "a b")
    tracker = SpectrumTracker(nn.Linear(4, 3), every=1,
                              meta={"name": np.str_("run"), "mode": Mode.FAST, "pair": Pair(1, np.float64(2.0))})
    tracker.record(0)
    run = load_tracking(save_tracking(tmp_path / "t.pt", tracker))["run"]
    assert run.meta == {"name": "run", "mode": "fast", "pair": (1, 2.0)}
    assert type(run.meta["name"]) is str and type(run.meta["pair"]) is tuple


@pytest.mark.parametrize("meta, match", [("x", "meta must be a dict"), ({"cls": object}, "meta value cls"),
                                         ({1: "a", "1": "b"}, "the same once made str")])
def test_meta_that_would_not_load_is_refused_when_the_tracker_is_made(meta, match):
    with pytest.raises(TypeError, match=match):
        SpectrumTracker(nn.Linear(4, 3), meta=meta)


def test_update_exact_marks_the_records_whose_update_norm_is_exact(tmp_path):
    """After load_tracking nothing said which update norms were exact (only spectrum steps'; a
    small matrix's spectrum is exact at every record, so ``exact`` did not tell)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = SpectrumTracker(model, every=1, spectrum_every=2).attach(opt)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
    run = load_tracking(save_tracking(tmp_path / "t.pt", tracker))["run"]
    track = run.params["weight"]
    assert track.exact == [True] * 4
    assert track.update_exact == [True, False, True, False]
    # without the weights before the step there is no update norm (NaN), so it is not exact
    callback = SpectrumTracker(model, every=1, spectrum_every=1)
    callback(0, model)
    assert callback.tracking.params["weight"].update_exact == [False]
    assert math.isnan(callback.tracking.params["weight"].values["update_norm"][0])
    callback.record(1, before={"weight": None}, exact=True)  # a before without this weight's copy
    assert callback.tracking.params["weight"].update_exact == [False, False]
    assert math.isnan(callback.tracking.params["weight"].values["update_norm"][1])
