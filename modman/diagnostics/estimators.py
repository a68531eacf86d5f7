"""Cheap spectral estimators for large matrices: Golub–Kahan–Lanczos bidiagonalisation.

For W ∈ R^{m×n} (oriented tall, m ≥ n; batched over leading dims) and a unit start vector v₁,
k steps of the Golub–Kahan recurrence

    α_j u_j = W v_j − β_{j−1} u_{j−1},        β_j v_{j+1} = Wᵀ u_j − α_j v_j

build orthonormal U_k, V_k with W V_k = U_k B_k, B_k upper bidiagonal (α on the diagonal, β above
it). The singular values of the small k×k matrix B_k (Ritz values) are those of W restricted to
span(V_k), which gives one-sided estimates in exact arithmetic:

    θ_max ≤ σ_max(W)   and   θ_min ≥ σ_min(W)    (σ_min over the n right singular directions),

so the condition number is under-estimated and the stable rank ‖W‖_F²/σ_max² over-estimated.
The extreme Ritz values converge first (much faster than power iteration, which converges at
rate (σ₂/σ₁)^{2k}); the residual of the top Ritz triple is β_k·|x_k| (x the top left singular
vector of B_k), and iteration stops once it is below rtol·θ_max. After k = n steps the Ritz
values are W's singular values.

Cost: 2k matrix–vector products with W plus O(k²(m + n)) for full re-orthogonalisation (done
twice, "twice is enough"), instead of the O(mn²) of a full SVD. A breakdown (α or β ≈ 0: an
invariant subspace, e.g. every σ equal, or a zero singular value) restarts with a fresh random
vector orthogonal to the basis so far, which keeps W V_k = U_k B_k exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg.blocked import power_of_two_floor


@dataclass(frozen=True)
class LanczosEstimate:
    """Ritz singular values of a (batch of) matrices.

    ritz: (…, k) singular values of B_k, descending, in fp64.
    residual_max: (…,) residual β_k·|x_k| of the top Ritz value (0 when converged exactly).
    iterations: k, the number of Golub–Kahan steps taken.
    frobenius_sq: (…,) ‖W‖_F², exact (for the stable rank).
    """

    ritz: torch.Tensor
    residual_max: torch.Tensor
    iterations: int
    frobenius_sq: torch.Tensor

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.ritz[..., 0]

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.ritz[..., -1]

    @property
    def stable_rank(self) -> torch.Tensor:
        """‖W‖_F²/σ_max² (0 for W = 0)."""
        s2 = self.sigma_max**2
        return torch.where(s2 > 0, self.frobenius_sq / torch.where(s2 > 0, s2, torch.ones_like(s2)),
                           torch.zeros_like(s2))


def _orthogonalise(x: torch.Tensor, Q: torch.Tensor, j: int) -> torch.Tensor:
    """x (b, d) minus its projection on the first j columns of Q (b, d, ·), twice."""
    if j == 0:
        return x
    Qj = Q[:, :, :j]
    for _ in range(2):
        x = x - (Qj @ (Qj.mT @ x.unsqueeze(-1))).squeeze(-1)
    return x


def _normalise_or_restart(x, Q, j, threshold, gen):
    """Norm of x and x/‖x‖; where ‖x‖ ≤ threshold, a random unit vector ⟂ Q[:, :, :j] and norm 0."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    broke = norm <= threshold
    if bool(broke.any()):
        fresh = torch.randn(x.shape, generator=gen, dtype=x.dtype, device="cpu").to(x.device)
        fresh = _orthogonalise(fresh, Q, j)
        fresh = fresh / torch.linalg.vector_norm(fresh, dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
        x = torch.where(broke.unsqueeze(-1), fresh, x / torch.where(broke, 1.0, norm).unsqueeze(-1))
        norm = torch.where(broke, torch.zeros_like(norm), norm)
    else:
        x = x / norm.unsqueeze(-1)
    return norm, x


def lanczos_svals(
    W: torch.Tensor,
    *,
    rtol: float = 1e-3,
    max_iters: int = 64,
    check_every: int = 8,
    seed: int = 0,
) -> LanczosEstimate:
    """Golub–Kahan–Lanczos estimate of the extreme singular values of W (see the module doc).

    Args:
        W: (…, m, n) real floating tensor, any orientation, batched over leading dimensions.
        rtol: stop when every matrix's top-Ritz residual ≤ rtol·θ_max (checked every
            ``check_every`` steps); rtol = 0 runs ``max_iters`` steps.
        max_iters: at most this many steps (capped at min(m, n), where the result is exact).
        seed: the start vectors come from a generator with this seed (deterministic).
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"lanczos_svals expects a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2 or W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"lanczos_svals needs a non-empty matrix (≥ 2 dims), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"lanczos_svals needs a real floating tensor, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("lanczos_svals: W contains NaN or Inf")
    if not rtol >= 0 or max_iters < 1 or check_every < 1:  # (not ≥: rtol=nan converged never, silently)
        raise ValueError(f"need rtol ≥ 0, max_iters ≥ 1, check_every ≥ 1; got {rtol}, {max_iters}, {check_every}")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    X = W.mT if W.shape[-2] < W.shape[-1] else W  # tall: the right space is the small one
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    # each matrix divided by its largest |entry| (a power of 2: exact) and the values scaled back at
    # the end: in fp32 the recurrence overflowed from ~1e19 and underflowed below ~1e-23 (a
    # LinAlgError, or σ_max = 0 at 1e-30)
    peak = X.abs().amax((-2, -1)).double()
    scale = power_of_two_floor(peak)
    X = (X / scale[:, None, None].to(X.dtype)).to(dtype)
    b, m, n = X.shape
    k_max = min(int(max_iters), n)
    fro_sq = (X.double() ** 2).sum((-2, -1))
    # A step is a breakdown when the new vector's norm is at rounding level relative to ‖W‖_F.
    threshold = (100 * torch.finfo(dtype).eps * fro_sq.sqrt()).to(dtype)
    gen = torch.Generator().manual_seed(int(seed))

    V = torch.zeros(b, n, k_max + 1, dtype=dtype, device=X.device)
    U = torch.zeros(b, m, k_max, dtype=dtype, device=X.device)
    alpha = torch.zeros(b, k_max, dtype=torch.float64, device=X.device)
    beta = torch.zeros(b, k_max, dtype=torch.float64, device=X.device)
    v = torch.randn(b, n, generator=gen, dtype=dtype).to(X.device)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    V[:, :, 0] = v
    u_prev = torch.zeros(b, m, dtype=dtype, device=X.device)
    beta_prev = torch.zeros(b, dtype=dtype, device=X.device)
    ritz = residual = None
    k = 0
    for j in range(k_max):
        u = (X @ V[:, :, j].unsqueeze(-1)).squeeze(-1) - beta_prev.unsqueeze(-1) * u_prev
        u = _orthogonalise(u, U, j)
        a, u = _normalise_or_restart(u, U, j, threshold, gen)
        U[:, :, j] = u
        w = (X.mT @ u.unsqueeze(-1)).squeeze(-1) - a.unsqueeze(-1) * V[:, :, j]
        w = _orthogonalise(w, V, j + 1)
        if j + 1 < n:
            bt, w = _normalise_or_restart(w, V, j + 1, threshold, gen)
        else:  # the basis already spans R^n: the recurrence ends exactly here
            bt, w = torch.zeros_like(a), torch.zeros_like(w)
        V[:, :, j + 1] = w
        alpha[:, j], beta[:, j] = a.double(), bt.double()
        u_prev, beta_prev = u, bt
        k = j + 1
        if k == k_max or (rtol > 0 and k % check_every == 0):
            ritz, residual = _ritz(alpha[:, :k], beta[:, :k])
            if rtol > 0 and bool((residual <= rtol * ritz[:, 0]).all()):
                break
    return LanczosEstimate(
        ritz=(ritz * scale[:, None]).reshape(*batch, k),
        residual_max=(residual * scale).reshape(batch),
        iterations=k,
        frobenius_sq=(fro_sq * scale**2).reshape(batch),
    )


def _ritz(alpha: torch.Tensor, beta: torch.Tensor):
    """Singular values of the bidiagonal B_k and the residual β_k·|x_k| of the top one."""
    k = alpha.shape[-1]
    B = torch.diag_embed(alpha)
    if k > 1:
        B = B + torch.diag_embed(beta[:, : k - 1], offset=1)
    Ux, S, _ = torch.linalg.svd(B)
    residual = beta[:, k - 1] * Ux[:, k - 1, 0].abs()
    return S, residual


def sigma_max_estimate(W: torch.Tensor, **options) -> torch.Tensor:
    """Lower-bound estimate of ‖W‖₂ per matrix (fp64), by ``lanczos_svals``."""
    return lanczos_svals(W, **options).sigma_max


def stable_rank_estimate(W: torch.Tensor, **options) -> torch.Tensor:
    """Estimate of the stable rank ‖W‖_F²/‖W‖₂² per matrix (an upper bound in exact arithmetic)."""
    return lanczos_svals(W, **options).stable_rank


@torch.no_grad()
def power_iteration(W: torch.Tensor, v: torch.Tensor | None = None, *, iters: int = 6,
                    smallest: bool = False, shift: torch.Tensor | float | None = None,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm-startable power iteration on the small Gram WᵀW (W oriented tall, batched).

    Largest: v ← WᵀWv/‖·‖, estimate ‖Wv‖ ≤ σ_max. Smallest (``smallest=True``): the same on the
    shifted c·I − WᵀW with c ≥ σ_max² (``shift``, per matrix; default ‖W‖_F², safe but slow: pass
    a tight one such as 1.01·σ_max²), estimate ‖Wv‖ ≥ σ_min (a Rayleigh quotient, so
    both are one-sided like the Lanczos ones). It converges at rate (σ₂/σ₁)^{2k} (slower at the
    bottom), so it is meant for tracking: pass back the returned v at the next record, when W
    has moved little, and a few iterations keep the estimate converged.

    Returns (estimate (…,) fp64, v (…, n) for the next call).
    """
    X = W.mT if W.shape[-2] < W.shape[-1] else W
    batch, n = X.shape[:-2], X.shape[-1]
    X = X.reshape(-1, *X.shape[-2:]).to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    if v is None:
        gen = torch.Generator().manual_seed(int(seed))
        v = torch.randn(X.shape[0], n, 1, generator=gen, dtype=X.dtype).to(X.device)
        iters = 4 * iters  # a cold start needs more
    else:
        v = v.reshape(X.shape[0], n, 1).to(X.dtype)
    c = None
    if smallest:
        c = (X * X).sum((-2, -1), keepdim=True) if shift is None else \
            torch.as_tensor(shift, dtype=X.dtype, device=X.device).reshape(-1, 1, 1).expand(X.shape[0], 1, 1)
    for _ in range(iters):
        w = X.mT @ (X @ v)
        if smallest:
            w = c * v - w
        v = w / torch.linalg.vector_norm(w, dim=-2, keepdim=True).clamp(min=torch.finfo(X.dtype).tiny)
    estimate = torch.linalg.vector_norm(X @ v, dim=(-2, -1)).double()
    return estimate.reshape(batch), v.reshape(*batch, n)


@torch.no_grad()
def symmetric_lanczos_extremes(g: torch.Tensor, v: torch.Tensor, steps: int, *, seed: int = 0):
    """(θ_min, θ_max, u_min, u_max): the extreme Ritz values of ``steps`` Lanczos steps on the
    symmetric g (n×n, any device; fp64 advised) from v, fully reorthogonalised (twice), and their
    unit Ritz vectors. One-sided as the Golub–Kahan ones: λ_min ≤ θ_min and θ_max ≤ λ_max up to
    rounding of order eps·‖g‖, each θ being the Rayleigh quotient of its Ritz vector; a breakdown
    (an invariant subspace: g = I exactly) restarts with a random vector ⟂ the basis.

    Krylov methods are shift-invariant where power and inverse iteration are not: a weight on its
    manifold has a Gram spectrum 1 ± 1e-6, on which a power iteration's ratio λ₂/λ₁ is 1 − 1e-6,
    while Lanczos resolves it as it would the same spectrum spread over [0, 2]. Cost: ``steps``
    matrix–vector products with g, O(n·steps²) for the reorthogonalisation and two host reads a
    step (the recurrence's α and β)."""
    if int(steps) < 1:
        raise ValueError(f"symmetric_lanczos_extremes needs steps ≥ 1, got {steps!r}")
    n = g.shape[-1]
    k = min(int(steps), n)
    Q = g.new_zeros(1, n, k)
    gen = torch.Generator().manual_seed(int(seed))
    start = v.reshape(1, n).to(g)
    if not bool(torch.isfinite(start).all()):
        start = torch.zeros_like(start)
    _, q = _normalise_or_restart(start, Q, 0, 0.0, gen)
    alpha, beta = [], []
    for j in range(k):
        Q[0, :, j] = q[0]
        w = g @ q[0]
        alpha.append(float(q[0] @ w))
        if j + 1 == k:
            break
        w = _orthogonalise(w.unsqueeze(0), Q, j + 1)
        # at rounding level relative to ‖g‖ (estimated by the largest |α|) the Krylov space is exhausted
        b, q = _normalise_or_restart(w, Q, j + 1, 1e-13 * max(abs(a) for a in alpha), gen)
        beta.append(float(b[0]))
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, Y = torch.linalg.eigh(T)
    Y = Y.to(device=g.device, dtype=g.dtype)
    basis = Q[0, :, :len(alpha)]
    return float(theta[0]), float(theta[-1]), basis @ Y[:, 0], basis @ Y[:, -1]

