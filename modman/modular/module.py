"""Modules, their composition rules, and the modular norm (MATH.md §4; Large et al. 2024).

A module is a forward map with weights, described here by four numbers and a rule:

- ``mass`` μ: its share of the learning rate (atoms 1 by default, bonds 0);
- ``sensitivity``: a Lipschitz constant of the output w.r.t. the input, RMS → RMS, for weights
  on their manifold, at unit input RMS; ``lipschitz(ρ)`` is the same for inputs of RMS ≤ ρ
  (they differ only where an elementwise product sits inside: a ⊙ b is not globally Lipschitz,
  its constant grows with the bounds of its factors);
- ``bound(ρ)``: an upper bound on the output's RMS for inputs of RMS ≤ ρ;
- the norm of a weight change, built from the atoms' norms by the rules below.

All norms are measured on activations as RMS over the feature dimension, per example (per token,
per spatial position); "well normed" means, to first order,
‖f(w + Δw, x) − f(w, x)‖_RMS ≤ ‖Δw‖ for every input of RMS ≤ 1.

Composition m₂ ∘ m₁ (m₁ first), μ = μ₁ + μ₂:
    ‖(Δw₁, Δw₂)‖ = max(s₁‖Δw₁‖₁, s₂‖Δw₂‖₂),  s₁ = (μ/μ₁)·sens(m₂),  s₂ = μ/μ₂,
    sensitivity multiplies, mass adds, and m₂ sees inputs bounded by bound₁(ρ);
    in general lipschitz(ρ) = lip₂(bound₁(ρ))·lip₁(ρ), and m₁'s change reaches the output
    through lip₂ at m₂'s input bound (s₁ uses that value).
Parallel branches combined by sum or concatenation: ‖Δw‖ = maxᵢ (μ/μᵢ)‖Δwᵢ‖ᵢ; mass and
sensitivity add (a sum's change is at most the sum of the changes; a concatenation's RMS at most
their maximum). Combined by an elementwise product, branch i's change is further multiplied by
the other branches' output bounds (stated assumption: ‖a ⊙ b‖_RMS ≤ ‖a‖_RMS·‖b‖_RMS, exact for
flat vectors and optimistic by up to √d for spiky ones — ‖a ⊙ b‖_RMS ≤ ‖a‖_∞‖b‖_RMS is the bound;
a probe found a GLU 8→16→8 1.75× past its weight bound), so at inputs of RMS ≤ ρ
    lipschitz(ρ) = Σᵢ lipᵢ(ρ)·Π_{j≠i} boundⱼ(ρ)      (Δ(a ⊙ b) = Δa ⊙ b + a ⊙ Δb);
e.g. h ↦ h ⊙ h on inputs of RMS ≤ ρ has constant 2ρ, not 2.
Scalar multiple a·m: sensitivity and bound × |a|, the inner norm × |a|, mass unchanged.
Tare (modula's ``tare``): the same module with its total mass set to μ', every inner mass
scaled by μ'/μ. Inner coefficients depend only on mass ratios, so only the shares outside change.

Flattening the tree gives every atom i a coefficient cᵢ with ‖Δw‖ = maxᵢ cᵢ·Nᵢ(Δwᵢ), where Nᵢ is
the atom's norm in RMS units at unit input. Steepest descent of budget η under this max-norm
moves atom i by η/cᵢ in Nᵢ — the learning-rate budget.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .._checks import is_finite_real


class ModularError(ValueError):
    """The model cannot be described as a module tree as given; the message says what to do."""


@dataclass(frozen=True)
class Placement:
    """Where an atom sits in a tree: its coefficient c (the max-norm weight, ∞ for mass-0 atoms)
    and the RMS bound ρ of the inputs it sees."""

    atom: "Atom"
    coefficient: float
    input_bound: float


class Module:
    """Base class; subclasses set ``mass`` and ``sensitivity`` and implement ``bound``."""

    mass: float = 0.0
    sensitivity: float = 1.0

    def bound(self, rho: float) -> float:
        """Upper bound on the output RMS for inputs of RMS ≤ rho."""
        raise NotImplementedError

    def lipschitz(self, rho: float) -> float:
        """Lipschitz constant (RMS → RMS) w.r.t. the input, for inputs of RMS ≤ rho. Atoms and
        bonds are globally Lipschitz (``sensitivity``); composites holding a product are not."""
        return self.sensitivity

    def children(self) -> tuple["Module", ...]:
        return ()

    def _place(self, coefficient: float, rho: float) -> Iterator[Placement]:
        """Yield every atom below with its accumulated coefficient and input bound."""
        raise NotImplementedError

    # ------------------------------------------------------------------ derived quantities
    def placements(self) -> list[Placement]:
        """Every atom with its coefficient in this tree (unit-RMS inputs at the root)."""
        return list(self._place(1.0, 1.0))

    def atoms(self) -> list["Atom"]:
        return [p.atom for p in self.placements()]

    def norm(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """The modular norm maxᵢ cᵢ·ρᵢ-scaled Nᵢ(Δwᵢ) of a weight change given by parameter name.

        Missing names count as zero change; atoms of mass 0 (passengers: biases and gains by
        default) are outside the norm, so a change to them must be zero (else the result is ∞).
        """
        if not isinstance(deltas, Mapping):  # (a list of tensors failed sorting them for this message; a probe)
            raise TypeError(f"norm() takes a dict {{parameter name: change}}, got {type(deltas).__name__}")
        known = {p.atom.name for p in self.placements()}
        unknown = set(deltas) - known
        if unknown:
            raise KeyError(f"norm() got changes for parameters not in this module: {sorted(unknown)}; "
                           f"known: {sorted(known)}")
        values = []
        for p in self.placements():
            if p.atom.name not in deltas:
                continue
            delta = deltas[p.atom.name]
            if tuple(delta.shape) != tuple(p.atom.param.shape):
                raise ValueError(f"norm(): the change for {p.atom.name!r} has shape {tuple(delta.shape)}, but the "
                                 f"parameter has shape {tuple(p.atom.param.shape)}")
            n = p.atom.rms_norm(delta) * (p.input_bound if p.atom.homogeneous else 1.0)
            if math.isinf(p.coefficient):  # outside the norm: ∞ for any change, NaN for a NaN one
                values.append(torch.where(n == 0, torch.zeros_like(n), n * math.inf))
            else:
                values.append(p.coefficient * n)
        if not values:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([v.to(torch.float64) for v in values]).max()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mass={self.mass:g}, sensitivity={self.sensitivity:.4g})"


class Atom(Module):
    """A module holding one parameter. Subclasses give ``rms_norm`` (Nᵢ: the RMS change of the
    output per unit input RMS), ``own_factor`` (Nᵢ / the optimizer's own norm of the step) and
    ``homogeneous`` (whether the output change scales with the input's RMS)."""

    homogeneous = True
    constrained = False  # ManifoldMuon steps it on a manifold by lr × lr_scale (not the AdamW fallback)

    def __init__(self, name: str, param: torch.Tensor, mass: float):
        if not (is_finite_real(mass) and mass >= 0):
            raise ValueError(f"mass of {name!r} must be a finite number ≥ 0, got {mass!r}")
        self.name = name
        self.param = param
        self.mass = float(mass)

    def rms_norm(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def own_factor(self) -> float:
        raise NotImplementedError

    def own_norm_name(self) -> str:
        raise NotImplementedError

    def _place(self, coefficient, rho):
        yield Placement(self, coefficient, rho)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={tuple(self.param.shape)}, mass={self.mass:g})"


PRODUCT_ASSUMPTION = ("elementwise product: ‖a ⊙ b‖_RMS ≤ ‖a‖_RMS·‖b‖_RMS (exact for flat vectors, optimistic "
                      "by up to √d for spiky ones: the bounds through a product are not guaranteed)")


class Bond(Module):
    """A module without weights (mass 0): activations, reshapes, normalisations, attention."""

    mass = 0.0

    def __init__(self, name: str, sensitivity: float, bound: Callable[[float], float], assumption: str = ""):
        self.name = name
        self.sensitivity = float(sensitivity)
        self._bound = bound
        self.assumption = assumption

    def bound(self, rho):
        return float(self._bound(rho))

    def _place(self, coefficient, rho):
        return iter(())

    def __repr__(self) -> str:
        return f"Bond({self.name}, sensitivity={self.sensitivity:.4g})"


def _check_modules(what: str, modules: tuple, first: int = 0) -> None:
    """A TypeError naming the argument that is not a Module (an nn.ReLU in a Compose failed as
    "'ReLU' object has no attribute 'mass'"; a probe)."""
    for i, m in enumerate(modules, start=first):
        if not isinstance(m, Module):
            raise TypeError(f"{what}: its argument {i} is {type(m).__name__}, not a modman.modular.Module (an atom, "
                            "a bond or their composition; from_torch describes a torch layer)")


def _share(total: float, part: float) -> float:
    """μ/μᵢ, with ∞ for a weightless part (it holds only bonds and passengers)."""
    return total / part if part > 0 else math.inf


class Compose(Module):
    """m_n ∘ … ∘ m_1: ``Compose(m1, m2, …)`` applies m1 first (the order of nn.Sequential)."""

    def __init__(self, *modules: Module):
        if not modules:
            raise ValueError("Compose needs at least one module")
        _check_modules("Compose", modules)
        self.modules = tuple(modules)
        self.mass = sum(m.mass for m in modules)
        self.sensitivity = self.lipschitz(1.0)

    def children(self):
        return self.modules

    def bound(self, rho):
        for m in self.modules:
            rho = m.bound(rho)
        return rho

    def _input_bounds(self, rho) -> list[float]:
        """ρₖ: the bound on module k's input when the composition's input has RMS ≤ rho."""
        rhos = []
        for m in self.modules:
            rhos.append(rho)
            rho = m.bound(rho)
        return rhos

    def lipschitz(self, rho):
        return math.prod(m.lipschitz(r) for m, r in zip(self.modules, self._input_bounds(rho)))

    def _place(self, coefficient, rho):
        # The change of module k reaches the output through every later module j: × lipⱼ(ρⱼ).
        rhos = self._input_bounds(rho)
        after = [1.0] * len(self.modules)
        for k in range(len(self.modules) - 2, -1, -1):
            after[k] = after[k + 1] * self.modules[k + 1].lipschitz(rhos[k + 1])
        for k, m in enumerate(self.modules):
            c = coefficient * _share(self.mass, m.mass) * after[k] if m.mass > 0 else math.inf
            yield from m._place(c, rhos[k])


class Parallel(Module):
    """Branches applied to the same input, combined by ``"sum"``, ``"cat"`` or ``"mul"``."""

    def __init__(self, *modules: Module, combine: str = "sum"):
        if combine not in ("sum", "cat", "mul"):
            raise ValueError(f"combine must be 'sum', 'cat' or 'mul', got {combine!r}")
        if len(modules) < 2:
            raise ValueError("Parallel needs at least two branches")
        _check_modules("Parallel", modules)
        self.modules = tuple(modules)
        self.combine = combine
        self.mass = sum(m.mass for m in modules)
        self.sensitivity = self.lipschitz(1.0)

    def _others(self, rho) -> list[float]:
        """The factor each branch's change is multiplied by in the combination: 1 for a sum or a
        concatenation, the product of the other branches' output bounds for a product."""
        if self.combine != "mul":
            return [1.0] * len(self.modules)
        bounds = [m.bound(rho) for m in self.modules]
        return [math.prod(b for j, b in enumerate(bounds) if j != i) for i in range(len(bounds))]

    def lipschitz(self, rho):
        # Δ(a ⊙ b) = Δa ⊙ b + a ⊙ Δb (the stated product assumption), ‖b‖_RMS ≤ bound_b(ρ)
        return sum(m.lipschitz(rho) * o for m, o in zip(self.modules, self._others(rho)))

    def children(self):
        return self.modules

    def bound(self, rho):
        bounds = [m.bound(rho) for m in self.modules]
        if self.combine == "cat":
            return max(bounds)
        if self.combine == "mul":
            return math.prod(bounds)
        return sum(bounds)

    def _place(self, coefficient, rho):
        for m, extra in zip(self.modules, self._others(rho)):
            c = coefficient * _share(self.mass, m.mass) * extra if m.mass > 0 else math.inf
            yield from m._place(c, rho)


class Scale(Module):
    """a·m: the output, the sensitivity and the inner weights' norm all scale by |a|."""

    def __init__(self, a: float, module: Module):
        a = float(a)
        if not math.isfinite(a) or a == 0:
            raise ValueError(f"scalar multiple must be finite and nonzero, got {a}")
        _check_modules("Scale", (module,), first=1)
        self.a = a
        self.module = module
        self.mass = module.mass
        self.sensitivity = abs(a) * module.sensitivity

    def children(self):
        return (self.module,)

    def bound(self, rho):
        return abs(self.a) * self.module.bound(rho)

    def lipschitz(self, rho):
        return abs(self.a) * self.module.lipschitz(rho)

    def _place(self, coefficient, rho):
        yield from self.module._place(coefficient * abs(self.a), rho)


class Tare(Module):
    """``module`` with its total mass set to ``mass`` (modula's ``tare``): every atom inside keeps
    its share of the module's mass, and the module as a whole takes ``mass`` in enclosing compositions.

    Equivalent to multiplying every inner mass by mass/μ (coefficients inside a tree depend only on
    mass ratios, so the inner placements are unchanged; the factor μ_outer/μ_module of the
    enclosing composition is what moves). A weightless module (μ = 0) stays weightless.

    Why (Large et al. 2024, modula's ResMLP and GPT): with L residual blocks
    x ↦ (1 − 1/L)·x + (1/L)·block(x), each block has sensitivity 1 and its weights' norm is scaled
    by 1/L. If every block kept mass 1, the total mass L + 2 would grow with depth and the input
    and output layers' step η/(L + 2) would vanish; taring the stack of blocks to a fixed mass M
    gives every block mass M/L, so its coefficient (μ/(M/L))·(1/L) = μ/M and the input and output
    coefficients μ = 2 + M are all independent of L: one lr for every depth.
    """

    def __init__(self, module: Module, mass: float = 1.0):
        if not (is_finite_real(mass) and mass > 0):
            raise ValueError(f"tare mass must be a finite number > 0, got {mass!r}")
        _check_modules("Tare", (module,))
        self.module = module
        self.mass = float(mass) if module.mass > 0 else 0.0
        self.sensitivity = module.sensitivity

    def children(self):
        return (self.module,)

    def bound(self, rho):
        return self.module.bound(rho)

    def lipschitz(self, rho):
        return self.module.lipschitz(rho)

    def _place(self, coefficient, rho):
        yield from self.module._place(coefficient, rho)

    def __repr__(self) -> str:
        return f"Tare({self.module!r}, mass={self.mass:g})"


def tare(module: Module, mass: float = 1.0) -> Module:
    """``module`` with total mass ``mass`` (see ``Tare``)."""
    return Tare(module, mass)


def compose(*modules: Module) -> Module:
    """m1 then m2 then …; a single module is returned as is."""
    return modules[0] if len(modules) == 1 else Compose(*modules)


def repeat(factory: Callable[[int], Module], n: int) -> Module:
    """factory(0) then factory(1) … factory(n-1): n copies with their own weights."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"repeat needs n ≥ 1, got {n!r}")
    return compose(*(factory(i) for i in range(n)))
