"""LoRAConfig and target selection: which nn.Linear layers of a model get an adapter.

"Linear" includes transformers' ``Conv1D`` (GPT-2's attention and MLP layers), a Linear whose
weight is stored (in, out): the adapter is the same map, merged transposed (PEFT's
``fan_in_fan_out``, which ``save_adapter`` sets for such models).

A target specification is one of

- ``"all-linear"``: every nn.Linear except the output head and the adapters' own factors;
- ``"attention"`` / ``"mlp"``: the nn.Linear layers inside an attention block (a module path
  segment containing ``attn`` or ``attention``) or inside an MLP block (a segment named ``mlp``,
  ``feed_forward``, ``ffn`` or ``ffwd``): the blog's attention-only and MLP-only ablations;
- a regular expression (any other string), matched against the full module path with
  ``re.fullmatch``;
- a list of names, each matching a module path exactly or as its last dotted components
  (``"q_proj"`` matches ``layers.0.self_attn.q_proj``).

Regular expressions and lists follow PEFT's ``target_modules`` / ``exclude_modules`` rules, so a
saved config selects the same modules in PEFT.

The output head is recognised, in order, as: the module ``model.get_output_embeddings()`` returns
(the Hugging Face convention), a Linear whose weight is the weight of an nn.Embedding (tied
embeddings), or a Linear whose own name is ``lm_head``. PEFT skips the head only for transformers
models; for a custom model with ``"all-linear"`` it would adapt the head, so saved configs list
module names explicitly rather than the ``"all-linear"`` shorthand.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .._checks import is_finite_real, is_int
from ..optim.roles import is_transformers_conv1d

PRESETS = ("all-linear", "attention", "mlp")
INITS = ("default", "gaussian", "random")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_forward|ffn|ffwd", re.IGNORECASE)
# Submodule names that hold adapter factors; never targets themselves.
ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_dropout", "base_layer")


@dataclass(frozen=True)
class LoRAConfig:
    """Hyperparameters of one adapter: W' = W + s·B A with s = α/r (α/√r with ``use_rslora``).

    Args:
        r: rank, a positive int no larger than min(d_in, d_out) of any target.
        alpha: α; the blog keeps α = 32 for every rank, so the 1/r factor keeps the product's
            scale rank-independent at init and the optimal learning rate nearly so.
        target_modules: a preset, regex or list (see the module docstring).
        exclude: the same forms as ``target_modules``, presets included (``exclude="mlp"``:
            every Linear but the MLP's); matching modules are skipped.
        dropout: probability of dropping inputs to A (training mode only).
        use_rslora: s = α/√r instead of α/r.
        init: ``"default"`` (A ~ U(±1/√d_in), i.e. kaiming-uniform with a = √5, B = 0: the model is
            unchanged at init), ``"gaussian"`` (A ~ N(0, 1/r²), B = 0) or ``"random"`` (A and B
            both U(±1/√fan_in): the adapter changes the output from the start; for tests).
    """

    r: int
    alpha: float = 32
    target_modules: str | tuple[str, ...] | list[str] = "all-linear"
    exclude: str | tuple[str, ...] | list[str] | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"

    def __post_init__(self):
        if not is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        # alpha = inf made every output NaN (B = 0 times an infinite scale) and saved invalid JSON
        if not is_finite_real(self.alpha) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not (is_finite_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        # numpy numbers (a sweep's) stored as Python ones: the adapter config is saved as JSON
        object.__setattr__(self, "r", int(self.r))
        object.__setattr__(self, "alpha", int(self.alpha) if is_int(self.alpha) else float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("target_modules", "exclude"):
            value = getattr(self, name)
            if value is None and name == "exclude":
                continue
            if isinstance(value, str):
                if value not in PRESETS:
                    try:
                        re.compile(value)
                    except re.error as err:
                        raise ValueError(f"{name} {value!r} is not a valid regex: {err}") from None
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v
                                                                    for v in value):
                object.__setattr__(self, name, tuple(value))  # hashable, immutable
            else:
                raise ValueError(f"{name} must be a preset {PRESETS}, a regex or a non-empty list "
                                 f"of module names, got {value!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


def matches(spec, name: str) -> bool:
    """Whether module path ``name`` matches a regex (fullmatch) or a list of names/suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def output_head(model: nn.Module) -> set[str]:
    """Module paths of the output head(s), recognised as described in the module docstring."""
    heads: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            heads.add(id(head))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = set()
    # a head an earlier adapter wrapped is a LoRALinear at the head's path: test it and its base
    for name, module in linear_modules(model).items():
        if heads & {id(module), id(model.get_submodule(name))} or id(module.weight) in embedding_weights \
                or name.rsplit(".", 1)[-1] == "lm_head":
            names.add(name)
    return names


def _attention_projections(model: nn.Module) -> set[int]:
    """ids of the ``out_proj`` Linear of every nn.MultiheadAttention: its forward reads
    ``out_proj.weight`` directly, never calling the module, so an adapter there would do nothing."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the base model by path, skipping the inside of LoRA wrappers (their
    factors, and the wrapped base layer, which is listed under the wrapper's own path) and the
    output projections of nn.MultiheadAttention (which never call their module)."""
    from .layer import LoRALinear

    out = {}
    skipped = _attention_projections(model)
    for name, module in model.named_modules():
        if any(part in ADAPTER_CONTAINERS for part in name.split(".")) or id(module) in skipped:
            continue
        if isinstance(module, LoRALinear):
            out[name] = module.base_layer
        elif isinstance(module, nn.Linear) or is_transformers_conv1d(module):
            out[name] = module
    return out


def _preset(model: nn.Module, linears: dict[str, nn.Linear], preset: str) -> dict[str, nn.Linear]:
    """The Linear layers of ``linears`` a preset names (module docstring)."""
    if preset == "all-linear":
        heads = output_head(model)
        return {n: m for n, m in linears.items() if n not in heads}
    pattern = _ATTENTION if preset == "attention" else _MLP
    return {n: m for n, m in linears.items() if any(pattern.search(part) for part in n.split(".")[:-1])}


def select_targets(model: nn.Module, config: LoRAConfig, *, allow_rank_above_layer: bool = False
                   ) -> dict[str, nn.Linear]:
    """The base nn.Linear layers ``config`` selects, by path; raises before anything changes.

    Raises:
        ValueError: nothing matches (the message lists the model's Linear modules), or r exceeds
            a target's min(d_in, d_out) (the update's rank cannot: the extra rank is wasted) unless
            ``allow_rank_above_layer`` (PEFT saves such adapters; ``load_adapter`` loads them).
        TypeError: a pattern names a module that is not an nn.Linear.
    """
    from .layer import LoRALinear, features

    linears = linear_modules(model)
    spec = config.target_modules
    if spec in PRESETS:
        chosen = _preset(model, linears, spec)
    else:
        chosen = {}
        for name, module in model.named_modules():
            if not name or any(part in ADAPTER_CONTAINERS for part in name.split(".")):
                continue
            if not matches(spec, name):
                continue
            if name in linears:
                chosen[name] = linears[name]
            elif id(module) in _attention_projections(model):
                raise ValueError(f"target_modules {spec!r} matches {name!r}, the output projection of an "
                                 "nn.MultiheadAttention, whose forward reads its weight without calling it: "
                                 "an adapter there would have no effect")
            elif not isinstance(module, LoRALinear):
                raise TypeError(f"target_modules {spec!r} matches {name!r}, a "
                                f"{type(module).__name__}; LoRA here adapts nn.Linear layers (and transformers' "
                                "Conv1D) only")
    if config.exclude in PRESETS:
        excluded = _preset(model, linears, config.exclude)
        chosen = {n: m for n, m in chosen.items() if n not in excluded}
    elif config.exclude is not None:
        chosen = {n: m for n, m in chosen.items() if not matches(config.exclude, n)}
    if not chosen:
        listing = ", ".join(linears) or "(none)"
        raise ValueError(f"target_modules={spec!r} (exclude={config.exclude!r}) matches no "
                         f"nn.Linear of {type(model).__name__}; its Linear modules are: {listing}")
    for name, module in chosen.items():
        d_in, d_out = features(module)
        if config.r > min(d_in, d_out) and not allow_rank_above_layer:
            raise ValueError(f"r={config.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name!r} "
                             f"({d_in} → {d_out})")
    return chosen
