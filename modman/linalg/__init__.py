"""Pure functions on tensors: msign and its Newton–Schulz schedules."""
from .msign import msign, newton_schulz, resolve_compute_dtype
from .schedules import SCHEDULES, coefficients, default_steps

__all__ = ["msign", "newton_schulz", "resolve_compute_dtype", "SCHEDULES", "coefficients", "default_steps"]
