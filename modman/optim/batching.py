"""Same-shape constrained matrices stepped as one stack: one solve of a (b, m, n) batch.

A manifold-Muon step of a small matrix is a few dozen small calls (the solve, its certificate,
the retraction, the drift check) whose overhead outweighs their arithmetic. So ManifoldMuon
gathers the 2-D matrices (Linear and Conv weights) that agree on everything the step depends on
but its length — shape and layout, dtype, device, manifold, solver, tol, max_iters and the
shapes of their warm starts — into stacks, and steps each stack with one ``stiefel_step``, for
the solvers that solve a batch's members as if alone (``solvers.SEPARABLE_SOLVERS``; the default
among them).
``benchmarks/batching.py`` (CPU, one thread): a whole ManifoldMuon step 1.67× faster on an MLP of
eight d = 32 blocks (d→d→4d→d), 1.4–1.7× at d = 64 (two runs), 1.02× at d = 128, where only the
128×128 weights stack; one solve of a stack against one solve each: 1.65–1.79× for sixteen 64×32,
1.23–1.35× for eight 128×64, 0.97–1.08× from 256² up (the gain is per-call overhead).

Each matrix is stepped as if alone: its own lr × lr_scale, momentum, warm start and drift
decisions. fp32 runs on CPU came out bitwise those of ``foreach=False`` (not checked on a GPU,
whose batched kernels may round differently); in fp64 and bf16 one step
agrees to rounding, and over many steps the runs part within the solver's accuracy (a 1e-16
difference grew to 1e-5 in three fp64 steps of the closed form, whose certified gap there is
~1e-6; ``tests/optim/test_stacks.py``). In ``last_step_stats`` the drift estimate rounds apart
(batched products) and ``iterations``/``msign_calls`` are the stack's (its mean per matrix).

Memory cap: a stack holds at most ``STACK_BYTES`` (1 MiB) of matrices of at most
``MATRIX_BYTES`` (64 KiB, a 128×128 fp32 matrix); a larger matrix steps alone, where stacking
would not pay and its temporaries would grow with the stack. A stack's temporaries are those of
one matrix of its size, so a step's peak temporary memory is at most that of a 1 MiB weight's step
(~13–20 MiB) beside the largest weight's own — many times a small model's largest weight (82×
the 16 KiB of the d = 32 MLP's, against 13× one at a time; 14.3× against 13.5× at d = 128), none
of a large model's.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

STACK_BYTES = 1 << 20
MATRIX_BYTES = 64 << 10  # (a 128×128 fp32 matrix)


def transposed(M: torch.Tensor) -> bool:
    """Whether matrix M is laid out transposed (Mᵀ contiguous, M not): the view of a weight stored
    (in, out), as transformers' Conv1D. Part of a stack's key: CPU products round by layout (a
    contiguous copy of GPT-2's weights stepped one ulp apart from the view at the first step)."""
    return not M.is_contiguous() and M.mT.is_contiguous()


def stack(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack of same-shape matrices in their layout: transposed ones as the transpose of a
    stack of their (contiguous) transposes, so each member is laid out as the matrix alone."""
    if transposed(mats[0]):
        return torch.stack([M.mT for M in mats]).mT
    return torch.stack(list(mats))


def plan_stacks(keys: Sequence[Hashable | None], sizes: Sequence[int], cap: int = STACK_BYTES,
                largest: int = MATRIX_BYTES) -> list[list[int]]:
    """Indices of items with equal keys, in order of first appearance, cut into runs of at most
    ``cap`` bytes (``sizes`` in bytes). Items keyed None or larger than ``largest`` bytes, and runs
    of one item, are left out: those step alone."""
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None and sizes[i] <= largest:
            by_key.setdefault(key, []).append(i)
    runs = []
    for members in by_key.values():
        run, total = [], 0
        for i in members:
            if run and total + sizes[i] > cap:
                runs.append(run)
                run, total = [], 0
            run.append(i)
            total += sizes[i]
        runs.append(run)
    return [run for run in runs if len(run) > 1]
