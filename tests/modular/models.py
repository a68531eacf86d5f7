"""Small torch models for the modular tests (plain nn.Modules, described by from_torch)."""
from __future__ import annotations

import torch
from torch import nn

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(dims, act="relu", bias=False):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).double()


class ResidualMLP(nn.Module):
    """inp → blocks of h + a·f2(act(f1(h))) → out (traced by torch.fx)."""

    def __init__(self, d_in, width, d_out, blocks=2, act="relu", a=1.0):
        super().__init__()
        self.inp = nn.Linear(d_in, width, bias=False)
        self.f1 = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.f2 = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.act = ACTS[act]()
        self.a = a
        self.out = nn.Linear(width, d_out, bias=False)

    def forward(self, x):
        h = self.inp(x)
        for f1, f2 in zip(self.f1, self.f2):
            h = h + self.a * f2(self.act(f1(h)))
        return self.out(h)


class Concat(nn.Module):
    def __init__(self, d_in, w1, w2, d_out):
        super().__init__()
        self.a = nn.Linear(d_in, w1, bias=False)
        self.b = nn.Linear(d_in, w2, bias=False)
        self.out = nn.Linear(w1 + w2, d_out, bias=False)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=-1))


class EmbedMLP(nn.Module):
    def __init__(self, vocab, d, d_out):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.l1 = nn.Linear(d, d, bias=False)
        self.l2 = nn.Linear(d, d_out, bias=False)

    def forward(self, ids):
        return self.l2(torch.nn.functional.gelu(self.l1(self.emb(ids))))


class ConvNet(nn.Module):
    def __init__(self, c_in, c, c_out, k=3, stride=1):
        super().__init__()
        self.c1 = nn.Conv1d(c_in, c, k, stride=stride, padding=1, bias=False)
        self.c2 = nn.Conv1d(c, c_out, k, padding=1, bias=False)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


class ModulaBlock(nn.Module):
    """h ↦ (1 − 1/B)·h + (1/B)·act(W h) (modula's residual block, sensitivity 1)."""

    def __init__(self, width, blocks, act="relu"):
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)
        self.act = ACTS[act]()
        self.a = 1.0 / blocks

    def forward(self, h):
        return h * (1 - self.a) + self.act(self.lin(h)) * self.a


class ModulaResMLP(nn.Module):
    """inp → act → B modula blocks (held in one nn.Sequential, ``blocks``) → out."""

    def __init__(self, d_in, width, d_out, blocks=2, act="relu"):
        super().__init__()
        self.inp = nn.Linear(d_in, width, bias=False)
        self.act = ACTS[act]()
        self.blocks = nn.Sequential(*(ModulaBlock(width, blocks, act) for _ in range(blocks)))
        self.out = nn.Linear(width, d_out, bias=False)

    def forward(self, x):
        return self.out(self.blocks(self.act(self.inp(x))))
