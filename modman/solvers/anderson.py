"""Su's fixed point on the n×n dual, Anderson-accelerated, with the optimal primal recovery.

The reduction (as in ``newton.py``): tall W with WᵀW = I, Gn = G/‖G‖_F, B = WᵀGn, S = skew(B),
G⊥ = Gn − W·B, N = G⊥ᵀG⊥. For a symmetric dual Λ, C = B − 2Λ and M = CᵀC + N (n×n), the dual
value is D(Λ) = ‖Gn − 2WΛ‖_* = tr(M^{1/2}) and the polar factor of Gn − 2WΛ has top block
WᵀA = C·M^{-1/2}; Λ is optimal iff that block is skew (A tangent).

Fixed point [Su Jianlin, kexue.fm/archives/11221]. With M = V diag(d²) Vᵀ, freeze P = M^{1/2}
and ask for the Λ' whose polar factor would be tangent: the Lyapunov equation P·Λ' + Λ'·P =
½(P·B + Bᵀ·P), solved in V's basis (B' = VᵀBV):

    Λ'_ij = (d_i B'_ij + d_j B'_ji) / (2 (d_i + d_j)),        T(Λ) = V Λ' Vᵀ.

Optimal duals are its fixed points. Plain iteration converges linearly (measured ~3×/step on
full-rank G⊥ with m ≥ 2n); Anderson acceleration (type II, the last ``depth`` differences, a
least-squares fit of the residuals T(Λ) − Λ) keeps that rate or better at no extra eigh.

Primal recovery (what makes few iterations enough). The polar factor of the current iterate is
tangent only to first order, and scaling it into the unit ball costs a first-order gap.
Instead keep its skew top block K and choose the best bottom block for it: with
X = I − KᵀK = I + K² (⪰ 0 once ‖K‖₂ ≤ 1, else K is scaled down first), every feasible A with
WᵀA = K is A = W K + G⊥⊥-part, and the best is

    A = W·K + G⊥·X^{1/2} T⁺ X^{1/2},      T = (X^{1/2} N X^{1/2})^{1/2},
    ⟨Gn, A⟩ = φ(K) = ⟨S, K⟩ + tr T,       AᵀA = KᵀK + X^{1/2} T⁺T²T⁺ X^{1/2} ⪯ I.

φ is the primal with its bottom block maximised out, a concave function of K whose maximum is
the optimum, so OPT − φ(K) and D(Λ) − OPT are both second order in the iteration error: the
gap (D − φ)/D falls like the square of the fixed point's residual (measured on MNIST-style
training: 1.7e-4 after three maps from a cold or warm start, 1.5e-5 after four, where the
scaled polar factor still had 1.5e-2).

Cost (fp64, n×n except where said): per map one eigh of M and about six n×n products
(≈ 0.4 msign-equivalents at m = 3n); each recovery one eigvalsh (the dual value), two eigh and about eight
products, tried only once the residual predicts success; setup and the final direction four
tall m×n×n products. The model ``msign_equivalents`` uses the weights of ``newton.py``.

When it converges: fast when M stays well conditioned (full-rank G⊥, m ≥ 2n — the usual case
for a layer's momentum). When N is singular (rank-deficient G, m < 2n) the map slows down or
stalls near 1e-2; then, after ``fast_iters`` maps or when the residual stops contracting, the
best Λ warm-starts ``newton`` (smoothing continuation handles singular M), so the accuracy
is newton's in every case and the cost is newton's plus the maps already spent.
Square W (N = 0) is the closed form (``closed_form.py``), exact in one msign.
"""
from __future__ import annotations

import math

import torch

from .closed_form import solve_closed_form
from .newton import assemble, msign_flops, newton_core, skew, tall_frame
from .result import sym
from .subspace import solve_on_subspace
from .types import SolverOutput

def _inv_or_zero(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """1/x, with 0 where x is a square root of an eigenvalue that eigh cannot tell from 0:
    eigenvalues carry absolute errors ≈ eps·λ_max, so their roots ≈ √eps·√λ_max (pseudo-inverse);
    and 0 below ``floor``."""
    keep = x > max(float(x.max()) * 10 * torch.finfo(x.dtype).eps ** 0.5, floor)
    return torch.where(keep, 1 / torch.where(keep, x, torch.ones_like(x)), torch.zeros_like(x))


def recover(K: torch.Tensor, N: torch.Tensor, S: torch.Tensor, D: float):
    """(φ(K), K, R): the best direction A = W K + G⊥ R with top block K (module docstring).

    Singular values t of G⊥X^{1/2} below 1e-7·D/n are dropped (they add at most 1e-7·D to φ):
    where G⊥ is only rounding (square W, G normal to the manifold) T⁺ would amplify it."""
    n = K.shape[-1]
    # K is skew, so I + K² = I − KᵀK has eigenvalues 1 − σᵢ(K)²: one eigh gives both X and ‖K‖₂;
    # scaling K by 1/s keeps the eigenvectors and maps 1 − σ² to 1 − σ²/s²
    ex, U = torch.linalg.eigh(sym(torch.eye(n, dtype=K.dtype) + K @ K))
    s_max2 = 1.0 - float(ex[0])
    if s_max2 > 1:
        K = K / math.sqrt(s_max2)
        ex = 1.0 - (1.0 - ex) / s_max2
    Xh = (U * ex.clamp(min=0).sqrt()) @ U.mT
    et, Ut = torch.linalg.eigh(sym(Xh @ N @ Xh))
    t = et.clamp(min=0).sqrt()
    t_inv = _inv_or_zero(t, 1e-7 * D / n)
    R = Xh @ ((Ut * t_inv) @ Ut.mT) @ Xh
    phi = float((S * K).sum() + (t * (t_inv > 0)).sum())
    return phi, K, R


def _anderson_one(B, N, S, x, tol, fast_iters, depth, stall, map_dtype):
    """Fixed-point maps from the dual x, in ``map_dtype``; recoveries and dual values in fp64.
    Returns (best primal (φ, K, R, Λ) or None, min fp64 D at the recoveries, maps, flops,
    converged)."""
    n = B.shape[-1]
    w = 2.0 if map_dtype == torch.float64 else 1.0  # flop weight of the maps' precision
    cost = 0.0
    best, best_D = None, math.inf
    Bm, Nm, x = B.to(map_dtype), N.to(map_dtype), x.to(map_dtype)
    X, F = [], []
    defects = []
    # the recovery's gap ≈ 5e-3·‖sym WᵀA‖_F² (measured at n = 256): try it once that predicts success
    check = math.sqrt(600 * tol)
    maps = 0
    for maps in range(1, fast_iters + 1):
        C = Bm - 2 * x
        lam, V = torch.linalg.eigh(sym(C.mT @ C + Nm))
        d = lam.clamp(min=0).sqrt()
        cost += w * (10.0 + 2.0) * n**3
        if float(d[-1]) == 0.0:  # Gn = 0 up to rounding: A = 0
            return (0.0, torch.zeros_like(B), torch.zeros_like(B), x.double()), 0.0, maps, cost, True
        Cp = V.mT @ C @ V
        Kp = Cp * _inv_or_zero(d)  # WᵀA of the polar factor, in V's basis
        defect = float(torch.linalg.matrix_norm(sym(Kp)))
        defects.append(defect)
        cost += w * 4.0 * n**3
        if defect <= check or maps == fast_iters:
            # the certificate's numbers in fp64: D(Λ) of this iterate and φ of its top block
            x64 = x.double()
            C64 = B - 2 * x64
            D = float(torch.linalg.eigvalsh(sym(C64.mT @ C64 + N)).clamp(min=0).sqrt().sum())
            best_D = min(best_D, D)
            phi, K, R = recover((V @ skew(Kp) @ V.mT).double(), N, S, D)
            cost += 10.0 * n**3 + 4.0 * n**3 + 40.0 * n**3 + 8 * 4.0 * n**3 + w * 4.0 * n**3
            if best is None or phi > best[0]:
                best = (phi, K, R, x64)
            if best_D - best[0] <= tol * best_D:
                return best, best_D, maps, cost, True
            check = defect / 3  # failed: try again once the residual has shrunk 3× more
        # stalled: the residual shrank less than `stall`× over the last two maps
        if len(defects) >= 3 and defects[-3] < stall * defects[-1]:
            break
        Bp = V.mT @ Bm @ V
        num = d[:, None] * Bp
        num = num + num.mT
        den = 2 * (d[:, None] + d[None, :])
        lam_new = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), sym(Bp))
        Tx = sym(V @ lam_new @ V.mT)
        cost += w * 8.0 * n**3
        f = Tx - x
        X.append(x)
        F.append(f)
        if len(X) > depth + 1:
            X.pop(0)
            F.pop(0)
        if len(X) == 1:
            x = Tx
            continue
        dF = torch.stack([(F[i + 1] - F[i]).reshape(-1) for i in range(len(F) - 1)], 1)
        dX = torch.stack([(X[i + 1] - X[i]).reshape(-1) for i in range(len(X) - 1)], 1)
        gamma = torch.linalg.lstsq(dF, f.reshape(-1, 1)).solution
        x = sym(x + f - ((dX + dF) @ gamma).reshape(n, n))
        cost += w * 2.0 * len(X) * n * n
    return best, best_D, maps, cost, False


def anderson_core(Gw, N, dual_in, *, tol, max_iters, depth=4, fast_iters=24, stall=1.5,
                  map_dtype=torch.float32):
    """The n×n part for one matrix: (K, R, Λ, D, info, flops) from Gw = WᵀGn and N (fp64), the
    direction being A = W K + G⊥ R; a stall or the cap hands the best dual to ``newton_core``."""
    n = Gw.shape[-1]
    S = skew(Gw)
    warm = dual_in is not None and bool(torch.isfinite(dual_in).all())
    x = sym(dual_in.double()) if warm else 0.5 * sym(Gw)
    best, D, maps, ok, cost = None, math.inf, 0, False, 0.0
    if max_iters > 0:
        best, D, maps, cost, ok = _anderson_one(Gw, N, S, x, tol, min(fast_iters, max_iters), depth, stall, map_dtype)
    if not ok and max_iters > maps:
        # stalled or capped: newton from the best dual so far (it certifies the same way)
        start = best[3] if best is not None else x
        K, R, lam, D_nw, _, steps, c = newton_core(Gw, N, start, None, tol=tol, max_iters=max_iters - maps)
        return K, R, lam, D_nw, {"iterations": maps + steps}, cost + c
    if best is None:  # max_iters = 0 or no recovery tried: recover from the last dual
        C = Gw - 2 * x
        lam, V = torch.linalg.eigh(sym(C.mT @ C + N))
        d = lam.clamp(min=0).sqrt()
        D = min(D, float(d.sum()))
        phi, K, R = recover(V @ skew((V.mT @ C @ V) * _inv_or_zero(d)) @ V.mT, N, S, D)
        best = (phi, K, R, x)
        cost += 60.0 * n**3
    _, K, R, lam_best = best
    return K, R, lam_best, D, {"iterations": maps}, cost


def solve_anderson(W, Gn, *, tol, max_iters, warm_start, g_scale=None, **options):
    """Anderson-accelerated fixed point with primal recovery (module docstring); W, Gn tall
    (…, m, n), WᵀW = I; ``g_scale`` as in ``solve_newton``. ``max_iters`` caps the maps plus
    newton's steps after a stall. A gradient of low rank is solved on the subspace it spans
    (``subspace.py``)."""
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    if m == n:
        # the closed form is the exact optimum, and without a dual_value the dispatcher certifies
        # it on W as it is: the n×n identity behind this solver's dual value assumes WᵀW = I, and
        # a square weight 3e-5 off the manifold in fp32 training certified gaps up to 5e-4
        return solve_closed_form(W, Gn, tol=tol, max_iters=max_iters, warm_start=None)
    Wf, Gf = W.reshape(-1, m, n), Gn.reshape(-1, m, n)
    warm_start = warm_start or {}
    dual_in = warm_start["dual"].reshape(-1, n, n) if "dual" in warm_start else None
    sub_in = warm_start["subspace"].reshape(-1) if "subspace" in warm_start else None
    dual_out, values, subspaces, iters, flops = [], [], [], 0, 0.0

    def core(Gw, N, dual, tol_):
        return anderson_core(Gw, N, dual, tol=tol_, max_iters=max_iters, **options)

    scales = g_scale.reshape(-1) if g_scale is not None else None
    A = torch.empty_like(Wf)
    for b in range(Wf.shape[0]):
        sc = 1.0 if scales is None else scales[b]
        Gw, N, cost = tall_frame(Wf[b], Gf[b], sc)
        K, R, lam, D, info, c = solve_on_subspace(core, Gw, N, None if dual_in is None else dual_in[b], tol,
                                                  try_subspace=sub_in is None or sub_in[b] < n)
        assemble(A[b], Wf[b], Gf[b], Gw, K, R, sc)
        dual_out.append(lam)
        values.append(D)
        subspaces.append(info["subspace"])
        iters += info["iterations"]
        flops += cost + c + 2 * 4.0 * m * n * n
    nb = Wf.shape[0]
    A = A.reshape(*batch, m, n)
    dual = torch.stack(dual_out).to(W.dtype).reshape(*batch, n, n)
    equivalents = flops / nb / msign_flops(m, n)
    state = {"dual": dual, "subspace": torch.tensor(subspaces, dtype=torch.float64).reshape(batch)}
    return SolverOutput(direction=A, dual=dual, iterations=math.ceil(iters / nb), msign_calls=math.ceil(equivalents),
                        state=state, dual_value=torch.tensor(values, dtype=torch.float64).reshape(batch),
                        msign_equivalents=equivalents)
