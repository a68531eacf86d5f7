"""Shared test configuration: hypothesis profiles and small helpers."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: no deadlines (2 shared cores), derandomised so a red run is reproducible, bounded examples
# so the oracle properties stay within the suite's time budget.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))



@pytest.fixture(autouse=True)
def _single_thread():
    """Run each test with one intra-op thread, restored afterwards.

    The tests use small matrices, for which one thread is as fast as two, and on a shared,
    loaded 2-core machine two OpenMP threads make every small matmul wait tens of ms at a
    barrier (measured: a 128×128 matmul 38 ms with 2 threads vs 0.1 ms with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
