"""How much memory does a function (one optimizer step) allocate at its peak, on CPU?

CPU PyTorch has no ``torch.cuda.max_memory_allocated``. Two methods, which check each other:

``peak_temporary_bytes(fn)`` — live-storage accounting through the dispatcher (the main method).
    A ``TorchDispatchMode`` sees every ATen op that runs inside ``fn`` (after autograd and the
    CompositeImplicit decompositions, i.e. the ops that allocate). For each tensor an op returns,
    it looks at the tensor's ``UntypedStorage``:

    * a storage the op's inputs do not hold and that is not already tracked is a new allocation:
      its ``nbytes()`` is added to a running "live" counter and ``weakref.finalize`` on the
      storage subtracts it again when the storage is freed. (Python storage objects are
      preserved while the C++ storage lives, like tensors, so the finalizer fires when the
      memory is released — not when a view or a Python handle goes away.)
    * a storage an input holds (in-place ops, ``out=``, views, ``detach``) or one already tracked
      (a view of a temporary) adds nothing, so views and in-place ops are not double counted;
      ``resize_`` of a tracked storage is followed (the counter moves by the change).

    The peak is the maximum of the counter, taken right after each op returns — the only moments
    it can grow. Storages that existed before ``fn`` (parameters, gradients, optimizer state) are
    never counted, and freeing one does not lower the counter: the peak is the most memory
    allocated by ``fn`` and alive at once, an upper bound on the growth of the process.
    ``persistent_bytes`` is what is still alive when ``fn`` returns (new optimizer state, the
    return value).

    Not counted — memory no dispatched op returns:
    * scratch space a kernel allocates and frees inside itself: LAPACK/BLAS workspaces
      (``eigh``, ``qr``, ``svd``), the internal copies of a CPU kernel, oneDNN buffers. Measured:
      ``torch.linalg.eigh`` of an n×n fp64 matrix counts 1× its input (the returned eigenvectors)
      while peak RSS grows by 3× (LAPACK's dsyevd workspace, ≈ 2n² doubles);
    * tensors made outside the dispatcher (``torch.frombuffer``, numpy arrays, Python objects;
      ``torch.from_numpy``'s tensor is counted, as it passes through the dispatcher);
    * meta tensors, which hold no memory;
    * the growth of a storage that existed before ``fn`` (``resize_`` of a pre-existing tensor);
    * ops run by other threads (dispatch modes are thread-local).
    That is why ``peak_rss_bytes`` exists: it sees all of these.

``peak_rss_bytes(fn)`` — the process's peak resident set (Linux only), an independent check.
    Resets the kernel's high-water mark (``"5"`` written to ``/proc/self/clear_refs``), runs ``fn``
    and returns ``VmHWM`` (peak RSS) minus ``VmRSS`` before. It counts everything resident,
    kernel workspaces included, but only tracks tensors if freed blocks go back to the OS: glibc
    serves large blocks by ``mmap`` (returned by ``munmap`` on free) only while its mmap threshold
    is fixed, so run it in a fresh process started with ``RSS_ENV`` in its environment
    (``MALLOC_MMAP_THRESHOLD_=65536``, which also stops glibc from raising the threshold), after a
    warm-up call (first calls fault in code pages and create state). It also counts non-tensor
    memory (Python objects, page rounding) and misses small blocks (< 64 KiB) that reuse heap
    memory already resident, so the two differ by a roughly constant amount, measured as RSS
    0.1–0.25 MB below the dispatch count: on two m×n temporaries that is −4 to −7 % at 2 MB, −1.4 to
    −2.2 % at 8 MB and −0.3 to −0.7 % at 32 MB (a probe, rerun several times);
    tests/diagnostics/test_memory.py checks 5 % at 24–32 MB. Where RSS is clearly above the
    dispatch count, by more than that, the difference is memory no dispatched op returned.
"""
from __future__ import annotations

import os
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

METHOD = ("live-storage accounting in a TorchDispatchMode: every new UntypedStorage an ATen op returns "
          "is added at its nbytes and removed by a weakref finalizer when freed; peak after each op; "
          "kernel-internal workspaces (LAPACK) not counted")
RSS_METHOD = ("peak RSS of a fresh process (MALLOC_MMAP_THRESHOLD_=65536): VmHWM after the step minus VmRSS "
              "before, high-water mark reset via /proc/self/clear_refs")
# Environment a process measured by peak_rss_bytes must be started with (see the module docstring).
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)
# ops whose output is the (fresh) tensor they are given: torch.tensor(...) builds it outside the
# dispatcher and then calls lift_fresh, so its storage is new although an input holds it
_FRESH_INPUT_OPS = ("lift_fresh", "lift_fresh_copy")


@dataclass
class MemoryReport:
    """The result of ``peak_temporary_bytes``.

    peak_bytes: the most bytes allocated inside fn (temporaries and new persistent tensors)
        alive at one time.
    persistent_bytes: bytes allocated inside fn still alive when it returned (new state,
        the return value); ``peak_bytes − persistent_bytes`` is the transient part of the peak.
    allocations: how many new storages fn's ops returned.
    peak_by_op: the storages alive at the peak, grouped by the op (and source line) that
        allocated them, largest first: (label, bytes, count).
    method: how it was measured.
    result: fn's return value.
    """

    peak_bytes: int
    persistent_bytes: int
    allocations: int
    peak_by_op: list[tuple[str, int, int]]
    method: str = METHOD
    result: Any = field(default=None, repr=False)

    @property
    def transient_bytes(self) -> int:
        return self.peak_bytes - self.persistent_bytes

    def summary(self, unit: int = 1, top: int = 5) -> str:
        """The peak in multiples of ``unit`` bytes and its largest contributors."""
        lines = [f"peak {self.peak_bytes / unit:.2f}, persistent {self.persistent_bytes / unit:.2f} "
                 f"(units of {unit} B; {self.allocations} allocations)"]
        lines += [f"  {b / unit:8.2f}  ×{c:<3d} {label}" for label, b, c in self.peak_by_op[:top]]
        return "\n".join(lines)


def _storages(tree) -> list[torch.UntypedStorage]:
    out = []
    for x in tree_flatten(tree)[0]:
        if isinstance(x, torch.Tensor):
            out.append(x.untyped_storage())
        elif isinstance(x, torch.UntypedStorage):
            out.append(x)
    return out


def _internal(path: str) -> bool:
    """Frames the call-site label skips: this module, torch's private modules and dispatch glue."""
    if path == _THIS_FILE:
        return True
    if not path.startswith(_TORCH_DIR + os.sep):
        return False
    rel = path[len(_TORCH_DIR) + 1:]
    return rel.startswith(("_", "utils" + os.sep)) or rel == "overrides.py"


def _call_site() -> str:
    """The innermost frame that is user code (modman, torch.optim, …): where the op was called."""
    f = sys._getframe(2)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if not _internal(path):
            parts = path.split(os.sep)
            for root in ("modman", "torch"):
                if root in parts:
                    short = "/".join(parts[len(parts) - 1 - parts[::-1].index(root):])
                    break
            else:
                short = os.path.basename(path)
            return f"{short}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


class _LiveStorageMode(TorchDispatchMode):
    """The accounting of ``peak_temporary_bytes`` (module docstring).

    torch wraps a mode's ``__torch_dispatch__`` in ``torch._dynamo.disable`` so that compiled
    code never traces it, at the price of importing torch._dynamo on first use (seconds). This
    class opts out (``_should_skip_dynamo``) and is used only while torch._dynamo is not imported,
    i.e. when no compiled code can be running; ``_LiveStorageModeCompiled`` keeps the wrapping.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, attribute: bool):
        super().__init__()
        self.attribute = attribute
        self.live = 0
        self.peak = 0
        self.allocations = 0
        self.sizes: dict[int, int] = {}  # storage _cdata -> nbytes, tracked (allocated inside fn) only
        self.labels: dict[int, str] = {}
        self.finalizers: dict[int, weakref.finalize] = {}
        self.peak_snapshot: dict[int, int] = {}  # sizes at the peak
        self.peak_labels: dict[int, str] = {}

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.labels.pop(key, None)
        self.finalizers.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        inputs = set() if name in _FRESH_INPUT_OPS else {s._cdata for s in _storages((args, kwargs))}
        grew = False
        for s in _storages(out):
            if s.device.type == "meta":  # a shape without memory
                continue
            key = s._cdata
            nbytes = s.nbytes()
            if key in self.sizes:  # a view of / in-place op on a temporary: only a resize changes it
                if nbytes != self.sizes[key]:
                    self.live += nbytes - self.sizes[key]
                    self.sizes[key] = nbytes
                    grew = grew or nbytes > 0
                continue
            if key in inputs:  # in-place, out=, or a view of a tensor that existed before fn
                continue
            self.sizes[key] = nbytes
            self.live += nbytes
            self.allocations += 1
            self.labels[key] = f"{name} @ {_call_site()}" if self.attribute else name
            fin = weakref.finalize(s, self._freed, key)
            fin.atexit = False
            self.finalizers[key] = fin
            grew = True
        if grew and self.live > self.peak:
            self.peak = self.live
            self.peak_snapshot = dict(self.sizes)
            self.peak_labels = dict(self.labels)
        return out

    def by_label(self) -> list[tuple[str, int, int]]:
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for key, nbytes in self.peak_snapshot.items():
            g = groups[self.peak_labels.get(key, "?")]
            g[0] += nbytes
            g[1] += 1
        return sorted(((k, b, c) for k, (b, c) in groups.items()), key=lambda r: -r[1])


class _LiveStorageModeCompiled(_LiveStorageMode):
    """The same accounting, with torch's ``torch._dynamo.disable`` wrapping of the handler."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _LiveStorageMode.__torch_dispatch__(self, func, types, args, kwargs)


def peak_temporary_bytes(fn: Callable[[], Any], *, attribute: bool = True) -> MemoryReport:
    """Peak bytes allocated and alive at once while ``fn()`` runs, by live-storage accounting.

    Counts every storage a dispatched ATen op returns inside fn, from its allocation to its
    release; storages that existed before fn are not counted. Kernel-internal workspaces (LAPACK
    and the like) and tensors created outside the dispatcher are not seen — the module docstring
    lists what is and is not counted, and ``peak_rss_bytes`` is the check that sees everything.
    ``attribute`` labels each allocation with the op name and the calling source line
    (``MemoryReport.peak_by_op``); ``attribute=False`` labels by op name only and is cheaper.

    The step is run once as given: to measure a steady-state optimizer step, step once before
    (the first step creates the state, which then shows as ``persistent_bytes``).
    """
    mode = (_LiveStorageModeCompiled if "torch._dynamo" in sys.modules else _LiveStorageMode)(attribute)
    try:
        with mode:
            result = fn()
        return MemoryReport(peak_bytes=mode.peak, persistent_bytes=mode.live, allocations=mode.allocations,
                            peak_by_op=mode.by_label(), result=result)
    finally:
        for fin in list(mode.finalizers.values()):  # storages outliving fn: stop tracking them
            fin.detach()
        mode.finalizers.clear()


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_rss_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident-set growth of this process while ``fn()`` runs (Linux): VmHWM − VmRSS before.

    Valid only in a process started with ``RSS_ENV`` (glibc returns every block ≥ 64 KiB to the
    OS on free) and after a warm-up call; see the module docstring. Raises OSError where
    ``/proc/self/clear_refs`` cannot reset the high-water mark.
    """
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    if _status_bytes("VmHWM") > before + (1 << 20):
        raise OSError("the kernel did not reset VmHWM: peak RSS cannot be measured here")
    fn()
    return _status_bytes("VmHWM") - before
