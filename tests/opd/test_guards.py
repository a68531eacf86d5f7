"""The trainer's guards: bad configurations are refused at construction, a non-finite value never
reaches the weights (and a failed step changes nothing), dropout never enters the step, and an
fp64 model is scored in fp64."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modman.opd import OPDConfig, Trainer, gather_logprobs, group_centred_advantages, teacher_advantages
from modman.toy import TinyCausalLM, tasks
from modman.toy.model import RMSNorm

from .helpers import TOKENIZER, tiny_model

TASK = tasks.addition(1)
V = TOKENIZER.vocab_size


def _config(**kw):
    base = dict(prompts_per_step=4, group_size=4, eval_every=0, seed=0)
    base.update(kw)
    return OPDConfig(**base)


def _adamw(m):
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.0)


def _snapshot(trainer):
    return (copy.deepcopy(trainer.student.state_dict()),
            copy.deepcopy(trainer.optimizer.state_dict()), trainer.step_count)


def _assert_same(a, b):
    """Exact equality of two nested state dicts (same dtype and values; NaN only where NaN was)."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("kw, name", [
    (dict(grad_clip=-1.0), "grad_clip"), (dict(grad_clip=0.0), "grad_clip"),
    (dict(grad_clip=float("nan")), "grad_clip"), (dict(grad_clip=float("inf")), "grad_clip"),
    (dict(grad_clip=True), "grad_clip"), (dict(grad_clip="1"), "grad_clip"),
    (dict(clip_eps=5.0), "clip_eps"), (dict(clip_eps=0.0), "clip_eps"),
    (dict(clip_eps=1.0, loss="ppo"), "clip_eps"), (dict(clip_eps=float("nan")), "clip_eps"),
    (dict(eval_prompts=-5), "eval_prompts"), (dict(eval_prompts=0), "eval_prompts"),
    (dict(eval_prompts=2.0), "eval_prompts"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eval_every=2.5), "eval_every"), (dict(eval_every=-1), "eval_every"),
    (dict(eval_every=True), "eval_every"),
    (dict(group_size=np.float64(2.0)), "group_size"), (dict(substeps=False), "substeps"),
    (dict(kl_coef=float("inf")), "kl_coef"), (dict(kl_coef=float("nan")), "kl_coef"),
    (dict(objective="rl", group_size=1), "group_size"),
    (dict(objective="rl", group_size=1, kl_coef=0.5), "group_size"),
    (dict(kl_coef=0.0), "kl_coef"),  # "opd" with zero advantages trains nothing
    # a bool equals 1.0 and 1 (they passed, and torch.Generator failed on a seed of 2**64 naming nothing)
    (dict(temperature=True), "temperature"), (dict(seed=2 ** 64), "seed"),
    (dict(discount=True), "discount"),
])
def test_bad_config_values_are_refused_naming_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        OPDConfig(**kw)


def test_numpy_integers_are_accepted_and_stored_as_int():
    cfg = _config(group_size=np.int64(2), prompts_per_step=np.int32(2), substeps=np.int64(1),
                  max_new_tokens=np.int64(3), eval_every=np.int16(0), eval_prompts=np.int64(4))
    for name in ("group_size", "prompts_per_step", "substeps", "max_new_tokens", "eval_every",
                 "eval_prompts"):
        assert type(getattr(cfg, name)) is int, name
    trainer = Trainer(tiny_model(0), TASK, cfg, teacher=tiny_model(1), optimizer=_adamw)
    record = trainer.step()
    assert record["completion_length"] <= 3


def test_valid_edge_values_are_accepted():
    assert OPDConfig(grad_clip=1e-3).grad_clip == 1e-3
    assert OPDConfig(grad_clip=None).grad_clip is None
    assert OPDConfig(clip_eps=0.999, loss="ppo").clip_eps == 0.999
    assert OPDConfig(eval_prompts=None).eval_prompts is None
    assert OPDConfig(eval_every=0).eval_every == 0
    assert OPDConfig(objective="rl", group_size=2).group_size == 2


def test_train_refuses_a_bool_step_count():
    trainer = Trainer(tiny_model(0), TASK, _config(), teacher=tiny_model(1), optimizer=_adamw)
    with pytest.raises(ValueError, match="steps"):
        trainer.train(True)
    assert trainer.step_count == 0


def test_grad_clip_shrinks_the_update_without_turning_it():
    # SGD: the clipped update is the unclipped one scaled down (cosine 1), never flipped.
    def update(grad_clip):
        student, teacher = tiny_model(0), tiny_model(1)
        with torch.no_grad():
            teacher.lm_head.weight.mul_(20.0)
        before = [p.detach().clone() for p in student.parameters()]
        trainer = Trainer(student, TASK, _config(grad_clip=grad_clip), teacher=teacher,
                          optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1e-3))
        grad_norm = trainer.step()["grad_norm"]
        delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(),
                                                                        before)])
        return delta, grad_norm
    free, grad_norm = update(None)
    clipped, _ = update(1e-2)
    assert grad_norm > 1e-2  # the clip is active
    cos = torch.nn.functional.cosine_similarity(free.double(), clipped.double(), dim=0)
    assert float(cos) > 0.9999
    # lr·(clip/norm) shrinks the step by clip/norm (clip_grad_norm_ adds 1e-6 to the norm).
    torch.testing.assert_close(float(clipped.double().norm() / free.double().norm()),
                               1e-2 / (grad_norm + 1e-6), rtol=1e-3, atol=0)


# ------------------------------------------------------------------ construction-time checks


@pytest.mark.parametrize("delta", [8, -8, 1])
def test_student_vocabulary_must_match_the_task_tokenizer(delta):
    student, teacher = tiny_model(0, vocab_size=V + delta), tiny_model(1, vocab_size=V + delta)
    with pytest.raises(ValueError, match=f"{V + delta} tokens.*tokenizer has {V}"):
        Trainer(student, TASK, _config(), teacher=teacher, optimizer=_adamw)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_a_student_whose_generate_takes_another_call_is_refused():
    """The rollouts call TinyCausalLM.generate's signature; a transformers model (generate(inputs,
    generation_config, **kwargs)) failed at the first step with "'int' object has no attribute
    'max_length'"."""
    import types

    student = tiny_model(0)
    student.generate = types.MethodType(lambda self, inputs=None, generation_config=None, **kw: None, student)
    with pytest.raises(TypeError, match="generate.*signature of modman.toy.TinyCausalLM.generate"):
        Trainer(student, TASK, _config(), teacher=tiny_model(1), optimizer=_adamw)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))
    with pytest.raises(TypeError, match="LlamaForCausalLM's generate takes another"):
        Trainer(hf, TASK, _config(), teacher=tiny_model(1), optimizer=_adamw)
    # SFT on the teacher's samples: the teacher is the sampler, checked as well (a review)
    teacher = tiny_model(1)
    teacher.generate = types.MethodType(lambda self, inputs=None, generation_config=None, **kw: None, teacher)
    with pytest.raises(TypeError, match="the teacher samples its rollouts"):
        Trainer(tiny_model(0), TASK, _config(objective="sft", sft_source="teacher"), teacher=teacher,
                optimizer=_adamw)


def test_optimizer_on_another_models_parameters_is_refused():
    other = tiny_model(5)
    with pytest.raises(ValueError, match="none of the student's trainable parameters"):
        Trainer(tiny_model(0), TASK, _config(), teacher=tiny_model(1),
                optimizer=torch.optim.AdamW(other.parameters()))
    # A factory that copies the model before building the optimizer is the same mistake.
    with pytest.raises(ValueError, match="none of the student's trainable parameters"):
        Trainer(tiny_model(0), TASK, _config(), teacher=tiny_model(1),
                optimizer=lambda m: torch.optim.AdamW(copy.deepcopy(m).parameters()))


def test_optimizer_on_only_frozen_parameters_is_refused():
    lora = pytest.importorskip("modman.lora")
    student = lora.apply_lora(tiny_model(0), lora.LoRAConfig(r=2))
    frozen = [p for p in student.parameters() if not p.requires_grad]
    with pytest.raises(ValueError, match="none of the student's trainable parameters"):
        Trainer(student, TASK, _config(), teacher=tiny_model(1),
                optimizer=torch.optim.SGD(frozen, lr=1e-2))


# ------------------------------------------------------------------ non-finite values


def _trained_one_step(**kw):
    """A trainer after one good step, so the optimizer has state that a bad step could spoil."""
    trainer = Trainer(tiny_model(0), TASK, _config(**kw), teacher=tiny_model(1),
                      optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    trainer.step()
    return trainer


@pytest.mark.parametrize("substeps", [1, 3])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_teacher_changes_nothing(substeps, value):
    trainer = _trained_one_step(substeps=substeps, loss="ppo")
    with torch.no_grad():
        trainer.teacher.lm_head.weight[3, 0] = value
    before = _snapshot(trainer)
    with pytest.raises(FloatingPointError, match="step 2: non-finite teacher log-prob"):
        trainer.step()
    _assert_same(_snapshot(trainer), before)
    assert len(trainer.history) == 1
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def test_non_finite_student_is_refused_before_the_update():
    trainer = _trained_one_step()
    with torch.no_grad():
        trainer.student.lm_head.weight[3, 0] = float("nan")
    before = _snapshot(trainer)
    # sampling stops at the NaN logits (torch's multinomial raised a RuntimeError naming nothing)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        trainer.step()
    _assert_same(_snapshot(trainer), before)


@pytest.mark.parametrize("share", ["all", "embedding"])
def test_a_teacher_sharing_parameters_with_the_student_is_refused_and_nothing_changes(share):
    """copy.copy(student) passed `teacher is student`; freezing the teacher then froze the student
    (every weight, or the shared embedding, which silently never trained), a probe."""
    student = tiny_model(0)
    if share == "all":
        teacher = copy.copy(student)
    else:
        teacher = tiny_model(1)
        teacher.embed_tokens = student.embed_tokens
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        Trainer(student, TASK, _config(), teacher=teacher, optimizer=_adamw)
    assert all(p.requires_grad for p in student.parameters())
    assert teacher.training


def test_a_teacher_sharing_a_frozen_student_parameter_is_accepted():
    """Sharing a frozen embedding saves memory and freezes nothing new (refused by the first
    version of the check above, with a message that was false there; a review)."""
    student, teacher = tiny_model(0), tiny_model(1)
    student.embed_tokens.requires_grad_(False)
    teacher.embed_tokens = student.embed_tokens
    Trainer(student, TASK, _config(), teacher=teacher, optimizer=_adamw).step()


def test_a_teacher_on_another_device_is_refused_naming_both():
    student, teacher = tiny_model(0), tiny_model(1).to("meta")
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match="student is on cpu and the teacher on meta"):
        Trainer(student, TASK, _config(), teacher=teacher, optimizer=_adamw)
    _assert_same(student.state_dict(), before)


def test_a_teacher_with_a_shorter_context_is_named_and_nothing_changes():
    trainer = _trained_one_step()
    trainer.teacher = tiny_model(1, max_len=6)  # addition(1): prompts of 5–6 tokens plus the answer
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match="the teacher reads at most 6 tokens"):
        trainer.step()
    _assert_same(_snapshot(trainer), before)


def test_a_token_budget_shorter_than_the_answers_warns():
    with pytest.warns(UserWarning, match="max_new_tokens=1 is shorter than the task's answers") as caught:
        trainer = Trainer(tiny_model(0), TASK, _config(max_new_tokens=1), teacher=tiny_model(1), optimizer=_adamw)
    assert len([w for w in caught if "max_new_tokens" in str(w.message)]) == 1
    assert trainer.max_new_tokens == 1 < TASK.max_new_tokens


def test_a_prompt_row_of_padding_alone_is_refused():
    model = tiny_model(0)
    ids = torch.tensor([[1, 2, 3], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"marks no token in row\(s\) \[1\]"):
        model.generate(ids, 2, attention_mask=mask)


def test_non_finite_gradient_with_finite_loss_changes_nothing():
    trainer = _trained_one_step()
    before = _snapshot(trainer)
    # The loss stays finite; only the backward pass overflows.
    handle = trainer.student.lm_head.weight.register_hook(lambda g: g * float("inf"))
    try:
        with pytest.raises(FloatingPointError, match="non-finite grad_norm"):
            trainer.step()
    finally:
        handle.remove()
    _assert_same(_snapshot(trainer), before)
    assert all(p.grad is None for p in trainer.student.parameters())


class _PoisonedSGD(torch.optim.SGD):
    """SGD whose steps write NaN into the first parameter once ``poison`` is set: a stand-in for
    an update that diverges."""

    poison = False

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        if self.poison:
            self.param_groups[0]["params"][0].fill_(float("nan"))


def test_divergence_in_a_later_substep_is_undone():
    # The first substep's update poisons the weights, so the second substep's loss is NaN: the
    # first substep's update, and the momentum it wrote, must be undone.
    student, teacher = tiny_model(0), tiny_model(1)
    trainer = Trainer(student, TASK, _config(substeps=2), teacher=teacher,
                      optimizer=lambda m: _PoisonedSGD(m.parameters(), lr=1e-2, momentum=0.9))
    trainer.step()
    trainer.optimizer.poison = True
    before = _snapshot(trainer)
    with pytest.raises(FloatingPointError, match="step 2: non-finite"):
        trainer.step()
    _assert_same(_snapshot(trainer), before)
    assert all(torch.isfinite(p).all() for p in student.parameters())


# ------------------------------------------------------------------ dropout


def _dropout_student():
    lora = pytest.importorskip("modman.lora")
    return lora.apply_lora(tiny_model(0), lora.LoRAConfig(2, dropout=0.5, init="random"), seed=0)


@pytest.mark.parametrize("objective", ["opd", "rl"])
def test_dropout_student_equal_to_its_teacher_gets_zero_advantages_and_no_update(objective):
    student = _dropout_student()
    teacher = copy.deepcopy(student)
    student.train()
    # rl with kl_coef > 0 and no reward variation: only the (zero) teacher term is left.
    trainer = Trainer(student, TASK, _config(objective=objective, kl_coef=1.0), teacher=teacher,
                      optimizer=_adamw)
    before = copy.deepcopy(student.state_dict())
    for _ in range(2):
        record = trainer.step()
        assert record["teacher_kl"] == 0.0 and record["loss"] == 0.0
        assert record["grad_norm"] == 0.0 and record["reward"] == 0.0
    _assert_same(student.state_dict(), before)


@pytest.mark.parametrize("objective", ["opd", "sft"])
@pytest.mark.parametrize("start_training", [True, False])
def test_the_step_runs_the_student_without_dropout_and_restores_its_mode(objective,
                                                                         start_training):
    student = _dropout_student()
    student.train(start_training)
    modes = []
    handle = student.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer = Trainer(student, TASK, _config(objective=objective, sft_source="student"),
                      teacher=tiny_model(1), optimizer=_adamw)
    record = trainer.step()
    handle.remove()
    assert modes and not any(modes)  # sampling, scoring and the learner: all eval mode
    assert student.training == start_training
    assert all(m.training == start_training for m in student.modules())
    assert record["sampler_mismatch"] < 1e-5  # sampler and learner are one policy


def test_step_and_evaluate_restore_every_submodules_own_mode():
    """A part kept in eval mode on purpose inside a student in training mode came back in
    training mode: only the model's own flag was restored (a review)."""
    student = _dropout_student().train()
    part = next(m for m in student.modules() if m is not student and any(True for _ in m.children()))
    part.eval()
    modes = {name: m.training for name, m in student.named_modules()}
    trainer = Trainer(student, TASK, _config(objective="opd"), teacher=tiny_model(1), optimizer=_adamw)
    trainer.step()
    assert {name: m.training for name, m in student.named_modules()} == modes
    trainer.evaluate()
    assert {name: m.training for name, m in student.named_modules()} == modes


def test_sampling_and_teacher_scoring_restore_every_submodules_own_mode():
    """The public sample_rollouts and teacher_logprobs restored only the model's own flag
    (model.train(was_training)): a part kept in eval mode came back in training mode (a probe)."""
    from modman.opd import sample_rollouts, teacher_logprobs
    model = _dropout_student().train()
    part = next(m for m in model.modules() if m is not model and any(True for _ in m.children()))
    part.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    batch = TASK.sample(2, np.random.default_rng(0), "train")
    tok = TASK.tokenizer
    rollouts = sample_rollouts(model, batch.prompt_ids, batch.prompt_mask, batch.prompts, group_size=2,
                               max_new_tokens=TASK.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert {name: m.training for name, m in model.named_modules()} == modes
    teacher_logprobs(model, rollouts)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_the_learner_ratio_is_one_on_the_first_update_with_dropout():
    # teacher_kl gives Σ_t (log s − log t); with ρ = 1 the IS loss is −mean Σ_t A_t =
    # mean Σ_t (log s − log t) = teacher_kl (kl_coef 1, discount 0) up to the sampler's noise.
    student = _dropout_student()
    student.train()
    teacher = tiny_model(1)
    with torch.no_grad():  # a confident teacher: a KL far from 0
        teacher.lm_head.weight.mul_(20.0)
    trainer = Trainer(student, TASK, _config(), teacher=teacher, optimizer=_adamw)
    record = trainer.step()
    assert record["teacher_kl"] > 1.0
    assert record["loss"] == pytest.approx(record["teacher_kl"], rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------ precision


def _model(dtype, seed=0):
    return TinyCausalLM(40, 32, 1, 4, 16, seed=seed).to(dtype)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31 - 1))
def test_fp64_model_is_scored_in_fp64(seed):
    m = _model(torch.float64, seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (2, 10), generator=gen)
    positions = torch.arange(1, 10).expand(2, 9)
    with torch.no_grad():
        lp, ent = gather_logprobs(m, x, torch.ones_like(x), positions, with_entropy=True)
        logp = m(x).logits.log_softmax(-1)[:, :-1]
    ref = logp.gather(-1, x[:, 1:, None]).squeeze(-1)
    assert lp.dtype == ent.dtype == torch.float64
    torch.testing.assert_close(lp, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1), atol=1e-12, rtol=0)


def test_fp64_generate_records_fp64_logprobs():
    m = _model(torch.float64)
    x = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(0))
    out = m.generate(x, 5, generator=torch.Generator().manual_seed(1))
    assert out.logprobs.dtype == torch.float64
    with torch.no_grad():
        logp = m(out.sequences).logits.log_softmax(-1)
    ref = logp[:, 3:-1].gather(-1, out.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref, atol=1e-12, rtol=0)


def test_low_precision_models_are_still_upcast_to_fp32():
    m = _model(torch.bfloat16)
    x = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = gather_logprobs(m, x, torch.ones_like(x), torch.arange(1, 6).expand(2, 5))
    assert lp.dtype == torch.float32
    assert m.generate(x[:, :2], 3, generator=torch.Generator().manual_seed(0)).logprobs.dtype \
        == torch.float32


def test_rmsnorm_keeps_fp64():
    norm = RMSNorm(16).double()
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e3
    expected = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected, atol=1e-13, rtol=0)


def test_rl_advantages_of_an_fp64_student_are_fp64():
    """Group-centred rewards were always fp32: 1/3 off by 4e-8 in an fp64 RL step (a probe)."""
    rewards = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.ones(3, 2, dtype=torch.bool)
    adv = group_centred_advantages(rewards, 3, mask, dtype=torch.float64)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64),
                               rtol=0, atol=1e-15)  # fp32 was 4e-8 off
    assert group_centred_advantages(rewards, 3, mask).dtype == torch.float32


@pytest.mark.parametrize("group_size", [0, 2.0, True])
def test_group_centred_advantages_refuse_a_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_centred_advantages(torch.zeros(4), group_size, torch.ones(4, 2, dtype=torch.bool))


def test_group_centred_advantages_refuse_rewards_and_mask_of_other_rows():
    with pytest.raises(ValueError, match="mask"):
        group_centred_advantages(torch.zeros(4), 2, torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("kw, name", [(dict(discount=True), "discount"), (dict(kl_coef=float("nan")), "kl_coef"),
                                      (dict(kl_coef=True), "kl_coef")])
def test_teacher_advantages_refuse_bad_coefficients(kw, name):
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=name):
        teacher_advantages(lp, lp, torch.ones(2, 3, dtype=torch.bool), **kw)


def test_fp64_student_trains_in_fp64():
    student, teacher = tiny_model(0).double(), tiny_model(1).double()
    trainer = Trainer(student, TASK, _config(), teacher=teacher, optimizer=_adamw)
    record = trainer.step()
    assert math.isfinite(record["loss"])
    assert all(p.dtype == torch.float64 for p in student.parameters())


@pytest.mark.parametrize("name", ["adamw", "muon", "manifold_muon"])
def test_a_failed_second_substep_restores_every_optimizer(name):
    # The second substep's backward overflows; the first substep's update and the optimizer's
    # state (moments, Muon momentum) must come back exactly, and training goes on afterwards.
    from .test_trainer import OPTIMIZERS
    trainer = Trainer(tiny_model(0), TASK, _config(substeps=2), teacher=tiny_model(1),
                      optimizer=OPTIMIZERS[name])
    trainer.step()
    before = _snapshot(trainer)
    calls = []

    def overflow_second_backward(grad):
        calls.append(None)
        return grad * float("inf") if len(calls) > 1 else grad
    handle = trainer.student.lm_head.weight.register_hook(overflow_second_backward)
    try:
        with pytest.raises(FloatingPointError, match="step 2: non-finite grad_norm"):
            trainer.step()
    finally:
        handle.remove()
    assert len(calls) == 2
    _assert_same(_snapshot(trainer), before)
    assert trainer.step()["step"] == 2
