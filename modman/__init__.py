"""modman: manifold optimizers for PyTorch — Manifold Muon on the Stiefel manifold, its
family (Muon, hyperspherical descent), and modular learning-rate budgets."""
__version__ = "0.1.0"

import importlib

from .linalg import msign
from .optim import HypersphericalDescent, ManifoldMuon, Muon
from .solvers import SolveResult, solve_manifold_muon

__all__ = ["msign", "ManifoldMuon", "Muon", "HypersphericalDescent", "solve_manifold_muon", "SolveResult",
           "__version__"]

# Subpackages imported on first attribute access (PEP 562): ``import modman; modman.modular.budget(m)``
# works without importing modular, diagnostics, lora, opd or toy (and their dependencies) up front;
# it raised AttributeError unless something had imported the subpackage already.
_SUBPACKAGES = ("data", "diagnostics", "experiments", "kernels", "linalg", "lora", "manifolds", "modular",
                "opd", "optim", "solvers", "toy")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES))
