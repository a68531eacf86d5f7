"""Shared tools for the modular tests: weights on their manifold, unit-RMS inputs, the RMS metric,
and the first-order output change J_w f·Δw computed by torch.func.jvp (the oracle)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, jvp

from modman.manifolds import Stiefel
from modman.modular import EmbeddingAtom, MatrixAtom


def put_on_manifold(model: nn.Module, tree, generator=None, identity=False) -> None:
    """Every matrix atom onto its (scaled) Stiefel manifold, embedding rows onto their spheres."""
    with torch.no_grad():
        for atom in tree.atoms():
            p = atom.param
            if isinstance(atom, MatrixAtom):
                W = p.reshape(atom.d_out, atom.d_in)
                if identity:
                    W = torch.eye(atom.d_out, atom.d_in, dtype=p.dtype)
                else:
                    W = torch.randn(W.shape, generator=generator, dtype=p.dtype)
                st = Stiefel(atom.scale)
                p.copy_(st.project(W).mT if atom.transposed else st.project(W).reshape(p.shape))
            elif isinstance(atom, EmbeddingAtom):
                E = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.copy_(atom.radius * E / E.norm(dim=-1, keepdim=True))


def rms_rows(y: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """max over examples/positions of the RMS over the feature dimension."""
    y = y.movedim(channel_dim, -1)
    return y.pow(2).mean(-1).sqrt().max()


def unit_rms(shape, generator=None, dtype=torch.float64, channel_dim=-1, positive=False) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=dtype)
    if positive:
        x = x.abs() + 0.5
    x = x.movedim(channel_dim, -1)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    return x.movedim(-1, channel_dim)


def output_change(model: nn.Module, x, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """J_w f(w, x)·Δw, exactly to first order (forward-mode AD)."""
    params = dict(model.named_parameters())
    names = list(deltas)
    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(deltas[n] for n in names)

    def f(*ws):
        return functional_call(model, {**{k: v.detach() for k, v in params.items()}, **dict(zip(names, ws))}, (x,))

    return jvp(f, primals, tangents)[1]


def massive(tree) -> list:
    return [p for p in tree.placements() if math.isfinite(p.coefficient)]


def aligned_search(model, tree, x, iters=20, channel_dim=-1):
    """The best ratio ‖J·Δw‖_RMS / ‖Δw‖_modular found by alternating maximisation: fix an output
    direction u, give each atom the Δwᵢ of unit modular size that maximises ⟨u, JᵢΔwᵢ⟩ (the dual
    of its norm applied to Jᵢᵀu), then set u to the resulting change restricted to the worst row."""
    params = dict(model.named_parameters())
    places = massive(tree)
    names = [p.atom.name for p in places]
    y = model(x)
    u = torch.randn_like(y)
    best, stale = 0.0, 0
    for _ in range(iters):
        ws = [params[n] for n in names]
        out = torch.func.functional_call(model, {**params}, (x,))
        grads = torch.autograd.grad((out * u).sum(), ws)
        deltas = {}
        for p, g in zip(places, grads):
            a = p.atom
            c = p.coefficient * (p.input_bound if a.homogeneous else 1.0)
            if isinstance(a, MatrixAtom):
                G = g.reshape(a.d_out, a.d_in).double()
                U, _, Vh = torch.linalg.svd(G, full_matrices=False)
                D = (U[:, :1] @ Vh[:1]) / (c * math.sqrt(a.d_in / a.d_out))
                deltas[a.name] = D.reshape(g.shape).to(g.dtype)
            elif isinstance(a, EmbeddingAtom):
                n = g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                deltas[a.name] = g / n * math.sqrt(a.dim) / c
            else:
                deltas[a.name] = g / g.norm() * math.sqrt(g.numel()) / c
        dy = output_change(model, x, deltas)
        ratio = float(rms_rows(dy, channel_dim) / tree.norm(deltas))
        stale = stale + 1 if ratio < best * (1 + 1e-4) else 0
        best = max(best, ratio)
        if stale >= 3:  # converged: the alternating maximisation has stopped improving
            break
        # concentrate on the row (example/position) with the largest change
        flat = dy.movedim(channel_dim, -1)
        rows = flat.pow(2).mean(-1)
        mask = (rows == rows.max()).to(dy.dtype).unsqueeze(-1)
        u = (flat * mask).movedim(-1, channel_dim)
    return best
