"""TinyCausalLM: a small pre-norm decoder-only transformer with Llama's module names.

For token ids x₁…x_L the model computes

    h⁰ = E[x]                                  (+ P[pos] with learned positions)
    hˡ = hˡ⁻¹ + Attn(RMSNorm(hˡ⁻¹))             attention: softmax(QKᵀ/√d_head + causal mask) V
    hˡ = hˡ   + MLP(RMSNorm(hˡ))                SwiGLU: down(silu(gate(h)) ⊙ up(h))
    logits = lm_head(RMSNorm(hᴸ))

with RMSNorm(h) = g ⊙ h / √(mean(h²) + ε) and rotary position embeddings on Q and K by default.
Every Linear has no bias, and the names are the ones LoRA tooling targets:
``embed_tokens``, ``layers.{i}.self_attn.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``,
``layers.{i}.{input,post_attention}_layernorm``, ``norm``, ``lm_head``.

The loss follows Hugging Face: ``labels`` are aligned with ``input_ids`` and shifted inside, so
position t's logits are scored against labels[t+1]; -100 is ignored and the loss is the mean
cross-entropy over the scored positions.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_finite_real, is_int
IGNORE_INDEX = -100
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_DTYPE_KEY = "torch_dtype"  # in the safetensors metadata: the parameters' dtype


def _check_token_id(name: str, value, vocab_size: int) -> int:
    """``value`` as a Python int if it is an integer (numpy ones included, bools not) in
    [0, vocab_size)."""
    if not is_int(value) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of a :class:`TinyCausalLM`; everything needed to rebuild it."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_len: int
    d_ff: int | None = None  # None: 8/3·d_model rounded up to a multiple of 32, as in Llama
    positions: str = "rope"  # "rope" or "learned"
    rope_base: float = 10000.0  # > 1: the wavelengths run from 2π to 2π·rope_base
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02  # > 0

    def __post_init__(self):
        # numpy numbers (a sweep's) are stored as Python ones: the config is saved as JSON
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head size, got d_model/n_heads = "
                f"{self.d_model // self.n_heads}")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {self.positions!r}")
        if self.d_ff is not None:
            if not is_int(self.d_ff) or self.d_ff < 1:
                raise ValueError(f"d_ff must be a positive int or None, got {self.d_ff!r}")
            object.__setattr__(self, "d_ff", int(self.d_ff))
        if not (is_finite_real(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if not (is_finite_real(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std!r}")
        # rope_base ** (-2i/d_head) is inf or NaN for a base <= 0, and a base <= 1 gives no
        # wavelength longer than 2π positions.
        if not (is_finite_real(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base!r}")
        for name in ("rope_base", "norm_eps", "init_std"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    @property
    def hidden_size(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 32 * math.ceil(8 * self.d_model / 3 / 32)


@dataclass
class CausalLMOutput:
    """``logits`` (B, L, V); ``loss`` (scalar, or None without labels); ``past_key_values``
    (one (K, V) pair per layer, each (B, n_heads, L_total, d_head), when a cache was asked for)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class GenerationOutput:
    """The result of :meth:`TinyCausalLM.generate`.

    ``sequences`` (B, L_prompt + T): prompt then completion; ``completion_ids`` (B, T);
    ``logprobs`` (B, T): log-probability of each generated token under the sampling distribution
    (softmax(logits / temperature); the plain model at temperature 1 and for greedy decoding);
    ``completion_mask`` (B, T) bool: True up to and including the stop token, False after it
    (those positions hold ``pad_token_id`` and log-prob 0); ``prompt_length``: L_prompt.
    """

    sequences: torch.Tensor
    completion_ids: torch.Tensor
    logprobs: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int = field(default=0)


class RMSNorm(nn.Module):
    """g ⊙ x / √(mean(x²) + ε) over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32 so bf16 activations do not lose the mean of squares (and
        # fp64 ones keep fp64).
        xw = x.to(torch.promote_types(x.dtype, torch.float32))
        xw = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xw.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.d_head = d // config.n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos_sin, mask, past):
        B, L, _ = x.shape
        q, k, v = (
            proj(x).view(B, L, self.n_heads, self.d_head).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cos_sin is not None:
            cos, sin = cos_sin  # (B, 1, L, d_head)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        if mask is None:
            # No cache and no padding: the plain causal mask, which SDPA builds itself.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, self.n_heads * self.d_head)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        d, h = config.d_model, config.hidden_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, mask, past):
        attn, present = self.self_attn(self.input_layernorm(x), cos_sin, mask, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


def _check_binary(attention_mask: torch.Tensor) -> None:
    """An attention mask holds 0s and 1s (1: a real token); a bool one does by construction."""
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold 0s and 1s (1: a real token)")


class TinyCausalLM(nn.Module):
    """A pre-norm causal transformer small enough to train on a laptop CPU in minutes.

    Args:
        vocab_size, d_model, n_layers, n_heads, max_len: the architecture; max_len bounds the
            total length (prompt plus generated tokens).
        d_ff: SwiGLU hidden width (default 8/3·d_model rounded up to a multiple of 32).
        positions: ``"rope"`` (rotary, default) or ``"learned"`` (an ``embed_positions`` table).
        tie_embeddings: share ``lm_head.weight`` with ``embed_tokens.weight``.
        seed: if given, initialise the weights from ``torch.Generator().manual_seed(seed)``
            so two models built with the same seed are bitwise equal regardless of global state.

    Weights are N(0, init_std²); the two residual-writing projections (o_proj, down_proj) are
    scaled by 1/√(2·n_layers) so the residual stream's variance does not grow with depth.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int,
                 *, d_ff: int | None = None, positions: str = "rope", rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, tie_embeddings: bool = False, init_std: float = 0.02,
                 seed: int | None = None):
        super().__init__()
        config = TinyConfig(vocab_size, d_model, n_layers, n_heads, max_len, d_ff=d_ff,
                            positions=positions, rope_base=rope_base, norm_eps=norm_eps,
                            tie_embeddings=tie_embeddings, init_std=init_std)
        self.config = config
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if config.positions == "rope":
            # Buffers, not parameters: fixed functions of the position, never trained or saved.
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            self._set_rope_tables()
        self.reset_parameters(seed)

    def _set_rope_tables(self) -> None:
        """cos and sin of the rotary angles, from fp64, in the wider of fp32 and the weights' dtype."""
        c = self.config
        d_head = c.d_model // c.n_heads
        inv_freq = c.rope_base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        angles = torch.arange(c.max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        weight = self.embed_tokens.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.rope_cos = angles.cos().to(device=weight.device, dtype=dtype)
        self.rope_sin = angles.sin().to(device=weight.device, dtype=dtype)
        self._rope_for = (weight.device, weight.dtype)

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) casts every float buffer: the tables, rounded to bf16 by .bfloat16(), stayed
        # rounded after .float() (logits 0.29 off), and an fp64 model had fp32 ones. Rebuilt when
        # the weights' dtype or device changed (share_memory() and the like keep them as they are).
        out = super()._apply(fn, *args, **kwargs)
        weight = self.embed_tokens.weight
        if self.config.positions != "rope":
            return out
        if weight.device.type == "meta":  # no values: rebuilt once materialised (to_empty)
            self._rope_for = None
        elif (getattr(self, "_rope_for", None) != (weight.device, weight.dtype)
              or self.rope_cos.dtype != torch.promote_types(weight.dtype, torch.float32)):
            self._set_rope_tables()
        return out

    @classmethod
    def from_config(cls, config: TinyConfig, seed: int | None = None) -> "TinyCausalLM":
        return cls(**asdict(config), seed=seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)  # norm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * residual_std)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)

    # ---------------------------------------------------------------- forward

    def _check_ids(self, input_ids: torch.Tensor, past_length: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long,
                                                                              torch.int32):
            raise TypeError("input_ids must be an integer (long) tensor of shape (batch, length)")
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        total = past_length + input_ids.shape[1]
        if total > self.config.max_len:
            raise ValueError(
                f"input_ids length {input_ids.shape[1]} (plus {past_length} cached) exceeds "
                f"max_len={self.config.max_len}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        """Logits for every position, and the shifted cross-entropy when ``labels`` is given.

        Args:
            input_ids: (B, L) token ids in [0, vocab_size).
            labels: (B, L) aligned with input_ids; position t's logits predict labels[:, t+1];
                -100 marks positions not scored (prompt, padding).
            attention_mask: (B, L_past + L), 1 for real tokens and 0 for (left) padding. Padded
                keys are never attended to, and positions count real tokens only, so a left-padded
                prompt produces the same logits as the unpadded one.
            past_key_values, use_cache: the KV cache of earlier calls, and whether to return it.
        """
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        self._check_ids(input_ids, past_length)
        B, L = input_ids.shape
        device = input_ids.device
        total = past_length + L
        if past_key_values is not None and len(past_key_values) != self.config.n_layers:
            raise ValueError(f"past_key_values must hold {self.config.n_layers} layers, got "
                             f"{len(past_key_values)}")

        if attention_mask is not None:
            if attention_mask.shape != (B, total):
                raise ValueError(f"attention_mask must have shape {(B, total)} (batch, cached + "
                                 f"new length), got {tuple(attention_mask.shape)}")
            _check_binary(attention_mask)  # (0.5 and 2 were read as 1)
            key_mask = attention_mask.bool()
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
        else:
            key_mask = None
            positions = torch.arange(past_length, total, device=device).expand(B, L)

        mask = None
        if key_mask is not None or (past_length > 0 and L > 1):
            q_pos = torch.arange(past_length, total, device=device)
            k_pos = torch.arange(total, device=device)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, L, total)
            if key_mask is not None:
                # A padding query would otherwise see no key at all (softmax of all -inf = NaN);
                # letting every query see itself keeps padding rows finite and real rows exact.
                allowed = allowed & key_mask[:, None, None, :]
                allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
            mask = allowed

        h = self.embed_tokens(input_ids)
        cos_sin = None
        if self.config.positions == "learned":
            h = h + self.embed_positions(positions)
        else:
            cos_sin = (self.rope_cos[positions][:, None].to(h.dtype),
                       self.rope_sin[positions][:, None].to(h.dtype))

        presents = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            h, present = layer(h, cos_sin, mask, past)
            presents.append(present)
        logits = self.lm_head(self.norm(h))

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = shifted_cross_entropy(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss,
                              past_key_values=presents if use_cache else None)

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int = 0,
                 attention_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None,
                 use_cache: bool = True) -> GenerationOutput:
        """Sample up to ``max_new_tokens`` tokens after each prompt.

        At each step the next token is drawn from softmax(logits / temperature) (temperature 0:
        argmax), and its log-probability under that distribution is recorded, so at temperature 1
        ``logprobs`` equals log π(yₜ | prompt, y₍<ₜ₎) of a teacher-forced forward. Greedy decoding
        records the untempered model's log-probabilities. A row stops after it emits
        ``eos_token_id``; later positions hold ``pad_token_id``, log-prob 0 and mask False.
        Generation ends early once every row has stopped.

        Prompts of different lengths go left-padded, with ``attention_mask`` marking real tokens.
        Every prompt needs at least one token (e.g. <bos>): the first step predicts from it (a
        row of length 0, or whose mask marks nothing, raises ValueError). Non-finite logits raise
        FloatingPointError, naming the rows. ``logprobs`` are in the model's dtype promoted to at
        least fp32.
        """
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        vocab_size = self.config.vocab_size
        # Checked up front: a bad id would otherwise fail only once a row has stopped (pad) or
        # never stop a row at all (eos).
        pad_token_id = _check_token_id("pad_token_id", pad_token_id, vocab_size)
        if eos_token_id is not None:
            eos_token_id = _check_token_id("eos_token_id", eos_token_id, vocab_size)
        self._check_ids(input_ids, 0)
        B, L_prompt = input_ids.shape
        if L_prompt == 0:
            raise ValueError("input_ids must hold at least one token per row (e.g. <bos>) to "
                             "generate from, got length 0")
        if L_prompt + max_new_tokens > self.config.max_len:
            raise ValueError(
                f"prompt length {L_prompt} + max_new_tokens {max_new_tokens} exceeds "
                f"max_len={self.config.max_len}")
        device = input_ids.device
        if attention_mask is not None:
            _check_binary(attention_mask)  # (before the cast: 0.5 became 0, a real token taken as padding)
        # bool: checked once here, not again by forward at every new token
        mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if mask is not None:
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(mask.shape)}")
            if bool((mask[:, 1:] < mask[:, :-1]).any()):  # a right-padded row continued from its padding
                raise ValueError("attention_mask must be left-padded (each row 0…0 then 1…1): generation "
                                 "appends after the last column")
            empty = ~mask.bool().any(1)
            if bool(empty.any()):  # a row of padding alone would be continued from padding
                raise ValueError(f"attention_mask marks no token in row(s) {empty.nonzero().flatten().tolist()}: "
                                 "every prompt needs at least one token (e.g. <bos>) to generate from")
        sequences = input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new_ids, new_logprobs, new_masks = [], [], []
        past = None
        step_input = input_ids
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_input, attention_mask=mask, past_key_values=past, use_cache=True)
                past = out.past_key_values
            else:
                out = self(sequences, attention_mask=mask)
            # At least fp32 for the softmax (bf16 is too coarse); an fp64 model stays fp64.
            logits = out.logits[:, -1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            if not bool(torch.isfinite(logits).all()):  # multinomial would fail naming nothing
                rows = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
                raise FloatingPointError(f"generate: non-finite logits at new token {len(new_ids)} "
                                         f"in row(s) {rows[:8]}{' …' if len(rows) > 8 else ''}: the "
                                         "model's weights or inputs hold NaN/Inf")
            if temperature == 0:
                token = logits.argmax(-1)
                logprob_all = logits.log_softmax(-1)
            else:
                tempered = logits / temperature
                # (finite logits stay finite for temperature ≥ 1: no second host sync there)
                if temperature < 1 and not bool(torch.isfinite(tempered).all()):  # multinomial named nothing
                    raise ValueError(f"temperature={temperature!r} is so small that logits/temperature "
                                     "overflows; use temperature=0 for greedy decoding")
                logprob_all = tempered.log_softmax(-1)
                token = torch.multinomial(logprob_all.exp(), 1, generator=generator).squeeze(-1)
            logprob = logprob_all.gather(-1, token[:, None]).squeeze(-1)
            alive = ~finished
            token = torch.where(alive, token, torch.full_like(token, pad_token_id))
            new_ids.append(token)
            new_logprobs.append(torch.where(alive, logprob, torch.zeros_like(logprob)))
            new_masks.append(alive)
            if eos_token_id is not None:
                finished = finished | (alive & (token == eos_token_id))
            sequences = torch.cat((sequences, token[:, None]), dim=1)
            step_input = token[:, None]
            if mask is not None:
                mask = torch.cat((mask, torch.ones(B, 1, dtype=mask.dtype, device=device)), 1)
            if bool(finished.all()):
                break
        if new_ids:
            completion = torch.stack(new_ids, 1)
            logprobs = torch.stack(new_logprobs, 1)
            completion_mask = torch.stack(new_masks, 1)
        else:
            completion = input_ids.new_zeros(B, 0)
            # the dtype a generation step would give its log-probs
            logprob_dtype = torch.promote_types(self.lm_head.weight.dtype, torch.float32)
            logprobs = torch.zeros(B, 0, device=device, dtype=logprob_dtype)
            completion_mask = torch.zeros(B, 0, dtype=torch.bool, device=device)
        return GenerationOutput(sequences=sequences, completion_ids=completion, logprobs=logprobs,
                                completion_mask=completion_mask, prompt_length=L_prompt)

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``, with the
        parameters' dtype in the safetensors metadata so that :meth:`load` restores it."""
        from safetensors.torch import save_file

        dtypes = {p.dtype for p in self.parameters()}
        if len(dtypes) != 1:
            raise ValueError(f"the parameters mix dtypes {sorted(map(str, dtypes))}; cast the "
                             f"model to one dtype before saving")
        dtype = str(dtypes.pop()).removeprefix("torch.")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / _CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage
        save_file(state, str(path / _WEIGHTS_FILE),
                  metadata={"format": "pt", _DTYPE_KEY: dtype})
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "TinyCausalLM":
        """Rebuild a model written by :meth:`save`, in the dtype it was saved in (fp32 for files
        written before the dtype was recorded)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / _CONFIG_FILE).is_file() or not (path / _WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} lacks {_CONFIG_FILE} or {_WEIGHTS_FILE}")
        config = TinyConfig(**json.loads((path / _CONFIG_FILE).read_text()))
        model = cls.from_config(config)
        with safe_open(str(path / _WEIGHTS_FILE), framework="pt") as f:
            dtype_name = (f.metadata() or {}).get(_DTYPE_KEY, "float32")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"checkpoint {path} records an unknown dtype {dtype_name!r}")
        # Cast before loading: load_state_dict copies into the existing parameters' dtype.
        model.to(dtype)
        state = load_file(str(path / _WEIGHTS_FILE), device=str(map_location))
        if config.tie_embeddings and "lm_head.weight" in state:
            # (loaded silently: the saved head replaced the embeddings, logits 0.47 off)
            raise ValueError(f"checkpoint {path} does not match its config: tie_embeddings is true but "
                             f"{_WEIGHTS_FILE} holds a separate lm_head.weight")
        if not config.tie_embeddings and "lm_head.weight" not in state:
            raise ValueError(f"checkpoint {path} does not match its config: tie_embeddings is false but "
                             f"{_WEIGHTS_FILE} holds no lm_head.weight (a tied model's file)")
        strict = not config.tie_embeddings
        missing, unexpected = model.load_state_dict(state, strict=strict)
        if unexpected or (missing and missing != ["lm_head.weight"]):
            raise ValueError(f"checkpoint {path} does not match its config: missing {missing}, "
                             f"unexpected {unexpected}")
        return model.to(map_location)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of −log softmax(logits[:, t])[labels[:, t+1]] over positions whose label ≠ -100.

    ``label_smoothing`` ε scores against (1 − ε)·onehot + ε/V instead of the one-hot label
    (``torch.nn.functional.cross_entropy``'s definition). With no scored position at all the loss
    is an exact 0 that still carries a graph, rather than the 0/0 = NaN a plain mean would give.
    Computed in the logits' dtype promoted to at least fp32 (bf16/fp16 upcast, fp64 kept).
    ``labels`` may be any integer dtype.
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).to(dtype)
    shift_labels = labels[:, 1:].reshape(-1).long()  # cross_entropy wants int64 targets
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                            reduction="sum", label_smoothing=label_smoothing)
    count = (shift_labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)
