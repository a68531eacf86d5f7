"""ManifoldOptimizer: the torch.optim class shared by modman's family (a thin shell).

It gathers parameters into groups by role (see ``roles.py``), validates hyperparameters at the
door, moves constrained weights onto their manifolds at construction, and in ``step`` hands each
parameter to the functional core (``functional.py``). Family members differ only in which
(manifold, norm) pair the constrained roles get.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..manifolds import Euclidean, Sphere, Stiefel
from . import functional as F
from .roles import assign_modules

_RESERVED = {"momentum", "exp_avg", "exp_avg_sq", "step"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _check_nonneg(name: str, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number ≥ 0)")


def _scalar(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


class ManifoldOptimizer(Optimizer):
    """Shared machinery; see ManifoldMuon, Muon and HypersphericalDescent for the maths."""

    # role -> (manifold, algorithm) run for it by this family member; None sends it to the fallback
    ALGORITHMS: dict[str, tuple[str, str] | None] = {}

    def __init__(self, params, defaults: dict, *, fallback: dict | None, roles: dict | None, budget,
                 project_on_init: bool, on_manifold_tol: float, nonfinite: str):
        for key in ("lr", "momentum", "weight_decay"):
            if key in defaults:
                _check_nonneg(key, defaults[key])
        if "momentum" in defaults and _scalar(defaults["momentum"]) >= 1:
            raise ValueError(f"Invalid momentum: {defaults['momentum']} (must be < 1)")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        _check_nonneg("on_manifold_tol", on_manifold_tol)
        fb = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
        unknown = set(fallback or {}) - set(fb)
        if unknown:
            raise ValueError(f"unknown fallback option(s) {sorted(unknown)}; allowed: {sorted(fb)}")
        fb.update(fallback or {})
        _check_nonneg("fallback lr", fb["lr"])
        _check_nonneg("fallback weight_decay", fb["weight_decay"])
        if not all(0 <= b < 1 for b in fb["betas"]):
            raise ValueError(f"Invalid fallback betas {fb['betas']}: each must be in [0, 1)")
        self.nonfinite = nonfinite
        self.on_manifold_tol = float(on_manifold_tol)
        self.last_step_stats: dict[str, dict[str, Any]] = {}
        self.last_step_skipped = False
        groups = self._build_groups(params, roles, budget, fb)
        defaults = dict(defaults, lr_scale=1.0, algorithm="adamw", manifold="euclidean",
                        betas=fb["betas"], eps=fb["eps"])
        super().__init__(groups, defaults)
        self._validate_groups()
        if project_on_init:
            self._project_onto_manifolds()

    # ----------------------------------------------------------------------------- groups
    def _build_groups(self, params, roles, budget, fb):
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors, "
                            f"dicts or modules, but got {torch.typename(params)}")
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(m, nn.Module) for m in items):
            assignments = assign_modules(items, roles)
            if not assignments:
                raise ValueError("the given modules have no trainable parameters")
            scales = self._resolve_budget(budget, items)
            groups, fallback = [], {"params": [], "param_names": [], "algorithm": "adamw", **fb,
                                    "manifold": "euclidean"}
            for a in assignments:
                spec = self.ALGORITHMS.get(a.role)
                if spec is None:
                    fallback["params"].append(a.param)
                    fallback["param_names"].append(a.name)
                else:
                    groups.append({"params": [a.param], "param_names": [a.name], "manifold": spec[0],
                                   "algorithm": spec[1], "lr_scale": float(scales.get(a.name, 1.0))})
            return groups + ([fallback] if fallback["params"] else [])
        if any(isinstance(m, nn.Module) for m in items):
            raise TypeError("params must be all modules or all tensors/dicts/(name, tensor) pairs, not a mix")
        if budget not in (None, "uniform"):
            raise ValueError("budget needs modules (e.g. model.modules()) to know the network; got tensors")
        if isinstance(items[0], dict):
            user_groups = items
        else:
            user_groups = [{"params": items}]
        groups = []
        for ug in user_groups:
            if not isinstance(ug, dict):
                raise TypeError(f"param groups must all be dicts, got {type(ug).__name__}")
            groups.extend(self._split_group(ug, fb))
        return groups

    def _split_group(self, ug: dict, fb: dict) -> list[dict]:
        ps = ug["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        named = [p for p in ps if isinstance(p, tuple)]
        if named and len(named) != len(ps):
            raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        explicit = ug.get("manifold")
        buckets: dict[str, list] = {}
        for item in ps:
            p = item[1] if isinstance(item, tuple) else item
            if not isinstance(p, torch.Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
            role = explicit or ("fallback" if ug.get("algorithm") == "adamw" else
                                ("stiefel" if p.ndim >= 2 else "fallback"))
            if role not in ("stiefel", "sphere", "euclidean", "fallback"):
                raise ValueError(f"unknown manifold {role!r} in a param group; "
                                 "choose 'stiefel', 'sphere', 'euclidean' or 'fallback'")
            if role != "fallback" and self.ALGORITHMS.get(role) is None:
                if explicit:
                    raise ValueError(f"{type(self).__name__} does not handle manifold {role!r}")
                role = "fallback"
            buckets.setdefault(role, []).append(item)
        out = []
        for role, members in buckets.items():
            g = {k: v for k, v in ug.items() if k != "params"}
            g["params"] = members
            if role == "fallback":
                for k, v in fb.items():
                    g.setdefault(k, v)
                g.update(algorithm="adamw", manifold="euclidean")
            else:
                manifold, algorithm = self.ALGORITHMS[role]
                g.update(manifold=manifold, algorithm=algorithm)
            out.append(g)
        return out

    def _resolve_budget(self, budget, modules) -> dict[str, float]:
        if budget in (None, "uniform"):
            return {}
        if isinstance(budget, dict):
            return {str(k): float(v) for k, v in budget.items()}
        if callable(budget):
            return {str(k): float(v) for k, v in budget(modules[0]).items()}
        if budget == "modular":
            from ..modular import budget as modular_budget  # the entry point composes the layers

            return modular_budget(modules[0])
        raise ValueError(f"budget must be 'uniform', 'modular', a dict or a callable, got {budget!r}")

    def _validate_groups(self) -> None:
        for group in self.param_groups:
            _check_nonneg("lr", group["lr"])
            _check_nonneg("lr_scale", group["lr_scale"])
            for i, p in enumerate(group["params"]):
                name = self._name(group, i)
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters ({name})")
                if p.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse parameters ({name})")
                m = group["manifold"]
                if group["algorithm"] != "adamw":
                    if m in ("stiefel", "euclidean") and p.ndim < 2:
                        raise ValueError(f"parameter {name} of shape {tuple(p.shape)} cannot live on {m!r} "
                                         "(needs ≥ 2 dims); give it to the fallback group")
                    if m == "stiefel" and p.ndim == 3 and group.get("scale") not in (None, "rms") \
                            and not isinstance(group.get("scale"), float):
                        raise ValueError(f"invalid Stiefel scale for {name}")

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _name(group, i) -> str:
        names = group.get("param_names")
        return names[i] if names else f"param{i}"

    def _param_names(self) -> dict[int, str]:
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

    def _project_onto_manifolds(self) -> None:
        names = self._param_names()
        with torch.no_grad():
            for group in self.param_groups:
                if group["algorithm"] == "adamw" or group["manifold"] == "euclidean":
                    continue
                manifold = self._manifold(group)
                for p in group["params"]:
                    W = F.as_matrix(p)
                    dist = float(manifold.distance(W).max())
                    if dist <= self.on_manifold_tol:
                        continue  # stays bitwise unchanged
                    p.copy_(manifold.project(W).reshape(p.shape))
                    warnings.warn(f"{type(self).__name__}: moved {names[id(p)]} onto the {group['manifold']} "
                                  f"manifold (distance was {dist:.3g})", stacklevel=4)

    # ----------------------------------------------------------------------------- step
    def _grads_finite(self) -> bool:
        amaxes = [p.grad.detach().abs().amax() for g in self.param_groups for p in g["params"]
                  if p.grad is not None and p.grad.numel() > 0]
        return not amaxes or bool(torch.isfinite(torch.stack([a.float() for a in amaxes])).all())

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({self._name(group, i)})")
        if not self._grads_finite():
            if self.nonfinite == "raise":
                bad = [self._name(g, i) for g in self.param_groups for i, p in enumerate(g["params"])
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                raise FloatingPointError(f"non-finite gradient in {', '.join(bad)}; no weight was changed "
                                         "(pass nonfinite='skip' to skip such steps)")
            self.last_step_skipped = True
            return loss
        self.last_step_skipped = False
        stats = {}
        for group in self.param_groups:
            lr = _scalar(group["lr"])
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                s = self._step_param(group, p, p.grad, self.state[p], lr)
                if s is not None:
                    stats[self._name(group, i)] = s
        self.last_step_stats = stats
        return loss

    def _step_param(self, group, p, grad, state, lr):
        algorithm = group["algorithm"]
        if algorithm == "adamw":
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            F.adamw_step(p, grad, state, lr=lr, betas=tuple(group["betas"]), eps=group["eps"],
                         weight_decay=group["weight_decay"])
            return None
        W = F.as_matrix(p)
        writeback = W.data_ptr() != p.data_ptr() or (p.ndim >= 4 and not p.is_contiguous())
        if writeback:
            W = W.clone()
        G = F.as_matrix(grad)
        if "momentum" not in state:
            mdtype = torch.float64 if W.dtype == torch.float64 else torch.float32
            state["momentum"] = torch.zeros(W.shape, dtype=mdtype, device=W.device)
        u = F.momentum_update(G, state["momentum"], group["momentum"], group["nesterov"])
        eta = lr * _scalar(group["lr_scale"])
        if algorithm == "manifold_muon":
            out = F.stiefel_step(W, u, state, lr=eta, manifold=self._manifold(group), solver=group["solver"],
                                 tol=group["tol"], max_iters=group.get("max_iters"),
                                 drift_tol=2 * self.on_manifold_tol,
                                 warm_keys=tuple(k for k in state if k not in _RESERVED) or ("dual",))
        elif algorithm == "hyperspherical":
            out = F.sphere_step(W, u, lr=eta, manifold=self._manifold(group))
        elif algorithm == "muon":
            out = F.muon_step(W, u, lr=eta, weight_decay=group["weight_decay"], schedule=group["ns_schedule"],
                              ns_steps=group["ns_steps"], compute_dtype=_DTYPES[group["ns_dtype"]],
                              adjust_lr=group["adjust_lr_fn"], torch_arithmetic=group["torch_arithmetic"])
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        if writeback:
            p.copy_(W.reshape(p.shape))
        return out

    # ----------------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict) -> None:
        """Load, after checking every state tensor's shape; a mismatch changes nothing."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, optimizer has "
                             f"{len(self.param_groups)}")
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in groups for i in g["params"]]
        if len(ids) != len(params):
            raise ValueError(f"loaded state dict has {len(ids)} parameters, optimizer has {len(params)}")
        for gi, (g_new, g_old) in enumerate(zip(groups, self.param_groups)):
            if len(g_new["params"]) != len(g_old["params"]):
                raise ValueError(f"parameter group {gi} has {len(g_new['params'])} parameters in the state "
                                 f"dict and {len(g_old['params'])} in the optimizer")
        by_id = dict(zip(ids, params))
        for pid, st in state_dict.get("state", {}).items():
            p = by_id.get(pid)
            if p is None:
                continue
            W = F.as_matrix(p)
            for key, value in st.items():
                if not isinstance(value, torch.Tensor):
                    continue
                expect = {"momentum": W.shape, "exp_avg": p.shape, "exp_avg_sq": p.shape,
                          "dual": W.shape[:-2] + (min(W.shape[-2:]),) * 2}.get(key)
                if expect is not None and tuple(value.shape) != tuple(expect):
                    raise ValueError(f"state {key!r} for parameter {pid} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(expect)}; nothing was loaded")
        saved_dtypes = {pid: {k: v.dtype for k, v in st.items() if isinstance(v, torch.Tensor)}
                        for pid, st in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; fp32 momentum of bf16 weights must stay fp32.
        for pid, dtypes in saved_dtypes.items():
            p = by_id.get(pid)
            if p is None:
                continue
            for key, dtype in dtypes.items():
                if key in self.state[p] and self.state[p][key].dtype != dtype:
                    self.state[p][key] = state_dict["state"][pid][key].to(device=p.device, dtype=dtype).clone()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("on_manifold_tol", 1e-5)
        self.__dict__.setdefault("last_step_stats", {})
        self.__dict__.setdefault("last_step_skipped", False)
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
            for p in group["params"]:
                rows.append((names[id(p)], "×".join(map(str, p.shape)), manifold, f"{lr:.4g}", solver))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
