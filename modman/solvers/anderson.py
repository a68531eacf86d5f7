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
for a layer's momentum). When N is singular (m < 2n, where rank N ≤ m − n, or a rank-deficient
G) the map has no contraction (measured on 512×392: the residual hovers at 0.5–1 for 40 maps).
Then the same maps run on N + εI, ε = 10⁻²…10⁻¹⁰ of ‖BᵀB + N‖_F, each stage warm-starting the
next (``_continuation``): a 1024×784 layer, cold, full-rank G, reaches a certified gap of 1e-5
in ~70 maps, 13–18 s on one core, where newton took 130–180 s and stopped at 1.6e-4. A warm
start resumes at the ε the previous solve ended with (state["shift"]). Only if that too falls
short does ``newton`` take over from the best dual. A gradient of low rank is first reduced to
the subspace it spans (``subspace.py``). Square W (N = 0) is the closed form (``closed_form.py``),
exact in one msign.

Why the plain map stalls (``benchmarks/dual_face.py``: the Jacobian of the map at a dual certified
to ≤ 3e-7, fp64, two seeds per shape). For m < 2n the optimal duals form a face, not a point:
the Jacobian has eigenvalue +1 with multiplicity k(k+1), k = (n − p)/2, p = m − n = rank N (110,
156 and 182 on 40×30, 36×30 and 34×30; 180 on 35×30, where n − p is odd), the directions along
which D stays optimal, and every other mode contracts only by 0.90–0.996 per map (0.46–0.57 on
60×20, m ≥ 2n). In training the warm start does not help much either: on the 1024×784 layer of
the 784→1024→1024→10 MLP (step 10, a probe, no results file) the previous step's dual
certified a gap of 0.18 on the new problem, and the final continuation stage contracted by ~0.93
per map: 30 fp64 maps and 5 recoveries, 55 msign-equivalents.
"""
from __future__ import annotations

import math

import torch

from .closed_form import solve_closed_form
from .newton import newton_core, skew, solve_tall
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


def _anderson_one(B, N, S, x, tol, fast_iters, depth, stall, map_dtype, shift=0.0, recover_primal=True,
                  recover_first=False):
    """Fixed-point maps from the dual x, in ``map_dtype``; recoveries and dual values in fp64.
    ``shift``: the maps use N + shift·I (the continuation below); recoveries always the true N.
    ``recover_primal=False``: no recoveries, stop on a stall or after ``fast_iters`` maps;
    ``recover_first``: recover at the first map whatever its residual (a warm start may already
    be optimal while the map's residual, large where N is singular, does not say so).
    Returns (best primal (φ, K, R, Λ) or None, (min fp64 D at the recoveries, its dual), maps,
    flops, converged, the last dual)."""
    n = B.shape[-1]
    w = 2.0 if map_dtype == torch.float64 else 1.0  # flop weight of the maps' precision
    cost = 0.0
    best, best_D = None, (math.inf, None)
    Bm, Nm, x = B.to(map_dtype), N.to(map_dtype), x.to(map_dtype)
    if shift:
        Nm = Nm + shift * torch.eye(n, dtype=map_dtype, device=Nm.device)
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
        if recover_primal and (defect <= check or maps == fast_iters or (recover_first and maps == 1)):
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


def _continuation(B, N, S, x, tol, max_maps, depth, start=1e-2):
    """The fixed point on the regularised problems N + εI, ε = 10⁻²…10⁻¹⁰ × ‖BᵀB + N‖_F, each stage
    warm-starting the next. A singular N (m < 2n, or a rank-deficient gradient) leaves the plain
    map without contraction (measured on 512×392: the residual hovers at 0.5–1 for 40 maps); with
    N + εI it contracts again. N + εI is the dual of the problem with √ε·I appended to G⊥ in
    fresh rows, whose optimum approaches the true one as ε → 0 (the smoothing of ``newton.py``,
    f_μ with μ² = ε). Stages with ε ≥ 3·10⁻⁵ run in fp32 without recoveries; from ε ≤ 10⁻⁵ the
    maps run in fp64 (M's condition number passes 10⁵) and recover the true problem's primal,
    stopping at the tolerance. Measured cold, full-rank G: 1024×784 reaches gap 1e-5 in 71 maps
    (13 s on one core, where newton took 179 s); 512×392 in 60 maps (2.2 s, newton 6.8–17 s).
    A warm start (a dual from the previous step) begins at ``start`` < 10⁻²: the coarse stages
    would only pull it away from the optimum (``anderson_core`` picks it from the ε the previous
    solve ended with: measured on the third step of a 1024×784 layer, from that ε = 10⁻¹⁰ the
    stages fell short and newton took 144 s, from 10⁻⁸ 75 maps, 18 s, from 10⁻⁵ 164 maps, 39 s;
    on the second step the previous ε itself was enough). Returns what ``_anderson_one`` returns,
    over all stages, and the last ε (relative)."""
    scale2 = float(torch.linalg.matrix_norm(sym(B.mT @ B + N)))  # ≥ λ_max of the cold M
    eps = start * scale2
    best, best_D, total, cost = None, (math.inf, None), 0, 0.0
    while total < max_maps and eps >= 1e-10 * scale2:
        final = eps <= 1e-5 * scale2
        b, D, maps, c, ok, x = _anderson_one(B, N, S, x, tol, min(30, max_maps - total), depth,
                                             0.0 if final else 1.5, torch.float64 if eps < 3e-5 * scale2 else torch.float32,
                                             shift=eps, recover_primal=final, recover_first=final and total == 0)
        total += maps
        cost += c
        best_D = min(best_D, D, key=lambda v: v[0])
        if b is not None and (best is None or b[0] > best[0]):
            best = b
        if ok:
            return best, best_D, total, cost, True, x, eps / scale2
        eps *= 0.1
    return best, best_D, total, cost, False, x, eps / scale2


def anderson_core(Gw, N, dual_in, *, tol, max_iters, depth=4, fast_iters=24, stall=1.5,
                  map_dtype=torch.float32, shift_in=0.0):
    """The n×n part for one matrix: (K, R, Λ, D, info, flops) from Gw = WᵀGn and N (fp64), the
    direction being A = W K + G⊥ R: the plain maps; after a stall the continuation on N + εI
    (starting at ``shift_in``, the previous solve's last ε, when warm); if that falls short too,
    ``newton_core`` from the best dual."""
    n = Gw.shape[-1]
    S = skew(Gw)
    warm = dual_in is not None and bool(torch.isfinite(dual_in).all())
    x = sym(dual_in.double()) if warm else 0.5 * sym(Gw)
    best, D, maps, ok, cost, shift = None, (math.inf, None), 0, False, 0.0, 0.0
    if max_iters > 0:
        best, D, maps, cost, ok, last = _anderson_one(Gw, N, S, x, tol, min(fast_iters, max_iters), depth, stall,
                                                      map_dtype)
    plain = maps
    # stalled (singular N): the same maps on N + εI, ε decreasing. Warm: first a try (60 maps) at the ε
    # the previous solve ended with (often enough when the momentum moved little), then from 100×
    # that ε (at most 1e-5); cold: from 1e-2.
    attempts = [(shift_in, 60), (min(1e-5, 100 * shift_in), 4 * max_iters)] if warm and shift_in > 0 else \
        [(1e-5 if warm else 1e-2, 4 * max_iters)]
    for start, budget in attempts:
        if ok or max_iters <= plain:
            break
        b2, D2, maps2, c2, ok, last, shift = _continuation(Gw, N, S, x, tol, budget, depth, start=start)
        cost += c2
        maps += maps2
        D = min(D, D2, key=lambda v: v[0])
        if b2 is not None and (best is None or b2[0] > best[0]):
            best = b2
        x = best[3] if best is not None else x
    if not ok and max_iters > plain:
        # still short of the tolerance: newton from the best dual so far (it certifies the same way)
        start = best[3] if best is not None else x
        K, R, lam, D_nw, _, steps, c = newton_core(Gw, N, start, None, tol=tol, max_iters=max_iters - plain)
        return K, R, lam, D_nw, {"iterations": maps + steps, "shift": shift}, cost + c
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
    return K, R, lam_best, D[0], {"iterations": maps, "shift": shift, "certificate_dual": D[1]}, cost


def solve_anderson(W, Gn, *, tol, max_iters, warm_start, g_scale=None, **options):
    """Anderson-accelerated fixed point with primal recovery (module docstring); W, Gn tall
    (…, m, n), WᵀW = I; ``g_scale`` as in ``solve_newton``. ``max_iters`` caps the maps plus
    newton's steps after a stall. A gradient of low rank is solved on the subspace it spans
    (``subspace.py``). State: the dual, the subspace size and the continuation's last shift."""
    if W.shape[-1] == W.shape[-2]:
        # the closed form is the exact optimum, and without a dual_value the dispatcher certifies
        # it on W as it is: the n×n identity behind this solver's dual value assumes WᵀW = I, and
        # a square weight 3e-5 off the manifold in fp32 training certified gaps up to 5e-4
        return solve_closed_form(W, Gn, tol=tol, max_iters=max_iters, warm_start=None)

    def core(Gw, N, dual, tol_, shift=0.0):
        return anderson_core(Gw, N, dual, tol=tol_, max_iters=max_iters, shift_in=shift, **options)

    return solve_tall(W, Gn, core, tol=tol, warm_start=warm_start, g_scale=g_scale, carried=("shift",))
