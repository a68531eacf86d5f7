"""Data-parallel optimizer steps: each rank solves a share of the matrices, then all ranks agree.

Under data parallelism (DDP, or any all-reduce of gradients) every rank holds the same weights,
gradients and optimizer state, so every rank would solve the same subproblems. With
``distributed=True`` the matrices of the constrained groups (manifold Muon's Stiefel weights,
Muon's msign) are dealt out instead:

- every rank updates every momentum (elementwise, identical bits on identical gradients);
- the owner of a matrix solves and retracts it exactly as a single process would;
- the owner broadcasts the new weight and its warm-start state (the dual, the subspace size, …),
  and one all-gather shares the step statistics, so weights, ``state_dict()`` and
  ``last_step_stats`` are the same on every rank — bitwise those of one process.

Owners are chosen by the longest-processing-time rule on a cost of batch·m·n·min(m, n) (the
flops of an msign or a solve grow so), largest first onto the least-loaded rank; ties go to the
lower index, so every rank computes the same assignment without communicating. Sphere rows and
the AdamW fallback are elementwise or cheap: every rank steps them itself.

Not supported: uneven inputs under DDP's ``Join`` (a rank that stops calling ``step`` leaves
the others waiting in the optimizer's collectives); a deep copy or pickle of the optimizer
steps everything locally (a process group cannot be copied).

Requirement: the gradients are identical on all ranks (what DDP's all-reduce gives), every
rank calls ``step`` with the same parameters having gradients, and the ranks' weights and
optimizer state agree. The last two are checked at the start of each step (one small
all-gather of fingerprints: the names, shapes and dtypes, the group settings, and an exact
integer checksum of each shared weight and its momentum — a chunked pass over each, cheap beside
its solve, and one read-back; a mismatch raises on every rank before anything changes); the first
is not (it would cost a pass over every gradient and a collective): different gradients would
leave each rank's momentum its own while the weights follow their owners, until the next step's
checksum refuses. So would ranks whose hardware rounds the elementwise momentum update
differently (mixed CPU instruction sets or GPU architectures): their runs were never bitwise one
process's, and now they are told.
Sharded parameters (FSDP1's flat shards, FSDP2's DTensors) are refused at construction. A matrix whose
step raises on its owner (a NaN weight, say) is not sent; every other matrix is, and then every
rank raises, naming it — the ranks stay equal and none waits for a broadcast that never comes.
"""
from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import torch
import torch.distributed as dist

# the algorithms whose per-matrix work is worth dealing out (sphere and AdamW steps are elementwise)
SHARED_ALGORITHMS = ("manifold_muon", "muon")


def built_by_zero() -> bool:
    """Whether the optimizer being built is torch's ZeroRedundancyOptimizer's local one: the first
    frame outside modman is ZeRO's ``_init_local_optimizer`` (no ZeRO can exist before its module is
    imported; code objects are compared, no frame's locals read — reading them kept the callers'
    deleted variables alive, and a user's own optimizer built in a ZeRO subclass was refused). ZeRO
    hands each rank a shard of the parameters: each rank would project only its shard at
    construction (the ranks' models then differ), and ZeRO needs one local group per group given,
    where modman splits groups by role — it failed on the ranks whose shard held a fallback
    parameter and left the others waiting (a probe). Refused on every rank alike instead."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if module is None:
        return False
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "modman":
        frame = frame.f_back
    return frame is not None and frame.f_code is module.ZeroRedundancyOptimizer._init_local_optimizer.__code__


def resolve_group(distributed):
    """The process group for ``distributed=`` (False/None: none; True: the default group; or a
    ProcessGroup), or None when there is nothing to share (one rank)."""
    if distributed is None or distributed is False:
        return None
    if dist.is_available() and distributed is dist.GroupMember.NON_GROUP_MEMBER:  # new_group() off its ranks
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                         "given as distributed=")
    if distributed is not True and not (dist.is_available() and isinstance(distributed, dist.ProcessGroup)):
        raise TypeError(f"distributed must be True, False or a torch.distributed ProcessGroup, got {distributed!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed initialised first "
                         "(torch.distributed.init_process_group)")
    group = dist.group.WORLD if distributed is True else distributed
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                         "given as distributed=")
    return group if dist.get_world_size(group) > 1 else None


def matrix_cost(shape: torch.Size) -> float:
    """batch·m·n·min(m, n) for a matrix or stack of shape (…, m, n)."""
    m, n = shape[-2], shape[-1]
    return float(math.prod(shape[:-2])) * m * n * min(m, n)


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """The rank that solves each item: largest cost first onto the least-loaded rank (ties to
    the lower index, then the rank with fewer items, then the lower rank), the same on every rank."""
    load, count = [0.0] * world_size, [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], count[r], r))
        owners[i] = r
        load[r] += costs[i]
        count[r] += 1
    return owners


def plan_owners(group, costs: list[float]) -> tuple[int, list[int]]:
    """(this rank in ``group``, the owner of each item); (0, []) with no group or no items."""
    if group is None or not costs:
        return 0, []
    return dist.get_rank(group), assign_owners(costs, dist.get_world_size(group))


def canonical(value):
    """A param-group value as the same plain value on every rank: a tensor or NumPy value as its
    number(s), a tuple or list element-wise, a dict and a set sorted, a function by its qualified
    name, any other object by its repr — or by its type where the repr carries a memory address,
    different on every rank (an object in a group refused every step; a review), so that only
    such objects go unchecked (a NumPy lr differing between ranks had been let through by a first
    version that took every other object by its type: the weights drifted apart)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        flat = value.detach().cpu().reshape(-1) if isinstance(value, torch.Tensor) else value.reshape(-1)
        return flat.tolist()[0] if flat.shape[0] == 1 else tuple(flat.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(canonical(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted(((repr(k), canonical(v)) for k, v in value.items()), key=repr))
    if isinstance(value, (set, frozenset)):
        return tuple(sorted((canonical(v) for v in value), key=repr))
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


_CHECKSUM_CHUNK = 1 << 20  # elements summed at a time: the int64 cast of a chunk is 8 MiB, not 2–4× the tensor


def bits_checksums(tensors: list[torch.Tensor | None]) -> list[int]:
    """For each tensor, the sum of its bits read as integers (0 for None): exact and independent
    of the order of summation, so bitwise-equal tensors give equal sums on every rank whatever its
    thread count (a float sum would not; +0.0 and −0.0 differ). Not a hash — it tells apart the
    different tensors a mistake produces (another parameter, another state), not crafted ones.
    A pass over each tensor in chunks, and one read-back per device."""
    sums = []
    for t in tensors:
        if t is None or t.numel() == 0:
            sums.append(None)
            continue
        flat = t.detach().reshape(-1).contiguous()
        ints = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[flat.element_size()])
        if ints.numel() <= _CHECKSUM_CHUNK:  # one op for the common small tensor (400 of 64²: 5 ms, not 31)
            sums.append(ints.sum(dtype=torch.int64))
            continue
        total = torch.zeros((), dtype=torch.int64, device=t.device)
        for chunk in ints.split(_CHECKSUM_CHUNK):
            total += chunk.sum(dtype=torch.int64)
        sums.append(total)
    by_device: dict = {}
    for s in sums:
        if s is not None:
            by_device.setdefault(s.device, []).append(s)
    values = {device: iter(torch.stack(ts).tolist()) for device, ts in by_device.items()}
    return [0 if s is None else next(values[s.device]) for s in sums]


def check_same_items(group, names: list[str], finite: bool = True, settings: list[tuple[str, dict]] = (),
                     contents: list[int] = ()) -> list[int]:
    """Refuse, on every rank alike and before anything changes, ranks that would step different
    parameters (``names``: each with its shape and dtype): the owners' broadcasts would land in
    other tensors (or in none); and ranks whose param groups differ (``settings``: a label and the
    group's hyperparameters, per group): a scheduler stepped, or an lr set, on one rank only made
    the ranks' weights drift apart silently (4e-3 in a few steps, a user probe). Returns the ranks
    whose gradients are not all finite (``finite`` is this rank's answer), so that every rank
    raises or skips alike: a rank deciding alone left the others waiting in the step's collectives
    (gloo then aborted them). ``contents`` (``bits_checksums`` of each item's weight and
    momentum, two per name) refuses ranks whose weights or optimizer state differ: the
    same-shape parameters given in another order on one rank (their names come from positions,
    so they agree) made two layers' weights identical on every rank (a probe), and a state loaded
    on one rank only left the other ranks' momenta fresh. One all_gather of three 40-byte
    fingerprints and a flag per rank."""
    def fingerprint(lines) -> str:  # a fingerprint, not security: FIPS builds allow it
        return hashlib.sha1("\n".join(lines).encode(), usedforsecurity=False).hexdigest()

    groups = [(label, {k: canonical(v) for k, v in values.items()}) for label, values in settings]
    answers = [None] * dist.get_world_size(group)
    lines = [f"{label}: {sorted(values.items())!r}" for label, values in groups]
    sums = fingerprint(map(str, contents))
    dist.all_gather_object(answers, (fingerprint(names), fingerprint(lines), bool(finite), sums), group=group)
    digests = [d for d, _, _, _ in answers]
    if len(set(digests)) == 1 and len({s for _, s, _, _ in answers}) > 1:
        gathered = [None] * len(answers)
        dist.all_gather_object(gathered, groups, group=group)  # only to say what differs
        differences = _group_differences(gathered)
        # lr_scale is the modular budget, read from each rank's weights at construction (a bias's
        # norm bounds its layer's input): an optimizer built before DDP broadcast rank 0's weights,
        # on ranks seeded apart, got each rank's own (a probe; the hint named only schedulers)
        cause = ("the modular budget (lr_scale) was computed from weights that differed between the "
                 "ranks: build the optimizer after DDP(model), which broadcasts rank 0's weights, or "
                 "seed every rank alike" if "lr_scale " in differences else
                 "a scheduler or an lr change applied on one rank only?")
        raise ValueError(f"distributed step: the ranks' param groups differ [{differences}]; "
                         f"every rank must step with the same hyperparameters ({cause}). Nothing was changed.")
    if any(d != digests[0] for d in digests):
        gathered = [None] * len(digests)
        dist.all_gather_object(gathered, names, group=group)  # the names, only to say what differs
        detail = "; ".join(f"rank {r}: {len(g)} ({', '.join(g[:4])}{', …' if len(g) > 4 else ''})"
                           for r, g in enumerate(gathered))
        raise ValueError("distributed step: the ranks have gradients for different parameters "
                         f"[{detail}]; every rank must step the same ones (DDP gives all of them gradients). "
                         "Nothing was changed.")
    if len({c for _, _, _, c in answers}) > 1:
        gathered = [None] * len(answers)
        dist.all_gather_object(gathered, list(contents), group=group)  # only to say which differ
        pairs = [list(zip(g[::2], g[1::2])) for g in gathered]  # (weight, momentum) per name
        differ = [n.split(" ")[0] for n, *sums in zip(names, *pairs) if len(set(sums)) > 1]
        raise ValueError(f"distributed step: the ranks' weights or optimizer state differ for {', '.join(differ[:6])}"
                         f"{', …' if len(differ) > 6 else ''}; under data parallelism every rank holds the same "
                         "ones. Same-shape parameters passed in a different order on some rank? A state_dict "
                         "loaded on one rank only? Nothing was changed.")
    return [r for r, (_, _, ok, _) in enumerate(answers) if not ok]


def _group_differences(gathered: list[list[tuple[str, dict]]]) -> str:
    """What differs between the ranks' (label, hyperparameters) lists: the number of groups, the
    labels, and each differing key with every rank's value."""
    counts = [len(g) for g in gathered]
    if len(set(counts)) > 1:
        return "; ".join(f"rank {r}: {c} groups ({', '.join(label for label, _ in g)})"
                         for r, (c, g) in enumerate(zip(counts, gathered)))
    out = []
    for i in range(counts[0]):
        labels = {g[i][0] for g in gathered}
        keys = sorted(set().union(*(g[i][1] for g in gathered)))
        differing = [k for k in keys if len({repr(g[i][1].get(k)) for g in gathered}) > 1]
        if len(labels) > 1 or differing:
            out.append(f"{gathered[0][i][0]}: " + ", ".join(
                [f"{k} " + " vs ".join(f"{g[i][1].get(k)!r} (rank {r})" for r, g in enumerate(gathered))
                 for k in differing] + ([f"labels {sorted(labels)}"] if len(labels) > 1 else [])))
    return "; ".join(out)


def share_step(group, items: list, owners: list[int], stats: dict, failed: dict[int, str]) -> dict[str, str]:
    """After the owners stepped: every rank gets each item's weight and warm-start state from its
    owner, and ``stats`` gains the other ranks' entries.

    ``items``: (weight tensor, state dict, name, warm-start keys) in the same order on every
    rank; ``failed``: item index → error message for this rank's items whose step raised. A rank
    that lacks a warm-start key the owner has (the first step) allocates it from the shape and
    dtype the all-gather carries, and drops one the owner's solver no longer keeps (a changed
    ``solver``). Items that failed on their owner are not sent. Returns every
    rank's failures, {name: "rank r: message"}, for the caller to raise on all ranks alike.
    """
    rank = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    mine = {}
    for i, (_, state, name, keys) in enumerate(items):
        if owners[i] == rank and i not in failed:
            mine[i] = ({k: (tuple(state[k].shape), str(state[k].dtype).removeprefix("torch."))
                        for k in keys if k in state},
                       {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in stats.get(name, {}).items()})
    gathered = [None] * len(ranks)
    dist.all_gather_object(gathered, (mine, failed), group=group)
    failures = {items[i][2]: f"rank {r}: {msg}" for r, (_, f) in enumerate(gathered) for i, msg in f.items()}
    # what each owner sends, grouped by (owner, dtype, device): one broadcast of a flat buffer per
    # group, not one per tensor (24 small matrices: 48 broadcasts took a third of the step)
    outgoing: dict[tuple, list[torch.Tensor]] = {}
    for i, (weight, state, name, keys) in enumerate(items):
        if name in failures:
            continue
        meta, their_stats = gathered[owners[i]][0][i]
        if owners[i] != rank:
            stats[name] = {k: v.to(weight.device) if isinstance(v, torch.Tensor) else v
                           for k, v in their_stats.items()}
            for k in keys:
                if k not in meta:
                    del state[k]  # the owner's solver dropped it (stiefel_step): the state stays alike
            for k, (shape, dtype) in meta.items():
                if k not in state or tuple(state[k].shape) != shape or str(state[k].dtype) != f"torch.{dtype}":
                    state[k] = torch.empty(shape, dtype=getattr(torch, dtype), device=weight.device)
        for t in [weight.detach()] + [state[k] for k in sorted(meta)]:
            outgoing.setdefault((owners[i], t.dtype, t.device), []).append(t)
    packs = []
    for (owner, dtype, device), tensors in outgoing.items():
        if owner == rank:
            flat = torch.cat([t.reshape(-1) for t in tensors])
        else:
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
        packs.append((owner, tensors, flat, dist.broadcast(flat, src=ranks[owner], group=group, async_op=True)))
    for owner, tensors, flat, work in packs:
        work.wait()
        if owner != rank:
            for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(chunk.view(t.shape))  # into non-contiguous weights too
    return failures
