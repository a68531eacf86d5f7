"""tests/solvers: run each test single-threaded.

The core tests use small matrices, for which one intra-op thread is as fast as two, and on a
shared, loaded 2-core machine two OpenMP threads make every small matmul wait tens of ms at a
barrier (measured: a 128×128 matmul 38 ms with 2 threads vs 0.1 ms with 1). Restored afterwards.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
