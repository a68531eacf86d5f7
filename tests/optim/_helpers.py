"""Shared helpers for the optimizer conformance tests: the family, a small problem, bitwise checks."""
from __future__ import annotations

import copy
import warnings

import torch

from modman.manifolds import Sphere, Stiefel
from modman.optim import HypersphericalDescent, ManifoldMuon, Muon

FAMILY = ("manifold_muon", "muon", "hyperspherical")
_CLASSES = {"manifold_muon": ManifoldMuon, "muon": Muon, "hyperspherical": HypersphericalDescent}
# Tests that are not about the subproblem solver use the one-msign "projected" solver: the default
# one may change and the dual ascent costs up to 100 msign per step.
_DEFAULTS = {"manifold_muon": {"lr": 0.1, "solver": "projected"}, "muon": {"lr": 0.05},
             "hyperspherical": {"lr": 0.1}}


def make_opt(kind: str, params, **kw):
    """An optimizer of the family with test defaults; moving weights at construction is not warned."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*moved .* onto the")
        return _CLASSES[kind](params, **{**_DEFAULTS[kind], **kw})


def manifold_point(kind: str, shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A point the optimizer keeps (so construction leaves it bitwise): Stiefel, unit rows or any."""
    if kind == "manifold_muon":
        return Stiefel().random(shape, generator=gen, dtype=dtype)
    if kind == "hyperspherical":
        return Sphere().random(shape, generator=gen, dtype=dtype)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


class Problem:
    """min ‖W − T‖² + ‖b − t‖², T a point of the family's manifold, W (6×4) constrained, b fallback."""

    def __init__(self, kind: str, seed: int = 0, shape=(6, 4), dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(manifold_point(kind, shape, g, dtype))
        self.b = torch.nn.Parameter(torch.randn(shape[0], generator=g).to(dtype))
        self.T = manifold_point(kind, shape, g, torch.float32)
        self.t = torch.randn(shape[0], generator=g)

    @property
    def params(self):
        return [self.W, self.b]

    def loss(self):
        return ((self.W.float() - self.T) ** 2).sum() + ((self.b.float() - self.t) ** 2).sum()

    def closure(self, opt):
        def closure():
            opt.zero_grad()
            loss = self.loss()
            loss.backward()
            return loss.detach()
        return closure

    def train(self, opt, steps: int, scheduler=None) -> list[float]:
        losses = []
        for _ in range(steps):
            losses.append(float(opt.step(self.closure(opt))))
            if scheduler is not None:
                scheduler.step()
        return losses

    def clone(self, kind: str):
        """Same problem over cloned parameters (current values)."""
        other = copy.copy(self)
        other.W = torch.nn.Parameter(self.W.detach().clone())
        other.b = torch.nn.Parameter(self.b.detach().clone())
        return other


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t (so −0.0 ≠ +0.0 and NaN payloads count): a bitwise comparison."""
    t = t.detach()
    itype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(itype).clone()


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{what}: differs (max |Δ| = {(a.double() - b.double()).abs().max():.3g})"


def assert_same(a, b, path="") -> None:
    """Recursive bitwise equality of nested dicts / lists / tuples / tensors / scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert_bitwise(a, b, path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


def snapshot(opt, params) -> tuple:
    return [bits(p) for p in params], copy.deepcopy(opt.state_dict())


def assert_refused_with_nothing_changed(opt, params, call, error, match: str) -> None:
    """call() raises error (matching match) and leaves the parameters and the state_dict bitwise."""
    import pytest

    snap = snapshot(opt, params)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(opt, params, snap)


def assert_unchanged(opt, params, snap) -> None:
    before_params, before_sd = snap
    for i, (p, b) in enumerate(zip(params, before_params)):
        assert torch.equal(bits(p), b), f"parameter {i} changed"
    assert_same(before_sd, opt.state_dict(), "state_dict")
