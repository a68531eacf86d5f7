"""distributed=True: each rank solves a share of the matrices and all ranks end bitwise equal to
one process (two gloo ranks on CPU, run by distributed_worker.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import modman
from modman.optim.distributed import assign_owners, bits_checksums

WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS, MATRICES = 4, 4  # distributed_worker.run's steps; Net's conv, fc1, fc2 and head


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_two_ranks_split_the_solves_and_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(tmp_path / "init"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for label, counter in (("manifold_muon", "solve"), ("muon", "muon")):
        for r, rep in enumerate(reports):
            mine = rep[label]
            # bitwise the run of one process with the same optimizer on the same batches
            assert mine["weights_equal"], (label, r)
            assert mine["state_equal"], (label, r)
            assert mine["stats_equal"], (label, r)
        for a, b in zip(reports[0][label]["weights"], reports[1][label]["weights"]):
            assert torch.equal(a, b), label
        calls = [rep[label]["calls"][counter] for rep in reports]
        # every matrix solved exactly once a step, by one rank; the largest (fc2, 40×40) alone on
        # one rank and the three small ones on the other (the longest-processing-time rule)
        assert sum(calls) == STEPS * MATRICES, (label, calls)
        assert sorted(calls) == [STEPS, 3 * STEPS], (label, calls)
    for rep in reports:
        # ranks with gradients for different parameters: refused alike, before anything changed
        assert rep["mismatch"].startswith("unchanged: distributed step: the ranks have gradients for different"), \
            rep["mismatch"]
        # an owner that cannot step its matrix: every rank raises naming it (no rank waits for a
        # broadcast that never comes), and the other matrix is stepped and shared
        failure = rep["failure"]
        assert failure["message"].startswith("distributed step failed for 0.weight"), failure["message"]
        assert "W contains NaN" in failure["message"] and failure["other_moved"]
    assert torch.equal(reports[0]["failure"]["other"], reports[1]["failure"]["other"])
    # a non-finite gradient on rank 1 alone: every rank raises (or skips) alike, nothing changes,
    # and the ranks step on together (rank 0 waited, then gloo aborted it)
    for mode in ("raise", "skip"):
        outcomes = [rep[f"nonfinite_{mode}"] for rep in reports]
        assert all(o["unchanged"] for o in outcomes), mode
        if mode == "raise":
            assert outcomes[1]["outcome"] == ("raised: non-finite gradient in fc1.weight; no weight was changed on "
                                              "any rank (pass nonfinite='skip' to skip such steps)"), outcomes[1]
            assert outcomes[0]["outcome"].startswith("raised: non-finite gradient on rank(s) 1;"), outcomes[0]
        else:
            assert [o["outcome"] for o in outcomes] == ["skipped=True"] * 2
        for a, b in zip(outcomes[0]["weights"], outcomes[1]["weights"]):
            assert torch.equal(a, b), mode
    for rep in reports:  # an lr set on rank 1 only: refused alike, before anything changed
        assert rep["lr_one_rank"].startswith("unchanged: distributed step: the ranks' param groups differ "
                                             "[group 0 (emb.weight): lr 0.05 (rank 0) vs 0.1 (rank 1)]"), rep["lr_one_rank"]
    for rep in reports:  # equal values that print differently step; a group on rank 0 only is refused
        settings = rep["group_settings"]
        assert settings["same_objects"] == "stepped", settings
        assert settings["extra_group"].startswith("distributed step: the ranks' param groups differ [rank 0: "), settings
        assert "rank 1: " in settings["extra_group"], settings
        assert settings["numpy_lr"].startswith("distributed step: the ranks' param groups differ [group 0 (emb.weight): "
                                               "lr 0.05000000074505806 (rank 0) vs 0.10000000149011612 (rank 1)]"), settings
        assert "extra (" in settings["dict_value"] and "(rank 1)" in settings["dict_value"], settings
        assert "maximize True (rank 0) vs None (rank 1)" in settings["flag_on_one_rank"], settings
    for rep in reports:
        assert rep["no_gradients_here"].startswith("distributed step: the ranks have gradients for different"), \
            rep["no_gradients_here"]
        assert rep["seen_through_ddp"]  # DDP(model).modules(): the bare model's names and budget
        assert rep["listed_twice"] == {"ManifoldMuon": True, "Muon": True}, rep["listed_twice"]
        message = rep["budget_before_broadcast"]
        assert message.startswith("unchanged: distributed step: the ranks' param groups differ") and \
            "lr_scale" in message and "build the optimizer after DDP(model)" in message, message
        # the groups' solver changed mid-run: every rank's state as one process's, μ gone
        assert rep["solver_switch"]["state_equal"] and "mu" not in rep["solver_switch"]["keys"], rep["solver_switch"]
        assert rep["dtype_mismatch"].startswith("distributed step: the ranks have gradients for different"), \
            rep["dtype_mismatch"]
        # same-shape weights in another order on one rank, momentum differing on one rank:
        # refused alike, naming the matrices, nothing changed
        assert rep["swapped_order"].startswith("unchanged: distributed step: the ranks' weights or optimizer "
                                               "state differ for param0, param1;"), rep["swapped_order"]
        sharded = dict(rep["sharded"])
        assert sharded.pop("fsdp2_fallback").startswith("0.weight is a DTensor"), rep["sharded"]
        assert sharded.pop(("no_shard", "ManifoldMuon")) == "stepped, on the manifold: True", rep["sharded"]
        assert sharded.pop(("no_shard", "Muon")).startswith("stepped"), rep["sharded"]
        for cls in ("ManifoldMuon", "Muon"):
            assert sharded.pop(("zero", cls)).startswith(f"ZeroRedundancyOptimizer(optimizer_class={cls}) is not "
                                                         "supported"), rep["sharded"]
        assert set(sharded) == {(label, cls) for label in ("fsdp1", "fsdp1_orig", "fsdp2")
                                for cls in ("ManifoldMuon", "Muon")}, sharded  # (else the loop could be empty)
        for (label, cls), message in sharded.items():  # FSDP's shards: refused by name
            wanted = ("0.weight is a DTensor" if label == "fsdp2" else
                      "_fsdp_wrapped_module._flat_param is a parameter of FullyShardedDataParallel" if label == "fsdp1"
                      else "_fsdp_wrapped_module.0.weight is a parameter of FullyShardedDataParallel")
            assert message.startswith(wanted) and message.endswith("use DDP (distributed=True deals the solves "
                                                                   "out across the ranks)"), (label, cls, message)
        assert rep["state_on_one_rank"].startswith("unchanged: distributed step: the ranks' weights or optimizer "
                                                   "state differ for fc2.weight;"), rep["state_on_one_rank"]


def test_distributed_needs_an_initialised_process_group():
    # the suite never initialises a process group in its own process (the ranks are subprocesses)
    with pytest.raises(ValueError, match="init_process_group"):
        modman.ManifoldMuon([torch.nn.Parameter(torch.eye(3))], distributed=True)
    for bad in ("yes", 1):  # the type is checked first, whether or not torch.distributed is up
        with pytest.raises(TypeError, match="distributed must be True, False or a torch.distributed ProcessGroup"):
            modman.ManifoldMuon([torch.nn.Parameter(torch.eye(3))], distributed=bad)


def test_not_distributed_by_default_or_with_false():
    for d in (False, None):
        opt = modman.ManifoldMuon([torch.nn.Parameter(torch.eye(3))], distributed=d)
        assert opt._process_group is None


@given(st.lists(st.sampled_from([0.0, 1.0, 1e6]) | st.floats(0, 1e6), max_size=40), st.integers(1, 9))
def test_owners_balance_the_cost(costs, world):
    owners = assign_owners(costs, world)
    assert owners == assign_owners(list(costs), world)  # the same on every rank
    assert len(owners) == len(costs) and all(0 <= r < world for r in owners)
    load = [sum(c for c, r in zip(costs, owners) if r == k) for k in range(world)]
    # list scheduling: no rank carries more than an even share plus one item
    if costs:
        assert max(load) <= sum(costs) / world + max(costs) + 1e-9 * sum(costs)
    if len(costs) <= world:
        assert len(set(owners)) == len(costs)  # one item per rank while there are ranks to spare


def test_bits_checksums_are_exact_integer_sums_in_chunks():
    """The checksum of the ranks' weights: each tensor's bits as integers, summed exactly (against
    NumPy's sum of the same view), the same for a non-contiguous view of the same values, in
    chunks (the int64 cast of a whole tensor took 2–4× its memory), 0 for None."""
    import numpy as np
    import modman.optim.distributed as distributed

    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * distributed._CHECKSUM_CHUNK + 5, generator=g)
    half = torch.randn(40, 30, generator=g).bfloat16()
    wide = torch.randn(30, 40, generator=g, dtype=torch.float64)
    got = bits_checksums([big, half, None, wide.mT, wide.mT.contiguous()])
    want = [int(big.numpy().view(np.int32).astype(np.int64).sum()),
            int(half.view(torch.int16).numpy().astype(np.int64).sum()), 0]
    assert got[:3] == want
    assert got[3] == got[4] == int(wide.mT.contiguous().numpy().view(np.int32).astype(np.int64).sum())
