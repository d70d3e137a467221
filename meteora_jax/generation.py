"""Jitted text generation with the KV cache: prefill, decode loop, sampling and a routing trace.

Dimensions: B batch, P prompt slots (the prompt padded on the left to its bucket length),
N new tokens (max_new_tokens), S = P + N sequence / cache slots, V vocab, E eos ids,
k chosen adapters per token, W n-gram windows.

One jitted program runs the prefill and a `lax.while_loop` over the decode steps, so the
whole generation is compiled once per (batch, prompt bucket, max_new_tokens) and the static
switches (sampling top_k, no_repeat_ngram_size, routing top_k, return_routing, ...). Prompts
are left-padded to a bucket length (`prompt_bucket`), so prompts of different lengths share a
program; temperature, top_p, seed, EOS / pad ids and the routing temperature are traced
values, so changing them never recompiles. Greedy decoding (temperature 0) is a `lax.cond`
branch inside the program, not a Python switch.

With `on_token`, the same prefill and step functions are jitted one by one and driven from
the host, so a caller can print each token as it arrives (streaming).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.inputs import check_tokens, is_int, is_real, resolve_routing
from meteora_jax.modeling.llama import KVCache
from meteora_jax.ops.routing import Routing
from meteora_jax.settings import setting

# Prompt buckets: powers of two from _MIN_BUCKET to _BUCKET_STEP, then multiples of _BUCKET_STEP.
_MIN_BUCKET, _BUCKET_STEP = 16, 512


def prompt_bucket(length: int) -> int:
    """The padded prompt length that a prompt of `length` slots compiles for.

    Powers of two from 16 to 512, then multiples of 512: at most one program per bucket, and
    the padding never more than doubles the prefill (nor adds more than 511 slots).
    """
    if length <= _BUCKET_STEP:
        return max(_MIN_BUCKET, 1 << max(0, length - 1).bit_length())
    return -(-length // _BUCKET_STEP) * _BUCKET_STEP


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What to generate and how to pick tokens; validated on construction (errors name the setting).

    temperature 0 is greedy; otherwise logits / temperature, then top_k (0: off), then top_p
    (nucleus; 1: off), then a draw seeded by `seed`. Generation of a row stops after any of
    `eos_token_ids`; finished rows are filled with `pad_token_id`. no_repeat_ngram_size
    bans any token that would repeat an n-gram of the row (as transformers does, except that
    padding never forms n-grams; 0: off).
    """

    max_new_tokens: int = setting(128, "new tokens per prompt at most")
    temperature: float = setting(0.0, "sampling temperature (0: greedy)")
    top_p: float = setting(1.0, "nucleus sampling mass (1: off)")
    top_k: int = setting(0, "sample among the k most likely tokens (0: off)")
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int = setting(0, "the sampling draws")
    no_repeat_ngram_size: int = setting(0, "ban repeating any n-gram of this size (0: off)")

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k", "pad_token_id", "seed", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not is_int(value):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("top_k", "pad_token_id", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {self.seed}")
        if not (is_real(self.temperature) and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        bad = [e for e in self.eos_token_ids if not is_int(e) or e < 0]
        if bad:
            raise ConfigError(f"eos_token_id must be non-negative integers, got {list(self.eos_token_ids)}")

    def check_vocab(self, vocab_size: int) -> None:
        """Refuses EOS / pad ids the model cannot produce."""
        for name, ids in (("eos_token_id", self.eos_token_ids), ("pad_token_id", (self.pad_token_id,))):
            outside = [int(i) for i in ids if i >= vocab_size]
            if outside:
                raise ConfigError(f"{name} {outside[0]} is outside the vocabulary [0, {vocab_size})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """GenerationSettings as the program sees them: traced values, static switches."""

    temperature: jax.Array  # () float32
    top_p: jax.Array  # () float32
    seed: jax.Array  # () uint32
    eos_e: jax.Array  # (E,) int32, -1 where unused
    pad: jax.Array  # () int32
    top_k: int = dataclasses.field(metadata=dict(static=True), default=0)
    no_repeat_ngram_size: int = dataclasses.field(metadata=dict(static=True), default=0)

    @classmethod
    def of(cls, s: GenerationSettings, vocab_size: int) -> SamplingArrays:
        eos = list(s.eos_token_ids) or [-1]
        return cls(
            temperature=jnp.float32(s.temperature),
            top_p=jnp.float32(s.top_p),
            seed=jnp.uint32(s.seed),
            eos_e=jnp.asarray(eos, jnp.int32),
            pad=jnp.int32(s.pad_token_id),
            top_k=0 if s.top_k >= vocab_size else int(s.top_k),
            no_repeat_ngram_size=int(s.no_repeat_ngram_size),
        )


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """Static shape of one generation program (hashable: a jit cache key)."""

    max_new_tokens: int
    return_routing: bool
    output_logits: bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's carry. Slots [0, P) hold the prompt, slot P + i the i-th new token."""

    tokens_bs: jax.Array  # (B, S) int32, pad where nothing was generated
    real_bs: jax.Array  # (B, S) bool: prompt tokens, and new tokens up to and including EOS
    cache: KVCache
    logits_bv: jax.Array  # (B, V) float32: the logits for the next token
    done_b: jax.Array  # (B,) bool: the row has emitted EOS
    step: jax.Array  # () int32: new tokens written so far
    routing: dict[str, Routing] | None  # ids / weights (B, S, k)
    logits_bnv: jax.Array | None  # raw logits behind each new token
    prompt_length: int = dataclasses.field(metadata=dict(static=True), default=0)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """The result of `generate`.

    sequences: (B, P + N) int32, the prompt as given then the new tokens (pad after a row's
    EOS, and after the last step when every row stopped early). attention_mask: (B, P + N)
    int32, 1 on real tokens (the prompt's, then new tokens up to and including EOS).
    routing: {"layers.{i}.{projection}": Routing} with ids / weights (B, P + N, k), the model's
    routing of every token as it was fed (weights 0 where attention_mask is 0); None unless
    asked. logits: (B, N, V) float32 raw logits behind each new token (meaningless past a
    row's EOS, zero for steps never run); None unless asked.
    """

    sequences: jax.Array
    attention_mask: jax.Array
    prompt_length: int
    routing: dict[str, Routing] | None = None
    logits: jax.Array | None = None

    @property
    def new_tokens(self) -> jax.Array:
        """(B, N) the generated part of `sequences`."""
        return self.sequences[:, self.prompt_length :]

    @property
    def num_new_tokens(self) -> np.ndarray:
        """(B,) how many real tokens each row generated (EOS included)."""
        return np.asarray(self.attention_mask[:, self.prompt_length :]).sum(axis=-1)


# ------------------------------------------------------------------------------ token choice


def _ban_repeated_ngrams(logits_bv, tokens_bs, real_bs, cur, n: int):
    """Sets to -inf every token that would complete an n-gram already present in its row.

    Slots [0, cur) are written. Unlike transformers, windows over padding never match, so left
    padding (and the bucket's extra padding) cannot ban anything.
    """
    b, s = tokens_bs.shape
    w = s - n + 1
    prefix_bm = jax.lax.dynamic_slice(tokens_bs, (0, cur - (n - 1)), (b, n - 1))
    prefix_real_b = jnp.all(jax.lax.dynamic_slice(real_bs, (0, cur - (n - 1)), (b, n - 1)), axis=-1)
    match_bw = prefix_real_b[:, None] & (jnp.arange(w) < cur - n + 1)[None, :]
    for o in range(n):
        match_bw &= real_bs[:, o : o + w]
        if o < n - 1:
            match_bw &= tokens_bs[:, o : o + w] == prefix_bm[:, o : o + 1]
    banned_bw = tokens_bs[:, n - 1 : n - 1 + w]
    fill_bw = jnp.where(match_bw, -jnp.inf, jnp.inf).astype(logits_bv.dtype)
    return logits_bv.at[jnp.arange(b)[:, None], banned_bw].min(fill_bw)


def top_p_filter(logits_bv, top_p):
    """Keeps the smallest set of most likely tokens whose probability reaches top_p.

    transformers' rule, step for step: sort ascending, drop tokens while the cumulative mass
    stays <= 1 - top_p, always keep the most likely one. (Among tokens tied exactly at the edge
    of the nucleus, the stable sort keeps the highest ids; torch's unstable sort may differ.)
    """
    b, v = logits_bv.shape
    order_bv = jnp.argsort(logits_bv, axis=-1, stable=True)
    sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
    cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    drop_sorted_bv = (cum_bv <= 1 - top_p).at[:, -1].set(False)
    drop_bv = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order_bv].set(drop_sorted_bv)
    return jnp.where(drop_bv, -jnp.inf, logits_bv)


def _sample(logits_bv, key, sampling: SamplingArrays):
    logits_bv = logits_bv / sampling.temperature
    if sampling.top_k:
        kth_b = jax.lax.top_k(logits_bv, sampling.top_k)[0][:, -1]
        logits_bv = jnp.where(logits_bv < kth_b[:, None], -jnp.inf, logits_bv)
    logits_bv = jax.lax.cond(
        sampling.top_p < 1, lambda x: top_p_filter(x, sampling.top_p), lambda x: x, logits_bv
    )
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _next_tokens(logits_bv, s: DecodeState, sampling: SamplingArrays):
    """(B,) the next token of every row: greedy at temperature 0, else sampled."""
    if sampling.no_repeat_ngram_size:
        cur = s.prompt_length + s.step
        logits_bv = _ban_repeated_ngrams(
            logits_bv, s.tokens_bs, s.real_bs, cur, sampling.no_repeat_ngram_size
        )
    key = jax.random.fold_in(jax.random.key(sampling.seed), s.step)
    return jax.lax.cond(
        sampling.temperature > 0,
        lambda x: _sample(x, key, sampling),
        lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32),
        logits_bv,
    )


# ------------------------------------------------------------------------------ the program


def _write_routing(buffers, routes, start):
    return jax.tree.map(
        lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0)),
        buffers,
        routes,
    )


def _append(s: DecodeState, sampling: SamplingArrays) -> DecodeState:
    """Chooses the next token from `s.logits_bv` and writes it at slot P + step."""
    tok_b = _next_tokens(s.logits_bv, s, sampling)
    live_b = ~s.done_b
    tok_b = jnp.where(live_b, tok_b, sampling.pad)
    cur = s.prompt_length + s.step
    logits_bnv = s.logits_bnv
    if logits_bnv is not None:
        logits_bnv = jax.lax.dynamic_update_slice(logits_bnv, s.logits_bv[:, None], (0, s.step, 0))
    is_eos_b = jnp.any(tok_b[:, None] == sampling.eos_e[None, :], axis=-1)
    return dataclasses.replace(
        s,
        tokens_bs=jax.lax.dynamic_update_slice(s.tokens_bs, tok_b[:, None], (0, cur)),
        real_bs=jax.lax.dynamic_update_slice(s.real_bs, live_b[:, None], (0, cur)),
        done_b=s.done_b | (live_b & is_eos_b),
        step=s.step + 1,
        logits_bnv=logits_bnv,
    )


def _prefill(
    graphdef, params, ids_bp, mask_bp, sampling: SamplingArrays, routing, plan: GenerationPlan
) -> DecodeState:
    """Runs the prompt through the model into a fresh cache; keeps the next-token logits."""
    module = nnx.merge(graphdef, params)
    b, p = ids_bp.shape
    s_len = p + plan.max_new_tokens
    cache = KVCache.init(module.config, b, s_len, dtype=module.dtype)
    out = module(
        ids_bp, attention_mask=mask_bp, cache=cache, routing=routing, return_routing=plan.return_routing
    )
    buffers = None
    if plan.return_routing:
        buffers = jax.tree.map(lambda a: jnp.zeros((b, s_len, a.shape[-1]), a.dtype), out.routing)
        buffers = _write_routing(buffers, out.routing, 0)
    logits_bnv = None
    if plan.output_logits:
        logits_bnv = jnp.zeros((b, plan.max_new_tokens, module.config.vocab_size), jnp.float32)
    return DecodeState(
        tokens_bs=jnp.full((b, s_len), sampling.pad, jnp.int32).at[:, :p].set(ids_bp),
        real_bs=jnp.zeros((b, s_len), bool).at[:, :p].set(mask_bp.astype(bool)),
        cache=out.cache,
        logits_bv=out.logits[:, -1].astype(jnp.float32),
        done_b=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
        routing=buffers,
        logits_bnv=logits_bnv,
        prompt_length=p,
    )


def _step(
    graphdef, params, s: DecodeState, sampling: SamplingArrays, routing, plan: GenerationPlan
) -> DecodeState:
    """One decode step: pick the next token, then feed it (its logits and routing).

    Feeding the last new token too costs one forward pass per generation but gives its
    routing, and keeps the sampling code and the model once each in the compiled program.
    """
    s = _append(s, sampling)
    module = nnx.merge(graphdef, params)
    b = s.tokens_bs.shape[0]
    slot = s.prompt_length + s.step - 1
    new_b1 = jax.lax.dynamic_slice(s.tokens_bs, (0, slot), (b, 1))
    out = module(new_b1, cache=s.cache, routing=routing, return_routing=plan.return_routing)
    buffers = _write_routing(s.routing, out.routing, slot) if plan.return_routing else None
    return dataclasses.replace(
        s, cache=out.cache, logits_bv=out.logits[:, -1].astype(jnp.float32), routing=buffers
    )


def _running(s: DecodeState, plan: GenerationPlan):
    return (s.step < plan.max_new_tokens) & ~jnp.all(s.done_b)


@partial(jax.jit, static_argnames=("graphdef", "plan"))
def _generate_program(graphdef, params, ids_bp, mask_bp, sampling, routing, plan):
    """The whole generation as one program: prefill, then a while_loop over the steps."""
    s = _prefill(graphdef, params, ids_bp, mask_bp, sampling, routing, plan)
    return jax.lax.while_loop(
        partial(_running, plan=plan), lambda s: _step(graphdef, params, s, sampling, routing, plan), s
    )


# The prefill and one decode step as programs of their own: streaming drives them from the host,
# and `meteora-jax bench generate` times the prefill alone.
prefill_program = jax.jit(_prefill, static_argnames=("graphdef", "plan"))
step_program = jax.jit(_step, static_argnames=("graphdef", "plan"))


def _stepped(graphdef, params, ids_bp, mask_bp, sampling, routing, plan, on_token):
    """The same generation driven from the host, calling `on_token(tokens_b, live_b)` per step."""
    s = prefill_program(graphdef, params, ids_bp, mask_bp, sampling, routing, plan)
    while bool(_running(s, plan)):
        s = step_program(graphdef, params, s, sampling, routing, plan)
        slot = s.prompt_length + int(s.step) - 1
        on_token(np.asarray(s.tokens_bs[:, slot]), np.asarray(s.real_bs[:, slot]))
    return s


# ------------------------------------------------------------------------------ the public call


def _prompt_arrays(model, input_ids, attention_mask, max_new_tokens: int, pad: int):
    """Checks the prompt and pads it on the left to its bucket: (ids (B, P'), mask (B, P'), P)."""
    # Host copies: a prompt is checked value by value (check_tokens skips that for jax arrays).
    mask = None if attention_mask is None else np.asarray(attention_mask)
    tokens = check_tokens(np.asarray(input_ids), model.config.vocab_size, mask, left_padded=True)
    ids = tokens.input_ids
    mask = np.ones_like(ids) if tokens.attention_mask is None else tokens.attention_mask
    limit = model.config.max_position_embeddings
    longest = int(mask.sum(axis=-1).max())
    if longest > limit:
        raise MeteoRAError(f"a prompt of {longest} tokens exceeds max_position_embeddings={limit}")
    if longest + max_new_tokens > limit:
        raise MeteoRAError(
            f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens exceeds "
            f"max_position_embeddings={limit}"
        )
    p = ids.shape[1]
    extra = prompt_bucket(p) - p
    ids_bp = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad)
    mask_bp = np.pad(mask, ((0, 0), (extra, 0)))
    return jnp.asarray(ids_bp), jnp.asarray(mask_bp), p


def _check_ngram_size(n: int, prompt_length: int, max_new_tokens: int) -> None:
    """Refuses an n-gram longer than the whole sequence: it could never repeat (nor be sliced)."""
    length = prompt_length + max_new_tokens
    if n > length:
        raise ConfigError(
            f"no_repeat_ngram_size={n} is beyond the sequence length {length} (prompt {prompt_length} + "
            f"max_new_tokens={max_new_tokens}): use 0 (off) or a size up to {length}"
        )


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return tuple(model.config.eos_token_id)
    if is_int(eos_token_id):
        return (int(eos_token_id),)
    is_list = isinstance(eos_token_id, Sequence | np.ndarray) and not isinstance(eos_token_id, str)
    if is_list and all(is_int(e) for e in eos_token_id):
        return tuple(int(e) for e in eos_token_id)
    raise ConfigError(f"eos_token_id must be an integer or a list of integers, got {eos_token_id!r}")


def generate(
    model,
    input_ids,
    max_new_tokens: int = 32,
    attention_mask=None,
    temperature: float = GenerationSettings.temperature,
    top_p: float = GenerationSettings.top_p,
    top_k: int = GenerationSettings.top_k,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = GenerationSettings.seed,
    no_repeat_ngram_size: int = GenerationSettings.no_repeat_ngram_size,
    return_routing: bool = False,
    routing_top_k: int | None = None,
    routing_temperature: float | None = None,
    adapter_ids=None,
    *,
    pad_token_id: int | None = None,
    output_logits: bool = False,
    on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each (left-padded) prompt row.

    model: a `MeteoRAModel` (fused or base). input_ids: (B, P) int; attention_mask: (B, P),
    0 marks left padding. temperature 0 is greedy; top_k (0: off) and top_p (1: off) filter
    the sampled distribution, drawn reproducibly from `seed`. eos_token_id: an id or ids that
    end a row (None: the model config's; [] never stops); finished rows are filled with
    pad_token_id (default: the config's, else the first EOS id, else 0).
    no_repeat_ngram_size: as transformers (0: off). return_routing: add the routing of every
    prompt and new token. routing_top_k / routing_temperature: override the model's routing
    defaults for this call. adapter_ids: (B,) one adapter per row, bypassing the gates (-1: the
    base model). output_logits: keep the raw logits behind each new token. on_token: called
    with (tokens (B,), live (B,) bool) after each step (streaming; runs the steps from the host).
    Raises ConfigError / MeteoRAError naming the setting at fault.
    """
    config = model.config
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_token_ids=eos,
        pad_token_id=pad_token_id,
        seed=seed,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    settings.check_vocab(config.vocab_size)
    ids_bp, mask_bp, p = _prompt_arrays(model, input_ids, attention_mask, max_new_tokens, pad_token_id)
    _check_ngram_size(no_repeat_ngram_size, p, max_new_tokens)
    b, p_slots = ids_bp.shape
    what = f"generate({b} prompts padded to {p_slots} tokens, max_new_tokens={max_new_tokens})"
    model.check_cache_fits(b, p_slots + max_new_tokens, what)
    routing = resolve_routing(
        model.moe,
        ids_bp.shape[0],
        top_k=routing_top_k,
        temperature=routing_temperature,
        adapter_ids=adapter_ids,
        return_routing=return_routing,
        prefix="routing_",
    )
    plan = GenerationPlan(int(max_new_tokens), bool(return_routing), bool(output_logits))
    sampling = SamplingArrays.of(settings, config.vocab_size)
    graphdef, params = nnx.split(model.module)
    args = (graphdef, params, ids_bp, mask_bp, sampling, routing, plan)
    s = _generate_program(*args) if on_token is None else _stepped(*args, on_token)
    return _output(s, ids_bp.shape[1] - p, p)


def _output(s: DecodeState, offset: int, p: int) -> GenerateOutput:
    """Drops the bucket's padding columns; zeroes routing weights on padding."""
    real_bs = s.real_bs[:, offset:]
    routing = None
    if s.routing is not None:
        routing = {
            key: Routing(ids=r.ids[:, offset:], weights=r.weights[:, offset:] * real_bs[..., None])
            for key, r in s.routing.items()
        }
    return GenerateOutput(
        sequences=s.tokens_bs[:, offset:],
        attention_mask=real_bs.astype(jnp.int32),
        prompt_length=p,
        routing=routing,
        logits=s.logits_bnv,
    )
