"""Adapters keep the model's train/eval mode, tied output heads are never merged into, and the
adapter files PEFT writes for an adapted lm_head load."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from modman.lora import (LoRAConfig, TrainConfig, apply_lora, eval_loss_fn, load_adapter, lora_layers,
                         merge_lora, save_adapter, train, unload_lora, unmerge_lora)
from modman.opd import OPDConfig, Trainer
from modman.toy import CharTokenizer, TinyCausalLM, tasks

from .lora_helpers import D, HEADS, LAYERS, MAX_LEN, VOCAB, same_state, snapshot, tiny_llama, tiny_model, tokens


def tied_model(seed: int = 0) -> TinyCausalLM:
    return TinyCausalLM(VOCAB, D, LAYERS, HEADS, MAX_LEN, seed=seed, tie_embeddings=True)


def test_adapters_added_to_a_model_in_eval_mode_are_in_eval_mode(tmp_path):
    """Dropout of a new adapter followed the module default (training) on a model in eval mode:
    two forwards of a model loaded for inference differed."""
    x = tokens()
    model = apply_lora(tiny_model().eval(), LoRAConfig(4, target_modules="all-linear", dropout=0.5,
                                                       init="random"), seed=0)
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x).logits, model(x).logits)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_model().eval(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(loaded(x).logits, model(x).logits)
    # and a model in training mode gets adapters in training mode (dropout on)
    training = apply_lora(tiny_model().train(), LoRAConfig(4, target_modules="all-linear", dropout=0.5,
                                                           init="random"), seed=0)
    assert all(m.training for m in training.modules())
    assert not torch.equal(training(x).logits, training(x).logits)


def test_train_hands_the_model_back_in_its_mode_and_eval_loss_fn_uses_eval_mode():
    x = tokens()
    held_out = eval_loss_fn([{"input_ids": x, "labels": x}])
    model = apply_lora(tiny_model(), LoRAConfig(4, target_modules="all-linear", dropout=0.5, init="random"),
                       seed=0)
    model.train()
    first = held_out(model)
    assert held_out(model) == first and model.training  # eval mode inside, the mode restored
    model.eval()
    data = lambda step, micro: {"input_ids": tokens(seed=step), "labels": tokens(seed=step)}  # noqa: E731
    from modman.lora import optimizer_factory
    train(model, optimizer_factory("adamw", 1e-3), data, TrainConfig(steps=2, warmup_steps=0))
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("unload", [False, True])
def test_merging_into_a_tied_output_head_is_refused_and_changes_nothing(unload):
    """Merging s·B A into lm_head.weight changed the tied input embedding too (logits of the
    merged model 28 apart from the adapter's on a tied GPT-2)."""
    with pytest.warns(UserWarning, match="lm_head's weight is tied to embed_tokens.weight"):
        model = apply_lora(tied_model(), LoRAConfig(4, target_modules=["q_proj", "lm_head"], init="random"),
                           seed=0)
    state, layers = snapshot(model), set(lora_layers(model))
    with pytest.raises(ValueError, match=r"lm_head with embed_tokens.weight is shared \(tied\).*Nothing was merged"):
        unload_lora(model, merge=True) if unload else merge_lora(model)
    assert same_state(state, snapshot(model)) and set(lora_layers(model)) == layers
    assert not any(layer.merged_adapters for layer in lora_layers(model).values())
    # untied heads, and tied models whose head is not adapted, merge as before
    untied = apply_lora(tiny_model(), LoRAConfig(4, target_modules=["q_proj", "lm_head"], init="random"), seed=0)
    x = tokens()
    before = untied(x).logits
    merge_lora(untied)
    assert (untied(x).logits - before).abs().max() < 1e-4
    plain = apply_lora(tied_model(), LoRAConfig(4, target_modules=["q_proj"], init="random"), seed=0)
    before = plain(x).logits
    merge_lora(plain)
    assert (plain(x).logits - before).abs().max() < 1e-4
    unmerge_lora(plain)


def test_opd_refuses_a_student_with_merged_adapters():
    """It failed at its first step with torch's "element 0 of tensors does not require grad"."""
    vocab = CharTokenizer().vocab_size
    student = apply_lora(TinyCausalLM(vocab, 16, 1, 2, 24, seed=0), LoRAConfig(2, init="random"), seed=0)
    merge_lora(student)
    with pytest.raises(ValueError, match=r"Trainer: adapters are merged .*unmerge_lora"):
        Trainer(student, tasks.addition(1), OPDConfig(prompts_per_step=2, group_size=2),
                teacher=TinyCausalLM(vocab, 16, 1, 2, 24, seed=1),
                optimizer=lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))
    unmerge_lora(student)
    Trainer(student, tasks.addition(1), OPDConfig(prompts_per_step=2, group_size=2),
            teacher=TinyCausalLM(vocab, 16, 1, 2, 24, seed=1),
            optimizer=lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))


def _peft_style_head_file(tmp_path, base_weight):
    """A modman adapter on lm_head, with the base_layer.weight key PEFT adds for it."""
    model = apply_lora(tiny_model(), LoRAConfig(4, target_modules=["q_proj", "lm_head"], init="random"), seed=0)
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.base_layer.weight"] = base_weight
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return model


def test_the_base_weight_peft_saves_with_an_adapted_head_is_accepted_when_it_is_the_models(tmp_path):
    """PEFT saves lm_head.base_layer.weight beside the factors when lm_head is a target; the
    folder was refused for its key."""
    target = tiny_model()
    model = _peft_style_head_file(tmp_path, target.lm_head.weight.detach().clone())
    x = tokens()
    loaded = load_adapter(target, tmp_path)
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_a_saved_base_weight_that_is_not_the_models_is_refused_naming_it(tmp_path):
    other = tiny_model(seed=3).lm_head.weight.detach().clone()
    _peft_style_head_file(tmp_path, other)
    target = tiny_model()
    state = snapshot(target)
    with pytest.raises(ValueError, match=r"lm_head: the file also holds this layer's base weight"):
        load_adapter(target, tmp_path)
    assert same_state(state, snapshot(target)) and not lora_layers(target)


def test_a_base_weight_key_without_factors_and_a_pickled_folder_are_refused_clearly(tmp_path):
    _peft_style_head_file(tmp_path, tiny_model().lm_head.weight.detach().clone())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.norm.base_layer.weight"] = torch.ones(D)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"keys not of the form .*norm\.base_layer\.weight"):
        load_adapter(tiny_model(), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin, PEFT's older pickle format"):
        load_adapter(tiny_model(), tmp_path)


def test_an_unknown_init_lora_weights_is_loaded_with_a_warning(tmp_path):
    import json

    model = apply_lora(tiny_model(), LoRAConfig(4, target_modules="attention", init="random"), seed=0)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"init_lora_weights='pissa' is not an initialisation"):
        loaded = load_adapter(tiny_model(), tmp_path)
    x = tokens()
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_a_folder_peft_writes_for_an_adapted_lm_head_loads(tmp_path):
    """PEFT (0.21 here) stores lm_head's base_layer.weight beside the factors; the folder was refused."""
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    theirs = peft.get_peft_model(base, config).eval()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = theirs(input_ids=x).logits
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny_llama(), tmp_path).eval()
    assert (ours(input_ids=x).logits - expected).abs().max() <= 1e-5


def test_evaluation_keeps_every_submodules_mode_and_runs_without_gradients():
    """eval_loss_fn restored only the model's own flag: a part kept in eval mode on purpose came
    back in training mode (a review)."""
    x = tokens()
    model = apply_lora(tiny_model(), LoRAConfig(4, target_modules="all-linear", dropout=0.5), seed=0).train()
    model.layers[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []

    def check(m):
        seen.append((torch.is_grad_enabled(), m.training))
        return eval_loss_fn([{"input_ids": x, "labels": x}])(m)

    check(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    from modman.lora.trainer import _evaluate
    _evaluate(model, lambda m: seen.append((torch.is_grad_enabled(), m.training)) or 0.0)
    assert seen[-1] == (False, False) and {name: m.training for name, m in model.named_modules()} == modes


def _shared(model, name):
    """Give ``name``'s Linear the weight of layers.0.self_attn.q_proj (same Parameter)."""
    module = model.get_submodule(name)
    module.weight = model.layers[0].self_attn.q_proj.weight
    return model


def test_two_adapted_layers_on_one_weight_are_not_merged_and_only_merging_layers_are_checked():
    model = _shared(tiny_model(), "layers.0.self_attn.k_proj")
    with pytest.warns(UserWarning, match="tied"):
        apply_lora(model, LoRAConfig(4, target_modules=["q_proj", "k_proj"], init="random"), seed=0)
    with pytest.raises(ValueError, match="shared"):
        merge_lora(model)
    # a tied layer that carries no adapter being merged does not block the others
    head = tied_model()
    with pytest.warns(UserWarning):
        apply_lora(head, LoRAConfig(4, target_modules=["lm_head"], init="random"), "a", seed=0)
    apply_lora(head, LoRAConfig(4, target_modules=["q_proj"], init="random"), "b", seed=0)
    merge_lora(head, "b")
    assert lora_layers(head)["layers.0.self_attn.q_proj"].merged_adapters == ["b"]


def test_ties_are_found_by_memory_not_identity_and_only_where_memory_overlaps():
    # the same storage under another Parameter object is tied
    model = tiny_model()
    model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.data)
    with pytest.warns(UserWarning, match="lm_head's weight is tied to embed_tokens.weight"):
        apply_lora(model, LoRAConfig(4, target_modules=["lm_head"], init="random"), seed=0)
    with pytest.raises(ValueError, match="shared"):
        merge_lora(model)
    # disjoint views of one buffer are not tied; neither are empty or meta parameters
    model = tiny_model()
    buffer = torch.randn(2 * D, D)
    model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(buffer[:D])
    model.layers[0].self_attn.k_proj.weight = torch.nn.Parameter(buffer[D:])
    model.extra = torch.nn.ModuleList([torch.nn.Linear(0, 3), torch.nn.Linear(0, 5)])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, LoRAConfig(4, target_modules=["q_proj", "k_proj"], init="random"), seed=0)
    merge_lora(model)
    with torch.device("meta"):
        meta = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(meta, LoRAConfig(4, target_modules=["q_proj", "lm_head"]), seed=0)


def test_a_saved_base_weight_in_another_dtype_is_the_models(tmp_path):
    target = tiny_model()
    model = _peft_style_head_file(tmp_path, target.lm_head.weight.detach().to(torch.bfloat16))
    loaded = load_adapter(target, tmp_path)
    x = tokens()
    assert torch.equal(loaded(x).logits, model(x).logits)
