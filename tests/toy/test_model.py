"""TinyCausalLM: shapes, causality, the Hugging Face loss convention, generation, persistence."""
import pytest
import torch

from modman.toy import IGNORE_INDEX, TinyCausalLM

V, D, LAYERS, HEADS, MAX_LEN = 23, 32, 2, 4, 24


def make(positions="rope", seed=0, **kw):
    return TinyCausalLM(V, D, LAYERS, HEADS, MAX_LEN, positions=positions, seed=seed, **kw)


def random_ids(B=3, L=10, seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_llama_module_names_and_no_biases():
    model = make()
    names = dict(model.named_modules())
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(names[f"layers.{i}.self_attn.{proj}"], torch.nn.Linear)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(names[f"layers.{i}.mlp.{proj}"], torch.nn.Linear)
        assert f"layers.{i}.input_layernorm" in names
        assert f"layers.{i}.post_attention_layernorm" in names
    assert isinstance(names["lm_head"], torch.nn.Linear)
    assert isinstance(names["embed_tokens"], torch.nn.Embedding)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.layers[0].mlp.gate_proj.weight.shape == (model.config.hidden_size, D)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_shapes(positions):
    model = make(positions)
    ids = random_ids()
    out = model(ids)
    assert out.logits.shape == (3, 10, V)
    assert out.loss is None
    out = model(ids, labels=ids)
    assert out.loss.shape == () and torch.isfinite(out.loss)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_future_tokens_do_not_change_past_logits(positions):
    model = make(positions)
    ids = random_ids(B=2, L=12)
    changed = ids.clone()
    t = 7
    changed[:, t:] = (changed[:, t:] + 1 + torch.arange(12 - t)) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    # And the test can fail: the logits from position t on do see the change.
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


def test_loss_matches_shifted_cross_entropy_with_ignored_positions():
    model = make()
    ids = random_ids(B=2, L=9, seed=1)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, 7] = IGNORE_INDEX
    out = model(ids, labels=labels)
    terms = []
    for b in range(2):
        for t in range(8):
            if labels[b, t + 1] != IGNORE_INDEX:
                terms.append(-out.logits[b, t].log_softmax(-1)[labels[b, t + 1]])
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    # Changing a label at an ignored position leaves the loss unchanged; a scored one does not.
    labels2 = labels.clone()
    labels2[0, 0] = 5  # position 0 is never scored after the shift
    assert model(ids, labels=torch.where(labels2 == 5, labels2, labels)).loss == out.loss
    labels3 = labels.clone()
    labels3[0, 8] = (labels3[0, 8] + 1) % V
    assert model(ids, labels=labels3).loss != out.loss


def test_all_ignored_labels_give_zero_loss_with_a_graph():
    model = make()
    ids = random_ids()
    loss = model(ids, labels=torch.full_like(ids, IGNORE_INDEX)).loss
    assert loss.item() == 0.0
    loss.backward()  # no NaN gradient either
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_input_validation_names_the_parameter():
    model = make()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, MAX_LEN + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads"):
        TinyCausalLM(V, 30, 1, 4, 8)
    with pytest.raises(ValueError, match="positions"):
        TinyCausalLM(V, 32, 1, 4, 8, positions="alibi")
    with pytest.raises(ValueError, match="d_model"):
        TinyCausalLM(V, 0, 1, 1, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1.0)
    # a temperature so small that logits/temperature overflows: named, not a failure inside
    # torch.multinomial ("probability tensor contains inf, nan or element < 0")
    with pytest.raises(ValueError, match="temperature=1e-45"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=1e-45)


def test_seed_determines_the_weights():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    torch.manual_seed(123)  # global state must not matter when a seed is given
    d = make(seed=3)
    for (name, pa), pb, pc, pd in zip(a.named_parameters(), b.parameters(), c.parameters(),
                                      d.parameters()):
        assert torch.equal(pa, pb) and torch.equal(pa, pd), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logprobs_equal_teacher_forced_forward(temperature):
    model = make()
    prompts = random_ids(B=4, L=5, seed=2)
    eos = 3
    out = model.generate(prompts, 8, temperature=temperature, eos_token_id=eos,
                         generator=torch.Generator().manual_seed(0))
    T = out.completion_ids.shape[1]
    assert out.sequences.shape == (4, 5 + T) and out.logprobs.shape == (4, T)
    logits = model(out.sequences).logits[:, 4:-1] / temperature
    forced = logits.log_softmax(-1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    forced = torch.where(out.completion_mask, forced, torch.zeros_like(forced))
    torch.testing.assert_close(out.logprobs, forced, rtol=1e-5, atol=1e-5)
    assert (out.logprobs <= 0).all()


def test_generate_stops_rows_at_eos():
    # A 4-token vocabulary makes the stop token frequent under a random model.
    model = TinyCausalLM(4, 16, 1, 2, 40, seed=0)
    eos, pad = 2, 0
    out = model.generate(torch.ones(64, 2, dtype=torch.long), 30, eos_token_id=eos,
                         pad_token_id=pad, generator=torch.Generator().manual_seed(1))
    ids, mask = out.completion_ids, out.completion_mask
    stopped = 0
    for row in range(64):
        hits = (ids[row] == eos).nonzero().flatten()
        if len(hits):
            first = int(hits[0])
            stopped += 1
            assert mask[row, :first + 1].all() and not mask[row, first + 1:].any()
            assert (ids[row, first + 1:] == pad).all()
            assert (out.logprobs[row, first + 1:] == 0).all()
        else:
            assert mask[row].all()
    assert stopped > 32


def test_greedy_is_argmax_and_cache_agrees_with_recompute():
    model = make("learned", seed=5)
    prompts = random_ids(B=3, L=6, seed=4)
    cached = model.generate(prompts, 10, temperature=0.0)
    plain = model.generate(prompts, 10, temperature=0.0, use_cache=False)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    logits = model(cached.sequences).logits[:, 5:-1]
    assert torch.equal(logits.argmax(-1), cached.completion_ids)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_left_padding_with_attention_mask_matches_unpadded(positions):
    model = make(positions, seed=6)
    short = random_ids(B=1, L=5, seed=5)
    pad = 3
    padded = torch.cat((torch.zeros(1, pad, dtype=torch.long), short), dim=1)
    mask = torch.cat((torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)),
                     dim=1)
    a = model(short).logits
    b = model(padded, attention_mask=mask).logits
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b[:, pad:], rtol=1e-5, atol=1e-5)
    ga = model.generate(short, 6, temperature=0.0)
    gb = model.generate(padded, 6, temperature=0.0, attention_mask=mask)
    assert torch.equal(ga.completion_ids, gb.completion_ids)
    torch.testing.assert_close(ga.logprobs, gb.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = make(seed=7, tie_embeddings=tie)
    model.save(tmp_path / "ckpt")
    loaded = TinyCausalLM.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids = random_ids()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    with pytest.raises(FileNotFoundError):
        TinyCausalLM.load(tmp_path / "missing")


def test_torch_func_gradients_match_autograd():
    model = make(seed=8)
    ids = random_ids(B=2, L=7)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p):
        return torch.func.functional_call(model, p, (ids,), {"labels": ids}).loss

    grads = torch.func.grad(loss_fn)(params)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_save_load_keeps_the_dtype(tmp_path, dtype):
    model = make(seed=7).to(dtype)
    with torch.no_grad():  # weights that fp32 cannot hold
        model.lm_head.weight.add_(1e-12 if dtype == torch.float64 else 0.0)
    model.save(tmp_path / "ckpt")
    loaded = TinyCausalLM.load(tmp_path / "ckpt")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name
    ids = random_ids()
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_of_a_file_without_a_recorded_dtype_gives_fp32(tmp_path):
    from safetensors.torch import load_file, save_file

    make(seed=7).double().save(tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as before
    assert {p.dtype for p in TinyCausalLM.load(tmp_path / "old").parameters()} == {torch.float32}


def test_cross_entropy_dtype_is_at_least_fp32_and_labels_may_be_int32():
    from modman.toy import shifted_cross_entropy

    ids = random_ids()
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    logits = make(seed=1)(ids).logits
    loss = shifted_cross_entropy(logits, labels)
    targets = labels[:, 1:].reshape(-1)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets)
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)
    assert torch.equal(shifted_cross_entropy(logits, labels.int()), loss)
    logits64 = logits.double()
    loss64 = shifted_cross_entropy(logits64, labels)
    ref64 = torch.nn.functional.cross_entropy(logits64[:, :-1].reshape(-1, V), targets)
    assert loss64.dtype == torch.float64 and torch.equal(loss64, ref64)
    assert shifted_cross_entropy(logits.bfloat16(), labels).dtype == torch.float32
    assert make(seed=1)(ids, labels=labels.int()).loss.item() == loss.item()
    with pytest.raises(TypeError, match="labels"):
        shifted_cross_entropy(logits, labels.float())


@pytest.mark.parametrize("kwargs, name", [
    ({"init_std": -1.0}, "init_std"), ({"init_std": float("nan")}, "init_std"),
    ({"init_std": 0.0}, "init_std"), ({"rope_base": 0.0}, "rope_base"),
    ({"rope_base": -1.0}, "rope_base"), ({"rope_base": float("nan")}, "rope_base"),
    ({"rope_base": 1.0}, "rope_base"), ({"d_ff": True}, "d_ff"), ({"d_ff": 0}, "d_ff"),
    ({"norm_eps": float("inf")}, "norm_eps"), ({"tie_embeddings": "no"}, "tie_embeddings"),
])
def test_config_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(**kwargs)


def test_numpy_config_values_are_stored_as_python_numbers_and_saved(tmp_path):
    """A sweep's numpy values: accepted, stored as Python numbers, so ``save`` writes its JSON
    (an np.float32 norm_eps was accepted and then failed in json.dumps; np.int64 sizes refused)."""
    import numpy as np

    model = TinyCausalLM(np.int64(V), np.int64(D), np.int32(LAYERS), np.int64(HEADS), np.int64(MAX_LEN),
                         d_ff=np.int64(64), norm_eps=np.float32(1e-5), rope_base=np.float64(500.0))
    assert all(type(getattr(model.config, k)) is int for k in ("vocab_size", "d_model", "d_ff"))
    assert type(model.config.norm_eps) is float
    loaded = TinyCausalLM.load(model.save(tmp_path / "m"))
    assert loaded.config == model.config


def test_generate_input_checks():
    import numpy as np

    model = make()
    prompts = random_ids(B=2, L=3)
    for kw, name in (({"pad_token_id": V}, "pad_token_id"), ({"pad_token_id": -1}, "pad_token_id"),
                     ({"pad_token_id": True}, "pad_token_id"),
                     ({"eos_token_id": V}, "eos_token_id")):
        with pytest.raises(ValueError, match=name):
            model.generate(prompts, 3, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(prompts[:, :0], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompts, True)
    out = model.generate(prompts, np.int64(2), temperature=0.0)
    expected = model.generate(prompts, 2, temperature=0.0).completion_ids
    assert torch.equal(out.completion_ids, expected)
    m64 = make().double()
    for n in (0, 1):
        assert m64.generate(prompts, n).logprobs.dtype == torch.float64
    assert make().generate(prompts, 0).logprobs.dtype == torch.float32


def test_rope_tables_survive_a_cast_and_follow_the_weights_precision():
    """.to(dtype) cast the tables with the weights: after .bfloat16().float() they stayed rounded
    (logits 0.29 off a fresh model with the same weights), and an fp64 model had fp32 tables."""
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    fresh = TinyCausalLM(40, 32, 2, 4, 64, seed=0)
    roundtrip = TinyCausalLM(40, 32, 2, 4, 64, seed=0).bfloat16().float()
    with torch.no_grad():
        fresh.load_state_dict(roundtrip.state_dict())  # the same (bf16-rounded) weights in both
        assert torch.equal(roundtrip(ids).logits, fresh(ids).logits)
    assert TinyCausalLM(40, 32, 2, 4, 64).double().rope_cos.dtype == torch.float64
    assert TinyCausalLM(40, 32, 2, 4, 64).bfloat16().rope_cos.dtype == torch.float32


def test_load_refuses_a_head_that_disagrees_with_the_tie(tmp_path):
    """A tied config.json with a separate lm_head in the file loaded silently (the saved head
    replaced the embeddings); the reverse raised torch's error, not the loader's."""
    import json

    for tie in (False, True):
        folder = tmp_path / str(tie)
        TinyCausalLM(40, 16, 1, 2, 16, tie_embeddings=tie, seed=0).save(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_embeddings": not tie}))
        with pytest.raises(ValueError, match="does not match its config: tie_embeddings is"):
            TinyCausalLM.load(folder)


def test_generate_refuses_a_right_padded_mask():
    """generate appends after the last column: a right-padded row continued from its padding."""
    model = TinyCausalLM(40, 16, 1, 2, 16, seed=0)
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask must be left-padded"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask must hold 0s and 1s"):
        model.generate(ids, 2, attention_mask=torch.tensor([[0, 2, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask must hold 0s and 1s"):  # 0.5 became 0 in the cast
        model.generate(ids, 2, attention_mask=torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]]))
    for bad in ([[0.0, 0.5, 1.0, 1.0, 1.0]], [[0, 2, 1, 1, 1]]):  # forward read them as 1 (a probe)
        with pytest.raises(ValueError, match="attention_mask must hold 0s and 1s"):
            model(ids, attention_mask=torch.tensor(bad))


def test_rope_tables_are_kept_when_neither_dtype_nor_device_changes():
    model = TinyCausalLM(40, 16, 1, 2, 16, seed=0)
    tables = model.rope_cos
    model.share_memory()  # (rebuilt on every _apply, the tables came back unshared)
    assert model.rope_cos.is_shared() and model.rope_cos is tables
    model.float()
    assert model.rope_cos is tables


def test_rope_tables_are_rebuilt_after_meta_and_to_empty_and_stay_wide():
    """to("meta") then to_empty() kept the key of the tables it came from: they held uninitialised
    memory (3e32) and the logits were NaN; a second .bfloat16() left them in bf16."""
    ref = TinyCausalLM(40, 16, 1, 2, 16, seed=0)
    model = TinyCausalLM(40, 16, 1, 2, 16, seed=1).to("meta").to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model.rope_cos, ref.rope_cos)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert TinyCausalLM(40, 16, 1, 2, 16).bfloat16().bfloat16().rope_cos.dtype == torch.float32
