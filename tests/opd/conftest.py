"""Tiny models for the OPD tests: one thread (intra-op threading only adds synchronisation at
d_model 16), and a builder for small TinyCausalLMs over the toy tokenizer."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
