"""The LoRA tests use tiny models (d_model 32): one intra-op thread is fastest on a loaded
2-core machine, where spinning threads contend."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
