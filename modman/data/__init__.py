"""Small procedurally generated datasets (nothing is downloaded)."""
from .mnist1d import load_mnist1d

__all__ = ["load_mnist1d"]
