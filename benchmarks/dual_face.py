"""Why Su's fixed point stalls when m < 2n: the spectrum of its Jacobian at the optimum.

    OMP_NUM_THREADS=1 python benchmarks/dual_face.py        # ~1 min; writes results/dual_face.json

For tall W (m×n, WᵀW = I), Gn = G/‖G‖_F, S = skew(WᵀGn), N = G⊥ᵀG⊥ and the symmetric variable
E = sym(WᵀGn) − 2Λ, the fixed-point map of ``modman.solvers.anderson`` is

    C = S + E,  CᵀC + N = V diag(d²) Vᵀ,  T(E) = V E' Vᵀ,  E'_ij = (VᵀR V)_ij / (d_i + d_j),
    R = S P − P S,  P = V diag(d) Vᵀ         (the Lyapunov equation P E' + E' P = S P − P S).

At a dual from ``newton`` (fp64 W from a QR, asked for tol 1e-12; the certified gap it reached
is reported: 2e-14 to 3e-7) the Jacobian of T is built column by column by central differences
on an orthonormal basis of symmetric matrices. Reported per shape and seed: how many eigenvalues
are within 1e-3 of +1 (real part; imaginary part below 1e-3: the directions along which every E
is optimal, so the dual's optimal set is a face of that dimension), the largest modulus among
the others (the rate of the slowest contracting mode), whether any modulus exceeds 1 + 1e-3,
and, for comparison, k(k+1) with k = (n − p)/2, p = m − n (the rank of N), for even n − p.
With m ≥ 2n, N is nonsingular and no eigenvalue sits at 1.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from modman.experiments.machine import machine  # noqa: E402

from modman.solvers import solve_manifold_muon  # noqa: E402
from modman.solvers.result import sym  # noqa: E402


def fixed_point_map(E, S, N):
    lam, V = torch.linalg.eigh(sym((S + E).mT @ (S + E) + N))
    d = lam.clamp(min=0).sqrt()
    P = (V * d) @ V.mT
    R = V.mT @ (S @ P - P @ S) @ V
    return sym(V @ (R / (d[:, None] + d[None, :])) @ V.mT)


def jacobian_spectrum(m, n, seed, h=1e-6):
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    res = solve_manifold_muon(W, G, solver="newton", tol=1e-12, max_iters=400)
    Gn = G / torch.linalg.matrix_norm(G)
    B = W.mT @ Gn
    Gp = Gn - W @ B
    S, N = 0.5 * (B - B.mT), sym(Gp.mT @ Gp)
    E = sym(B) - 2 * res.state["dual"].double()
    residual = float(torch.linalg.matrix_norm(fixed_point_map(E, S, N) - E))
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    basis = []
    for i, j in pairs:
        D = torch.zeros(n, n, dtype=torch.float64)
        D[i, j] = D[j, i] = 1.0 if i == j else 1 / math.sqrt(2)
        basis.append(D)

    def coords(X):
        return torch.stack([X[i, j] * (1.0 if i == j else math.sqrt(2)) for i, j in pairs])

    J = torch.stack([coords(fixed_point_map(E + h * D, S, N) - fixed_point_map(E - h * D, S, N)) / (2 * h)
                     for D in basis], 1)
    eig = torch.linalg.eigvals(J)
    one = ((eig.real - 1).abs() < 1e-3) & (eig.imag.abs() < 1e-3)
    at_one = int(one.sum())
    moduli = eig.abs()
    others = moduli[~one]
    k = (n - (m - n)) / 2
    return {"shape": [m, n], "seed": seed, "gap": float(res.duality_gap), "fixed_point_residual": residual,
            "dimension": len(pairs), "eigenvalues_at_1": at_one,
            # the count for even n − p; for odd n − p (35×30) we measured 180 = k'(k'+3), k' = (n−p−1)/2
            "k_times_k_plus_1": (k * (k + 1) if (2 * n - m) % 2 == 0 else None) if m < 2 * n else 0,
            "slowest_contracting_modulus": float(others.max()) if len(others) else None,
            "any_modulus_above_1": bool((moduli > 1 + 1e-3).any())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="60x20,40x30,36x30,34x30,35x30")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dual_face.json"))
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the work
    bad = [s for s in args.shapes.split(",") if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", s)]
    if bad:
        parser.error(f"--shapes takes MxN,MxN,… with positive integers, got {bad}")
    torch.set_num_threads(1)
    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        for seed in (int(x) for x in args.seeds.split(",")):
            row = jacobian_spectrum(m, n, seed=seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text(json.dumps({"machine": machine(), "command": "python " + " ".join(sys.argv),
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
