"""modman: manifold optimizers for PyTorch — Manifold Muon on the Stiefel manifold, its
family (Muon, hyperspherical descent), and modular learning-rate budgets."""
__version__ = "0.1.0"

from .linalg import msign

__all__ = ["msign", "__version__"]
