"""ManifoldMuon's ``budget=``: one lr_scale for every constrained weight, or a clear refusal.

A budget maps parameter names (as ``describe()`` prints them: the eager model's, without
torch.compile's ``_orig_mod.`` or DDP's ``module.``) to lr_scales. Every weight the optimizer
constrains must get one, and only those: a name that matches nothing, or a weight left out,
would otherwise step at lr × 1 without a word (a probe's budget keyed by the compiled model's
names set every weight to 1; a custom modular description that forgot a GPT-2 Conv1D weight left
it at 1 among layers at 0.35). A fallback parameter (bias, norm gain) takes the AdamW fallback's
lr, which ignores lr_scale, so naming one is refused too — except a weight roles= moved to the
fallback, which a budget computed for the whole model names (ignored, as "modular" ignores it).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .._checks import is_finite_real
from .._warn import warn

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's, DDP/DataParallel's


def resolve_budget(budget, network, assignments, constrained_roles, *, scale, owner: str) -> dict:
    """{parameter name: lr_scale} for every weight of ``assignments`` (``roles.assign_modules``)
    whose role is in ``constrained_roles`` ({} for a uniform budget).

    ``network``: the expanded modules (``roles.expand_modules``); ``scale``: the optimizer's
    Stiefel scale; ``owner``: its class name, for messages.
    """
    if budget in (None, "uniform"):
        return {}
    constrained = [a.name for a in assignments if a.role in constrained_roles]
    if isinstance(budget, Mapping):
        return _checked(budget, constrained, network, assignments, "budget")
    if callable(budget):  # several separate modules: the ModuleList of them, named as the optimizer names them
        scales = budget(network.root)
        what = f"budget={getattr(budget, '__name__', type(budget).__name__)}(model)"
        if not isinstance(scales, Mapping):
            raise TypeError(f"{what} returned {type(scales).__name__}, not a dict {{parameter name: lr_scale}}")
        return _checked(scales, constrained, network, assignments, what)
    if budget in ("modular", "auto"):
        return _modular(budget, network, constrained, scale, owner)
    raise ValueError(f"budget must be 'auto', 'uniform', 'modular', a dict or a callable, got {budget!r}")


def _checked(scales: Mapping, constrained: list[str], network, assignments, what: str) -> dict:
    """``scales`` as {name: float}, refused by name where it misses a constrained weight or names
    anything else — except a weight roles= moved to the fallback, which a budget computed for the
    whole model (``modman.modular.budget``) names and "modular" would ignore too."""
    wanted = set(constrained)
    moved = {a.name for a in assignments if a.asked and a.name not in wanted}
    names = {str(k): v for k, v in scales.items() if str(k) not in moved}
    unknown = [n for n in names if n not in wanted]
    if unknown:
        raise ValueError(f"{what} names {_why_not(unknown, wanted, network, assignments)}; the weights it "
                         f"budgets are {_names(constrained)}")
    missing = [n for n in constrained if n not in names]
    if missing:
        raise ValueError(f"{what} gives no lr_scale for {_names(missing)}: every constrained weight needs one "
                         "(1.0 steps lr, 0 holds it), else it would step lr × 1 outside the budget")
    out = {}
    for n, v in names.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not (v.dtype.is_complex or v.dtype == torch.bool):
            v = v.item()  # a 0-d tensor from a computed budget
        if not (is_finite_real(v) and v >= 0):
            raise ValueError(f"{what}[{n!r}] must be a finite number ≥ 0 (an lr_scale), got {v!r}")
        out[n] = float(v)
    return out


def _why_not(unknown: list[str], wanted: set, network, assignments) -> str:
    """What the names in ``unknown`` are, for the refusal: passengers, tied aliases, frozen
    weights, wrapper-prefixed names, or nothing at all."""
    canonical = {id(a.param): a.name for a in assignments}
    params = dict(network.root.named_parameters(remove_duplicate=False))  # tied aliases too
    reasons = []
    for n in unknown:
        bare = n
        while bare.startswith(_WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        p = params.get(n)
        if bare != n and bare in wanted:
            reasons.append(f"{n!r} (names are the eager model's, as describe() prints them: drop torch.compile's "
                           "'_orig_mod.' and DDP's 'module.')")
        elif p is not None and not p.requires_grad:
            reasons.append(f"{n!r}, which is frozen (requires_grad=False; the optimizer skips it)")
        elif p is not None and canonical.get(id(p), n) != n:
            reasons.append(f"{n!r}, the same tensor as {canonical[id(p)]!r} (tied: name that)")
        elif p is not None:
            reasons.append(f"{n!r}, which the AdamW fallback trains with its own lr (lr_scale applies to "
                           "constrained weights only)")
        else:
            reasons.append(f"{n!r}, which is no parameter of the model")
    shown = "; ".join(reasons[:8]) + (f"; … ({len(reasons)} in all)" if len(reasons) > 8 else "")
    return f"parameters it cannot budget: {shown}"


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return f"[{shown}{f', … ({len(names)} in all)' if len(names) > most else ''}]"


def _modular(budget: str, network, constrained: list[str], scale, owner: str) -> dict:
    """``modman.modular.budget`` of the model, refused ("modular") or replaced by a uniform budget
    with a warning ("auto") where the model has none or a useless one."""
    from ..modular import ModularError
    from ..modular.budget import FROZEN_SCALE, checked_budget

    meta = next((n for n, p in network.root.named_parameters() if p.is_meta), None)
    if meta is not None:  # (torch: "Tensor.item() cannot be called on meta tensors")
        raise ValueError(f"budget={budget!r} reads the weights (a bias's norm bounds the next layer's "
                         f"input), but {meta} is on the meta device (no values yet): build the optimizer "
                         "once the weights are materialised (after model.to_empty(...) and their initialisation "
                         "or loading: to_empty replaces the parameters, and an optimizer built before it keeps "
                         "stepping the old meta tensors, which never get a gradient)")
    try:
        if not network.single:
            raise ModularError(f"the {len(network.root)} modules given are separate, not one model; "
                               "pass model.modules() or the model itself")
        if scale not in (None, "rms"):
            raise ModularError(f"modman.modular knows scale None and 'rms', not {scale!r}")
        if budget == "auto" and any(part in ("lora_A", "lora_B") for n, _ in network.root.named_parameters()
                                    for part in n.split(".")):
            # the worst-case rules count the adapter's multiplier α/r as a sensitivity: lr_scales of
            # 2e-8…4e-3 on TinyCausalLM with r = 8 (layer 0's adapters never trained), growing as r²,
            # against the rank-independent LoRA lr the blog measures (modman.lora.lora_lr)
            raise ModularError("its LoRA adapters have no meaningful modular budget (the rules count "
                               "their α/r multiplier as a sensitivity)")
        scales, problem, spread = checked_budget(network.root, scale=scale)
        outside = [n for n in constrained if n not in scales]
        if outside:
            # a weight a declaration or custom description leaves out (one of a layer from_torch has no
            # rule for, e.g. a bare parameter given a role): the optimizer would step it lr × 1
            raise ModularError(f"its modular description gives no lr_scale for the constrained weights "
                               f"{_names(outside)} (a declaration or custom description leaves them out); "
                               "place them in it, freeze them (requires_grad_(False)), or pass a budget dict")
        if spread and budget == "auto":
            # the worst-case rules compound through residual blocks: TinyCausalLM's layers.0 of 6
            # got 1.9e-7 (2.5e-8 with scale="rms"), in effect frozen, under the default; a 4-block
            # residual CNN got 3.4e-7…3.8e-7 for every weight (a user probe: 20 steps moved none)
            moving = {k: v for k, v in scales.items() if v > 0}  # (a weight of mass 0 has lr_scale 0)
            lo, hi = min(moving, key=moving.get), max(moving, key=moving.get)
            what = (f"span {scales[hi] / scales[lo]:.3g}×" if problem == "spread"
                    else f"all lie below {FROZEN_SCALE:g}, compounded through the composition")
            raise ModularError(f"its lr_scales would {what}, from {scales[lo]:.2g} "
                               f"for {lo!r} to {scales[hi]:.2g} for {hi!r}: the worst-case rules compound "
                               "through residual blocks and would in effect freeze the smallest; "
                               "budget='modular' uses it anyway")
        if spread:
            warn(spread)
        return scales
    except ModularError as err:
        if budget == "modular":
            raise
        warn(f"{owner}: no modular budget for this model ({err}); every constrained "
             "weight steps lr (budget='uniform'). Pass budget='uniform' to silence this.")
        return {}
