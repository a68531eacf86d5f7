"""Tiny models for the LoRA tests (no downloads)."""
import pytest
import torch

from modman.toy import TinyCausalLM

VOCAB, D, LAYERS, HEADS, MAX_LEN = 40, 32, 2, 4, 16


def tiny_model(seed: int = 0, dtype=torch.float32) -> TinyCausalLM:
    return TinyCausalLM(VOCAB, D, LAYERS, HEADS, MAX_LEN, seed=seed).to(dtype)


def tokens(batch: int = 3, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_llama(seed: int = 0):
    """A random transformers LlamaForCausalLM from a config (no download)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()
