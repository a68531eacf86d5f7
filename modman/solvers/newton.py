"""Newton's method on the n×n dual of the manifold-Muon subproblem, with smoothing continuation.

The reduction (tall W, WᵀW = I, Gn = G/‖G‖_F). Write Gw = WᵀGn (n×n), S = skew(Gw),
G⊥ = Gn − W·Gw and N = G⊥ᵀG⊥ (n×n, PSD). For a symmetric Λ,

    Gn − 2WΛ = W·C + G⊥,     C = Gw − 2Λ = S + Y,   Y = sym(Gw) − 2Λ   (Y symmetric, free),

and since WᵀG⊥ = 0, (Gn − 2WΛ)ᵀ(Gn − 2WΛ) = CᵀC + N =: M. So the dual D(Λ) = ‖Gn − 2WΛ‖_* is

    f(Y) = tr(M^{1/2}) = tr(((S + Y)ᵀ(S + Y) + N)^{1/2}),   minimised over symmetric Y,

an n×n problem whatever m is (m < 2n included): only Gw, G⊥, N and the final direction touch
the m×n matrices. (The certificate's D is recomputed for W as it is, ``frame_dual_value``: an
fp32 or drifting W has WᵀW ≠ I, and the identity then misstates D by ≈ 0.5‖WᵀW − I‖.) f is convex (a nuclear norm of an affine map), but non-smooth where M is
singular, which is the normal case (rank-deficient G, m ≈ n, odd n). We therefore minimise the
smoothed f_μ(Y) = tr((M + μ²I)^{1/2}) (the nuclear norm of [W C + G⊥; μI], still convex) and
drive μ down (continuation). With M + μ²I = V diag(ℓ) Vᵀ, s = √ℓ, d = 1/s:

    ∇f_μ(Y) = sym(C (M + μ²I)^{-1/2}),
    ∇²f_μ(Y)[Δ] = sym(Δ (M + μ²I)^{-1/2} + C·L(ΔᵀC + CᵀΔ)),

L the Fréchet derivative of X ↦ X^{-1/2}: L(E) = V (Φ ∘ VᵀEV) Vᵀ with
Φ_ij = (s_i^{-1} − s_j^{-1})/(ℓ_i − ℓ_j) = −1/(s_i s_j (s_i + s_j)). In the eigenbasis (Y' = VᵀYV,
C' = VᵀCV, so M' = diag(λ)) the first term is diagonal on symmetric matrices,
Δ'_ij ↦ ½(d_i + d_j)Δ'_ij, and the second is negative semidefinite (X^{-1/2} is operator
monotone decreasing), so P = ½(d_i + d_j) is a preconditioner with 0 ⪯ P^{-1/2}HP^{-1/2} ⪯ I.
Each Newton step: one fp64 eigh of M, the Newton system by preconditioned CG in the eigenbasis
(two n×n products per CG iteration), and an Armijo backtracking line search on f_μ.

Primal recovery and gap estimate (n×n only). For any μ_p ≥ 0 let R = (M + μ_p²I)^{-1/2} and
K = skew(C R). The direction A = W K + G⊥ R is tangent (WᵀA = K is skew) and, in exact arithmetic,

    ⟨Gn, A⟩ = ⟨S, K⟩ + tr(N R),     AᵀA = KᵀK + R N R = X₀ − g² + (k g − g k),

with X₀ = V diag(λ/(λ + μ_p²)) Vᵀ (so ‖X₀‖₂ ≤ 1), g = sym(C R), k = skew(C R); hence
‖A‖₂² ≤ max λ/(λ+μ_p²) + ‖g‖_F² + 2‖k‖_F‖g‖_F and the relative gap of A/max(1, ‖A‖₂) against
f(Y) is known from the eigendecomposition. Near-singular M makes the recovery sensitive to
μ_p, so every iterate is scored over a small grid of μ_p (O(n²) each) and the best is kept.
The iteration stops when that estimate is ≤ tol, after ``max_iters`` Newton steps, or when the
estimate has not improved for 20 steps (returning the best iterate seen). The estimate only steers the iteration: the dispatcher certifies the
returned direction with the products ``certify_gram`` in result.py performs (fp64 Gram of the
actual A, fp64 eigenvalues of M for the dual value).

Continuation: start at μ = mu0·‖M‖₂^{1/2} (cold) and divide μ by 1/shrink whenever the gap
estimate is within 3× the part of it caused by smoothing, Σ(√λ − λ/√(λ+μ²))/f. A warm start
(Λ and μ from the previous call) restarts at μ = max(μ_prev, 0.3·gap₀·‖M‖₂^{1/2}), because a
small μ has a small Newton region and a changed G moves the optimum.

Cost model (``msign_equivalents``; one msign-equivalent = 40mn² + 20n³ flops, the default
10-iteration Newton–Schulz on the m×n matrix, ``msign_flops``): tall products cost 2mn² flops
each (×2 in fp64), an fp64 eigh with vectors 20n³, an fp64 eigvalsh 10n³, an fp64 n×n product
4n³. These weights are a flop model checked against timings (an fp64 eigh of 1024² took 5.2×
an fp64 1024³ product on one EPYC core, i.e. ~10n³ flops of time, ×2 for fp64; an eigvalsh
0.43–0.48× an eigh at n = 256…1024);
benchmarks/solvers.py reports measured time ratios next to it.
"""
from __future__ import annotations

import math

import torch

from ..linalg.blocked import add_gram, combine_rows, gram64, row_blocks
from .result import dual_value, sym
from .subspace import solve_on_subspace
from .types import SolverOutput


def skew(M: torch.Tensor) -> torch.Tensor:
    return (M - M.mT).mul_(0.5)  # one n×n temporary, not two


def msign_flops(m: int, n: int) -> float:
    """Flops of one default msign on an m×n matrix, m ≥ n: 10 quintic Newton–Schulz iterations of
    three products each (XᵀX and the polynomial applied to X, 2mn² each; S², 2n³), counting a
    multiply-add as two flops like every other count here. torch's FlopCounterMode measures the
    same on msign (tests/solvers/test_cost_model.py); until 2026-12 this read 20mn² + 10n³, half,
    which doubled every flop-modelled msign-equivalent."""
    return 40.0 * m * n * n + 20.0 * n**3


_MU_GRID = tuple(10.0**-e for e in range(1, 10))


def _score(lam, Cp, Np_diag, mu_list, D):
    """Best (gap estimate, μ_p) over candidate primal smoothings, all O(n²) (module docstring)."""
    best = (math.inf, 0.0)
    Sp = skew(Cp)
    for mp in mu_list:
        dp = 1.0 / (lam + mp * mp).sqrt() if mp > 0 else torch.where(lam > 0, lam.rsqrt(), torch.zeros_like(lam))
        Q = Cp * dp
        g, k = sym(Q), skew(Q)
        obj = (Sp * k).sum() + (Np_diag * dp).sum()
        gn, kn = (g * g).sum(), (k * k).sum().sqrt()
        bound = (lam * dp * dp).max() + gn + 2 * kn * gn.sqrt()
        gap = float((D - obj / bound.clamp(min=1).sqrt()) / D)
        if gap < best[0]:
            best = (gap, mp)
    return best


def _newton_one(S, N, Y, mu, tol, max_iters, mu0, shrink, cg_iters, cg_tol, warm, stall=20):
    """Minimise f over symmetric Y (fp64, n×n). Returns (Y, V, λ, μ_p, gap_est, μ, steps, cost)."""
    n = S.shape[-1]
    cost = 0.0
    best = None
    steps = 0
    for it in range(max_iters + 1):
        C = S + Y
        M = sym(C.mT @ C + N)
        lam, V = torch.linalg.eigh(M)
        cost += 20.0 * n**3 + 4.0 * n**3
        lam = lam.clamp(min=0)
        scale = float(lam[-1].sqrt())
        D = lam.sqrt().sum()
        if scale == 0.0:  # M = 0: G = 0 up to the normalisation, A = 0 is optimal
            return Y, V, lam, 0.0, 0.0, mu, steps, cost
        Cp = V.mT @ C @ V
        cost += 8.0 * n**3
        Np_diag = lam - (Cp * Cp).sum(-2)  # diag(V'NV) = λ − diag(C'ᵀC')
        if mu is None:
            mu = mu0 * scale
        grid = [mu] + [scale * e for e in _MU_GRID]
        gap, mp = _score(lam, Cp, Np_diag, grid, float(D))
        if best is None or gap < best[4]:
            best = (Y, V, lam, mp, gap)
            best_it = it
        if gap <= tol or it == max_iters:
            break
        if it - best_it >= stall:
            break  # no better estimate for `stall` steps: the floor is elsewhere (e.g. W off the manifold)
        if it == 0 and warm:
            mu = max(mu, 0.3 * gap * scale)
        ell = lam + mu * mu
        s = ell.sqrt()
        d = 1.0 / s
        smoothing = float((lam.sqrt() - lam * d).sum() / D)
        if gap < 3 * smoothing and smoothing > 0.25 * tol:
            mu = mu * shrink
            ell = lam + mu * mu
            s = ell.sqrt()
            d = 1.0 / s
        g = sym(Cp * d)
        Phi = -1.0 / (s[:, None] * s[None, :] * (s[:, None] + s[None, :]))
        Pd = 0.5 * (d[:, None] + d[None, :])

        def hess(X):
            T = X.mT @ Cp
            return sym(X * d + Cp @ (Phi * (T + T.mT)))

        # preconditioned CG on H X = −g (H ⪰ 0; stop on non-positive curvature)
        X = torch.zeros_like(g)
        r = -g
        z = r / Pd
        p = z
        rz = (r * z).sum()
        r0 = float(rz.sqrt())
        for _ in range(cg_iters):
            Hp = hess(p)
            cost += 4.0 * n**3
            pHp = (p * Hp).sum()
            if not pHp > 0:
                break
            a = rz / pHp
            X = X + a * p
            r = r - a * Hp
            z = r / Pd
            rz_new = (r * z).sum()
            if float(rz_new.sqrt()) <= cg_tol * r0:
                break
            p = z + (rz_new / rz) * p
            rz = rz_new
        if not bool((X != 0).any()):
            break
        f0 = float(s.sum())
        slope = float((g * X).sum())
        step = V @ X @ V.mT
        cost += 4.0 * n**3
        t = 1.0
        accepted = False
        while t >= 2.0**-12:
            Yn = sym(Y + t * step)
            Cn = S + Yn
            ln = torch.linalg.eigvalsh(sym(Cn.mT @ Cn + N)).clamp(min=0)
            cost += 10.0 * n**3 + 2.0 * n**3
            if float((ln + mu * mu).sqrt().sum()) <= f0 + 1e-4 * t * slope:
                accepted = True
                break
            t *= 0.5
        steps += 1
        if not accepted:
            # no measurable decrease of f_μ in fp64: smoothing too fine for this iterate
            mu = mu / shrink if mu < 0.1 * scale else mu
            continue
        Y = Yn
    Y, V, lam, mp, gap = best
    return Y, V, lam, mp, gap, mu, steps, cost


def newton_core(Gw, N, dual_in, mu_in, *, tol, max_iters, mu0=0.1, shrink=0.1, cg_iters=100, cg_tol=1e-2,
                square=False):
    """The n×n part of ``solve_newton`` for one matrix: from Gw = WᵀGn and N = G⊥ᵀG⊥ (fp64) to
    (K, R, Λ, D, μ, steps, cost) with the direction A = W K + G⊥ R and D = D(Λ) in fp64.

    ``dual_in``/``mu_in``: the warm start (or None). ``square``: W is square (N = 0), where the
    cold start Y = 0 is already optimal (the closed form A = W·msign(skew(WᵀG))) and a warm
    start would only move Newton away from it.
    """
    n = Gw.shape[-1]
    S, Gs = skew(Gw), sym(Gw)
    warm = not square and dual_in is not None and bool(torch.isfinite(dual_in).all())
    Y = Gs - 2 * sym(dual_in.double()) if warm else torch.zeros_like(S)
    mu = None
    if warm and mu_in is not None and float(mu_in) > 0:
        mu = float(mu_in)
    Y, V, lam, mp, gap, mu, steps, cost = _newton_one(
        S, N, Y, mu, tol, max_iters, mu0, shrink, cg_iters, cg_tol, warm)
    # primal: A = W K + G⊥ R with R = (M + μ_p²)^{-1/2} (pseudo-inverse root for μ_p = 0)
    if mp > 0:
        dp = 1.0 / (lam + mp * mp).sqrt()
    else:
        dp = torch.where(lam > 0, lam.rsqrt(), torch.zeros_like(lam))
    C = S + Y
    R = (V * dp) @ V.mT
    K = skew(C @ R)
    cost += 3 * 2.0 * n**3 * 2
    return K, R, 0.5 * (Gs - Y), float(lam.sqrt().sum()), (mu if mu is not None else 0.0), steps, cost


def solve_newton(W, Gn, *, tol, max_iters, warm_start, g_scale=None, **options):
    """Newton's method on the n×n dual (module docstring). W, Gn tall (…, m, n), WᵀW = I; with
    ``g_scale`` (fp64, (…, 1, 1)) Gn is unnormalised and the normalised gradient is Gn·g_scale.

    Returns the candidate direction A = W K + G⊥ R (tangent by construction), the dual Λ, and
    the fp64 dual value D(Λ) the cheap certificate needs. A gradient of low rank is solved on the
    subspace it spans (``subspace.py``). State: the dual, the subspace size and the smoothing μ.
    """
    square = W.shape[-1] == W.shape[-2]

    def core(Gw, N, dual, tol_, mu=None, dual_value=None):  # D comes from the smoothed eigh: dual_value unused
        K, R, lam, D, mu, steps, c = newton_core(Gw, N, dual, mu, tol=tol_, max_iters=max_iters,
                                                 square=square, **options)
        return K, R, lam, D, {"mu": mu, "iterations": steps}, c

    return solve_tall(W, Gn, core, tol=tol, warm_start=warm_start, g_scale=g_scale, carried=("mu",))


def solve_tall(W, Gn, core, *, tol, warm_start, g_scale=None, carried=()):
    """The loop the n×n dual solvers share, over the matrices of a batch (…, m, n), m ≥ n: the
    frame (Gw, N, Z) of ``tall_frame``, then ``core(Gw, N, Λ_in, tol, dual_value=…, **warm) -> (K, R, Λ, D,
    info, flops)`` (on the subspace of a low-rank gradient, ``subspace.py``), then the direction
    A = W K + G⊥ R by ``assemble``. ``info["iterations"]`` is averaged; the scalar entries named
    in ``carried`` go into the state and come back to ``core`` as keywords on the next call, with
    the dual Λ and the subspace size (the dual alone for a square W). ``msign_equivalents`` counts
    every flop of the step."""
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    Wf, Gf = W.reshape(-1, m, n), Gn.reshape(-1, m, n)
    warm = warm_start or {}
    dual_in = warm["dual"].reshape(-1, n, n) if "dual" in warm else None
    sub_in = warm["subspace"].reshape(-1) if "subspace" in warm else None
    carried_in = {k: warm[k].reshape(-1) for k in carried if k in warm}
    scales = g_scale.reshape(-1) if g_scale is not None else None
    A = torch.empty_like(Wf)
    duals, values, sym_gns, iters, flops = [], [], [], 0, 0.0
    # a square W has no G⊥ (no subspace to find) and its cores ignore a warm start: its state is the
    # dual alone, so momentum and dual stay within API.md's 2·numel(W) (scalars made it 2n² + 2)
    kept = {} if m == n else {k: [] for k in ("subspace",) + tuple(carried)}
    for b in range(Wf.shape[0]):
        sc = 1.0 if scales is None else scales[b]
        Gw, N, Z, L, cost = tall_frame(Wf[b], Gf[b], sc)
        sym_gns.append(sym(Gw))
        prev = {k: float(v[b]) for k, v in carried_in.items()}
        # the certificate's D(Λ) for W as it is (the cores' own D assumes WᵀW = I)
        exact = None if L is None else (lambda lam_, L=L, Z=Z, N=N: frame_dual_value(L, Z, N, lam_))
        K, R, lam, D, info, c = solve_on_subspace(
            lambda *a, **kw: core(*a, **kw, **prev), Gw, N, None if dual_in is None else dual_in[b], tol,
            try_subspace=m != n and (sub_in is None or sub_in[b] < n), dual_value=exact)
        assemble(A[b], Wf[b], Gf[b], Z, K, R, sc)
        if L is None:
            # a rank-deficient W (tall_frame's fallback): the n×n identity behind D assumes
            # WᵀG⊥ = 0 and may under-state D (measured: gap 0 above the optimum); D(Λ) of W as it is
            D = float(dual_value(Wf[b], Gf[b], lam, sc))
            c += 2 * 4.0 * m * n * n + 10.0 * n**3
        duals.append(lam)
        values.append(D)
        for k in kept:
            kept[k].append(info[k])
        iters += info["iterations"]
        flops += cost + c + 2 * 4.0 * m * n * n  # + the assemble's two fp64 tall products
    nb = Wf.shape[0]
    dual = torch.stack(duals).to(W.dtype).reshape(*batch, n, n)
    state = {"dual": dual, **{k: torch.tensor(v, dtype=torch.float64, device=W.device).reshape(batch)
                              for k, v in kept.items()}}
    equivalents = flops / nb / msign_flops(m, n)
    return SolverOutput(direction=A.reshape(*batch, m, n), dual=dual, iterations=math.ceil(iters / nb),
                        msign_calls=math.ceil(equivalents), state=state,
                        dual_value=torch.tensor(values, dtype=torch.float64, device=W.device).reshape(batch),
                        msign_equivalents=equivalents,
                        sym_gn=torch.stack(sym_gns).reshape(*batch, n, n))


def tall_frame(W: torch.Tensor, G: torch.Tensor, g_scale=1.0):
    """(Gw = WᵀGn, N = G⊥ᵀG⊥, Z, L, flops) of one tall matrix for Gn = G·g_scale, in fp64, summed
    over row blocks (no whole-matrix fp64 copies). G⊥ = Gn − W·Z with Z = (WᵀW)⁻¹Gw is orthogonal
    to the W given, not just to an orthonormal W: an fp32 weight is orthonormal only to ~1e-7,
    and the direction's G⊥·R, with R ~ 1/t on nearly null directions, would amplify WᵀG⊥ into
    ‖A‖₂ (measured: 1.29 on a 1024×784 layer, certified gap 0.13)."""
    m, n = W.shape
    Gw = gram64(W, G) * g_scale
    L, info = torch.linalg.cholesky_ex(sym(gram64(W)))
    # a rank-deficient W (a zero or pruned weight, project_on_init=False) has no (WᵀW)⁻¹: take
    # Z = Gw itself and L = None (WᵀW = LLᵀ otherwise; callers test ``L is None``: their n×n
    # identities do not hold then)
    Z = torch.cholesky_solve(Gw, L) if int(info) == 0 else Gw
    N = None
    for sl in row_blocks(m):
        Gp = G[sl].double() * g_scale - W[sl].double() @ Z
        N = add_gram(N, Gp, Gp)
    # four fp64 tall products, a solve
    return Gw, sym(N), Z, (L if int(info) == 0 else None), 4 * 2.0 * m * n * n * 2 + 2.0 * n**3


def frame_dual_value(L: torch.Tensor, Z: torch.Tensor, N: torch.Tensor, lam: torch.Tensor) -> float:
    """D(Λ) = ‖Gn − 2WΛ‖_* for W as it is, from ``tall_frame``'s WᵀW = LLᵀ, Z and N: Gn − 2WΛ =
    W(Z − 2Λ) + G⊥ with WᵀG⊥ = 0, so its Gram is QᵀQ + N with Q = Lᵀ(Z − 2Λ). The n×n identity
    the solvers iterate on, (B − 2Λ)ᵀ(B − 2Λ) + N, assumes WᵀW = I and understated D by
    ≈ 0.5·‖WᵀW − I‖ relative (a robustness probe: gap 2.54e-4 for a sub-optimality of 2.543e-4
    at ‖W − Stiefel‖ ≈ 1e-4). Costs two n×n products and an eigvalsh."""
    Q = L.mT @ (Z - 2 * lam)
    return float(torch.linalg.eigvalsh(sym(Q.mT @ Q + N)).clamp(min=0).sqrt().sum())


def assemble(out: torch.Tensor, W: torch.Tensor, G: torch.Tensor, Z: torch.Tensor, K: torch.Tensor,
             R: torch.Tensor, g_scale=1.0) -> torch.Tensor:
    """out ← A = W K + G⊥ R = W (K − Z R) + Gn R (Gn = G·g_scale, Z from ``tall_frame``), row block
    by row block in fp64 (R has entries up to 1/μ_p on near-null directions of M where G⊥ is tiny:
    an fp32 product would leave errors eps₃₂/μ_p, measured as gaps ~6e-4), rounded once into
    ``out``."""
    return combine_rows(out, W, K - Z @ R, G, R * g_scale)
