"""Matplotlib figures of tracked runs: spectra per layer, singular-value trajectories, optimizers
compared, and training curves. Each function returns the Figure and never calls ``plt.show``,
so it works headless (Agg) and inline in a notebook. ``runs`` is {run name: Tracking}, as
``load_tracking`` returns; ``history`` is a list of {"step", "loss", "test_acc"?, ...} dicts.
"""
from __future__ import annotations

import math

import torch

from .tracking import METRICS, Tracking


def _plt():
    import matplotlib.pyplot as plt  # imported lazily: the rest of diagnostics needs no matplotlib

    return plt


def _check_runs(runs) -> dict[str, Tracking]:
    """{name: Tracking}; a SpectrumTracker stands for its Tracking (as in ``save_tracking``)."""
    if not isinstance(runs, dict):
        runs = {"run": runs}
    if not runs:
        raise ValueError("runs must be a non-empty dict {name: Tracking} (or one Tracking)")
    runs = {name: getattr(run, "tracking", run) for name, run in runs.items()}
    for name, run in runs.items():
        if not isinstance(run, Tracking):
            raise TypeError(f"run {name!r} is a {type(run).__name__}, not a Tracking or SpectrumTracker")
    return runs


def _names(runs: dict[str, Tracking], params) -> list[str]:
    first = next(iter(runs.values()))
    names = first.names if params is None else ([params] if isinstance(params, str) else list(params))
    if not names:
        raise ValueError("params is empty: name at least one tracked weight (None plots them all)")
    for run_name, run in runs.items():
        missing = [n for n in names if n not in run.params]
        if missing:
            raise KeyError(f"run {run_name!r} did not track {missing}")
    return names


def plot_spectra(runs, *, step: int | None = None, params=None, log: bool = True):
    """Sorted singular values of each weight (one panel per weight), one line per run, at the
    recorded spectrum step ``step`` (default: each run's last)."""
    runs = _check_runs(runs)
    names = _names(runs, params)
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run_name, run in runs.items():
            steps, spectra = run.spectra(name)
            if spectra.numel() == 0:
                continue
            i = len(steps) - 1 if step is None else int((steps - step).abs().argmin())
            # a weight with a NaN or ∞ has a NaN spectrum: no line, so the legend says why
            note = "" if bool(torch.isfinite(spectra[i]).any()) else ": NaN, not drawn"
            ax.plot(range(1, spectra.shape[1] + 1), spectra[i].numpy(), label=f"{run_name} (step {int(steps[i])}){note}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{name} {'×'.join(map(str, next(iter(runs.values())).params[name].shape))}", fontsize=9)
        ax.set_xlabel("index i")
        if log:
            ax.set_yscale("log")
        if ax.get_lines()[:-1]:  # its own legend: weights of another size have their spectra at other steps
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("σᵢ")
    fig.tight_layout()
    return fig


def plot_trajectories(run: Tracking, *, params=None, max_lines: int = 64):
    """Every singular value of each weight of one run (a Tracking or SpectrumTracker, or a dict
    holding one) against the step, one panel per weight; at most ``max_lines`` of them (evenly
    spaced indices) so large layers stay legible. A dict of several runs is refused (ValueError):
    call it once per run."""
    runs = _check_runs(run)
    if len(runs) > 1:  # (it drew the first run's alone, silently: a probe)
        raise ValueError(f"plot_trajectories takes one run, got {len(runs)}: {', '.join(map(repr, runs))}; "
                         "call it once per run (plot_spectra and plot_metric compare runs)")
    run = next(iter(runs.values()))
    names = _names(runs, params)
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, spectra = run.spectra(name)
        if spectra.numel():
            r = spectra.shape[1]
            idx = torch.linspace(0, r - 1, min(r, max_lines)).round().long().unique()
            ax.plot(steps.numpy(), spectra[:, idx].numpy(), lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("σᵢ")
    fig.tight_layout()
    return fig


def plot_metric(runs, metric: str = "distance", *, params=None, log: bool = True):
    """One tracked metric (e.g. "distance", "condition", "stable_rank", "update_norm") against the
    step: one panel per weight, one line per run — optimizers compared."""
    runs = _check_runs(runs)
    names = _names(runs, params)
    if metric not in METRICS:  # checked before a figure exists: a failed call leaves none open
        raise KeyError(f"plot_metric: unknown metric {metric!r}; choose from {METRICS}")
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run_name, run in runs.items():
            steps, values = run.metric(name, metric)
            ax.plot(steps.numpy(), values.numpy(), label=run_name)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_history(histories: dict, keys=("loss", "test_acc")):
    """Training curves: one panel per key, one line per run; rows without the key are skipped."""
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict {name: list of {step, key: value} dicts}")
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one history key to plot, e.g. ('loss',)")
    for name, hist in histories.items():  # before a figure exists: a failed call leaves none open
        for i, row in enumerate(hist):
            if not isinstance(row, dict) or (any(key in row for key in keys) and "step" not in row):
                raise ValueError(f"plot_history: row {i} of {name!r} is {row!r:.80}; each row is a dict "
                                 f"with a 'step' and the values to plot, e.g. {{'step': 0, 'loss': 2.3}}")
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, hist in histories.items():
            rows = [r for r in hist if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig
