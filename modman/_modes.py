"""The train/eval flag of every submodule, kept across a temporary switch of the model's mode."""
from __future__ import annotations

import contextlib

from torch import nn


def record_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {module: module.training for module in model.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Every module's flag as recorded: ``model.train(flag)`` would give all of them the model's, and
    a part kept in eval mode on purpose came back in training mode (a review)."""
    for module, training in modes.items():
        module.training = training


@contextlib.contextmanager
def kept_modes(model: nn.Module, training: bool):
    """``model.train(training)`` inside; every module's own mode as it was after."""
    modes = record_modes(model)
    model.train(training)
    try:
        yield model
    finally:
        restore_modes(modes)
