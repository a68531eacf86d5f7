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
(≈ 0.2 msign-equivalents at m = 3n; the maps run in fp32); each recovery the dual value D(Λ) for
W as it is (``newton.frame_dual_value``: two products and an eigvalsh; it is also the value the
certificate reports, not recomputed), a Cholesky of I − KᵀK, one eigh, seven products and a
Cholesky that shows ‖A‖₂ ≤ 1 (eigh/eigvalsh only where those fail), tried only once the
residual predicts success; setup and the final direction four tall m×n×n products. The model
``msign_equivalents`` uses the weights of ``newton.py``.

When it converges: fast when M stays well conditioned (full-rank G⊥, m ≥ 2n — the usual case
for a layer's momentum). When N is singular (m < 2n, where rank N ≤ m − n, or a rank-deficient
G) the map has no contraction (measured on 512×392: the residual hovers at 0.5–1 for 40 maps).
m < 2.2n (square included; just above 2n N is barely full rank and the maps crawl: see
CLOSED_FORM_BELOW) therefore goes straight to the closed form (``closed_form.py``, exact in
one eigh); for m ≥ 2.2n a gradient of low rank is first reduced to the subspace it spans
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
from fractions import Fraction

import torch

from .closed_form import closed_form_core, normal_coordinates, solve_closed_form
from .newton import skew, solve_tall
from .result import lambda_max_at_most, sym


# Below m = 2.2n the closed form beats the maps. Under 2n they cannot contract (module docstring);
# just above, N = G⊥ᵀG⊥ is barely full rank (a nearly square G⊥) and they crawl: with warm starts
# on a momentum sequence (steps 5–12, fp32, one thread), msign-equivalents and ms per solve,
# maps against closed form — 128×64: 6.2 vs 3.7 (27 vs 9 ms); 136×64: 3.9 vs 3.6 (12 vs 6);
# 512×256: 5.3 vs 3.7 (234 vs 127); 544×256: 3.7 vs 3.6 (159 vs 121); from 2.25n the maps take
# fewer equivalents (576×256: 2.9 vs 3.5), from 2.5n less time too at n = 256 (640×256: 150 vs
# 174 ms). A transformer's m = 2n weights (an MLP of twice the width, 2:1 grouped-query heads)
# took ~12 maps a step in a user's Llama.
CLOSED_FORM_BELOW = Fraction(11, 5)  # 2.2, exactly: m < 2.2n compares integers (m = 11, n = 5 is not below)


def _inv_or_zero(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """1/x, with 0 where x is a square root of an eigenvalue that eigh cannot tell from 0:
    eigenvalues carry absolute errors ≈ eps·λ_max, so their roots ≈ √eps·√λ_max (pseudo-inverse);
    and 0 below ``floor``."""
    keep = x > max(float(x.max()) * 10 * torch.finfo(x.dtype).eps ** 0.5, floor)
    return torch.where(keep, 1 / torch.where(keep, x, torch.ones_like(x)), torch.zeros_like(x))


def recover(K: torch.Tensor, N: torch.Tensor, S: torch.Tensor, D: float):
    """(φ(K), K, R, flops): the best direction A = W K + G⊥ R with top block K (module docstring).

    Singular values t of G⊥X^{1/2} below 1e-6·D/n are dropped (they add at most 1e-6·D to φ):
    where G⊥ is only rounding (square W, G normal to the manifold) T⁺ would amplify it, and with
    a singular N the entries of R ~ 1/t would amplify W's own rounding off the manifold into the
    tangent residual (measured on a 256×10 head with rank-9 momentum: gap 4.9e-4 at 1e-7·D/n,
    1.8e-5 at 1e-6·D/n).

    Any factor X = F₀F₀ᵀ serves for X^{1/2}: F₀ = X^{1/2}Q with Q orthogonal, so F₀ᵀNF₀ =
    Qᵀ(X^{1/2}NX^{1/2})Q has the same t, and F₀(F₀ᵀNF₀)^{+1/2}F₀ᵀ = X^{1/2}T⁺X^{1/2} = R. F₀ is the
    Cholesky factor of X where that succeeds (then ‖K‖₂ < 1: the usual case, full-rank G⊥ makes
    every column of the polar factor leave W's span), else U·diag(√λ) from the eigh of X, which
    also gives ‖K‖₂ to scale K into the ball. Cost (fp64, newton.py's weights): a Cholesky, one
    eigh, seven n×n products (fewer where t is dropped) and a Cholesky showing ‖A‖₂ ≤ 1; an eigh
    of X (no Cholesky) or an eigvalsh of AᵀA only where those fail."""
    n = K.shape[-1]
    KK = K @ K
    X = sym(torch.eye(n, dtype=K.dtype, device=K.device) + KK)  # I + K² = I − KᵀK for skew K
    F0, info = torch.linalg.cholesky_ex(X)
    flops = 2 * n**3 / 3
    if int(info) != 0:
        # I − KᵀK not positive definite: ‖K‖₂ ≥ 1 (to rounding). Its eigh has eigenvalues
        # 1 − σᵢ(K)²; scaling K by 1/s keeps the eigenvectors and maps 1 − σ² to 1 − σ²/s²
        ex, U = torch.linalg.eigh(X)
        flops += 20.0 * n**3
        s_max2 = 1.0 - float(ex[0])
        if s_max2 > 1:
            K, KK = K / math.sqrt(s_max2), KK / s_max2
            ex = 1.0 - (1.0 - ex) / s_max2
        F0 = U * ex.clamp(min=0).sqrt()
    del X
    et, Ut = torch.linalg.eigh(sym(F0.mT @ N @ F0))
    t = et.clamp(min=0).sqrt()
    # t with t² within ~10⁴ × eigh's rounding of t_max² are not resolved: R ~ 1/t would carry that
    # error into A (R N R's rounding is eps·‖N‖·‖R‖²)
    t_inv = _inv_or_zero(t, max(1e-6 * D / n, 100 * (n * torch.finfo(t.dtype).eps) ** 0.5 * float(t[-1])))
    # R = F diag(1/t) Fᵀ with F = F₀Uₜ, on the kept t only
    keep = t_inv > 0
    F = F0 @ Ut[:, keep]
    R = (F * t_inv[keep]) @ F.mT
    k = int(keep.sum())
    # ⟨Gn, A⟩ = ⟨S, K⟩ + tr(N R) (= ⟨S, K⟩ + Σ t in exact arithmetic), and AᵀA = KᵀK + R N R ⪯ I,
    # both only to the accuracy of t: a t whose t² is near eigh's rounding (n·eps·‖X^{1/2}NX^{1/2}‖)
    # makes R ~ 1/t wrong (‖A‖₂ was measured at 1.05 on a 600×300 problem with a 1e-7 spectral
    # tail). φ is the value of this A after the certificate's rescaling: ‖A‖₂² is shown ≤ 1 + 1e-10 + e
    # by a Cholesky (the usual case: A is built on the unit sphere), else measured by an eigvalsh.
    phi = float((S * K).sum() + (N * R).sum())
    AtA = sym(R @ N @ R - KK)  # KᵀK = −K² for skew K
    flops += 20.0 * n**3 + 4.0 * (5 * n**3 + 2 * n * n * k) + 2 * n**3 / 3
    # τ = 1 + 1e-10, not 1: with T of full rank AᵀA = I exactly, so I − AᵀA is singular to rounding
    # and its Cholesky failed every time (a review: 0 of 13 recoveries); φ loses ≤ 1e-9 relative
    norm2 = lambda_max_at_most(AtA, 1.0 + 1e-10)
    if norm2 is None:
        norm2 = float(torch.linalg.eigvalsh(AtA)[-1])
        flops += 10.0 * n**3
    if norm2 > 1:
        phi /= math.sqrt(norm2)
    return phi, K, R, flops


def _identity_value(B: torch.Tensor, N: torch.Tensor):
    """Λ ↦ D(Λ) = tr(((B − 2Λ)ᵀ(B − 2Λ) + N)^{1/2}) by the n×n identity (assumes WᵀW = I), and its
    flops (an fp64 product and an eigvalsh)."""
    def value(lam: torch.Tensor) -> float:
        C = B - 2 * lam
        return float(torch.linalg.eigvalsh(sym(C.mT @ C + N)).clamp(min=0).sqrt().sum())
    return value, 14.0 * B.shape[-1] ** 3


def _anderson_one(B, N, S, x, tol, fast_iters, depth, stall, map_dtype, value, value_flops):
    """Fixed-point maps from the dual x, in ``map_dtype``; recoveries and dual values (``value``,
    Λ ↦ D(Λ) in fp64) in fp64. Returns (best primal (φ, K, R, Λ) or None, (min D at the
    recoveries, its dual), maps, flops, converged, the last dual)."""
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
            x64 = x.double()
            return (0.0, torch.zeros_like(B), torch.zeros_like(B), x64), (value(x64), x64), maps, cost + value_flops, True, x64
        Cp = V.mT @ C @ V
        Kp = Cp * _inv_or_zero(d)  # WᵀA of the polar factor, in V's basis
        defect = float(torch.linalg.matrix_norm(sym(Kp)))
        defects.append(defect)
        cost += w * 4.0 * n**3
        if defect <= check or maps == fast_iters:
            # the certificate's numbers in fp64: D(Λ) of this iterate and φ of its top block
            x64 = x.double()
            D = value(x64)
            if D < best_D[0]:
                best_D = (D, x64)
            phi, K, R, c = recover((V @ skew(Kp) @ V.mT).double(), N, S, D)
            cost += value_flops + c + w * 4.0 * n**3
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
        # gelsd (SVD) on CPU: the default gelsy returned different bits for identical inputs (72 of
        # 300 calls), which made two identical runs, or a resumed one, differ by ~1e-7 per step
        gamma = torch.linalg.lstsq(dF, f.reshape(-1, 1), driver="gelsd" if dF.is_cpu else None).solution
        x = sym(x + f - ((dX + dF) @ gamma).reshape(n, n))
        cost += w * 2.0 * len(X) * n * n
    return best, best_D, maps, cost, False, x.double()


def anderson_core(Gw, N, dual_in, dual_value=None, *, tol, max_iters, depth=4, fast_iters=24, stall=1.5,
                  map_dtype=torch.float32):
    """The n×n part for one matrix: (K, R, Λ, D, info, flops) from Gw = WᵀGn and N (fp64), the
    direction being A = W K + G⊥ R: the plain maps; if they stall or run out before the tolerance
    with iterations left, the closed form (``closed_form.py``, exact in one eigh).

    ``dual_value`` (Λ ↦ D(Λ) for W as it is, ``newton.frame_dual_value``; two n×n products and
    an eigvalsh): when given, every D — the early exit's and the returned one — is that, and
    ``info["certificate_value"]`` says so (the caller need not recompute it); else the n×n
    identity, which assumes WᵀW = I."""
    n = Gw.shape[-1]
    S = skew(Gw)
    warm = dual_in is not None and bool(torch.isfinite(dual_in).all())
    x = sym(dual_in.double()) if warm else 0.5 * sym(Gw)
    value, value_flops = (dual_value, 18.0 * n**3) if dual_value is not None else _identity_value(Gw, N)
    certified = (lambda D_: {"certificate_value": D_}) if dual_value is not None else (lambda D_: {})
    best, D, maps, ok, cost = None, (math.inf, None), 0, False, 0.0
    if max_iters > 0:
        best, D, maps, cost, ok, x = _anderson_one(Gw, N, S, x, tol, min(fast_iters, max_iters), depth, stall,
                                                   map_dtype, value, value_flops)
    if not ok and max_iters > maps:
        # a singular N (rank-deficient gradient) leaves the map without contraction: the exact answer
        P, to_r, c0 = normal_coordinates(Gw, N)
        K, Bb, lam, c = closed_form_core(Gw, P)
        R, c = to_r @ Bb, c + c0
        D_cf = value(lam)
        info = {"iterations": maps, **certified(D_cf)}
        return K, R, lam, D_cf, info, cost + c + value_flops
    if best is None:  # max_iters = 0 or no recovery tried: recover from the last dual
        C = Gw - 2 * x
        lam, V = torch.linalg.eigh(sym(C.mT @ C + N))
        d = lam.clamp(min=0).sqrt()
        D = min(D, (value(x), x), key=lambda v: v[0])
        phi, K, R, c = recover(V @ skew((V.mT @ C @ V) * _inv_or_zero(d)) @ V.mT, N, S, D[0])
        best = (phi, K, R, x)
        cost += 20.0 * n**3 + 5 * 4.0 * n**3 + value_flops + c
    _, K, R, lam_best = best
    # lam_best (the best primal's dual) warm-starts the next step: measured in training, the dual
    # that certified the least D instead costs a second recovery in most steps. D is certified by
    # its own dual, which subspace.py needs to recompute D on the full problem.
    info = {"iterations": maps, "certificate_dual": D[1], **certified(D[0])}
    return K, R, lam_best, D[0], info, cost


def solve_anderson(W, Gn, *, tol, max_iters, warm_start, g_scale=None, **options):
    """Anderson-accelerated fixed point with primal recovery (module docstring); W, Gn tall
    (…, m, n), WᵀW = I; ``g_scale`` as in ``solve_newton``. ``max_iters`` caps the maps. A
    gradient of low rank is solved on the subspace it spans (``subspace.py``). m < 2.2n (square
    included) is the closed form. State: the dual and the subspace size."""
    m, n = W.shape[-2:]
    if m < CLOSED_FORM_BELOW * n:
        # N = G⊥ᵀG⊥ has rank ≤ m − n < n (m < 2n: the map cannot contract) or is barely full rank
        # (2n ≤ m < 2.2n: it crawls; module docstring), and the closed form is exact (its D(Λ) is
        # computed for W as it is, which matters for a square weight off the manifold: the n×n
        # identity of the maps assumes WᵀW = I)
        return solve_closed_form(W, Gn, tol=tol, max_iters=max_iters, warm_start=None, g_scale=g_scale)

    def core(Gw, N, dual, tol_, dual_value=None):
        return anderson_core(Gw, N, dual, dual_value, tol=tol_, max_iters=max_iters, **options)

    return solve_tall(W, Gn, core, tol=tol, warm_start=warm_start, g_scale=g_scale)
