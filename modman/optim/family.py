"""modman's optimizer family: the blog's table of (manifold, norm) pairs, one code path.

    manifold   norm       optimizer
    Euclidean  spectral   Muon
    Sphere     ℓ2         hyperspherical descent
    Stiefel    spectral   manifold Muon
"""
from __future__ import annotations

import math

from .._checks import is_real
from .._cpu import native_bf16
from .._warn import warn
from .base import ManifoldOptimizer


class ManifoldMuon(ManifoldOptimizer):
    r"""Manifold Muon: steepest descent on the Stiefel manifold under the spectral norm.

    For each constrained weight W (every singular value s; see ``modman.manifolds.Stiefel``)
    with gradient g, momentum μ and step η = lr·lr_scale:

    .. math::
        B &\leftarrow \mu B + (1-\mu)g,\qquad u = (1-\mu)g + \mu B \ \text{(Nesterov)} \\
        A &= \arg\max\{\langle u, A\rangle : \|A\|_2 \le 1,\ U^\top A + A^\top U = 0\},\ U = W/s \\
        W &\leftarrow s\cdot\operatorname{polar}(U - \eta A)

    A comes from ``modman.solvers.solve_manifold_muon`` (warm-started from the last step's dual)
    with a certified duality gap; the polar factor is the closed form
    (U − ηA)(I + η²AᵀA)^{-1/2}, exact for a tangent partial isometry, with a measured drift
    check and an SVD-free polish when ‖UᵀU − I‖₂ exceeds 2·on_manifold_tol.

    η is the length of the step in W's own norm: the spectral norm for ``scale=None`` (the
    blog's setting), the RMS→RMS operator norm (‖ΔW‖₂/s) for ``scale="rms"``.
    The direction is invariant to the scale of u: gradient clipping or loss scaling do not
    change a constrained step, only how momentum mixes gradients of different magnitudes.

    Args:
        params: ``model.modules()``, the model itself or any modules (each expanded to its
            submodules; roles assigned per layer: Linear/Conv weights → Stiefel, Embedding rows →
            spheres, 3-D stacks → batched Stiefel, the rest → AdamW fallback; frozen parameters
            left out — add them with ``add_param_group`` once unfrozen; see ``roles.py`` for
            names), or tensors / dicts / (name, tensor) pairs as for any torch optimizer.
            A ``torch.compile``-d model is optimised as the eager one (same names and budget).
        lr: step length η (default 0.1: the blog's CIFAR-10 setting, decayed linearly).
        momentum, nesterov: as in torch.optim.Muon; schedulers with ``cycle_momentum``
            (OneCycleLR, CyclicLR) cycle ``momentum`` in every group, as for torch.optim.Muon;
            the fallback group's ``betas`` stay as given.
        weight_decay: applies to the fallback group and to weights given the "euclidean" role
            (Muon's step); a Stiefel or sphere weight has a fixed norm: its group shows 0.
        solver, tol, max_iters: the subproblem solver (see ``modman.solvers.SOLVERS``).
        scale: None (unscaled Stiefel) or "rms" (s = √(d_out/d_in)), or a float.
        budget: "auto" (default: "modular" when given modules — falling back to "uniform" with a
            warning when ``modman.modular`` cannot describe the model, or when its lr_scales would
            span more than 1e3× or all lie below 1e-3 (``modular.budget.SPREAD_WARNING``,
            ``FROZEN_SCALE``: the worst-case rules compound through residual blocks, and a deep
            transformer's first layers got ~2e-7, a 4-block residual CNN ~4e-7 for every weight,
            in effect frozen) — and "uniform" for tensors), "uniform" (lr_scale 1: every constrained weight steps lr), "modular"
            (lr_scale from ``modman.modular.budget(model, scale=scale)``: lr is the step of the
            whole network in the modular norm: lr/L per layer of an L-layer MLP with scale="rms",
            (lr/L)·√(d_out/d_in) of the network with scale=None), a dict
            {parameter name: lr_scale} or a callable model → dict, naming every constrained weight
            and only those, as ``describe()`` names them (``optim/budgets.py``). Separate modules (e.g.
            ``[model.body, model.head]``) are not one model: "auto" then warns and steps
            uniformly, "modular" refuses, and a callable gets an ``nn.ModuleList`` of them.
            A float scale has no modular budget either ("auto" warns, "modular" refuses).
        project_on_init: move constrained weights onto their manifold (exact polar factor) at
            construction, listing the moved weights in one warning. Pass False to keep weights as
            loaded until they are stepped: a Stiefel weight's first step lands it on the manifold
            (an exact projection after the retraction when it is far off), so expect one larger
            move then; an embedding's rows join their spheres one by one (each stepping lr from its
            nearest point on the sphere), as their tokens first
            get a gradient (rows without one stay as loaded). Projecting a trained model changes
            its function (a briefly AdamW-trained Llama's loss went 0.33 → 1.72, a probe):
            fine-tune with the weights' own geometry in mind.
        on_manifold_tol: weights within this distance (max|σ/s − 1|) count as on the manifold.
        nonfinite: "raise" (a FloatingPointError naming the parameters, nothing changed) or
            "skip" (the step is skipped and ``last_step_skipped`` set).
        fallback: AdamW hyperparameters for the fallback group: lr, betas, eps, weight_decay
            (defaults 1e-3, (0.9, 0.95), 1e-8, 0.0).
        roles: overrides {module instance | module class | parameter name: role}.
        distributed: under data parallelism (DDP), True (the default process group) or a
            ``torch.distributed`` ProcessGroup deals the constrained matrices out over the ranks:
            each rank solves its share and broadcasts the new weights and warm starts, so every
            rank ends the step with the same weights and state, bitwise those of one process
            (``optim/distributed.py``). Gradients must be identical on every rank (DDP's all-reduce).
        foreach: None or True (the default; as torch's optimizers' foreach, several tensors per
            call) steps the Stiefel matrices of at most 64 KiB that agree on shape, layout, dtype,
            device, solver and its settings as stacks of at most 1 MiB, one solve each, for the
            solvers in ``solvers.SEPARABLE_SOLVERS`` (``optim/batching.py``: whole steps 1.4–1.7×
            faster on MLPs of width 32–64, 1.02× at 128); each matrix is stepped as if alone. False steps
            one matrix at a time. A group's own ``foreach`` applies to its matrices; with
            ``distributed`` the dealt-out matrices are not stacked. It also routes the AdamW
            fallback: fp32/fp64 parameters through torch's foreach AdamW, one call per group
            (False: one ``functional.adamw_step`` each; the same arithmetic, bitwise on CPU).

    Precision: bf16/fp16 weights are stepped in fp32 and stored back; momentum, the dual and
    the solver run in fp32 (fp64 weights in fp64). A bf16 weight is on its manifold only to
    bf16 rounding (~2e-3: 1.2e-3 to 2.6e-3 measured from 64×32 to 512²), and a gradient whose
    tangent part is at most 2·eps of the stored dtype (an L2 penalty's, in bf16) gives no step. Under autocast the gradients arrive in the parameter dtype as usual;
    with GradScaler call ``scaler.unscale_(optimizer)`` or ``scaler.step`` — inf/NaN steps are
    skipped by the scaler before they reach ``step``.
    """

    ALGORITHMS = {
        "stiefel": ("stiefel", "manifold_muon"),
        "sphere": ("sphere", "hyperspherical"),
        "euclidean": ("euclidean", "muon"),
    }

    def __init__(self, params, lr=0.1, momentum=0.95, nesterov=True, weight_decay=0.0, solver=None, tol=None,
                 max_iters=None, scale=None, budget="auto", project_on_init=True, on_manifold_tol=1e-5,
                 nonfinite="raise", fallback=None, roles=None, distributed=False, foreach=None):
        from ..solvers import DEFAULT_SOLVER

        if is_real(scale):
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"Invalid scale: {scale} (must be None, 'rms' or a positive finite float)")
        elif scale is not None and scale != "rms":
            raise ValueError(f"Invalid scale: {scale!r} (must be None, 'rms' or a positive finite float)")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        solver=solver or DEFAULT_SOLVER, tol=tol, max_iters=max_iters, scale=scale,
                        radius=None, ns_schedule="polar_express", ns_steps=None, ns_dtype="float32",
                        adjust_lr_fn=None, torch_arithmetic=False, foreach=foreach)
        fb = dict(fallback or {})
        fb.setdefault("weight_decay", weight_decay)
        super().__init__(params, defaults, fallback=fb, roles=roles, budget=budget,
                         project_on_init=project_on_init, on_manifold_tol=on_manifold_tol, nonfinite=nonfinite,
                         distributed=distributed)


class Muon(ManifoldOptimizer):
    r"""Muon: steepest descent in Euclidean space under the spectral norm.

    .. math::
        B \leftarrow \mu B + (1-\mu)g,\quad u = (1-\mu)g + \mu B,\quad
        W \leftarrow (1 - \eta\lambda)W - \eta\sqrt{\max(1, d_{out}/d_{in})}\,\operatorname{msign}(u)

    With the defaults (Keller's quintic, 5 steps, bf16, ``torch_arithmetic=True``) the update is
    computed exactly as torch.optim.Muon computes it; set ``ns_schedule="polar_express"``,
    ``ns_dtype="float32"`` and ``ns_steps=None`` for an accurate polar factor. Given modules,
    Linear and Conv weights get Muon and everything else (embeddings included) the AdamW
    fallback, as the Muon authors recommend. ``weight_decay`` (λ above, decoupled as torch's)
    applies to the Muon matrices; the fallback takes ``fallback["weight_decay"]`` (default 0), and
    a param group's own ``weight_decay`` applies to both its parts. ``distributed``: as for
    ManifoldMuon (each rank computes the msign of its share of the matrices). ``foreach``: as for
    ManifoldMuon's AdamW fallback (the Muon matrices step one at a time either way).
    """

    ALGORITHMS = {"stiefel": ("euclidean", "muon"), "euclidean": ("euclidean", "muon"), "sphere": None}

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1, ns_schedule="keller",
                 ns_steps=5, ns_dtype="bfloat16", adjust_lr_fn=None, torch_arithmetic=True, nonfinite="raise",
                 fallback=None, roles=None, distributed=False, foreach=None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_schedule=ns_schedule, ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr_fn=adjust_lr_fn,
                        torch_arithmetic=torch_arithmetic, solver=None, tol=None, max_iters=None, scale=None,
                        radius=None, foreach=foreach)
        super().__init__(params, defaults, fallback=fallback, roles=roles, budget=None, project_on_init=False,
                         on_manifold_tol=1e-5, nonfinite=nonfinite, distributed=distributed)
        self._warn_if_emulated(self.param_groups)

    def _check_added(self, start: int) -> None:
        super()._check_added(start)
        self._warn_if_emulated(self.param_groups[start:])

    @staticmethod
    def _warn_if_emulated(groups) -> None:
        """bf16 Newton–Schulz (torch.optim.Muon's arithmetic, the default) on CPU weights of an x86
        CPU without native bf16 is emulated: torch.optim.Muon is silent about it, and a user's first
        steps took 12.7 s. (Unknown elsewhere — ARM, macOS: no warning.)"""
        if native_bf16() is False and any(g["algorithm"] == "muon" and g["ns_dtype"] == "bfloat16"
                                          and any(p.device.type == "cpu" for p in g["params"]) for g in groups):
            warn("modman.Muon: bf16 Newton–Schulz (the default: torch.optim.Muon's arithmetic) on a CPU "
                 "without native bf16 (no avx512_bf16/AMX) is emulated, ~25–50× slower than fp32; pass "
                 "ns_dtype='float32' unless you need torch.optim.Muon's exact arithmetic")


class HypersphericalDescent(ManifoldOptimizer):
    r"""Hyperspherical descent: steepest descent on spheres under the ℓ2 norm, row by row.

    Each row w (radius r) steps along a = P(u)/‖P(u)‖, P(u) = u − w(wᵀu)/r², then
    w ← r(w − ηa)/‖w − ηa‖. A row whose projected momentum is zero, or whose gradient is exactly
    zero this step (an embedding row of a token not in the batch), stays bitwise unchanged.
    Given modules, Linear/Conv/Embedding weights are constrained and the rest use AdamW;
    ``weight_decay`` applies to that AdamW fallback only (a row of fixed norm cannot decay).
    ``foreach``: as for ManifoldMuon's AdamW fallback.
    """

    ALGORITHMS = {"stiefel": ("sphere", "hyperspherical"), "sphere": ("sphere", "hyperspherical"),
                  "euclidean": None}

    def __init__(self, params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0, radius=1.0,
                 project_on_init=True, on_manifold_tol=1e-5, nonfinite="raise", fallback=None, roles=None,
                 foreach=None):
        from ..manifolds import Sphere

        radius = Sphere(radius).radius  # refuses a non-positive or non-finite radius here, not at step
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, radius=radius,
                        solver=None, tol=None, max_iters=None, scale=None, ns_schedule=None, ns_steps=None,
                        ns_dtype="float32", adjust_lr_fn=None, torch_arithmetic=False, foreach=foreach)
        fb = dict(fallback or {})
        fb.setdefault("weight_decay", weight_decay)
        super().__init__(params, defaults, fallback=fb, roles=roles, budget=None,
                         project_on_init=project_on_init, on_manifold_tol=on_manifold_tol, nonfinite=nonfinite)
