"""Tracking: the recorded spectra of one training run, and the file format that stores runs.

A file holds several runs (e.g. one per optimizer) as plain dicts, lists, numbers and tensors,
saved with ``torch.save``, so ``torch.load(path, weights_only=True)`` reads it back without
unpickling code. Layout (format ``FORMAT``):

    {"format": FORMAT, "runs": {run name: {"every": int, "meta": {str: str|number|None|list|tuple|dict},
        "history": [ {str: number} ... ],          # e.g. loss/accuracy per step, free form
        "params": {param name: {"shape": [int], "manifold": str,
            "steps": int64 (T,),  <metric>: float64 (T,) for every metric in METRICS,
            "exact": bool (T,),  "update_exact": bool (T,),
            "spectrum_steps": int64 (S,),  "spectra": float32 (S, r)}}}}}

``exact`` marks records whose spectrum statistics are exact (else one-sided estimates),
``update_exact`` those whose update_norm ‖ΔW‖₂ is (else a power-iteration lower bound, or NaN
without the weights before the step); files written before update_exact existed load with it
all False. Metrics not measurable at a record (the
update at the first step in callback mode) are NaN. History and meta values are stored as plain
Python numbers (numpy scalars converted), so the file loads with weights_only=True.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT = "modman.diagnostics.tracking/1"
# per record: the weight's spectrum statistics, then the last update ΔW = W_after − W_before and
# the gradient G seen by that step
METRICS = ("sigma_min", "sigma_max", "condition", "stable_rank", "distance",
           "update_norm", "update_alignment", "grad_norm")


@dataclass
class ParamTrack:
    """The records of one weight matrix (see the module docstring for the fields)."""

    shape: tuple
    manifold: str
    steps: list = field(default_factory=list)
    values: dict = field(default_factory=lambda: {k: [] for k in METRICS})
    exact: list = field(default_factory=list)
    update_exact: list = field(default_factory=list)
    spectrum_steps: list = field(default_factory=list)
    spectra: list = field(default_factory=list)

    def _lists(self) -> list[list]:
        return [self.steps, self.exact, self.update_exact, self.spectrum_steps, self.spectra,
                *self.values.values()]

    def mark(self) -> list[int]:
        """The records' lengths now, for ``rollback``."""
        return [len(x) for x in self._lists()]

    def rollback(self, mark: list[int]) -> None:
        """Drop every record appended since ``mark`` (a record that failed halfway)."""
        for x, n in zip(self._lists(), mark):
            del x[n:]

    def metric(self, key: str) -> torch.Tensor:
        if key not in METRICS:
            raise KeyError(f"unknown metric {key!r}; choose from {METRICS}")
        return torch.tensor(self.values[key], dtype=torch.float64)

    def spectrum_matrix(self) -> torch.Tensor:
        """(S, r) singular values at the spectrum steps (a stack's matrices concatenated, sorted)."""
        if not self.spectra:
            return torch.zeros(0, 0)
        return torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in self.spectra])


@dataclass
class Tracking:
    """One run: ``params`` name → ParamTrack, plus ``history`` and ``meta`` (free form)."""

    every: int
    params: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def metric(self, name: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps, values) of one metric of one weight."""
        track = self._get(name)
        return torch.tensor(track.steps, dtype=torch.int64), track.metric(key)

    def spectra(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps (S,), singular values (S, r)) of one weight."""
        track = self._get(name)
        return torch.tensor(track.spectrum_steps, dtype=torch.int64), track.spectrum_matrix()

    def _get(self, name: str) -> ParamTrack:
        if name not in self.params:
            raise KeyError(f"no tracked weight {name!r}; tracked: {self.names}")
        return self.params[name]

    def to_dict(self) -> dict:
        params = {}
        for name, t in self.params.items():
            d = {"shape": [int(x) for x in t.shape], "manifold": str(t.manifold),
                 "steps": torch.tensor(t.steps, dtype=torch.int64),
                 "exact": torch.tensor(t.exact, dtype=torch.bool),
                 "update_exact": torch.tensor(t.update_exact, dtype=torch.bool),
                 "spectrum_steps": torch.tensor(t.spectrum_steps, dtype=torch.int64),
                 "spectra": t.spectrum_matrix()}
            for k in METRICS:
                d[k] = t.metric(k)
            params[name] = d
        return {"every": int(self.every), "meta": plain_meta(self.meta), "history": _plain_history(self.history),
                "params": params}

    @classmethod
    def from_dict(cls, d: dict) -> "Tracking":
        out = cls(every=int(d["every"]), history=list(d.get("history", [])), meta=dict(d.get("meta", {})))
        for name, p in d["params"].items():
            t = ParamTrack(shape=tuple(p["shape"]), manifold=p["manifold"])
            t.steps = p["steps"].tolist()
            t.exact = p["exact"].tolist()
            # (a file from before update_exact: not known to be exact, so False, aligned with steps)
            t.update_exact = p["update_exact"].tolist() if "update_exact" in p else [False] * len(t.steps)
            for k in METRICS:
                t.values[k] = p[k].tolist()
            t.spectrum_steps = p["spectrum_steps"].tolist()
            t.spectra = list(p["spectra"]) if p["spectra"].numel() else []
            out.params[name] = t
        return out


def _plain_number(v, what: str):
    """v as a Python bool, int or float (a one-element tensor or a numpy scalar converted: numpy
    types pickle as numpy objects, which ``torch.load(weights_only=True)`` refuses to read)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"{what}={v!r:.40} is not a number")


def _plain_history(history) -> list:
    out = []
    for rec in history:
        if not isinstance(rec, dict):
            raise TypeError(f"history entries must be dicts of numbers, got {type(rec).__name__}")
        out.append({str(k): _plain_number(v, f"history value {k}") for k, v in rec.items()})
    return out


def plain_meta(meta) -> dict:
    """meta as plain Python values: str, None, numbers (numpy and one-element tensors converted,
    ``_plain_number``) and lists, tuples and str-keyed dicts of them — what
    ``torch.load(weights_only=True)`` reads back (``meta=vars(args)`` holds None and lists)."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict {{str: value}}, got {type(meta).__name__}")

    def plain(v, where, depth=0):
        if depth > 16:  # (a list that holds itself recursed without end)
            raise TypeError(f"{where} is nested more than 16 deep")
        if v is None:
            return v
        if isinstance(v, str):
            return str.__str__(v)  # its text: a str subclass (np.str_, a str Enum) saved, then refused at load
        if isinstance(v, (list, tuple)):
            items = [plain(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
            return list(items) if isinstance(v, list) else tuple(items)  # (a namedtuple as a tuple)
        if isinstance(v, Mapping):
            return keyed(v, where, depth + 1)
        return _plain_number(v, where)

    def keyed(mapping, where, depth=0):
        return {key: plain(x, f"{where}[{k!r}]" if depth else f"meta value {k}", depth)
                for key, (k, x) in _str_keyed(mapping, where).items()}

    return keyed(meta, "meta")


def _str_keyed(mapping, where: str) -> dict:
    """{str(k): (k, value)}, refusing two keys that are the same once made str (1 and "1"): the
    file keeps str keys, so one of them was dropped silently (a probe: one run of two saved)."""
    out = {}
    for k, x in mapping.items():
        if str(k) in out:
            raise TypeError(f"{where} has keys {out[str(k)][0]!r} and {k!r}, the same once made str")
        out[str(k)] = (k, x)
    return out


def save_tracking(path, runs) -> Path:
    """Save runs {name: Tracking | SpectrumTracker} (or one of them, named "run") to ``path``."""
    if not isinstance(runs, dict):
        runs = {"run": runs}
    if not runs:
        raise ValueError("save_tracking: no runs to save")
    plain = {}
    for key, (name, run) in _str_keyed(runs, "runs").items():
        tracking = getattr(run, "tracking", run)
        if not isinstance(tracking, Tracking):
            raise TypeError(f"run {name!r} is a {type(run).__name__}, not a Tracking or SpectrumTracker")
        plain[key] = tracking.to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "runs": plain}, path)
    return path


def load_tracking(path) -> dict[str, Tracking]:
    """The runs saved by ``save_tracking``, as {name: Tracking} (read with weights_only=True).
    Raises ValueError naming ``path`` for a file that is not one (OSError for one not there)."""
    try:
        data = torch.load(Path(path), weights_only=True)
    except OSError:  # (a missing file: the error names it)
        raise
    except Exception as err:  # a text file raised a bare KeyError: 101, an empty one EOFError (a probe)
        raise ValueError(f"{path} is not a readable modman tracking file (format {FORMAT!r}): torch.load "
                         f"raised {type(err).__name__}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a modman tracking file (format {FORMAT!r})")
    return {name: Tracking.from_dict(d) for name, d in data["runs"].items()}
