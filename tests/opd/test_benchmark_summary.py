"""benchmarks/opd.py's summaries: a run that misses the cap counts as infinite in the median, the
RL/OPD ratio is a labelled lower bound when only OPD reaches the target, and the KL-to-original
estimate is zero for a model against its own copy."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest

from modman.toy import tasks

from .helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location("opd_benchmark", ROOT / "opd.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT))


def _run(objective, lr, seed, steps, final=0.5):
    return {"objective": objective, "lr": lr, "seed": seed, "steps_to_target": steps,
            "curve": [(5, final)]}


def test_best_lr_counts_misses_as_infinite(bench):
    runs = [_run("opd", 1e-3, s, v) for s, v in enumerate((10, None, None))]
    runs += [_run("opd", 2e-3, s, v) for s, v in enumerate((40, 50, None))]
    best = bench.best_lr(runs, [1e-3, 2e-3])
    assert best["lr"] == 2e-3 and best["median_steps"] == 50
    assert best["medians"] == {"0.001": None, "0.002": 50}


def test_best_lr_all_misses_is_null(bench):
    runs = [_run("rl", 1e-3, s, None, final=0.7) for s in range(3)]
    runs += [_run("rl", 2e-3, s, None, final=0.8) for s in range(3)]
    best = bench.best_lr(runs, [1e-3, 2e-3])
    assert best["median_steps"] is None and best["lr"] == 2e-3  # tie broken by final accuracy


def test_rl_over_opd(bench):
    assert bench.rl_over_opd(50, 400, 500) == 8.0
    bound = bench.rl_over_opd(50, None, 500)
    assert bound.startswith(">10.0") and "lower bound" in bound
    assert bench.rl_over_opd(None, 400, 500) is None
    assert bench.rl_over_opd(None, None, 500) is None


def test_kl_to_reference_of_a_copy_is_zero(bench):
    task = tasks.addition(1)
    model = tiny_model(0)
    batch = task.encode(task.test_prompts()[:8])
    assert bench.kl_to_reference(model, copy.deepcopy(model), task, batch) == pytest.approx(
        0.0, abs=1e-5)
    other = tiny_model(1)
    assert bench.kl_to_reference(model, other, task, batch, samples=64) > 0
