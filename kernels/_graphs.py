"""CUDA-graph replay of whole Newton–Schulz runs, for sizes where kernel launches dominate.

A run is 3 launches per iteration. Below a few hundred microseconds of GPU work per launch, the
host's cost of a launch (argument binding, the autotuner's cache lookup: tens of microseconds in
Python) exceeds the kernel's own time, and the GPU idles between kernels. Such runs are captured
once per (shape, dtype, device, coefficients) into a CUDA graph and replayed: one launch per run.

The graph reads a static input buffer and writes a static output, so each call copies its input
in and clones the output out (the next replay overwrites it); the copies are two passes over X,
small beside 3 products per iteration. At most ``MAX_ENTRIES`` graphs are kept, least recently
used first out; ``clear()`` frees them. Set MODMAN_TRITON_GRAPHS=0 to launch every kernel eagerly.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch

# batch·m²·n (m ≤ n) at or below which a run is replayed: 8 × 1024³ or 2048³. There one product
# is ≲ 30 µs on an H100 (benchmarks/results/kernels-*.json), comparable to its launch cost; the
# buffers a graph holds are then at most a few tens of MiB.
MAX_WORK = 2**33
MAX_ENTRIES = 4

_cache: OrderedDict = OrderedDict()


def clear() -> None:
    """Free every captured graph and its buffers."""
    _cache.clear()


def wanted(Y: torch.Tensor) -> bool:
    """Whether a run on Y (batch, m, n), m ≤ n, is launch-bound and may be replayed from a graph."""
    batch, m, n = Y.shape
    return (Y.is_cuda and batch * m * m * n <= MAX_WORK
            and os.environ.get("MODMAN_TRITON_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def run(iterate: Callable, Y: torch.Tensor, coeffs: list, gram: torch.Tensor | None) -> torch.Tensor:
    """``iterate(Y, coeffs, gram)``, replayed from a graph captured on first use of this key."""
    key = (tuple(Y.shape), Y.dtype, Y.device, tuple(coeffs), gram is not None)
    entry = _cache.get(key)
    if entry is None:
        with torch.cuda.device(Y.device):
            static_in = Y.contiguous().clone()
            static_gram = None if gram is None else gram.contiguous().clone()
            # Warm up on a side stream (as torch.cuda.graphs advises): compiles and autotunes the
            # kernels, which must not happen during capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                iterate(static_in, coeffs, static_gram)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = iterate(static_in, coeffs, static_gram)
        entry = (graph, static_in, static_gram, static_out)
        _cache[key] = entry
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    graph, static_in, static_gram, static_out = entry
    static_in.copy_(Y)
    if static_gram is not None:
        static_gram.copy_(gram)
    graph.replay()
    return static_out.clone()
