"""Kernel tests: on CPU they run in their own process with TRITON_INTERPRET=1 (tests/run.sh does),
because triton decides between compiled and interpreted kernels when it is first imported. On a
CUDA machine without the variable they run natively on the GPU. Otherwise (e.g. a plain
`pytest tests` on CPU) they are not collected, and a warning says so."""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _register import register  # noqa: E402

import torch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]
    warnings.warn("tests/kernels skipped: run them as TRITON_INTERPRET=1 python -m pytest tests/kernels")

PACKAGED = register()
