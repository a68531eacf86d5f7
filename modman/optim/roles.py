"""Which parameter goes to which manifold: the roles of API.md ("Optimizers").

Given modules (``model.modules()``, the model itself, or any iterable of modules), every module
given is expanded to its whole tree (``module.modules()``; each module once, in order) and each
parameter is assigned once, to the module that owns it (``named_parameters(recurse=False)``;
tied weights once, under their first name):

    nn.Linear weight                       → "stiefel"
    LoRA factor B (a Linear at …lora_B.<adapter>) → "euclidean" (it starts at 0: no Stiefel point)
    nn.Conv1d/2d/3d weight                 → "stiefel" (viewed as (out, in·k…)); with groups = G > 1
                                             the G blocks of its block-diagonal operator, batched:
                                             (G, out/G, in/G·k…)
    transformers' Conv1D weight (GPT-2)    → "stiefel", with ``transposed`` (stored (in, out) = (nx, nf))
    nn.Embedding / nn.EmbeddingBag weight  → "sphere" (one sphere per row)
    expert stack: a 3-D (E, m, n) parameter of any other module, E, m, n > 1
                                           → "stiefel", batched over dim 0
    any of these whose manifold is only ±1 → "fallback": a 1×1 matrix (Linear(1, 1), Conv2d(1, 1, 1),
                                             the 1×1 blocks of Conv2d(C, C, 1, groups=C)),
                                             an embedding of dim 1 (no step can move them)
    everything else                        → "fallback" (AdamW): biases, norm gains, bare 2-D
        parameters, nn.MultiheadAttention's in_proj_weight, RNN weights, ConvTranspose weights,
        parametrized weights' ``original``, nn.Bilinear's weight, ViT's cls_token (1×1×D) and
        position table (1×T×D), per-expert biases (E×1×d)

Parameters of ≥ 2 dims that the table sends to the fallback are reported, in one warning per
call, with the ``roles=`` that changes it: a matrix that silently skipped its manifold looked
like a working optimizer (GPT-2, whose Conv1D weights were unknown, ran as plain AdamW).

Names are those of ``root.named_parameters()``, where root is the given module that contains
all the others (the model, for ``model.modules()``). Given several separate modules (e.g.
``[model.body, model.head]`` or ``model.children()``), root is an ``nn.ModuleList`` of them in
the order given, so the names are prefixed by that position ("0.weight", "1.weight", …) and two
modules' ``weight`` never share a name. ``torch.compile`` and DDP/DataParallel wrappers are seen
through: the names are the bare model's.

Frozen parameters (``requires_grad=False`` at construction) are left out: projecting them onto
a manifold would change weights that are meant to stay as loaded (a LoRA base model). A
parameter unfrozen later must be added with ``optimizer.add_param_group``.

``roles`` overrides per parameter name (any of a tied weight's names), module instance (any of a
tied weight's owners: ``{model.lm_head: "fallback"}`` reaches a head tied to the embedding) or module
class (of the owner it is assigned under); a module or class override applies to the module's matrices (≥ 2-D): its biases and gains
keep their role unless named. An override is taken as asked, also for a 1×1 matrix. A name that
is no parameter of the given modules (frozen ones count) or a module that is not among them is
refused (ValueError): a typo was silently ignored. A class absent from the modules is fine.
Given tensors instead, the role follows the shape: ≥ 2-D → "stiefel", else "fallback".
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .._warn import warn
from .functional import conv_groups

ROLES = ("stiefel", "sphere", "euclidean", "fallback")


@dataclass
class Assignment:
    name: str
    param: torch.nn.Parameter
    role: str
    module: nn.Module | None = None
    view: bool | str | None = None  # how the step sees it as a matrix: ``matrix_view``
    asked: bool = False  # the role came from the user's roles=, not the table


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
    of its share); a wrapped submodule is seen through for names, roles and the modular budget
    alike."""
    # no OptimizedModule can exist before torch._dynamo is imported, so do not import it here
    while True:
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
            module = module._orig_mod
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def named_modules(module: nn.Module, prefix: str = "", seen: set[int] | None = None):
    """(name, submodule) in pre-order, as ``module.named_modules()``, but through compile and
    data-parallel wrappers (``unwrap``): names as the optimizers give them."""
    seen = set() if seen is None else seen
    module = unwrap(module)
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    for attr, child in module._modules.items():
        if child is not None:
            yield from named_modules(child, f"{prefix}.{attr}" if prefix else attr, seen)


def expand_modules(modules) -> Network:
    """The modules given with all their submodules (see the module docstring)."""
    given = list({id(m): m for m in map(unwrap, modules)}.values())
    trees = {id(m): [sub for _, sub in named_modules(m)] for m in given}
    below = {id(sub) for tree in trees.values() for sub in tree[1:]}
    roots = [m for m in given if id(m) not in below]
    root = roots[0] if len(roots) == 1 else nn.ModuleList(roots)
    names = {id(sub): name for name, sub in named_modules(root)}
    ordered = list({id(sub): sub for m in given for sub in trees[id(m)]}.values())
    return Network(root, len(roots) == 1, ordered, names)


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's attention and MLP): a Linear whose weight is stored
    transposed, (nx, nf) = (in, out). Recognised by name and shape, not imported: modman does not
    depend on transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2
            and weight.shape[1] == getattr(module, "nf", None))


def _is_transposed_linear(module: nn.Module, attr: str, p: torch.Tensor) -> bool:
    return attr == "weight" and p is getattr(module, "weight", None) and is_transformers_conv1d(module)


def matrix_view(module: nn.Module, attr: str, p: torch.Tensor) -> bool | str | None:
    """How ``module.<attr>`` is seen as a matrix (``functional.as_matrix``'s ``flatten``), for
    the optimizer's groups and the diagnostics alike: True for a convolution's weights (flattened
    to (out, in·k…); a 3-D Conv1d weight is not an expert stack), "groups=G" for a grouped
    convolution's weight (its operator is block diagonal, one (out/G, in/G·k…) block per group: the
    flattened matrix on the Stiefel manifold left a depthwise Conv2d(32, 32, 3, groups=32) with
    singular values 0.37–0.67, a user probe), "transposed" for transformers' Conv1D weight (stored
    (in, out): the step, a Sphere's rows, Stiefel's and Muon's d_out/d_in all read (out, in)) and
    for the expert stacks of a transformers experts module that says it stores them (E, in, out)
    (``is_transposed``, set by its ``use_experts_implementation``: GPT-OSS; scale="rms" gave its
    gate_up_proj s = √(in/out) instead of √(out/in), 0.71 for 1.41 at its 2:1 shape, a probe), None otherwise (by shape: ≥ 4-D flattened, 3-D
    a stack)."""
    if isinstance(module, nn.modules.conv._ConvNd) and p.ndim >= 2:
        groups = getattr(module, "groups", 1)
        return f"groups={groups}" if attr == "weight" and groups > 1 and p is module.weight else True
    if _is_transposed_linear(module, attr, p) or (p.ndim == 3 and _stores_experts_transposed(module)):
        return "transposed"
    return None


def _per_expert_bias(module: nn.Module, attr: str, p: torch.Tensor) -> bool:
    """A mixture's per-expert bias, (E, out) beside an (E, …) expert stack of the same module: a
    bias, not a matrix the fallback warning should name (GPT-OSS's gate_up_proj_bias was)."""
    return (attr.endswith("bias") and p.ndim == 2
            and any(q.ndim == 3 and q.shape[0] == p.shape[0] for q in module.parameters(recurse=False)))


def _stores_experts_transposed(module: nn.Module) -> bool:
    """transformers' experts modules (``use_experts_implementation``) carry ``has_gate`` and
    ``is_transposed``; the latter True means (E, in, out) stacks, applied as x @ W[e]. Read, not
    imported: modman does not depend on transformers."""
    return hasattr(module, "has_gate") and getattr(module, "is_transposed", False) is True


def is_expert_stack(module: nn.Module, p: torch.Tensor) -> bool:
    """A 3-D parameter holding several matrices side by side (a mixture of experts' (E, d_ff, d)).
    Not: one matrix (ViT's cls_token 1×1×D, position embeddings 1×T×D), per-expert vectors
    ((E, 1, d) biases), a convolution (ConvTranspose1d's (in, out, k)), or nn.Bilinear's
    (out, in1, in2), one bilinear form per output rather than independent maps."""
    return (p.ndim == 3 and p.shape[0] > 1 and min(p.shape[1:]) > 1
            and not isinstance(module, (nn.modules.conv._ConvNd, nn.Bilinear)))


def _table_role(module: nn.Module, attr: str, p: torch.Tensor, path: str) -> str:
    """The role of the module docstring's table, before degenerate manifolds are set aside."""
    if attr == "weight" and isinstance(module, nn.Linear) and path.split(".")[-2:-1] == ["lora_B"]:
        # a LoRA adapter's B (modman's LoRALinear or PEFT's, both lora_B.<adapter>): it starts at
        # 0, on no Stiefel manifold, and projecting it would change the model — it takes the
        # "euclidean" role (Muon's msign step), as modman.lora.optimizer_factory gives it
        return "euclidean"
    if attr == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "stiefel"
    if _is_transposed_linear(module, attr, p):
        return "stiefel"
    if attr == "weight" and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "sphere"
    if is_expert_stack(module, p):
        return "stiefel"
    return "fallback"


def default_role(module: nn.Module | None, attr: str, p: torch.Tensor, path: str = "") -> str:
    """The role of parameter ``attr`` of ``module`` (at module ``path``), by the table above."""
    if module is None:
        return "stiefel" if p.ndim >= 2 and p.numel() else "fallback"
    role = _table_role(module, attr, p, path)
    if p.numel() == 0:  # (Linear(0, 4)): no manifold holds an empty matrix, nothing to step
        return "fallback"
    # a 1×1 matrix (Linear(1, 1), Conv2d(1, 1, 1), a depthwise Conv2d(C, C, 1, groups=C)'s blocks)
    # is on the Stiefel manifold {±1} and an embedding of dim 1 has its rows on the sphere {±1}: a
    # constrained step can never move them
    if role == "stiefel":
        groups = conv_groups(matrix_view(module, attr, p))
        if p.numel() == max(groups, 1):
            return "fallback"
    if role == "sphere" and p.shape[-1] == 1:
        return "fallback"
    return role


def _override(roles: dict, owners: list[nn.Module], names: list[str], p: torch.Tensor) -> str | None:
    """The role ``roles`` gives p (owned by ``owners``, first the module it is assigned under, and
    known by ``names``), or None: by name first, then by a module instance — any owner, as any name
    (a tied head's ``{model.lm_head: "fallback"}`` was silently ignored: the weight is assigned
    under the embedding), two owners asking different roles refused — then by the assigned owner's
    class. A module or class speaks for its matrices (≥ 2-D) only: its biases keep their default,
    as ``{linear: "euclidean"}`` is about the weight (a bias cannot take it)."""
    for name in names:
        if name in roles:
            return roles[name]
    if p.ndim < 2:
        return None
    asked = {roles[m] for m in owners if m in roles}
    if len(asked) > 1:
        raise ValueError(f"roles= gives the tied weight {' = '.join(names)} the roles {sorted(asked)} through "
                         "its modules; name one role for it (roles={\"" + names[0] + "\": ...})")
    if asked:
        return asked.pop()
    module = owners[0]
    for klass in type(module).__mro__:
        if klass in roles:
            return roles[klass]
    return None


def _parameter_names(network: Network) -> dict[int, list[str]]:
    """id(parameter) → its names under root, frozen parameters included, in order (a tied weight
    has one per owner; the first is the one it is assigned under)."""
    names: dict[int, list[str]] = {}
    for m in network.modules:
        prefix = network.names[id(m)]
        for attr, p in m.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{prefix}.{attr}" if prefix else attr)
    return names


def _parameter_owners(network: Network) -> dict[int, list[nn.Module]]:
    """id(parameter) → the modules that own it, in order (the first is the one it is assigned under)."""
    owners: dict[int, list[nn.Module]] = {}
    for m in network.modules:
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
    return owners


def check_roles(roles: dict, *networks: Network) -> None:
    """Refuse what ``roles`` would otherwise silently ignore: an unknown role, a key that is no
    name, module or class, a name that is no parameter of the networks (frozen ones count: a
    typo), a module that is not one of their modules. A class absent from them is fine (one
    ``roles`` may serve several models). Several networks: one ``roles`` for param groups of
    modules, each group a network of its own."""
    for key, role in roles.items():
        if role not in ROLES:
            what = key if isinstance(key, str) else getattr(key, "__name__", type(key).__name__)
            raise ValueError(f"unknown role {role!r} for {what!r} in roles=; choose from {ROLES}")
    others = [k for k in roles if not isinstance(k, (str, nn.Module, type))]
    if others:
        raise TypeError(f"roles= keys are parameter names, modules or module classes; got {others!r}")
    # (dict.fromkeys: param groups of separate modules repeat names such as "weight")
    valid = list(dict.fromkeys(n for net in networks for ns in _parameter_names(net).values() for n in ns))
    known = set(valid)
    unknown = [k for k in roles if isinstance(k, str) and k not in known]
    if unknown:
        near = [m for k in unknown for m in difflib.get_close_matches(k, valid, n=2)]
        raise ValueError(f"roles= names no parameter of the given modules: {unknown}; "
                         f"{'did you mean' if near else 'names are e.g.'} {(near or valid)[:5]}")
    ids = {id(m) for net in networks for m in net.modules}
    strangers = [type(k).__name__ for k in roles if isinstance(k, nn.Module) and id(unwrap(k)) not in ids]
    if strangers:
        raise ValueError(f"roles= has module(s) that are not among the given modules: {strangers} "
                         "(a module of another model, or a copy?)")


def _fallback_message(silent: list[Assignment], shown: int = 4) -> str:
    """One readable warning for the matrices the table sent to the fallback. The advice names a
    layer that a constrained role suits: not a ±1 manifold (a 1×1 matrix, a dim-1 embedding), and
    not a parametrization's tensors (weight_norm's magnitude g is a column, not a map)."""
    def describe(a: Assignment) -> str:
        return f"{a.name} ({type(a.module).__name__}, {'×'.join(map(str, a.param.shape))})"

    listed = ", ".join(map(describe, silent[:shown]))
    more = f" and {len(silent) - shown} more" if len(silent) > shown else ""
    suited = [a for a in silent if a.param.shape[-1] > 1 and min(a.param.shape) > 1
              and type(a.module).__name__ != "ParametrizationList"]
    advice = (f"To constrain them, pass roles={{{type(suited[0].module).__name__}: \"stiefel\"}} (a module "
              f"class) or roles={{\"{suited[0].name}\": \"stiefel\"}} (a parameter name); " if suited else "")
    keep = "the role \"fallback\" given in roles= keeps them in the fallback without this warning."
    return (f"{len(silent)} parameter(s) of ≥ 2 dims go to the AdamW fallback, not onto a manifold (no "
            f"constrained role for their layer, or a manifold that is only ±1: a 1×1 matrix, an embedding "
            f"of dim 1): {listed}{more}. " + (advice + keep if advice else keep[0].upper() + keep[1:]))


def assign_modules(network: Network, roles: dict | None = None, *, check: bool = True,
                   exclude: set[int] | frozenset[int] = frozenset()) -> list[Assignment]:
    """Assignments for the trainable parameters of an expanded network, in order, each once.

    ``roles`` is validated against the network (``check_roles``) unless ``check`` is False: a
    caller assigning several networks with one ``roles`` checks it against all of them instead.
    Parameters whose id is in ``exclude`` (already in the optimizer) are left out, and so are not
    reported again by the fallback warning."""
    roles = {unwrap(k) if isinstance(k, nn.Module) else k: v for k, v in (roles or {}).items()}
    if check:
        check_roles(roles, network)
    names, owners = _parameter_names(network), _parameter_owners(network)
    seen: set[int] = set(exclude)
    out, silent = [], []
    for m in network.modules:
        for attr, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            asked = _override(roles, owners[id(p)], names[id(p)], p)
            role = asked if asked is not None else default_role(m, attr, p, network.names[id(m)])
            a = Assignment(names[id(p)][0], p, role, m, view=matrix_view(m, attr, p), asked=asked is not None)
            out.append(a)
            if asked is None and role == "fallback" and p.ndim >= 2 and not _per_expert_bias(m, attr, p):
                silent.append(a)
    if silent:
        warn(_fallback_message(silent))
    return out
