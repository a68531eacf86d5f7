"""tests/optim: run each test single-threaded (tiny matrices; see tests/core/conftest.py for why)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
