"""One rank of tests/optim/test_distributed.py (run as a script: rank, world size, init file, out dir).

Each rank trains a model with ``distributed=True`` and, next to it, an identical copy with the
same optimizer run locally, on the same batches; it checks that both end bitwise equal (weights,
state, step statistics) and writes what it saw to <out>/rank<r>.pt for the cross-rank checks.
"""
import copy
import sys

import torch
import torch.distributed as dist
from torch import nn

import modman
import modman.optim.functional as F


class Net(nn.Module):
    """Linear layers of three shapes, a conv (flattened), an embedding (spheres), biases (AdamW)
    and a weight stored transposed (non-contiguous)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 12)
        self.conv = nn.Conv1d(12, 16, 3)
        self.fc1 = nn.Linear(16, 40)
        self.fc2 = nn.Linear(40, 40, bias=False)
        self.fc2.weight = nn.Parameter(torch.randn(40, 40).t())
        self.head = nn.Linear(40, 5)

    def forward(self, tokens):
        x = self.emb(tokens).transpose(1, 2)  # (batch, 12, length)
        x = torch.relu(self.conv(x)).mean(-1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def run(optimizer_cls, model, steps, seed, **kw):
    return run_more(optimizer_cls(model.modules(), **kw), model, steps, seed)


def run_more(opt, model, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 7, (32, 9), generator=gen)
        target = torch.randint(0, 5, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), target).backward()
        opt.step()
    return opt


def same_stats(a, b):
    if list(a) != list(b):
        return False
    for name in a:
        if list(a[name]) != list(b[name]):
            return False
        for k in a[name]:
            x, y = a[name][k], b[name][k]
            if type(x) is not type(y):
                return False
            x, y = torch.as_tensor(x), torch.as_tensor(y)  # bitwise, NaN equal to NaN (Muon's gap)
            if x.shape != y.shape or not bool(((x == y) | (x.isnan() & y.isnan())).all()):
                return False
    return True


def same_state(a, b):
    for pa, pb in zip(a.state.values(), b.state.values()):
        if list(pa) != list(pb) or not all(torch.equal(pa[k], pb[k]) for k in pa):
            return False
    return len(a.state) == len(b.state)


def refused_unchanged(model, opt) -> str:
    """One step that every rank should refuse: "stepped", or the ValueError's message prefixed by
    whether the weights and the state stayed as they were."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt.step()
        return "stepped"
    except ValueError as e:
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not opt.state
        return f"{'unchanged' if unchanged else 'changed'}: {e}"


def mismatched_gradients(rank):
    """Ranks with gradients for different parameters: refused on every rank, nothing changed."""
    torch.manual_seed(0)
    model = Net()
    opt = modman.ManifoldMuon(model.modules(), distributed=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if rank == 1:
        model.fc1.weight.grad = None
    return refused_unchanged(model, opt)


def dtype_mismatch(rank):
    """Same names and shapes, another dtype on one rank: the flat buffers would not line up (gloo
    aborted the process; equal byte counts would reinterpret the bits), so it is refused."""
    torch.manual_seed(0)
    model = Net()
    if rank == 1:
        model.fc2.double()
    opt = modman.ManifoldMuon(model.modules(), distributed=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
        return "stepped"
    except ValueError as e:
        return str(e)


def swapped_order(rank):
    """Same-shape weights given in another order on rank 1: their names (param0, param1) come from
    positions and agree, so each owner's broadcast landed in the other layer and both layers
    ended equal on every rank (a probe). Their contents tell them apart: refused."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False)
    model = torch.nn.Sequential(a, b)
    opt = modman.ManifoldMuon([a.weight, b.weight] if rank == 0 else [b.weight, a.weight], distributed=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return refused_unchanged(model, opt)


def state_on_one_rank(rank):
    """Optimizer state that differs on one rank (a state_dict loaded on rank 0 only): refused,
    naming the matrix, where rank 1's fresh momentum drove the matrices it owns."""
    torch.manual_seed(0)
    model = Net()
    opt = run(modman.ManifoldMuon, model, 1, seed=1, distributed=True)
    if rank == 1:
        opt.state[model.fc2.weight]["momentum"].zero_()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
        return "stepped"
    except ValueError as e:
        unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        return f"{'unchanged' if unchanged else 'changed'}: {e}"


def sharded(world):
    """FSDP1 (flat shards, either use_orig_params) and FSDP2 (DTensors): refused at construction
    by name (FSDP2 built, then failed inside the first step; FSDP1's shards went to the
    fallback or were called unholdable)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    def fsdp2(m):
        fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
        return m

    from torch.distributed.fsdp import ShardingStrategy

    from torch.distributed.optim import ZeroRedundancyOptimizer

    out = {}
    for cls in (modman.ManifoldMuon, modman.Muon):  # ZeRO: refused on every rank (one rank failed, others hung)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
        try:
            ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=0.05)
            out["zero", cls.__name__] = "built"
        except TypeError as e:
            out["zero", cls.__name__] = str(e)
    for label, wrap in (("no_shard", lambda m: FullyShardedDataParallel(  # whole weights: allowed
                            m, use_orig_params=True, sharding_strategy=ShardingStrategy.NO_SHARD,
                            device_id=torch.device("cpu"))),
                        ("fsdp1", lambda m: FullyShardedDataParallel(m, device_id=torch.device("cpu"))),
                        ("fsdp1_orig", lambda m: FullyShardedDataParallel(m, use_orig_params=True,
                                                                          device_id=torch.device("cpu"))),
                        ("fsdp2", fsdp2)):
        torch.manual_seed(0)
        model = wrap(torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 5)))
        for cls in (modman.ManifoldMuon, modman.Muon):
            try:
                opt = cls(model.modules())
            except TypeError as e:
                out[label, cls.__name__] = str(e)
                continue
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
            opt.step()  # (NO_SHARD: the gradients all-reduced, whole weights stepped)
            weights = [p.detach() for p in model.parameters() if p.ndim == 2]
            on = all(float((torch.linalg.svdvals(w.double()) - 1).abs().max()) < 1e-5 for w in weights)
            out[label, cls.__name__] = f"stepped, on the manifold: {on}"
            model.zero_grad()
    # DTensors given the AdamW fallback: let through, they failed in the first step ("invalid python
    # storage"; a plain gradient beside them: "mixed torch.Tensor and DTensor", a probe)
    torch.manual_seed(0)
    model = fsdp2(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)))
    try:
        modman.ManifoldMuon(model.modules(), roles={torch.nn.Linear: "fallback"})
        out["fsdp2_fallback"] = "built"
    except TypeError as e:
        out["fsdp2_fallback"] = str(e)
    return out


def no_gradients_here(rank):
    """A rank without any gradient for a shared matrix must still meet the others' check (it
    used to skip every collective and leave them waiting)."""
    torch.manual_seed(0)
    model = Net()
    opt = modman.ManifoldMuon(model.modules(), distributed=True)
    for p in model.parameters():
        p.grad = None if rank == 1 else torch.ones_like(p)
    try:
        opt.step()
        return "stepped"
    except ValueError as e:
        return str(e)


def nonfinite_on_one_rank(rank, mode):
    """A non-finite gradient on rank 1 only (no DDP all-reduce to spread it): every rank raises
    (or skips) alike, with no weight changed, and the ranks step on together afterwards. Rank 1
    decided alone before: rank 0 waited in the step's collectives until rank 1 exited, and a
    skipping rank 1 left rank 0's next collectives mismatched (gloo aborted the process)."""
    torch.manual_seed(0)
    model = Net()
    opt = modman.ManifoldMuon(model.modules(), distributed=True, nonfinite=mode, lr=0.05)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if rank == 1:
        model.fc1.weight.grad[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt.step()
        outcome = f"skipped={opt.last_step_skipped}"
    except FloatingPointError as e:
        outcome = f"raised: {e}"
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the next, finite step runs on every rank together
    return {"outcome": outcome, "unchanged": unchanged, "weights": [p.detach().clone() for p in model.parameters()]}


def lr_changed_on_one_rank(rank):
    """An lr set on one rank only: refused on every rank, naming the group and both values,
    nothing changed (the ranks' weights drifted apart silently before)."""
    torch.manual_seed(0)
    model = Net()
    opt = modman.ManifoldMuon(model.modules(), distributed=True, lr=0.05)
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.1
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return refused_unchanged(model, opt)


def budget_before_broadcast(rank):
    """nanoGPT's order: a seed per rank, the optimizer built before DDP broadcasts rank 0's weights.
    The modular budget came from each rank's own biases: refused, and the message said "a
    scheduler or an lr change applied on one rank only?" (a probe)."""
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # (biases: the budget reads them)
    opt = modman.ManifoldMuon(model.modules(), distributed=True, lr=0.05)
    with torch.no_grad():
        for p in model.parameters():  # what DDP's construction does
            dist.broadcast(p.data, src=0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return refused_unchanged(model, opt)


class Tag:
    """A user's object in a param group: the same on every rank, with an address in its repr."""


def group_settings(rank):
    """Param-group values that are equal on every rank but print differently (an object's address,
    a set's order) step as usual; a group that only rank 0 has is refused on every rank, naming
    both ranks' groups (an IndexError before)."""
    import numpy as np

    out = {}
    for case in ("same_objects", "extra_group", "numpy_lr", "dict_value", "flag_on_one_rank"):
        torch.manual_seed(0)
        model = Net()
        opt = modman.ManifoldMuon(model.modules(), distributed=True, lr=0.05)
        opt.param_groups[0]["tag"], opt.param_groups[0]["labels"] = Tag(), {"alpha", "beta", "gamma", "delta"}
        if case == "extra_group" and rank == 0:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "algorithm": "adamw"})
        if case == "numpy_lr":  # differing NumPy values were taken by their type and let through
            opt.param_groups[0]["lr"] = np.float32(0.05 * (rank + 1))
        if case == "dict_value":
            opt.param_groups[0]["extra"] = {"b": rank, "a": 1}
        if case == "flag_on_one_rank" and rank == 0:  # raised on rank 0 alone, it left rank 1 waiting
            opt.param_groups[0]["maximize"] = True
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        try:
            opt.step()
            out[case] = "stepped"
        except ValueError as e:
            out[case] = str(e)
    return out


def seen_through_ddp():
    """Names and per-layer lr of ManifoldMuon(DDP(model).modules()) are the bare model's."""
    from torch.nn.parallel import DistributedDataParallel

    def layout(opt):
        return [(n, g["lr_scale"], g["manifold"]) for g in opt.param_groups for n in g["param_names"]]

    torch.manual_seed(0)
    model = Net()
    plain = layout(modman.ManifoldMuon(copy.deepcopy(model).modules()))
    wrapped = layout(modman.ManifoldMuon(DistributedDataParallel(model).modules(), distributed=True))
    return plain == wrapped


def owner_failure():
    """A matrix whose owner cannot step it (a NaN weight): every rank raises naming it, promptly,
    and the other matrices are stepped and shared."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4, bias=False))
    opt = modman.ManifoldMuon(model.modules(), distributed=True, budget="uniform")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model[1].weight.detach().clone()
    try:
        opt.step()
        return {"message": "stepped"}
    except RuntimeError as e:
        return {"message": str(e), "other": model[1].weight.detach().clone(),
                "other_moved": not torch.equal(before, model[1].weight)}


def listed_twice():
    """A parameter listed twice (one process steps it twice, as torch does): bitwise one process's.
    Its two occurrences were dealt to two ranks; one rank stepped it twice and also took the other's
    broadcast of a matrix it never stepped: ManifoldMuon raised KeyError 'dual' on one rank and left
    the others waiting, Muon's ranks silently diverged (a probe)."""
    out = {}
    for cls in (modman.ManifoldMuon, modman.Muon):
        torch.manual_seed(0)
        w = nn.Parameter(torch.linalg.qr(torch.randn(10, 6))[0])
        ref = nn.Parameter(w.detach().clone())
        opt, ref_opt = cls([w, w], distributed=True, lr=0.05), cls([ref, ref], lr=0.05)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            g = torch.randn(10, 6, generator=gen)
            for p, o in ((w, opt), (ref, ref_opt)):
                p.grad = g.clone()
                o.step()
        out[cls.__name__] = torch.equal(w, ref) and same_state(opt, ref_opt)
    return out


def solver_switch():
    """Two steps with newton, then the groups' solver set to anderson: newton's μ leaves the
    state on every rank (the owner's solver drops it; the others follow), as in one process."""
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    opts = []
    for m, kw in ((model, {"distributed": True}), (reference, {})):
        opt = run(modman.ManifoldMuon, m, 2, seed=3, lr=0.05, solver="newton", **kw)
        for group in opt.param_groups:
            if group["algorithm"] == "manifold_muon":
                group["solver"] = "anderson"
        opts.append(run_more(opt, m, 2, seed=4))
    keys = sorted({k for state in opts[0].state.values() for k in state})
    return {"state_equal": same_state(*opts), "keys": keys}


def main():
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = {"solve": 0, "muon": 0}
    real_solve, real_muon = F.solve_manifold_muon, F.muon_step

    def counted_solve(*a, **k):
        calls["solve"] += 1
        return real_solve(*a, **k)

    def counted_muon(*a, **k):
        calls["muon"] += 1
        return real_muon(*a, **k)

    F.solve_manifold_muon, F.muon_step = counted_solve, counted_muon
    report = {}
    for label, cls, kw in [("manifold_muon", modman.ManifoldMuon, {"lr": 0.05}),
                           ("muon", modman.Muon, {"lr": 0.02})]:
        torch.manual_seed(0)
        model = Net()
        reference = copy.deepcopy(model)
        before = dict(calls)
        opt = run(cls, model, 4, seed=1, distributed=True, **kw)
        mine = {k: calls[k] - before[k] for k in calls}
        ref = run(cls, reference, 4, seed=1, **kw)
        report[label] = {
            "weights_equal": all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters())),
            "state_equal": same_state(opt, ref),
            "stats_equal": same_stats(opt.last_step_stats, ref.last_step_stats),
            "calls": mine,
            "weights": [p.detach().clone() for p in model.parameters()],
        }
    report["mismatch"] = mismatched_gradients(rank)
    report["failure"] = owner_failure()
    report["no_gradients_here"] = no_gradients_here(rank)
    report["dtype_mismatch"] = dtype_mismatch(rank)
    report["nonfinite_raise"] = nonfinite_on_one_rank(rank, "raise")
    report["nonfinite_skip"] = nonfinite_on_one_rank(rank, "skip")
    report["lr_one_rank"] = lr_changed_on_one_rank(rank)
    report["group_settings"] = group_settings(rank)
    report["seen_through_ddp"] = seen_through_ddp()
    report["solver_switch"] = solver_switch()
    report["listed_twice"] = listed_twice()
    report["budget_before_broadcast"] = budget_before_broadcast(rank)
    report["swapped_order"] = swapped_order(rank)
    report["state_on_one_rank"] = state_on_one_rank(rank)
    report["sharded"] = sharded(world)
    torch.save(report, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
