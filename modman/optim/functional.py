"""The functional core of modman's optimizers: plain functions on tensors, no Optimizer object.

One code path for the blog's table of (manifold, norm) pairs. Per parameter W with gradient g:

    momentum:   B ← μB + (1 − μ)g;   u = (1 − μ)g + μB  (Nesterov)  or  u = B
    direction:  A = argmax ⟨u, A⟩ over unit-norm tangent vectors at W
    step:       W ← retract_W(−η·A)

- Stiefel + spectral norm (manifold Muon): A from ``solve_manifold_muon`` on U = W/s; the step
  is the closed-form polar retraction (exact for a tangent partial isometry), followed by an
  SVD-free polish when the measured drift ‖UᵀU − I‖₂ passes the tolerance.
- Euclidean + spectral norm (Muon): A = msign(u) (Keller's quintic by default), W ← W − η'A,
  with torch.optim.Muon's shape adjustment η' = η·√max(1, d_out/d_in) and decoupled decay.
- Sphere + ℓ2 (hyperspherical descent), per row: a = P(u)/‖P(u)‖, w ← r(w − ηa)/‖w − ηa‖.
- AdamW for the Euclidean fallback (biases, gains, unowned parameters).

Step length: η = lr·lr_scale is the length of the tangent step in the parameter's own norm:
spectral for unscaled Stiefel, RMS→RMS (= spectral/s) for scale="rms", so ΔW = −η·s·A.
All directions are scale-free in u: clipping or loss scaling changes only how momentum mixes.
"""
from __future__ import annotations

import math

import torch

from ..linalg import msign
from ..linalg.msign import within_range
from ..linalg.blocked import power_of_two_floor
from ..linalg.schedules import default_steps
from ..manifolds import Sphere, Stiefel
from ..solvers import solve_manifold_muon


def momentum_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Update ``buf`` in place (B ← μB + (1 − μ)g) and return the direction input u."""
    buf.lerp_(grad.to(buf.dtype), 1 - momentum)
    return grad.to(buf.dtype).lerp(buf, momentum) if nesterov else buf


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of state kept for a weight of ``dtype`` (momentum, dual, AdamW moments, LoRA factors):
    fp32 for bf16/fp16 (small updates would round away, an fp16 second moment overflows), else its own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def as_matrix(p: torch.Tensor, flatten: bool | str | None = None) -> torch.Tensor:
    """The matrix (or batch of matrices) a parameter is optimised as, oriented (out, in).

    ``flatten=True``: (out, *rest) → (out, prod(rest)) — Conv1d/2d/3d weights, whose 3-D Conv1d
    shape cannot be told apart from an expert stack by shape alone. ``flatten=False``: as is
    (2-D matrices, 3-D stacks batched over dim 0). ``None`` (tensors given without roles):
    flatten from 4 dimensions up, so a bare 3-D tensor is a stack. ``"transposed"``: a weight
    stored (in, out) (transformers' Conv1D), seen through pᵀ — a view, so in-place steps reach p.
    ``"groups=G"``: a grouped convolution's weight (out, in/G, k…), whose operator is block
    diagonal: the stack of its G blocks (G, out/G, in/G·prod(k)), each its own matrix.
    """
    if flatten == "transposed":
        return p.mT
    groups = conv_groups(flatten)
    if groups:
        return p.reshape(groups, p.shape[0] // groups, -1)
    if flatten is None:
        flatten = p.ndim >= 4
    return p.reshape(p.shape[0], -1) if flatten and p.ndim != 2 else p


def conv_groups(flatten: bool | str | None) -> int:
    """G of a ``"groups=G"`` view (``as_matrix``), else 0."""
    return int(flatten[7:]) if isinstance(flatten, str) and flatten.startswith("groups=") else 0


def from_matrix(M: torch.Tensor, p: torch.Tensor, flatten: bool | str | None = None) -> torch.Tensor:
    """M, a matrix as ``as_matrix(p, flatten)`` sees p (or its rows, flattened), in p's own
    layout (to copy into p)."""
    return M.reshape(p.mT.shape).mT if flatten == "transposed" else M.reshape(p.shape)


def is_copy(W: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``as_matrix`` had to copy p (non-contiguous), so in-place steps on W miss p."""
    return W.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


def gradient_present(G: torch.Tensor) -> torch.Tensor:
    """Per matrix of G (…, m, n): whether its gradient has any nonzero entry (``stiefel_step``'s
    ``active``)."""
    return G.ne(0).flatten(-2).any(-1)


def stiefel_step(
    W: torch.Tensor,
    u: torch.Tensor,
    state: dict,
    *,
    lr: float,
    manifold: Stiefel,
    solver: str,
    tol: float | None,
    max_iters: int | None,
    drift_tol: float,
    warm_keys: tuple[str, ...],
    active: torch.Tensor | None = None,
) -> dict:
    """One manifold-Muon step on W (a matrix view of the parameter), in place. Returns stats.

    ``active`` (W's batch shape, bool): the matrices whose gradient this step is not exactly zero;
    the others stay bitwise (lazy, as ``sphere_step``'s rows). The step is normalised, so a
    matrix's stale, decaying momentum would otherwise move it a full lr every step: an MoE expert
    that got no tokens drifted 0.49 in spectral norm in 10 steps at lr 0.05, 1.65 in 40 (a probe).

    Memory: u is released after the solve (pass a temporary the caller does not keep), and the
    step V is formed in place in the solver's direction and then overwritten with W + V, so at
    most two m×n temporaries are alive outside the solver (``benchmarks/step_memory.py``).
    """
    s = manifold.scale_for(W.shape)
    compute = W.to(torch.float32) if W.dtype in (torch.bfloat16, torch.float16) else W
    if active is not None and not bool(active.any()):  # no gradient at all: no step, no solve
        zero = torch.zeros(W.shape[:-2], dtype=compute.dtype, device=W.device)
        return {"tangent_residual": zero, "duality_gap": zero, "iterations": 0, "msign_calls": 0,
                "distance_to_manifold": manifold.gram_deviation(compute) / 2}
    partial = active is not None and not bool(active.all())
    if partial:
        u = u.masked_fill(~active[..., None, None], 0)  # G = 0 gives A = 0: those matrices stay put
    U = compute if s == 1 else compute / s
    warm = {k: state[k] for k in warm_keys if k in state}
    result = solve_manifold_muon(U, u.to(U.dtype), solver=solver, tol=tol, max_iters=max_iters,
                                 warm_start=warm or None, stored_dtype=W.dtype)
    del u, U
    for key in warm_keys:
        if key not in result.state:
            state.pop(key, None)  # another solver's entry (the group's solver changed) or an older version's
    for key, value in result.state.items():
        old = warm.get(key)
        if partial and old is not None and old.shape == value.shape:
            # the resting matrices keep their warm start, as a whole resting matrix does (a zero G
            # solved alongside reset its dual to 0)
            value = torch.where(active.reshape(active.shape + (1,) * (value.ndim - active.ndim)), value, old)
        state[key] = value
    stats = {
        "tangent_residual": result.tangent_residual,
        "duality_gap": result.duality_gap,
        "iterations": result.iterations,
        "msign_calls": result.msign_calls,
    }
    # The step has length η in W's norm only if ‖A‖₂ = 1. An optimal A is on the unit sphere,
    # but an inexact solver (few iterations, warm start) may return a feasible A inside the ball;
    # scaling it out to the sphere keeps it tangent and can only raise ⟨u, A⟩ (measured: dual
    # ascent with 3 iterations gave a step 0.22 % short). ‖A‖₂ is the certificate's fp64 measure.
    norm = result.direction_norm
    V = result.direction.to(compute.dtype)  # the solver's own tensor: scaled in place into V = −η·s·A
    del result
    V.mul_(((-lr * s) / torch.where(norm > 0, norm, torch.ones_like(norm))).to(V.dtype)[..., None, None])
    factor = manifold.closed_form_factor(W.shape, V)
    X = V.add_(compute)  # W + V
    del V
    # Per matrix: a step that cannot move W (A = 0 from a zero gradient — a resting matrix's masked
    # u — or lr·A below W's rounding) must leave it bitwise as it is: neither the retraction's
    # renormalisation nor the drift polish may touch it (a bf16 weight sits ~4e-3 off the manifold
    # and would otherwise be re-polished) — unless it is far off the manifold (project_on_init=False)
    # with a nonzero gradient (D > 0) but no usable step (the certificate returns A = 0 when its
    # direction is worse than none, as the n×n identities assume WᵀW = I): that one still lands on
    # the manifold. Each matrix of a stack is judged by itself, as if stepped alone.
    still = X.eq(compute).flatten(-2).all(-1)
    any_still, all_still = bool(still.any()), bool(still.all())  # (host syncs, taken once)
    land = torch.zeros_like(still)
    if any_still:
        before = manifold.gram_deviation(compute)
        land = still & (before > 0.1) & (stats["duality_gap"] > 0)
        if all_still and not bool(land.any()):
            stats["distance_to_manifold"] = before / 2
            return stats  # W untouched
    stale = True  # whether ``drift`` (below) is not yet that of ``new``
    if all_still:
        del X
        new = compute
    else:
        new = manifold.apply_closed_form(X, factor)
        # a NaN or ∞ anywhere in a matrix reaches its sum (no m×n mask)
        broken = ~torch.isfinite(new.sum((-2, -1)))
        if bool(broken.any()):
            # The closed form divides ‖M‖_F² by tr(M) (M = VᵀV/s²); for a step just above the
            # underflow threshold ‖M‖_F² rounds to 0 while tr(M) does not, giving 0/0. The exact
            # polar retraction of W + V has no such quotient.
            new = _where(broken, manifold.project(X), new)
        del X
        drift = manifold.gram_deviation(new)
        # Far off the manifold (project_on_init=False on pretrained weights): the polish quintic
        # only converges for singular values near 1 (it diverges past √(5/3)), so project exactly.
        # Near it, polish: the power-iteration estimate runs low (up to 1.37× on 64×32, a claims
        # audit measuring every step in fp64), so polishing at half the tolerance keeps the true
        # drift under it (at the tolerance itself lr 0.1 reached a distance of 1.33e-5 against 1e-5).
        far = drift > 0.1
        near = (drift > drift_tol / 2) & ~far
        any_far, any_near = bool(far.any()), bool(near.any())
        if any_far:
            new = _where(far, manifold.project(new), new)
        if any_near:
            new = _where(near, manifold.polish(new), new)
        stale = any_far or any_near or any_still
    if any_still:
        new = _where(still & ~land, compute, new)
        if bool(land.any()):
            new = _where(land, manifold.project(compute), new)
    W.copy_(new)
    if W.dtype != new.dtype:
        # a bf16/fp16 weight is stepped in fp32 and rounded: report the weight as stored (bf16
        # rounding alone puts it ~2e-3 off, which the fp32 result, ~5e-7 off, understated 3000×)
        drift = manifold.gram_deviation(W.to(new.dtype))
    elif stale:
        drift = manifold.gram_deviation(new)
    stats["distance_to_manifold"] = drift / 2  # ‖UᵀU − I‖₂ ≈ 2·max|σ − 1|
    return stats


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a for the matrices of a stack (…, m, n) where ``mask`` (…) holds, else b (a itself where it
    holds for all: a single matrix makes no m×n copy)."""
    return a if bool(mask.all()) else torch.where(mask[..., None, None], a, b)


def sphere_step(W: torch.Tensor, u: torch.Tensor, *, lr: float, manifold: Sphere,
                active: torch.Tensor | None = None) -> dict:
    """Hyperspherical descent per row, in place; rows with zero tangent gradient stay bitwise.

    ``active`` (rows × 1, bool): the rows whose gradient this step is not exactly zero; the others
    stay bitwise (lazy rows, as SparseAdam's). The step is normalised per row, so a row's stale,
    decaying momentum would otherwise move it a full lr every step: an embedding row of a token seen
    once rotated 63° in the next 10 steps at lr 0.1, and kept turning for ~1700 steps (0.95^t > 0).

    A row whose gradient is parallel to it up to rounding (tangent part ‖g‖ ≤ 8·eps·‖u‖, eps of W's
    and u's dtypes; measured ≤ 1.6·eps for u = 2λw, an L2 penalty's gradient, on rows at their own
    rounding off the sphere, bf16 included) does not move
    either: its direction would be rounding noise scaled to a full step of lr (rows moved 0.04–0.4
    in a user probe). Exactly-zero rows (an embedding's padding_idx) are left out of
    ``distance_to_manifold``."""
    compute = W.to(torch.float32) if W.dtype in (torch.bfloat16, torch.float16) else W
    uc = u.to(compute.dtype)
    # the direction is scale-free in u: each row divided by a power of two near its largest entry
    # (exact), so that the norms below neither underflow nor overflow — at a loss ×1e-20 the fp32
    # squares of 1e-25 entries were 0 and no row moved (a user probe)
    peak = uc.abs().amax(dim=-1, keepdim=True)
    uc = uc / power_of_two_floor(peak)
    base = _on_sphere(compute, manifold, W.dtype, active)
    g = manifold.tangent(base, uc)
    norms = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    eps = max(torch.finfo(W.dtype).eps, torch.finfo(u.dtype).eps)
    moving = norms > 8 * eps * torch.linalg.vector_norm(uc, dim=-1, keepdim=True)
    if active is not None:
        moving = moving & active
    a = torch.where(moving, g / torch.where(moving, norms, torch.ones_like(norms)), torch.zeros_like(g))
    V = -lr * a
    # the residual of the direction at the point it was taken from (compute is W itself in fp32/fp64)
    residual = manifold.tangent_residual(base, a)
    # A row the step cannot move (lr·a below its rounding, lr = 0) is left bitwise: renormalising
    # it would otherwise change its last bits although no step was taken.
    moving = moving & (base + V != base).any(dim=-1, keepdim=True)
    new = manifold.retract(base, V)
    W.copy_(torch.where(moving, new, compute))
    # the same keys as a Stiefel step; the ℓ2 direction is closed-form, so no gap and no iterations
    return {"tangent_residual": residual, "duality_gap": 0.0, "iterations": 0, "msign_calls": 0,
            "distance_to_manifold": manifold.distance(W, skip_zero_rows=True)}


def _on_sphere(compute: torch.Tensor, manifold: Sphere, dtype: torch.dtype,
               active: torch.Tensor | None) -> torch.Tensor:
    """``compute`` with every nonzero ``active`` row off its sphere by more than max(1e-5, eps of
    ``dtype``) (a row as loaded, with project_on_init=False; a bf16 row sits ≤ 1.2e-3 off by
    rounding) replaced by its nearest point, from which the step is taken: the tangent formula and
    the step length hold on the sphere only (rows of norm 4 turned 0.1–0.9° instead of atan(lr),
    rows of norm 0.08 turned 39–66°; a probe). Only those rows are projected (a table with rows
    never looked up stays off its sphere for good: projecting it all every step cost +40–50 %).
    Rows on the sphere up to rounding, zero rows and rows whose squares underflow are left."""
    if compute.ndim == 1:  # one vector on a sphere: a table of one row
        one = None if active is None else active.reshape(1, 1)
        return _on_sphere(compute.unsqueeze(0), manifold, dtype, one).squeeze(0)
    norms = torch.linalg.vector_norm(compute, dim=-1)
    off = ~((norms / manifold.radius - 1).abs() <= max(1e-5, torch.finfo(dtype).eps)) & (norms != 0)
    if active is not None:
        off &= active.squeeze(-1)
    if not bool(off.any()):
        return compute
    return compute.index_put((off,), manifold.project(compute[off]))  # (nonzero rows: project takes them)


def muon_step(
    W: torch.Tensor,
    u: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    schedule: str,
    ns_steps: int,
    compute_dtype: torch.dtype,
    adjust_lr: str | None,
    torch_arithmetic: bool,
) -> dict:
    """Muon: W ← (1 − η·λ)W − η'·msign(u), in place.

    ``torch_arithmetic=True`` orthogonalises exactly as torch.optim.Muon does (Frobenius
    normalisation with ε = 1e-7, addmm order), so modman.Muon can be compared bit for bit.
    """
    if ns_steps is None:
        ns_steps = default_steps(schedule)  # the schedule's own count (also for torch_arithmetic)
    if torch_arithmetic:
        update = _orthogonalize_like_torch(u, schedule, ns_steps, compute_dtype)
    else:
        # (the exact SVD has no steps: Muon's default ns_steps=5 would be refused there)
        update = msign(u, schedule=schedule, steps=None if schedule == "svd" else ns_steps, compute_dtype=compute_dtype)
    A, B = W.shape[-2], W.shape[-1]
    if adjust_lr in (None, "original"):
        ratio = math.sqrt(max(1, A / B))
    elif adjust_lr == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(A, B))
    else:
        ratio = 1.0
    W.mul_(1 - lr * weight_decay)
    W.add_(update.to(W.dtype), alpha=-lr * ratio)
    # the same keys as a Stiefel step: every direction is tangent in Euclidean space; the gap of
    # an uncertified Newton–Schulz polar factor is not computed (NaN), to keep Muon cheap
    return {"tangent_residual": 0.0, "duality_gap": math.nan, "iterations": ns_steps, "msign_calls": 1,
            "distance_to_manifold": 0.0}


def _orthogonalize_like_torch(u, schedule, ns_steps, compute_dtype, eps=1e-7):
    from ..linalg.schedules import coefficients

    # (divided by max|u| first where the dtype's range is narrower — fp16, never torch's bf16, so
    # the parity holds: an fp32 momentum at 1e5 cast to fp16 put NaN into the weights; a probe)
    X = within_range(u, compute_dtype).to(compute_dtype)
    tall = u.size(-2) > u.size(-1)
    if tall:
        X = X.mT
    if X.ndim == 2:
        X = X / X.norm().clamp(min=eps)
        # torch's arithmetic, with the Gram released before the new X is made: three matrices of
        # the iterate's size alive at once, not four (modman.Muon in fp32 peaked at 5× the weight)
        for a, b, c in coefficients(schedule, ns_steps):
            S = X @ X.mT
            S = torch.addmm(S, S, S, beta=b, alpha=c)
            X = torch.addmm(X, S, X, beta=a)
    else:
        # A stack of matrices (expert weights): each matrix is normalised by its own Frobenius
        # norm, the same arithmetic batched (torch.optim.Muon itself takes 2-D parameters only).
        lead = X.shape[:-2]
        X = X.reshape(-1, *X.shape[-2:])
        X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp(min=eps)
        for a, b, c in coefficients(schedule, ns_steps):
            S = X @ X.mT
            S = torch.baddbmm(S, S, S, beta=b, alpha=c)
            X = torch.baddbmm(X, S, X, beta=a)
        X = X.reshape(*lead, *X.shape[-2:])
    return X.mT if tall else X


def adamw_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW (Loshchilov & Hutter), as torch.optim.AdamW computes it, in place.

    A bf16/fp16 parameter is stepped in fp32 (its moments are fp32, as ``ManifoldOptimizer``
    creates them) and rounded once into p: in fp16, g² overflows at |g| > 256 and eps = 1e-8
    rounds to 0, which put inf into the weights after one step. An update below half an ulp of
    p still rounds away (bf16 keeps 8 bits): keep fp32 master weights for that."""
    beta1, beta2 = betas
    state["step"] += 1
    # a Python number in eager mode, the tensor itself under torch.compile (as torch's Adam does):
    # with float(step) a compiled step kept step 2's bias correction from step 3 on (torch 2.13)
    step = state["step"] if torch.compiler.is_compiling() else state["step"].item()
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    low = p.dtype in (torch.bfloat16, torch.float16)
    P = p.to(exp_avg.dtype) if low else p
    g = grad.to(exp_avg.dtype)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):  # (×1 changes no bit: one kernel saved)
        P.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(eps)
    P.addcdiv_(exp_avg, denom, value=-lr / bias1)
    if low:
        p.copy_(P)


def manifold_muon(params, grads, states, *, lr, manifold=None, solver=None, tol=None, max_iters=None,
                  momentum=0.95, nesterov=True, drift_tol=2e-5, warm_keys=("dual",), flatten=None):
    """Functional manifold Muon over lists of parameters, gradients and state dicts (in place).

    Each state dict holds "momentum" (created if missing, fp32 — fp64 for fp64 weights) and the
    solver's warm start. A matrix whose gradient is exactly zero stays bitwise where it is (its
    momentum still decays; ``stiefel_step``'s ``active``). ``solver=None`` uses
    ``modman.solvers.DEFAULT_SOLVER``; ``flatten`` as in ``as_matrix``. Returns the per-parameter
    stats.
    """
    from ..solvers import DEFAULT_SOLVER

    manifold = manifold or Stiefel()
    solver = solver or DEFAULT_SOLVER
    stats = []
    for p, g, state in zip(params, grads, states, strict=True):
        W, G = as_matrix(p, flatten), as_matrix(g, flatten)
        # reshape copies a non-contiguous parameter; step the copy and write it back
        writeback = is_copy(W, p)
        if writeback:
            W = W.clone()
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(W, dtype=torch.float32 if W.dtype != torch.float64 else W.dtype)
        u = momentum_update(G, state["momentum"], momentum, nesterov)
        stats.append(stiefel_step(W, u, state, lr=lr, manifold=manifold, solver=solver, tol=tol,
                                  max_iters=max_iters, drift_tol=drift_tol, warm_keys=warm_keys,
                                  active=gradient_present(G)))
        if writeback:
            p.copy_(W.reshape(p.shape))
    return stats
