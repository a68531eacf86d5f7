"""The subproblem in closed form, for every shape: A = msign(skew(G Wᵀ))·W.

Every tangent direction at W (tall, WᵀW = I) is A = Ω W for a skew m×m Ω: in the basis [W, W⊥],
A = W K + W⊥ B (K skew) and Ω = [[K, −Bᵀ], [B, E]] with any skew E. ⟨G, ΩW⟩ = ⟨skew(G Wᵀ), Ω⟩.
The spectral ball is where the two problems meet: by Parrott's theorem the completion
[[K, −Bᵀ], [B, E]] has min over E of its norm = max(‖[K; B]‖₂, ‖[K, −Bᵀ]‖₂) = ‖[K; B]‖₂ (K skew, so
the row is minus the column's transpose), and averaging an optimal completion with −(it)ᵀ (also
one) gives a skew one of the same norm. So {tangent A, ‖A‖₂ ≤ 1} = {ΩW : Ω skew, ‖Ω‖₂ ≤ 1} and

    max ⟨G, A⟩ = max over skew Ω, ‖Ω‖₂ ≤ 1, of ⟨skew(G Wᵀ), Ω⟩ = ‖skew(G Wᵀ)‖_*,
    attained by Ω = msign(skew(G Wᵀ)) (the polar factor of a skew matrix is skew): A = Ω W.

No iteration and no warm start. Checked against the certified fixed point on 40×30, 60×20,
50×50, 35×30, 100×10, 64×63 (objectives equal to within the iterative solver's gap, 1e-7–1e-9).
Square W (m = n) is the special case A = W msign(skew(WᵀG)) (k = 0 below).

Small form. skew(G Wᵀ) has rank ≤ 2n: with Gn = W B + G⊥ and U (m×k) an orthonormal basis of
G⊥'s span, U ⟂ W (k ≤ min(n, m − n)), in the basis [W, U] it is the (n+k)×(n+k) skew matrix

    M = [[S, −Pᵀ/2], [P/2, 0]],   S = skew(B),  P = UᵀGn,

and A = W K + U Bb with [K; Bb] the first n columns of msign(M). The basis:
- m < 2n (``complement_coordinates``): the last m − n columns of the Householder QR of W,
  exactly ⟂ W, rotated by the eigh of the small (m−n)² Gram of P; A = W K + U Bb directly. A
  square W has no complement: k = 0, M = S.
- m ≥ 2n (``normal_coordinates``): U_k = G⊥ V_k diag(1/t) from the eigh of N = G⊥ᵀG⊥, so
  P = diag(t) V_kᵀ and A = W K + G⊥ R with R = V_k diag(1/t) Bb (``assemble`` in newton.py; U is
  never formed).
The polar factor comes from one fp64 eigh of MᵀM (on one CPU core faster than Newton–Schulz at
this size; an fp32 eigh of the squared matrix loses the small singular values: measured gaps up
to 1). Directions of G⊥ with t below 1e-5·t_max and of M with σ below 1e-5·σ_max are dropped
(each would add at most t or σ to the value; below that an eigh of a Gram cannot place them, and
R ~ 1/t would amplify rounding): "exact" therefore means to 1e-5–3e-5 of the value on a gradient
with a long spectral tail (tests/solvers/test_closed_form.py; 3.3e-5 measured by a claims audit),
at rounding otherwise.

Certificate. The optimal symmetric dual of the Λ-form (MATH.md §3) follows from the same eigh:
with Y = |M| = (MᵀM)^{1/2} in blocks (n, k), H = 2(Y₁₁ − Y₁₂Y₂₂⁺Y₂₁) (twice a Schur complement)
and Λ = ½(sym B − sym(K H)); checked: D(Λ) = ‖Gn − 2WΛ‖_* equals ‖M‖_* to rounding on all the
shapes above, m < 2n included. D(Λ) is computed for W as it is (``result.dual_value``: the Gram
of Gn − 2WΛ over fp64 row blocks), neither assumed orthonormal nor of full rank, so weak duality
makes it an upper bound for any W (a rank-deficient W once certified gap 0 for a direction above
the optimum when D came from the n×n identity of the frame, which assumes WᵀG⊥ = 0).

Cost (fp64; d = n + k ≤ min(m, 2n)): the basis (m < 2n: one tall product for B, the QR of W and
two thin products; m ≥ 2n: the frame's four tall products and the eigh of N), MᵀM from the
blocks of M and its eigh, about two d²n products (``closed_form_core``), D(Λ) (two tall products
and an n×n eigvalsh) and the assembly (two tall products; one for a square W). Memory: the d×d
fp64 MᵀM and its eigenvectors during the eigh, then the eigenvectors alone (scaled in place for
|M|), next to a few n×n fp64 matrices. Measured in training
(benchmarks/results/solvers*.json): 2.0 msign-equivalents on 1024×784, 1.3 on 1024², 3.0 on
784×256 (where n + k = 2n and ``anderson``'s n×n fixed point is cheaper).
"""
from __future__ import annotations

import math

import torch

from ..linalg.blocked import combine_rows, gram64, row_blocks
from .newton import assemble, msign_flops, skew, tall_frame
from .result import dual_value, sym
from .types import SolverOutput


def _resolved(t2: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Which directions of G⊥ to keep, from the eigenvalues t² of its Gram (in any basis). The
    value ‖M‖_* ≥ ‖[S; P/2]‖_F sets the scale of what may be dropped (each direction adds at
    most t to the value); t from the eigh of a Gram is accurate to eps·t_max²/t, and R ~ 1/t: as
    for σ in ``closed_form_core``, directions under 1e-5·t_max go."""
    n = B.shape[-1]
    t = t2.clamp(min=0).sqrt()
    scale = float(torch.sqrt((skew(B) ** 2).sum() + 0.25 * t2.clamp(min=0).sum()))
    return t > max(1e-6 * scale / n, 1e-5 * float(t.max())) if t.numel() else t > 0


def normal_coordinates(B: torch.Tensor, N: torch.Tensor):
    """(P, V_k·diag(1/t_k), flops): coordinates P = diag(t_k) V_kᵀ (k×n) of G⊥ in the basis
    U_k = G⊥ V_k diag(1/t_k) from the eigh of N = G⊥ᵀG⊥ (fp64), and the map from U_k-coordinates
    back to R in A = W K + G⊥ R."""
    t2, V = torch.linalg.eigh(sym(N))
    keep = _resolved(t2, B)
    t = t2[keep].sqrt()
    return t[:, None] * V[:, keep].mT, V[:, keep] / t, 2 * 10.0 * B.shape[-1] ** 3


def complement_coordinates(W: torch.Tensor, G: torch.Tensor, B: torch.Tensor, g_scale=1.0):
    """(U, P, flops) for m < 2n: U (m×k, fp64) an orthonormal basis of the part of W's complement
    that G⊥ resolvably spans and P = UᵀGn (k×n), from the Householder QR of W (exactly ⟂ W, W
    orthonormal or not) and the eigh of the small (m−n)² Gram of W⊥ᵀGn — no n×n eigh of N and no
    division by t when lifting back."""
    m, n = W.shape
    if m == n:  # no complement (a singular square W's own null space is left out: the certificate shows it)
        return W.new_zeros(m, 0, dtype=torch.float64), B.new_zeros(0, n), 0.0
    a, tau = torch.geqrf(W.double())
    E = torch.zeros(m, m - n, dtype=torch.float64, device=W.device)
    E[n:] = torch.eye(m - n, dtype=torch.float64, device=W.device)
    Wp = torch.ormqr(a, tau, E)  # the last m − n columns of Q
    del a, E
    P = gram64(Wp, G) * g_scale
    t2, V = torch.linalg.eigh(P @ P.mT)
    V = V[:, _resolved(t2, B)]
    k, p = V.shape[-1], m - n
    flops = 2 * (2.0 * m * n * n + 4.0 * m * n * p + 2.0 * m * n * p + 2.0 * p * p * n + 10.0 * p**3
                 + 2.0 * m * p * k + 2.0 * p * k * n)
    return Wp @ V, V.mT @ P, flops


def closed_form_core(B: torch.Tensor, P: torch.Tensor):
    """(K, Bb, Λ, flops) for one tall problem from B = WᵀGn (fp64 n×n) and the coordinates P
    (k×n, fp64; k = 0 for a square W) of G⊥ in an orthonormal basis U of its span, U ⟂ W: the
    direction is A = W K + U Bb and Λ the optimal dual (module docstring).

    M = [[S, −Pᵀ/2], [P/2, 0]] is never formed: MᵀM = [[−S² + PᵀP/4, ·], [−PS/2, PPᵀ/4]] (the
    zero block saves 2n²k + 4nk² + 2k³ flops over a d×d product), and the first n columns of
    msign(M) = M·R with R = (MᵀM)^{−1/2}[:, :n] = U diag(1/σ) U₁ᵀ (d×n) are [S R₁ − PᵀR₂/2; P R₁/2].
    Memory (the step's peak where d ≈ m): the eigh holds MᵀM, U and LAPACK's 2d² workspace next to
    B, without S (released before it: S R₁ is computed a block of rows of S at a time); then
    U, B, R and K."""
    n, k = B.shape[-1], P.shape[-2]
    d = n + k
    S = skew(B)
    # eigh reads the lower triangle (UPLO="L"): the (1,2) block is left at zero, never read
    # (in-place addmm_ into views, not mm(out=…): out= refuses inputs that require grad)
    MtM = B.new_zeros(d, d)
    MtM[:n, :n].addmm_(S, S, alpha=-1.0)  # SᵀS = −S²
    if k:
        MtM[:n, :n].addmm_(P.mT, P, alpha=0.25)
        MtM[n:, :n].addmm_(P, S, alpha=-0.5)
        MtM[n:, n:].addmm_(P, P.mT, alpha=0.25)
    del S
    sig2, U = torch.linalg.eigh(MtM, UPLO="L")
    del MtM
    sig = sig2.clamp(min=0).sqrt()
    # msign(M) = M U diag(1/σ) Uᵀ. The eigh of the squared matrix leaves ‖M u_j‖ off σ_j by a
    # factor 1 + O(eps·σ_max²/σ_j²) (and the columns off orthogonal by as much), so directions
    # below τ·σ_max map to 0: τ = 1e-5 keeps that error ≤ 2e-6 and drops at most τ·σ_max per
    # direction (τ = 1.5e-4 dropped 1e-4 of the value on a rank-deficient momentum; 1e-7 let
    # rounding-level directions in, gaps 4e-2 on rank-2 gradients)
    inv = torch.where(sig > 1e-5 * float(sig[-1]), 1 / sig.clamp(min=1e-300), torch.zeros_like(sig))
    R = U @ (inv[:, None] * U[:n].mT)  # d×n
    K = torch.empty_like(B)
    for rows in row_blocks(n):  # S R₁ from blocks of rows of S = skew B (of ≥ 128 rows: whole for n ≤ 128)
        K[rows] = (B[rows] - B[:, rows].mT).mul_(0.5) @ R[:n]
    if k:
        K.addmm_(P.mT, R[n:], alpha=-0.5)
        Bb = (P @ R[:n]).mul_(0.5)
    else:
        Bb = P.new_zeros(0, n)
    del R
    K = skew(K)
    # the optimal dual from |M| = U diag(σ) Uᵀ: H = 2·(Schur complement of its k×k block); with
    # k = 0, K·H = 2·msign(S)|S| = 2S is skew and Λ = ½ sym B
    lam = sym(B).mul_(0.5)
    if k:
        # Y = V Vᵀ with V = U diag(√σ), scaled in place (U is not needed after R)
        V = U.mul_(sig.sqrt())
        del U
        Y12 = V[:n] @ V[n:].mT  # Y is symmetric: Y₂₁ = Y₁₂ᵀ
        H = V[:n] @ V[:n].mT
        Y22 = V[n:] @ V[n:].mT
        del V
        H -= Y12 @ torch.linalg.pinv(Y22, hermitian=True, rtol=1e-12) @ Y12.mT
        del Y12, Y22
        KH = K @ H
        del H
        lam.sub_(sym(KH))  # Λ −= sym(K·H): exactly symmetric (as ½ sym B is), so D(Λ) needs no symmetric copy
    # fp64 flops, weighted 2 (newton.py's model): MᵀM by blocks, the eigh (10d³), R and the
    # columns; then the three blocks of Y, the Schur complement (an eigh of k×k, two products) and K·H
    flops = 2 * (2.0 * n**3 + 4.0 * n * n * k + 2.0 * k * k * n + 10.0 * d**3 + 2.0 * d * d * n
                 + 2.0 * n**3 + 4.0 * n * n * k)
    if k:
        flops += 2 * (2.0 * d * (n * n + n * k + k * k) + 10.0 * k**3 + 2.0 * n * k * k + 2.0 * n * n * k + 2.0 * n**3)
    return K, Bb, lam, flops


def solve_closed_form(W, Gn, *, tol, max_iters, warm_start, g_scale=None):
    """The closed form (module docstring); W, Gn (…, m, n) with m ≥ n, WᵀW = I. ``g_scale``: Gn is
    given unnormalised and the normalised gradient is Gn·g_scale (as for ``solve_anderson``)."""
    m, n = W.shape[-2:]
    batch = W.shape[:-2]
    Wf, Gf = W.reshape(-1, m, n), Gn.reshape(-1, m, n)
    scales = g_scale.reshape(-1) if g_scale is not None else None
    A = torch.empty_like(Wf)
    duals, values, sym_gns, flops = [], [], [], 0.0
    for b in range(Wf.shape[0]):
        sc = 1.0 if scales is None else scales[b]
        Wb, Gb = Wf[b], Gf[b]
        Gw = None
        if m < 2 * n:
            # G⊥ spans up to all of W's complement (nothing for a square W), whose basis a QR gives
            # directly (no eigh of N, no 1/t): A = W K + W⊥ Bb
            Gw = gram64(Wb, Gb).mul_(sc)
            U, P, cost = complement_coordinates(Wb, Gb, Gw, sc)
            K, Bb, lam, c = closed_form_core(Gw, P)
            combine_rows(A[b], Wb, K, *((U, Bb) if P.shape[-2] else ()))
            assembly = 2 * (2.0 * m * n * n + 2.0 * m * n * P.shape[-2])
            cost += 2 * 2.0 * m * n * n  # Gw
            del U, P
        else:
            Gw, N, Z, _, cost = tall_frame(Wb, Gb, sc)
            P, to_r, c0 = normal_coordinates(Gw, N)
            del N  # the n×n fp64 working set is the peak where n ≈ m
            K, Bb, lam, c = closed_form_core(Gw, P)
            c += c0
            assemble(A[b], Wb, Gb, Z, K, to_r @ Bb, sc)
            assembly = 2 * 4.0 * m * n * n
            del Z, P
        # n×n fp64 matrices are 1.5–2× an fp32 parameter where n ≈ m: free what D(Λ) does not read
        # first (on 1024² D's Gram and eigvalsh were the step's peak, next to K, Bb and Gw)
        del K, Bb
        sym_gns.append(sym(Gw))
        del Gw
        values.append(float(dual_value(Wb, Gb, lam, sc)))
        duals.append(lam)
        # D(Λ): two fp64 tall products (W·Λ and the Gram, summed over row blocks) and an fp64
        # eigvalsh (10n³ in newton.py's model, as in certify_gram; it had been counted twice that here)
        flops += cost + c + assembly + 2 * 4.0 * m * n * n + 10.0 * n**3
    nb = Wf.shape[0]
    dual = torch.stack(duals).to(W.dtype).reshape(*batch, n, n)
    equivalents = flops / nb / msign_flops(m, n)
    return SolverOutput(direction=A.reshape(*batch, m, n), dual=dual, iterations=0,
                        msign_calls=math.ceil(equivalents), state={"dual": dual},
                        dual_value=torch.tensor(values, dtype=torch.float64, device=W.device).reshape(batch),
                        msign_equivalents=equivalents,
                        sym_gn=torch.stack(sym_gns).reshape(*batch, n, n))
