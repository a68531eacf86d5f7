"""Make ``modman.kernels`` importable from the source tree when the installed modman lacks it.

pyproject maps the top-level ``kernels/`` folder to ``modman.kernels``; an install made before
that mapping was effective has no such package. Used by conftest and by the subprocess test.
Returns whether the installed package provided it.
"""
import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def register() -> bool:
    import modman

    if importlib.util.find_spec("modman.kernels") is not None:
        return True
    spec = importlib.util.spec_from_file_location(
        "modman.kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["modman.kernels"] = module
    spec.loader.exec_module(module)
    modman.kernels = module
    return False
