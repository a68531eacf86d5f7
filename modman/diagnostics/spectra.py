"""Per-weight spectral statistics: which parameters are matrices, and what to measure on them.

A weight is viewed as the matrix (or batch of matrices) the optimizers step on:
Linear weights as (d_out, d_in); Conv weights flattened to (out, in·k…), a grouped convolution's
as its G blocks (G, out/G, in/G·k…), batched; 3-D parameters of other
modules (expert stacks) as a batch over dim 0; bare tensors given by name follow the optimizer's
shape rule (≥ 4-D flattened, 3-D a stack) unless an optimizer is given as the manifolds, whose own
view (its group's ``flatten``) then wins. For each matrix W with singular values σ₁ ≥ … ≥ σ_r:

    condition number  κ = σ₁/σ_r                       (∞ when σ_r = 0)
    stable rank       ‖W‖_F²/σ₁² = Σσᵢ²/σ₁²            (between 1 and rank W)
    distance to Stiefel(s)   max_i |σᵢ/s − 1|           (0 on the manifold; Stiefel.distance)
    distance to Sphere(r)    max over nonzero rows |‖w‖/r − 1|  (an all-zero row is an
                             embedding's padding row, which the optimizer leaves at zero)

Small matrices (min(m, n) ≤ ``exact_max_dim``) get exact singular values (from the fp64 Gram's
eigenvalues, see ``singular_values``); larger ones the Golub–Kahan–Lanczos estimates of
``estimators.py``, whose one-sided errors make σ_max, κ and the distance lower bounds and σ_min, the stable rank upper bounds
(``exact`` says which). The estimates stop at a relative residual of 1e-3, so a distance to the
manifold far below that reads low (1024×512 and 1024² weights 1e-4 off read 5e-6 when the cap
was 256): pass ``exact=True`` to see drift on a larger weight. A stack reports its worst matrix: min σ_min, max σ_max, max κ, max distance,
mean stable rank.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from .._warn import warn
from ..linalg.blocked import power_of_two_floor
from ..manifolds import Euclidean, Sphere, Stiefel, get_manifold
from ..optim.functional import as_matrix
from ..optim.roles import matrix_view, named_modules
from .estimators import lanczos_svals

EXACT_MAX_DIM = 1024  # an fp64 Gram eigvalsh: 0.12 s at 1024² on one EPYC core
STAT_KEYS = ("sigma_min", "sigma_max", "condition", "stable_rank", "distance")


def named_matrices(model_or_named_params) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, parameter, matrix view)] for every parameter with ≥ 2 dimensions.

    Accepts an nn.Module, a mapping name → tensor, or an iterable of (name, tensor) pairs.
    A module's Conv weights are flattened (a grouped one into its batched blocks) and transformers'
    Conv1D weights (stored (in, out)) seen
    transposed; tied parameters appear once, under their first name; names are the optimizers'
    (through ``torch.compile`` and DataParallel/DDP wrappers: "0.weight", not "_orig_mod.0.weight");
    integer parameters are left out, complex ones with a warning, and empty ones (a Linear(0, n):
    no spectrum). A lazy module's parameters before its first forward are refused (ValueError: they
    have no shape yet, and a tracker built then would never track the layer). The tensors a
    parametrization stores (``torch.nn.utils.parametrize``: weight_norm's original0/original1) are
    measured as stored, as bare tensors, with a warning naming them: they are not the weight the
    layer applies, which is computed at each forward and not a parameter.
    """
    out: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    if isinstance(model_or_named_params, nn.Module):
        named, seen = [], set()  # (name, owner, attribute, parameter), each parameter once
        for prefix, module in named_modules(model_or_named_params):
            for attr, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    named.append((f"{prefix}.{attr}" if prefix else attr, module, attr, p))
        _check_initialised((name, p) for name, _, _, p in named)
        parametrized = []
        for name, module, attr, p in named:
            if p.ndim >= 2 and _real_weight(name, p):
                out.append((name, p, as_matrix(p.detach(), matrix_view(module, attr, p))))  # as the optimizer sees it
                if isinstance(module, parametrize.ParametrizationList):
                    parametrized.append(name)
        _warn_parametrized(parametrized)
        return out
    if isinstance(model_or_named_params, torch.Tensor):
        raise TypeError("expected a module, a mapping name → tensor or (name, tensor) pairs; got a bare tensor")
    items = model_or_named_params.items() if isinstance(model_or_named_params, Mapping) else model_or_named_params
    try:
        items = list(items)
    except TypeError as err:
        raise TypeError(f"expected a module, a mapping or (name, tensor) pairs, got "
                        f"{type(model_or_named_params).__name__}") from err
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, tensor) pairs, got {item!r:.80}")
    _check_initialised(items)
    for name, p in items:
        if p.ndim >= 2 and _real_weight(name, p):
            out.append((name, p, as_matrix(p.detach(), None)))
    return out


def _listed(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_initialised(named) -> None:
    """Refuse a lazy module's parameters (``UninitializedParameter``, before the first forward),
    naming them: they have ndim 1 until then, so they were left out silently (a probe: a tracker
    built before the forward never tracked the LazyLinear)."""
    lazy = [name for name, p in named if is_lazy(p)]
    if lazy:
        raise ValueError(f"parameters of a lazy module are not initialised yet ({_listed(lazy)}): run one forward "
                         "pass before measuring them")


def _warn_parametrized(names: list[str]) -> None:
    """One warning for the tensors of parametrizations among the matrices measured (a probe:
    weight_norm's v, 5×4×3 of a Conv1d, read as five 4×3 matrices and its g as five 1×1 ones,
    silently). The applied weight is computed by the parametrization, not read: computing it here
    would run the parametrization (spectral_norm's power iteration updates its buffers)."""
    if not names:
        return
    # <owner>.parametrizations.<tensor>.original… applies as <owner>.<tensor>
    owners = list(dict.fromkeys((".".join(n.split(".")[:-3]), n.split(".")[-2]) for n in names))
    applied = [f"{owner}.{tensor}" if owner else tensor for owner, tensor in owners]
    owner, tensor = owners[0]
    example = f"model.get_submodule('{owner}').{tensor}" if owner else f"model.{tensor}"
    warn(f"{_listed(names)}: tensors a parametrization (torch.nn.utils.parametrize) stores, measured as stored "
         f"(as bare tensors: a 3-D one as a stack of matrices), not the weight the layer applies "
         f"({_listed(applied)}); the optimizers step them in the AdamW fallback. To measure an applied weight, "
         f"pass it by name, e.g. spectrum_table({{'{applied[0]}': {example}.detach()}})")


def is_transposed_view(p: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether the matrix (or stack) W is pᵀ (transformers' Conv1D, stored (in, out), and expert
    stacks marked is_transposed, stored (E, in, out); seen (out, in)); told apart by strides, so a
    square one too. (A stack was read by reshape, scrambling it: σ 0.91–2.34 for 1.73, a review.)"""
    return p.ndim >= 2 and W.shape == p.mT.shape and W.stride() == p.mT.stride() and p.stride() != p.mT.stride()


def _real_weight(name: str, p: torch.Tensor) -> bool:
    """Whether p is a real floating weight: integer and bool parameters are counters and masks, not
    maps; a complex one is left out with a warning (its statistics came out of the real part's)."""
    if p.is_complex():
        warn(f"{name} is complex ({p.dtype}): left out of the diagnostics, which take real weights")
    _check_has_values(p, name)
    return p.is_floating_point() and p.numel() > 0


def _check_has_values(p: torch.Tensor, name: str) -> None:
    """A meta tensor has a shape and no values: say so, naming it (torch's own message, "Cannot
    copy out of meta tensor", came from deep inside a record)."""
    if p.is_meta:
        raise ValueError(f"{name} is on the meta device (it has no values to measure): materialise the model "
                         "first, e.g. model.to_empty(device='cpu') and then load its weights")


def resolve_manifolds(names: Iterable[str], manifolds, *, params: Iterable[torch.Tensor] | None = None
                      ) -> dict[str, object]:
    """name → manifold object for each name.

    ``manifolds``: None (unscaled Stiefel for every matrix: the reference the blog's claim is
    about), one manifold object or name for all, a mapping name → manifold object or name
    ("stiefel", "sphere", "euclidean"; names not in it get unscaled Stiefel), or a modman
    optimizer (each parameter's group manifold; its AdamW fallback and Muon's spectral steps
    count as Euclidean, and so do parameters it does not hold, e.g. frozen ones, which it
    leaves out by design). ``params`` (the tensors, aligned with ``names``) lets an optimizer's
    parameters be found by identity first, then by name.
    """
    names = list(names)
    if manifolds is None:
        return {n: Stiefel() for n in names}
    if isinstance(manifolds, (Stiefel, Sphere, Euclidean)):
        return {n: manifolds for n in names}
    if isinstance(manifolds, str):
        return {n: get_manifold(manifolds) for n in names}
    if isinstance(manifolds, torch.optim.Optimizer):
        views = optimizer_views(names, manifolds, params)
        return {n: views[n][0] if n in views else Euclidean() for n in names}
    if isinstance(manifolds, Mapping):
        unknown = sorted(set(manifolds) - set(names))
        if unknown:
            raise ValueError(f"manifolds names parameters that are not matrices here: {unknown}")
        out = {}
        for n in names:
            m = manifolds.get(n, Stiefel())
            out[n] = get_manifold(m) if isinstance(m, str) else m
            if not isinstance(out[n], (Stiefel, Sphere, Euclidean)):
                raise TypeError(f"manifold for {n!r} must be a modman manifold or its name, got {type(m).__name__}")
        return out
    raise TypeError("manifolds must be None, a manifold, a manifold name, a mapping name → manifold or a "
                    f"modman optimizer; got {type(manifolds).__name__}")


def optimizer_views(names, optimizer, params=None) -> dict[str, tuple[object, bool | None, bool]]:
    """name → (manifold, flatten, constrained) for each of ``names`` that ``optimizer`` holds.

    A parameter is matched by identity (``params`` aligned with ``names``), else by its name in the
    optimizer's groups when the shapes agree too (a detached copy of a held weight). ``flatten`` is
    the group's key for ``functional.as_matrix`` (the matrix view the optimizer steps on);
    ``constrained`` is False for the AdamW fallback, which views nothing as a matrix. Names the
    optimizer does not hold (frozen parameters) are absent. Raises ValueError when it holds none
    of them although some are trainable: then it was built for another model, and reporting every
    weight as Euclidean would hide that.
    """
    names = list(names)
    params = [None] * len(names) if params is None else list(params)
    by_id, by_name = {}, {}
    for group in optimizer.param_groups:
        pnames = group.get("param_names")
        if not pnames:
            raise ValueError("manifolds=optimizer needs an optimizer built with named parameters "
                             "(modman optimizers given model.modules())")
        algorithm = group.get("algorithm")
        kind = "euclidean" if algorithm in ("adamw", "muon") else group.get("manifold", "euclidean")
        if kind == "stiefel":
            m = Stiefel(group.get("scale"))
        elif kind == "sphere":
            m = Sphere(1.0 if group.get("radius") is None else group["radius"])
        else:
            m = Euclidean()
        entry = (m, group.get("flatten"), algorithm != "adamw")
        for n, p in zip(pnames, group["params"]):
            by_id[id(p)] = entry
            by_name[n] = (entry, p.shape)
    out = {}
    for n, p in zip(names, params):
        if id(p) in by_id:
            out[n] = by_id[id(p)]
        elif n in by_name and (p is None or by_name[n][1] == p.shape):
            out[n] = by_name[n][0]
    if not out and any(p is None or p.requires_grad for p in params):
        raise ValueError(f"the optimizer holds none of these matrices: {names}; was it built for this model?")
    return out


def matrices_and_manifolds(model_or_named_params, manifolds) -> tuple[list, dict[str, object]]:
    """``named_matrices`` and ``resolve_manifolds`` together. With an optimizer, each matrix it
    steps on is viewed as the optimizer views it (a Conv1d weight given as a bare 3-D tensor is
    then one flattened matrix, not a stack), so that its distance is the optimizer's."""
    mats = named_matrices(model_or_named_params)
    names, params = [n for n, _, _ in mats], [p for _, p, _ in mats]
    if not isinstance(manifolds, torch.optim.Optimizer):
        return mats, resolve_manifolds(names, manifolds)
    views = optimizer_views(names, manifolds, params)
    mats = [(n, p, as_matrix(p.detach(), views[n][1]) if n in views and views[n][2] else W)
            for n, p, W in mats]
    return mats, {n: views[n][0] if n in views else Euclidean() for n in names}


def manifold_label(m) -> str:
    """Short name: stiefel, stiefel(rms), stiefel(2), sphere, sphere(r=2), euclidean."""
    name = getattr(m, "name", type(m).__name__.lower())
    if name == "stiefel" and m.scale is not None:
        return f"stiefel({m.scale if m.scale == 'rms' else f'{m.scale:g}'})"
    if name == "sphere" and m.radius != 1.0:
        return f"sphere(r={m.radius:g})"
    return name


@torch.no_grad()
def singular_values(W: torch.Tensor, dtype: torch.dtype = torch.float64, *, precise: bool | None = None) -> torch.Tensor:
    """Singular values (descending) of a matrix or batch, as √eigenvalues of the small Gram.

    In fp64 the eigenvalues σᵢ² carry an absolute error ≈ 1e-16·σ₁², so each σᵢ is accurate to
    ≈ 1e-8·σ₁ (far below fp32 weight precision) at about two thirds of the cost of svdvals. An fp64
    weight carries more than that: it gets svdvals itself (σᵢ to ≈ 1e-16·σ₁; through the Gram a
    κ = 1e10 read as ∞ and κ = 1e8 8 % off, a probe); ``precise`` (default: whether W is fp64)
    chooses svdvals for an fp64 copy of a narrower weight. The Gram is that of W scaled by a power of
    two near max|W|, so a narrower ``dtype`` neither overflows nor flushes to 0 on a finite W. NaN
    for a matrix with a NaN or an infinity.
    """
    if W.ndim < 2:  # (a vector raised IndexError from inside the Gram's orientation check)
        raise ValueError(f"singular_values needs a matrix (or stack of them), got shape {tuple(W.shape)}")
    if (W.dtype == torch.float64 if precise is None else precise) and dtype == torch.float64:
        X = W.detach()
        finite = torch.isfinite(X).all(dim=(-2, -1), keepdim=True)
        s = torch.linalg.svdvals(torch.where(finite, X, torch.zeros_like(X)))
        return torch.where(finite[..., 0], s, torch.full_like(s, math.nan))
    # the Gram of W/c, c a power of two near max|W|: an fp32 Gram of a finite W itself overflowed
    # at 1e20 (NaN) and flushed to 0 at 1e-25 (a probe); scaled back in fp64, then cast
    Wc, c = _unit_scaled(W)
    s = gram_eigenvalues(Wc, dtype).flip(-1).clamp(min=0).sqrt()
    return (s.double() * c[..., 0]).to(s.dtype)


@torch.no_grad()
def gram_eigenvalues(W: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues σᵢ² (ascending, unclamped) of the smaller Gram matrix of W, in ``dtype``; all NaN
    for a matrix with a NaN or an infinity (LAPACK failed to converge on it, naming no parameter),
    as the tracker records such a weight."""
    X = W.detach().to(dtype)
    gram = X.mT @ X if X.shape[-2] >= X.shape[-1] else X @ X.mT
    finite = torch.isfinite(gram).all(dim=(-2, -1), keepdim=True)
    ev = torch.linalg.eigvalsh(torch.where(finite, gram, torch.zeros_like(gram)))
    return torch.where(finite[..., 0], ev, torch.full_like(ev, math.nan))


def stats_from_extremes(W: torch.Tensor, s_max: torch.Tensor, s_min: torch.Tensor, fro_sq: torch.Tensor,
                        manifold, unit: torch.Tensor | None = None) -> dict:
    """{sigma_min, sigma_max, condition, stable_rank, distance} as floats from per-matrix σ_max,
    σ_min and ‖W‖_F² (tensors shaped like W's batch) of W/unit (per matrix, default 1); a stack
    reports its worst matrix."""
    ts = [s_max, s_min, fro_sq] + ([] if unit is None else [unit])
    rows = torch.stack([t.detach().double().reshape(-1).expand(s_max.numel()) for t in ts]).tolist()
    return stats_from_floats(W, *rows[:3], manifold, unit=rows[3] if unit is not None else None)


def stats_from_floats(W: torch.Tensor, s_max: list, s_min: list, fro_sq: list, manifold,
                      unit: list | None = None) -> dict:
    """``stats_from_extremes`` on Python floats (one entry per matrix of W's batch); σ's in units
    of ``unit`` (a float per matrix, default 1), which condition and stable rank do not see.

    A tracker computes these for every weight at every record, where a dozen tiny tensor ops
    would cost more than the statistics."""
    if any(math.isnan(v) for v in (*s_max, *s_min, *fro_sq)):  # a NaN or ∞ in any matrix of W
        return dict.fromkeys(("sigma_min", "sigma_max", "condition", "stable_rank", "distance"), math.nan)
    unit = [1.0] * len(s_max) if unit is None else unit
    scale = manifold.scale_for(W.shape) if isinstance(manifold, Stiefel) else None
    cond, stable, dist = [], [], []
    for hi, lo, fro, u in zip(s_max, s_min, fro_sq, unit):
        cond.append(hi / lo if lo > 0 else math.inf)
        stable.append(fro / hi**2 if hi > 0 else 0.0)
        if scale is not None:
            dist.append(max(abs(hi * u / scale - 1), abs(lo * u / scale - 1)))
    if isinstance(manifold, Euclidean):
        dist = [0.0]
    elif isinstance(manifold, Sphere):
        # fp64 row norms, as the singular values are; an all-zero row is an embedding's padding row,
        # zero by design (the optimizer skips it too)
        dist = manifold.distance(W.detach().double(), skip_zero_rows=True).reshape(-1).tolist()
    return {
        "sigma_min": min(lo * u for lo, u in zip(s_min, unit)),
        "sigma_max": max(hi * u for hi, u in zip(s_max, unit)),
        "condition": max(cond),
        "stable_rank": sum(stable) / len(stable),
        "distance": max(dist),
    }


@torch.no_grad()
def matrix_stats(W: torch.Tensor, manifold=None, *, exact: bool | None = None,
                 exact_max_dim: int = EXACT_MAX_DIM, spectrum: bool = False) -> dict:
    """Spectral statistics of a matrix view W (see the module docstring).

    Returns floats {sigma_min, sigma_max, condition, stable_rank, distance} plus ``exact``
    (bool) and, with ``spectrum=True`` and exact values, ``spectrum`` (fp32 tensor, (…, r)).
    ``distance`` is to ``manifold`` (default unscaled Stiefel); for Euclidean it is 0.
    """
    _check_matrix(W, "matrix_stats")
    W = W if W.is_floating_point() else W.double()  # an integer or bool matrix: the numbers it holds
    manifold = _resolve_one(manifold)
    if exact is None:
        exact = min(W.shape[-2:]) <= exact_max_dim
    # exact statistics are measured on W/c, c a power of two near max|W| (exact): an fp64 W near
    # 1e±160 overflowed σ² (an OverflowError) or flushed it to 0 (a ZeroDivisionError)
    c = None
    if exact:
        Wc, c = _unit_scaled(W)
        s = singular_values(Wc, precise=W.dtype == torch.float64)
        s_max, s_min = s[..., 0], s[..., -1]
        fro_sq = (s**2).sum(-1)
    elif not bool(torch.isfinite(W).all()):  # NaN statistics, as the exact path and the tracker give
        s_max = s_min = fro_sq = torch.full(W.shape[:-2], math.nan, dtype=torch.float64)
    else:  # (Lanczos scales W itself)
        est = lanczos_svals(W)
        s_max, s_min, fro_sq = est.sigma_max, est.sigma_min, est.frobenius_sq
    out = stats_from_extremes(W, s_max, s_min, fro_sq, manifold, unit=c)
    out["exact"] = bool(exact)
    if spectrum and exact:
        out["spectrum"] = (s * c.reshape(*c.shape[:-2], 1)).float()
    return out


def _check_matrix(W, caller: str) -> None:
    """A real floating, non-empty matrix or stack with values, else an error naming ``caller``'s W."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{caller}: W must be a tensor, got {type(W).__name__}")
    if W.is_complex():
        raise TypeError(f"{caller}: W must be a real tensor, got {W.dtype}")
    if W.ndim < 2 or W.numel() == 0:
        raise ValueError(f"{caller} needs a non-empty matrix (or stack of them), got shape {tuple(W.shape)}")
    _check_has_values(W, f"{caller}: W")


def _resolve_one(manifold):
    """``matrix_stats``'s manifold: None (unscaled Stiefel), a manifold object or its name."""
    if manifold is None:
        return Stiefel()
    if isinstance(manifold, str):
        return get_manifold(manifold)
    if not isinstance(manifold, (Stiefel, Sphere, Euclidean)):
        raise TypeError("manifold must be None, a modman manifold (e.g. Stiefel('rms')) or its name "
                        f"('stiefel', 'sphere', 'euclidean'), got {manifold!r:.60}")
    return manifold


def _unit_scaled(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W/c in fp64, c) with c the power of two at most max|W| < 2c per matrix, fp64, shaped
    (…, 1, 1) (1 for a zero or non-finite matrix): W/c is exact (fp64 holds every value of any
    narrower dtype so scaled), its spectrum c⁻¹ times W's, every σ² representable."""
    c = power_of_two_floor(W.detach().abs().amax(dim=(-2, -1), keepdim=True).double())
    return W.detach().double() / c, c


@torch.no_grad()
def spectral_norm(W: torch.Tensor, *, exact_max_dim: int = EXACT_MAX_DIM) -> float:
    """‖W‖₂ (largest over a stack): for small matrices σ₁ of an SVD, to ≈ 1e-16 relative for an
    fp64 W and ≈ 1e-7 (the fp32 Gram's) for narrower ones; Lanczos (a lower bound) for large;
    NaN for a matrix with a NaN or an infinity."""
    _check_matrix(W, "spectral_norm")
    W = W if W.is_floating_point() else W.double()  # an integer or bool matrix: the numbers it holds
    if min(W.shape[-2:]) <= exact_max_dim:
        # fp32 suffices for a narrower W (within its own precision); an fp64 one read 1.7e-7 off in fp32
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        Wc, c = _unit_scaled(W)  # (an fp32 Gram of W itself overflowed at 1e20, flushed to 0 at 1e-25)
        return float((singular_values(Wc, dtype)[..., 0].double() * c[..., 0, 0]).max())
    if not bool(torch.isfinite(W).all()):  # NaN, as the exact path gives (lanczos_svals raised, a probe)
        return math.nan
    return float(lanczos_svals(W).sigma_max.max())
