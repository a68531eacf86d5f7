"""SpectrumTracker: record every weight's spectrum every k optimizer steps during training.

Two ways to feed it, both recording after steps s = 0, k, 2k, …:
- hooks: ``tracker.attach(optimizer)`` registers a step pre-hook (copies the weights before a
  recorded step) and a post-hook (records); works with any torch optimizer and any loop;
- callback: ``tracker(step, model, optimizer)`` after each step, the signature of
  ``modman.experiments.mnist1d.train(callback=...)``; it copies the weights after step s − 1 when
  s is due, so the update of step s is known (not at s = 0: those update metrics are NaN).

Per record and weight: σ_min, σ_max, condition number, stable rank and distance to the manifold
(``spectra.py``), the spectral norm ‖ΔW‖₂ of the step's update ΔW = W_after − W_before, the
gradient's Frobenius norm and the alignment

    cos(−ΔW, G) = −⟨ΔW, G⟩ / (‖ΔW‖_F ‖G‖_F)

(1 for plain gradient descent; Muon-type steps trade it for a flat spectrum).

Cost. Small matrices (min(m, n) ≤ ``exact_max_dim``, default 64) get their exact spectrum (the
fp64 Gram's eigenvalues) at every record. Larger ones get it every ``spectrum_every`` steps
(default 10k); their records in between use warm-started iterations on the small fp64 Gram from
the vectors the previous record left, since W moves little in k steps: σ_max by power
iteration, σ_min by inverse iteration through one Cholesky factor, two iterations each (stacks
use ``estimators.power_iteration``). These are one-sided (σ_max, κ, distance from below; σ_min,
stable rank from above); measured on the MNIST-1D MLP against exact spectra at every record,
median relative errors 1e-6 (σ_max) and 1e-10 (σ_min) under AdamW, 2e-3 and 6e-6 under Muon,
worst 0.4 right after a jump. ``exact`` marks which records are which. The update norm ‖ΔW‖₂ is
exact on spectrum steps only, for every matrix: in between it is a warm-started power estimate,
two iterations of v ← ΔWᵀΔW v on ΔW itself (from below; the same iteration as on ΔW's Gram,
which measured median error 1e-4 under AdamW but 8 % under Muon, whose flat update spectrum
power iteration resolves slowly), because its exact value needs a second
eigendecomposition per weight. At these sizes a record's cost is the number of tensor
operations and LAPACK calls, not their flops: an exact fp64 eigvalsh at n = 128 costs a third of
an MNIST-1D training step (``benchmarks/tracking_overhead.py``). Between records the tracker only
counts steps; the cost per k steps is one weight copy and one record.
"""
from __future__ import annotations

import math

import torch

from .estimators import power_iteration
from .spectra import (gram_eigenvalues, manifold_label, named_matrices, resolve_manifolds,
                      singular_values, stats_from_extremes, stats_from_floats)
from .tracking import ParamTrack, Tracking, save_tracking

# Up to this min(m, n) an exact spectrum at every record costs less than the estimators' per-op
# overhead (an fp64 eigvalsh at n = 64 ≈ 0.1 ms; at n = 128 ≈ 0.6 ms, a third of an MNIST-1D
# training step)
TRACK_EXACT_MAX_DIM = 64


class SpectrumTracker:
    """Records spectra of every matrix parameter every ``every`` steps (see the module docstring).

    Args:
        model_or_named_params: an nn.Module, a mapping name → tensor or (name, tensor) pairs.
        every: record after steps 0, every, 2·every, … (≥ 1).
        manifolds: reference manifold per weight for ``distance`` (see ``resolve_manifolds``).
        spectrum_every: exact spectra of the large matrices every this many steps (a multiple of
            ``every``; "auto" is 10·every, None never: their records then all use estimates).
        exact_max_dim: matrices with min(m, n) up to this get an exact spectrum at every record
            (for them one small eigendecomposition costs less than the estimators' overhead).
        power_iters: power iterations per estimate at the records in between.
        meta: free-form {str: str | number} stored with the run.
    """

    def __init__(self, model_or_named_params, *, every: int = 10, manifolds=None,
                 spectrum_every: int | None | str = "auto", exact_max_dim: int = TRACK_EXACT_MAX_DIM, power_iters: int = 6,
                 meta: dict | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int ≥ 1, got {every!r}")
        if spectrum_every == "auto":
            spectrum_every = 10 * every
        if spectrum_every is not None and (not isinstance(spectrum_every, int) or spectrum_every < 1
                                           or spectrum_every % every):
            raise ValueError(f"spectrum_every must be 'auto', None or a positive multiple of every={every}, "
                             f"got {spectrum_every!r}")
        if not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be an int ≥ 1, got {power_iters!r}")
        mats = named_matrices(model_or_named_params)
        if not mats:
            raise ValueError("SpectrumTracker: no matrix parameters (none with ≥ 2 dimensions) to track")
        self.every = every
        self.spectrum_every = spectrum_every
        self.exact_max_dim = int(exact_max_dim)
        self.power_iters = power_iters
        self._vectors: dict[tuple[str, str], torch.Tensor] = {}  # warm starts of the power iterations
        self._params = [(name, p, tuple(W.shape)) for name, p, W in mats]
        self._manifolds = resolve_manifolds([n for n, _, _ in mats], manifolds)
        self.tracking = Tracking(every=every, meta=dict(meta or {}))
        for name, _, shape in self._params:
            self.tracking.params[name] = ParamTrack(shape=shape, manifold=manifold_label(self._manifolds[name]))
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._snapshot_step: int | None = None
        self._hook_step = 0
        self._handles: list = []

    # ----------------------------------------------------------------------------- feeding
    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, model=None, optimizer=None) -> None:
        """Callback after optimizer step ``step`` (model and optimizer are not needed)."""
        if self.due(step):
            before = self._snapshot if self._snapshot_step == step - 1 else None
            self.record(step, before=before)
            self._snapshot = None
        if self.due(step + 1):
            self._snapshot, self._snapshot_step = self._copy_weights(), step

    def attach(self, optimizer: torch.optim.Optimizer) -> "SpectrumTracker":
        """Record through the optimizer's step hooks from its next step on (counted from 0)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.detach()

        def pre(opt, args, kwargs):
            if self.due(self._hook_step):
                self._snapshot, self._snapshot_step = self._copy_weights(), self._hook_step - 1

        def post(opt, args, kwargs):
            if self.due(self._hook_step):
                self.record(self._hook_step, before=self._snapshot)
                self._snapshot = None
            self._hook_step += 1

        self._handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ----------------------------------------------------------------------------- recording
    def _view(self, p: torch.Tensor, shape) -> torch.Tensor:
        return p.detach().reshape(shape)

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {name: self._view(p, shape).clone() for name, p, shape in self._params}

    @torch.no_grad()
    def record(self, step: int, before: dict[str, torch.Tensor] | None = None, *, exact: bool | None = None) -> None:
        """Record every weight now, labelled ``step``; ``before`` (name → weights before this
        step) gives the update metrics, else they are NaN. ``exact`` forces (True) or forbids
        (False) exact spectra; by default small matrices and spectrum steps get them."""
        spectrum_step = self.spectrum_every is not None and step % self.spectrum_every == 0
        for name, p, shape in self._params:
            W = self._view(p, shape)
            track = self.tracking.params[name]
            exact_here = exact if exact is not None else (spectrum_step or min(shape[-2:]) <= self.exact_max_dim)
            if exact_here and W.ndim == 2:  # the common case, in as few tensor ops as possible
                ev = gram_eigenvalues(W)  # σᵢ², ascending, fp64
                lo2, hi2, fro_sq = torch.stack([ev[0], ev[-1], ev.sum()]).tolist()
                st = stats_from_floats(W, [math.sqrt(max(hi2, 0.0))], [math.sqrt(max(lo2, 0.0))], [fro_sq],
                                       self._manifolds[name])
                track.spectrum_steps.append(int(step))
                track.spectra.append(ev.flip(0).clamp(min=0).sqrt().float())
            elif exact_here:
                s = singular_values(W)  # (…, r) descending, fp64
                st = stats_from_extremes(W, s[..., 0], s[..., -1], (s * s).sum(-1), self._manifolds[name])
                track.spectrum_steps.append(int(step))
                # a matrix's spectrum is sorted already; a stack's is concatenated, then sorted
                track.spectra.append(s.float() if s.ndim == 1 else s.reshape(-1).sort(descending=True).values.float())
            elif W.ndim == 2:
                hi, lo, fro_sq = self._gram_extremes(name, W)
                st = stats_from_floats(W, [hi], [min(lo, hi)], [fro_sq], self._manifolds[name])
            else:
                s_max = self._power(name, "top", W, smallest=False)
                s_min = self._power(name, "bottom", W, smallest=True, shift=1.01 * s_max**2)
                fro_sq = (W.double() ** 2).sum((-2, -1))
                st = stats_from_extremes(W, s_max, torch.minimum(s_min, s_max), fro_sq, self._manifolds[name])
            track.steps.append(int(step))
            track.exact.append(bool(exact_here))
            for key in ("sigma_min", "sigma_max", "condition", "stable_rank", "distance"):
                track.values[key].append(st[key])
            # ‖ΔW‖₂ needs an eigendecomposition of its own, which on a small model costs as much as
            # W's: exact on spectrum steps (and when forced), a warm-started estimate in between
            exact_update = exact if exact is not None else spectrum_step
            self._update_metrics(name, track, W, p.grad, before.get(name) if before else None, shape,
                                exact_update)

    def _power(self, name: str, which: str, X: torch.Tensor, smallest: bool, shift=None) -> torch.Tensor:
        v = self._vectors.get((name, which))
        estimate, v = power_iteration(X, v, iters=self.power_iters, smallest=smallest, shift=shift)
        # a zero matrix leaves v = 0, which would stay 0: start cold next time
        self._vectors[(name, which)] = v if bool((estimate > 0).all()) else None
        return estimate

    def _gram_power(self, name: str, which: str, g: torch.Tensor, iters: int = 2) -> torch.Tensor:
        """Largest eigenvalue of the symmetric g from below (a Rayleigh quotient): power iteration
        warm-started from the last record's vector, two tensor ops per iteration (at these
        sizes the per-op overhead is the cost, not the products)."""
        v = self._vectors.get((name, which))
        if v is None or v.shape != (g.shape[0],):
            v = torch.linspace(1.0, 2.0, g.shape[0], dtype=g.dtype)  # deterministic cold start
            iters = 15 * iters
        for _ in range(iters):
            v = torch.nn.functional.normalize(g @ v, dim=0)
        self._vectors[(name, which)] = v
        return v @ (g @ v)

    def _update_power(self, name: str, D: torch.Tensor, iters: int = 2) -> torch.Tensor:
        """‖D‖₂ from below: power iteration on D itself (v ← Dᵀ D v), warm-started from the last
        record's vector. No Gram matrix: two matrix-vector products per iteration instead of a
        matrix product, which at k steps between records is most of this estimate's cost."""
        v = self._vectors.get((name, "update"))
        if v is None or v.shape != (D.shape[1],) or v.dtype != D.dtype:
            v = torch.linspace(1.0, 2.0, D.shape[1], dtype=D.dtype)  # deterministic cold start
            iters = 15 * iters
        for _ in range(iters):
            v = torch.nn.functional.normalize(D.mT @ (D @ v), dim=0)
        self._vectors[(name, "update")] = v
        return torch.linalg.vector_norm(D @ v)

    def _gram_extremes(self, name: str, W: torch.Tensor) -> tuple[float, float, float]:
        """(σ_max from below, σ_min from above, ‖W‖_F²) of a matrix from its small fp64 Gram g:
        σ_max² by warm-started power iteration, σ_min² by warm-started inverse iteration through
        one Cholesky factor of g (the shifted power iteration converges far too slowly at the
        bottom of an AdamW spectrum). A singular g falls back to σ_min = 0 from the shift."""
        X = W.double()
        g = X.mT @ X if X.shape[0] >= X.shape[1] else X @ X.mT
        top = self._gram_power(name, "top", g)
        L, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            v = self._vectors.get((name, "bottom"))
            iters = 2
            if v is None or v.shape != (g.shape[0],):
                v, iters = torch.linspace(1.0, 2.0, g.shape[0], dtype=g.dtype), 15
            for _ in range(iters):
                v = torch.nn.functional.normalize(torch.cholesky_solve(v[:, None], L)[:, 0], dim=0)
            self._vectors[(name, "bottom")] = v
            bottom = v @ (g @ v)
        else:
            bottom = torch.zeros((), dtype=g.dtype)
        hi2, lo2, fro_sq = torch.stack([top, bottom, g.diagonal().sum()]).tolist()
        return math.sqrt(max(hi2, 0.0)), math.sqrt(max(lo2, 0.0)), fro_sq

    def _update_metrics(self, name, track, W, grad, W_before, shape, exact) -> None:
        upd_norm = align = grad_norm = math.nan
        G = grad.detach().reshape(shape).to(torch.float32) if grad is not None else None
        if W_before is not None:
            D = (W - W_before).to(torch.float32)
            if exact:  # fp32 suffices: only σ₁ is wanted, to ≈ 1e-7 relative
                upd = gram_eigenvalues(D, torch.float32)[..., -1].max().clamp(min=0).sqrt()
            elif D.ndim == 2:
                upd = self._update_power(name, D)
            else:
                upd = self._power(name, "update", D, smallest=False).max()
            # one transfer for every scalar: a record's cost is mostly per-operation overhead
            d, g = D.reshape(-1), (G.reshape(-1) if G is not None else None)
            scalars = [upd.to(torch.float32), torch.dot(d, d)]
            if G is not None:
                scalars += [torch.dot(g, g), torch.dot(d, g)]
            values = torch.stack(scalars).tolist()
            upd_norm, d_norm = values[0], math.sqrt(values[1])
            if G is not None:
                grad_norm, inner = math.sqrt(values[2]), values[3]
                if d_norm > 0 and grad_norm > 0:
                    align = -inner / (d_norm * grad_norm)
        elif G is not None:
            grad_norm = float(torch.linalg.vector_norm(G))
        track.values["update_norm"].append(upd_norm)
        track.values["update_alignment"].append(align)
        track.values["grad_norm"].append(grad_norm)

    # ----------------------------------------------------------------------------- output
    def save(self, path, name: str = "run"):
        """Save this run alone to ``path`` (``load_tracking(path)[name]`` reads it back)."""
        return save_tracking(path, {name: self.tracking})
