"""What every benchmark (and the main job's results.json) records about the machine it ran on
(BENCHMARKS.md)."""
from __future__ import annotations

import os
import platform

import torch

from .._cpu import cpu_info

_FLAGS = ("fma", "avx", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def machine(threads: int | None = None) -> dict:
    """CPU model and the flags that decide bf16 speed, threads, torch version, GPU, load."""
    cpu, flags = cpu_info()
    cpu, flags = cpu or platform.processor() or "unknown", flags or []
    bf16 = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return {
        "cpu": cpu,
        "cpu_flags": [f for f in _FLAGS if f in flags],
        "bf16_flags": bf16 or "none (no avx512_bf16/AMX: bf16 matmuls are emulated)",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # not on Windows
    }
