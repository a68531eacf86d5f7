"""The `modman` main job, at a tiny size: it trains, prints its table and writes its files."""
import json

import pytest
import torch

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
    # what BENCHMARKS.md asks every results file to record (main_job.json is this file)
    assert results["command"].startswith("modman --steps 6 --width 16")
    assert {"cpu", "cpu_flags", "threads", "torch", "gpu"} <= set(results["machine"])
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
    # each of these used to pass parse_args and traceback later (matplotlib, torch, os)
    (["--optimizers", ","], "--optimizers: no optimizer named"),
    (["--optimizers", " "], "--optimizers: no optimizer named"),
    (["--threads", "-1"], "--threads must be ≥ 1"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--lr", "adamw=-1"], "--lr: the learning rate of adamw must be a finite number ≥ 0"),
    (["--lr", "adamw=nan"], "--lr: the learning rate of adamw must be a finite number ≥ 0"),
    (["--lr", "muon=inf"], "--lr: the learning rate of muon must be a finite number ≥ 0"),
    (["--optimizers", "adamw", "--lr", "muon=0.1"], "--lr muon=0.1: muon is not among --optimizers adamw"),  # (ignored)
    # a probe's: the first ran adamw and printed the solver's footer, the second used 2e-3 silently,
    # the third trained the same run twice
    (["--optimizers", "adamw", "--solver", "dual_ascent"], "--solver dual_ascent: manifold_muon is not among"),
    (["--optimizers", "adamw", "--lr", "adamw=1e-3", "--lr", "adamw=2e-3"], "the learning rate of adamw is given twice"),
    (["--optimizers", "adamw,muon,adamw"], "--optimizers: adamw named twice"),
    (["--logit-scale", "0"], "--logit-scale must be a finite number > 0"),
    (["--logit-scale", "nan"], "--logit-scale must be a finite number > 0"),
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("sub, message", [("afile", "exists and is not a folder"),
                                          ("afile/run", "is a file, so no folder can be made under it")])
def test_out_that_cannot_be_a_folder_is_a_usage_error(tmp_path, capsys, sub, message):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / sub), "--steps", "1", "--optimizers", "adamw"])  # refused before training
    assert err.value.code == 2
    err_text = capsys.readouterr().err
    assert f"--out {str(tmp_path / sub)!r}: " in err_text and message in err_text


def test_out_that_makedirs_cannot_create_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # as root os.access says every folder is writable, so makedirs is the last word
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("modman.cli.os.makedirs", refuse)
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "run"), "--steps", "1", "--optimizers", "adamw"])
    assert err.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_one_layer_is_named_40_to_10_and_runs_without_manifold_muon_print_no_gap_line(tmp_path, capsys):
    assert main(["--steps", "1", "--depth", "1", "--optimizers", "adamw", "--out", str(tmp_path),
                 "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "MLP 40→10 (" in out and "duality gap" not in out  # ("MLP 40→→10" before)


def test_good_lr_zero_and_threads_are_accepted(tmp_path):
    args = parse_args(["--lr", "adamw=0", "--threads", "1", "--out", str(tmp_path / "new" / "run")])
    assert args.lr == {"adamw": 0.0} and args.threads == 1
    assert not (tmp_path / "new").exists()  # parsing checks the folder, it does not create it


def test_a_diverged_run_is_reported_not_fatal_to_the_others(tmp_path, capsys):
    """--lr adamw=1e20: the final SVD of NaN weights raised, and no results.json was written for any
    optimizer (a probe). The run is reported with NaN singular values; tiny σ are not shown as 0."""
    rc = main(["--steps", "3", "--width", "16", "--optimizers", "muon,adamw", "--lr", "adamw=1e20",
               "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[nan]" in out
    runs = {r["optimizer"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(runs) == {"muon", "adamw"}


def test_singular_value_ranges_show_small_values():
    from modman.cli import sv_range

    assert sv_range([8e-5, 10.786]) == "[8.00e-05, 10.786]"
    assert sv_range([0.0, 1.0]) == "[0.000, 1.000]"
    assert sv_range([float("nan"), 1.0]) == "[nan]"
    assert sv_range([0.005, 1.0]) == "[5.00e-03, 1.000]" and sv_range([0.01, 1.0]) == "[0.010, 1.000]"


def test_train_refuses_unknown_optimizers_and_zero_steps():
    from modman.experiments.mnist1d import make_optimizer, train

    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="steps must be an int ≥ 1"):
        train("adamw", steps=0, data={})


def test_logit_scale_multiplies_the_logits_of_the_loss():
    """--logit-scale: the README's fix for ManifoldMuon's unit-spectrum head, reproducible from the
    CLI (a newcomer could not: the main job shows ManifoldMuon behind the others without it)."""
    from modman.experiments.mnist1d import train

    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(64, 40, generator=g), "y": torch.randint(0, 10, (64,), generator=g)}
    data.update(x_test=data["x"][:8], y_test=data["y"][:8])
    losses = {}
    for scale in (1.0, 8.0):
        r = train("adamw", steps=1, batch_size=64, data=data, eval_every=0, logit_scale=scale)
        torch.manual_seed(0)  # the model train() builds (seed 0), before its step
        from modman.experiments.mnist1d import make_mlp
        model = make_mlp(d_in=40)
        idx = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(0))
        expected = torch.nn.functional.cross_entropy(scale * model(data["x"][idx]), data["y"][idx]).item()
        assert r.history[0]["loss"] == pytest.approx(expected, rel=1e-6)
        losses[scale] = r.history[0]["loss"]
    assert losses[1.0] != losses[8.0]
    with pytest.raises(ValueError, match="logit_scale"):
        train("adamw", steps=1, data=data, logit_scale=-1.0)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("modman 0.")
