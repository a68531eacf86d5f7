"""Shared builders for the OPD tests: tiny TinyCausalLMs over the toy tokenizer."""
import torch

from modman.toy import CharTokenizer, TinyCausalLM

TOKENIZER = CharTokenizer()


def tiny_model(seed: int, *, vocab_size: int | None = None, d_model: int = 16,
               max_len: int = 24) -> TinyCausalLM:
    return TinyCausalLM(vocab_size or TOKENIZER.vocab_size, d_model, 1, 2, max_len, seed=seed)


def left_padded_prompts(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    Lp = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), Lp, dtype=torch.long)
    mask = torch.zeros(len(rows), Lp, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, Lp - len(r):] = torch.tensor(r)
        mask[i, Lp - len(r):] = 1
    return ids, mask
