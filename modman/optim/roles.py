"""Which parameter goes to which manifold: the roles of API.md ("Optimizers").

Given modules (``model.modules()``, the model itself, or any iterable of modules), every module
given is expanded to its whole tree (``module.modules()``; each module once, in order) and each
parameter is assigned once, to the module that owns it (``named_parameters(recurse=False)``;
tied weights once, under their first name):

    nn.Linear weight                     → "stiefel"
    LoRA factor B (a Linear at …lora_B.<adapter>) → "euclidean" (it starts at 0: no Stiefel point)
    nn.Conv1d/2d/3d weight               → "stiefel" (viewed as (out, in·k…))
    nn.Embedding weight                  → "sphere" (one sphere per row)
    3-D parameter of any other module    → "stiefel", batched over dim 0 (expert stacks)
    everything else (biases, norm gains, bare 2-D parameters) → "fallback" (AdamW)

Names are those of ``root.named_parameters()``, where root is the given module that contains
all the others (the model, for ``model.modules()``). Given several separate modules (e.g.
``[model.body, model.head]`` or ``model.children()``), root is an ``nn.ModuleList`` of them in
the order given, so the names are prefixed by that position ("0.weight", "1.weight", …) and two
modules' ``weight`` never share a name. ``torch.compile`` and DDP/DataParallel wrappers are seen
through: the names are the bare model's.

Frozen parameters (``requires_grad=False`` at construction) are left out: projecting them onto
a manifold would change weights that are meant to stay as loaded (a LoRA base model). A
parameter unfrozen later must be added with ``optimizer.add_param_group``.

``roles`` overrides per parameter name, module instance or module class; a module or class
override applies to the module's matrices (≥ 2-D): its biases and gains keep their role unless
named.
Given tensors instead, the role follows the shape: ≥ 2-D → "stiefel", else "fallback".
"""
from __future__ import annotations

import sys
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


@dataclass
class Network:
    """The given modules, expanded: ``modules`` in order, each once; ``names`` id(module) → its name
    under ``root``; ``single`` says whether root is one of the given modules (a model the modular
    budget can describe) rather than a ModuleList gathering separate ones."""
    root: nn.Module
    single: bool
    modules: list[nn.Module]
    names: dict[int, str]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a chain of ``torch.compile`` (``OptimizedModule._orig_mod``) and
    data-parallel wrappers (``DistributedDataParallel`` / ``DataParallel``'s ``.module``), else
    ``module``. Around the whole model, names, roles and the modular budget are the bare model's
    (through DDP they were ``module.…`` with no modular budget, every weight stepping lr instead
    of its share); a wrapped submodule is seen through for names and roles, but the modular
    budget cannot describe it (budget="auto" then warns and steps uniformly)."""
    # no OptimizedModule can exist before torch._dynamo is imported, so do not import it here
    while True:
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
            module = module._orig_mod
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def _walk(module: nn.Module, prefix: str, seen: set[int]):
    """(name, submodule) in pre-order, as ``named_modules()``, but through compile wrappers."""
    module = unwrap(module)
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    for attr, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{attr}" if prefix else attr, seen)


def expand_modules(modules) -> Network:
    """The modules given with all their submodules (see the module docstring)."""
    given = list({id(m): m for m in map(unwrap, modules)}.values())
    trees = {id(m): [sub for _, sub in _walk(m, "", set())] for m in given}
    below = {id(sub) for tree in trees.values() for sub in tree[1:]}
    roots = [m for m in given if id(m) not in below]
    root = roots[0] if len(roots) == 1 else nn.ModuleList(roots)
    names = {id(sub): name for name, sub in _walk(root, "", set())}
    ordered = list({id(sub): sub for m in given for sub in trees[id(m)]}.values())
    return Network(root, len(roots) == 1, ordered, names)


def default_role(module: nn.Module | None, attr: str, p: torch.Tensor, path: str = "") -> str:
    """The role of parameter ``attr`` of ``module`` (at module ``path``), by the table above."""
    if module is None:
        return "stiefel" if p.ndim >= 2 else "fallback"
    if attr == "weight" and isinstance(module, nn.Linear) and path.split(".")[-2:-1] == ["lora_B"]:
        # a LoRA adapter's B (modman's LoRALinear or PEFT's, both lora_B.<adapter>): it starts at
        # 0, on no Stiefel manifold, and projecting it would change the model — it takes the
        # "euclidean" role (Muon's msign step), as modman.lora.optimizer_factory gives it
        return "euclidean"
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


def _override(roles, module, name, p, cls_default):
    """The role ``roles`` gives parameter ``name`` (p, of ``module``): by name first, then by the
    module instance or class — which speaks for the module's matrices (≥ 2-D) only: its biases keep
    their default, as ``{linear: "euclidean"}`` is about the weight (a bias cannot take it)."""
    if not roles:
        return cls_default
    if name in roles:
        return roles[name]
    if module is None or p.ndim < 2:
        return cls_default
    if module in roles:
        return roles[module]
    for klass in type(module).__mro__:
        if klass in roles:
            return roles[klass]
    return cls_default


def assign_modules(network: Network, roles: dict | None = None) -> list[Assignment]:
    """Assignments for the trainable parameters of an expanded network, in order, each once."""
    seen: set[int] = set()
    out = []
    for m in network.modules:
        prefix = network.names[id(m)]
        for attr, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            role = _override(roles, m, name, p, default_role(m, attr, p, prefix))
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} for parameter {name!r}; choose from {ROLES}")
            out.append(Assignment(name, p, role, m))
    return out
