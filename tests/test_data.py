"""modman.data: procedural MNIST-1D, its shapes and its manners (no global state touched)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from modman.data.mnist1d import load_mnist1d


def test_mnist1d_splits_shapes_and_standardisation():
    d = load_mnist1d()
    assert d["x"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
    assert d["y"].dtype == torch.int64 and set(d["y"].tolist()) == set(range(10))
    torch.testing.assert_close(d["x"].mean(0), torch.zeros(40), atol=1e-5, rtol=0)
    torch.testing.assert_close(d["x"].std(0), torch.ones(40), atol=1e-4, rtol=0)
    d["x"].zero_()  # a copy: the cache is not changed through it
    assert load_mnist1d()["x"].abs().sum() > 0


def test_mnist1d_leaves_the_callers_random_streams_alone():
    """make_dataset seeds Python's and numpy's global generators: the first (uncached) call reseeded
    the caller's streams and later (cached) calls did not (a probe)."""
    for seed in (7, 7, 8):  # uncached, cached, uncached
        random.seed(1)
        np.random.seed(1)
        want = (random.random(), np.random.rand())
        random.seed(1)
        np.random.seed(1)
        load_mnist1d(seed=seed)
        assert (random.random(), np.random.rand()) == want, seed


def test_mnist1d_takes_numpy_integer_seeds_up_to_numpys_range():
    assert torch.equal(load_mnist1d(seed=np.int64(7))["x"], load_mnist1d(seed=7)["x"])
    with pytest.raises(ValueError, match="seed must be an int"):
        load_mnist1d(seed=2**32)


@pytest.mark.parametrize("seed", [1.5, True, -1, 2**40, "42"])
def test_mnist1d_refuses_a_seed_it_would_truncate_or_numpy_would_refuse(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        load_mnist1d(seed=seed)
