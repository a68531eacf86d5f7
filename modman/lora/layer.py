"""LoRALinear: an nn.Linear plus named low-rank adapters.

For input x and each active, unmerged adapter k (A_k: r×d_in, B_k: d_out×r, scale s_k):

    y = W x + b + Σ_k s_k · B_k A_k dropout(x)

The base layer is kept as ``base_layer`` and frozen; the factors live in ``lora_A[k]`` /
``lora_B[k]`` (bias-free nn.Linear, as in PEFT, so parameter names read
``<path>.lora_A.<adapter>.weight``). Factors are fp32 when the base is bf16/fp16 (a bf16 B
starting at 0 would round away small updates), and the adapter branch runs in the factors'
dtype, added to the base output in the wider of the two dtypes and rounded to the base output's
dtype once (as PEFT does: modman and PEFT outputs then agree bitwise in bf16 too).

Merging adds s·B A to W, computed in (at least) fp32 and then cast: merging directly in bf16
rounds W + s·BA twice and drifts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..optim.functional import state_dtype
from ..optim.roles import is_transformers_conv1d


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision bases, the base dtype otherwise (the optimizers' state rule)."""
    return state_dtype(base_dtype)


def features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, or of transformers' Conv1D, whose weight is stored (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_transformers_conv1d(module):
        return tuple(module.weight.shape)
    raise TypeError(f"features: an nn.Linear or transformers' Conv1D, got {type(module).__name__}")


def refuse_repeated(names: list[str]) -> None:
    """Refuse a list naming an adapter more than once: its update was added once per listing
    (merge_lora(m, ["default", "default"]) folded s·B A in twice, a probe)."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"adapter names listed more than once: {repeated}")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or transformers' Conv1D, GPT-2's Linear stored transposed: PEFT's
    ``fan_in_fan_out``) with adapters; see the module docstring for the maths."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_transformers_conv1d(base_layer)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        # W stored (in, out): the adapter is the same map, merged as (s·B A)ᵀ
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.train(base_layer.training)  # a layer of a model in eval mode stays in eval mode

    # The attributes other code reads off a Linear (HF checks weight.dtype, for one).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return features(self.base_layer)[1]

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str,
                    generator: torch.Generator | None = None) -> None:
        """Create adapter ``name`` with A (r×d_in) and B (d_out×r) initialised by ``init``."""
        weight = self.base_layer.weight
        dtype = adapter_dtype(weight.dtype)
        A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            if init == "gaussian":
                A.weight.normal_(0.0, 1.0 / r, generator=generator)
            else:
                # kaiming_uniform with a = √5: bound = √(6/((1 + a²)·fan_in)) = 1/√d_in.
                bound = 1.0 / math.sqrt(self.in_features)
                A.weight.uniform_(-bound, bound, generator=generator)
            if init == "random":
                bound = 1.0 / math.sqrt(r)
                B.weight.uniform_(-bound, bound, generator=generator)
            else:
                B.weight.zero_()
        self.lora_A[name] = A
        self.lora_B[name] = B
        # in this layer's mode: dropout added to a model in eval mode (load_adapter for inference)
        # was on, and two forwards differed
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        A.train(self.training)
        B.train(self.training)
        self.r[name] = r
        self.scaling[name] = float(scaling)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B A (its transpose for a weight stored (in, out)), in the wider of fp32 and the base dtype."""
        dtype = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        A = self.lora_A[name].weight.to(dtype)
        B = self.lora_B[name].weight.to(dtype)
        delta = (B @ A) * self.scaling[name]
        return delta.mT if self.fan_in_fan_out else delta

    def to_merge(self, names: list[str] | None = None) -> list[str]:
        """The adapters ``merge(names)`` folds in: the given (default: active) ones not merged yet;
        a name listed twice is refused (it was folded in twice)."""
        if names is not None:
            refuse_repeated(names)
        return [n for n in (self.active_adapters if names is None else names) if n not in self.merged_adapters]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """W ← cast(W + Σ s·B A), summed in fp32, for the given (default: active) adapters."""
        names = self.to_merge(names)
        if not names:
            return
        W = self.base_layer.weight
        total = W.to(torch.promote_types(W.dtype, torch.float32))
        for name in names:
            total = total + self.delta_weight(name)
        W.copy_(total.to(W.dtype))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← cast(W − Σ s·B A) over the merged adapters (exact up to rounding in W's dtype)."""
        if not self.merged_adapters:
            return
        W = self.base_layer.weight
        total = W.to(torch.promote_types(W.dtype, torch.float32))
        for name in self.merged_adapters:
            total = total - self.delta_weight(name)
        W.copy_(total.to(W.dtype))
        self.merged_adapters = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()  # disabling means the base alone, merged or not
        result = self.base_layer(x)
        if self.disabled:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A = self.lora_A[name]
            h = A(self.lora_dropout[name](x.to(A.weight.dtype)))
            # summed in the wider dtype and rounded once, as PEFT does: casting each branch to a bf16
            # base first rounded twice (down_proj's error 3.7–4.5e-3 against PEFT's 2.7–3.3e-3)
            result = result + self.lora_B[name](h) * self.scaling[name]
        return result.to(dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, s={self.scaling[n]:g})" for n in self.r)
        return f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}"
