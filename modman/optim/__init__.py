"""modman's torch.optim family and its functional core."""
from . import functional
from .base import ManifoldOptimizer
from .family import HypersphericalDescent, ManifoldMuon, Muon

__all__ = ["ManifoldMuon", "Muon", "HypersphericalDescent", "ManifoldOptimizer", "functional"]
