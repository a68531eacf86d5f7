"""The manifold-Muon subproblem: one interface, several solvers, one certificate.

    maximise ⟨G, A⟩  subject to  ‖A‖₂ ≤ 1  and  WᵀA + AᵀW = 0     (W on unscaled Stiefel)

The optimizer then steps W ← retract(W − lr·A). Every solver returns a candidate A and a
symmetric dual Λ; ``certify`` makes A feasible and computes the rigorous duality gap (see
``result.py``), so a solver's inexactness shows in the gap, never as an infeasible step.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch

from .._checks import is_finite_real, is_int
from ..linalg.blocked import scaled_norm64
from ..linalg.msign import resolve_compute_dtype
from .admm import solve_admm
from .anderson import anderson_core, solve_anderson
from .closed_form import solve_closed_form
from .dual_ascent import solve_dual_ascent
from .lyapunov import solve_lyapunov
from .newton import msign_flops, newton_core, skew, solve_newton, tall_frame
from .projected import solve_projected
from .reduction import lift, reduce_tall
from .result import SolveResult, certify, certify_gram, certify_with_norm, make_feasible, nuclear_norm, spectral_norm, sym

# name -> (function, default tol, default max_iters)
SOLVERS = {
    "dual_ascent": (solve_dual_ascent, 1e-6, 100),
    "closed_form": (solve_closed_form, 0.0, 0),
    "projected": (solve_projected, 0.0, 1),
    "admm": (solve_admm, 1e-4, 100),
    "lyapunov": (solve_lyapunov, 1e-4, 20),
    "newton": (solve_newton, 2e-5, 80),
    "anderson": (solve_anderson, 5e-5, 80),
}
DEFAULT_SOLVER = "anderson"
# Solvers whose batched solve gives each member what solving it alone gives — every decision (early
# exit, subspace size, step length) is per member: ManifoldMuon's fp32 stacks came out bitwise its
# one-at-a-time steps on CPU, fp64 steps to rounding (1e-16 to 3e-14; tests/optim/test_stacks.py).
# The others' members depend on their batch-mates: after 5 fp32 steps at lr 0.05
# on four 32×32 weights, stacked against alone, dual ascent's weights were 0.08 apart, lyapunov's
# 3e-5, projected's 3e-6, admm's 1e-6. The optimizer stacks same-shape matrices for these only.
SEPARABLE_SOLVERS = frozenset({"anderson", "closed_form", "newton"})


def register_solver(name: str, fn, default_tol: float, default_max_iters: int) -> None:
    """Add a solver ``fn(W, Gn, *, tol, max_iters, warm_start, **options) -> SolverOutput``; its
    parameters after W and Gn other than those three are the options ``solve_manifold_muon``
    passes it (others are refused by name), unless it takes ``**kwargs`` itself."""
    SOLVERS[name] = (fn, default_tol, default_max_iters)  # (not in SEPARABLE_SOLVERS: never stacked)


@torch.no_grad()  # not differentiable (eigh thresholds, early exits): no graph through a Parameter
def solve_manifold_muon(
    W: torch.Tensor,
    G: torch.Tensor,
    *,
    solver: str = DEFAULT_SOLVER,
    tol: float | None = None,
    max_iters: int | None = None,
    warm_start: dict | None = None,
    reduce: bool | str = "auto",
    stored_dtype: torch.dtype | None = None,
    **options,
) -> SolveResult:
    """Steepest unit-spectral-norm tangent direction at W for the gradient G.

    Args:
        W: point on the unscaled Stiefel manifold, (…, m, n), tall or wide (WᵀW = I or WWᵀ = I).
        G: gradient (or momentum) of W's shape; NaN/Inf raise ValueError.
        solver: a name in ``SOLVERS``; ``tol``/``max_iters`` default per solver.
        warm_start: the ``state`` of a previous result for the same parameter (shapes, device and
            dtype checked: an error naming the entry; a dual that is not symmetric is symmetrised,
            one that is not finite or not O(1) dropped).
        reduce: the tall reduction (``reduction.py``): True, False or "auto" (when m ≥ 2n after
            orienting W tall, and the solver is iterative).
        stored_dtype: the dtype W is stored in where it was upcast for the solve (a bf16 weight
            solved in fp32, as the optimizers do): its rounding, not the upcast's, is the noise
            of the cut-off below (default: W's and G's dtypes).
        options: solver-specific (e.g. ``faithful=True`` for "dual_ascent").

    The problem is scale-free in G (the optimum A is unchanged by G → cG, c > 0), so solvers
    work on Gn = G/‖G‖_F (‖G‖_F in fp64 scaled by max|G|: any finite G, denormal or near the
    dtype's maximum, is solved like G of unit scale); G = 0 gives A = 0 with gap 0, and so does a G
    whose tangent part at W is at most 2·eps·‖G‖_F (eps of W's and G's dtypes; plus 16·eps64
    for the fp64 measurement's own rounding: a gradient normal to the manifold, such as an L2
    penalty's, up to rounding).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    if not isinstance(W, torch.Tensor) or not isinstance(G, torch.Tensor):
        raise TypeError("solve_manifold_muon expects tensors W and G")
    if W.ndim < 2 or W.shape != G.shape:
        raise ValueError(f"W and G must be matrices of the same shape, got {tuple(W.shape)} and {tuple(G.shape)}")
    if not W.is_floating_point() or not G.is_floating_point():
        raise TypeError(f"W and G must be real floating tensors, got {W.dtype} and {G.dtype}")
    if W.numel() == 0:
        raise ValueError(f"solve_manifold_muon: W and G are empty, shape {tuple(W.shape)}")
    for name, T in (("G", G), ("W", W)):  # (one pass over W; an eigh would fail on it with a LinAlgError)
        if not bool(torch.isfinite(T).all()):
            raise ValueError(f"solve_manifold_muon: {name} contains NaN or Inf{_members(T)}")
    fn, default_tol, default_iters = SOLVERS[solver]
    # (a bool, a string, NaN or 2.9 ran silently: tol=True as 1.0, max_iters=2.9 as 2; a probe)
    if isinstance(tol, torch.Tensor) and tol.numel() == 1 and not tol.dtype == torch.bool:
        tol = tol.item()  # a group's tensor tol, as the optimizer accepts it
    if tol is not None and not (is_finite_real(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite real number ≥ 0 (or None for the solver's default), got {tol!r}")
    if max_iters is not None and not (is_int(max_iters) and max_iters >= 0):
        raise ValueError(f"max_iters must be an int ≥ 0 (or None for the solver's default), got {max_iters!r}")
    if stored_dtype is not None and not (isinstance(stored_dtype, torch.dtype) and stored_dtype.is_floating_point):
        raise TypeError(f"stored_dtype must be a floating torch.dtype or None, got {stored_dtype!r}")
    tol = default_tol if tol is None else float(tol)
    max_iters = default_iters if max_iters is None else int(max_iters)
    _check_options(solver, fn, options)

    wide = W.shape[-2] < W.shape[-1]
    dtype = resolve_compute_dtype(W.dtype, None)
    Wt = (W.mT if wide else W).to(dtype)
    Gt, g_max, g_ratio, g_size = _scaled_gradient(G.mT if wide else G, dtype)
    g_norm = g_max * g_ratio  # ‖Gt‖_F; inf only for an fp64 G within a decade of the fp64 maximum
    m, n = Wt.shape[-2:]
    warm_start = _checked_warm_start(warm_start, Wt.shape[:-2], n, tuple(W.shape), W.device)
    if warm_start and "dual" in warm_start and bool((g_max == 0).any()):
        # G = 0 has A = 0 and Λ = 0 for its answer; an old dual only misleads (admm: gap 1 or a
        # LinAlgError from a warm dual on a zero gradient, found by a review)
        warm_start = {**warm_start, "dual": warm_start["dual"] * (g_max != 0).to(warm_start["dual"].dtype)}
    if solver == "dual_ascent" and options.get("faithful"):
        options["G_raw"] = (G.mT if wide else G).to(dtype)  # as given: the faithful method is not scale-free
    if reduce not in (True, False, "auto"):
        raise ValueError(f"reduce must be True, False or 'auto', got {reduce!r}")
    if reduce == "auto":
        # "newton" works on the n×n reduction of its own (no basis Q needed)
        reduce = m >= 2 * n and solver not in ("closed_form", "projected", "newton", "anderson") and not options.get("faithful")
    # anderson and newton on a non-square W, certified by certify_gram, take G as it is with its
    # fp64 scale (g_scale) and read it a row block at a time: no normalised m×n copy (peak memory)
    g_scale = 1 / torch.where(g_norm > 0, g_norm, torch.ones_like(g_norm))
    # (1/‖G‖ overflows for an fp64 G of denormals; near the fp64 maximum ⟨G, A⟩ would overflow)
    moderate = bool(torch.isfinite(g_scale).all()) and bool((g_norm <= 1e300).all())
    if solver in ("anderson", "newton", "closed_form") and m != n and not reduce and W.dtype == dtype and moderate:
        Gn = Gt
        options["g_scale"] = g_scale
    else:
        Gn = _normalised(Gt, g_max, g_ratio)
    if reduce and m > n:
        W_r, G_r, Q = reduce_tall(Wt, Gn)
        out = fn(W_r, G_r, tol=tol, max_iters=max_iters, warm_start=warm_start, **options)
        out.direction = lift(Wt, Q, out.direction)
    else:
        out = fn(Wt, Gn, tol=tol, max_iters=max_iters, warm_start=warm_start, **options)
    if out.dual_value is not None and not (reduce and m > n) and W.dtype == dtype:
        A, objective, residual, gap, flops, norm = certify_gram(Wt, Gn, out.direction.to(dtype), out.dual_value, W.dtype,
                                                                g_scale=options.get("g_scale"), sym_gn=out.sym_gn)
        D = out.dual_value.double()
        equivalents = (out.msign_equivalents or 0.0) + flops / msign_flops(m, n)
    else:
        A, objective, residual, gap, norm, D = certify_with_norm(Wt, Gn, out.dual, out.direction, W.dtype)
        equivalents = out.msign_equivalents if out.msign_equivalents is not None else float(out.msign_calls)
    # A tangent part of G at the rounding of the inputs (G normal to the manifold: an L2 penalty's
    # 2λW, or momentum of it) has no direction: the solvers' answer is rounding noise, which the
    # optimizer would scale to a full step of lr. Where the certified value D or the gap says the
    # solve may be of that kind, the tangent part is measured for W as it is (solver-independent:
    # a solver's D can be loose there) and, at most 2·eps of the inputs' dtype (measured ≤ 0.2·eps
    # for fp32 and bf16 G = 2λW), A = 0 is returned with gap 0: the answer to the inputs' precision.
    # (with stored_dtype: the optimizer hands a bf16 weight over in fp32, and fp32's eps let the
    # tangent part of 2λW — the bf16 weight's own rounding, 1.4e-3 of ‖G‖ — through as a full step
    # of lr every step; a probe)
    eps = max(torch.finfo(t).eps for t in (W.dtype, G.dtype, stored_dtype or W.dtype))
    suspect = (D.reshape(gap.shape) <= max(1e-3, 4 * n**0.5 * eps)) | (gap > 0.5)
    if bool(suspect.any()):
        scales = options.get("g_scale")
        Wf, Gf = Wt.reshape(-1, m, n), Gn.reshape(-1, m, n)
        noise = torch.zeros(suspect.numel(), dtype=torch.bool, device=suspect.device)
        # the fp64 measurement has rounding of its own, as large as the bar itself for fp64 inputs
        # (5.0e-16 against 4.4e-16 for G = 2λW on 64×16, where a full-length noise direction came
        # back; a probe): room for it on top, measured ≤ 1.05e-15 from 64×16 to 32768×64 and 1024²
        # (a review), and no more — a genuine fp64 tangent part of 1e-14 keeps its direction
        bar = 2 * eps + 16 * torch.finfo(torch.float64).eps
        for b in suspect.reshape(-1).nonzero().reshape(-1).tolist():
            sc = 1.0 if scales is None else scales.reshape(-1)[b]
            noise[b] = _tangent_norm(Wf[b], Gf[b], sc) <= bar
        noise = noise.reshape(gap.shape)
        if bool(noise.any()):
            A = A.masked_fill(noise[..., None, None], 0.0)
            objective, gap, residual, norm = (torch.where(noise, torch.zeros_like(t), t)
                                              for t in (objective, gap, residual, norm))
    objective = (objective * g_size[..., 0, 0]).to(dtype)  # in G's units (inf where they exceed the dtype)
    return SolveResult(
        direction=A.mT if wide else A,
        objective=objective,
        tangent_residual=residual.to(dtype),
        duality_gap=gap.to(dtype),
        iterations=out.iterations,
        msign_calls=out.msign_calls,
        state=out.state,
        msign_equivalents=equivalents,
        direction_norm=norm.to(dtype),
        dual_value=(D.reshape(gap.shape) * g_size[..., 0, 0]).to(dtype),
    )


# options a solver takes through **options and passes on to its core
_CORES = {solve_anderson: anderson_core, solve_newton: newton_core}
_INTERNAL = {"tol", "max_iters", "warm_start", "g_scale", "G_raw", "square"}


def _check_options(solver: str, fn, options: dict) -> None:
    """Refuse options the solver does not take, naming them and the ones it does (a typo such as
    faithfull=True was ignored by some solvers and raised a TypeError naming an internal
    function in others). A registered solver that takes **kwargs of its own is not checked."""
    params = list(inspect.signature(fn).parameters.values())
    # keyword-only options, and for a registered fn(W, Gn, tol, max_iters, warm_start, alpha=…)
    # its positional-or-keyword ones after W and Gn
    takes = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    takes |= {p.name for p in params[2:] if p.kind is p.POSITIONAL_OR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        if fn not in _CORES:
            return
        takes |= {p.name for p in inspect.signature(_CORES[fn]).parameters.values() if p.kind is p.KEYWORD_ONLY}
    allowed = takes - _INTERNAL
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"solve_manifold_muon: solver {solver!r} takes no option {', '.join(unknown)}; "
                        f"its options: {', '.join(sorted(allowed)) or 'none'}")


def _tangent_norm(W: torch.Tensor, G: torch.Tensor, g_scale) -> float:
    """‖Gn − W·sym(Z)‖_F (Gn = G·g_scale, Z = (WᵀW)⁻¹WᵀGn from ``tall_frame``): an upper bound of
    the distance from Gn to the normal space {W S : S symmetric} at W as it is, i.e. of Gn's tangent
    part (= ‖W·skew(Z) + G⊥‖_F, with ‖W·skew(Z)‖_F = ‖Lᵀ skew(Z)‖_F for WᵀW = LLᵀ). ∞ for a
    rank-deficient W. Four fp64 tall products."""
    Gw, N, Z, L, _ = tall_frame(W, G, g_scale)
    if L is None:
        return math.inf
    return math.sqrt(float((L.mT @ skew(Z)).square().sum()) + float(torch.diagonal(N).sum().clamp(min=0)))


def _dual_bound(n: int) -> float:
    """Entries of a warm dual beyond this are dropped (the solve starts cold). In units of
    Gn = G/‖G‖_F and for WᵀW = I, every optimal Λ has ‖Λ‖₂ ≤ ‖Λ‖_* ≤ √n: D(Λ*) ≤ D(½ sym WᵀGn)
    = ‖Gn − W sym(WᵀGn)‖_* ≤ √n (rank ≤ n, Frobenius ≤ 1) and 2‖Λ‖_* = ‖2WΛ‖_* ≤ D(Λ) + ‖Gn‖_*.
    A Λ with an entry above 4√n has ‖Λ‖_* > 4√n, so D(Λ) ≥ 2‖Λ‖_* − ‖Gn‖_* > 7√n ≥ D of the cold
    start ½ sym(WᵀGn): dropping it never drops a start better than cold (and the cold start is
    always valid).
    (It was 1e6: a warm dual at 1e5 × the optimum left admm and dual_ascent at gap 1, a probe.)"""
    return 4 * math.sqrt(n)



def _members(T: torch.Tensor) -> str:
    """Which matrices of a batch hold a non-finite entry (the refusal named none of a stack's)."""
    if T.ndim <= 2:
        return ""
    bad = (~torch.isfinite(T)).flatten(-2).any(-1).nonzero().tolist()
    shown = ", ".join(str(tuple(i)) for i in bad[:8]) + (f", … ({len(bad)} in all)" if len(bad) > 8 else "")
    return f" (batch members {shown})"


def _checked_warm_start(state, batch, n: int, shape: tuple, device: torch.device) -> dict | None:
    """``warm_start`` as the solvers may read it: a mapping of real tensors on W's device,
    "dual" shaped (…, n, n) and every other entry (…) for the batch (…) of W (tall orientation),
    else an error that names the entry (a state from another parameter); a dual that is not
    finite or not O(1) is dropped, so the solve starts cold instead of failing inside an eigh, and
    one that is not symmetric is symmetrised: the dual variable is symmetric, and a skew part
    went into lyapunov's and dual_ascent's msign unseen by their stopping tests (on square W an
    uphill direction, certified gap 1, a probe). Another entry (μ, the subspace size) that is not
    finite is dropped too: newton took μ = ∞ and returned the projected baseline (gap 4e-2)."""
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise TypeError(f"warm_start must be the state dict of a previous result, got {type(state).__name__}")
    checked = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"warm_start[{key!r}] must be a tensor, got {type(value).__name__}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"warm_start[{key!r}] has dtype {value.dtype}; a solver state is real numbers")
        if value.device != device:
            raise ValueError(f"warm_start[{key!r}] is on {value.device}, W on {device}")
        want = tuple(batch) + ((n, n) if key == "dual" else ())
        if tuple(value.shape) != want:
            raise ValueError(f"warm_start[{key!r}] has shape {tuple(value.shape)}, expected {want} for W of "
                             f"shape {shape}: a state from another parameter or batch?")
        if key == "dual":
            if not torch.equal(value, value.mT):  # (in fp32 at least: an fp16 sum overflowed, a review)
                value = sym(value if value.dtype in (torch.float32, torch.float64) else value.double())
            if not bool((torch.isfinite(value) & (value.abs() <= _dual_bound(n))).all()):
                continue
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            continue
        checked[key] = value
    return checked


def _scaled_gradient(G: torch.Tensor, dtype: torch.dtype):
    """(Gt, g_max, g_ratio, g_size): G in the compute dtype, ‖Gt‖_F = g_max·g_ratio in fp64
    (``scaled_norm64``: never formed where it would overflow, so G at 1e20 in fp32, 1e308 in fp64
    or denormal is still a gradient) and g_size = ‖G‖_F in G's own units, each (…, 1, 1). An fp64
    G for a narrower dtype is divided by max|G| before the cast, which would otherwise overflow or
    flush it to 0 (the problem is scale-free; only the objective keeps G's units)."""
    pre = None
    if torch.finfo(G.dtype).max > torch.finfo(dtype).max:
        pre = torch.linalg.vector_norm(G, ord=math.inf, dim=(-2, -1), keepdim=True).double()
        pre = torch.where(pre > 0, pre, torch.ones_like(pre))
        G = G / pre.to(G.dtype)
    Gt = G.to(dtype)
    g_max, g_ratio = scaled_norm64(Gt)
    g_size = g_max * g_ratio if pre is None else g_max * g_ratio * pre
    return Gt, g_max, g_ratio, g_size


def _normalised(G: torch.Tensor, g_max: torch.Tensor, g_ratio: torch.Tensor) -> torch.Tensor:
    """G/‖G‖_F in G's dtype, from ``scaled_norm64``'s (max|G|, ‖G‖_F/max|G|); divided by the
    two in turn where ‖G‖_F itself would overflow or lose precision in that dtype (each quotient
    is then representable)."""
    fin = torch.finfo(G.dtype)
    g_norm = g_max * g_ratio
    if bool(((g_norm > 0) & ~((g_norm >= fin.tiny * 2**24) & (g_norm <= fin.max / 2**24))).any()):
        g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max))
        return (G / g_max.to(G.dtype)).div_(g_ratio.clamp(min=1).to(G.dtype))
    return G / torch.where(g_norm > 0, g_norm, torch.ones_like(g_norm)).to(G.dtype)


__all__ = [
    "SolveResult", "solve_manifold_muon", "SOLVERS", "DEFAULT_SOLVER", "register_solver",
    "certify", "make_feasible", "nuclear_norm", "spectral_norm", "sym",
]
