"""Synthetic tasks with exact scorers, over one character-level vocabulary.

Every task turns a prompt string into exactly one correct completion string, computed from the
prompt alone (``task.answer(prompt)``), so scoring is an exact string comparison and needs no
stored references: ``task.score(prompts, completions)`` is True where completion == answer.

Sequences are ``<bos> prompt completion <eos>``. A :class:`Batch` holds them right-padded for
teacher forcing (labels -100 on <bos>, the prompt and padding, so only the completion and its
<eos> are scored) and the prompts alone, left-padded, for generation.

Tasks:
- :func:`addition` — ``"123+045="`` → the (n+1)-digit sum, zero-padded, in one of three formats:
  ``"plain"`` (``"0168"``), ``"reversed"`` (least significant digit first, ``"8610"``, the order in
  which carries are computed, which a causal model learns far faster) or ``"scratchpad"``
  (reversed, ``|``, then plain: ``"8610|0168"``, an answer spanning 2n+3 tokens).
- :func:`modular_addition` — same prompts as addition, answer (a+b) mod p: a shifted task for
  fine-tuning a model pretrained on addition.
- :func:`subtraction` — ``"523-045="`` → a−b with a ≥ b, n digits.
- :func:`keyvalue` — ``"qzkd:"`` → a random value string; a fixed table of known entropy.
- :func:`substitution` — a random string → its image under a fixed substitution cipher: a long
  answer (``length`` + 1 tokens) whose characters are independent.

Train/test splits of the arithmetic tasks partition the problem space (a, b) by a seeded hash:
a pair is held out iff splitmix64(seed, a, b) < test_fraction·2⁶⁴. Training batches never contain
a held-out pair, the split needs no storage at any n_digits, and addition, modular addition and
subtraction with the same seed hold out the same pairs. The split is of ordered pairs: for
addition most held-out (a, b) have their twin (b, a) in training (900 of 1000 test prompts of
3-digit addition), so a test score measures addition and commutativity together, not addition on
unseen operands; and the pair (0, 0) is held out at any test_fraction with seed 0 (the hash maps
0 to 0), kept so that splits, cached checkpoints and recorded results stay as they are.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import is_int, is_real
from .model import IGNORE_INDEX

DEFAULT_ALPHABET = string.digits + "+-*%=|:;,.?> " + string.ascii_lowercase
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def _check_int(name: str, value, minimum: int) -> int:
    """``value`` as a Python int, if it is an integer (numpy ones included, bools not) that is
    at least ``minimum``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class CharTokenizer:
    """One token per character, after the special tokens <pad> = 0, <bos> = 1, <eos> = 2.

    ``decode(encode(s)) == s`` for every string over the alphabet.
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        if not alphabet:
            raise ValueError("alphabet must not be empty")
        self.alphabet = alphabet
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.alphabet)

    def __len__(self) -> int:  # as Hugging Face tokenizers: len(tokenizer) is the vocabulary size
        return self.vocab_size

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = []
        for position, char in enumerate(text):
            if char not in self._id:
                raise ValueError(f"character {char!r} at position {position} of {text!r} is not "
                                 f"in the tokenizer's alphabet")
            ids.append(self._id[char])
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def decode(self, ids, *, stop_at_eos: bool = True) -> str:
        """Characters of ``ids``, dropping <pad>/<bos> and (by default) stopping at <eos>.

        Lenient by design (for display); scoring compares ids exactly (:meth:`Task.score_ids`).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = []
        offset = len(SPECIAL_TOKENS)
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary of size "
                                 f"{self.vocab_size}")
            if token == self.eos_token_id:
                if stop_at_eos:
                    break
                continue
            if token < offset:
                continue
            chars.append(self.alphabet[token - offset])
        return "".join(chars)

    def decode_batch(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """Decode each row; positions where ``mask`` is False are skipped."""
        rows = ids.tolist()
        if mask is not None:
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask.tolist())]
        return [self.decode(r) for r in rows]


@dataclass
class Batch:
    """Token tensors for a list of (prompt, target) pairs.

    ``input_ids``/``labels``/``attention_mask`` (N, L): ``<bos> prompt target <eos>`` right-padded,
    labels -100 except on target and <eos>; ``prompt_ids``/``prompt_mask`` (N, L_p): ``<bos>
    prompt`` left-padded (for ``generate``); ``prompts``/``targets``: the strings.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompts: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


class Task:
    """A prompt → completion map with an exact scorer. Subclasses define ``answer`` and
    ``_draw`` (sample n prompts from a split)."""

    name = "task"

    def __init__(self, tokenizer: CharTokenizer | None = None):
        self.tokenizer = tokenizer or CharTokenizer()

    # -- the task's definition
    def answer(self, prompt: str) -> str:
        raise NotImplementedError

    def _draw(self, n: int, split: str, rng: np.random.Generator) -> list[str]:
        raise NotImplementedError

    def test_prompts(self) -> list[str]:
        raise NotImplementedError

    @property
    def max_new_tokens(self) -> int:
        """Completion length plus the <eos>: the generation budget that scoring needs."""
        raise NotImplementedError

    # -- shared machinery
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Bool tensor: completion i equals the unique correct answer to prompt i."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return torch.tensor([c == self.answer(p) for p, c in zip(prompts, completions)],
                            dtype=torch.bool)

    def score_ids(self, prompts: list[str], completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bool tensor: completion i, as token ids, is the correct answer to prompt i.

        Row i's tokens are those where ``completion_mask`` is True (all of them without a mask),
        up to the first <eos>; the row is correct iff those tokens are exactly
        ``tokenizer.encode(answer)``. Any other token before the <eos> makes it wrong, <pad> and
        <bos> included (decoding would drop them, and rewards come from this scorer). Tokens
        after the <eos> are ignored. A completion that never emits <eos> within its budget still
        scores on its text: its tokens must then be exactly the answer's (the budget
        ``max_new_tokens`` is exactly long enough for answer plus <eos>).
        """
        if not isinstance(completion_ids, torch.Tensor) or completion_ids.ndim != 2:
            raise ValueError("completion_ids must be a tensor of shape (batch, length)")
        if len(prompts) != completion_ids.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {completion_ids.shape[0]} completions")
        rows = completion_ids.tolist()
        if completion_mask is not None:
            if completion_mask.shape != completion_ids.shape:
                raise ValueError(f"completion_mask must have completion_ids' shape "
                                 f"{tuple(completion_ids.shape)}, got "
                                 f"{tuple(completion_mask.shape)}")
            rows = [[t for t, m in zip(r, mr) if m]
                    for r, mr in zip(rows, completion_mask.tolist())]
        tok = self.tokenizer
        correct = []
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]  # what follows <eos> is ignored, padding included
            outside = [t for t in row if not 0 <= t < tok.vocab_size]
            if outside:
                raise ValueError(f"completion {i} holds token id {outside[0]}, outside the "
                                 f"vocabulary of size {tok.vocab_size}")
            correct.append(row == tok.encode(self.answer(prompt)))
        return torch.tensor(correct, dtype=torch.bool)

    def encode(self, prompts: list[str], targets: list[str] | None = None) -> Batch:
        """Tokenise prompts (and targets; default the correct answers) into a :class:`Batch`."""
        if targets is None:
            targets = [self.answer(p) for p in prompts]
        tok = self.tokenizer
        prompt_rows = [tok.encode(p, bos=True) for p in prompts]
        full_rows = [pr + tok.encode(t, eos=True) for pr, t in zip(prompt_rows, targets)]
        L = max((len(r) for r in full_rows), default=0)
        Lp = max((len(r) for r in prompt_rows), default=0)
        pad, ignore = tok.pad_token_id, IGNORE_INDEX
        # Build padded Python rows and convert once: per-row tensor writes dominate otherwise.
        ids_rows, label_rows, mask_rows, p_rows, pm_rows = [], [], [], [], []
        for pr, fr in zip(prompt_rows, full_rows):
            right = L - len(fr)
            ids_rows.append(fr + [pad] * right)
            label_rows.append([ignore] * len(pr) + fr[len(pr):] + [ignore] * right)
            mask_rows.append([1] * len(fr) + [0] * right)
            left = Lp - len(pr)
            p_rows.append([pad] * left + pr)
            pm_rows.append([0] * left + [1] * len(pr))
        n = len(prompts)

        def as_tensor(rows, width):
            return torch.tensor(rows, dtype=torch.long).reshape(n, width)

        input_ids, labels = as_tensor(ids_rows, L), as_tensor(label_rows, L)
        attention_mask = as_tensor(mask_rows, L)
        prompt_ids, prompt_mask = as_tensor(p_rows, Lp), as_tensor(pm_rows, Lp)
        return Batch(input_ids, labels, attention_mask, prompt_ids, prompt_mask,
                     list(prompts), list(targets))

    def sample(self, n: int, rng: np.random.Generator | int, split: str = "train") -> Batch:
        """n random problems from ``split`` ("train" or "test"), drawn from ``rng``.

        ``n`` is an int >= 1 (an empty batch has no use in training; ``encode([])`` builds one).
        """
        n = _check_int("n", n, 1)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        return self.encode(self._draw(n, split, rng))

    def test_batch(self) -> Batch:
        """The fixed held-out evaluation set."""
        return self.encode(self.test_prompts())

    @torch.no_grad()
    def evaluate(self, model, batch: Batch | None = None, *, batch_size: int = 500) -> float:
        """Greedy exact-match accuracy of ``model`` on ``batch`` (default: the test set), the
        fraction of prompts whose greedy completion :meth:`score_ids` accepts. An empty batch
        is refused: its accuracy is undefined."""
        if batch is None:
            batch = self.test_batch()
        if len(batch) == 0:
            raise ValueError("batch is empty: accuracy over no problems is undefined")
        batch_size = _check_int("batch_size", batch_size, 1)
        correct = 0
        for start in range(0, len(batch), batch_size):
            sl = slice(start, start + batch_size)
            out = model.generate(batch.prompt_ids[sl], self.max_new_tokens, temperature=0.0,
                                 eos_token_id=self.tokenizer.eos_token_id,
                                 pad_token_id=self.tokenizer.pad_token_id,
                                 attention_mask=batch.prompt_mask[sl])
            correct += int(self.score_ids(batch.prompts[sl], out.completion_ids,
                                          out.completion_mask).sum())
        return correct / len(batch)


# ------------------------------------------------------------------ arithmetic

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a bijective mixer."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _is_held_out(a: np.ndarray, b: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(a.shape, seed & _MASK64, dtype=np.uint64))
        key = _splitmix64(key ^ a.astype(np.uint64))
        key = _splitmix64(key ^ b.astype(np.uint64))
    # Compare the top 53 bits as a float in [0, 1): exact for any fraction a float can hold.
    return (key >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < test_fraction


class ArithmeticTask(Task):
    """``"{a:0n}{op}{b:0n}="`` → the result zero-padded to a fixed width, in ``format``.

    op "+" : a + b (width n+1);  "+" with modulus p: (a + b) mod p (width = digits of p−1);
    op "-" : a − b with a ≥ b (width n).
    """

    def __init__(self, op: str, n_digits: int, *, modulus: int | None = None,
                 format: str = "reversed", seed: int = 0, test_fraction: float = 0.1,
                 n_test: int = 1000, tokenizer: CharTokenizer | None = None):
        super().__init__(tokenizer)
        if op not in ("+", "-"):
            raise ValueError(f"op must be '+' or '-', got {op!r}")
        # counts: any integer (numpy's too, stored as int), never a bool (addition(True) built,
        # then failed at sample() with "Invalid format specifier '0Trued'")
        if not is_int(n_digits) or not 1 <= n_digits <= 18:
            raise ValueError(f"n_digits must be an int in [1, 18], got {n_digits!r}")
        n_digits = int(n_digits)
        if format not in ("plain", "reversed", "scratchpad"):
            raise ValueError(
                f"format must be 'plain', 'reversed' or 'scratchpad', got {format!r}")
        if modulus is not None and (op != "+" or not is_int(modulus) or modulus < 2):
            raise ValueError(f"modulus must be an int >= 2 (with op '+'), got {modulus!r}")
        modulus = None if modulus is None else int(modulus)
        if not (is_real(test_fraction) and 0 < test_fraction < 1):
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        test_fraction = float(test_fraction)
        n_test = _check_int("n_test", n_test, 1)
        # numpy refuses a negative seed, but only when the test set is first drawn
        seed = _check_int("seed", seed, 0)
        self.op, self.n_digits, self.modulus, self.format = op, n_digits, modulus, format
        self.seed, self.test_fraction, self.n_test = seed, test_fraction, n_test
        if modulus is not None:
            self.name, self.width = f"addition_mod{modulus}", len(str(modulus - 1))
        elif op == "+":
            self.name, self.width = "addition", n_digits + 1
        else:
            self.name, self.width = "subtraction", n_digits
        # [0-9], not \d, which also matches other scripts' digits ("١٢٣"); \Z, not $, which
        # also matches before a final newline
        self._prompt_re = re.compile(
            rf"^([0-9]{{{n_digits}}}){re.escape(op)}([0-9]{{{n_digits}}})=\Z")
        self._test_prompts: list[str] | None = None

    @property
    def max_new_tokens(self) -> int:
        body = 2 * self.width + 1 if self.format == "scratchpad" else self.width
        return body + 1

    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.n_digits}d}{self.op}{b:0{self.n_digits}d}="

    def result(self, a: int, b: int) -> int:
        if self.op == "-":
            return a - b
        return (a + b) % self.modulus if self.modulus is not None else a + b

    def answer(self, prompt: str) -> str:
        match = self._prompt_re.match(prompt)
        if match is None:
            raise ValueError(f"prompt {prompt!r} is not of the form "
                             f"{self.prompt(0, 0).replace('0', 'd')!r}")
        a, b = int(match[1]), int(match[2])
        if self.op == "-" and a < b:
            raise ValueError(f"subtraction prompt {prompt!r} has a < b")
        plain = f"{self.result(a, b):0{self.width}d}"
        if self.format == "plain":
            return plain
        if self.format == "reversed":
            return plain[::-1]
        return plain[::-1] + "|" + plain

    def _pairs(self, n: int, split: str, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """n pairs from the split by rejection: draw uniformly, keep those in the split."""
        want_test = split == "test"
        high = 10 ** self.n_digits
        keep_a, keep_b, have = [], [], 0
        accept = self.test_fraction if want_test else 1 - self.test_fraction
        for _ in range(10_000):
            m = max(16, int(1.2 * (n - have) / accept) + 16)
            a = rng.integers(0, high, size=m, dtype=np.int64)
            b = rng.integers(0, high, size=m, dtype=np.int64)
            if self.op == "-":
                a, b = np.maximum(a, b), np.minimum(a, b)
            ok = _is_held_out(a, b, self.seed, self.test_fraction) == want_test
            keep_a.append(a[ok])
            keep_b.append(b[ok])
            have += int(ok.sum())
            if have >= n:
                break
        else:
            raise RuntimeError(f"could not draw {n} {split} problems; the split is empty")
        return np.concatenate(keep_a)[:n], np.concatenate(keep_b)[:n]

    def _draw(self, n, split, rng):
        a, b = self._pairs(n, split, rng)
        return [self.prompt(int(x), int(y)) for x, y in zip(a, b)]

    def test_prompts(self) -> list[str]:
        """Up to n_test distinct held-out prompts, a fixed function of ``seed``."""
        if self._test_prompts is None:
            space = 10 ** self.n_digits
            space = space * (space + 1) // 2 if self.op == "-" else space * space
            if space <= 200_000:
                # Small problem spaces: enumerate the held-out set rather than sample it.
                grid = np.arange(10 ** self.n_digits, dtype=np.int64)
                a, b = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
                if self.op == "-":
                    a, b = a[a >= b], b[a >= b]
                held = _is_held_out(a, b, self.seed, self.test_fraction)
                a, b = a[held], b[held]
                order = np.random.default_rng(self.seed).permutation(len(a))[:self.n_test]
                pairs = list(zip(a[order].tolist(), b[order].tolist()))
            else:
                rng = np.random.default_rng([self.seed, 0x7E57])
                seen: dict[tuple[int, int], None] = {}
                stalls = 0
                while len(seen) < self.n_test and stalls < 3:
                    before = len(seen)
                    a, b = self._pairs(self.n_test, "test", rng)
                    for pair in zip(a.tolist(), b.tolist()):
                        seen.setdefault(pair)
                    # three rounds of n_test draws that find no new pair: the held-out set is used up
                    # (it looped forever where test_fraction·space < n_test; a probe). One left unseen
                    # among S survives three rounds with probability (1 − 1/S)^(3·n_test).
                    stalls = stalls + 1 if len(seen) == before else 0
                pairs = list(seen)[:self.n_test]
            self._test_prompts = [self.prompt(a, b) for a, b in pairs]
        return list(self._test_prompts)

    def is_held_out(self, a: int, b: int) -> bool:
        return bool(_is_held_out(np.array([a]), np.array([b]), self.seed, self.test_fraction)[0])


def addition(n_digits: int = 3, *, format: str = "reversed", seed: int = 0,
             test_fraction: float = 0.1, n_test: int = 1000,
             tokenizer: CharTokenizer | None = None) -> ArithmeticTask:
    """n-digit addition ``"123+045="`` → a+b in (n+1) digits; see the module docstring."""
    return ArithmeticTask("+", n_digits, format=format, seed=seed, test_fraction=test_fraction,
                          n_test=n_test, tokenizer=tokenizer)


def modular_addition(n_digits: int = 3, modulus: int = 97, *, format: str = "reversed",
                     seed: int = 0, test_fraction: float = 0.1, n_test: int = 1000,
                     tokenizer: CharTokenizer | None = None) -> ArithmeticTask:
    """Addition's prompts with answer (a+b) mod ``modulus``: a shifted task for fine-tuning."""
    return ArithmeticTask("+", n_digits, modulus=modulus, format=format, seed=seed,
                          test_fraction=test_fraction, n_test=n_test, tokenizer=tokenizer)


def subtraction(n_digits: int = 3, *, format: str = "reversed", seed: int = 0,
                test_fraction: float = 0.1, n_test: int = 1000,
                tokenizer: CharTokenizer | None = None) -> ArithmeticTask:
    """``"523-045="`` → a−b (a ≥ b) in n digits."""
    return ArithmeticTask("-", n_digits, format=format, seed=seed, test_fraction=test_fraction,
                          n_test=n_test, tokenizer=tokenizer)


# ------------------------------------------------------------------ memorisation

class KeyValueTask(Task):
    """A fixed random table ``key:`` → value: pure memorisation of a known number of bits.

    Keys are distinct strings of ``key_len`` characters from ``key_alphabet``; each value is
    ``value_len`` characters drawn uniformly and independently from ``value_alphabet``, so the
    table holds ``bits = n_keys · value_len · log₂|value_alphabet|`` bits that no rule predicts.
    Nothing can generalise to an unseen key, so both splits are the whole table: the test set
    measures recall.
    """

    name = "keyvalue"

    def __init__(self, n_keys: int, *, key_len: int = 4, value_len: int = 4,
                 key_alphabet: str = string.ascii_lowercase, value_alphabet: str = string.digits,
                 seed: int = 0, tokenizer: CharTokenizer | None = None):
        super().__init__(tokenizer)
        n_keys = _check_int("n_keys", n_keys, 1)
        key_len = _check_int("key_len", key_len, 1)
        value_len = _check_int("value_len", value_len, 1)
        # A repeated character would make fewer distinct keys than counted (an endless search for
        # them) and fewer distinct values than ``bits`` assumes.
        for name, alphabet in (("key_alphabet", key_alphabet), ("value_alphabet", value_alphabet)):
            if not alphabet or len(set(alphabet)) != len(alphabet):
                raise ValueError(f"{name} must be a non-empty string of distinct characters, "
                                 f"got {alphabet!r}")
        seed = _check_int("seed", seed, 0)
        if n_keys > len(key_alphabet) ** key_len:
            raise ValueError(f"n_keys={n_keys} exceeds the {len(key_alphabet) ** key_len} "
                             f"distinct keys of length key_len={key_len}")
        for alphabet in (key_alphabet, value_alphabet):
            self.tokenizer.encode(alphabet)  # every character must be a token
        if ":" in key_alphabet:
            raise ValueError("key_alphabet must not contain the separator ':'")
        self.n_keys, self.key_len, self.value_len, self.seed = n_keys, key_len, value_len, seed
        rng = np.random.default_rng(seed)
        keys: dict[str, None] = {}
        while len(keys) < n_keys:
            for row in rng.integers(0, len(key_alphabet), size=(n_keys, key_len)):
                keys.setdefault("".join(key_alphabet[i] for i in row))
        key_list = list(keys)[:n_keys]
        values = rng.integers(0, len(value_alphabet), size=(n_keys, value_len))
        self.table = {k: "".join(value_alphabet[i] for i in v) for k, v in zip(key_list, values)}
        self.bits = n_keys * value_len * math.log2(len(value_alphabet))

    @property
    def max_new_tokens(self) -> int:
        return self.value_len + 1

    def answer(self, prompt: str) -> str:
        if not prompt.endswith(":") or prompt[:-1] not in self.table:
            raise ValueError(f"prompt {prompt!r} is not '<key>:' for a key of this table")
        return self.table[prompt[:-1]]

    def _draw(self, n, split, rng):
        keys = list(self.table)
        return [keys[i] + ":" for i in rng.integers(0, len(keys), size=n)]

    def test_prompts(self) -> list[str]:
        return [k + ":" for k in self.table]


def keyvalue(n_keys: int = 256, *, key_len: int = 4, value_len: int = 4,
             key_alphabet: str = string.ascii_lowercase, value_alphabet: str = string.digits,
             seed: int = 0, tokenizer: CharTokenizer | None = None) -> KeyValueTask:
    """Key→value memorisation; ``task.bits`` is the information the model must store."""
    return KeyValueTask(n_keys, key_len=key_len, value_len=value_len, key_alphabet=key_alphabet,
                        value_alphabet=value_alphabet, seed=seed, tokenizer=tokenizer)


# ------------------------------------------------------------------ long answers

class SubstitutionTask(Task):
    """``"qzkdamwe…:"`` → the same string through a fixed random substitution cipher.

    The prompt is ``length`` characters drawn uniformly from ``alphabet``; the answer maps each
    through a seeded permutation of ``alphabet`` (with ``per_position=True`` a different one at
    every position: ``length``·|alphabet| independent facts to learn), so answer character j
    depends on prompt character j alone. A long answer of independent tokens: a per-token
    reward says which of the ``length`` characters is wrong, a 0/1 sequence reward only that one
    is (the case for which on-policy distillation reports its largest gain over RL). The test set
    is ``n_test`` fixed random prompts; training draws never return one of them.
    """

    name = "substitution"

    def __init__(self, length: int = 16, *, alphabet: str = string.ascii_lowercase,
                 per_position: bool = False, seed: int = 0, n_test: int = 500,
                 tokenizer: CharTokenizer | None = None):
        super().__init__(tokenizer)
        length = _check_int("length", length, 1)
        n_test = _check_int("n_test", n_test, 1)
        if len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
            raise ValueError(f"alphabet must hold at least 2 distinct characters, got {alphabet!r}")
        if ":" in alphabet:
            raise ValueError("alphabet must not contain the separator ':'")
        self.tokenizer.encode(alphabet)  # every character must be a token
        seed = _check_int("seed", seed, 0)
        if n_test > len(alphabet) ** length // 2:
            raise ValueError(f"n_test={n_test} is more than half of the "
                             f"{len(alphabet) ** length} prompts of length {length}")
        self.length, self.alphabet, self.seed, self.n_test = length, alphabet, seed, n_test
        self.per_position = bool(per_position)
        rng = np.random.default_rng([seed, 0xC1F])
        orders = ([rng.permutation(len(alphabet)) for _ in range(length)] if per_position
                  else [rng.permutation(len(alphabet))] * length)
        # keys[j]: the cipher of answer position j
        self.keys = [{c: alphabet[i] for c, i in zip(alphabet, order)} for order in orders]
        self._test_prompts: dict[str, None] | None = None

    @property
    def max_new_tokens(self) -> int:
        return self.length + 1

    def answer(self, prompt: str) -> str:
        body = prompt[:-1]
        if not prompt.endswith(":") or len(body) != self.length or any(c not in self.keys[0] for c in body):
            raise ValueError(f"prompt {prompt!r} is not {self.length} characters of the alphabet "
                             f"followed by ':'")
        return "".join(key[c] for key, c in zip(self.keys, body))

    def _random(self, n: int, rng: np.random.Generator) -> list[str]:
        rows = rng.integers(0, len(self.alphabet), size=(n, self.length))
        return ["".join(self.alphabet[i] for i in row) + ":" for row in rows]

    def _held_out(self) -> dict[str, None]:
        """The test prompts, in order, as a dict (for O(1) membership); a fixed function of seed."""
        if self._test_prompts is None:
            rng = np.random.default_rng([self.seed, 0x7E57])
            seen: dict[str, None] = {}
            while len(seen) < self.n_test:
                for p in self._random(self.n_test, rng):
                    seen.setdefault(p)
            self._test_prompts = dict.fromkeys(list(seen)[:self.n_test])
        return self._test_prompts

    def _draw(self, n, split, rng):
        held_out = self._held_out()
        if split == "test":
            test = list(held_out)
            return [test[i] for i in rng.integers(0, len(test), size=n)]
        out: list[str] = []
        while len(out) < n:
            out += [p for p in self._random(n - len(out), rng) if p not in held_out]
        return out

    def test_prompts(self) -> list[str]:
        return list(self._held_out())


def substitution(length: int = 16, *, alphabet: str = string.ascii_lowercase,
                 per_position: bool = False, seed: int = 0, n_test: int = 500,
                 tokenizer: CharTokenizer | None = None) -> SubstitutionTask:
    """A random string → its image under a fixed substitution cipher (``length`` + 1 tokens)."""
    return SubstitutionTask(length, alphabet=alphabet, per_position=per_position, seed=seed,
                            n_test=n_test, tokenizer=tokenizer)
