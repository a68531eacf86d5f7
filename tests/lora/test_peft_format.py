"""PEFT's adapter format: key layout, round trip, interop with peft itself both ways, and
adapters that do not fit (clear error, model untouched)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modman.lora import (LoRAConfig, adapters_disabled, apply_lora, load_adapter, lora_layers, merge_lora,
                         optimizer_factory, save_adapter)

from .lora_helpers import same_state, snapshot, tiny_llama, tiny_model, tokens


def train_steps(model, data, steps=5, lr=1e-2):
    opt = optimizer_factory("adamw", lr)(model)
    for step in range(steps):
        batch = data(step)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model


def toy_data(step):
    x = tokens(seed=step)
    return {"input_ids": x, "labels": x}


def llama_data(step):
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
    return {"input_ids": x, "labels": x}


def test_key_layout_and_config(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(4, alpha=16, target_modules="attention",
                                                use_rslora=True), "mine", seed=0)
    save_adapter(model, tmp_path, "mine")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.layers.{i}.self_attn.{p}.lora_{f}.weight"
                for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj") for f in "AB"}
    assert set(tensors) == expected  # adapter name not in the key
    assert tensors["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["use_rslora"] is True and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False and config["init_lora_weights"] is True
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_exclusions_are_saved_as_paths(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(2, exclude=[r"layers.0.mlp.up_proj"]), seed=0)
    save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert "layers.1.mlp.up_proj" in targets and "layers.0.mlp.up_proj" not in targets


def test_round_trip(tmp_path):
    model = train_steps(apply_lora(tiny_model(), LoRAConfig(4, dropout=0.1), seed=0), toy_data)
    model.eval()
    x = tokens(seed=99)
    expected = model(x).logits
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_model(), tmp_path)
    fresh.eval()
    assert torch.equal(fresh(x).logits, expected)
    assert set(lora_layers(fresh)) == set(lora_layers(model))
    # Loading into an existing adapter of the same layout overwrites its values.
    other = apply_lora(tiny_model(), LoRAConfig(4, dropout=0.1), seed=5)
    load_adapter(other, tmp_path)
    other.eval()
    assert torch.equal(other(x).logits, expected)


def test_modman_adapter_loads_in_peft_with_identical_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = train_steps(apply_lora(tiny_llama(), LoRAConfig(4), seed=0), llama_data)
    model.eval()
    x = llama_data(99)["input_ids"]
    ours = model(input_ids=x).logits
    with adapters_disabled(model):
        base = model(input_ids=x).logits
    assert (ours - base).abs().max() >= 1e-3  # the adapter moved the logits
    save_adapter(model, tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    theirs = theirs_model(input_ids=x).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_peft_adapter_loads_into_modman_with_identical_logits(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    theirs_model = peft.get_peft_model(tiny_llama(), config)
    train_steps(theirs_model, llama_data)
    theirs_model.eval()
    x = llama_data(99)["input_ids"]
    theirs = theirs_model(input_ids=x).logits
    with theirs_model.disable_adapter():
        base = theirs_model(input_ids=x).logits
    assert (theirs - base).abs().max() >= 1e-3
    theirs_model.save_pretrained(str(tmp_path))
    ours_model = load_adapter(tiny_llama(), tmp_path).eval()
    ours = ours_model(input_ids=x).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert set(lora_layers(ours_model)) == {
        f"model.layers.{i}.{p}" for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def _saved(tmp_path, **config):
    model = apply_lora(tiny_model(), LoRAConfig(4, **config), seed=0)
    save_adapter(model, tmp_path)
    return tmp_path


def _assert_untouched_after(error, match, target, path):
    state = snapshot(target)
    layers = set(lora_layers(target))
    with pytest.raises(error, match=match):
        load_adapter(target, path)
    assert same_state(state, snapshot(target)) and set(lora_layers(target)) == layers


def test_adapter_for_other_shapes_is_refused(tmp_path):
    path = _saved(tmp_path)
    from modman.toy import TinyCausalLM

    wider = TinyCausalLM(40, 48, 2, 4, 16, seed=0)
    _assert_untouched_after(ValueError, r"adapter_model.safetensors.*shape.*not changed", wider,
                            path)


def test_adapter_for_other_module_names_is_refused(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    renamed = {k.replace("q_proj", "query"): v for k, v in tensors.items()}
    save_file(renamed, str(path / "adapter_model.safetensors"))
    _assert_untouched_after(ValueError, r"query: no nn.Linear \(or Conv1D\) of that path", tiny_model(), path)


def test_adapter_with_other_rank_than_config_is_refused(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    # the folder disagrees with itself, not with the model: the message says so
    _assert_untouched_after(ValueError, r"adapter_model.safetensors does not match .*adapter_config.json, which "
                            r"says r=8: \[.*lora_A.weight of shape \(4, 32\)", tiny_model(), path)


def test_existing_adapter_on_other_modules_is_refused(tmp_path):
    path = _saved(tmp_path)
    target = apply_lora(tiny_model(), LoRAConfig(4, target_modules="mlp"), seed=1)
    _assert_untouched_after(ValueError, "already exists on other modules", target, path)


def test_unsupported_or_missing_files_are_refused(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    _assert_untouched_after(ValueError, "use_dora", tiny_model(), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    _assert_untouched_after(ValueError, "peft_type", tiny_model(), path)
    (path / "adapter_config.json").unlink()
    _assert_untouched_after(FileNotFoundError, "adapter_config.json", tiny_model(), path)


@pytest.mark.parametrize("existing, match", [
    (dict(r=4, alpha=8), r"scale 2 on .*the file r=4, lora_alpha=32"),  # same rank, other alpha
    (dict(r=4, use_rslora=True), r"use_rslora=False"),                   # same rank, other scale rule
    (dict(r=1), r"has r=1"),                                             # a rank-4 file into rank 1
    (dict(r=8), r"has r=8"),
])
def test_existing_adapter_with_other_rank_or_scale_is_refused(tmp_path, existing, match):
    """Loading overwrites only the factors: a file whose rank or scale differs from the adapter's
    would give other outputs than the saved model (or broadcast a rank-1 file into rank 8)."""
    path = _saved(tmp_path)
    target = apply_lora(tiny_model(), LoRAConfig(**existing), seed=1)
    _assert_untouched_after(ValueError, match, target, path)
    merged = merge_lora(apply_lora(tiny_model(), LoRAConfig(**existing, init="random"), seed=1))
    _assert_untouched_after(ValueError, match, merged, path)  # left merged, not unmerged


def test_damaged_files_are_refused_naming_them(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps([config]))
    _assert_untouched_after(ValueError, r"adapter_config.json holds a JSON list", tiny_model(), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 4.5}))
    _assert_untouched_after(ValueError, r"adapter_config.json: r must be a whole number", tiny_model(), path)
    (path / "adapter_config.json").write_text(json.dumps(config))
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    _assert_untouched_after(ValueError, r"adapter_model.safetensors is not a readable safetensors", tiny_model(),
                            path)
    save_file({}, str(weights))
    _assert_untouched_after(ValueError, r"adapter_model.safetensors holds no tensors", tiny_model(), path)


def test_task_type_follows_the_model_and_peft_loads_a_custom_model(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(4, init="random"), seed=0).eval()
    save_adapter(model, tmp_path / "toy")
    # TinyCausalLM does not generate the transformers way: PEFT's causal-LM wrapper would fail on it
    assert json.loads((tmp_path / "toy" / "adapter_config.json").read_text())["task_type"] is None
    llama = apply_lora(tiny_llama(), LoRAConfig(2), seed=0)
    save_adapter(llama, tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "toy")).eval()
    x = tokens()
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_a_compiled_model_saves_and_loads_under_its_eager_paths(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(2, target_modules="mlp", init="random"), seed=0)
    save_adapter(torch.compile(model), tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and not any("_orig_mod" in k for k in keys)
    plain = load_adapter(tiny_model(), tmp_path)
    x = tokens()
    assert torch.equal(plain.eval()(x).logits, model.eval()(x).logits)
    compiled_target = torch.compile(tiny_model())
    load_adapter(compiled_target, tmp_path)  # module paths of the eager model inside
    assert torch.equal(compiled_target._orig_mod.eval()(x).logits, model(x).logits)


def test_non_finite_values_in_a_file_are_refused(tmp_path):
    """A damaged file can keep its header: NaN or inf in its data would reach the model."""
    path = _saved(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    for bad in (float("nan"), float("inf")):
        tensors[key][0, 0] = bad
        save_file(tensors, str(path / "adapter_model.safetensors"))
        _assert_untouched_after(ValueError, rf"adapter_model.safetensors: non-finite values in \['{key}'\]",
                                tiny_model(), path)


def test_values_that_overflow_the_adapters_dtype_are_refused(tmp_path):
    """An fp64 file's 1e300 is finite there and inf in the fp32 adapter: it loaded, and the logits
    were NaN."""
    path = _saved(tmp_path)
    tensors = {k: v.double() for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = 1e300
    save_file(tensors, str(path / "adapter_model.safetensors"))
    _assert_untouched_after(ValueError, r"lora_B: values overflow the adapter's float32.*not changed", tiny_model(), path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_factors_are_refused(tmp_path, dtype):
    path = _saved(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = (100 * tensors[key]).round().to(dtype)  # it loaded as the rounded values
    save_file(tensors, str(path / "adapter_model.safetensors"))
    _assert_untouched_after(ValueError, rf"LoRA factors must be floating point, got \['{key} \(", tiny_model(), path)


@pytest.mark.parametrize("targets, match", [
    (["q_proj"], r"weights for modules its config's target_modules=\['q_proj'\] does not select"),
    (["zzz_proj"], r"target_modules=\['zzz_proj'\] selects no Linear here"),  # PEFT: NoMatchingPeftModuleError
    (["q_proj", "v_proj", "k_proj"], r"selects modules it holds no weights for \(\['layers.0.self_attn.k_proj'"),
])
def test_a_config_whose_targets_disagree_with_its_weights_is_refused(tmp_path, targets, match):
    """PEFT places adapters by the config's target_modules, modman by the weights: a file whose two
    disagree loaded here as another model than in PEFT (logits 0.56 apart in a probe)."""
    path = _saved(tmp_path, target_modules=["q_proj", "v_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    _assert_untouched_after(ValueError, match, tiny_model(), path)


def test_a_peft_adapter_with_rank_above_a_layers_loads(tmp_path):
    """PEFT saves r = 24 on a 32→16 k_proj; apply_lora refuses such a rank (its extra is wasted),
    load_adapter refused it too."""
    peft = pytest.importorskip("peft")
    theirs_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=24, target_modules=["k_proj"],
                                                                      init_lora_weights=False))
    theirs_model.eval().save_pretrained(str(tmp_path))
    x = llama_data(99)["input_ids"]
    ours = load_adapter(tiny_llama(), tmp_path).eval()(input_ids=x).logits
    torch.testing.assert_close(ours, theirs_model(input_ids=x).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="r=24 exceeds min"):
        apply_lora(tiny_llama(), LoRAConfig(24, target_modules=["k_proj"]))


def test_a_peft_regex_adapter_loads_beside_another_adapter(tmp_path):
    """A regex such as ".*q_proj.*" also matches an existing adapter's lora_dropout container: the
    config check refused it as selecting nothing (PEFT loads it as a second adapter)."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=r".*q_proj.*",
                                                               init_lora_weights=False))
    theirs.eval().save_pretrained(str(tmp_path))
    x = llama_data(99)["input_ids"]
    expected = theirs(input_ids=x).logits
    ours = apply_lora(tiny_llama(), LoRAConfig(2, target_modules=["q_proj"]), "first", seed=0)
    load_adapter(ours, tmp_path, adapter_name="default")  # the second adapter, made active alone
    torch.testing.assert_close(ours.eval()(input_ids=x).logits, expected, rtol=0, atol=1e-6)


class _SequentialMLPs(torch.nn.Module):
    """MLPs as nn.Sequential in a ModuleList: the leaf "0" names ``layers.0`` as well as ``layers.0.mlp.0``."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"mlp": torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))}) for _ in range(2))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        for block in self.layers:
            x = x + block["mlp"](x)
        return self.out(x)


class _ConvPatchEmbedding(torch.nn.Module):
    """timm's naming: ``patch_embed.proj`` is a Conv2d, ``blocks.N.proj`` a Linear."""

    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, 8, 4, 4)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"qkv": torch.nn.Linear(8, 24),
                                                               "proj": torch.nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block["proj"](block["qkv"](x)[..., :8])
        return x


class _NestedPath(torch.nn.Module):
    """``a.b`` and ``c.a.b``: the path "a.b" also names ``c.a.b`` as its last components."""

    def __init__(self):
        super().__init__()
        self.a, self.c = torch.nn.Module(), torch.nn.Module()
        self.a.b = torch.nn.Linear(4, 4)
        self.c.a = torch.nn.Module()
        self.c.a.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.c.a.b(self.a.b(x))


_OVERREACHING_LEAVES = [  # (model, its adapter's targets, an input, the saved target_modules)
    (_SequentialMLPs, r"layers\.\d\.mlp\.[02]", (3, 8),
     ["layers.0.mlp.0", "layers.0.mlp.2", "layers.1.mlp.0", "layers.1.mlp.2"]),
    (_ConvPatchEmbedding, r"blocks\.\d\.(qkv|proj)", (1, 3, 8, 8),
     ["blocks.0.proj", "blocks.0.qkv", "blocks.1.proj", "blocks.1.qkv"]),
    (_NestedPath, r"a\.b", (2, 4), r"a\.b"),  # neither the leaf nor the path: a regex
]


def _adapted_and_fresh(make, targets, seed=0):
    torch.manual_seed(seed)
    model = apply_lora(make(), LoRAConfig(2, target_modules=targets, init="random"), seed=0).eval()
    torch.manual_seed(seed)
    return model, make().eval()


@pytest.mark.parametrize("make, targets, shape, saved", _OVERREACHING_LEAVES)
def test_saved_target_modules_select_the_adapted_modules_among_all_modules(tmp_path, make, targets, shape, saved):
    """PEFT matches target_modules against every module, not only the Linear ones: the leaf names
    ["0", "2"] also named ``layers.0`` (PEFT refused the folder) and ["proj", "qkv"] the Conv2d
    ``patch_embed.proj`` (PEFT adapted it too, outputs 2.56e3 apart in a probe)."""
    from modman.lora.config import matches

    model, fresh = _adapted_and_fresh(make, targets)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == saved
    assert {n for n, _ in fresh.named_modules() if n and matches(saved, n)} == set(lora_layers(model))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    loaded = load_adapter(fresh, tmp_path).eval()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("make, targets, shape, saved", _OVERREACHING_LEAVES)
def test_peft_loads_an_adapter_whose_leaf_names_name_other_modules_too(tmp_path, make, targets, shape, saved):
    peft = pytest.importorskip("peft")
    model, fresh = _adapted_and_fresh(make, targets)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}
    assert adapted == set(lora_layers(model))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-6)


def test_an_activated_lora_adapter_is_refused(tmp_path):
    """aLoRA (alora_invocation_tokens) adapts only the tokens from the invocation sequence on:
    loaded as plain LoRA it gave logits 0.37 from PEFT's in a probe, without a word."""
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "alora_invocation_tokens": [5, 6]}))
    _assert_untouched_after(ValueError, r"adapter_config.json: \['alora_invocation_tokens'\] not supported",
                            tiny_model(), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "alora_invocation_tokens": None}))
    load_adapter(tiny_model(), path)  # plain LoRA, as PEFT writes it
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                               alora_invocation_tokens=[5, 6]))
    theirs.save_pretrained(str(tmp_path / "alora"))
    target = tiny_llama()
    _assert_untouched_after(ValueError, "alora_invocation_tokens", target, tmp_path / "alora")


@pytest.mark.parametrize("dropout", [1.5, 1.0, -0.1, "0.1", True, float("nan")])
def test_a_bad_lora_dropout_is_refused_naming_the_file(tmp_path, dropout):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": dropout}))
    _assert_untouched_after(ValueError, r"adapter_config.json: lora_dropout must be a number in \[0, 1\)",
                            tiny_model(), path)


def test_loading_into_a_merged_adapter_keeps_the_merges_with_the_new_values(tmp_path):
    """Loading into a merged adapter unmerged every adapter of its layers and left them so: the
    output moved by 0.059 in a probe. Merged adapters stay merged, the loaded one with its new values."""
    def two_adapters(seed_a):
        model = apply_lora(tiny_model(), LoRAConfig(2, init="random"), "a", seed=seed_a)
        apply_lora(model, LoRAConfig(2, target_modules="attention", init="random"), "b", seed=1)
        return merge_lora(model, ["a", "b"]).eval()

    save_adapter(two_adapters(seed_a=5), tmp_path, "a")
    model = two_adapters(seed_a=0)
    x = tokens()
    before = model(x).logits
    load_adapter(model, tmp_path, "a")
    for path, layer in lora_layers(model).items():
        assert layer.merged_adapters == (["a", "b"] if "self_attn" in path else ["a"]), path
    after = model(x).logits
    assert (after - before).abs().max() > 1e-3  # a's new values are in
    torch.testing.assert_close(after, two_adapters(seed_a=5)(x).logits, rtol=0, atol=1e-5)
