"""Small uniform manifold objects: project, tangent, retract, distance, random."""
from .euclidean import Euclidean
from .sphere import Sphere
from .stiefel import Stiefel


def get_manifold(name: str, **kwargs):
    """Build a manifold from its name ('stiefel', 'sphere', 'euclidean'), as stored in param groups."""
    table = {"stiefel": Stiefel, "sphere": Sphere, "euclidean": Euclidean}
    if name not in table:
        raise ValueError(f"unknown manifold {name!r}; choose from {sorted(table)}")
    return table[name](**kwargs)


__all__ = ["Stiefel", "Sphere", "Euclidean", "get_manifold"]
