"""Bad input: a clear error naming the parameter or module, and the model left as it was."""
import pytest
import torch

from modman.lora import LoRAConfig, apply_lora, lora_layers, lora_lr, set_adapter

from .lora_helpers import same_state, snapshot, tiny_model


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_rank_must_be_positive_int(r):
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRAConfig(r)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0}, "alpha"), ({"alpha": float("inf")}, "alpha"), ({"alpha": True}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": "x"}, "dropout"), ({"dropout": None}, "dropout"),
    ({"init": "pissa"}, "init"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": "(["}, "not a valid regex"),
    ({"exclude": 3}, "exclude"),
])
def test_config_values_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(4, **kwargs)


def _refused_untouched(model, call, error, match) -> bool:
    """``call`` raises ``error`` matching ``match`` (pytest.raises fails the test otherwise);
    returns whether the model is then exactly as it was: state, no adapters, requires_grad."""
    state = snapshot(model)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        call()
    return (same_state(state, snapshot(model)) and not lora_layers(model)
            and grads == [p.requires_grad for p in model.parameters()])


def test_target_matching_nothing_lists_the_linear_modules():
    model = tiny_model()
    assert _refused_untouched(model, lambda: apply_lora(model, LoRAConfig(2, target_modules=["c_attn"])),
               ValueError, r"matches no nn.Linear.*layers\.0\.self_attn\.q_proj.*lm_head")


def test_rank_larger_than_the_layer():
    model = tiny_model()
    assert _refused_untouched(model, lambda: apply_lora(model, LoRAConfig(40, target_modules="mlp")),
               ValueError, r"r=40 exceeds min\(d_in, d_out\) = 32 of 'layers.0.mlp.gate_proj'")


@pytest.mark.parametrize("target", [["embed_tokens"], ["input_layernorm"], ["self_attn"]])
def test_non_linear_target(target):
    model = tiny_model()
    assert _refused_untouched(model, lambda: apply_lora(model, LoRAConfig(2, target_modules=target)),
               TypeError, r"adapts nn.Linear layers \(and transformers' Conv1D\) only")


def test_adapter_names_are_checked():
    model = tiny_model()
    assert _refused_untouched(model, lambda: apply_lora(model, LoRAConfig(2), adapter_name="a.b"), ValueError,
               "adapter_name")
    apply_lora(model, LoRAConfig(2))
    state = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        apply_lora(model, LoRAConfig(2))
    with pytest.raises(ValueError, match=r"no adapter named \['other'\]"):
        set_adapter(model, "other")
    assert same_state(state, snapshot(model))


def test_lora_lr_rule():
    assert lora_lr(1e-4) == pytest.approx(1e-3)
    assert lora_lr(1e-4, steps=1000) == pytest.approx(1e-3)
    assert lora_lr(1e-4, steps=50) == pytest.approx(1.5e-3)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="full_ft_lr"):
            lora_lr(bad)
    with pytest.raises(ValueError, match="steps"):
        lora_lr(1e-4, steps=0)
    for bad in (True, 2.5):
        with pytest.raises(ValueError, match="steps"):
            lora_lr(1e-4, steps=bad)
    np = pytest.importorskip("numpy")
    assert lora_lr(1e-4, steps=np.int64(50)) == pytest.approx(1.5e-3)  # a NumPy int from a sweep


def test_bf16_model_without_adapters_is_untouched_by_a_failed_apply():
    model = tiny_model(dtype=torch.bfloat16)
    assert _refused_untouched(model, lambda: apply_lora(model, LoRAConfig(2, target_modules="nothing_here")),
               ValueError, "matches no nn.Linear")


def test_numpy_rank_and_alpha_from_a_sweep_are_stored_as_python_numbers():
    import numpy as np

    config = LoRAConfig(np.int64(4), alpha=np.float32(16), dropout=np.float64(0.1))
    assert (type(config.r), type(config.alpha), type(config.dropout)) == (int, float, float)
    assert config.scaling == 4.0
    assert type(LoRAConfig(4, alpha=np.int32(8)).alpha) is int


@pytest.mark.parametrize("preset", ["mlp", "attention"])
def test_a_preset_excludes_its_modules(preset):
    """exclude="mlp" keeps every Linear but the MLP's (it was read as a regex matching no path,
    excluding nothing)."""
    kept = set(lora_layers(apply_lora(tiny_model(), LoRAConfig(2, exclude=preset))))
    other = "attention" if preset == "mlp" else "mlp"
    assert kept == set(lora_layers(apply_lora(tiny_model(), LoRAConfig(2, target_modules=other))))
    assert kept and kept.isdisjoint(lora_layers(apply_lora(tiny_model(), LoRAConfig(2, target_modules=preset))))


def test_a_preset_names_the_expert_stacks_it_leaves_without_adapters():
    """transformers 5 stores Mixtral's experts as 3-D parameters: "all-linear" adapted attention
    alone, silently — the setup the LoRA post warns against."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = transformers.MixtralForCausalLM(config)
    stacks = [n for n, p in model.named_parameters() if p.ndim == 3]
    assert stacks
    with pytest.warns(UserWarning, match=rf"{len(stacks)} expert stacks \({stacks[0]}"):
        apply_lora(model, LoRAConfig(4))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(tiny_model(), LoRAConfig(4))  # no experts: no warning
        apply_lora(transformers.MixtralForCausalLM(config), LoRAConfig(4, target_modules="attention"))  # none asked


@pytest.mark.parametrize("name", ["train", "eval", "keys", "forward", "update", "to"])
def test_adapter_names_that_are_module_dict_attributes_are_refused_up_front(tmp_path, name):
    """nn.ModuleDict refuses such keys: apply_lora and load_adapter failed half-way, with the
    base frozen and layers swapped (KeyError "attribute 'train' already exists")."""
    from modman.lora import load_adapter, save_adapter

    save_adapter(apply_lora(tiny_model(), LoRAConfig(2), seed=0), tmp_path)
    model = tiny_model()
    match = rf"adapter_name {name!r} is an attribute of nn.ModuleDict"
    assert _refused_untouched(model, lambda: apply_lora(model, LoRAConfig(2), name), ValueError, match)
    assert _refused_untouched(model, lambda: load_adapter(model, tmp_path, name), ValueError, match)


@pytest.mark.parametrize("n_params", [0, -1, 1.5, True, float("nan"), "100"])
def test_rank_for_parameter_count_takes_a_positive_int(n_params):
    """1.5 and True were taken (rank 1), NaN failed with "cannot convert float NaN to integer"."""
    from modman.lora import rank_for_parameter_count

    with pytest.raises(ValueError, match=rf"n_params must be a positive int, got {n_params!r}"):
        rank_for_parameter_count(tiny_model(), n_params)


def test_rank_for_parameter_count_takes_a_numpy_int():
    np = pytest.importorskip("numpy")
    from modman.lora import rank_for_parameter_count

    assert rank_for_parameter_count(tiny_model(), np.int64(10)) == rank_for_parameter_count(tiny_model(), 10) == 1
