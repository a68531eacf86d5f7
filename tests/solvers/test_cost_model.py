"""The unit of the solvers' cost reports: one msign-equivalent is one default msign on the matrix's
shape. Checked against torch's own flop counter, independent of modman's model."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modman import msign
from modman.solvers.newton import msign_flops


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (200, 10), (33, 33)])
def test_msign_flops_is_what_msign_does(shape):
    m, n = max(shape), min(shape)
    with FlopCounterMode(display=False) as counter:
        msign(torch.randn(shape))
    # the normalisation's Gram replaces the first iteration's XᵀX: no extra product
    assert counter.get_total_flops() == pytest.approx(msign_flops(m, n), rel=1e-12)
