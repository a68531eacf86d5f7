"""The benchmark scripts load as a user runs them: from any folder, with PYTHONSAFEPATH=1 (which
tests/run.sh sets and which keeps the script's own folder off sys.path): 11 of 19 failed with
"No module named 'machine'", even for --help."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "machine.py")

LOAD_ALL = """
import os, runpy, sys
failed = []
for path in sys.argv[1:]:
    saved = list(sys.path)
    folder = os.path.dirname(os.path.abspath(path))
    for name, module in list(sys.modules.items()):  # each script must find its neighbours by itself
        if os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "/")) == folder:
            del sys.modules[name]
    try:
        runpy.run_path(path, run_name="benchmark_module")  # top level only: main() is not run
    except Exception as e:
        failed.append(f"{path}: {type(e).__name__}: {e}")
    sys.path[:] = saved
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_loads_from_another_folder_with_pythonsafepath(tmp_path):
    assert len(SCRIPTS) >= 17
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "-c", LOAD_ALL, *map(str, SCRIPTS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_results_table_is_summarize_output():
    """The README's table is printed by benchmarks/summarize.py from the committed JSONs, never typed."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize.py")], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONSAFEPATH="1"))
    assert done.returncode == 0, done.stderr
    table = done.stdout.strip().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table
    assert not readme[start + len(table)].startswith("|"), "the README has rows summarize.py does not print"


def test_summarize_prints_a_failed_parabola_fit_as_missing(tmp_path):
    """lr_transfer.py writes depth_shift_fit None when a sweep's parabola fit fails; summarize.py
    then failed formatting None (an audit)."""
    import json
    import shutil

    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    d = json.loads((results / "lr_transfer.json").read_text())
    sh = next(iter(next(iter(d["best_lr_shift"].values())).values()))
    sh["depth_shift_fit"] = None
    (results / "lr_transfer.json").write_text(json.dumps(d))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--results", str(results)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONSAFEPATH="1"))
    assert done.returncode == 0, done.stderr
    assert "parabola fits n/a)" in done.stdout


def test_optimizers_refuses_a_slow_budget_without_a_warm_up_step(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizers.py"), "--warmup", "0",
                           "--slow-budget", "1", "--out", str(tmp_path / "o.json")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1"))
    assert done.returncode == 2 and "--slow-budget needs --warmup" in done.stderr, done.stderr


def test_a_short_run_writes_where_it_is_told_and_claims_no_bar(tmp_path):
    """--out in a folder that does not exist yet (created before the work: a missing folder failed
    after it), and a run shorter than the bar's 10⁴ steps does not claim to meet it."""
    out = tmp_path / "new" / "drift.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "drift.py"), "--steps", "30", "--shape", "8", "4",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(out.read_text())
    assert [r["steps"] for r in result["results"]] == [30, 30] and result["meets_bar"] is None
