"""Learning-rate budgets from a module tree: {parameter name: lr_scale} and a printable table.

Steepest descent with step η under the modular norm ‖Δw‖ = maxᵢ cᵢ·ρᵢ·Nᵢ(Δwᵢ) moves atom i by
η/(cᵢρᵢ) in Nᵢ, i.e. by η/(cᵢρᵢkᵢ) in the optimizer's own norm of that weight (kᵢ = Nᵢ / own
norm: √(d_in/d_out) for an unscaled Stiefel weight, 1 under scale="rms", 1/√d for embedding rows).
So lr_scaleᵢ = 1/(cᵢρᵢkᵢ) (ρᵢ = 1 for atoms whose change does not scale with the input), and
ManifoldMuon(lr=η, budget=...) bounds the first-order RMS change of the output per step by η.
Biases and gains of mass 0 (passengers) are left out: the optimizer's fallback trains them. A
trainable Linear, Conv or Embedding weight given mass 0 is outside the norm too (any change to it
has norm ∞), so steepest descent under the norm leaves it where it is: lr_scale 0 (without one
ManifoldMuon would step it lr × 1).

Masses and depth. With the default masses (1 per weight) a composition of L weights gives each a
share μᵢ/μ = 1/L, and a plain bias-free ReLU MLP of L Stiefel layers gets lr_scale 1/L per layer
with scale="rms" ((1/L)·√(d_out/d_in) of the whole network with scale=None; biases, mass 0,
still bound the next layer's input and lower the later layers' shares) — the worst case: the L
changes can add up at the output. That is modula's plain MLP too, and it does
not transfer across depth: on MNIST-1D the best lr grows ∝ L, i.e. the best per-layer step is
the same at every depth (benchmarks/lr_transfer.py). Modula's depth recipe is for residual
networks: blocks x ↦ (1 − 1/L)·x + (1/L)·block(x) with the stack of blocks tared to a fixed mass
(``from_torch(model, tare={"blocks": 1.0})``, ``module.Tare``), which makes every coefficient
independent of L.

Spread. Every rule is a worst case, and in a residual network x ↦ x + f(x) each block multiplies
the sensitivity seen by everything before it by 1 + sens(f): TinyCausalLM's default budget
shrinks about 8× per layer toward the input (layers.0 of 6: 1.9e-7 against lm_head's 2.3e-2),
which freezes the early layers in practice. The forward is described as it is (no 1/L branch
scaling is assumed), so budget() warns when max/min lr_scale of one model exceeds SPREAD_WARNING
(1e3), naming both ends; use budget="uniform" there, or a network built for the taring recipe.
The same compounding can shrink every scale alike: a 4-block residual CNN got 3.4e-7 to 3.8e-7
(spread 1.1×) and a residual MLP of 8 blocks 9e-5 to 2e-4, so budget() also warns when every
lr_scale is below FROZEN_SCALE (1e-3; plain MLPs, CNNs and TinyCausalLM of 1–2 layers get 1e-2 to
3e-1) and some weight is there by the composition alone (``checked_budget``).
Frozen weights (requires_grad=False) carry mass 0 and are left out, as the optimizer skips them.
"""
from __future__ import annotations

import math

from torch import nn

from .._warn import warn
from .convert import ModularError, check_placed_once, from_torch
from .module import PRODUCT_ASSUMPTION, Bond, Compose, Module, Parallel, Tare

SPREAD_WARNING = 1e3  # budget() warns when the largest lr_scale exceeds the smallest by this factor
FROZEN_SCALE = 1e-3  # ... or when every lr_scale is below this, some by the composition alone


def _tree(model, **options) -> Module:
    if isinstance(model, Module):  # a hand-built tree: from_torch's check of where parameters are placed
        check_placed_once(model)
        return model
    return from_torch(model, **options)


def _rows(tree: Module):
    rows = []
    for p in tree.placements():
        a = p.atom
        if math.isinf(p.coefficient):  # mass 0
            rows.append((a, p, 0.0 if a.constrained and a.param.requires_grad else None))
            continue
        rho = p.input_bound if a.homogeneous else 1.0
        denom = p.coefficient * rho * a.own_factor()
        if not (denom > 0 and math.isfinite(denom)):
            raise ModularError(f"{a.name}: its budget is undefined (coefficient {p.coefficient:g}, input bound "
                               f"{rho:g}); a zero input bound means nothing reaches it — check the model")
        rows.append((a, p, 1.0 / denom))
    return rows


def budget(model: nn.Module | Module, **options) -> dict[str, float]:
    """{parameter name: lr_scale} for the trainable Linear, Conv and Embedding weights (0 for one
    of mass 0, see the module docstring; names as in ``model.named_parameters()``); ``options``
    go to ``from_torch`` (scale, masses, …). Warns
    when the lr_scales span more than SPREAD_WARNING or all lie below FROZEN_SCALE, compounded
    through the composition (``checked_budget``), and for each normalisation layer whose input
    bound is below the RMS it assumes (``unmet_assumptions``)."""
    tree = _tree(model, **options)
    out, _, message = checked_budget(tree)
    if message:
        warn(message)
    for text in unmet_assumptions(tree):
        warn(f"budget: assumption unmet, {text}")
    return out


def quiet_budget(model: nn.Module | Module, **options) -> dict[str, float]:
    """``budget`` without the warning."""
    return checked_budget(model, **options)[0]


def checked_budget(model: nn.Module | Module, **options) -> tuple[dict[str, float], str | None, str | None]:
    """(lr_scales, problem, message): problem is "spread" where the largest lr_scale exceeds the
    smallest by more than SPREAD_WARNING, "frozen" where every lr_scale is below FROZEN_SCALE and
    the composition puts some weight there by itself (its factor 1/(cᵢρᵢ), the lr_scale without
    the weight's own shape factor kᵢ, is below FROZEN_SCALE too), else None; the message says why
    and what to do. The second condition spares a lone unscaled Linear(2·10⁶, 1), whose 7e-4 is
    its kᵢ = √(d_in/d_out) alone (a review); reading the composition factors alone let a 2-block
    residual CNN through (lr_scales ≤ 1.3e-4, its wide head's factor 1.2e-3; a second review)."""
    tree = _tree(model, **options)
    if tree.mass <= 0:
        raise ModularError("the model's module tree has no weight of positive mass, so there is nothing to "
                           "budget; give weights a mass with from_torch(model, masses={name: 1.0}), or use "
                           "budget='uniform'")
    rows = [(a, scale) for a, _, scale in _rows(tree) if scale is not None]
    out = {a.name: scale for a, scale in rows}
    moving = {a.name: scale for a, scale in rows if scale > 0}  # spread and depth among the weights that move
    composition = {a.name: scale * a.own_factor() for a, scale in rows if scale > 0}
    lo, hi = (min(moving, key=moving.get), max(moving, key=moving.get)) if moving else (None, None)
    deepest = min(composition, key=composition.get) if composition else None
    if moving and moving[hi] < FROZEN_SCALE and composition[deepest] < FROZEN_SCALE:
        return out, "frozen", (
            f"modular budget leaves every weight below lr/{1 / FROZEN_SCALE:g} (lr_scales from {moving[lo]:.3g} for "
            f"{lo!r} to {moving[hi]:.3g} for {hi!r}; the composition alone gives {deepest!r} "
            f"{composition[deepest]:.3g}) "
            "— in effect frozen at the lr of a uniform budget. Each rule is a worst case and residual blocks "
            "x + f(x) multiply the sensitivities by 1 + sens(f) each. Consider ManifoldMuon(..., budget='uniform'), "
            "or blocks x·(1 − 1/L) + f(x)/L tared to a fixed mass (README, 'Learning-rate transfer across depth')"
        )
    if moving and moving[hi] > SPREAD_WARNING * moving[lo]:
        return out, "spread", (
            f"modular budget spans {moving[hi] / moving[lo]:.3g}× (more than {SPREAD_WARNING:g}×): smallest lr_scale "
            f"{moving[lo]:.3g} for {lo!r}, largest {moving[hi]:.3g} for {hi!r}. Each rule is a worst case and the "
            "sensitivities of the layers after a weight multiply (residual blocks x + f(x) add 1 + sens(f) "
            "each), so the smallest steps are in effect frozen. Consider ManifoldMuon(..., budget='uniform'), "
            "or blocks x·(1 − 1/L) + f(x)/L tared to a fixed mass (README, 'Learning-rate transfer across depth')"
        )
    return out, None, None


def unmet_assumptions(tree: Module, rho: float = 1.0) -> list[str]:
    """Normalisation layers whose input, by the tree's own bound at inputs of RMS ≤ ``rho``, has RMS
    below the norm_min_rms they assume: there the stated assumption is false for every input and
    the layer's sensitivity 1/norm_min_rms understated (Linear(8, 16) → LayerNorm with scale=None:
    input RMS ≤ 0.71 against an assumed 1; measured Lipschitz 1.95 against a claimed 1.41)."""
    if isinstance(tree, Compose):
        return [t for m, r in zip(tree.modules, tree._input_bounds(rho)) for t in unmet_assumptions(m, r)]
    min_rms = getattr(tree, "min_rms", None)
    # a relative tolerance of a few ulps: scale="rms" gives √(d_out/d_in)·√(d_in/d_out) =
    # 0.9999999999999999 for many widths (64 → 192), which reported "at most 1, below the assumed 1"
    if isinstance(tree, Bond) and min_rms is not None and rho < min_rms * (1 - 1e-12):
        floor = math.floor(rho * 1e3) / 1e3  # rounded down: passing it must clear the line
        return [f"{tree.name}: its input RMS is at most {rho:.4g} by the bounds above it, below the assumed "
                f"{min_rms:g} (pass norm_min_rms={floor:g}, or let what feeds it keep RMS ≥ {min_rms:g}: "
                "scale='rms' for Linear layers; ManifoldMuon keeps an Embedding's rows at radius 1, RMS 1/√d)"]
    return [t for m in tree.children() for t in unmet_assumptions(m, rho)]


def _assumptions(tree: Module) -> list[str]:
    out, stack = [], [tree]
    while stack:
        m = stack.pop()
        if isinstance(m, Bond) and m.assumption and m.assumption not in out:
            out.append(m.assumption)
        if isinstance(m, Parallel) and m.combine == "mul" and PRODUCT_ASSUMPTION not in out:
            out.append(PRODUCT_ASSUMPTION)  # (a traced silu(g(x)) * u(x) printed no line)
        if isinstance(m, Tare):
            names = [a.name for a in m.atoms() if a.mass > 0]
            span = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
            out.append(f"tared: {len(names)} weights ({span}) share mass {m.mass:g} "
                       f"(the mass column is before taring: × {m.mass / m.module.mass:g})")
        stack.extend(m.children())
    return out


def _scale_text(atom, scale) -> str:
    if scale is not None:
        return f"{scale:.4g}"
    return "frozen" if not atom.param.requires_grad else "fallback"


def budget_table(model: nn.Module | Module, lr: float | None = None, **options) -> str:
    """A table: parameter, shape, atom, mass, coefficient cᵢρᵢ, own norm, lr_scale (and lr × lr_scale)."""
    tree = _tree(model, **options)
    rows = _rows(tree)
    head = f"{'parameter':<40} {'shape':<14} {'atom':<13} {'mass':>5} {'coef':>9} {'own norm':<11} {'lr_scale':>9}"
    if lr is not None:
        head += f" {'step':>9}"
    lines = [head, "-" * len(head)]
    for a, p, scale in rows:
        coef = "∞" if math.isinf(p.coefficient) else f"{p.coefficient * (p.input_bound if a.homogeneous else 1):.4g}"
        line = (f"{a.name:<40} {str(tuple(a.param.shape)):<14} {type(a).__name__:<13} {a.mass:>5g} {coef:>9} "
                f"{a.own_norm_name():<11} {_scale_text(a, scale):>9}")
        if lr is not None:
            line += f" {'' if scale is None else f'{lr * scale:.3g}':>9}"
        lines.append(line)
    lines.append(f"total mass {tree.mass:g}, sensitivity {tree.sensitivity:.4g}")
    for text in _assumptions(tree):
        lines.append(text if text.startswith("tared:") else f"assumes {text}")
    lines += [f"assumption unmet: {text}" for text in unmet_assumptions(tree)]
    return "\n".join(lines)
