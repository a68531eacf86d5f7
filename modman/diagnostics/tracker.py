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
iteration, σ_min by inverse iteration through one Cholesky factor, two iterations each (a
stack's matrices each on their own). A clustered spectrum (estimated Gram extremes within 2×: a
weight on or near its manifold, σ = 1 ± 1e-6) also gets 24 Lanczos steps from those vectors:
power and inverse iteration stall there (ratio λ₂/λ₁ ≈ 1 − 1e-6), Krylov methods do not (they
are shift-invariant), and without them the distance read 10–10⁴× low. These are one-sided (σ_max, κ, distance from below; σ_min,
stable rank from above, up to rounding of order κ²·1e-16); measured on the MNIST-1D MLP against
exact spectra at every record (``benchmarks/tracker_accuracy.py``), median relative errors 1e-6
(σ_max) and 1e-10 (σ_min) under AdamW, 2e-3 and 6e-6 under Muon, worst 0.44 right after a jump;
under ManifoldMuon the distance's median relative error is 6e-11 (max 1.3e-7).
``exact`` marks which records are which. The update norm ‖ΔW‖₂ is exact on spectrum steps only
(``update_exact`` marks them), for every matrix: in between it is a warm-started power estimate, two iterations of
v ← ΔWᵀΔW v on ΔW itself (from below; median error 9e-5 under AdamW but 8 % under Muon, whose
flat update spectrum power iteration resolves slowly), because its exact value needs a second
eigendecomposition per weight. At these sizes a record's cost is the number of tensor
operations and LAPACK calls, not their flops, so on CPU the small linear algebra goes through
NumPy and SciPy (``small_linalg``: about half torch's per-call cost), on GPU through torch;
``benchmarks/tracking_overhead.py`` measures a record every 10 steps at 8 % of an AdamW step on
MNIST-1D. Between records the tracker only counts steps; the cost per k steps is one weight
copy and one record.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from . import small_linalg
from .estimators import power_iteration, symmetric_lanczos_extremes
from .spectra import (gram_eigenvalues, is_transposed_view, manifold_label, matrices_and_manifolds, singular_values,
                      stats_from_extremes, stats_from_floats)
from .tracking import ParamTrack, Tracking, plain_meta, save_tracking

# Up to this min(m, n) an exact spectrum at every record costs less than the estimators' per-op
# overhead (an fp64 eigvalsh at n = 64 ≈ 0.1 ms; at n = 128 ≈ 0.6 ms, a third of an MNIST-1D
# training step)
TRACK_EXACT_MAX_DIM = 64
# Between spectrum steps, a Gram spectrum whose estimated extremes lie within this ratio of each
# other (σ-condition ≤ √2: a weight on or near its manifold) also gets LANCZOS_STEPS Lanczos
# steps, which resolve a cluster where power and inverse iteration stall (``_refine_clustered``)
CLUSTER_RATIO = 2.0
LANCZOS_STEPS = 24


def _unit(v: torch.Tensor) -> torch.Tensor:
    """v/‖v‖ (0 stays 0): three tensor ops, against F.normalize's five (at n = 128 the ops' fixed
    cost is the cost)."""
    return v / torch.linalg.vector_norm(v).clamp(min=torch.finfo(v.dtype).tiny)


def _view_of(p: torch.Tensor, W: torch.Tensor):
    """How the matrix W views the parameter p, to apply again later: "transposed" (pᵀ: transformers'
    Conv1D, stored (in, out)) or the shape p is reshaped to (a Conv weight flattened, or as is). A
    reshape cannot stand for a transpose (it scrambled GPT-2's non-square weights)."""
    if is_transposed_view(p, W):
        return "transposed"
    return tuple(W.shape)


def _matrix(t: torch.Tensor, view) -> torch.Tensor:
    """The matrix ``view`` (from ``_view_of``) makes of t, a parameter or its gradient (a sparse
    gradient, e.g. of ``nn.Embedding(sparse=True)``, densified: sparse tensors have no reshape)."""
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.mT if view == "transposed" else t.reshape(view)


class SpectrumTracker:
    """Records spectra of every matrix parameter every ``every`` steps (see the module docstring).

    Args:
        model_or_named_params: an nn.Module, a mapping name → tensor or (name, tensor) pairs.
        every: record after steps 0, every, 2·every, … (≥ 1).
        manifolds: reference manifold per weight for ``distance`` (see ``resolve_manifolds``); an
            optimizer also gives each weight its matrix view (e.g. a Conv1d weight flattened).
        spectrum_every: exact spectra of the large matrices every this many steps (a multiple of
            ``every``; "auto" is 10·every, None never: their records then all use estimates).
        exact_max_dim: matrices with min(m, n) up to this get an exact spectrum at every record
            (for them one small eigendecomposition costs less than the estimators' overhead).
        power_iters: power iterations per estimate at the records in between.
        meta: free-form {str: str | number | None | list | tuple | dict} stored with the run.

    The optimizer's hooks hold the tracker (``attach``) until ``detach()``: deleting it does not
    remove them. ``with SpectrumTracker(model).attach(optimizer) as tracker:`` detaches on exit.
    Attached, it measures updates of the weights that optimizer holds; a weight another optimizer
    steps (torch.optim.Muon's setup: AdamW for the embedding and head) gets NaN update metrics.
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
        # (int(exact_max_dim) failed on "x" without naming it, and took 1.5 as 1)
        if not isinstance(exact_max_dim, numbers.Integral) or isinstance(exact_max_dim, bool):
            raise TypeError(f"exact_max_dim must be an int, got {exact_max_dim!r}")
        mats, resolved = matrices_and_manifolds(model_or_named_params, manifolds)
        if not mats:
            raise ValueError("SpectrumTracker: no matrix parameters (none with ≥ 2 dimensions) to track")
        self.every = every
        self.spectrum_every = spectrum_every
        self.exact_max_dim = int(exact_max_dim)
        self.power_iters = power_iters
        self._vectors: dict[tuple[str, str], torch.Tensor] = {}  # warm starts of the power iterations
        # how each matrix views its parameter, re-applied at every record (p.data may be replaced)
        self._params = [(name, p, _view_of(p, W)) for name, p, W in mats]
        self._manifolds = resolved
        self.tracking = Tracking(every=every, meta=plain_meta(meta or {}))  # checked now, not at save
        for name, p, view in self._params:
            self.tracking.params[name] = ParamTrack(shape=tuple(_matrix(p, view).shape),
                                                    manifold=manifold_label(self._manifolds[name]))
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
            self._snapshot = None  # released even if the record raises
            self.record(step, before=before)
        if self.due(step + 1):
            self._snapshot, self._snapshot_step = self._copy_weights(), step

    def attach(self, optimizer: torch.optim.Optimizer) -> "SpectrumTracker":
        """Record through the optimizer's step hooks from its next step on. Steps are the
        tracker's own count: 0 at the first attach, continuing after a re-attach (to the same or
        another optimizer), so one run's records never share a label.

        The update metrics (update_norm, update_alignment) are those of the weights this optimizer
        holds at the step; a weight it does not hold, e.g. one a second optimizer steps, gets NaN
        (unknown): its hooks see it unchanged (it read 0 while AdamW moved an embedding by 0.06,
        a probe). Its grad_norm is recorded as usual. To measure every weight's update under two
        optimizers, call the tracker after both have stepped instead (``tracker(step)``, the
        callback): it compares copies taken a whole training step apart.

        The hooks run eagerly inside a ``torch.compile``d ``optimizer.step`` (compiler-disabled:
        traced, a record broke the graph dozens of times and recompiled on its float norms)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.detach()

        @torch.compiler.disable
        def pre(opt, args, kwargs):
            if self.due(self._hook_step):
                # by storage, not identity: a tracker given {"w": weight.detach()} tracks the tensor the
                # optimizer steps (its updates read NaN when matched by id; a review)
                held = {p.untyped_storage().data_ptr() for group in opt.param_groups for p in group["params"]}
                self._snapshot, self._snapshot_step = self._copy_weights(held), self._hook_step - 1

        @torch.compiler.disable
        def post(opt, args, kwargs):
            try:
                if self.due(self._hook_step):
                    before, self._snapshot = self._snapshot, None  # the copy is released even if the record raises
                    self.record(self._hook_step, before=before)
            finally:  # the optimizer stepped even if the record failed: the count stays the steps'
                self._hook_step += 1

        self._handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "SpectrumTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ----------------------------------------------------------------------------- recording
    def _copy_weights(self, held: set[int] | None = None) -> dict[str, torch.Tensor]:
        """name → a copy of the weight's matrix, for the tracked weights whose storage is in ``held``
        (default all); those left out get NaN update metrics at the next record."""
        return {name: _matrix(p, view).clone() for name, p, view in self._params
                if held is None or p.untyped_storage().data_ptr() in held}

    @torch.no_grad()
    def record(self, step: int, before: dict[str, torch.Tensor] | None = None, *, exact: bool | None = None) -> None:
        """Record every weight now, labelled ``step``; ``before`` (name → weights before this
        step) gives the update metrics, else they are NaN. ``exact`` forces (True) or forbids
        (False) exact spectra; by default small matrices and spectrum steps get them. All or
        nothing: if a weight fails, no weight keeps a part of this record."""
        marks = {name: track.mark() for name, track in self.tracking.params.items()}
        try:
            self._record(step, before, exact)
        except BaseException:
            for name, track in self.tracking.params.items():
                track.rollback(marks[name])
            raise

    def _record(self, step: int, before, exact: bool | None) -> None:
        spectrum_step = self.spectrum_every is not None and step % self.spectrum_every == 0
        pending = []
        for name, p, view in self._params:
            W = _matrix(p, view)
            shape = tuple(W.shape)
            track = self.tracking.params[name]
            exact_here = exact if exact is not None else (spectrum_step or min(shape[-2:]) <= self.exact_max_dim)
            if exact_here and W.ndim == 2:  # the common case, in as few tensor ops as possible
                # σᵢ², ascending, fp64: one transfer, then Python
                ev = small_linalg.gram_eigenvalues(W) if W.device.type == "cpu" else gram_eigenvalues(W).tolist()
                sv = [math.sqrt(max(x, 0.0)) for x in reversed(ev)]
                st = stats_from_floats(W, [sv[0]], [sv[-1]], [math.fsum(ev)], self._manifolds[name])
                track.spectrum_steps.append(int(step))
                track.spectra.append(torch.tensor(sv, dtype=torch.float32))
            elif exact_here:
                s = singular_values(W)  # (…, r) descending, fp64 (NaN for a NaN or ∞ in a matrix)
                st = stats_from_extremes(W, s[..., 0], s[..., -1], (s * s).sum(-1), self._manifolds[name])
                track.spectrum_steps.append(int(step))
                # a matrix's spectrum is sorted already; a stack's is concatenated, then sorted
                track.spectra.append(s.float() if s.ndim == 1 else s.reshape(-1).sort(descending=True).values.float())
            elif W.ndim == 2:
                hi, lo, fro_sq = self._gram_extremes(name, W)
                st = stats_from_floats(W, [hi], [lo if math.isnan(hi) else min(lo, hi)], [fro_sq],
                                       self._manifolds[name])
            else:  # a stack: each matrix as a 2-D one, with its own warm starts (the batched shifted
                # power iteration left σ_min 1.6–1.9× high between spectrum steps)
                per = [self._gram_extremes(f"{name}[{e}]", M) for e, M in enumerate(W.reshape(-1, *shape[-2:]))]
                his, los, fros = ([x[i] for x in per] for i in range(3))
                st = stats_from_floats(W, his, [lo if math.isnan(hi) else min(lo, hi) for hi, lo in zip(his, los)],
                                       fros, self._manifolds[name])
            track.steps.append(int(step))
            track.exact.append(bool(exact_here))
            for key in ("sigma_min", "sigma_max", "condition", "stable_rank", "distance"):
                track.values[key].append(st[key])
            # ‖ΔW‖₂ needs an eigendecomposition of its own, which on a small model costs as much as
            # W's: exact on spectrum steps (and when forced), a warm-started estimate in between
            exact_update = exact if exact is not None else spectrum_step
            track.update_exact.append(bool(exact_update) and before is not None and before.get(name) is not None)
            pending.append(self._update_metrics(name, W, p.grad, before.get(name) if before else None,
                                                view, exact_update))
        # every weight's update scalars in one transfer: at these sizes a record's cost is the
        # number of tensor operations, not their flops
        by_device: dict = {}
        for _, t in pending:
            if isinstance(t, torch.Tensor):
                by_device.setdefault(t.device, []).append(t)
        values = {device: iter(torch.cat(ts).tolist()) for device, ts in by_device.items()}
        for (name, _, _), (grad_norm, scalars) in zip(self._params, pending):
            if isinstance(scalars, torch.Tensor):
                scalars = [next(values[scalars.device]) for _ in range(5)]
            self._store_update_metrics(self.tracking.params[name], grad_norm, scalars)

    def _keep(self, name: str, which: str, v, estimate) -> None:
        """Keep v as the next record's start vector unless its estimate is 0 or not finite: a zero
        (zero matrix) or NaN vector would stay one, so the next record must start cold."""
        if isinstance(estimate, torch.Tensor):
            ok = bool((torch.isfinite(estimate) & (estimate > 0)).all())
        else:
            ok = math.isfinite(estimate) and estimate > 0
        self._vectors[(name, which)] = v if ok else None

    def _power(self, name: str, which: str, X: torch.Tensor, smallest: bool, shift=None) -> torch.Tensor:
        """``estimators.power_iteration`` warm-started from the last record's vector (a stack's ‖ΔW‖₂)."""
        v = self._vectors.get((name, which))
        estimate, v = power_iteration(X, v, iters=self.power_iters, smallest=smallest, shift=shift)
        self._keep(name, which, v, estimate)
        return estimate

    def _gram_power(self, name: str, which: str, g: torch.Tensor, iters: int = 2) -> torch.Tensor:
        """Largest eigenvalue of the symmetric g from below (a Rayleigh quotient): power iteration
        warm-started from the last record's vector, two tensor ops per iteration (at these
        sizes the per-op overhead is the cost, not the products)."""
        v = self._vectors.get((name, which))
        if not isinstance(v, torch.Tensor) or v.shape != (g.shape[0],):
            v = torch.linspace(1.0, 2.0, g.shape[0], dtype=g.dtype, device=g.device)  # deterministic cold start
            iters = 15 * iters
        for _ in range(iters):
            v = _unit(g @ v)
        estimate = v @ (g @ v)
        self._keep(name, which, v, estimate)
        return estimate

    def _update_power(self, name: str, D: torch.Tensor, iters: int = 2) -> torch.Tensor:
        """‖D‖₂ from below: power iteration on D itself (v ← Dᵀ D v), warm-started from the last
        record's vector. No Gram matrix: two matrix-vector products per iteration instead of a
        matrix product, which at k steps between records is most of this estimate's cost."""
        v = self._vectors.get((name, "update"))
        if v is None or v.shape != (D.shape[1],) or v.dtype != D.dtype:
            v = torch.linspace(1.0, 2.0, D.shape[1], dtype=D.dtype, device=D.device)  # deterministic cold start
            iters = 15 * iters
        for _ in range(iters):
            v = _unit(D.mT @ (D @ v))
        estimate = torch.linalg.vector_norm(D @ v)
        self._keep(name, "update", v, estimate)
        return estimate

    def _gram_extremes(self, name: str, W: torch.Tensor) -> tuple[float, float, float]:
        """(σ_max from below, σ_min from above, ‖W‖_F²) of a matrix from its small fp64 Gram g:
        σ_max² by warm-started power iteration, σ_min² by warm-started inverse iteration through
        one Cholesky factor of g (the shifted power iteration converges far too slowly at the
        bottom of an AdamW spectrum). A singular g falls back to σ_min = 0 from the shift.
        On CPU the same steps run through SciPy's BLAS and LAPACK (``_gram_extremes_cpu``)."""
        if W.device.type == "cpu":
            return self._gram_extremes_cpu(name, W)
        return self._gram_extremes_torch(name, W)

    def _gram_extremes_torch(self, name: str, W: torch.Tensor) -> tuple[float, float, float]:
        """``_gram_extremes`` in torch (any device; used on GPU)."""
        X = W.double()
        g = X.mT @ X if X.shape[0] >= X.shape[1] else X @ X.mT
        top = self._gram_power(name, "top", g)
        L, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            v = self._vectors.get((name, "bottom"))
            iters = 2
            if not isinstance(v, torch.Tensor) or v.shape != (g.shape[0],):
                v, iters = torch.linspace(1.0, 2.0, g.shape[0], dtype=g.dtype, device=g.device), 15
            for _ in range(iters):
                v = _unit(torch.cholesky_solve(v[:, None], L)[:, 0])
            bottom = v @ (g @ v)
            self._keep(name, "bottom", v, bottom)
        else:
            bottom = torch.zeros((), dtype=g.dtype)
        hi2, lo2, fro_sq = torch.stack([top, bottom, g.diagonal().sum()]).tolist()
        if lo2 > 0 and hi2 <= CLUSTER_RATIO * lo2:
            hi2, lo2 = self._refine_clustered(name, g, hi2, lo2, lambda u: u)
        return math.sqrt(max(hi2, 0.0)), math.sqrt(max(lo2, 0.0)), fro_sq

    def _gram_extremes_cpu(self, name: str, W: torch.Tensor) -> tuple[float, float, float]:
        """``_gram_extremes`` on CPU, through ``small_linalg`` (the same iterations, half the time)."""
        g = small_linalg.gram_upper(small_linalg.numpy_matrix(W))
        if not np.isfinite(g).all():  # a NaN or ∞ in W: nothing to estimate, and keep the warm starts
            return math.nan, math.nan, math.nan
        top, v = small_linalg.top_eigenvalue(g, *self._start_np(name, "top", g.shape[0], 2, 30))
        self._keep(name, "top", v, top)
        bottom, v = small_linalg.bottom_eigenvalue(g, *self._start_np(name, "bottom", g.shape[0], 2, 15))
        self._keep(name, "bottom", v, bottom)
        if bottom > 0 and top <= CLUSTER_RATIO * bottom:  # g's upper triangle, made whole for torch
            full = torch.from_numpy(np.triu(g) + np.triu(g, 1).T)
            top, bottom = self._refine_clustered(name, full, top, bottom, lambda u: u.numpy())
        return math.sqrt(max(top, 0.0)), math.sqrt(max(bottom, 0.0)), float(np.trace(g))

    def _refine_clustered(self, name: str, g: torch.Tensor, top: float, bottom: float, to_vector):
        """(top, bottom) of a clustered Gram spectrum improved by LANCZOS_STEPS Lanczos steps
        (``estimators.symmetric_lanczos_extremes``, on g's device) from the two warm vectors: both
        stay one-sided (the larger of two lower bounds of λ_max, the smaller of two upper bounds of
        λ_min), and an improved end keeps its Ritz vector as the next record's start. On a weight on
        its manifold (σ = 1 ± 2e-6) two power iterations left σ_max and σ_min both at the cluster's
        middle and the distance 10× low (a probe: 1.7e-7 against 1.84e-6 on a 128² layer);
        ``to_vector`` turns a Ritz vector into a start vector of the caller's kind."""
        n = g.shape[0]
        starts = [torch.as_tensor(v).to(g) for v in (self._vectors.get((name, "top")), self._vectors.get((name, "bottom")))
                  if v is not None and len(v) == n]
        start = sum(starts) if starts else torch.linspace(1.0, 2.0, n, dtype=g.dtype, device=g.device)
        lo, hi, u_lo, u_hi = symmetric_lanczos_extremes(g, start, LANCZOS_STEPS)
        if hi > top:
            top = hi
            self._keep(name, "top", to_vector(u_hi), hi)
        if lo < bottom:
            bottom = lo
            self._keep(name, "bottom", to_vector(u_lo), lo)
        return top, bottom

    def _start_np(self, name: str, which: str, n: int, warm: int, cold: int, dtype=np.float64):
        """(start vector, iterations) of a CPU power iteration: the last record's vector, or a
        deterministic cold start with more iterations."""
        v = self._vectors.get((name, which))
        if isinstance(v, np.ndarray) and v.shape == (n,) and v.dtype == dtype:
            return v, warm
        return np.linspace(1.0, 2.0, n, dtype=dtype), cold

    def _update_metrics(self, name, W, grad, W_before, view, exact):
        """(grad_norm, scalars): with the weights before the step, ``scalars`` is
        [‖ΔW‖₂, ‖ΔW‖_F², ⟨ΔW, G⟩, ⟨G, ΔW⟩, ‖G‖_F²] (G = 0 without a gradient), as floats on CPU
        or as an fp32 tensor read back for all weights at once, and ``grad_norm`` is None (it is
        in the scalars); without them, no scalars and the gradient's norm (NaN without one)."""
        G = _matrix(grad, view).to(torch.float32) if grad is not None else None
        if W_before is None:
            return (float(torch.linalg.vector_norm(G)) if G is not None else math.nan), None
        D = (W - W_before).to(torch.float32)
        if D.device.type == "cpu" and D.ndim == 2:
            return self._update_metrics_cpu(name, D, G, exact)
        return self._update_metrics_torch(name, D, G, exact)

    def _update_metrics_torch(self, name, D: torch.Tensor, G: torch.Tensor | None, exact: bool):
        """``_update_metrics`` in torch (any device; used on GPU and for stacks)."""
        if exact:  # fp32 suffices: only σ₁ is wanted, to ≈ 1e-7 relative
            try:
                upd = gram_eigenvalues(D, torch.float32)[..., -1].max().clamp(min=0).sqrt()
            except torch.linalg.LinAlgError:  # a NaN or ∞ in ΔW
                upd = torch.tensor(math.nan, device=D.device)
        elif D.ndim == 2:
            upd = self._update_power(name, D)
        else:
            upd = self._power(name, "update", D, smallest=False).max().float()
        # ‖ΔW‖_F², ⟨ΔW, G⟩ and ‖G‖_F² as the 2×2 Gram matrix of the two flattened tensors
        rows = torch.stack([D.reshape(-1), G.reshape(-1) if G is not None else torch.zeros_like(D).reshape(-1)])
        return (None if G is not None else math.nan), torch.cat([upd.reshape(1), (rows @ rows.mT).reshape(-1)])

    def _update_metrics_cpu(self, name, D: torch.Tensor, G: torch.Tensor | None, exact: bool):
        """``_update_metrics`` of a CPU matrix through ``small_linalg``: the scalars as floats."""
        d = D.numpy()
        if exact:
            upd = small_linalg.largest_singular_value(d)
        else:
            upd, v = small_linalg.spectral_norm(d, *self._start_np(name, "update", d.shape[1], 2, 30, np.float32))
            self._keep(name, "update", v, upd)
        d = d.reshape(-1)
        g = G.numpy().reshape(-1) if G is not None else np.zeros_like(d)
        inner = float(d @ g)
        return (None if G is not None else math.nan), [upd, float(d @ d), inner, inner, float(g @ g)]

    @staticmethod
    def _store_update_metrics(track, grad_norm, update) -> None:
        upd_norm = align = math.nan
        if update is not None:
            upd_norm, d_sq, inner, _, g_sq = update
            d_norm = math.sqrt(max(d_sq, 0.0))
            if grad_norm is None:
                grad_norm = math.sqrt(max(g_sq, 0.0))
                if d_norm > 0 and grad_norm > 0:
                    align = -inner / (d_norm * grad_norm)
        track.values["update_norm"].append(upd_norm)
        track.values["update_alignment"].append(align)
        track.values["grad_norm"].append(grad_norm)

    # ----------------------------------------------------------------------------- output
    def save(self, path, name: str = "run"):
        """Save this run alone to ``path`` (``load_tracking(path)[name]`` reads it back)."""
        return save_tracking(path, {name: self.tracking})
