"""Coefficient schedules for quintic Newton–Schulz iterations.

Each iteration maps every singular value x of the (normalised) iterate through the odd
polynomial p(x) = a·x + b·x³ + c·x⁵; a schedule is the list of (a, b, c) per iteration, and
iterations past the end of the list reuse its last tuple.

Sources (facts, cited):
- Keller Jordan's fixed quintic (3.4445, −4.7750, 2.0315), used by Muon and torch.optim.Muon.
  It does not converge: singular values end in roughly [0.68, 1.13].
- Polar Express [Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932, Algorithm 1]: the
  minimax-optimal quintic per iteration for a lower bound l = 1e-3, with the paper's safety
  factor 1.01 applied to all tuples but the last, convergent one (15/8, −10/8, 3/8).
"""
from __future__ import annotations

KELLER = ((3.4445, -4.7750, 2.0315),)

_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

# The convergent quintic: p(1) = 1, p'(1) = 0, p''(1) = 0 — used to polish an iterate that is
# already close to orthogonal.
CONVERGENT = ((1.875, -1.25, 0.375),)

# name -> (coefficients, default number of iterations, input safety factor)
SCHEDULES: dict[str, tuple[tuple[tuple[float, float, float], ...], int, float]] = {
    # 10 iterations meet the fp32 bar (max|σ−1| ≤ 1e-5 at κ = 1e3, log-spaced and flat-top
    # spectra) with the Gram-based normalisation of msign; see benchmarks/msign.py.
    "polar_express": (POLAR_EXPRESS, 10, POLAR_EXPRESS_SAFETY),
    "keller": (KELLER, 5, 1.0),
    "convergent": (CONVERGENT, 8, 1.0),
}


def check_schedule(schedule) -> None:
    """A ValueError naming the schedules where ``schedule`` is none of them."""
    if schedule != "svd" and schedule not in SCHEDULES:
        raise ValueError(f"unknown msign schedule {schedule!r}; choose from {sorted(SCHEDULES) + ['svd']}")


def coefficients(schedule: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) tuple for each of ``steps`` iterations of ``schedule``."""
    check_schedule(schedule)
    if schedule == "svd":
        raise ValueError("schedule 'svd' is an exact SVD: it has no Newton–Schulz coefficients")
    table = SCHEDULES[schedule][0]
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def default_steps(schedule: str) -> int:
    """The number of iterations ``msign`` runs for ``schedule`` when ``steps=None``."""
    check_schedule(schedule)
    return 0 if schedule == "svd" else SCHEDULES[schedule][1]
