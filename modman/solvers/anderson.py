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
(≈ 0.2 msign-equivalents at m = 3n); each recovery one eigvalsh (the dual value), two eigh and about eight
products, tried only once the residual predicts success; setup and the final direction four
tall m×n×n products. The model ``msign_equivalents`` uses the weights of ``newton.py``.

When it converges: fast when M stays well conditioned (full-rank G⊥, m ≥ 2n — the usual case
for a layer's momentum). When N is singular (m < 2n, where rank N ≤ m − n, or a rank-deficient
G) the map has no contraction (measured on 512×392: the residual hovers at 0.5–1 for 40 maps).
m < 2n (square included) therefore goes straight to the closed form (``closed_form.py``, exact in
one eigh); for m ≥ 2n a gradient of low rank is first reduced to the subspace it spans
(``subspace.py``), and if the maps still stall or run out before the tolerance, the closed form
finishes the solve. (Until the closed form was found, a continuation on N + εI, ε = 10⁻²…10⁻¹⁰,
and then ``newton`` did: 27 msign-equivalents (55 in the unit then used, which was half a
default msign) and ~11 s a step on the 1024×784 layer below, against 2.0 and ~0.75 s now.)

Why the plain map stalls (``benchmarks/dual_face.py``: the Jacobian of the map at a dual certified
to ≤ 3e-7, fp64, two seeds per shape). For m < 2n the optimal duals form a face, not a point:
the Jacobian has eigenvalue +1 with multiplicity k(k+1), k = (n − p)/2, p = m − n = rank N (110,
156 and 182 on 40×30, 36×30 and 34×30; 180 on 35×30, where n − p is odd), the directions along
which D stays optimal, and every other mode contracts only by 0.90–0.996 per map (0.46–0.57 on
60×20, m ≥ 2n). In training the warm start did not help much either: on the 1024×784 layer of
the 784→1024→1024→10 MLP (step 10, a probe, no results file) the previous step's dual
certified a gap of 0.18 on the new problem, and the last continuation stage contracted by ~0.93
per map.
"""
from __future__ import annotations

import math

import torch

from .closed_form import closed_form_core, normal_coordinates, solve_closed_form
from .newton import skew, solve_tall
from .result import sym


def _inv_or_zero(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """1/x, with 0 where x is a square root of an eigenvalue that eigh cannot tell from 0:
    eigenvalues carry absolute errors ≈ eps·λ_max, so their roots ≈ √eps·√λ_max (pseudo-inverse);
    and 0 below ``floor``."""
    keep = x > max(float(x.max()) * 10 * torch.finfo(x.dtype).eps ** 0.5, floor)
    return torch.where(keep, 1 / torch.where(keep, x, torch.ones_like(x)), torch.zeros_like(x))


def recover(K: torch.Tensor, N: torch.Tensor, S: torch.Tensor, D: float):
    """(φ(K), K, R): the best direction A = W K + G⊥ R with top block K (module docstring).

    Singular values t of G⊥X^{1/2} below 1e-6·D/n are dropped (they add at most 1e-6·D to φ):
    where G⊥ is only rounding (square W, G normal to the manifold) T⁺ would amplify it, and with
    a singular N the entries of R ~ 1/t would amplify W's own rounding off the manifold into the
    tangent residual (measured on a 256×10 head with rank-9 momentum: gap 4.9e-4 at 1e-7·D/n,
    1.8e-5 at 1e-6·D/n)."""
    n = K.shape[-1]
    # K is skew, so I + K² = I − KᵀK has eigenvalues 1 − σᵢ(K)²: one eigh gives both X and ‖K‖₂;
    # scaling K by 1/s keeps the eigenvectors and maps 1 − σ² to 1 − σ²/s²
    ex, U = torch.linalg.eigh(sym(torch.eye(n, dtype=K.dtype, device=K.device) + K @ K))
    s_max2 = 1.0 - float(ex[0])
    if s_max2 > 1:
        K = K / math.sqrt(s_max2)
        ex = 1.0 - (1.0 - ex) / s_max2
    Xh = (U * ex.clamp(min=0).sqrt()) @ U.mT
    et, Ut = torch.linalg.eigh(sym(Xh @ N @ Xh))
    t = et.clamp(min=0).sqrt()
    # t with t² within ~10⁴ × eigh's rounding of t_max² are not resolved: R ~ 1/t would carry that
    # error into A (R N R's rounding is eps·‖N‖·‖R‖²)
    t_inv = _inv_or_zero(t, max(1e-6 * D / n, 100 * (n * torch.finfo(t.dtype).eps) ** 0.5 * float(t[-1])))
    R = Xh @ ((Ut * t_inv) @ Ut.mT) @ Xh
    # ⟨Gn, A⟩ = ⟨S, K⟩ + tr(N R) (= ⟨S, K⟩ + Σ t in exact arithmetic), and AᵀA = KᵀK + R N R ⪯ I,
    # both only to the accuracy of t: a t whose t² is near eigh's rounding (n·eps·‖X^{1/2}NX^{1/2}‖)
    # makes R ~ 1/t wrong (‖A‖₂ was measured at 1.05 on a 600×300 problem with a 1e-7 spectral
    # tail). φ is the value of this A after the certificate's rescaling.
    phi = float((S * K).sum() + (N * R).sum())
    norm2 = float(torch.linalg.eigvalsh(sym(K.mT @ K + R @ N @ R))[-1])
    if norm2 > 1:
        phi /= math.sqrt(norm2)
    return phi, K, R


def _anderson_one(B, N, S, x, tol, fast_iters, depth, stall, map_dtype):
    """Fixed-point maps from the dual x, in ``map_dtype``; recoveries and dual values in fp64.
    Returns (best primal (φ, K, R, Λ) or None, (min fp64 D at the recoveries, its dual), maps,
    flops, converged, the last dual)."""
    n = B.shape[-1]
    w = 2.0 if map_dtype == torch.float64 else 1.0  # flop weight of the maps' precision
    cost = 0.0
    best, best_D = None, (math.inf, None)
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
            return (0.0, torch.zeros_like(B), torch.zeros_like(B), x.double()), (0.0, x.double()), maps, cost, True, x.double()
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
            if D < best_D[0]:
                best_D = (D, x64)
            phi, K, R = recover((V @ skew(Kp) @ V.mT).double(), N, S, D)
            cost += 10.0 * n**3 + 4.0 * n**3 + 40.0 * n**3 + 10 * 4.0 * n**3 + 10.0 * n**3 + w * 4.0 * n**3
            if best is None or phi > best[0]:
                best = (phi, K, R, x64)
            if best_D[0] - best[0] <= tol * best_D[0]:
                return best, best_D, maps, cost, True, x.double()
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
    return best, best_D, maps, cost, False, x.double()


def anderson_core(Gw, N, dual_in, *, tol, max_iters, depth=4, fast_iters=24, stall=1.5,
                  map_dtype=torch.float32):
    """The n×n part for one matrix: (K, R, Λ, D, info, flops) from Gw = WᵀGn and N (fp64), the
    direction being A = W K + G⊥ R: the plain maps; if they stall or run out before the tolerance
    with iterations left, the closed form (``closed_form.py``, exact in one eigh)."""
    n = Gw.shape[-1]
    S = skew(Gw)
    warm = dual_in is not None and bool(torch.isfinite(dual_in).all())
    x = sym(dual_in.double()) if warm else 0.5 * sym(Gw)
    best, D, maps, ok, cost = None, (math.inf, None), 0, False, 0.0
    if max_iters > 0:
        best, D, maps, cost, ok, x = _anderson_one(Gw, N, S, x, tol, min(fast_iters, max_iters), depth, stall,
                                                   map_dtype)
    if not ok and max_iters > maps:
        # a singular N (rank-deficient gradient) leaves the map without contraction: the exact answer
        P, to_r, c0 = normal_coordinates(Gw, N)
        K, Bb, lam, c = closed_form_core(Gw, P)
        R, c = to_r @ Bb, c + c0
        C = Gw - 2 * lam
        D_cf = float(torch.linalg.eigvalsh(sym(C.mT @ C + N)).clamp(min=0).sqrt().sum())
        return K, R, lam, D_cf, {"iterations": maps}, cost + c + 2 * 4.0 * n**3 + 10.0 * n**3
    if best is None:  # max_iters = 0 or no recovery tried: recover from the last dual
        C = Gw - 2 * x
        lam, V = torch.linalg.eigh(sym(C.mT @ C + N))
        d = lam.clamp(min=0).sqrt()
        D = min(D, (float(d.sum()), x), key=lambda v: v[0])
        phi, K, R = recover(V @ skew((V.mT @ C @ V) * _inv_or_zero(d)) @ V.mT, N, S, D[0])
        best = (phi, K, R, x)
        cost += 78.0 * n**3
    _, K, R, lam_best = best
    # lam_best (the best primal's dual) warm-starts the next step: measured in training, the dual
    # that certified the least D instead costs a second recovery in most steps. D is certified by
    # its own dual, which subspace.py needs to recompute D on the full problem.
    return K, R, lam_best, D[0], {"iterations": maps, "certificate_dual": D[1]}, cost


def solve_anderson(W, Gn, *, tol, max_iters, warm_start, g_scale=None, **options):
    """Anderson-accelerated fixed point with primal recovery (module docstring); W, Gn tall
    (…, m, n), WᵀW = I; ``g_scale`` as in ``solve_newton``. ``max_iters`` caps the maps. A
    gradient of low rank is solved on the subspace it spans (``subspace.py``). m < 2n (square
    included) is the closed form. State: the dual and the subspace size."""
    m, n = W.shape[-2:]
    if m < 2 * n:
        # N = G⊥ᵀG⊥ has rank ≤ m − n < n: the map cannot contract (module docstring), and the
        # closed form is exact (its D(Λ) is computed for W as it is, which matters for a square
        # weight off the manifold: the n×n identity of the maps assumes WᵀW = I)
        return solve_closed_form(W, Gn, tol=tol, max_iters=max_iters, warm_start=None, g_scale=g_scale)

    def core(Gw, N, dual, tol_):
        return anderson_core(Gw, N, dual, tol=tol_, max_iters=max_iters, **options)

    return solve_tall(W, Gn, core, tol=tol, warm_start=warm_start, g_scale=g_scale)
