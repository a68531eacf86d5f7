"""ManifoldOptimizer: the torch.optim class shared by modman's family (a thin shell).

It gathers parameters into groups by role (see ``roles.py``), validates hyperparameters at the
door, moves constrained weights onto their manifolds at construction, and in ``step`` hands each
parameter to the functional core (``functional.py``). Family members differ only in which
(manifold, norm) pair the constrained roles get.
"""
from __future__ import annotations

import copy
import math
import numbers
import sys
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from .._checks import is_finite_real, is_int
from ..linalg.schedules import KELLER
from ..manifolds import Euclidean, Sphere, Stiefel
from ..solvers import SEPARABLE_SOLVERS
from . import functional as F
from .distributed import (SHARED_ALGORITHMS, bits_checksums, built_by_zero, check_same_items, matrix_cost,
                          plan_owners, resolve_group, share_step)
from .._warn import warn
from .batching import plan_stacks, stack, transposed
from .budgets import resolve_budget
from .roles import ROLES, assign_modules, check_roles, expand_modules

_RESERVED = {"momentum", "exp_avg", "exp_avg_sq", "step"}
# torch.optim.Muon's coefficients (Keller Jordan's quintic), which modman.Muon's default schedule uses
_TORCH_MUON_COEFFICIENTS = KELLER[0]


def _check_initialised(named) -> None:
    """Refuse lazy modules' parameters before anything reads their shape (roles depend on it)."""
    lazy = [name for name, p in named if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"parameters of a lazy module are not initialised yet ({', '.join(lazy[:4])}"
                         f"{', …' if len(lazy) > 4 else ''}): run one forward pass before building the optimizer "
                         "(the roles depend on their shapes)")


_EAGER_UPDATE = []  # made on first use (a list, not functools.cache: dynamo warns on lru_cache calls)


def _eager_update():
    """ManifoldOptimizer._update, run eagerly inside compiled code (a graph break). The step checks
    gradients on the host and solves with eighs and data-dependent exits: traced, dynamo recompiled
    its per-parameter frames until the recompile limit (4 compiled training steps of an 8→16→16→4
    MLP: 205 s, then eager anyway, and the fallback's AdamW kept step 2's bias correction from step
    3 on). Made on first use: torch.compiler.disable imports torch._dynamo, ~1.5 s that a plain
    `import modman` should not pay."""
    if not _EAGER_UPDATE:
        _EAGER_UPDATE.append(torch.compiler.disable(ManifoldOptimizer._update))
    return _EAGER_UPDATE[0]


def _listed(params) -> list:
    """A param group's params as a list (a tensor or module alone, or any iterable such as
    model.modules(), which can be read once only)."""
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                        "ordering of tensors in sets changes between runs; use a list")
    return [params] if isinstance(params, (torch.Tensor, nn.Module)) else list(params)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of a parameter's floating state (momentum, dual, AdamW moments)."""
    return F.state_dtype(p.dtype)


_FLOATING_STATE = ("momentum", "dual", "exp_avg", "exp_avg_sq")


def _moved_since(p: torch.Tensor, state: dict) -> bool:
    """Whether p changed dtype or device since its state was made (its momentum or first moment
    tells, for all its entries: they are made and recast together). One entry, not all: the check
    runs for every parameter at every step (all entries took 10 % of a step of 1000 small tensors)."""
    v = state.get("momentum")
    if v is None:
        v = state.get("exp_avg")
    return v is not None and (v.dtype != _state_dtype(p) or v.device != p.device)


def _recast_state(p: torch.Tensor, state: dict, source: dict | None = None) -> None:
    """Give p's state the dtype and device its step keeps, in place: floating state in
    ``_state_dtype(p)`` on p's device, a solver's own entries (subspace size, μ: fp64) on p's device,
    AdamW's step count where it is (torch keeps it on the CPU). Values come from ``source``
    (default: the state itself): load_state_dict recasts from the saved tensors, not from torch's
    cast of them to p's dtype (an fp32 momentum of a bf16 weight would lose its bits). At each step,
    for a model moved after the optimizer was built (``model.double()``, ``model.to(device)``): its
    fp32 momentum met fp64 weights and the AdamW fallback failed after the matrices had stepped."""
    source = state if source is None else source
    want = _state_dtype(p)
    for key, value in source.items():
        if not isinstance(value, torch.Tensor) or key == "step":
            continue
        if key in _FLOATING_STATE:
            if state[key].dtype != want or state[key].device != p.device:
                state[key] = value.to(device=p.device, dtype=want)
        elif key not in _RESERVED and (state[key].device != p.device or state[key].dtype != value.dtype):
            state[key] = value.to(device=p.device)  # (fp64 as saved: torch's load cast it to p's dtype)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _check_nonneg(name: str, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if not is_finite_real(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number ≥ 0)")


def _lora_partner(name: str, params: dict):
    """The parameter ``…lora_B.<adapter>.weight`` of a LoRA ``…lora_A.<adapter>.weight`` (modman's
    or PEFT's naming) when the optimizer holds it, else None."""
    head, sep, tail = name.rpartition("lora_A.")
    if not sep or tail.count(".") != 1 or not tail.endswith(".weight"):
        return None
    return params.get(f"{head}lora_B.{tail}")


def _scalar(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


# torch's optimizers take these flags; a group carrying one was stored and ignored (maximize=True on
# the AdamW fallback descended, where torch.optim.AdamW ascends: a user probe)
_UNSUPPORTED_FLAGS = (("maximize", "they minimise; negate the loss instead"),
                      ("capturable", "their steps are eager, not CUDA-graph capturable"),
                      ("fused", "they have no fused kernels"),
                      ("differentiable", "their steps run under no_grad"))


def _check_flags(d: dict, where: str = "") -> None:
    """Refuse a torch flag modman's optimizers do not implement, set true in ``d``, and a foreach
    that is not None or a bool: at construction, add_param_group, load_state_dict and, for one set
    on a group later, the step."""
    for key, why in _UNSUPPORTED_FLAGS:
        if d.get(key):
            raise ValueError(f"{where}{key}={d[key]!r} is not supported by modman's optimizers ({why})")
    if d.get("foreach") is not None and not isinstance(d["foreach"], bool):
        raise TypeError(f"Invalid {where}foreach: {d['foreach']!r} (must be None, True or False)")


def _check_hyperparameters(d: dict, where: str = "") -> None:
    """Refuse the first invalid hyperparameter in ``d`` (defaults, fallback options or a group),
    naming it, so that a bad value fails at the door rather than at the first step()."""
    for key in ("lr", "lr_scale", "momentum", "weight_decay", "eps"):
        if key in d:
            _check_nonneg(where + key, d[key])
    if _scalar(d.get("momentum", 0.0)) >= 1:
        raise ValueError(f"Invalid {where}momentum: {d['momentum']} (must be < 1)")
    for key in ("nesterov", "torch_arithmetic"):
        if key in d and not isinstance(d[key], bool):
            raise TypeError(f"Invalid {key}: {d[key]!r} (must be True or False)")
    if "betas" in d:
        betas = d["betas"]
        def beta_ok(b):  # a number, a 0-d tensor or a numpy scalar, as torch's Adam takes them
            try:
                return not isinstance(b, bool) and 0 <= float(b) < 1
            except (TypeError, ValueError, RuntimeError):
                return False

        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(beta_ok(b) for b in betas):
            raise ValueError(f"Invalid {where}betas: {betas!r} (must be two numbers, each in [0, 1))")
    _check_flags(d, where)
    if d.get("tol") is not None:
        _check_nonneg("tol", d["tol"])
    if d.get("max_iters") is not None and not (is_int(d["max_iters"]) and d["max_iters"] >= 0):
        raise ValueError(f"Invalid max_iters: {d['max_iters']!r} (must be an int ≥ 0, or None for the solver's default)")
    if d.get("solver") is not None:
        from ..solvers import SOLVERS

        if d["solver"] not in SOLVERS:
            raise ValueError(f"unknown solver {d['solver']!r}; choose from {sorted(SOLVERS)}")
    schedule = d.get("ns_schedule")
    if schedule is not None or d.get("algorithm") == "muon":
        from ..linalg import SCHEDULES

        # torch's arithmetic runs the schedule's Newton–Schulz coefficients: "svd" has none
        known = sorted(SCHEDULES) + ([] if d.get("torch_arithmetic") else ["svd"])
        if schedule not in known:
            raise ValueError(f"Invalid ns_schedule: {schedule!r} (choose from {known}"
                             + ("; 'svd' needs torch_arithmetic=False)" if d.get("torch_arithmetic") else ")"))
    if d.get("ns_steps") is not None and not (is_int(d["ns_steps"]) and d["ns_steps"] >= 1):
        raise ValueError(f"Invalid ns_steps: {d['ns_steps']!r} (must be an int ≥ 1, or None for the schedule's default)")
    if "ns_dtype" in d and d["ns_dtype"] not in _DTYPES:
        raise ValueError(f"ns_dtype must be a dtype name such as 'bfloat16', got {d['ns_dtype']!r}")
    if d.get("adjust_lr_fn") not in (None, "original", "match_rms_adamw", "none"):
        raise ValueError(f"adjust_lr_fn must be None, 'original', 'match_rms_adamw' or 'none', got {d['adjust_lr_fn']!r}")


def _moved_message(optimizer: str, report: list[tuple[str, str, str]]) -> str:
    """One warning naming every weight construction moved onto its manifold, with its distance
    (one warning per weight made 44 for a 6-layer transformer): [(name, manifold, detail)]."""
    if len(report) == 1:
        name, manifold, detail = report[0]
        return f"{optimizer}: moved {name} onto the {manifold} manifold ({detail})"
    lines = [f"  {name} → {manifold} ({detail})" for name, manifold, detail in report]
    return (f"{optimizer}: moved {len(report)} weights onto their manifolds (project_on_init=False keeps "
            "weights as loaded):\n" + "\n".join(lines))


def _unique(name: str, taken: set[str]) -> str:
    """name, or name_1, name_2, … : the first not in taken (which it joins)."""
    out, j = name, 0
    while out in taken:
        j += 1
        out = f"{name}_{j}"
    taken.add(out)
    return out


def _name_unnamed(groups: list[dict], taken: set[str], start: int) -> None:
    """Pair every plain tensor in groups with a name "param{k}", k its index over all groups
    counting from ``start`` (the name ``_param_names`` gives it unnamed), unique against taken."""
    k = start
    for g in groups:
        ps = g["params"]
        if not isinstance(ps, list):  # a set: torch refuses it, saying why
            continue
        g["params"] = [p if isinstance(p, tuple) else (_unique(f"param{k + i}", taken), p) for i, p in enumerate(ps)]
        k += len(ps)


class ManifoldOptimizer(Optimizer):
    """Shared machinery; see ManifoldMuon, Muon and HypersphericalDescent for the maths."""

    # role -> (manifold, algorithm) run for it by this family member; None sends it to the fallback
    ALGORITHMS: dict[str, tuple[str, str] | None] = {}

    def __init__(self, params, defaults: dict, *, fallback: dict | None, roles: dict | None, budget,
                 project_on_init: bool, on_manifold_tol: float, nonfinite: str, distributed=False):
        if built_by_zero():
            raise TypeError(f"ZeroRedundancyOptimizer(optimizer_class={type(self).__name__}) is not supported: each "
                            "rank would hold a shard of the parameters, and modman's steps and groups are per "
                            "whole matrix; under DDP pass distributed=True instead (it shards the solves)")
        _check_hyperparameters(defaults)
        self._process_group = resolve_group(distributed)  # None: every rank steps everything
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        _check_nonneg("on_manifold_tol", on_manifold_tol)
        fb = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
        unknown = set(fallback or {}) - set(fb)
        if unknown:
            raise ValueError(f"unknown fallback option(s) {sorted(unknown)}; allowed: {sorted(fb)}")
        fb.update(fallback or {})
        _check_hyperparameters(fb, "fallback ")
        self.nonfinite = nonfinite
        self.on_manifold_tol = float(on_manifold_tol)
        self.project_on_init = bool(project_on_init)
        self.last_step_stats: dict[str, dict[str, Any]] = {}
        self.last_step_skipped = False
        self._fallback_defaults = fb
        self._budget_scale = defaults.get("scale")
        groups = self._build_groups(params, roles, budget, fb)
        # flatten: None = by shape (≥ 4-D flattened), True for Conv weights (see functional.as_matrix).
        # "betas" and "eps" live in the fallback groups only: torch's schedulers with cycle_momentum
        # (OneCycleLR, CyclicLR) cycle betas[0] of every group when "betas" is in the defaults, and
        # "momentum" otherwise — the key the constrained groups read, as for torch.optim.Muon.
        defaults = dict(defaults, lr_scale=1.0, algorithm="adamw", manifold="euclidean", flatten=None,
                        differentiable=False)
        self._constructing = True
        self._constructed_ids: set[int] = set()
        super().__init__(groups, defaults)
        self._constructing = False
        del self._constructed_ids
        self._own_hyperparameters()
        self._refuse_sharded(self.param_groups)  # (before the shapes are judged: a shard is 1-D)
        self._validate_groups(self.param_groups)  # (a negative weight_decay is refused before it is zeroed)
        self._no_decay_on_fixed_norms(self.param_groups)
        if project_on_init:
            self._project_onto_manifolds(self.param_groups)

    # ----------------------------------------------------------------------------- groups
    def _build_groups(self, params, roles, budget, fb):
        if isinstance(params, nn.Module):
            # the module's whole tree, as params.modules() (iterating an nn.Sequential gives its children)
            params = [params]
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors, "
                            f"dicts or modules, but got {torch.typename(params)}")
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(m, tuple) and len(m) == 2 and isinstance(m[1], nn.Module) for m in items):
            # model.named_modules(): the modules (their names come from the tree, as for modules()),
            # where torch's "can only optimize Tensors, but one of the params is …Module" hinted at nothing
            items = [m for _, m in items]
        if all(isinstance(m, nn.Module) for m in items):
            network = expand_modules(items)
            assignments = self._assign(network, roles)
            if not assignments:
                raise ValueError("the given modules have no trainable parameters")
            scales = resolve_budget(budget, network, assignments, {r for r, v in self.ALGORITHMS.items() if v},
                                    scale=self._budget_scale, owner=type(self).__name__)
            groups, fallback = [], {"params": [], "param_names": [], "algorithm": "adamw", **fb,
                                    "manifold": "euclidean"}
            for a in assignments:
                spec = self.ALGORITHMS.get(a.role)
                if spec is None:
                    fallback["params"].append(a.param)
                    fallback["param_names"].append(a.name)
                else:
                    groups.append({"params": [a.param], "param_names": [a.name], "manifold": spec[0],
                                   "algorithm": spec[1], "lr_scale": float(scales.get(a.name, 1.0)),
                                   "flatten": a.view})
            if not groups:  # e.g. a model of biases and norms only: say so rather than be AdamW quietly
                warn(f"{type(self).__name__}: no parameter of the given modules has a constrained role; all "
                     f"{len(fallback['params'])} go to the AdamW fallback (fallback lr {fb['lr']:g}; the lr "
                     "given is unused)")
            return groups + ([fallback] if fallback["params"] else [])
        if any(isinstance(m, nn.Module) for m in items):
            raise TypeError("params must be all modules or all tensors/dicts/(name, tensor) pairs, not a mix")
        if budget not in (None, "uniform", "auto"):
            raise ValueError("budget needs the model's modules as params (e.g. model.modules()) to know the "
                             "network; got tensors or param groups")
        if isinstance(items[0], dict):
            user_groups = items
        else:
            user_groups = [{"params": items}]
        for ug in user_groups:
            if not isinstance(ug, dict):
                raise TypeError(f"param groups must all be dicts, got {type(ug).__name__}")
        # params listed once (model.modules() is a generator): roles= is checked against every
        # group's modules together, one roles for all the groups
        user_groups = [dict(ug, params=_listed(ug["params"])) if "params" in ug else ug for ug in user_groups]
        if roles:
            networks = [expand_modules(ug["params"]) for ug in user_groups
                        if ug.get("params") and all(isinstance(m, nn.Module) for m in ug["params"])]
            if not networks:
                raise ValueError("roles= needs modules (model.modules(), or param groups of modules) to know the "
                                 "layers; given tensors, roles follow shapes (or a group's 'manifold')")
            check_roles(roles, *networks)
        groups, present, taken = [], set(), set()
        for ug in user_groups:
            groups.extend(self._split_group(ug, fb, present, taken, roles))
        if any(isinstance(item, tuple) for g in groups for item in g["params"]):
            _name_unnamed(groups, taken, 0)  # torch takes groups all with names or all without
        return groups

    def _split_group(self, ug: dict, fb: dict, present: set[int], taken: set[str], roles: dict | None = None,
                     named: bool = True) -> list[dict]:
        """One user group → one group per role, each with the user group's options.

        ``params`` holds tensors or (name, tensor) pairs (role by shape, or the group's
        ``manifold``), or modules, expanded as at construction (roles per layer; parameters whose
        id is in ``present`` — already in the optimizer — skipped; names made unique against
        ``taken``, or dropped when ``named`` is False). Updates ``present`` and ``taken``.
        """
        if "params" not in ug:
            raise ValueError("a param group dict needs a 'params' entry")
        ps = _listed(ug["params"])
        entries = []  # (item as it goes into the group, tensor, role, its matrix view: _view)
        if ps and all(isinstance(m, nn.Module) for m in ps):
            # roles= was checked against every group's modules (_build_groups); parameters already
            # in the optimizer are left out (and not reported again as fallback matrices)
            for a in self._assign(expand_modules(ps), roles, check=False, exclude=present):
                entries.append(((_unique(a.name, taken), a.param) if named else a.param, a.param, a.role, a.view))
            if not entries:
                raise ValueError("the given modules have no trainable parameters that are not in the optimizer")
        else:
            if any(isinstance(m, nn.Module) for m in ps):
                raise TypeError("a param group's params must be all modules or all tensors/(name, tensor) pairs")
            named_items = [p for p in ps if isinstance(p, tuple)]
            if named_items and len(named_items) != len(ps):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            for item in ps:
                p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
                if not isinstance(p, torch.Tensor):
                    raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
                _check_initialised([(item[0] if isinstance(item, tuple) else "unnamed", p)])
                if isinstance(item, tuple):
                    taken.add(item[0])
                entries.append((item, p, "stiefel" if p.ndim >= 2 and p.numel() else "fallback", None))
        explicit = ug.get("manifold")
        for i, (item, p, _, _) in enumerate(entries):
            if explicit in ("stiefel", "sphere") and (p.ndim < (2 if explicit == "stiefel" else 1) or not p.numel()):
                # asked for by name: refused here, before this member maps the role to its own manifold
                # (HypersphericalDescent's "stiefel" is row spheres: a bias went onto one sphere);
                # an unnamed one by its place in the group ("a parameter" named none of several; a probe)
                name = item[0] if isinstance(item, tuple) else f"the group's parameter {i}"
                raise ValueError(f"manifold {explicit!r} needs a non-empty {'matrix' if explicit == 'stiefel' else 'tensor'}; "
                                 f"{name} has shape {tuple(p.shape)}: give it to the fallback group")
        buckets: dict[tuple, list] = {}
        for item, p, role, view in entries:
            present.add(id(p))
            if explicit:
                role = explicit
            elif ug.get("algorithm") == "adamw":
                role = "fallback"
            if role not in ROLES:
                raise ValueError(f"unknown manifold {role!r} in a param group; "
                                 "choose 'stiefel', 'sphere', 'euclidean' or 'fallback'")
            if role != "fallback" and self.ALGORITHMS.get(role) is None:
                if explicit:
                    raise ValueError(f"{type(self).__name__} does not handle manifold {role!r}")
                role = "fallback"
            buckets.setdefault((role, view if role != "fallback" else None), []).append(item)
        out = []
        for (role, view), members in buckets.items():
            g = {k: v for k, v in ug.items() if k != "params"}
            g["params"] = members
            if view is not None:
                g["flatten"] = view
            if role == "fallback":
                for k, v in fb.items():
                    g.setdefault(k, v)
                if len(buckets) > 1 and ug.get("algorithm") != "adamw":
                    # a group with constrained weights: its lr is their step length in their norm
                    # ({"params": model.head, "lr": 0.2}: the head's bias ran AdamW at lr 0.2), so
                    # its biases and gains take the fallback's lr (betas, eps, weight_decay are the
                    # fallback's own keys and stay as the group sets them)
                    g["lr"] = fb["lr"]
                g.update(algorithm="adamw", manifold="euclidean")
            else:
                manifold, algorithm = self.ALGORITHMS[role]
                g.update(manifold=manifold, algorithm=algorithm)
            out.append(g)
        return out

    def _assign(self, network, roles, **options) -> list:
        """``assign_modules`` for this family member, refusing first a lazy module's parameters and
        then what an assignment cannot do here: a role roles= asked for that this member does not run
        (Muon has no sphere: it went to the AdamW fallback without a word), and a sparse embedding
        (refused only at the first step before)."""
        _check_initialised(network.root.named_parameters())
        assignments = assign_modules(network, roles, **options)
        # embeddings whose forward renormalises rows (max_norm), by weight, tied ones included: checked
        # against the radius of the group each lands in (``_validate_groups``)
        self._renormed = {**getattr(self, "_renormed", {}), **{
            id(m.weight): (network.names.get(id(m), type(m).__name__), m) for m in network.modules
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None}}
        runs = sorted(k for k, v in self.ALGORITHMS.items() if v)
        for a in assignments:
            if a.asked and a.role != "fallback" and self.ALGORITHMS.get(a.role) is None:
                raise ValueError(f"{type(self).__name__} has no {a.role!r} role (asked for {a.name} in roles=); "
                                 f"it runs {runs} and 'fallback'")
            if isinstance(a.module, (nn.Embedding, nn.EmbeddingBag)) and a.module.sparse:
                raise TypeError(f"{a.name}: {type(a.module).__name__}(sparse=True) gives sparse gradients, which "
                                f"{type(self).__name__} does not support; build it with sparse=False")
        return assignments

    def _refuse_renormed(self, group) -> None:
        """An Embedding whose forward renormalises its rows (max_norm) below the sphere's radius: every
        forward shrank the rows each step put on the sphere, in place — the model never saw the
        sphere, and each step started off it (a probe). On the ℓ2 sphere of radius r a row's
        ℓp norm reaches r·d^max(0, 1/p − 1/2), so a smaller max_norm shrinks some rows."""
        radius = self._sphere_radius(group)
        for p in group["params"]:
            module_name, module = getattr(self, "_renormed", {}).get(id(p), (None, None))
            if module is None or module.weight is not p:  # (an id can be reused once a weight is freed)
                continue
            # (ℓp with p ≤ 0 is no norm; torch's renorm still shrinks rows by it: refused)
            q = module.norm_type
            limit = radius * p.shape[-1] ** max(0.0, 1 / q - 0.5) if q > 0 else math.inf
            if module.max_norm < limit:
                raise ValueError(f"{module_name}: {type(module).__name__}(max_norm={module.max_norm:g}, "
                                 f"norm_type={module.norm_type:g}) shrinks rows the optimizer keeps on the sphere of "
                                 f"radius {radius:g} (their ℓ{module.norm_type:g} norms reach {limit:.4g}); build it "
                                 "with max_norm=None or give its weight another role (roles=)")

    def _check_settings(self, group: dict, where: str = ""):
        """A group's (manifold, algorithm) pair and every hyperparameter, its scale or radius
        included, without looking at its parameters: at construction, add_param_group,
        load_state_dict and the start of every step (hyperparameters are read from param_groups
        every step: schedulers, and users, write them). Returns the group's manifold (None for
        the AdamW fallback)."""
        from ..solvers import SOLVERS

        algorithm, m = group["algorithm"], group["manifold"]
        runs = sorted({pair for pair in self.ALGORITHMS.values() if pair} | {("euclidean", "adamw")})
        try:
            if (m, algorithm) not in runs:  # (add_param_group took any; the next step failed halfway)
                raise ValueError(f"a param group with manifold={m!r}, algorithm={algorithm!r}: "
                                 f"{type(self).__name__} runs (manifold, algorithm) in {runs}")
            _check_hyperparameters(group)
            if algorithm == "manifold_muon" and group.get("solver") not in SOLVERS:
                raise ValueError(f"unknown solver {group.get('solver')!r}; choose from {sorted(SOLVERS)}")
            return None if algorithm == "adamw" else self._manifold(group)  # (raises on a bad scale / radius)
        except (TypeError, ValueError) as e:
            if not where:
                raise
            raise type(e)(f"{where}{e}") from None

    def _validate_groups(self, groups) -> None:
        """Every hyperparameter of every group, and every parameter's shape against its manifold."""
        names = self._param_names()
        for group in groups:
            algorithm, m = group["algorithm"], group["manifold"]
            manifold = self._check_settings(group)
            if m == "sphere":
                self._refuse_renormed(group)
            for p in group["params"]:
                name = names[id(p)]
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters ({name})")
                if p.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse parameters ({name})")
                if algorithm == "adamw":
                    continue
                if p.numel() == 0:  # (roles= or a group's manifold: the step raised after updating others)
                    raise ValueError(f"parameter {name} of shape {tuple(p.shape)} is empty: nothing for {algorithm} to "
                                     "step; leave it to the fallback group (its default role)")
                shape = F.as_matrix(p, group.get("flatten")).shape
                if (m in ("stiefel", "euclidean") and len(shape) < 2) or (m == "sphere" and len(shape) < 1):
                    raise ValueError(f"parameter {name} of shape {tuple(p.shape)} cannot live on {m!r} "
                                     f"(needs ≥ {1 if m == 'sphere' else 2} dims); give it to the fallback group")
                manifold.check_shape(shape, name)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; without an ``algorithm`` key it is split by role as at construction.

        ``params`` may hold tensors, (name, tensor) pairs or modules: modules are expanded as at
        construction (roles per layer), skipping parameters already in the optimizer, so
        ``add_param_group({"params": model.modules()})`` adds those unfrozen since construction.
        When the optimizer's parameters have names, plain tensors get "param{k}" (k: the index
        over all groups, as ``describe()`` shows unnamed ones); when they have none, so do the
        modules' parameters. Constrained parameters are validated and, with ``project_on_init``,
        moved onto their manifold like those given at construction. A refused group leaves the
        optimizer as it was.
        """
        if getattr(self, "_constructed_ids", None) is not None and isinstance(param_group, dict):
            self._add_constructed_group(param_group)
            return
        if getattr(self, "_constructing", True) or not isinstance(param_group, dict):
            super().add_param_group(param_group)
            return
        fb = self._fallback_defaults
        names = self._param_names()
        taken = set(names.values())
        named = any("param_names" in g for g in self.param_groups)
        if "algorithm" in param_group:  # a group as param_groups hold them: taken as it is
            g = dict(param_group)
            if isinstance(g.get("params"), torch.Tensor):
                g["params"] = [g["params"]]
            elif not isinstance(g.get("params"), (set, type(None))):  # torch refuses those, saying why
                g["params"] = list(g["params"])
            if g["algorithm"] == "adamw":
                for k, v in fb.items():
                    g.setdefault(k, v)
            parts = [g]
        else:
            parts = self._split_group(param_group, fb, {id(p) for g in self.param_groups for p in g["params"]},
                                      taken, named=named)
        if named:
            _name_unnamed(parts, taken, len(names))
        start = len(self.param_groups)
        try:
            for g in parts:
                super().add_param_group(g)
            self._check_added(start)
        except Exception:
            del self.param_groups[start:]  # refused: the optimizer is left as it was
            raise

    def _add_constructed_group(self, param_group: dict) -> None:
        """torch's add_param_group at construction, its cross-group checks made against a running
        set: torch's gathers every earlier group's parameters for each new group, quadratic over
        one group per matrix (2000 layers: 3.0 of 3.5 s of construction, a probe). Torch still
        checks the group itself (defaults, duplicates within it), shown no earlier group."""
        earlier, self.param_groups = self.param_groups, []
        try:
            super().add_param_group(param_group)
        finally:
            added, self.param_groups = self.param_groups, earlier
        group = added[0]
        if earlier and ("param_names" in group) != ("param_names" in earlier[0]):  # torch's own check
            raise ValueError("all optimizer param groups should be with/without names. cannot add param group "
                             f"{'with' if 'param_names' in group else 'without'} names to the optimizer")
        ids = {id(p) for p in group["params"]}
        if not ids.isdisjoint(self._constructed_ids):
            raise ValueError("some parameters appear in more than one parameter group")
        self._constructed_ids |= ids
        earlier.append(group)

    def _own_hyperparameters(self) -> None:
        """numpy scalars become Python numbers, and each group gets its own copy of a tensor
        hyperparameter another group already holds.

        A state_dict must hold plain Python values and tensors, or ``torch.load(weights_only=True)``
        refuses it (an np.float32 lr was saved as is). One ``lr=torch.tensor(…)`` for
        ``model.modules()`` lands in every role group (torch's add_param_group shares a default),
        and schedulers update a tensor lr in place group by group: ReduceLROnPlateau then cut it by
        factorᴷ for K groups. The first group keeps the tensor given (a user who drives every
        group through one shared tensor drives the first one only)."""
        seen: set[int] = set()
        for group in self.param_groups:
            for key, value in list(group.items()):
                if key in ("params", "param_names"):
                    continue
                if isinstance(value, numbers.Number) and hasattr(value, "item"):  # a numpy scalar
                    group[key] = value.item()
                elif isinstance(value, (tuple, list)) and any(isinstance(v, numbers.Number) and hasattr(v, "item")
                                                              for v in value):
                    group[key] = type(value)(v.item() if hasattr(v, "item") else v for v in value)  # betas
                elif isinstance(value, torch.Tensor):
                    if id(value) in seen:
                        group[key] = value.clone()
                    seen.add(id(group[key]))

    def _refuse_sharded(self, groups) -> None:
        """A parameter sharded across ranks cannot be stepped here: a constrained step needs its
        whole matrix (an msign, a projection), and each rank holds a piece. FSDP2's DTensors
        (``fully_shard``, tensor parallelism) built, then failed inside the first step ("got mixed
        torch.Tensor and DTensor"); FSDP1's flattened 1-D shards went to the fallback or were named
        as unholdable (a probe). Refused by name with what works instead."""
        names = self._param_names()
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        advice = ("each constrained step needs the whole matrix, which a sharded parameter spreads over "
                  "the ranks; use DDP (distributed=True deals the solves out across the ranks)")
        for group in groups:
            constrained = group["algorithm"] != "adamw"
            for p in group["params"]:
                # FSDP1 marks its parameters _fsdp_flattened: the FlatParameter (_is_flat_param: all of a
                # module's weights in one 1-D tensor, never a matrix) and, with use_orig_params=True, the
                # originals — whole under NO_SHARD (allowed: a 2-D weight stays 2-D), 1-D shards otherwise
                flat = getattr(p, "_is_flat_param", False) or (
                    constrained and getattr(p, "_fsdp_flattened", False) and p.ndim < 2)
                if flat:
                    raise TypeError(f"{names[id(p)]} is a parameter of FullyShardedDataParallel (FSDP), flattened "
                                    f"and sharded: not supported; {advice}")
                # the AdamW fallback too: elementwise, it could step a shard, but its step reads storage
                # pointers and mixes DTensor with plain gradients in one foreach call (it failed in
                # the first step, "invalid python storage"; a probe)
                if dtensor is not None and isinstance(p, dtensor):
                    raise TypeError(f"{names[id(p)]} is a DTensor (FSDP2's fully_shard or tensor parallelism): "
                                    f"not supported{'' if constrained else ', not even in the AdamW fallback'}; "
                                    f"{advice}")

    @staticmethod
    def _no_decay_on_fixed_norms(groups) -> None:
        """weight_decay is 0 where the step keeps the norm fixed (a Stiefel or sphere weight has
        nothing to decay): the group shows what is applied; its fallback part keeps the group's."""
        for group in groups:
            if group["algorithm"] not in ("adamw", "muon"):
                group["weight_decay"] = 0.0

    def _check_added(self, start: int) -> None:
        """Validate the groups from index ``start`` on and move their weights onto their manifolds."""
        added = self.param_groups[start:]
        self._own_hyperparameters()
        self._refuse_sharded(added)
        self._validate_groups(added)
        self._no_decay_on_fixed_norms(added)
        if self.project_on_init:
            self._project_onto_manifolds(added)

    # ----------------------------------------------------------------------------- helpers
    def _param_names(self) -> dict[int, str]:
        """id(parameter) → its name, or "param{k}" with k its index over all groups (unique)."""
        out, k = {}, 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                out[id(p)] = group["param_names"][i] if group.get("param_names") else f"param{k}"
                k += 1
        return out

    def _manifold(self, group):
        m = group["manifold"]
        if m == "stiefel":
            return Stiefel(group.get("scale"))
        if m == "sphere":
            return Sphere(self._sphere_radius(group))
        return Euclidean()

    @staticmethod
    def _sphere_radius(group) -> float:
        r = group.get("radius")
        return 1.0 if r is None else float(r)

    def _project_onto_manifolds(self, groups) -> None:
        """Move constrained weights onto their manifold (exact polar factor / row normalisation).

        Frozen parameters (``requires_grad=False``; given as tensors — modules leave them out) are
        not touched. A weight within ``on_manifold_tol`` — or within 2·eps of its dtype, the rounding of an exact
        point (a bf16 checkpoint sits ~1e-3 off) — stays bitwise. Rows of a sphere weight that are
        exactly zero stay zero: that is nn.Embedding's ``padding_idx`` row, which never gets a
        gradient (and has no nearest point on the sphere). All projections are computed before any
        weight is written, so a weight that cannot be projected raises, naming it, with every
        weight untouched.
        """
        names = self._param_names()
        by_name = {names[id(p)]: p for g in self.param_groups for p in g["params"]}
        moves = []
        with torch.no_grad():
            for group in groups:
                if group["algorithm"] == "adamw" or group["manifold"] == "euclidean":
                    continue
                manifold = self._manifold(group)
                for p in group["params"]:
                    if not p.requires_grad:
                        continue  # frozen (passed as a tensor): stays as loaded, as with modules
                    if p.is_meta:  # (torch: "Tensor.item() cannot be called on meta tensors")
                        raise ValueError(f"cannot move {names[id(p)]} onto the {group['manifold']} manifold: it is "
                                         "on the meta device (no values yet); build the optimizer once the weights "
                                         "are materialised (after model.to_empty(...) and their initialisation or "
                                         "loading: to_empty replaces the parameters, so an optimizer built before "
                                         "it would step nothing)")
                    W = F.as_matrix(p, group.get("flatten"))
                    if not bool(torch.isfinite(W).all()):  # (an eigh would fail naming nothing)
                        raise ValueError(f"cannot move {names[id(p)]} onto the {group['manifold']} manifold: "
                                         "it has NaN or infinite entries; no weight was changed")
                    rows = None
                    if group["manifold"] == "sphere":
                        full = W.reshape(-1, W.shape[-1])
                        rows = full.ne(0).any(dim=-1)  # the rows that are not padding
                        W = full[rows]
                    dist = float(manifold.distance(W).max()) if W.numel() else 0.0
                    if dist <= max(self.on_manifold_tol, 2 * torch.finfo(p.dtype).eps):
                        continue  # stays bitwise unchanged
                    try:
                        target = manifold.project(W)
                    except ValueError as e:
                        raise ValueError(f"cannot move {names[id(p)]} onto the {group['manifold']} manifold: {e}") from e
                    if rows is not None:
                        full = full.clone()
                        full[rows] = target.to(full.dtype)
                        target = full
                    B = _lora_partner(names[id(p)], by_name) if group["manifold"] == "stiefel" else None
                    partnered = B is not None and B.ndim == 2 and W.ndim == 2 and B.shape[1] == W.shape[0]
                    moves.append((p, F.from_matrix(target, p, group.get("flatten")), names[id(p)], group["manifold"],
                                  dist, partnered))
                    if partnered:
                        # a LoRA A (r × d_in) with its B in the optimizer. The target is T = s·U with U
                        # on Stiefel, so TᵀT = s²I (tall) or T Tᵀ = s²I with A's rows in T's row space
                        # (wide): either way B' = B·A·Tᵀ/s² gives B'·T = B·A, the model's outputs unchanged
                        wide = torch.promote_types(W.dtype, torch.float64)
                        T = target.to(wide)
                        s2 = manifold.scale_for(W.shape) ** 2
                        B_new = (B.to(wide) @ W.to(wide)) @ T.mT / s2
                        moves.append((B, B_new.to(B.dtype), None, None, None, False))
            report = []
            for p, target, name, manifold_name, dist, partnered in moves:
                zero = name is not None and not bool(p.any())
                p.copy_(target)
                # a LoRA A moved with its B rescaled leaves B·A and the model's outputs as they were:
                # nothing to report (the B of a pair has no name here)
                if name is not None and not partnered:
                    note = ""
                    if zero:  # a zero-initialised layer (an output projection): every point is as near
                        note += ("; it was all zeros, which no point of the manifold is near: it is now a fixed "
                                 "arbitrary point (keep it at zero with roles={...: 'fallback'})")
                    report.append((name, manifold_name, f"distance was {dist:.3g}{note}"))
        if report:
            warn(_moved_message(type(self).__name__, report))

    # ----------------------------------------------------------------------------- step
    def _grads_finite(self) -> bool:
        # max |g| of each gradient in its own dtype (a cast to fp32 made fp64 gradients above 3.4e38
        # look infinite: every step refused, naming no parameter), by torch's foreach norm per device
        # and dtype, as torch.nn.utils.get_total_norm computes norms (NaN propagates): three ops per
        # gradient were 22 % of a step of 1000 small tensors (a probe)
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and p.grad.numel() > 0:
                    by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad.detach())
        return all(bool(torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all())
                   for grads in by_kind.values())

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "torch._dynamo" in sys.modules:  # someone may be compiling: the update runs eagerly
            _eager_update()(self)
        else:
            self._update()
        return loss

    def _update(self) -> None:
        names = self._param_names()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({names[id(p)]})")
                if p.grad is not None and (p.is_meta or p.grad.is_meta):  # (torch: "Tensor.item() cannot
                    # be called on meta tensors", from the finiteness check, naming nothing; without a
                    # gradient it is skipped, as by torch)
                    raise RuntimeError(f"{type(self).__name__}.step: {names[id(p)]} is on the meta device (no "
                                       "values to step); materialise the model first (model.to_empty(device=...) "
                                       "and its initialisation)")
                if p.grad is not None and p.grad.shape != p.shape:  # (set through .grad.data: failed mid-step)
                    raise RuntimeError(f"{type(self).__name__}.step: the gradient of {names[id(p)]} has shape "
                                       f"{tuple(p.grad.shape)}, the parameter {tuple(p.shape)}; no weight was changed")
                state = self.state.get(p)
                if state and _moved_since(p, state):
                    _recast_state(p, state)
        finite = self._grads_finite()
        pg = getattr(self, "_process_group", None)  # absent on an unpickled optimizer: local
        shared = [(group, p) for group in self.param_groups if group["algorithm"] in SHARED_ALGORITHMS
                  for p in group["params"] if p.grad is not None] if pg is not None else []
        # a parameter listed twice is one matrix with one owner, who steps it twice as one process
        # does, and one broadcast: dealt out per occurrence, one rank stepped it twice and also took
        # the other's broadcast of a matrix that rank never stepped (ManifoldMuon failed on one rank
        # and left the others waiting, Muon's ranks diverged; a probe)
        first = {}
        for group, p in shared:
            first.setdefault(id(p), (group, p))
        shared = list(first.values())
        elsewhere = []  # ranks whose gradients are not finite, all ranks agreeing on it
        if pg is not None:  # also with nothing to share here: the other ranks may think otherwise
            settings = [(f"group {i} ({names[id(g['params'][0])] if g['params'] else 'empty'})",
                         {k: v for k, v in g.items() if k not in ("params", "param_names")})
                        for i, g in enumerate(self.param_groups)]
            elsewhere = check_same_items(pg, [f"{names[id(p)]} {tuple(p.shape)} {p.dtype}" for _, p in shared], finite,
                                         settings, bits_checksums([t for _, p in shared
                                                                   for t in (p, self.state.get(p, {}).get("momentum"))]))
        # a flag or hyperparameter set on a group after construction (a scheduler's NaN lr, a solver
        # name), refused before anything changes: it failed inside the group loop, after earlier
        # groups had stepped (a probe) — after the ranks' check, which refuses a setting made on one
        # rank only on every rank (raised here alone, it left the others in the collective until gloo
        # aborted them; a review)
        # (~10 µs a group: 5 % of a step of 300 groups of 8×8 matrices, nothing at real sizes; a
        # fingerprint of the settings to skip unchanged groups cost as much as the check)
        for i, group in enumerate(self.param_groups):
            try:
                self._check_settings(group, f"parameter group {i}: ")
            except (TypeError, ValueError) as e:
                raise type(e)(f"{e}; no weight was changed") from None
        if not finite or elsewhere:
            if self.nonfinite == "raise":
                bad = [names[id(p)] for g in self.param_groups for p in g["params"]
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                where = f"in {', '.join(bad)}" if bad else f"on rank(s) {', '.join(map(str, elsewhere))}"
                raise FloatingPointError(f"non-finite gradient {where}; no weight was changed"
                                         + (" on any rank" if pg is not None else "")
                                         + " (pass nonfinite='skip' to skip such steps)")
            self.last_step_skipped = True
            self.last_step_stats = {}  # (the previous step's stayed: monitoring read them as this one's)
            return
        self.last_step_skipped = False
        stats = {}
        rank, owners = plan_owners(pg, [matrix_cost(F.as_matrix(p, g.get("flatten")).shape) for g, p in shared])
        owner = {id(p): r for (_, p), r in zip(shared, owners)}
        index = {id(p): i for i, (_, p) in enumerate(shared)}
        failed, errors = {}, {}
        for group in self.param_groups:  # state made in parameter order, as one at a time (state_dict)
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]  # noqa: B018 (a defaultdict: creates the entry)
        stacked = self._step_stacks(skip=set(owner), names=names)
        for group in self.param_groups:
            lr = _scalar(group["lr"])
            adamw_done = self._step_adamw_foreach(group)  # (in the group's turn, as one at a time)
            for p in group["params"]:
                if p.grad is None or id(p) in adamw_done:
                    continue
                if id(p) in stacked:
                    stats[names[id(p)]] = stacked[id(p)]
                    continue
                if owner.get(id(p), rank) != rank:
                    self._momentum(group, p, p.grad, self.state[p])  # its owner does the rest
                    continue
                try:
                    s = self._step_param(group, p, p.grad, self.state[p], lr)
                except Exception as e:
                    if id(p) not in owner:
                        raise  # a step every rank takes alike fails alike
                    # the other ranks wait for this matrix: tell them (share_step), then raise everywhere
                    failed[index[id(p)]], errors[names[id(p)]] = f"{type(e).__name__}: {e}", e
                    continue
                if s is not None:
                    stats[names[id(p)]] = s
        if shared:
            failures = share_step(pg, [(p, self.state[p], names[id(p)], self._warm_keys(self.state[p]))
                                       for _, p in shared], owners, stats, failed)
            order = [names[id(p)] for g in self.param_groups for p in g["params"]]
            stats = {n: stats[n] for n in order if n in stats}  # as one process lists them
            if failures:
                self.last_step_stats = stats
                message = "; ".join(f"{n} ({where})" for n, where in failures.items())
                raise RuntimeError(f"distributed step failed for {message}; every other matrix was "
                                   "stepped and shared") from next(iter(errors.values()), None)
        self.last_step_stats = stats

    def _step_stacks(self, skip: set[int], names: dict[int, str]) -> dict[int, dict]:
        """Step the manifold-Muon matrices that can share a solve as stacks (``batching.py``), except
        the parameters in ``skip`` (dealt out over ranks) and groups with ``foreach=False``; returns
        the stats of those stepped, by parameter id. Matrices left over step alone in ``_update``."""
        members = [(g, p) for g in self.param_groups if g["algorithm"] == "manifold_muon"
                   and g.get("foreach") is not False and g["solver"] in SEPARABLE_SOLVERS
                   for p in g["params"] if p.grad is not None and id(p) not in skip]
        # a parameter listed twice, or two sharing storage (in any groups), step one after the other
        # (one at a time the second sees the first's result; in a stack both would start from the
        # same weights, or the stack would step before a group earlier in the list)
        seen = Counter(p.untyped_storage().data_ptr() for g in self.param_groups for p in g["params"]
                       if p.grad is not None)
        keys = [self._stack_key(g, p) if seen[p.untyped_storage().data_ptr()] == 1 else None for g, p in members]
        sizes = [p.numel() * p.element_size() for _, p in members]
        stats = {}
        for run in plan_stacks(keys, sizes):
            batch = [members[i] for i in run]
            group, p = batch[0]
            warm_keys = self._warm_keys(self.state[p])  # (the same in every member: part of the key)
            W = stack([F.as_matrix(p, g.get("flatten")) for g, p in batch])
            warm = {k: torch.stack([self.state[p][k] for _, p in batch]) for k in warm_keys}
            lr = torch.tensor([_scalar(g["lr"]) * _scalar(g["lr_scale"]) for g, _ in batch], dtype=torch.float64,
                              device=W.device)
            active = torch.stack([F.gradient_present(F.as_matrix(p.grad, g.get("flatten"))) for g, p in batch])
            resting = (~active).tolist()  # (one host sync, not one per member)
            try:
                # (the momentum stack is made in the call, with no name here: the step releases it
                # after the solve, as for one matrix)
                out = F.stiefel_step(W, stack([self._momentum(g, p, p.grad, self.state[p]) for g, p in batch]),
                                     warm, lr=lr, manifold=self._manifold(group), solver=group["solver"],
                                     tol=group["tol"], max_iters=group.get("max_iters"),
                                     drift_tol=2 * self.on_manifold_tol, warm_keys=warm_keys or ("dual",),
                                     active=active)
            except Exception as e:
                if hasattr(e, "add_note"):  # (Python ≥ 3.11) the solver names batch members by position
                    e.add_note(f"{type(self).__name__} stepped these as one stack, in this order: "
                               + ", ".join(names[id(p)] for _, p in batch) + " (foreach=False steps them one by one)")
                raise
            for i, (g, p) in enumerate(batch):
                p.copy_(F.from_matrix(W[i], p, g.get("flatten")))
                stats[id(p)] = {k: v[i] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in out.items()}
                if resting[i]:
                    continue  # a resting matrix keeps its state, as alone (no solve, no warm start)
                state = self.state[p]
                for k in warm_keys:  # (a solver's entries it no longer returns go, as in stiefel_step)
                    state.pop(k, None)
                state.update({k: v[i].clone() for k, v in warm.items()})
        return stats

    def _stack_key(self, group, p):
        """What matrices must share to be stepped as one stack (all but lr × lr_scale, momentum and
        nesterov, which are per matrix): None for a parameter that is not one 2-D matrix."""
        W = F.as_matrix(p, group.get("flatten"))
        if W.ndim != 2:
            return None
        state = self.state[p]
        warm = tuple((k, tuple(state[k].shape), state[k].dtype) for k in self._warm_keys(state))
        return (tuple(W.shape), transposed(W), p.dtype, p.device, group["manifold"], group.get("scale"),
                group["solver"], group["tol"], group.get("max_iters"), warm)

    @staticmethod
    def _warm_keys(state) -> tuple[str, ...]:
        """The solver's warm-start entries of a parameter's state (the dual, the subspace size, …)."""
        return tuple(k for k in state if k not in _RESERVED)

    @staticmethod
    def _momentum(group, p, grad, state) -> torch.Tensor:
        """Update the momentum of a constrained parameter in place; returns the direction input u.

        The momentum has the parameter's shape, as torch's optimizers keep their state (a Conv
        weight's is viewed as the same matrix as the weight)."""
        flatten = group.get("flatten")
        G = F.as_matrix(grad, flatten)
        if "momentum" not in state:
            state["momentum"] = torch.zeros(p.shape, dtype=_state_dtype(p), device=p.device)
        return F.momentum_update(G, F.as_matrix(state["momentum"], flatten), group["momentum"], group["nesterov"])

    @staticmethod
    def _adamw_state(p, state) -> dict:
        """The fallback's AdamW state of p, made on first use."""
        if not state:
            state["step"] = torch.tensor(0.0)
            # moments of bf16/fp16 parameters in fp32, as the constrained weights' momentum
            # (an fp16 second moment overflows at |g| > 256 and its eps rounds to 0)
            sdtype = _state_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        elif p.dtype in (torch.bfloat16, torch.float16) and state["exp_avg"].dtype != torch.float32:
            # moments saved by an older version in the parameter's dtype: continue in fp32
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = state[k].float()
        return state

    def _step_adamw_foreach(self, group) -> set[int]:
        """An AdamW fallback group's fp32/fp64 parameters through torch's foreach AdamW, in one
        call: F.adamw_step's arithmetic (bit for bit on CPU, tests/optim/test_functional.py; on
        CUDA a division may differ in its last bit), in a few kernels per group instead of ~9 per
        tensor (a step of 1000 small tensors: 43 → 15 ms, a probe). Going one at a time: bf16/fp16
        parameters (stepped in fp32, rounded once), groups with foreach=False, with tensor betas,
        eps or weight_decay (torch's foreach refuses tensor betas; a tensor and a Python number
        round 1 − β differently) or with a parameter listed twice (stepped twice, as by torch).
        Returns the ids stepped."""
        if (group["algorithm"] != "adamw" or group.get("foreach") is False
                or any(isinstance(v, torch.Tensor) for v in (*group["betas"], group["eps"], group["weight_decay"]))
                or len({id(p) for p in group["params"]}) != len(group["params"])):
            return set()
        params = [p for p in group["params"] if p.grad is not None and p.dtype in (torch.float32, torch.float64)
                  and p.grad.dtype == p.dtype and p.grad.device == p.device]
        if params:
            states = [self._adamw_state(p, self.state[p]) for p in params]
            beta1, beta2 = group["betas"]
            adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                  [], [s["step"] for s in states], foreach=True, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=_scalar(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return {id(p) for p in params}

    def _step_param(self, group, p, grad, state, lr):
        algorithm = group["algorithm"]
        if algorithm == "adamw":
            F.adamw_step(p, grad, self._adamw_state(p, state), lr=lr, betas=tuple(group["betas"]),
                         eps=group["eps"], weight_decay=group["weight_decay"])
            return None
        flatten = group.get("flatten")
        W = F.as_matrix(p, flatten)
        writeback = F.is_copy(W, p)  # a reshaped non-contiguous parameter: step a copy, write back
        if writeback:
            W = W.clone()
        eta = lr * _scalar(group["lr_scale"])
        if algorithm == "manifold_muon":
            # no local name for u: stiefel_step releases it after the solve (a step's peak memory)
            out = F.stiefel_step(W, self._momentum(group, p, grad, state),
                                 state, lr=eta, manifold=self._manifold(group), solver=group["solver"],
                                 tol=group["tol"], max_iters=group.get("max_iters"),
                                 drift_tol=2 * self.on_manifold_tol,
                                 warm_keys=self._warm_keys(state) or ("dual",),
                                 active=F.gradient_present(F.as_matrix(grad, flatten)))
            return self._writeback(p, W, writeback, out)
        u = self._momentum(group, p, grad, state)
        if algorithm == "hyperspherical":
            # rows without a gradient this step (tokens not in the batch) stay where they are
            active = F.as_matrix(grad, flatten).ne(0).any(dim=-1, keepdim=True)
            out = F.sphere_step(W, u, lr=eta, manifold=self._manifold(group), active=active)
        elif algorithm == "muon":
            out = F.muon_step(W, u, lr=eta, weight_decay=group["weight_decay"], schedule=group["ns_schedule"],
                              ns_steps=group["ns_steps"], compute_dtype=_DTYPES[group["ns_dtype"]],
                              adjust_lr=group["adjust_lr_fn"], torch_arithmetic=group["torch_arithmetic"])
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        return self._writeback(p, W, writeback, out)

    @staticmethod
    def _writeback(p, W, writeback, out):
        if writeback:
            p.copy_(W.reshape(p.shape))
        return out

    # ----------------------------------------------------------------------------- state
    # Keys that say what a group *is* rather than how it steps: a saved group must agree with the
    # optimizer's group on them, and an older state_dict without one takes the optimizer's value.
    _STRUCTURAL = ("algorithm", "manifold", "flatten")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after checking the saved groups and every state tensor's shape.

        The check runs as the last load_state_dict pre-hook, so it sees the dict as any user
        pre-hook left it; a mismatch raises before torch changes anything. Post-hooks see the state
        as the step keeps it. A saved group's missing hyperparameters keep the optimizer's values.
        The given dict is never mutated, then or later: state tensors and tensor hyperparameters
        are copied, not shared. Floating state takes the dtype the step keeps (fp32 for bf16/fp16
        weights, else the weight's).
        """
        checked: dict = {}

        def check(optimizer, sd):
            checked["sd"] = sd = self._checked_state_dict(sd)
            return sd

        handle = self.register_load_state_dict_pre_hook(check)
        # the user's post-hooks run once the state is as the step keeps it (below), not on torch's
        # cast of it: a hook zeroing bf16 momentum was undone, one clearing the state crashed the load
        post_hooks = self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._optimizer_load_state_dict_post_hooks = post_hooks
        sd = checked["sd"]
        by_id = dict(zip((i for g in sd["param_groups"] for i in g["params"]),
                         (p for g in self.param_groups for p in g["params"])))
        # torch casts floating state to the parameter's dtype; the state's own dtype is fp32 for
        # bf16/fp16 weights (and an fp64 checkpoint's state is cast down to fp32 weights, as torch
        # does). Solver extras (subspace size, μ) keep their fp64.
        for pid, st in sd["state"].items():
            p = by_id.get(pid)
            if p is not None:
                _recast_state(p, self.state[p], source=st)
        for hook in post_hooks.values():
            hook(self)

    def _checked_state_dict(self, state_dict: dict) -> dict:
        """A copy of state_dict with structural keys backfilled, or a ValueError naming the mismatch.

        Every state entry is checked against what the group's step keeps (name and shape), so a
        state_dict of another optimizer (torch.optim.AdamW: exp_avg in a Stiefel group) is refused
        rather than loaded with its momentum lost. torch.optim.Muon's is accepted where the group
        runs Muon with torch's coefficients: its momentum_buffer is the same buffer, so a run
        continues bitwise. A Conv weight's momentum saved as its matrix is reshaped to the weight's.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) and any("algorithm" not in g for g in groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups without modman's 'algorithm' key "
                             f"(another optimizer's), this optimizer {len(self.param_groups)}; nothing was loaded "
                             "(torch.optim.Muon's loads into modman.Muon when its groups match these: describe())")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, optimizer has "
                             f"{len(self.param_groups)}; nothing was loaded (a checkpoint of another model? Built "
                             "from modules, the groups follow the roles: a checkpoint of this model from a version "
                             "with other roles — e.g. before GPT-2's Conv1D was constrained — loads with roles= "
                             "matching it; optimizer.describe() lists them)")
        new_groups, renames, regrouped = [], {}, set()
        for gi, (g_new, g_old) in enumerate(zip(groups, self.param_groups)):
            if len(g_new["params"]) != len(g_old["params"]):
                raise ValueError(f"parameter group {gi} has {len(g_new['params'])} parameters in the state "
                                 f"dict and {len(g_old['params'])} in the optimizer; nothing was loaded")
            # a tensor lr is the group's own: shared with the given dict (or, from an older checkpoint,
            # among groups) a scheduler's in-place update would reach them too
            g_new = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in g_new.items()}
            if "algorithm" not in g_new:  # every modman state_dict has it: another optimizer's
                g_new = self._foreign_group(gi, g_new, g_old)
                renames.update({pid: {"momentum_buffer": "momentum"} for pid in g_new["params"]})
            # keys the saved group lacks keep this group's values (torch's load would leave them out, and
            # __setstate__ fill them from the constrained groups' defaults: an AdamW group ran at lr 0.1)
            for key, value in g_old.items():
                g_new.setdefault(key, value)
            if g_new["flatten"] is True and F.conv_groups(g_old["flatten"]):
                # a grouped convolution saved before it was stepped group by group (2026-12-07): its
                # momentum has the weight's shape and carries over; the solver's warm start was of the
                # flattened matrix and is dropped (the next step starts cold)
                g_new["flatten"] = g_old["flatten"]
                regrouped.update(g_new["params"])
            elif (g_new["flatten"] is None and g_old["flatten"] == "transposed"
                  and all(p.ndim == 3 for p in g_old["params"])):
                # expert stacks transformers marks is_transposed, saved before they were seen through
                # their transpose (2026-12-07): the momentum has the weight's shape and carries over;
                # the warm start is dropped, as above
                g_new["flatten"] = "transposed"
                regrouped.update(g_new["params"])
            for key in self._STRUCTURAL:
                if g_new[key] != g_old[key]:
                    raise ValueError(f"parameter group {gi} has {key}={g_new[key]!r} in the state dict and "
                                     f"{g_old[key]!r} in the optimizer; nothing was loaded")
            # its hyperparameters as at construction (a solver 'nope', a NaN lr or betas (0.9, 1.5)
            # loaded, and the next step failed after earlier groups had stepped; a probe)
            try:
                self._check_settings(g_new, f"parameter group {gi} of the state dict: ")
            except (TypeError, ValueError) as e:
                raise type(e)(f"{e}; nothing was loaded") from None
            new_groups.append(g_new)
        names = self._param_names()
        by_id = {}
        for g_new, g_old in zip(new_groups, self.param_groups):
            for pid, p in zip(g_new["params"], g_old["params"]):
                by_id[pid] = (p, g_old)
        state = {}
        for pid, st in state_dict["state"].items():
            if pid not in by_id:
                continue
            p, group = by_id[pid]
            st = {renames.get(pid, {}).get(k, k): v for k, v in st.items()}
            if isinstance(st.get("step"), numbers.Real) and not isinstance(st["step"], bool):
                st["step"] = torch.tensor(float(st["step"]))  # a number loads as a tensor, as in torch
            if pid in regrouped:
                st = {k: (v.reshape(p.shape) if isinstance(v, torch.Tensor) and v.numel() == p.numel() else v)
                      for k, v in st.items() if k in ("momentum", "step")}
            expected = self._expected_state(group, p)
            for key, value in st.items():
                if key not in expected and not (group["algorithm"] == "manifold_muon" and key not in _RESERVED):
                    raise ValueError(f"state {key!r} for parameter {names[id(p)]}: a {group['algorithm']} step keeps "
                                     f"{sorted(expected)}{' and solver entries' if group['algorithm'] == 'manifold_muon' else ''}"
                                     " (a state_dict from another optimizer?); nothing was loaded")
                matrix = tuple(F.as_matrix(p, group.get("flatten")).shape)
                # a solver's own entries (subspace size, μ) are one number per matrix of the batch
                want = expected.get(key, matrix[:-2])
                # a Conv weight's momentum was saved as its matrix before 2026-12-07 (a transposed view's
                # never was: reshaping that one would scramble it)
                legacy = key == "momentum" and group.get("flatten") != "transposed"
                allowed = {tuple(want), matrix} if legacy else {tuple(want)}
                if not isinstance(value, torch.Tensor) or tuple(value.shape) not in allowed:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"state {key!r} for parameter {names[id(p)]} has shape {got}, "
                                     f"expected {tuple(want)}; nothing was loaded")
                if key in _FLOATING_STATE and not value.is_floating_point():  # (int64 and complex loaded, cast)
                    raise ValueError(f"state {key!r} for parameter {names[id(p)]} has dtype {value.dtype}, "
                                     "expected a real floating tensor; nothing was loaded")
                # a NaN momentum would reach the weights at the next step, a NaN exp_avg_sq silently
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"state {key!r} for parameter {names[id(p)]} has non-finite values; "
                                     "nothing was loaded")
            # torch's load keeps a tensor that already has the right dtype/device (``.to`` is a no-op),
            # so the optimizer would step the caller's tensors in place: opt2.load_state_dict(
            # opt.state_dict()) would make two optimizers share momentum. Load copies instead.
            state[pid] = {k: v.reshape(expected[k]).clone() if k in expected else v.clone() for k, v in st.items()}
        state.update({pid: copy.deepcopy(st) for pid, st in state_dict["state"].items() if pid not in by_id})
        return dict(state_dict, state=state, param_groups=new_groups)

    @staticmethod
    def _expected_state(group, p) -> dict[str, tuple]:
        """The state entries a group's step keeps for p, with their shapes (a manifold-Muon solver
        may add its own, one number per matrix)."""
        if group["algorithm"] == "adamw":
            return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        if group["algorithm"] != "manifold_muon":
            return {"momentum": tuple(p.shape)}
        W = F.as_matrix(p, group.get("flatten"))
        return {"momentum": tuple(p.shape), "dual": tuple(W.shape[:-2]) + (min(W.shape[-2:]),) * 2}

    def _foreign_group(self, gi: int, g_new: dict, g_old: dict) -> dict:
        """A saved group without modman's keys: torch.optim.Muon's into a Muon group, else refused.

        torch's hyperparameters (lr, momentum, nesterov, weight_decay, ns_steps, adjust_lr_fn) are
        loaded as torch's own load would; the keys torch has not (ns_schedule, ns_dtype,
        torch_arithmetic, …) stay as this group sets them — with modman.Muon's defaults, torch's
        arithmetic, so the run continues bitwise. Coefficients other than torch's default are refused:
        no modman schedule computes them."""
        coefficients = g_new.get("ns_coefficients")
        if g_old["algorithm"] == "muon" and coefficients is not None:
            if tuple(float(c) for c in coefficients) != _TORCH_MUON_COEFFICIENTS:
                raise ValueError(f"parameter group {gi} is torch.optim.Muon's with ns_coefficients={tuple(coefficients)}; "
                                 f"modman.Muon's schedules use {_TORCH_MUON_COEFFICIENTS}; nothing was loaded")
            theirs = {k: v for k, v in g_new.items() if k not in ("ns_coefficients", "eps")}
            return {**{k: v for k, v in g_old.items() if k != "params"}, **theirs}
        raise ValueError(f"parameter group {gi} of the state dict has no 'algorithm' key: it is not a modman "
                         f"state_dict (keys {sorted(k for k in g_new if k != 'params')[:6]}…); nothing was loaded")

    _EXTRA = {"nonfinite": "raise", "on_manifold_tol": 1e-5, "project_on_init": True, "last_step_stats": {},
              "last_step_skipped": False, "_fallback_defaults": None}

    def __getstate__(self):
        # torch's __getstate__ keeps defaults/state/param_groups only; deepcopy and pickle must
        # also keep modman's own attributes (nonfinite, on_manifold_tol, …).
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._EXTRA if hasattr(self, k)})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for k, v in self._EXTRA.items():  # an optimizer pickled before these existed
            self.__dict__.setdefault(k, copy.deepcopy(v))
        if self._fallback_defaults is None:  # from the fallback group if there is one
            src = next((g for g in self.param_groups if g.get("algorithm") == "adamw"), self.defaults)
            self._fallback_defaults = {k: src[k] for k in ("lr", "betas", "eps", "weight_decay")}
        self._constructing = False
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, copy.deepcopy(v))

    # ----------------------------------------------------------------------------- reporting
    def describe(self) -> str:
        """A table: parameter name, shape, manifold, lr × lr_scale, solver."""
        rows = [("parameter", "shape", "manifold", "lr × lr_scale", "solver")]
        names = self._param_names()
        for group in self.param_groups:
            lr = _scalar(group["lr"]) * _scalar(group["lr_scale"])
            if group["algorithm"] == "adamw":
                manifold, solver = "euclidean (AdamW fallback)", "adamw"
            elif group["algorithm"] == "muon":
                manifold, solver = "euclidean (spectral)", "msign"
            elif group["algorithm"] == "hyperspherical":
                manifold, solver = f"sphere(r={self._sphere_radius(group):g}) rows", "normalise"
            else:
                manifold = repr(self._manifold(group))
                solver = group["solver"]
            # how the weight is seen as a matrix, where it is not as stored (a probe read GPT-2's
            # 32×96 Conv1D rows and a depthwise conv's plain Stiefel as the stored matrices')
            view = group.get("flatten")
            if view == "transposed" and group["algorithm"] != "adamw":
                manifold += " of the transpose"
            elif F.conv_groups(view):
                manifold += f" per group ({F.conv_groups(view)} blocks)"
            for p in group["params"]:
                rows.append((names[id(p)], "×".join(map(str, p.shape)) or "scalar", manifold, f"{lr:.4g}", solver))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
