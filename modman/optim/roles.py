"""Which parameter goes to which manifold: the roles of API.md ("Optimizers").

Given modules (e.g. ``model.modules()``), each parameter is assigned once, to the module that
owns it (``named_parameters(recurse=False)``; tied weights once, under their first name):

    nn.Linear weight                     → "stiefel"
    nn.Conv1d/2d/3d weight               → "stiefel" (viewed as (out, in·k…))
    nn.Embedding weight                  → "sphere" (one sphere per row)
    3-D parameter of any other module    → "stiefel", batched over dim 0 (expert stacks)
    everything else (biases, norm gains, bare 2-D parameters) → "fallback" (AdamW)

``roles`` overrides per module instance, module class or parameter name.
Given tensors instead, the role follows the shape: ≥ 2-D → "stiefel", else "fallback".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ROLES = ("stiefel", "sphere", "euclidean", "fallback")


@dataclass
class Assignment:
    name: str
    param: torch.nn.Parameter
    role: str
    module: nn.Module | None = None


def default_role(module: nn.Module | None, attr: str, p: torch.Tensor) -> str:
    if module is None:
        return "stiefel" if p.ndim >= 2 else "fallback"
    if attr == "weight" and isinstance(module, nn.Linear):
        return "stiefel"
    if attr == "weight" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "stiefel"
    if attr == "weight" and isinstance(module, nn.Embedding):
        return "sphere"
    # 3-D stacks only: a ConvTranspose1d weight (in, out, k) is a convolution, not experts
    if p.ndim == 3 and not isinstance(module, nn.modules.conv._ConvNd):
        return "stiefel"
    return "fallback"


def _override(roles, module, name, cls_default):
    if not roles:
        return cls_default
    for key in (name, module):
        if key is not None and key in roles:
            return roles[key]
    if module is not None:
        for klass in type(module).__mro__:
            if klass in roles:
                return roles[klass]
    return cls_default


def assign_modules(modules: list[nn.Module], roles: dict | None = None) -> list[Assignment]:
    """Assignments for an iterable of modules, in order, each parameter once."""
    names: dict[int, str] = {}
    for m in modules:  # the first module that contains a submodule names it (the root, usually)
        for prefix, sub in m.named_modules(remove_duplicate=False):
            names.setdefault(id(sub), prefix)
    seen: set[int] = set()
    out = []
    for m in modules:
        prefix = names.get(id(m), "")
        for attr, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            role = _override(roles, m, name, default_role(m, attr, p))
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} for parameter {name!r}; choose from {ROLES}")
            out.append(Assignment(name, p, role, m))
    return out
