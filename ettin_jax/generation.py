"""Generation: a KV-cached, jitted sampler with transformers' `generate` semantics, mixed into
the causal LM as `GenerationMixin` (as transformers does). It runs the model it is mixed into
through the model's own forward pass with a cache (`model.model(..., past_key_values=...)`) and
its `logits`; it imports the cache and the sampling, never the model.

`generate` runs one jitted program: a prefill over the (left-padded) prompts, then a
`lax.while_loop` of decode steps that stops when every row has produced EOS or the token
budget is spent. `generate_stream` runs the same prefill and decode step from Python, one
step at a time, and yields each step's tokens.

Stop strings are text, which only the host can read (through the tokenizer): with
`stop_strings`, `generate` runs the same decode loop `STOP_CHECK_STEPS` steps per program, and
between programs reads each row's new text (`detokenize.TextStream`); a row that has made a stop
string is marked done, as if it had made EOS, so no row decodes more than a chunk past its stop.
The tokens are those of a run without stop strings, cut after the one that completed the stop.

With `output_scores` (or `output_logits`) the loop also keeps each step's processed (or raw)
logits and the chosen tokens' log-probabilities; see `GenerateDecoderOnlyOutput`.

Shapes are bucketed (prompt length, new tokens and batch each rounded up to a power of two)
so that a stream of different prompts reuses a handful of compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ettin_jax import compilation, sharding
from ettin_jax.cache import Cache
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.detokenize import TextStream
from ettin_jax.errors import EttinError
from ettin_jax.inputs import Errors, describe, flag, integer, is_integer, to_array, token_list
from ettin_jax.padding import Padded, bucket, left_pad
from ettin_jax.platforms import on_cpu
from ettin_jax.sampling import SamplingConfig, choose, process_logits

Array = jax.Array

DEFAULT_MAX_NEW_TOKENS = 20
# Decode steps between two reads of the text with stop strings: the most steps a row may decode
# past its stop (then cut), against a host round trip per chunk.
STOP_CHECK_STEPS = 8


class GenerationError(EttinError, ValueError):
    """Generation arguments that cannot work, named in the message."""


class GenerationTypeError(GenerationError, TypeError):
    """A generation argument of the wrong type (a string seed, a float token id): also a `TypeError`."""


ERRORS: Errors = (GenerationError, GenerationTypeError)


# ---- preparing a batch --------------------------------------------------------------------
def _is_row(x: Any) -> bool:
    return isinstance(x, (list, tuple, np.ndarray, jax.Array))


def prompts_from(input_ids: Any, attention_mask: Any) -> list[list[int]]:
    """Rows of `input_ids` without their padding (left or right), or a list of token lists (of
    any lengths); a 1-D array or a flat list is one prompt. An error names the argument, and for
    an item that is not an integer token id (a float, even 3.0, a bool, a string), its place."""
    if isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise GenerationError("input_ids is empty: no prompts given")
        rows = [_is_row(row) for row in input_ids]
        if all(rows):  # token lists, each its own length
            if attention_mask is not None:
                raise GenerationError("pass attention_mask only with a 2-D input_ids array")
            return [token_list(row, f"input_ids[{i}]", errors=ERRORS) for i, row in enumerate(input_ids)]
        if any(rows):
            i = rows.index(False)
            raise GenerationTypeError(
                f"input_ids[{i}] must be a list of token ids like input_ids[{rows.index(True)}], got {describe(input_ids[i])}"
            )
        input_ids = np.asarray(token_list(input_ids, "input_ids", errors=ERRORS))  # one prompt
    if not isinstance(input_ids, (np.ndarray, jax.Array)):
        raise GenerationTypeError(
            f"input_ids must be token ids (a 2-D integer array or a list of token-id lists), got {describe(input_ids)}"
        )
    ids = np.asarray(to_array(input_ids, "input_ids", "integers", errors=ERRORS))
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise GenerationError(f"input_ids must have shape (batch, length), got {ids.shape}")
    if not ids.shape[0]:
        raise GenerationError(f"input_ids is empty: no prompts given (shape {ids.shape})")
    if attention_mask is None:
        return [row.tolist() for row in ids]
    mask = np.asarray(to_array(attention_mask, "attention_mask", "mask", errors=ERRORS))
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise GenerationError(f"attention_mask has shape {mask.shape}; expected {ids.shape} like input_ids")
    bad = ~np.isin(mask, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise GenerationError(
            f"attention_mask[{row}, {col}] = {mask[row, col]}: attention_mask must hold 1 for prompt tokens and 0 "
            "for padding, nothing else"
        )
    mask = mask.astype(bool)
    return [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


# ---- the jitted pieces --------------------------------------------------------------------
def _prompt_tokens(ids: Array, valid: Array, vocab: int) -> Array:
    """(B, V) bool: which ids each prompt holds (what the repetition penalty counts)."""
    return jnp.zeros((ids.shape[0], vocab), bool).at[jnp.arange(ids.shape[0])[:, None], ids].max(valid)


_prompt_tokens_program = compilation.jit(_prompt_tokens, static_argnames=("vocab",))


def _prefill(model: Any, ids: Array, valid: Array, cache_length: int, kernel: Array) -> tuple[Array, Array, Cache]:
    """Logits (B, V) float32 for the first new token, each row's next position, and the cache,
    preallocated for `cache_length` tokens. `kernel`: `model.output_kernel()`, taken once per
    generation."""
    batch, length = ids.shape
    positions = jnp.where(valid, jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)
    # Padding embeds as token 0: a pad id outside the vocabulary would embed as NaN, and masked
    # NaN keys still poison attention (0 * NaN).
    # Left padding puts every row's last real token in the last column: only its state is needed.
    out = model.model(
        jnp.where(valid, ids, 0), valid, positions, use_cache=True, rows=jnp.full((batch, 1), length - 1, jnp.int32)
    )
    logits = model.logits(out.last_hidden_state, kernel)[:, 0].astype(jnp.float32)
    return logits, positions[:, -1] + 1, out.past_key_values.preallocate(model.config, cache_length)


def _step(model: Any, tokens: Array, positions: Array, cache: Cache, kernel: Array) -> tuple[Array, Cache]:
    """Feeds one token per row (at sequence index `cache.length`, position `positions` (B,));
    returns the next logits (B, V) float32 and the cache."""
    out = model.model(tokens[:, None], position_ids=positions[:, None], past_key_values=cache)
    return model.logits(out.last_hidden_state, kernel)[:, 0].astype(jnp.float32), out.past_key_values


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program."""

    sampling: tuple[bool, ...]
    eos_ids: tuple[int, ...]
    pad_id: int
    new_bucket: int
    scores: bool = False  # keep each step's processed logits and the chosen tokens' log-probabilities
    logits: bool = False  # keep each step's raw logits


def _choose_next(logits, seen, step, min_new, key, values, static: _Static) -> tuple[Array, Array]:
    """The next tokens (B,), and the processed logits (B, V) they were chosen from."""
    eos = jnp.asarray(static.eos_ids, jnp.int32)
    block_eos = jnp.broadcast_to(step < min_new, logits.shape[:1])
    processed = process_logits(logits, static.sampling, values, seen, eos, block_eos)
    return choose(processed, static.sampling[0], jax.random.fold_in(key, step)), processed


def _finish(tokens, done, seen, static: _Static):
    eos = jnp.asarray(static.eos_ids, jnp.int32)
    tokens = jnp.where(done, static.pad_id, tokens)
    done = done | jnp.isin(tokens, eos)
    seen = seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    return tokens, done, seen


class _Decoding(NamedTuple):
    """Decoding between two steps; `step` counts the new tokens made (the next one's index)."""

    step: Array  # () int32
    done: Array  # (B,) bool: the row has ended (EOS, or a stop string seen by the host); pad from now on
    seen: Array  # (B, V) bool: the row's tokens so far (repetition penalty)
    logits: Array  # (B, V) float32, for the next token
    positions: Array  # (B,) int32, of the next token
    cache: Cache


class _Outputs(NamedTuple):
    """What a stretch of decode steps made, a column per step (from the stretch's first)."""

    tokens: Array  # (B, W) int32, pad after a row's end
    scores: Array | None  # (B, W, V) float32: the processed logits, with output_scores
    logits: Array | None  # (B, W, V) float32: the raw logits, with output_logits
    logprobs: Array | None  # (B, W) float32: log_softmax(scores) of the chosen token, 0 on padding


def _decode(model, kernel, d: _Decoding, width: int, end, min_new, values, key, static: _Static):
    """Decode steps from `d.step` until step `end` or until every row is done, in a
    `lax.while_loop`; returns the `_Decoding` after them and their `_Outputs`, `width` columns
    (at most `width` steps). What `generate` runs for all its steps, or a chunk at a time."""
    batch, vocab = d.logits.shape
    start = d.step
    outputs = _Outputs(
        jnp.full((batch, width), static.pad_id, jnp.int32),
        jnp.zeros((batch, width, vocab), jnp.float32) if static.scores else None,
        jnp.zeros((batch, width, vocab), jnp.float32) if static.logits else None,
        jnp.zeros((batch, width), jnp.float32) if static.scores else None,
    )

    def cond(carry):
        d, _ = carry
        return (d.step < end) & ~jnp.all(d.done)

    def body(carry):
        d, out = carry
        tokens, processed = _choose_next(d.logits, d.seen, d.step, min_new, key, values, static)
        live = ~d.done
        tokens, done, seen = _finish(tokens, d.done, d.seen, static)

        def put(buffer, value):  # value (B, ...) into column `step - start` of buffer (B, W, ...)
            if buffer is None:
                return None
            return jax.lax.dynamic_update_slice_in_dim(buffer, value[:, None], d.step - start, axis=1)

        logprobs = None
        if static.scores:  # what transformers' compute_transition_scores(normalize_logits=True) gives
            chosen = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), tokens[:, None], axis=-1)[:, 0]
            logprobs = jnp.where(live, chosen, 0.0)
        out = _Outputs(put(out.tokens, tokens), put(out.scores, processed), put(out.logits, d.logits),
                       put(out.logprobs, logprobs))  # fmt: skip
        logits, cache = _step(model, tokens, d.positions, d.cache, kernel)
        return _Decoding(d.step + 1, done, seen, logits, d.positions + 1, cache), out

    return jax.lax.while_loop(cond, body, (d, outputs))


@functools.partial(compilation.jit, static_argnames=("graphdef", "static"), donate_argnames=())
def _generate_program(graphdef, state, kernel, ids, valid, active, max_new, min_new, values, key, *, static: _Static):
    """Prefill and every decode step: the `_Outputs` (B, new_bucket) and how many steps ran."""
    model = nnx.merge(graphdef, state)
    kernel = model.output_kernel() if kernel is None else kernel  # see _output_kernel
    logits, positions, cache = _prefill(model, ids, valid, ids.shape[1] + static.new_bucket, kernel)
    seen = _prompt_tokens(ids, valid, logits.shape[-1])
    start = _Decoding(jnp.int32(0), ~active, seen, logits, positions, cache)
    d, outputs = _decode(model, kernel, start, static.new_bucket, max_new, min_new, values, key, static)
    return outputs, d.step


@functools.partial(compilation.jit, static_argnames=("graphdef", "static", "width"), donate_argnames=("d",))
def _chunk_program(graphdef, state, kernel, d: _Decoding, end, min_new, values, key, *, static: _Static, width: int):
    """At most `width` decode steps from `d` (see `_decode`): `generate` with stop strings."""
    return _decode(nnx.merge(graphdef, state), kernel, d, width, end, min_new, values, key, static)


@functools.partial(compilation.jit, static_argnames=("graphdef", "cache_length"))
def _prefill_program(graphdef, state, kernel, ids, valid, *, cache_length: int):
    """Logits, positions, the cache, and the output kernel when it derived it itself (None when
    given: returning an input from jit would copy it)."""
    model = nnx.merge(graphdef, state)
    derived = model.output_kernel() if kernel is None else None
    return (*_prefill(model, ids, valid, cache_length, derived if kernel is None else kernel), derived)


@functools.partial(compilation.jit, static_argnames=("graphdef", "static"), donate_argnames=("cache",))
def _stream_program(graphdef, state, kernel, logits, seen, done, positions, cache, step, min_new, values, key, *,
                    static: _Static):  # fmt: skip
    model = nnx.merge(graphdef, state)
    tokens, _ = _choose_next(logits, seen, step, min_new, key, values, static)
    tokens, done, seen = _finish(tokens, done, seen, static)
    logits, cache = _step(model, tokens, positions, cache, kernel)
    return tokens, logits, seen, done, positions + 1, cache


# ---- the output kernel, kept across calls on CPU ---------------------------------------------
@functools.partial(compilation.jit, static_argnames=("graphdef",))
def _output_kernel_program(graphdef, state):
    return nnx.merge(graphdef, state).output_kernel()


# model -> (weak references to the state's arrays it was derived from, the (D, V) kernel)
_KEPT_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _output_kernel(model: Any, graphdef: Any, state: Any) -> Array | None:
    """On CPU, the model's (D, V) `output_kernel()`, derived at the first call and kept while its
    state holds the same arrays; elsewhere None, and each program derives it itself.

    Why only on CPU: there XLA materializes the transposed copy of the tied (V, D) embedding at
    every call, where GPU and TPU read a transposed operand in place. Kept, the 17m shape
    generates 1.31x faster at batch 1 and 1.07x at batch 16 (benchmarks/RESULTS.md, 2026-11-30).
    The cost: a copy of the vocabulary projection while the model lives (51 MB for 17m in float32).
    A state with leaves other than plain arrays (variables updated in place) is not kept."""
    if not on_cpu():
        return None
    if model.decoder.kernel is not None:  # untied: the kernel is already (D, V)
        return model.output_kernel()
    leaves = jax.tree.leaves(state)
    if not all(isinstance(x, jax.Array) for x in leaves):  # e.g. jax.Ref
        return _output_kernel_program(graphdef, state)  # identity says nothing about in-place updates
    kept = _KEPT_KERNELS.get(model)
    # A dead reference reads None: an array freed since, even if a new one took its address.
    if kept is not None:
        refs, kernel = kept
        if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves, strict=True)):
            return kernel
    kernel = _output_kernel_program(graphdef, state)
    _KEPT_KERNELS[model] = ([weakref.ref(x) for x in leaves], kernel)
    return kernel


# ---- the user-facing functions ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Request:
    batch: Padded
    sampling: SamplingConfig
    static: _Static
    max_new: int
    min_new: int
    seed: int
    mesh: Any  # the model's mesh, or None
    stop_strings: tuple[str, ...] | None = None
    tokenizer: Any = None  # what the stop strings are read with


@dataclasses.dataclass(frozen=True)
class GenerateDecoderOnlyOutput:
    """What `generate(..., return_dict_in_generate=True)` returns, named as transformers names
    it. A finished row's scores and logits past its end are whatever was computed there (for
    the pad tokens fed to it, or with stop strings up to `STOP_CHECK_STEPS` steps of the
    continuation it was cut from): they mean nothing, as transformers' do there."""

    sequences: np.ndarray  # (B, prompt + new) int32: what `generate` returns without return_dict_in_generate
    # With output_scores, one (B, V) float32 array per new token: the logits after the logits
    # processors (repetition penalty, min_new_tokens, temperature, top-k, top-p, min-p), those the
    # token was chosen from, as transformers' `scores`; -inf where a filter removed a token.
    scores: tuple[np.ndarray, ...] | None = None
    logits: tuple[np.ndarray, ...] | None = None  # with output_logits: the raw logits, one (B, V) per token
    # With output_scores, (B, new) float32: each chosen token's log-probability under its step's
    # scores (their log-softmax: the distribution it was chosen from, not the model's raw one),
    # as transformers' `compute_transition_scores(sequences, scores, normalize_logits=True)`; 0 on
    # the padding after a row's end (transformers gives the pad token's log-probability there),
    # so that a row's sum is its sequence's log-probability.
    logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """How to generate, with transformers' names and defaults; `generate(**kwargs)` overrides
    any of them. The sampling fields (do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty) are `SamplingConfig`'s. Every field is checked as the config is made (a
    `GenerationError` naming it; a `GenerationTypeError` for a wrong type); what depends on the
    model or the prompt (the vocabulary, the context) is checked by `resolve`."""

    max_new_tokens: int | None = None  # default: DEFAULT_MAX_NEW_TOKENS, or what max_length leaves
    max_length: int | None = None  # prompt + new tokens
    min_new_tokens: int = 0
    num_return_sequences: int = 1
    eos_token_id: int | Sequence[int] | None = None  # default: the model config's
    pad_token_id: int | None = None  # default: the model config's, else the first EOS
    seed: int = 0
    # A row ends at the token that completes one of these (kept, as transformers does); needs
    # `tokenizer=` at the call. A string or a list of them; stored as a tuple, None when empty.
    stop_strings: str | Sequence[str] | None = None
    return_dict_in_generate: bool = False  # `generate` returns a GenerateDecoderOnlyOutput
    output_scores: bool = False  # ... with its scores and logprobs
    output_logits: bool = False  # ... with its raw logits

    _errors: ClassVar[Errors] = ERRORS

    def __post_init__(self) -> None:
        super().__post_init__()
        optional = lambda value, check: None if value is None else check(value)  # noqa: E731
        eos = self.eos_token_id
        if eos is not None and not is_integer(eos):
            if isinstance(eos, (str, bytes)) or not _is_row(eos):
                raise GenerationTypeError(f"eos_token_id must be a token id or a list of them, got {describe(eos)}")
            eos = token_list(eos, "eos_token_id", errors=ERRORS)
        fields = {
            "max_new_tokens": optional(self.max_new_tokens, lambda v: integer(v, "max_new_tokens", 0, errors=ERRORS)),
            "max_length": optional(self.max_length, lambda v: integer(v, "max_length", 1, errors=ERRORS)),
            "min_new_tokens": integer(self.min_new_tokens, "min_new_tokens", 0, errors=ERRORS),
            "num_return_sequences": integer(
                self.num_return_sequences, "num_return_sequences", 1, must="a positive integer", errors=ERRORS
            ),
            "eos_token_id": int(eos) if is_integer(eos) else eos,
            # Any int32: a pad id outside the vocabulary only pads the output (see _prefill).
            "pad_token_id": optional(self.pad_token_id, lambda v: integer(v, "pad_token_id", errors=ERRORS)),
            "seed": integer(self.seed, "seed", bits=64, errors=ERRORS),
            "stop_strings": _stop_strings(self.stop_strings),
            **{name: flag(getattr(self, name), name, errors=ERRORS) for name in _OUTPUTS},
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> GenerationConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise GenerationError(f"generate() got unknown argument(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


_OUTPUTS = ("return_dict_in_generate", "output_scores", "output_logits")


def _stop_strings(value: Any) -> tuple[str, ...] | None:
    """`stop_strings` as a tuple of non-empty strings (None for none), or an error naming it."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise GenerationTypeError(f"stop_strings must be a string or a list of strings, got {describe(value)}")
    for i, text in enumerate([value] if isinstance(value, str) else value):
        where = "stop_strings" if isinstance(value, str) else f"stop_strings[{i}]"
        if not isinstance(text, str):
            raise GenerationTypeError(f"{where} must be a string, got {describe(text)}")
        if not text:
            raise GenerationError(f"{where} is an empty string, which every text contains: give non-empty stop strings")
    return (value,) if isinstance(value, str) else tuple(value) or None


def check_tokenizer(c: GenerationConfig, tokenizer: Any) -> None:
    """Stop strings are found in the decoded text: with `stop_strings`, a `GenerationError`
    naming `tokenizer` when none is given (transformers requires it too), a
    `GenerationTypeError` when it cannot decode."""
    if c.stop_strings is None:
        return
    if tokenizer is None:
        raise GenerationError(
            "stop_strings needs tokenizer=: the stop strings are found in the decoded text, as in transformers "
            "(generate(ids, stop_strings=[...], tokenizer=tokenizer))"
        )
    if not callable(getattr(tokenizer, "decode", None)):
        raise GenerationTypeError(f"tokenizer must be a tokenizer with a decode method, got {describe(tokenizer)}")


def tokens_only(c: GenerationConfig, caller: str) -> None:
    """A `GenerationError` naming the options of `generate`'s output object, for a `caller`
    that returns tokens or text only (the stream, the engine, the pipelines)."""
    asked = [name for name in _OUTPUTS if getattr(c, name)]
    if asked:
        raise GenerationError(f"{', '.join(asked)}: {caller} returns no scores; model.generate does")


def configure(generation_config: GenerationConfig | None, **kwargs: Any) -> GenerationConfig:
    """`generation_config` (default: `GenerationConfig()`) with `kwargs` replacing its fields:
    what `generate`, `generate_stream` and the engine's `submit` take."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise GenerationTypeError(f"generation_config must be a GenerationConfig, got {describe(generation_config)}")
    return (generation_config or GenerationConfig()).replace(**kwargs)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, names: Sequence[str] | None = None) -> None:
    """A `GenerationError` naming the first prompt that is empty or holds an id outside the
    vocabulary, and the id's place. `names`: how each prompt is named (default input_ids[i])."""
    if not prompts:
        raise GenerationError("no prompts given")
    for i, prompt in enumerate(prompts):
        name = f"input_ids[{i}]" if names is None else names[i]
        if not len(prompt):
            raise GenerationError(f"prompt {i} is empty ({name}): generation needs at least one token (e.g. BOS)")
        for j, token in enumerate(prompt):
            if not 0 <= token < vocab_size:
                raise GenerationError(
                    f"prompt {i} has token id {token} outside the vocabulary [0, {vocab_size}) at {name}[{j}]"
                )


@dataclasses.dataclass(frozen=True)
class Limits:
    """A `GenerationConfig` resolved for a model and a prompt width."""

    max_new: int
    eos: tuple[int, ...]
    pad: int


def resolve(config: ModernBertDecoderConfig, c: GenerationConfig, width: int, context: int | None = None) -> Limits:
    """The new-token budget, EOS ids and pad id for prompts of `width` tokens, or a
    `GenerationError` naming the argument that cannot work. `context`: the most tokens a row
    may hold (default: max_position_embeddings)."""
    context = config.max_position_embeddings if context is None else context
    copies = c.num_return_sequences
    if copies > 1 and not c.do_sample:
        raise GenerationError(
            f"num_return_sequences={copies} with greedy decoding would return identical copies; pass do_sample=True"
        )
    max_new = c.max_new_tokens
    if max_new is None and c.max_length is not None:
        max_new = c.max_length - width
        if max_new <= 0:
            raise GenerationError(f"max_length={c.max_length} leaves no room after the {width}-token prompt")
    max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new
    if c.min_new_tokens > max_new:
        source = "" if c.max_new_tokens is not None else (
            " (what max_length leaves)" if c.max_length is not None else " (the default)")  # fmt: skip
        raise GenerationError(f"min_new_tokens={c.min_new_tokens} exceeds max_new_tokens={max_new}{source}")
    if width + max_new > context:
        limit = "max_position_embeddings" if context == config.max_position_embeddings else "the engine's max_length"
        raise GenerationError(f"a {width}-token prompt plus {max_new} new tokens exceeds {limit} ({context})")
    if c.eos_token_id is None:
        eos = config.eos_token_ids
    else:
        eos = (c.eos_token_id,) if isinstance(c.eos_token_id, int) else tuple(c.eos_token_id)
    for i, token in enumerate(eos):
        if not 0 <= token < config.vocab_size:
            where = "" if isinstance(c.eos_token_id, int) or c.eos_token_id is None else f" (eos_token_id[{i}])"
            raise GenerationError(f"eos_token_id {token} is outside the vocabulary [0, {config.vocab_size}){where}")
    pad = c.pad_token_id
    if pad is None:
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return Limits(max_new, eos, int(pad))


def _prepare(
    model: Any, state: Any, input_ids: Any, attention_mask: Any, c: GenerationConfig, tokenizer: Any = None
) -> _Request:
    """Checks the arguments of `generate` and prepares the batch. `state` is the model's
    `nnx.split` state (where its mesh is read from)."""
    check_tokenizer(c, tokenizer)
    prompts = prompts_from(input_ids, attention_mask)
    check_prompts(prompts, model.config.vocab_size)
    limits = resolve(model.config, c, max(len(p) for p in prompts))
    prompts = [p for p in prompts for _ in range(c.num_return_sequences)]
    mesh = sharding.mesh_of(state)
    batch = left_pad(prompts, limits.pad, batch_multiple=sharding.batch_ways(mesh))
    static = _Static(c.static(), limits.eos, limits.pad, bucket(limits.max_new), c.output_scores, c.output_logits)
    return _Request(batch, c, static, limits.max_new, c.min_new_tokens, c.seed, mesh, c.stop_strings, tokenizer)


def _place(mesh: Any, rows: dict[str, Any], shared: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a mesh: `rows` split over its batch axes, `shared` replicated; without one, as given."""
    if mesh is None:
        return rows, shared
    replicated = NamedSharding(mesh, PartitionSpec())
    return sharding.put_batch(rows, mesh), jax.tree.map(lambda x: sharding.put(x, replicated), shared)


class _StopWatch:
    """The host's watch over each row's new tokens for stop strings, which the device cannot
    see (they are text): a `TextStream` per row. A row ends at its EOS or at the token that
    completes a stop string; `feed` says which of the tokens that come belong to their row."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], rows: int, eos: Sequence[int]):
        self.texts = [TextStream(tokenizer, stop_strings) for _ in range(rows)]
        self.eos = list(eos)
        self.ended = np.zeros(rows, bool)
        self.lengths = np.zeros(rows, np.int64)  # each row's new tokens through its end, so far

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (rows, n): each row's next n tokens. Returns (rows, n) bool: which of them are
        the row's, through its EOS or the token that completes a stop string (the others are
        padding, or made past the stop: they become padding)."""
        kept = np.zeros(tokens.shape, bool)
        for r, row in enumerate(tokens):
            if self.ended[r]:
                continue
            at_eos = np.flatnonzero(np.isin(row, self.eos))
            upto = int(at_eos[0]) + 1 if at_eos.size else len(row)
            n = self.texts[r].until_stop(row[:upto].tolist())
            kept[r, :n] = True
            self.lengths[r] += n
            self.ended[r] = self.texts[r].stopped or bool(at_eos.size)
        return kept


class GenerationMixin:
    """`generate` and `generate_stream` for the causal LM, with transformers' arguments."""

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        *,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> np.ndarray | GenerateDecoderOnlyOutput:
        """Token ids (batch * num_return_sequences, prompt + new), prompts left-padded; rows that
        finished early are padded with `pad_token_id` after their EOS. `input_ids`: a 2-D array
        (with `attention_mask` for padding) or a list of token lists. `kwargs`: any field of
        `GenerationConfig` (max_new_tokens, do_sample, temperature, top_k, top_p, seed, ...).

        `stop_strings` (with `tokenizer=`, as in transformers): a row also ends at the token that
        completes one of them in its new text. That token is kept, so the text of the ids holds
        the stop string (the pipelines' text ends before it), and padding follows as after EOS.
        The tokens are those made without stop strings, cut there.

        `return_dict_in_generate=True` returns a `GenerateDecoderOnlyOutput` instead: the ids as
        `sequences`, with `output_scores=True` each step's processed logits (`scores`) and the
        chosen tokens' log-probabilities (`logprobs`), with `output_logits=True` the raw logits."""
        graphdef, state = nnx.split(self)
        config = configure(generation_config, **kwargs)
        request = _prepare(self, state, input_ids, attention_mask, config, tokenizer)
        batch = request.batch
        if request.stop_strings:
            outputs = self._generate_in_chunks(graphdef, state, request)
        else:
            outputs = self._generate_at_once(graphdef, state, request)
        prompt = batch.ids[: batch.rows, batch.ids.shape[1] - batch.width :]
        sequences = np.concatenate([prompt, outputs.tokens], axis=1)
        if not config.return_dict_in_generate:
            return sequences
        steps = lambda x: None if x is None else tuple(x[:, i] for i in range(x.shape[1]))  # noqa: E731
        return GenerateDecoderOnlyOutput(sequences, steps(outputs.scores), steps(outputs.logits), outputs.logprobs)

    def _generate_at_once(self, graphdef: Any, state: Any, request: _Request) -> _Outputs:
        """Every step in one program; the host `_Outputs` of the real rows and the steps run."""
        batch = request.batch
        active = np.arange(batch.ids.shape[0]) < batch.rows
        rows, shared = _place(
            request.mesh,
            {"ids": batch.ids, "valid": batch.mask, "active": active},
            {"max_new": np.int32(request.max_new), "min_new": np.int32(request.min_new),
             "values": request.sampling.values(), "key": jax.random.key(request.seed)},
        )  # fmt: skip
        with sharding.activate(request.mesh):
            out, steps = _generate_program(
                graphdef, state, _output_kernel(self, graphdef, state), rows["ids"], rows["valid"], rows["active"],
                shared["max_new"], shared["min_new"], shared["values"], shared["key"], static=request.static,
            )  # fmt: skip
        steps = int(sharding.to_host(steps))
        return jax.tree.map(lambda x: sharding.to_host(x)[: batch.rows, :steps], out)

    def _generate_in_chunks(self, graphdef: Any, state: Any, request: _Request) -> _Outputs:
        """`STOP_CHECK_STEPS` steps per program, the text read on the host in between: a row
        that has made a stop string is done from the next chunk on, and what it made in this
        one after the stop becomes padding. The host `_Outputs` of the real rows, through the
        last row's end."""
        batch, static, mesh = request.batch, request.static, request.mesh
        watch = _StopWatch(request.tokenizer, request.stop_strings, batch.rows, static.eos_ids)
        parts, start = [], 0  # start: the step the next chunk begins at
        d, kernel, shared = self._begin(graphdef, state, request)
        with sharding.activate(mesh):
            while True:  # at least once: max_new_tokens=0 still gives (rows, 0) outputs
                end = _place(mesh, {}, {"end": np.int32(min(start + STOP_CHECK_STEPS, request.max_new))})[1]["end"]
                d, out = _chunk_program(
                    graphdef, state, kernel, d, end, shared["min_new"], shared["values"], shared["key"],
                    static=static, width=STOP_CHECK_STEPS,
                )  # fmt: skip
                ran = int(sharding.to_host(d.step)) - start
                out = _Outputs(*(None if x is None else sharding.to_host(x)[: batch.rows, :ran] for x in out))
                kept = watch.feed(out.tokens)
                logprobs = None if out.logprobs is None else np.where(kept, out.logprobs, 0.0)
                parts.append(out._replace(tokens=np.where(kept, out.tokens, static.pad_id), logprobs=logprobs))
                start += ran
                if start >= request.max_new or watch.ended.all():
                    break
                done = sharding.to_host(d.done).copy()
                done[: batch.rows] |= watch.ended
                d = d._replace(done=_place(mesh, {"done": done}, {})[0]["done"])
        whole = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *parts)
        return jax.tree.map(lambda x: x[:, : watch.lengths.max()], whole)

    def _begin(self, graphdef: Any, state: Any, request: _Request) -> tuple[_Decoding, Array, dict[str, Any]]:
        """The prefill of `request`'s prompts, as the `_Decoding` before the first step; the
        output kernel; and the values every step shares, placed on the mesh."""
        batch, static, mesh = request.batch, request.static, request.mesh
        rows, shared = _place(
            mesh,
            {"ids": batch.ids, "valid": batch.mask, "done": np.arange(batch.ids.shape[0]) >= batch.rows},
            {"step": np.int32(0), "min_new": np.int32(request.min_new), "values": request.sampling.values(),
             "key": jax.random.key(request.seed)},
        )  # fmt: skip
        with sharding.activate(mesh):
            kernel = _output_kernel(self, graphdef, state)
            logits, positions, cache, derived = _prefill_program(
                graphdef, state, kernel, rows["ids"], rows["valid"], cache_length=batch.ids.shape[1] + static.new_bucket
            )
            kernel = derived if kernel is None else kernel
            seen = _prompt_tokens_program(rows["ids"], rows["valid"], logits.shape[-1])
        return _Decoding(shared.pop("step"), rows["done"], seen, logits, positions, cache), kernel, shared

    def generate_stream(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        *,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> Iterator[np.ndarray]:
        """Like `generate`, but yields each step's new tokens, (batch * num_return_sequences,),
        as soon as they are made (pad for rows already finished). The arguments are checked at
        the call, before the first token is asked for. With `stop_strings` (and `tokenizer=`)
        a row ends at the token that completes one, as in `generate`."""
        graphdef, state = nnx.split(self)
        config = configure(generation_config, **kwargs)
        tokens_only(config, "generate_stream")
        request = _prepare(self, state, input_ids, attention_mask, config, tokenizer)
        return self._stream(graphdef, state, request)

    def _stream(self, graphdef: Any, state: Any, request: _Request) -> Iterator[np.ndarray]:
        batch, static, mesh = request.batch, request.static, request.mesh
        stops = request.stop_strings
        watch = _StopWatch(request.tokenizer, stops, batch.rows, static.eos_ids) if stops else None
        d, kernel, shared = self._begin(graphdef, state, request)
        logits, seen, done, positions, cache = d.logits, d.seen, d.done, d.positions, d.cache
        with sharding.activate(mesh):
            for step in range(request.max_new):
                counter = _place(mesh, {}, {"step": np.int32(step)})[1]["step"]
                tokens, logits, seen, done, positions, cache = _stream_program(
                    graphdef, state, kernel, logits, seen, done, positions, cache, counter, shared["min_new"],
                    shared["values"], shared["key"], static=static,
                )  # fmt: skip
                tokens, ended = sharding.to_host(tokens)[: batch.rows], sharding.to_host(done)
                if watch is not None:
                    tokens = np.where(watch.feed(tokens[:, None])[:, 0], tokens, static.pad_id)
                    if (watch.ended & ~ended[: batch.rows]).any():  # a stop string: done from the next step
                        ended = ended.copy()
                        ended[: batch.rows] |= watch.ended
                        done = _place(mesh, {"done": ended}, {})[0]["done"]
                yield tokens
                if ended.all():
                    return
