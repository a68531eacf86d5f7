"""LoRA on GPT-2, whose attention and MLP layers are transformers' Conv1D (a Linear stored
transposed, PEFT's fan_in_fan_out): targets, merge, and PEFT interop both ways with identical logits."""
import json

import pytest
import torch

from modman.lora import (LoRAConfig, adapters_disabled, apply_lora, load_adapter, lora_layers, merge_lora,
                         optimizer_factory, save_adapter, unmerge_lora)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def data(step):
    x = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(step))
    return {"input_ids": x, "labels": x}


def trained(model, steps=4):
    opt = optimizer_factory("adamw", 1e-2)(model)
    for step in range(steps):
        opt.zero_grad()
        model(**data(step)).loss.backward()
        opt.step()
    return model.eval()


def test_all_linear_adapts_every_conv1d_and_starts_as_the_base_model():
    """It raised "matches no nn.Linear of GPT2LMHeadModel; its Linear modules are: lm_head"."""
    base = tiny_gpt2()
    x = data(99)["input_ids"]
    before = base(input_ids=x).logits
    model = apply_lora(base, LoRAConfig(4), seed=0)
    assert set(lora_layers(model)) == {f"transformer.h.{i}.{p}" for i in range(2) for p in BLOCK}
    layer = lora_layers(model)["transformer.h.0.mlp.c_fc"]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 64)
    assert torch.equal(model(input_ids=x).logits, before), "B = 0: the adapted model is the base model"


def test_merge_adds_the_transposed_delta_to_the_stored_weight():
    model = trained(apply_lora(tiny_gpt2(), LoRAConfig(4), seed=0))
    x = data(99)["input_ids"]
    adapted = model(input_ids=x).logits
    with adapters_disabled(model):
        base = model(input_ids=x).logits
    assert (adapted - base).abs().max() >= 1e-3, "the adapter moved the logits"
    merge_lora(model)
    torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=0, atol=1e-5)


def test_a_modman_gpt2_adapter_loads_in_peft_with_identical_logits(tmp_path):
    model = trained(apply_lora(tiny_gpt2(), LoRAConfig(4), seed=0))
    x = data(99)["input_ids"]
    ours = model(input_ids=x).logits
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()(input_ids=x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_peft_gpt2_adapter_loads_into_modman_with_identical_logits(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    theirs_model = trained(peft.get_peft_model(tiny_gpt2(), config))
    x = data(99)["input_ids"]
    theirs = theirs_model(input_ids=x).logits
    theirs_model.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny_gpt2(), tmp_path).eval()
    assert set(lora_layers(ours)) == {f"transformer.h.{i}.{p}" for i in range(2) for p in BLOCK}
    torch.testing.assert_close(ours(input_ids=x).logits, theirs, rtol=0, atol=1e-5)
