"""Tokenizer, tasks and their exact scorers; splits and determinism by seed."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modman.toy import IGNORE_INDEX, TinyCausalLM, tasks
from modman.toy.tasks import DEFAULT_ALPHABET, CharTokenizer

TOK = CharTokenizer()


@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=40))
def test_tokenizer_round_trip(text):
    ids = TOK.encode(text, bos=True, eos=True)
    assert len(ids) == len(text) + 2
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == text


def test_tokenizer_errors_and_eos_handling():
    with pytest.raises(ValueError, match="'#' at position 2"):
        TOK.encode("12#")
    with pytest.raises(ValueError, match="vocabulary"):
        TOK.decode([TOK.vocab_size])
    ids = TOK.encode("12", eos=True) + TOK.encode("34")
    assert TOK.decode(ids) == "12"
    assert TOK.decode(ids, stop_at_eos=False) == "1234"


def test_addition_scorer_on_hand_made_cases():
    plain = tasks.addition(3, format="plain")
    rev = tasks.addition(3, format="reversed")
    pad = tasks.addition(3, format="scratchpad")
    assert plain.answer("123+045=") == "0168"
    assert rev.answer("123+045=") == "8610"
    assert pad.answer("999+999=") == "8991|1998"
    assert rev.answer("000+000=") == "0000"
    assert pad.max_new_tokens == 10 and rev.max_new_tokens == 5
    got = rev.score(["123+045=", "999+001=", "500+500="], ["8610", "0001", "0001 "])
    assert got.tolist() == [True, True, False]
    assert not rev.score(["123+045="], ["168"]).item()  # the answer has a fixed width
    with pytest.raises(ValueError, match="prompt"):
        rev.answer("12+045=")
    with pytest.raises(ValueError, match="completions"):
        rev.score(["123+045="], [])


def test_shifted_variants_on_hand_made_cases():
    mod = tasks.modular_addition(3, 97, format="plain")
    assert mod.answer("100+000=") == "03"  # 100 mod 97, two digits since 96 has two
    assert mod.answer("096+001=") == "00"
    sub = tasks.subtraction(3, format="reversed")
    assert sub.answer("523-045=") == "874"  # 478 reversed
    with pytest.raises(ValueError, match="a < b"):
        sub.answer("045-523=")
    with pytest.raises(ValueError, match="modulus"):
        tasks.modular_addition(3, 1)
    with pytest.raises(ValueError, match="n_digits"):
        tasks.addition(0)
    with pytest.raises(ValueError, match="format"):
        tasks.addition(3, format="backwards")


@given(st.integers(1, 6), st.integers(0, 10**6), st.integers(0, 10**6),
       st.sampled_from(["plain", "reversed", "scratchpad"]))
def test_addition_scorer_is_exact(n, a, b, fmt):
    a, b = a % 10**n, b % 10**n
    task = tasks.addition(n, format=fmt)
    prompt = task.prompt(a, b)
    ans = task.answer(prompt)
    digits = ans.split("|")[-1] if fmt == "scratchpad" else ans
    value = int(digits[::-1] if fmt == "reversed" else digits)
    assert value == a + b
    assert task.score([prompt], [ans]).item()
    # Any single-character change is wrong.
    for i in range(len(ans)):
        wrong = ans[:i] + ("1" if ans[i] != "1" else "2") + ans[i + 1:]
        assert not task.score([prompt], [wrong]).item()


def test_batch_layout_masks_the_prompt():
    task = tasks.addition(2)
    batch = task.encode(["12+34=", "99+01="])
    # <bos> 5 prompt chars, 3 answer digits, <eos>
    assert batch.input_ids.shape == (2, 1 + 6 + 3 + 1)
    assert (batch.labels[:, :7] == IGNORE_INDEX).all()
    assert TOK.decode(batch.labels[0, 7:]) == "640"
    assert batch.labels[0, -1] == TOK.eos_token_id
    assert torch.equal(batch.prompt_ids, batch.input_ids[:, :7])
    assert batch.prompt_mask.all()


def test_left_padding_of_prompts_of_different_lengths():
    task = tasks.keyvalue(4, key_len=2)
    keys = list(task.table)
    batch = task.encode([keys[0] + ":", keys[1] + ":"])
    assert batch.prompt_mask.all()  # equal lengths: no padding
    uneven = tasks.Task.encode(task, ["ab:", "abcd:"], ["1", "2"])
    assert uneven.prompt_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert uneven.prompt_ids[0, :2].tolist() == [TOK.pad_token_id] * 2


def test_splits_are_disjoint_and_deterministic_by_seed():
    task = tasks.addition(3, seed=1)
    test = set(task.test_prompts())
    assert len(test) == 1000
    assert task.test_prompts() == tasks.addition(3, seed=1).test_prompts()
    assert set(tasks.addition(3, seed=2).test_prompts()) != test
    train = task.sample(5000, 0).prompts
    assert not test & set(train)
    assert task.sample(64, 7).prompts == task.sample(64, 7).prompts
    assert task.sample(64, 7).prompts != task.sample(64, 8).prompts
    # Every held-out prompt is in the hashed test partition; shifted tasks share the split.
    assert all(task.is_held_out(int(p[:3]), int(p[4:7])) for p in list(test)[:50])
    mod = tasks.modular_addition(3, 97, seed=1)
    assert set(mod.test_prompts()) == test
    # The held-out fraction is close to the requested one.
    held = np.mean([task.is_held_out(a, b) for a in range(100) for b in range(100)])
    assert abs(held - 0.1) < 0.02


def test_small_problem_spaces_enumerate_their_test_set():
    task = tasks.addition(1, n_test=1000)
    prompts = task.test_prompts()
    assert len(prompts) == len(set(prompts)) < 100
    assert all(task.is_held_out(int(p[0]), int(p[2])) for p in prompts)
    sub = tasks.subtraction(2, n_test=50)
    assert all(int(p[:2]) >= int(p[3:5]) for p in sub.test_prompts())


def test_keyvalue_table_and_bits():
    task = tasks.keyvalue(100, key_len=3, value_len=5, seed=3)
    assert len(task.table) == 100
    assert task.bits == pytest.approx(100 * 5 * np.log2(10))
    assert task.table == tasks.keyvalue(100, key_len=3, value_len=5, seed=3).table
    assert task.table != tasks.keyvalue(100, key_len=3, value_len=5, seed=4).table
    key, value = next(iter(task.table.items()))
    assert task.score([key + ":"], [value]).item()
    assert not task.score([key + ":"], [value[::-1] + "x"]).item()
    with pytest.raises(ValueError, match="key"):
        task.answer("nokey:")
    with pytest.raises(ValueError, match="n_keys"):
        tasks.keyvalue(30, key_len=1)
    assert set(task.test_prompts()) == {k + ":" for k in task.table}


@given(st.integers(1, 12), st.booleans(), st.integers(0, 2**32 - 1))
def test_substitution_is_a_cipher_per_position(length, per_position, seed):
    task = tasks.substitution(length, per_position=per_position, seed=seed, n_test=5)
    alphabet = task.alphabet
    # each position's key is a permutation of the alphabet: the answer is invertible character by
    # character, and shared across positions unless per_position
    for key in task.keys:
        assert sorted(key) == sorted(key.values()) == sorted(alphabet)
    if not per_position:
        assert all(key == task.keys[0] for key in task.keys)
    prompt = "".join(alphabet[(7 * j) % len(alphabet)] for j in range(length)) + ":"
    answer = task.answer(prompt)
    assert len(answer) == length == task.max_new_tokens - 1
    assert all(task.keys[j][c] == answer[j] for j, c in enumerate(prompt[:-1]))
    # answer position j depends on prompt position j alone
    j = length // 2
    other = alphabet[(alphabet.index(prompt[j]) + 1) % len(alphabet)]
    changed = task.answer(prompt[:j] + other + prompt[j + 1:])
    assert [a != b for a, b in zip(answer, changed)] == [i == j for i in range(length)]


def test_substitution_splits_and_errors():
    task = tasks.substitution(6, per_position=True, n_test=40)
    test = task.test_prompts()
    assert len(set(test)) == 40 and test == tasks.substitution(6, per_position=True, n_test=40).test_prompts()
    assert task.keys != tasks.substitution(6, per_position=True, seed=1, n_test=40).keys
    assert len({str(k) for k in task.keys}) > 1
    # a space of 26 prompts, half of them held out: training draws must avoid every one
    tiny = tasks.substitution(1, n_test=13)
    assert len(set(tiny.test_prompts())) == 13
    train = tiny.sample(500, 0).prompts
    assert not set(train) & set(tiny.test_prompts()) and len(set(train)) == 13
    assert set(task.sample(50, 0, split="test").prompts) <= set(test)
    batch = task.sample(3, 1)
    assert task.score(batch.prompts, batch.targets).all()
    with pytest.raises(ValueError, match="not 6 characters"):
        task.answer("abc:")
    with pytest.raises(ValueError, match="not 6 characters"):
        task.answer("ABCDEF:")
    with pytest.raises(ValueError, match="length"):
        tasks.substitution(0)
    with pytest.raises(ValueError, match="n_test"):
        tasks.substitution(1, n_test=20)
    with pytest.raises(ValueError, match="separator"):
        tasks.substitution(3, alphabet="ab:")


def test_evaluate_scores_generated_text():
    task = tasks.addition(1, n_test=20)
    model = TinyCausalLM(TOK.vocab_size, 16, 1, 2, 16, seed=0)
    batch = task.test_batch()
    out = model.generate(batch.prompt_ids, task.max_new_tokens, temperature=0.0,
                         eos_token_id=TOK.eos_token_id)
    expected = task.score_ids(batch.prompts, out.completion_ids, out.completion_mask)
    assert task.evaluate(model) == pytest.approx(expected.float().mean().item())

    # A model that is handed the answers scores 1: score_ids on teacher-forced targets.
    targets = [TOK.encode(t, eos=True) for t in batch.targets]
    assert task.score_ids(batch.prompts, torch.tensor(targets)).all()


def test_evaluate_counts_the_prompts_answered_right_across_chunks():
    """An untrained model scores 0 (the test above), which an evaluate returning 0 would match:
    a stand-in that answers the first nine prompts right scores 9/20, in chunks of 7 (the mean of
    the chunks' accuracies, (1 + 2/7 + 0)/3 = 0.43, is not: averaging chunks fails)."""
    task = tasks.addition(2, n_test=20)
    batch = task.test_batch()
    answers = {tuple(ids.tolist()): (i, TOK.encode(t, eos=True)) for i, (ids, t) in
               enumerate(zip(batch.prompt_ids, batch.targets))}
    assert len(answers) == len(batch) == 20

    class FirstNineRight:
        def generate(self, prompt_ids, max_new_tokens, **kwargs):
            rows = []
            for ids in prompt_ids:
                i, target = answers[tuple(ids.tolist())]
                rows.append(target if i < 9 else [TOK.eos_token_id])
            width = max(map(len, rows))
            ids = torch.tensor([r + [TOK.eos_token_id] * (width - len(r)) for r in rows])
            return SimpleNamespace(completion_ids=ids, completion_mask=torch.ones_like(ids))

    assert task.evaluate(FirstNineRight(), batch_size=7) == 9 / 20


@given(st.integers(0, 2**32), st.integers(2, 6), st.sampled_from(["+", "-"]))
def test_sampled_problems_respect_the_hashed_split(seed, n, op):
    task = tasks.ArithmeticTask(op, n, seed=seed, test_fraction=0.2)
    width = n
    for split, expected in (("train", False), ("test", True)):
        for prompt in task.sample(40, seed, split).prompts:
            a, b = int(prompt[:width]), int(prompt[width + 1:2 * width + 1])
            assert task.is_held_out(a, b) == expected
            if op == "-":
                assert a >= b


def test_score_ids_counts_every_token_before_eos():
    """Rewards come from score_ids: a special token inside the answer makes it wrong even though
    decoding would drop it; a completion cut at the budget without <eos> still scores on its ids."""
    task = tasks.addition(3)
    prompt = "123+045="
    ans = TOK.encode(task.answer(prompt))  # "8610"
    eos, pad, bos = TOK.eos_token_id, TOK.pad_token_id, TOK.bos_token_id
    cases = [
        (ans + [eos], True),
        (ans + [eos, pad, pad], True),  # tokens after <eos> are ignored
        (ans + [eos, -100, 999], True),  # even ids no vocabulary has (a -100 label pad)
        (ans, True),  # no <eos>, no room for one: the text is the answer
        (ans[:1] + [pad] + ans[1:], False),  # <pad> inside, no <eos>
        (ans[:2] + [bos] + ans[2:], False),  # <bos> inside, no <eos>
        (ans[:1] + [pad] + ans[1:] + [eos], False),
        (ans + [pad, eos], False),
        ([bos] + ans + [eos], False),
        (ans + [TOK.encode("5")[0]], False),  # a fifth digit instead of <eos>
        (ans[:3] + [eos], False),
    ]
    for ids, expected in cases:
        row = torch.tensor([ids])
        assert task.score_ids([prompt], row).item() == expected, ids
        mask = torch.ones_like(row, dtype=torch.bool)
        assert task.score_ids([prompt], row, mask).item() == expected, ids
    # Masked-out positions (after a row stopped, as generate returns them) are skipped.
    row = torch.tensor([ans + [eos, pad]])
    assert task.score_ids([prompt], row, torch.tensor([[True] * 5 + [False]])).item()
    with pytest.raises(ValueError, match="vocabulary"):
        task.score_ids([prompt], torch.tensor([ans + [TOK.vocab_size]]))
    with pytest.raises(ValueError, match="completions"):
        task.score_ids([prompt, prompt], torch.tensor([ans]))
    with pytest.raises(ValueError, match="completion_mask"):
        task.score_ids([prompt], torch.tensor([ans]), torch.ones(1, 3, dtype=torch.bool))


def test_keyvalue_refuses_repeated_alphabet_characters():
    # Two distinct keys in "aab": counting 3 let n_keys=3 search for a third key forever.
    with pytest.raises(ValueError, match="key_alphabet"):
        tasks.keyvalue(2, key_len=1, key_alphabet="aab")
    # and bits would count log2(3) per character for 2 distinct values
    with pytest.raises(ValueError, match="value_alphabet"):
        tasks.keyvalue(4, value_len=1, value_alphabet="aab")
    with pytest.raises(ValueError, match="value_alphabet"):
        tasks.keyvalue(4, value_alphabet="")
    assert tasks.keyvalue(2, key_len=1, key_alphabet="ab", value_alphabet="xy").bits == 2 * 4 * 1.0


def test_evaluate_refuses_an_empty_batch():
    task = tasks.addition(1, n_test=20)
    model = TinyCausalLM(TOK.vocab_size, 16, 1, 2, 16, seed=0)
    calls = []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    with pytest.raises(ValueError, match="empty"):
        task.evaluate(model, task.encode([]))
    assert not calls  # in particular, not the whole test set instead
    with pytest.raises(ValueError, match="batch_size"):
        task.evaluate(model, batch_size=0)


def test_sample_requires_a_positive_int():
    task = tasks.addition(2)
    for bad in (-1, 0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            task.sample(bad, 0)
    assert len(task.sample(np.int64(3), 0)) == 3
    assert len(tasks.keyvalue(4).sample(1, 0)) == 1


def test_minor_input_checks():
    with pytest.raises(ValueError, match="token id -1"):
        TOK.decode([-1, 5])
    rev = tasks.addition(3)
    for prompt in ("١٢٣+045=", "123+045=\n"):  # Arabic-Indic digits pass \d; $ allows a newline
        with pytest.raises(ValueError, match="prompt"):
            rev.answer(prompt)
    for make in (tasks.addition, tasks.keyvalue, tasks.substitution):
        with pytest.raises(ValueError, match="seed"):
            make(seed=-1)
    # numpy seeds are accepted and mean the same as the int
    with_numpy_seed = tasks.addition(3, seed=np.int64(5)).test_prompts()[:5]
    assert with_numpy_seed == tasks.addition(3, seed=5).test_prompts()[:5]


def test_len_of_a_tokenizer_is_its_vocabulary_size():
    """As for Hugging Face tokenizers (it raised TypeError: no len())."""
    tok = tasks.CharTokenizer()
    assert len(tok) == tok.vocab_size > 0


@pytest.mark.parametrize("make, name", [
    (lambda v: tasks.addition(v), "n_digits"), (lambda v: tasks.addition(2, n_test=v), "n_test"),
    (lambda v: tasks.modular_addition(2, v + 1 if v is not True else v), "modulus"),
    (lambda v: tasks.keyvalue(v), "n_keys"), (lambda v: tasks.keyvalue(4, value_len=v), "value_len"),
    (lambda v: tasks.substitution(v, n_test=2), "length"),
])
def test_counts_refuse_bools_and_take_numpy_integers(make, name):
    """addition(True) built, then failed at sample() ("Invalid format specifier '0Trued'"); n_test=True
    gave a one-problem test set; numpy integers were refused."""
    with pytest.raises(ValueError, match=name):
        make(True)
    task = make(np.int64(2))
    task.sample(2, 0)
    stored = {k: getattr(task, k) for k in ("n_digits", "n_test", "modulus", "n_keys", "value_len", "length")
              if getattr(task, k, None) is not None}
    assert stored and all(type(v) is int for v in stored.values()), stored


def test_a_sampled_test_set_smaller_than_n_test_is_returned_whole():
    """With test_fraction·space < n_test the sampled branch (space > 200 000) looped forever (a
    probe: 513 held-out pairs of 3-digit addition at test_fraction 5e-4, n_test 1000); it stops after
    three rounds of n_test draws in a row find nothing new, and every prompt is distinct and held out."""
    import signal

    def hung(*_):
        raise TimeoutError("test_prompts() still running after 60 s")

    task = tasks.addition(3, test_fraction=0.0005)
    g = np.arange(1000, dtype=np.int64)
    a, b = (x.ravel() for x in np.meshgrid(g, g, indexing="ij"))
    held = int(tasks._is_held_out(a, b, 0, 0.0005).sum())
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        got = task.test_prompts()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(got) == len(set(got)) and all(task.is_held_out(*map(int, p.rstrip("=").split("+"))) for p in got)
    assert len(got) == held == 513  # the whole held-out set (three stalled rounds in a row before stopping)


def test_test_prompts_stops_after_three_stalled_rounds_in_a_row(monkeypatch):
    """Rounds of draws scripted: the rule takes A, B and C and uses up the script (one stalled
    round, two, or three in total, would stop at A or at B)."""
    task = tasks.addition(3, test_fraction=0.0005, n_test=10)
    A, B, C = (1, 2), (3, 4), (5, 6)
    script = iter([[A], [A], [A], [B], [B], [C], [C], [C], [C]])

    def pairs(n, split, rng):
        got = next(script)
        return np.array([p[0] for p in got]), np.array([p[1] for p in got])

    monkeypatch.setattr(task, "_pairs", pairs)
    assert task.test_prompts() == [task.prompt(*p) for p in (A, B, C)]
    assert next(script, None) is None
