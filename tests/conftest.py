"""Shared test configuration: hypothesis profiles and small helpers."""
import os

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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
