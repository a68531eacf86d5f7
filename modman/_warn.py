"""Warnings that name the user's line, not modman's internals."""
from __future__ import annotations

import sys
import warnings


def _in_modman(frame) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == "modman" or name.startswith("modman.")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside the modman package.

    A fixed ``stacklevel`` is right for one call path only (the optimizer's constructor and its
    ``add_param_group`` reach the same code at different depths); walking the stack instead makes
    the warning name the user's line, and ``warnings.filterwarnings(module=…)`` match the user's
    module, whatever the path."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn's caller: sys._getframe(1)
    while frame is not None and _in_modman(frame):
        level, frame = level + 1, frame.f_back
    # called from modman alone (e.g. ``python -m modman``): name warn's caller
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
