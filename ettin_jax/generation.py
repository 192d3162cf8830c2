"""Generation: a KV-cached, jitted sampler with transformers' `generate` semantics.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ettin_jax import compilation, sharding
from ettin_jax.modeling import DecodeWeights, LayerCache
from ettin_jax.sampling import SamplingConfig, choose, process_logits

Array = jax.Array

MIN_BUCKET = 16
DEFAULT_MAX_NEW_TOKENS = 20

# Incremented each time a generation program is traced: tests count compilations with it.
TRACE_COUNT = {"generate": 0, "prefill": 0, "step": 0}


class GenerationError(ValueError):
    """Generation arguments that cannot work, named in the message."""


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


# ---- preparing a batch --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Batch:
    """Prompts left-padded into a bucketed array."""

    ids: np.ndarray  # (Bb, Pb) int32, left-padded with pad_id
    valid: np.ndarray  # (Bb, Pb) bool
    rows: int  # real rows; the rest pad the batch to its bucket
    width: int  # the returned prompt width: the longest prompt


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, batch_bucket: bool = True, batch_multiple: int = 1
) -> Batch:
    if not prompts:
        raise GenerationError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    rows = len(prompts)
    batch, length = (bucket(rows, 1) if batch_bucket else rows), bucket(width)
    batch = -(-batch // batch_multiple) * batch_multiple  # whole rows for every batch shard
    ids = np.full((batch, length), pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :] = prompt
        valid[i, length - len(prompt) :] = True
    return Batch(ids, valid, rows, width)


def prompts_from(input_ids: Any, attention_mask: Any) -> list[list[int]]:
    """Rows of `input_ids` without their padding (left or right), or a list of token lists."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
        if attention_mask is not None:
            raise GenerationError("pass attention_mask only with a 2-D input_ids array")
        return [list(map(int, row)) for row in input_ids]
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be a 2-D array of integers, got shape {ids.shape} and dtype {ids.dtype}")
    if attention_mask is None:
        return [row.tolist() for row in ids]
    mask = np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise GenerationError(f"attention_mask has shape {mask.shape}; expected {ids.shape} like input_ids")
    return [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


# ---- the jitted pieces --------------------------------------------------------------------
def _prompt_tokens(ids: Array, valid: Array, vocab: int) -> Array:
    """(B, V) bool: which ids each prompt holds (what the repetition penalty counts)."""
    return jnp.zeros((ids.shape[0], vocab), bool).at[jnp.arange(ids.shape[0])[:, None], ids].max(valid)


_prompt_tokens_program = compilation.jit(_prompt_tokens, static_argnames=("vocab",))


def _prefill(
    model: Any, ids: Array, valid: Array, cache_length: int, weights: DecodeWeights
) -> tuple[Array, Array, tuple[LayerCache, ...]]:
    """Logits (B, V) float32 for the first new token, each row's next position, and caches.
    `weights` is `model.decode_weights()`, taken once per generation."""
    positions = jnp.where(valid, jnp.cumsum(valid, axis=-1) - 1, -1).astype(jnp.int32)
    caches = model.model.init_cache(ids.shape[0], cache_length)
    # Padding embeds as token 0: a pad id outside the vocabulary would embed as NaN, and masked
    # NaN keys still poison attention (0 * NaN).
    # Left padding puts every row's last real token in the last column: only its state is needed.
    hidden, caches = model.model.forward_cached(
        jnp.where(valid, ids, 0), positions, caches, 0, last_only=True, qkv=weights.qkv
    )
    logits = model.logits(hidden, weights.kernel)[:, 0].astype(jnp.float32)
    return logits, positions[:, -1] + 1, caches


def _step(
    model: Any,
    tokens: Array,
    positions: Array,
    caches: tuple[LayerCache, ...],
    index: Array,
    weights: DecodeWeights,
) -> tuple[Array, tuple[LayerCache, ...]]:
    """Feeds one token per row (at sequence `index`); returns the next logits (B, V) float32."""
    hidden, caches = model.model.forward_cached(tokens[:, None], positions[:, None], caches, index, qkv=weights.qkv)
    return model.logits(hidden, weights.kernel)[:, 0].astype(jnp.float32), caches


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
def _generate_program(graphdef, state, weights, ids, valid, active, max_new, min_new, values, key, *, static: _Static):
    TRACE_COUNT["generate"] += 1
    model = nnx.merge(graphdef, state)
    batch, prompt_length = ids.shape
    weights = model.decode_weights(fuse_qkv=False) if weights is None else weights  # see _decode_weights
    logits, positions, caches = _prefill(model, ids, valid, prompt_length + static.new_bucket, weights)
    seen = _prompt_tokens(ids, valid, logits.shape[-1])
    out = jnp.full((batch, static.new_bucket), static.pad_id, jnp.int32)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, out, done, seen, logits, positions, caches = carry
        tokens = _choose_next(logits, seen, step, min_new, key, values, static)
        tokens, done, seen = _finish(tokens, done, seen, static)
        out = jax.lax.dynamic_update_slice_in_dim(out, tokens[:, None], step, axis=1)
        logits, caches = _step(model, tokens, positions, caches, prompt_length + step, weights)
        return step + 1, out, done, seen, logits, positions + 1, caches

    carry = (jnp.int32(0), out, ~active, seen, logits, positions, caches)
    step, out, *_ = jax.lax.while_loop(cond, body, carry)
    return out, step


@functools.partial(compilation.jit, static_argnames=("graphdef", "cache_length"))
def _prefill_program(graphdef, state, weights, ids, valid, *, cache_length: int):
    """Logits, positions, caches, and the decode weights when it derived them itself (None when
    given: returning an input from jit would copy it)."""
    TRACE_COUNT["prefill"] += 1
    model = nnx.merge(graphdef, state)
    derived = model.decode_weights(fuse_qkv=False) if weights is None else None
    return (*_prefill(model, ids, valid, cache_length, weights or derived), derived)


@functools.partial(compilation.jit, static_argnames=("graphdef", "static"), donate_argnames=("caches",))
def _stream_program(
    graphdef,
    state,
    weights,
    logits,
    seen,
    done,
    positions,
    caches,
    index,
    step,
    min_new,
    values,
    key,
    *,
    static: _Static,
):
    TRACE_COUNT["step"] += 1
    model = nnx.merge(graphdef, state)
    tokens = _choose_next(logits, seen, step, min_new, key, values, static)
    tokens, done, seen = _finish(tokens, done, seen, static)
    logits, caches = _step(model, tokens, positions, caches, index, weights)
    return tokens, logits, seen, done, positions + 1, caches


# ---- decode weights, kept across calls on CPU -----------------------------------------------
@functools.partial(compilation.jit, static_argnames=("graphdef",))
def _decode_weights_program(graphdef, state):
    return nnx.merge(graphdef, state).decode_weights()


# model -> (weak references to the state's arrays they were derived from, DecodeWeights)
_KEPT_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_weights(model: Any, graphdef: Any, state: Any) -> DecodeWeights | None:
    """On CPU, the model's `DecodeWeights`, derived at the first call and kept while its state
    holds the same arrays; elsewhere None, and each program derives them itself, without the
    q, k, v stacks.

    Why only on CPU: there XLA materializes both rearrangements (a transposed copy of the (V, D)
    embedding, the stacked q, k and v kernels) at every call, 31 ms of a 1.05 s batch-16
    generation of the 17m shape; GPU and TPU read a transposed operand in place. The cost: a
    copy of the tied vocabulary projection and of the attention's input projections while the
    model lives, V*D + 3*D*D*L numbers (57 MB for 17m in float32, about 1.4 GB for 1b).
    A state with leaves other than plain arrays (variables updated in place) is not kept."""
    if jax.default_backend() != "cpu":
        return None
    leaves = jax.tree.leaves(state)
    if not all(isinstance(x, jax.Array) for x in leaves):  # e.g. jax.Ref
        return _decode_weights_program(graphdef, state)  # identity says nothing about in-place updates
    kept = _KEPT_WEIGHTS.get(model)
    # A dead reference reads None: an array freed since, even if a new one took its address.
    if kept is not None:
        refs, weights = kept
        if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves, strict=True)):
            return weights
    weights = _decode_weights_program(graphdef, state)
    if model.decoder.kernel is not None:  # untied: the kernel is already (D, V); keep no copy
        weights = weights.replace(kernel=model.decoder.kernel[...])
    _KEPT_WEIGHTS[model] = ([weakref.ref(x) for x in leaves], weights)
    return weights


# ---- the user-facing functions ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Request:
    batch: Batch
    sampling: SamplingConfig
    static: _Static
    max_new: int
    min_new: int
    seed: int
    mesh: Any  # the model's mesh, or None


def _prepare(
    model: Any,
    state: Any,
    input_ids: Any,
    attention_mask: Any,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> _Request:
    """Checks the arguments of `generate` and prepares the batch; the defaults are generate's.
    `state` is the model's `nnx.split` state (where its mesh is read from)."""
    config = model.config
    try:
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise GenerationError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_return_sequences > 1 and not do_sample:
        raise GenerationError(
            f"num_return_sequences={num_return_sequences} with greedy decoding would return identical copies; "
            "pass do_sample=True"
        )
    prompts = prompts_from(input_ids, attention_mask)
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    prompts = [p for p in prompts for _ in range(num_return_sequences)]
    width = max((len(p) for p in prompts), default=0)
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_length is None else max_length - width
    if max_new_tokens < 0 or (max_length is not None and max_new_tokens <= 0 and width):
        raise GenerationError(f"max_length={max_length} leaves no room after the {width}-token prompt")
    if min_new_tokens < 0:
        raise GenerationError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise GenerationError(
            f"a {longest}-token prompt plus {max_new_tokens} new tokens exceeds max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    if eos_token_id is None:
        eos = config.eos_token_ids
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(int(t) for t in eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    mesh = sharding.mesh_of(state)
    batch = left_pad(prompts, pad_token_id, batch_multiple=sharding.batch_ways(mesh))
    static = _Static(sampling.static(), eos, int(pad_token_id), bucket(max_new_tokens))
    return _Request(batch, sampling, static, max_new_tokens, min_new_tokens, seed, mesh)


def _place(mesh: Any, rows: dict[str, Any], shared: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a mesh: `rows` split over its batch axes, `shared` replicated; without one, as given."""
    if mesh is None:
        return rows, shared
    replicated = NamedSharding(mesh, PartitionSpec())
    return sharding.put_batch(rows, mesh), jax.tree.map(lambda x: sharding.put(x, replicated), shared)


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Token ids (batch * num_return_sequences, prompt + new), prompts left-padded; rows that
    finished early are padded with `pad_token_id` after their EOS. See the module docstring."""
    graphdef, state = nnx.split(model)
    request = _prepare(
        model, state, input_ids, attention_mask, max_new_tokens=max_new_tokens, max_length=max_length,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
    )  # fmt: skip
    batch = request.batch
    active = np.arange(batch.ids.shape[0]) < batch.rows
    rows, shared = _place(
        request.mesh,
        {"ids": batch.ids, "valid": batch.valid, "active": active},
        {"max_new": np.int32(request.max_new), "min_new": np.int32(request.min_new),
         "values": request.sampling.values(), "key": jax.random.key(request.seed)},
    )  # fmt: skip
    with sharding.activate(request.mesh):
        out, steps = _generate_program(
            graphdef, state, _decode_weights(model, graphdef, state), rows["ids"], rows["valid"], rows["active"],
            shared["max_new"], shared["min_new"], shared["values"], shared["key"], static=request.static,
        )  # fmt: skip
    steps = int(sharding.to_host(steps))
    prompt = batch.ids[: batch.rows, batch.ids.shape[1] - batch.width :]
    return np.concatenate([prompt, sharding.to_host(out)[: batch.rows, :steps]], axis=1)


def generate_stream(model: Any, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Iterator[np.ndarray]:
    """Like `generate`, but yields each step's new tokens, (batch * num_return_sequences,),
    as soon as they are made (pad for rows already finished)."""
    graphdef, state = nnx.split(model)
    request = _prepare(model, state, input_ids, attention_mask, **kwargs)
    batch, static = request.batch, request.static
    prompt_length = batch.ids.shape[1]
    mesh = request.mesh
    rows, shared = _place(
        mesh,
        {"ids": batch.ids, "valid": batch.valid, "done": np.arange(batch.ids.shape[0]) >= batch.rows},
        {"min_new": np.int32(request.min_new), "values": request.sampling.values(), "key": jax.random.key(request.seed)},
    )  # fmt: skip
    with sharding.activate(mesh):
        weights = _decode_weights(model, graphdef, state)
        logits, positions, caches, derived = _prefill_program(
            graphdef, state, weights, rows["ids"], rows["valid"], cache_length=prompt_length + static.new_bucket
        )
        weights = weights or derived
        seen = _prompt_tokens_program(rows["ids"], rows["valid"], logits.shape[-1])
        done = rows["done"]
        for step in range(request.max_new):
            counters = _place(mesh, {}, {"index": np.int32(prompt_length + step), "step": np.int32(step)})[1]
            tokens, logits, seen, done, positions, caches = _stream_program(
                graphdef, state, weights, logits, seen, done, positions, caches, counters["index"], counters["step"],
                shared["min_new"], shared["values"], shared["key"], static=static,
            )  # fmt: skip
            yield sharding.to_host(tokens)[: batch.rows]
            if sharding.to_host(done).all():
                return
