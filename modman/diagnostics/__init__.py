"""Diagnostics: does an optimizer keep the weights' singular values where the geometry says?

- ``spectrum_table(model_or_named_params, manifolds=None) -> str``: per weight matrix its shape,
  σ_min, σ_max, condition number, stable rank and distance to its manifold.
- ``matrix_stats``, ``named_matrices``: the same numbers as a dict, and which parameters are matrices
  (Linear, Conv flattened to (out, in·k…) — a grouped one as its G blocks, batched — 3-D stacks
  batched).
- ``lanczos_svals`` and the σ_max / stable-rank estimators: Golub–Kahan–Lanczos, so large
  matrices need no full SVD at every record.
- ``SpectrumTracker``: records every k optimizer steps (optimizer hooks or a training callback),
  including ‖ΔW‖₂ of the step and its alignment with the gradient; ``save_tracking`` /
  ``load_tracking`` store runs in a file a notebook reloads.
- ``plots``: spectra per layer, singular-value trajectories, optimizers compared (matplotlib).
- ``peak_temporary_bytes(fn) -> MemoryReport``: peak bytes a function (one optimizer step)
  allocates on CPU, by live-storage accounting in a dispatch mode; ``peak_rss_bytes`` is the
  peak-RSS cross-check (``memory.py`` says what each counts).
"""
from .estimators import LanczosEstimate, lanczos_svals, sigma_max_estimate, stable_rank_estimate
from .memory import MemoryReport, peak_rss_bytes, peak_temporary_bytes
from .spectra import matrix_stats, named_matrices, resolve_manifolds, singular_values, spectral_norm
from .table import spectrum_table
from .tracker import SpectrumTracker
from .tracking import METRICS, Tracking, load_tracking, save_tracking

__all__ = [
    "spectrum_table", "matrix_stats", "named_matrices", "resolve_manifolds", "singular_values", "spectral_norm",
    "lanczos_svals", "LanczosEstimate", "sigma_max_estimate", "stable_rank_estimate",
    "SpectrumTracker", "Tracking", "METRICS", "save_tracking", "load_tracking",
    "peak_temporary_bytes", "peak_rss_bytes", "MemoryReport",
]
