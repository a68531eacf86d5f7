"""The trainer: exact resume, gradient accumulation, schedules, metrics, evaluation, and the
LoRA factors' manifolds under ManifoldMuon."""
import json
import math

import pytest
import torch

from modman.lora import (LoRAConfig, TrainConfig, apply_lora, eval_loss_fn, lora_layers, lr_factor,
                         optimizer_factory, task_data, train)
from modman.manifolds import Stiefel
from modman.toy import tasks

from .lora_helpers import snapshot, tiny_model

TASK = tasks.modular_addition(2, 13)


def model_and_data(dropout=0.0):
    from modman.toy import TinyCausalLM

    model = TinyCausalLM(TASK.tokenizer.vocab_size, 32, 2, 4, 16, seed=0)
    apply_lora(model, LoRAConfig(4, dropout=dropout), seed=0)
    return model, task_data(TASK, 8, seed=3)


def adapter_state(model):
    return {k: v for k, v in snapshot(model).items() if ".lora_" in k}


@pytest.mark.parametrize("name,lr,kwargs", [("adamw", 1e-2, {}),
                                            ("manifold_muon", 0.05, {"solver": "projected"})])
def test_resume_equals_uninterrupted(tmp_path, name, lr, kwargs):
    config = TrainConfig(6, schedule="linear", warmup_steps=2, grad_accum=2, checkpoint_every=3)
    factory = optimizer_factory(name, lr, **kwargs)
    torch.manual_seed(0)
    model, data = model_and_data(dropout=0.1)  # dropout: the RNG state must resume too
    full = train(model, factory, data, config, metrics_path=tmp_path / "full.jsonl")
    expected = adapter_state(model)

    torch.manual_seed(0)
    first, data = model_and_data(dropout=0.1)
    part = train(first, factory, data, config, checkpoint_dir=tmp_path / "ckpt",
                 metrics_path=tmp_path / "run.jsonl", stop_after=4)
    assert part.history[-1]["step"] == 4
    torch.manual_seed(123)  # a fresh process: different global RNG and a fresh model
    second, data = model_and_data(dropout=0.1)
    rest = train(second, factory, data, config, checkpoint_dir=tmp_path / "ckpt",
                 metrics_path=tmp_path / "run.jsonl")
    assert rest.resumed_from == 4
    got = adapter_state(second)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert losses == [r["loss"] for r in full.history]
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_equals_the_full_batch():
    """Every modular_addition example scores the same number of tokens, so the mean of two
    half-batch means is the full-batch mean, and so are the gradients (to rounding)."""
    full_data = task_data(TASK, 8, seed=5)

    def halves(step, micro):
        batch = full_data(step, 0)
        rows = slice(4 * micro, 4 * micro + 4)
        return {k: v[rows] for k, v in batch.items()}

    results = []
    for data, accum in ((full_data, 1), (halves, 2)):
        model, _ = model_and_data()
        train(model, optimizer_factory("adamw", 1e-2), data, TrainConfig(3, grad_accum=accum))
        results.append(adapter_state(model))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=1e-4)


def test_schedule_metrics_and_eval(tmp_path):
    config = TrainConfig(5, schedule="linear", warmup_steps=1, eval_every=2)
    assert [lr_factor(t, config) for t in range(5)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(t, TrainConfig(3, warmup_steps=2)) for t in range(3)] == [0.5, 1.0, 1.0]
    model, data = model_and_data()
    eval_batch = [data(10**6, 0)]
    result = train(model, optimizer_factory("adamw", 1e-2), data, config,
                   eval_fn=eval_loss_fn(eval_batch), metrics_path=tmp_path / "m.jsonl")
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records == result.history
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * f for f in (1, 1, .75, .5, .25)])
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == 8 * data(0, 0)["input_ids"].shape[1]
               or r["step"] > 0 for r in records)
    assert records[-1]["eval_loss"] < records[0]["loss"]  # it learns


def test_manifold_muon_keeps_A_on_stiefel_and_leaves_base_alone():
    """The factors' manifolds, measured: A (r × d_in) keeps orthonormal rows, B moves freely
    (Euclidean, from 0), the frozen base is bitwise unchanged (never projected)."""
    model, data = model_and_data()
    base = {k: v for k, v in snapshot(model).items() if ".lora_" not in k}
    result = train(model, optimizer_factory("manifold_muon", 0.05, solver="projected"), data,
                   TrainConfig(4))
    stats = result.optimizer.last_step_stats
    stiefel = Stiefel()
    for path, layer in lora_layers(model).items():
        A = layer.lora_A["default"].weight.detach()
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
        assert float(stiefel.distance(A)) < 1e-5
        assert float(stats[f"{path}.lora_A.default.weight"]["distance_to_manifold"]) < 1e-5
        assert layer.lora_B["default"].weight.abs().max() > 0
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_bad_trainer_input():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(5, schedule="cosine")
    with pytest.raises(ValueError, match="optimizer name"):
        optimizer_factory("sgd", 0.1)
    model = tiny_model()
    apply_lora(model, LoRAConfig(2))

    def no_labels(step, micro):
        return {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="no loss"):
        train(model, optimizer_factory("adamw", 1e-3), no_labels, TrainConfig(1))


def test_train_config_counts_take_any_integer_and_warmup_must_fit():
    np = pytest.importorskip("numpy")
    config = TrainConfig(np.int64(20), warmup_steps=np.int32(5), grad_accum=np.int64(2))
    assert (config.steps, config.warmup_steps, config.grad_accum) == (20, 5, 2)
    assert type(config.steps) is int
    for bad in (2.5, True, -1):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            TrainConfig(bad)
    # with a constant schedule a warmup longer than the run never reached the peak lr
    with pytest.raises(ValueError, match="warmup_steps=10 > steps=3"):
        TrainConfig(3, warmup_steps=10)
    assert lr_factor(2, TrainConfig(3, warmup_steps=3)) == 1.0


@pytest.mark.parametrize("make", ["factory", "modules"])
def test_manifold_muon_on_a_lora_model_keeps_its_outputs_at_construction(make):
    """A fresh adapter (B = 0) must stay a no-op and a trained one keep its outputs: B is not
    put on Stiefel (it took the Linear role and became ‖B‖_F = √r, logits moved 0.5), and when A
    is moved onto Stiefel, A = P·U → U, B gets B·P so that B·A is unchanged."""
    import warnings

    from modman.optim import ManifoldMuon

    x = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    for init in ("default", "random"):  # B = 0, and a trained-looking adapter (B ≠ 0)
        model = apply_lora(tiny_model(), LoRAConfig(4, init=init), seed=0).eval()
        before = model(x).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # A "moved onto the manifold", by design
            opt = (optimizer_factory("manifold_muon", 0.05)(model) if make == "factory"
                   else ManifoldMuon(model.modules(), lr=0.05, budget="uniform"))
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=2e-5)
        manifold = {n: g["manifold"] for g in opt.param_groups for n in g.get("param_names", [])}
        b_names = [n for n in manifold if ".lora_B." in n]
        assert b_names and all(manifold[n] == "euclidean" for n in b_names)
        stiefel = Stiefel()
        for layer in lora_layers(model).values():
            assert float(stiefel.distance(layer.lora_A["default"].weight.detach())) < 1e-5


def test_manifold_muon_factory_writes_nothing_before_the_optimizer_accepts_its_options():
    model = apply_lora(tiny_model(), LoRAConfig(4, init="random"), seed=0)
    state = snapshot(model)
    with pytest.raises(ValueError, match="solver"):
        optimizer_factory("manifold_muon", 0.05, solver="bogus")(model)
    assert all(torch.equal(state[k], v) for k, v in snapshot(model).items())


class _SqrtLoss(torch.nn.Module):
    """A plain module (no input_ids): loss = mean sqrt((x·w)²), finite everywhere, whose gradient
    is inf where x·w = 0 — at step 3 here, as a real model's can be."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x, labels):
        return {"loss": torch.sqrt((x @ self.w) ** 2 + 0 * labels.sum()).mean()}


def _sqrt_data(step, micro):
    x = torch.zeros(2, 4) if step == 2 else torch.ones(2, 4)
    return {"x": x, "labels": torch.ones(2, 3)}


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_non_finite_gradient_stops_before_the_weights_or_the_checkpoint_change(tmp_path, clip):
    """AdamW wrote the NaN into the weights (and clipping spread it to all of them) while the loss
    was finite; the step-3 checkpoint then held it. Now step 3 raises and changes nothing."""
    model = _SqrtLoss()
    config = TrainConfig(5, checkpoint_every=1, max_grad_norm=clip)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* at step 3; nothing was updated"):
        train(model, optimizer_factory("adamw", 1e-2), _sqrt_data, config, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert saved["step"] == 2 and torch.isfinite(model.w).all()
    assert torch.equal(saved["params"]["w"], model.w.detach())


def test_a_model_without_input_ids_trains_and_counts_its_labels():
    result = train(_SqrtLoss(), optimizer_factory("adamw", 1e-2), lambda s, m: _sqrt_data(0, m), TrainConfig(2))
    assert [r["tokens"] for r in result.history] == [6, 6]  # the labels' entries (KeyError: 'input_ids' before)
    assert all(r["grad_norm"] > 0 for r in result.history)


def test_resuming_with_another_optimizer_or_lr(tmp_path):
    model, data = model_and_data()
    train(model, optimizer_factory("muon", 0.02), data, TrainConfig(4), checkpoint_dir=tmp_path, stop_after=2)
    other, data = model_and_data()
    state = snapshot(other)
    # a bare KeyError: 'step' from inside torch's AdamW before
    with pytest.raises(ValueError, match="holds the state of Muon, the optimizer given is AdamW; not resumed"):
        train(other, optimizer_factory("adamw", 1e-3), data, TrainConfig(4), checkpoint_dir=tmp_path)
    assert all(torch.equal(v, snapshot(other)[k]) for k, v in state.items())
    with pytest.warns(UserWarning, match=r"with its base lrs \[0.02.*the optimizer given has \[0.05"):
        result = train(other, optimizer_factory("muon", 0.05), data, TrainConfig(4), checkpoint_dir=tmp_path)
    assert result.resumed_from == 2 and result.history[0]["lr"] == pytest.approx(0.02)


def test_the_result_prints_a_summary_not_every_record():
    model, data = model_and_data()
    result = train(model, optimizer_factory("adamw", 1e-2), data, TrainConfig(3))
    text = repr(result)
    assert text.startswith("TrainResult(3 steps, last 3: loss ") and "AdamW" in text and len(text) < 200


def test_an_optimizer_that_skips_non_finite_steps_is_left_to_skip_them():
    """optimizer_factory("manifold_muon", lr, nonfinite="skip") is a valid set-up: the trainer's own
    non-finite check must not abort it (a review); the step with the infinite gradient is skipped."""
    class SqrtLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3, bias=False)

        def forward(self, x, labels):
            return {"loss": torch.sqrt(self.lin(x) ** 2 + 0 * labels.sum()).mean()}

    model = SqrtLinear()
    result = train(model, optimizer_factory("manifold_muon", 0.05, nonfinite="skip", solver="projected"),
                   _sqrt_data, TrainConfig(5))
    assert len(result.history) == 5 and torch.isfinite(model.lin.weight).all()
    assert not math.isfinite(result.history[2]["grad_norm"])  # step 3's gradient, skipped by the optimizer


def test_a_merged_adapter_is_refused_naming_the_merge():
    """Merged factors are not in the forward pass: training raised torch's "element 0 of tensors
    does not require grad"."""
    from modman.lora import merge_lora

    model, data = model_and_data()
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged into the base weights .*unmerge_lora\(model\)"):
        train(model, optimizer_factory("adamw", 1e-2), data, TrainConfig(2))
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


@pytest.mark.parametrize("checkpoint_config", [LoRAConfig(4), LoRAConfig(2)], ids=["other optimizer", "other rank"])
def test_a_refused_resume_leaves_the_model_bit_identical(tmp_path, checkpoint_config):
    """ManifoldMuon's constructor moves each A onto Stiefel (B ← B·P): built before the checkpoint
    was checked, a refused resume still changed 28 tensors in a probe."""
    from modman.toy import TinyCausalLM

    saved = apply_lora(TinyCausalLM(TASK.tokenizer.vocab_size, 32, 2, 4, 16, seed=0), checkpoint_config, seed=0)
    data = task_data(TASK, 8, seed=3)
    train(saved, optimizer_factory("adamw", 1e-2), data, TrainConfig(2), checkpoint_dir=tmp_path)
    model, data = model_and_data()
    state = snapshot(model)
    match = "AdamW, the optimizer given is ManifoldMuon" if checkpoint_config.r == 4 else "has shape"
    with pytest.raises(ValueError, match=rf"trainer_state.pt.*{match}.*; not resumed"):
        train(model, optimizer_factory("manifold_muon", 0.05), data, TrainConfig(4), checkpoint_dir=tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in snapshot(model).items())


def test_a_damaged_checkpoint_is_refused_naming_it(tmp_path):
    """A truncated trainer_state.pt gave "OSError: [Errno 22] Invalid argument", naming no file."""
    import re

    model, data = model_and_data()
    train(model, optimizer_factory("adamw", 1e-2), data, TrainConfig(1), checkpoint_dir=tmp_path)
    file = tmp_path / "trainer_state.pt"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    model, data = model_and_data()
    state = snapshot(model)
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))} is not a readable checkpoint"):
        train(model, optimizer_factory("manifold_muon", 0.05), data, TrainConfig(2), checkpoint_dir=tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in snapshot(model).items())
    torch.save({"step": 1}, file)  # readable, but not a trainer checkpoint
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))} is not a trainer checkpoint: it lacks"):
        train(model, optimizer_factory("adamw", 1e-2), data, TrainConfig(2), checkpoint_dir=tmp_path)
