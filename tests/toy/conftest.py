"""The toy models here are tiny (d_model 32): intra-op threading only adds synchronisation, and
on a loaded 2-core machine two spinning threads per op run several times slower than one."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
