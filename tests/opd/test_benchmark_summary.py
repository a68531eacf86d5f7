"""benchmarks/opd.py's summaries: a run that misses the cap counts as infinite in the median, the
RL/OPD ratio is a labelled lower bound when only OPD reaches the target, and the KL-to-original
estimate is zero for a model against its own copy."""
import copy
import json
import importlib.util
import sys
from pathlib import Path

import pytest

from modman.toy import tasks

from .helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("opd_benchmark", ROOT / "opd.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        # opd.py puts benchmarks/ on sys.path itself: left there, its kernels.py shadowed the
        # `kernels` package transformers imports, and the PEFT tests run after this one failed
        sys.path[:] = saved


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


def test_promote_moves_own_headline_aside_once(bench, tmp_path):
    dst, src, bad = tmp_path / "opd.json", tmp_path / "opd_other.json", tmp_path / "bad.json"
    own = {"steps_to_target": {"opd": None, "rl": None, "sft": 350}, "lr": {"opd": 1e-3}, "seeds": [0],
           "cap": 500, "task": "addition(3)", "steps_to_accuracy": {"0.5": {}}, "forgetting": {"x": 1}}
    other = {"steps_to_target": {"opd": 1280, "rl": None, "sft": 100}, "lr": {"opd": 5e-4},
             "seeds": [0, 1, 2], "cap": 8000, "task": "substitution(16)", "rl_over_opd": ">6.2"}
    dst.write_text(json.dumps(own))
    src.write_text(json.dumps(other))
    bad.write_text(json.dumps({"cap": 10}))
    with pytest.raises(ValueError, match="no headline"):
        bench.promote(bad, dst)
    assert json.loads(dst.read_text()) == own  # refused: nothing written
    for _ in range(2):  # promoting again must not overwrite the saved own headline
        bench.promote(src, dst)
        merged = json.loads(dst.read_text())
        assert {k: merged[k] for k in other} == other
        assert merged[bench.OWN_HEADLINE] == {k: v for k, v in own.items() if k != "forgetting"}
        assert merged["forgetting"] == own["forgetting"] and merged["promoted_from"] == src.name
        assert "steps_to_accuracy" not in merged  # the source has none: addition's must not stay
        # what later runs write and read as this file's own headline
        assert bench.own_headline(merged) is merged[bench.OWN_HEADLINE]
    assert bench.own_headline(own) is own
