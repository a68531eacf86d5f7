"""CUDA-graph replay of whole Newton–Schulz runs, for sizes where kernel launches dominate.

A run is 3 launches per iteration. Below a few hundred microseconds of GPU work per launch, the
host's cost of a launch (argument binding and the autotuner's cache lookup: about 80 µs in
Python, measured on an H100) exceeds the kernel's own time, and the GPU idles between kernels.
Such runs are captured into a CUDA graph the second time their key (shape, dtype, device,
coefficients) is seen — a shape met once is not worth a capture — and replayed after that: one
launch per run. The replay runs the same kernels with the same configurations as an eager
launch on a contiguous copy of the input, so its result has the same bits.

The graph reads a static input buffer and writes a static output, so each call copies its input
in and clones the output out (the next replay overwrites it); the copies are two passes over X,
small beside 3 products per iteration. Graphs are kept least recently used first out, within
``MAX_BYTES`` of buffers; ``clear()`` frees them. Set MODMAN_TRITON_GRAPHS=0 to launch every
kernel eagerly. The static buffers are shared by all calls with one key, so concurrent calls with
the same key from different streams or threads must be ordered by the caller (calls on one
stream are ordered already).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch

# batch·m²·n (m ≤ n) at or below which a run is replayed: 8 × 1024³ or 2048³. There one product
# is ≲ 30 µs on an H100 (benchmarks/results/kernels-*.json), comparable to its launch cost.
MAX_WORK = 2**33
# Buffers held by all graphs together: input, output and the two ping-pong buffers (4 × X) plus
# the Gram copy, S and B (3 × m²). 8 × 1024² in bf16 needs 112 MiB.
MAX_BYTES = 512 * 2**20

_cache: OrderedDict = OrderedDict()  # key → (graph, static_in, static_gram, static_out, bytes)
_seen: set = set()


def clear() -> None:
    """Free every captured graph and its buffers, and forget which keys were seen."""
    _cache.clear()
    _seen.clear()


def _bytes(Y: torch.Tensor) -> int:
    batch, m, n = Y.shape
    return (4 * m * n + 3 * m * m) * batch * Y.element_size()


def wanted(Y: torch.Tensor) -> bool:
    """Whether a run on Y (batch, m, n), m ≤ n, is launch-bound and small enough to keep a graph of."""
    batch, m, n = Y.shape
    return (Y.is_cuda and batch * m * m * n <= MAX_WORK and _bytes(Y) <= MAX_BYTES // 4
            and os.environ.get("MODMAN_TRITON_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def run(iterate: Callable, Y: torch.Tensor, coeffs: list, gram: torch.Tensor | None) -> torch.Tensor:
    """``iterate(Y, coeffs, gram)``: eager the first time a key is seen, then from a graph."""
    key = (tuple(Y.shape), Y.dtype, Y.device, tuple(coeffs), gram is not None)
    entry = _cache.get(key)
    if entry is None:
        if key not in _seen:
            _seen.add(key)
            return iterate(Y, coeffs, gram)
        entry = _capture(iterate, Y, coeffs, gram)
        _cache[key] = entry
        while sum(e[-1] for e in _cache.values()) > MAX_BYTES and next(iter(_cache)) != key:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    graph, static_in, static_gram, static_out, _ = entry
    static_in.copy_(Y)
    if static_gram is not None:
        static_gram.copy_(gram)
    graph.replay()
    return static_out.clone()


def _capture(iterate: Callable, Y: torch.Tensor, coeffs: list, gram: torch.Tensor | None) -> tuple:
    with torch.cuda.device(Y.device):
        static_in = Y.clone(memory_format=torch.contiguous_format)
        static_gram = None if gram is None else gram.clone(memory_format=torch.contiguous_format)
        # Warm up on a side stream (as torch.cuda.graphs advises): compiles and autotunes the
        # kernels for the contiguous input, which must not happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            iterate(static_in, coeffs, static_gram)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = iterate(static_in, coeffs, static_gram)
    return graph, static_in, static_gram, static_out, _bytes(Y)
