"""What this machine's CPU does natively, from Linux's /proc/cpuinfo: the flags that decide how
fast bf16 matmuls run (for advice at construction and for benchmark records)."""
from __future__ import annotations

_CPUINFO = "/proc/cpuinfo"


def cpu_info() -> tuple[str | None, list[str] | None]:
    """(model name, x86 flags) of the first CPU, None where unknown (not Linux, not x86)."""
    model, flags = None, None
    try:
        with open(_CPUINFO) as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    return model, flags


def native_bf16() -> bool | None:
    """Whether the CPU multiplies bf16 natively (avx512_bf16 or AMX), None where unknown. Without
    it torch emulates bf16 matmuls: ~25–50× slower than fp32 on the AMD EPYC (AVX2) this project
    measures on (benchmarks/results/solvers_h1024.json: torch.optim.Muon's bf16 step 33 s against
    modman's fp32 Muon's 0.66 s)."""
    flags = cpu_info()[1]
    return None if flags is None else any(f in flags for f in ("avx512_bf16", "amx_bf16"))
