"""modman._checks: what the argument checks accept as numbers (Python's and numpy's, never a
bool), and entry points whose checks moved onto it."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modman
from modman._checks import is_finite_real, is_int, is_real
from modman.opd.rollouts import repeat_prompts


@given(st.integers() | st.sampled_from([np.int8(3), np.int64(-7), np.uint16(9)]))
def test_integers_python_and_numpy_are_ints_and_reals(value):
    assert is_int(value) and is_real(value) and is_finite_real(value)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_real_and_finite_exactly_when_math_says_so(value):
    for v in (value, np.float64(value), np.float32(value)):
        assert is_real(v) and not is_int(v)
        assert is_finite_real(v) == math.isfinite(v)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), "1", None, 1j, torch.tensor(1.0), [1]])
def test_bools_strings_complex_and_tensors_are_not_numbers(value):
    assert not is_int(value) and not is_real(value) and not is_finite_real(value)


def test_optimizer_hyperparameters_refuse_a_bool_and_take_numpy_scalars():
    model = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(ValueError, match="lr"):
        modman.ManifoldMuon(model.modules(), lr=True)  # passed as 1.0 before
    opt = modman.ManifoldMuon(model.modules(), lr=np.float32(0.05), max_iters=np.int64(5))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_group_size_takes_a_numpy_int():
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    rep = repeat_prompts(ids, mask, ["a", "b"], group_size=np.int64(2))
    assert rep[0].shape == (4, 3)
    with pytest.raises(ValueError, match="group_size"):
        repeat_prompts(ids, mask, ["a", "b"], group_size=True)


def test_numpy_hyperparameters_are_stored_as_python_numbers_so_weights_only_loads(tmp_path):
    """Accepted numpy scalars were stored as is: torch.load(weights_only=True) then refused the
    optimizer's state_dict (a review)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = modman.ManifoldMuon(model.modules(), lr=np.float32(0.05), momentum=np.float32(0.9),
                              max_iters=np.int64(5), fallback={"lr": np.float64(1e-3), "betas": (np.float32(0.9), 0.95)})
    groups = opt.state_dict()["param_groups"]
    for g in groups:
        assert all(type(g[k]) in (int, float) for k in ("lr", "momentum") if k in g)
        assert all(type(b) is float for b in g.get("betas", ()))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert torch.load(tmp_path / "opt.pt", weights_only=True)["param_groups"] == groups
