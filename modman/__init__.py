"""modman: manifold optimizers for PyTorch — Manifold Muon on the Stiefel manifold, its
family (Muon, hyperspherical descent), and modular learning-rate budgets."""
__version__ = "0.1.0"

from .linalg import msign
from .optim import HypersphericalDescent, ManifoldMuon, Muon
from .solvers import SolveResult, solve_manifold_muon

__all__ = ["msign", "ManifoldMuon", "Muon", "HypersphericalDescent", "solve_manifold_muon", "SolveResult",
           "__version__"]
