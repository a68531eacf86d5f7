"""The `modman` main job, at a tiny size: it trains, prints its table and writes its files."""
import json

import pytest

from modman.cli import main, parse_args


def test_main_job_small_run_writes_table_and_files(tmp_path, capsys):
    rc = main(["--steps", "6", "--width", "16", "--optimizers", "manifold_muon,muon,adamw", "--out", str(tmp_path),
               "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("manifold_muon", "muon", "adamw"):
        assert name in out
    assert (tmp_path / "singular_values.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["optimizer"]: r for r in results["runs"]}
    assert set(runs) == {"manifold_muon", "muon", "adamw"}
    # ManifoldMuon keeps every weight on the Stiefel manifold; AdamW does not
    for sv in runs["manifold_muon"]["singular_values"].values():
        assert max(abs(s - 1) for s in sv) < 1e-4
    assert runs["manifold_muon"]["duality_gap_median"] is not None
    assert any(max(abs(s - 1) for s in sv) > 1e-2 for sv in runs["adamw"]["singular_values"].values())


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "sgd"], "unknown optimizer"),
    (["--lr", "adamw"], "NAME=LR"),
    (["--steps", "0"], "--steps"),
    (["--solver", "magic"], "unknown solver"),
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
