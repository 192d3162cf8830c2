"""Generation: a KV-cached, jitted sampler with transformers' `generate` semantics, mixed into
the causal LM as `GenerationMixin` (as transformers does). It runs the model it is mixed into
through the model's own forward pass with a cache (`model.model(..., past_key_values=...)`) and
its `logits`; it imports the cache and the sampling, never the model.

`generate` runs one jitted program: a prefill over the (left-padded) prompts, then a
`lax.while_loop` of decode steps that stops when every row has produced EOS or the token
budget is spent. `generate_stream` runs the same prefill and decode step from Python, one
step at a time, and yields each step's tokens.

Shapes are bucketed (prompt length, new tokens and batch each rounded up to a power of two)
so that a stream of different prompts reuses a handful of compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ettin_jax import compilation, sharding
from ettin_jax.cache import Cache
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.errors import EttinError
from ettin_jax.inputs import Errors, describe, integer, is_integer, to_array, token_list
from ettin_jax.padding import Padded, bucket, left_pad
from ettin_jax.platforms import on_cpu
from ettin_jax.sampling import SamplingConfig, choose, process_logits

Array = jax.Array

DEFAULT_MAX_NEW_TOKENS = 20


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


def _choose_next(logits, seen, step, min_new, key, values, static: _Static):
    eos = jnp.asarray(static.eos_ids, jnp.int32)
    block_eos = jnp.broadcast_to(step < min_new, logits.shape[:1])
    processed = process_logits(logits, static.sampling, values, seen, eos, block_eos)
    return choose(processed, static.sampling[0], jax.random.fold_in(key, step))


def _finish(tokens, done, seen, static: _Static):
    eos = jnp.asarray(static.eos_ids, jnp.int32)
    tokens = jnp.where(done, static.pad_id, tokens)
    done = done | jnp.isin(tokens, eos)
    seen = seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    return tokens, done, seen


@functools.partial(compilation.jit, static_argnames=("graphdef", "static"), donate_argnames=())
def _generate_program(graphdef, state, kernel, ids, valid, active, max_new, min_new, values, key, *, static: _Static):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = ids.shape
    kernel = model.output_kernel() if kernel is None else kernel  # see _output_kernel
    logits, positions, cache = _prefill(model, ids, valid, prompt_length + static.new_bucket, kernel)
    seen = _prompt_tokens(ids, valid, logits.shape[-1])
    out = jnp.full((batch, static.new_bucket), static.pad_id, jnp.int32)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, out, done, seen, logits, positions, cache = carry
        tokens = _choose_next(logits, seen, step, min_new, key, values, static)
        tokens, done, seen = _finish(tokens, done, seen, static)
        out = jax.lax.dynamic_update_slice_in_dim(out, tokens[:, None], step, axis=1)
        logits, cache = _step(model, tokens, positions, cache, kernel)
        return step + 1, out, done, seen, logits, positions + 1, cache

    carry = (jnp.int32(0), out, ~active, seen, logits, positions, cache)
    step, out, *_ = jax.lax.while_loop(cond, body, carry)
    return out, step


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
    tokens = _choose_next(logits, seen, step, min_new, key, values, static)
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
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> GenerationConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise GenerationError(f"generate() got unknown argument(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


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


def _prepare(model: Any, state: Any, input_ids: Any, attention_mask: Any, c: GenerationConfig) -> _Request:
    """Checks the arguments of `generate` and prepares the batch. `state` is the model's
    `nnx.split` state (where its mesh is read from)."""
    prompts = prompts_from(input_ids, attention_mask)
    check_prompts(prompts, model.config.vocab_size)
    limits = resolve(model.config, c, max(len(p) for p in prompts))
    prompts = [p for p in prompts for _ in range(c.num_return_sequences)]
    mesh = sharding.mesh_of(state)
    batch = left_pad(prompts, limits.pad, batch_multiple=sharding.batch_ways(mesh))
    static = _Static(c.static(), limits.eos, limits.pad, bucket(limits.max_new))
    return _Request(batch, c, static, limits.max_new, c.min_new_tokens, c.seed, mesh)


def _place(mesh: Any, rows: dict[str, Any], shared: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a mesh: `rows` split over its batch axes, `shared` replicated; without one, as given."""
    if mesh is None:
        return rows, shared
    replicated = NamedSharding(mesh, PartitionSpec())
    return sharding.put_batch(rows, mesh), jax.tree.map(lambda x: sharding.put(x, replicated), shared)


class GenerationMixin:
    """`generate` and `generate_stream` for the causal LM, with transformers' arguments."""

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Token ids (batch * num_return_sequences, prompt + new), prompts left-padded; rows that
        finished early are padded with `pad_token_id` after their EOS. `input_ids`: a 2-D array
        (with `attention_mask` for padding) or a list of token lists. `kwargs`: any field of
        `GenerationConfig` (max_new_tokens, do_sample, temperature, top_k, top_p, seed, ...)."""
        graphdef, state = nnx.split(self)
        request = _prepare(self, state, input_ids, attention_mask, configure(generation_config, **kwargs))
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
        prompt = batch.ids[: batch.rows, batch.ids.shape[1] - batch.width :]
        return np.concatenate([prompt, sharding.to_host(out)[: batch.rows, :steps]], axis=1)

    def generate_stream(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[np.ndarray]:
        """Like `generate`, but yields each step's new tokens, (batch * num_return_sequences,),
        as soon as they are made (pad for rows already finished). The arguments are checked at
        the call, before the first token is asked for."""
        graphdef, state = nnx.split(self)
        request = _prepare(self, state, input_ids, attention_mask, configure(generation_config, **kwargs))
        return self._stream(graphdef, state, request)

    def _stream(self, graphdef: Any, state: Any, request: _Request) -> Iterator[np.ndarray]:
        batch, static, mesh = request.batch, request.static, request.mesh
        rows, shared = _place(
            mesh,
            {"ids": batch.ids, "valid": batch.mask, "done": np.arange(batch.ids.shape[0]) >= batch.rows},
            {"min_new": np.int32(request.min_new), "values": request.sampling.values(),
             "key": jax.random.key(request.seed)},
        )  # fmt: skip
        with sharding.activate(mesh):
            kernel = _output_kernel(self, graphdef, state)
            logits, positions, cache, derived = _prefill_program(
                graphdef, state, kernel, rows["ids"], rows["valid"], cache_length=batch.ids.shape[1] + static.new_bucket
            )
            kernel = derived if kernel is None else kernel
            seen = _prompt_tokens_program(rows["ids"], rows["valid"], logits.shape[-1])
            done = rows["done"]
            for step in range(request.max_new):
                counter = _place(mesh, {}, {"step": np.int32(step)})[1]["step"]
                tokens, logits, seen, done, positions, cache = _stream_program(
                    graphdef, state, kernel, logits, seen, done, positions, cache, counter, shared["min_new"],
                    shared["values"], shared["key"], static=static,
                )  # fmt: skip
                yield sharding.to_host(tokens)[: batch.rows]
                if sharding.to_host(done).all():
                    return
