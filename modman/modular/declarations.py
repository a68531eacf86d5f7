"""Declarations: module trees for models whose forward torch.fx cannot trace.

A declaration is ``fn(module, prefix, options) -> Module``, registered for a class with
``@declare(cls)`` (keyed by the class's qualified name, so modman.toy is never imported here).

TinyCausalLM (modman.toy.model), pre-norm, every Linear bias-free:
    block(x)  = x + o ∘ attention ∘ cat(q, k, v) ∘ rmsnorm(x)
              then x + down ∘ (silu ∘ gate  ⊙  up) ∘ rmsnorm(x)
    model     = lm_head ∘ rmsnorm ∘ block_L ∘ … ∘ block_1 ∘ (embed_tokens [+ embed_positions])
Assumptions, stated in the budget table: attention as ``bonds.attention`` states it (the rotary
rotation preserves norms, so it adds nothing), normalisation inputs have RMS ≥ norm_min_rms, and
the SwiGLU product obeys ‖a ⊙ b‖_RMS ≤ ‖a‖_RMS‖b‖_RMS (``module.PRODUCT_ASSUMPTION``: optimistic
by up to √d).
Tied embeddings are refused (the weight would be placed twice).
"""
from __future__ import annotations

from typing import Callable

from . import bonds
from .module import Compose, Module, Parallel, compose

DECLARATIONS: dict[str, Callable] = {}


def declare(cls):
    """Register ``fn(module, prefix, options) -> Module`` as the description of ``cls``."""
    key = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"

    def register(fn):
        DECLARATIONS[key] = fn
        return fn

    return register


def _sub(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _residual(inner: Module) -> Module:
    return Parallel(bonds.identity("residual"), inner, combine="sum")


@declare("modman.toy.model.DecoderLayer")
def _decoder_layer(layer, prefix, opts):
    from .convert import convert

    def c(name):
        return convert(layer.get_submodule(name), _sub(prefix, name), opts)

    attn = compose(c("input_layernorm"),
                   Parallel(c("self_attn.q_proj"), c("self_attn.k_proj"), c("self_attn.v_proj"), combine="cat"),
                   bonds.attention(), c("self_attn.o_proj"))
    mlp = compose(c("post_attention_layernorm"),
                  Parallel(Compose(c("mlp.gate_proj"), bonds.activation("silu")), c("mlp.up_proj"), combine="mul"),
                  c("mlp.down_proj"))
    return Compose(_residual(attn), _residual(mlp))


@declare("modman.toy.model.TinyCausalLM")
def _tiny_causal_lm(model, prefix, opts):
    from .convert import ModularError, convert

    if model.config.tie_embeddings:
        raise ModularError("TinyCausalLM with tie_embeddings=True uses embed_tokens.weight twice (input and "
                           "lm_head); the modular norm counts a weight once per use — budget an untied model, or "
                           "pass a dict budget")
    embed = convert(model.embed_tokens, _sub(prefix, "embed_tokens"), opts)
    if model.config.positions == "learned":
        embed = Parallel(embed, convert(model.embed_positions, _sub(prefix, "embed_positions"), opts), combine="sum")
    layers = [convert(layer, _sub(prefix, f"layers.{i}"), opts) for i, layer in enumerate(model.layers)]
    return compose(embed, *layers, convert(model.norm, _sub(prefix, "norm"), opts),
                   convert(model.lm_head, _sub(prefix, "lm_head"), opts))
