"""Test problems shared by the solver tests."""
import torch


def low_rank(shape, rank: int, g: torch.Generator) -> torch.Tensor:
    """A float64 matrix of the given shape and rank (a product of Gaussian factors)."""
    return (torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, shape[1], generator=g, dtype=torch.float64))
