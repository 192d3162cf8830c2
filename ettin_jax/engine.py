"""Continuous batching: a fixed number of decode slots, each serving its own request, refilled
from a queue the moment a request ends.

Per slot, on the device (`Slots`): the slot's rows of one KV cache (global layers a region of
sequence indices, sliding layers a ring of `sliding_window`), its own sequence length and RoPE
position, the token to feed next, and its request's sampling values, limits and stop tokens.
The global layers' region holds the span of the live requests, a power of two of at least
`MIN_SPAN` (`Engine._span`), and is resized as they come and go (`Engine._resize`): a decode step
reads every sequence index the cache holds, and a server's `max_length` is the whole context
(a step over 8192 indices costs 4x more at 17m than one over 1024). At `max_length` a slot
takes 2 * N * H * (globals * max_length + slidings * window) values: 6.8 MB for 17m in float32
at max_length 1024, 595 MB for 1b in bfloat16 at 8192 (`Engine.slot_bytes`, what the default
number of slots is sized by). One round of `Engine.step()`:
1. admit: queued requests with short prompts are prefilled, as many as there are free slots, in
   calls of a few prompts of similar length (`_groups`), each row's first token chosen; their
   cache rows are moved down so that a request's tokens sit at its first cache slots (sequence
   indices from 0), then written into free slots (`_insert_program`). A long prompt is
   prefilled `prefill_chunk` tokens per round into a cache row of its own, so that decoding is
   never stalled for a whole prefill;
2. decode: `steps_per_call` decode steps in one program (a `lax.scan`), so that the host's work
   (reading tokens, refilling slots) is paid once per several steps. It runs only the slots that
   hold requests (a power of two of them, `_width`);
3. the host hands each request its new tokens and frees the slots of those that ended.

Stop strings are text, read on the host: a request with `stop_strings` (and a `tokenizer`) keeps
a `detokenize.TextStream`, and takes its new tokens only through the one that completes a stop
string (tokens the same decode call made after it are dropped); its slot is freed at once, so
it decodes at most `steps_per_call` steps past its stop.

A request's tokens do not depend on its neighbours: every computation is per row, and a
sampled token's randomness is `fold_in(key(seed), token index)`. Greedy tokens equal
`model.generate` on the prompt alone.

The programs (`PROGRAMS`): one prefill per prompt-width and row bucket, one insert per row
bucket and cache size, one chunk step and one chunk finish per chunked-cache size, one decode
per width, cache size and set of logits processors in use, and a resize per pair of cache
sizes; a stream of any length reuses them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import compilation, sharding
from ettin_jax.cache import Cache, LayerCache, init_cache, slot_counts
from ettin_jax.detokenize import TextStream
from ettin_jax.generation import (
    ERRORS,
    GenerationConfig,
    GenerationError,
    GenerationTypeError,
    Limits,
    _output_kernel,
    _output_kernel_program,
    _prefill,
    _prompt_tokens,
    check_prompts,
    check_tokenizer,
    configure,
    resolve,
    tokens_only,
)
from ettin_jax.inputs import describe, integer, token_list
from ettin_jax.padding import bucket
from ettin_jax.platforms import on_cpu
from ettin_jax.sampling import choose_rows, process_logits

Array = jax.Array
MAX_STOP_TOKENS = 8  # stop ids a request may name (EOS ids included)
MIN_SPAN = 256  # the fewest sequence indices the slots' cache holds (see Engine._span)
DEFAULT_MEMORY = 2 << 30  # bytes for the KV cache when the device does not say how much it has
# What a prefill call and each of its rows cost besides their tokens, in tokens (`Engine._groups`;
# 17m on CPU, 2026-12-01: 2.8 ms a call, 1 ms a row, 0.05 ms a token).
PREFILL_CALL, PREFILL_ROW = 56, 20


# ---- device state ---------------------------------------------------------------------------
@flax.struct.dataclass
class Params:
    """Each slot's request: its limits, sampling values and stop tokens, (B,) or (B, K)."""

    max_new: Array  # int32
    min_new: Array  # int32
    sample: Array  # bool
    temperature: Array  # float32
    top_k: Array  # int32, 0: off
    top_p: Array  # float32, 1: off
    min_p: Array  # float32, 0: off
    penalty: Array  # float32, 1: off
    key: Array  # (B, 2) uint32 key data from the request's seed
    stop: Array  # (B, K) int32, -1 pads

    def values(self) -> dict[str, Array]:
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.penalty,
        }


@flax.struct.dataclass
class Slots:
    cache: Cache  # preallocated; length (B,): each slot at its own sequence index
    tokens: Array  # (B,) int32: the token to feed next (the last one chosen)
    positions: Array  # (B,) int32: its RoPE position
    generated: Array  # (B,) int32: tokens chosen so far for the slot's request
    active: Array  # (B,) bool: the slot holds a request that goes on
    seen: Array  # (B, V) bool: the tokens of the request so far (repetition penalty)
    params: Params


def _choose(logits, seen, generated, params: Params, flags: tuple[bool, ...]) -> Array:
    """Each row's next token: the processors of its own request, its own key at token index
    `generated`. logits (B, V) float32."""
    block_stop = generated < params.min_new
    processed = process_logits(logits, flags, params.values(), seen, params.stop, block_stop)
    keys = jax.vmap(lambda data, i: jax.random.fold_in(jax.random.wrap_key_data(data), i))(params.key, generated)
    return choose_rows(processed, params.sample, keys, flags[0])


def _after(tokens, generated, params: Params) -> tuple[Array, Array]:
    """(generated + 1, whether the request ended with this token): a stop token or its budget."""
    generated = generated + 1
    stopped = jnp.any(tokens[:, None] == params.stop, axis=-1) | (generated >= params.max_new)
    return generated, stopped


@flax.struct.dataclass
class Logprobs:
    """Raw log-probabilities (the model's own distribution, before any logits processor, as
    vLLM reports them) of the chosen tokens (...,) and the `top` most likely ones (..., top)."""

    chosen: Array  # float32
    top_values: Array  # float32, descending
    top_ids: Array  # int32


def _logprobs(logits: Array, tokens: Array, top: int) -> Logprobs | None:
    """None when `top` is 0 (static: no request asked for logprobs), else the `Logprobs` of
    logits (B, V) float32 and the chosen tokens (B,)."""
    if not top:
        return None
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    values, ids = jax.lax.top_k(logprobs, top)
    return Logprobs(jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0], values, ids.astype(jnp.int32))


# ---- the programs -----------------------------------------------------------------------------
@functools.partial(compilation.jit, static_argnames=("sizes",), donate_argnames=("slots",))
def _resize_program(slots: Slots, *, sizes: tuple[int, ...]) -> Slots:
    """The slots with `sizes[i]` cache slots on layer i (`slot_counts` of the new span): a
    region grown with empty slots, or cut to its first slots. Every live request's tokens lie
    in the first slots of the smaller of the two (`Engine._span`), and a ring that is resized
    has never wrapped (it held fewer tokens than either size), so no token moves."""

    def layer(c: LayerCache, size: int) -> LayerCache:
        if size <= c.slots:
            return c.map_kv(lambda a: a[:, :, :size]).replace(index=c.index[:, :size])
        return c.grow(size)

    layers = tuple(map(layer, slots.cache.layers, sizes))
    return slots.replace(cache=slots.cache.replace(layers=layers))


@functools.partial(
    compilation.jit, static_argnames=("graphdef", "steps", "flags", "width", "top"), donate_argnames=("slots",)
)
def _decode_program(graphdef, state, kernel, slots: Slots, *, steps: int, flags: tuple[bool, ...], width: int,
                    top: int):  # fmt: skip
    """`steps` decode steps for the first `width` slots (the others are free); returns the
    slots, the tokens (steps, width), which of them belong to a request (steps, width), and
    their `Logprobs` (steps, width, ...) when `top` > 0."""
    model = nnx.merge(graphdef, state)
    everything, slots = slots, jax.tree.map(lambda x: x[:width], slots)
    batch = width

    def step(slots: Slots, _):
        out = model.model(slots.tokens[:, None], position_ids=slots.positions[:, None], past_key_values=slots.cache)
        logits = model.logits(out.last_hidden_state, kernel)[:, 0].astype(jnp.float32)
        tokens = _choose(logits, slots.seen, slots.generated, slots.params, flags)
        logprobs = _logprobs(logits, tokens, top)
        generated, stopped = _after(tokens, slots.generated, slots.params)
        emitted = slots.active
        slots = slots.replace(
            cache=out.past_key_values,
            tokens=tokens,
            positions=slots.positions + 1,
            generated=jnp.where(emitted, generated, slots.generated),
            active=emitted & ~stopped,
            seen=slots.seen.at[jnp.arange(batch), tokens].set(True),
        )
        return slots, (tokens, emitted, logprobs)

    slots, (tokens, emitted, logprobs) = jax.lax.scan(step, slots, None, length=steps)
    # The decoded part back in place: an in-place update of the donated buffers.
    slots = jax.tree.map(lambda whole, part: jax.lax.dynamic_update_slice(whole, part, (0,) * whole.ndim),
                         everything, slots)  # fmt: skip
    return slots, tokens, emitted, logprobs


@functools.partial(compilation.jit, donate_argnames=("slots",))
def _move_program(slots: Slots, source: Array, target: Array) -> Slots:
    """Moves the requests in slots `source` (B,) to the free slots `target` (B,); pairs with
    target B are dropped (one program whatever the number of moves)."""
    return jax.tree.map(lambda x: x.at[target].set(x[source], mode="drop"), slots)


def _compact(layer: LayerCache, pad: Array) -> LayerCache:
    """A prefilled layer cache (P rows) with each row's tokens moved down by its `pad` (P,)
    leading padding tokens: sequence indices from 0, slot = index % slots. A row then holds its
    request's tokens at the first slots, which is what lets the slots' cache hold only the
    span of its requests (`Engine._resize`)."""
    src = (jnp.arange(layer.slots)[None, :] + pad[:, None]) % layer.slots  # (P, S): old slot of new slot j
    index = jnp.take_along_axis(layer.index, src, axis=1)
    take = lambda a: jnp.take_along_axis(a, src[:, None, :, None], axis=2)  # noqa: E731
    return layer.map_kv(take).replace(index=jnp.where(index >= 0, index - pad[:, None], -1))


def _prefilled(cache: Cache, logits, ids, valid, lengths, params: Params, flags, top: int) -> tuple[Slots, Any]:
    """P prefilled requests as slots of their own (what `_insert_program` writes into the
    engine's), and their first tokens' `Logprobs`: the cache compacted (`_compact`), the first
    token chosen from logits (P, V) float32, `lengths` (P,) prompt tokens (also the next RoPE
    position), the prompt's and first token's `seen` row, and whether the first token ended
    the request. ids, valid (P, T): the left-padded prompts."""
    seen = _prompt_tokens(ids, valid, logits.shape[-1])
    first = _choose(logits, seen, jnp.zeros(ids.shape[:1], jnp.int32), params, flags)
    _, stopped = _after(first, jnp.zeros_like(first), params)
    pad = jnp.broadcast_to(cache.length, lengths.shape) - lengths
    new = Slots(
        cache=Cache(tuple(_compact(layer, pad) for layer in cache.layers), lengths),
        tokens=first, positions=lengths, generated=jnp.ones_like(first), active=~stopped,
        seen=seen.at[jnp.arange(ids.shape[0]), first].set(True), params=params,
    )  # fmt: skip
    return new, _logprobs(logits, first, top)


@functools.partial(compilation.jit, static_argnames=("graphdef", "size", "flags", "top"))
def _prefill_program(graphdef, state, kernel, ids, valid, params: Params, *, size: int, flags, top):
    """Prefills P left-padded prompts (P, T): the requests as `_prefilled` slots, and their
    first tokens' `Logprobs`. Their cache has `size` >= T slots whatever T is (the engine's
    prefill chunk), so that `_insert_program` compiles once per rows, not per width too."""
    model = nnx.merge(graphdef, state)
    logits, lengths, cache = _prefill(model, ids, valid, size, kernel)
    return _prefilled(cache, logits, ids, valid, lengths, params, flags, top)


@functools.partial(compilation.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _chunk_program(graphdef, state, cache: Cache, ids, valid, positions):
    """One chunk (1, C) of a long prompt into its own one-row preallocated cache."""
    model = nnx.merge(graphdef, state)
    out = model.model(jnp.where(valid, ids, 0), valid, positions, past_key_values=cache)
    return out.past_key_values


@functools.partial(compilation.jit, static_argnames=("graphdef", "flags", "top"), donate_argnames=("cache",))
def _chunk_finish_program(graphdef, state, kernel, cache, prompt, prompt_valid, ids, valid, positions, params, *,
                          flags, top):  # fmt: skip
    """The last chunk of a long prompt: the request as a `_prefilled` slot, and its first
    token's `Logprobs`."""
    model = nnx.merge(graphdef, state)
    out = model.model(
        jnp.where(valid, ids, 0), valid, positions, past_key_values=cache,
        rows=jnp.full((1, 1), ids.shape[1] - 1, jnp.int32),
    )  # fmt: skip
    logits = model.logits(out.last_hidden_state, kernel)[:, 0].astype(jnp.float32)
    return _prefilled(out.past_key_values, logits, prompt, prompt_valid, positions[:, -1] + 1, params, flags, top)


@functools.partial(compilation.jit, donate_argnames=("slots",))
def _insert_program(slots: Slots, rows: Array, new: Slots) -> Slots:
    """Writes the P `_prefilled` slots `new` into the slots `rows` (P,) (B for none: dropped).
    Their tokens sit at their first cache slots, which the engine's cache has room for
    (`Engine._resize`); the rest of each row's cache is marked empty.

    A program of its own, apart from the prefill: it depends on the size of the engine's
    cache, which follows the requests, and the model's prefill then compiles once per width
    and rows instead of once per size too."""

    def put(target: Array, value: Array) -> Array:
        return target.at[rows].set(value.astype(target.dtype), mode="drop")

    def put_layer(target: LayerCache, layer: LayerCache) -> LayerCache:
        n = min(layer.slots, target.slots)  # slots past a prompt hold nothing once compacted
        index = jnp.pad(layer.index[:, :n], [(0, 0), (0, target.slots - n)], constant_values=-1)

        def put_kv(t: Array, value: Array) -> Array:
            return t.at[rows, :, :n].set(value[:, :, :n].astype(t.dtype), mode="drop")

        return target.map_kv(put_kv, layer).replace(index=put(target.index, index))

    layers = tuple(map(put_layer, slots.cache.layers, new.cache.layers))
    rest = jax.tree.map(put, slots.replace(cache=None), new.replace(cache=None))
    return rest.replace(cache=Cache(layers, put(slots.cache.length, new.cache.length)))


PROGRAMS = (_prefill_program, _insert_program, _decode_program, _chunk_program, _chunk_finish_program, _move_program,
            _resize_program)  # fmt: skip


def compiled_programs() -> int:
    """The programs the engines of this process have compiled so far. A server that compiles
    while it serves holds every request for the compilation (about a second a program on CPU);
    its `/metrics` reports this count, so that a warm-up can be checked."""
    return sum(program._cache_size() for program in PROGRAMS)


# ---- requests ---------------------------------------------------------------------------------
class Request:
    """A submitted request: its new tokens as they come (`tokens`), and `done`, `error` and
    `finish_reason` ("stop", "length" or "cancelled") once it ends; "stop" for its stop token
    or for a stop string, whose completing token is its last (`text`, the request's
    `TextStream`, then holds its text before the stop string). With `logprobs` (how many
    top tokens to report, 0 for the chosen one's only) each token's raw log-probability comes too: `token_logprobs[i]` and
    `top_logprobs[i]` ((token, logprob) pairs, most likely first) are set before `tokens[i]`.
    `stream()` yields tokens as they are made; `result()` waits for the end; `cancel()` frees
    its slot. `on_update(request)` is called in the engine's thread whenever the request gets
    new tokens or ends (a server wakes its client with it)."""

    def __init__(self, engine: Engine, prompt: list[int], config: GenerationConfig, logprobs: int | None,
                 on_update: Callable[[Request], None] | None):  # fmt: skip
        self.engine, self.prompt, self.config, self.logprobs = engine, prompt, config, logprobs
        self.limits: Limits | None = None  # set once the request is checked
        self.text: TextStream | None = None  # with stop strings: the request's text so far
        self.tokens: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.done = False
        self.error: str | None = None
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._on_update = on_update
        self._cancelled = False
        self._changed = threading.Condition(engine._lock)

    def _emit(self, tokens: Sequence[int], logprobs: Sequence[tuple[float, list[tuple[int, float]]]] = ()) -> int:
        """Takes new tokens (and their logprobs, if asked for): with stop strings only those
        through the one that completes a stop string. Returns how many it took."""
        if self.text is not None:
            tokens = tokens[: self.text.until_stop(tokens)]
            logprobs = logprobs[: len(tokens)]
        if self.first_token_at is None and tokens:
            self.first_token_at = time.perf_counter()
        for chosen, top in logprobs:
            self.token_logprobs.append(chosen)
            self.top_logprobs.append(top[: self.logprobs])
        self.tokens.extend(tokens)
        self._notify()
        return len(tokens)

    @property
    def stop_string_seen(self) -> bool:
        """Whether the request's text has reached one of its stop strings: it has ended."""
        return self.text is not None and self.text.stopped

    def _finish(self, reason: str | None, error: str | None = None) -> None:
        self.done, self.finish_reason, self.error = True, reason, error
        self._notify()

    def _notify(self) -> None:
        self._changed.notify_all()
        if self._on_update is not None:
            self._on_update(self)

    def cancel(self) -> None:
        """Stops the request; its slot is freed at the next round. Safe from any thread, and
        does not wait for the round in progress."""
        self._cancelled = True

    def stream(self) -> Iterator[int]:
        """The new tokens as they are made; drives the engine itself when no thread runs it."""
        sent = 0
        while True:
            with self.engine._lock:
                while len(self.tokens) == sent and not self.done and self.engine._thread is not None:
                    self._changed.wait()
                new, done = self.tokens[sent:], self.done
            yield from new
            sent += len(new)
            if done and sent == len(self.tokens):
                if self.error:
                    raise GenerationError(self.error)
                return
            if self.engine._thread is None:
                self.engine.step()

    def result(self) -> list[int]:
        """Every new token, once the request has ended (its stop token included)."""
        for _ in self.stream():
            pass
        return list(self.tokens)


@dataclasses.dataclass
class _Prefilling:
    """A long prompt being prefilled chunk by chunk into a cache row of its own."""

    request: Request
    slot: int
    cache: Cache
    ids: np.ndarray  # (1, T): a first chunk of a bucketed width, left-padded, then whole chunks
    valid: np.ndarray
    positions: np.ndarray
    cuts: list[int]  # where each chunk starts, then T
    done_chunks: int = 0


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    """Continuous batching over a model's causal LM; see the module docstring.

    `max_batch_size`: decode slots (default: as many as fit in a quarter of the device's memory,
    at most 64). `max_length`: the most tokens (prompt + new) a request may hold (default:
    max_position_embeddings). `steps_per_call`: decode steps per host round trip.
    `prefill_batch`: the most prompts in one prefill call. `prefill_chunk`: longer prompts are
    prefilled this many tokens per round. `max_queue`: requests waiting before `submit` blocks.
    `max_logprobs`: the most top tokens a request may ask log-probabilities for."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        steps_per_call: int = 8,
        prefill_batch: int = 4,
        prefill_chunk: int = 256,
        max_queue: int = 1024,
        max_logprobs: int = 20,
    ):
        config = model.config
        self.model, self.config = model, config
        context = config.max_position_embeddings
        self.max_length = context if max_length is None else integer(
            max_length, "max_length", 1, context + 1, must=f"an integer in [1, {context}] (max_position_embeddings)",
            errors=ERRORS,
        )  # fmt: skip
        for name, value in (("max_batch_size", max_batch_size), ("steps_per_call", steps_per_call),
                            ("prefill_batch", prefill_batch), ("prefill_chunk", prefill_chunk),
                            ("max_queue", max_queue), ("max_logprobs", max_logprobs)):  # fmt: skip
            if value is not None or name != "max_batch_size":
                integer(value, name, 1, must="a positive integer", errors=ERRORS)
        self.graphdef, self.state = nnx.split(model)
        self.mesh = sharding.mesh_of(self.state)
        ways = sharding.batch_ways(self.mesh)
        dtype = model.model.embeddings.tok_embeddings.dtype
        self.slot_bytes = _slot_bytes(config, self.max_length, dtype)
        batch = max_batch_size or default_batch_size(self.slot_bytes)
        self.batch = -(-batch // ways) * ways
        self.steps_per_call, self.prefill_batch = steps_per_call, prefill_batch
        self.prefill_chunk = bucket(prefill_chunk)
        self.max_queue, self.max_logprobs = max_queue, max_logprobs
        with sharding.activate(self.mesh):
            kernel = _output_kernel(model, self.graphdef, self.state)
            self.kernel = _output_kernel_program(self.graphdef, self.state) if kernel is None else kernel
        self.span = min(self.max_length, MIN_SPAN)  # the sequence indices the slots' cache holds now
        self.slots = self._place(_empty_slots(config, self.batch, self.span, dtype))
        self.requests: list[Request | None] = [None] * self.batch  # by slot
        self.queue: collections.deque[Request] = collections.deque()
        self.prefilling: _Prefilling | None = None
        self._lock = threading.RLock()  # held for a whole round
        # With a thread running the rounds, `submit` only appends to the inbox (no waiting for
        # the round in progress); each round starts by moving the inbox to the queue.
        self._inbox: collections.deque[Request] = collections.deque()
        self._wake = threading.Event()  # set by submit: an idle thread starts a round at once
        self._room = threading.Condition()  # notified when the queue has room
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: str | None = None  # set if a round failed in the thread: the engine is stopped
        self.stats = {"rounds": 0, "slot_steps": 0, "useful_steps": 0, "tokens": 0, "requests": 0,
                      "host_s": 0.0, "device_s": 0.0, "prefill_s": 0.0}  # fmt: skip

    def _place(self, tree: Any) -> Any:
        """Slot arrays split over the mesh's batch axes (rows), or as they are without a mesh."""
        if self.mesh is None:
            return tree
        return jax.tree.map(
            lambda x: sharding.put(x, sharding.batch_sharding(self.mesh, np.ndim(x), size=np.shape(x)[0])), tree
        )

    # ---- submitting -----------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        generation_config: GenerationConfig | None = None,
        *,
        logprobs: int | None = None,
        on_update: Callable[[Request], None] | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> Request:
        """Queues a request: `prompt` token ids, and `generate`'s arguments; `logprobs` and
        `on_update` as `Request` describes them; `tokenizer`: what its `stop_strings` are read
        with. A request that cannot run (empty, too long, ids outside the vocabulary, a bad
        argument) comes back ended, with its `error`; the others are not affected. A full queue
        blocks until there is room."""
        if on_update is not None and not callable(on_update):  # it would fail in the engine's thread
            raise GenerationTypeError(f"on_update must be a function or None, got {describe(on_update)}")
        request = Request(self, [], GenerationConfig(), None, on_update)
        try:
            request.prompt = token_list(prompt, "prompt", errors=ERRORS)
            if logprobs is not None:
                request.logprobs = integer(
                    logprobs, "logprobs", 0, self.max_logprobs + 1,
                    must=f"an integer in [0, {self.max_logprobs}]", errors=ERRORS,
                )  # fmt: skip
            config = configure(generation_config, **kwargs)
            request.config = config
            if config.num_return_sequences != 1:
                raise GenerationError("the engine serves one sequence per request; submit the prompt again")
            request.limits = _limits(self.config, config, request.prompt, "prompt", self.max_length, tokenizer)
            if config.stop_strings:
                request.text = TextStream(tokenizer, config.stop_strings)
            try:  # values the slots' int32 and float32 arrays cannot hold fail here, not in the engine's thread
                self._params([request])
            except (OverflowError, ValueError, TypeError) as e:
                raise GenerationError(f"a generation argument is out of range: {e}") from None
            if self.error is not None:
                raise GenerationError(f"the engine has stopped after an error: {self.error}")
        except GenerationError as e:
            with self._lock:
                request._finish(None, str(e))
            return request
        if request.limits.max_new == 0:
            with self._lock:
                request._finish("length")
            return request
        if self._thread is not None:
            with self._room:
                while len(self.queue) + len(self._inbox) >= self.max_queue and self._thread is not None:
                    self._room.wait(timeout=0.1)
            self._inbox.append(request)
            self._wake.set()
            return request
        with self._lock:
            while len(self.queue) >= self.max_queue:
                self.step()  # no thread drives the engine: make room ourselves
            self.queue.append(request)
            self.stats["requests"] += 1
        return request

    # ---- one round ------------------------------------------------------------------------
    def step(self) -> bool:
        """One round: admit, decode `steps_per_call` steps, hand out tokens. False when idle."""
        with self._lock:
            start = time.perf_counter()
            while self._inbox:
                self.queue.append(self._inbox.popleft())
                self.stats["requests"] += 1
            self._drop_cancelled()
            admitted = self._admit()
            prefill = time.perf_counter() - start
            busy = any(r is not None for r in self.requests)
            if not busy:
                self.stats["host_s"] += time.perf_counter() - start - prefill
                return admitted or bool(self.queue) or self.prefilling is not None
            flags, width = self._flags(), self._width()
            top = self._top(self.requests[:width])
            self._resize(self._span())
            before = time.perf_counter()
            with sharding.activate(self.mesh):
                self.slots, tokens, emitted, logprobs = _decode_program(
                    self.graphdef, self.state, self.kernel, self.slots, steps=self.steps_per_call, flags=flags,
                    width=width, top=top,
                )  # fmt: skip
                tokens, emitted, active, logprobs = (
                    sharding.to_host(tokens),
                    sharding.to_host(emitted),
                    sharding.to_host(self.slots.active),
                    None if logprobs is None else jax.tree.map(sharding.to_host, logprobs),
                )
            after = time.perf_counter()
            self.stats["device_s"] += after - before
            self.stats["rounds"] += 1
            self.stats["slot_steps"] += width * self.steps_per_call
            self.stats["useful_steps"] += int(emitted.sum())
            for slot, request in enumerate(self.requests[:width]):
                if request is None:
                    continue
                steps = emitted[:, slot]
                new = tokens[steps, slot].tolist()
                self.stats["tokens"] += request._emit(
                    new, _entries(logprobs, (steps, slot)) if request.logprobs is not None else ()
                )
                if request.stop_string_seen:
                    self._release(slot, "stop")
                elif not active[slot]:
                    self._end(slot, "stop" if new and new[-1] in request.limits.eos else "length")
            self.stats["host_s"] += time.perf_counter() - start - (after - before) - prefill
            return True

    def _width(self) -> int:
        """How many slots, from the first, the next decode runs: a power of two that holds every
        request. Once the queue is empty, the requests left are moved to the first slots first,
        so that the last long ones do not keep every slot decoding (a program per width)."""
        live = [s for s, r in enumerate(self.requests) if r is not None]
        if not self.queue and self.prefilling is None and live[-1] >= len(live):
            source = [s for s in live if s >= len(live)]
            target = [s for s in range(len(live)) if self.requests[s] is None]
            pad = [0] * (self.batch - len(source)), [self.batch] * (self.batch - len(source))
            with sharding.activate(self.mesh):
                self.slots = _move_program(
                    self.slots, np.asarray(source + pad[0], np.int32), np.asarray(target + pad[1], np.int32)
                )
            for a, b in zip(source, target, strict=True):
                self.requests[b], self.requests[a] = self.requests[a], None
            live = list(range(len(live)))
        ways = sharding.batch_ways(self.mesh)
        return min(self.batch, max(ways, bucket(live[-1] + 1, 1)))

    def _span(self, longest: int = 0) -> int:
        """The sequence indices the slots' cache needs: a power of two (at least `MIN_SPAN`) that
        holds every live request's tokens, a prompt of `longest` tokens about to join them, and
        the `steps_per_call` tokens the next decode adds to each."""
        held = max([longest, *(len(r.prompt) + len(r.tokens) for r in self.requests if r is not None)])
        return min(self.max_length, bucket(held + self.steps_per_call, MIN_SPAN))

    def _resize(self, span: int) -> None:
        """Gives the slots' cache `span` sequence indices (`_resize_program`), grown or cut.

        Why the cache follows the requests instead of holding `max_length`: a decode step reads
        every sequence index the cache holds, and a server's `max_length` is the whole context.
        A resize copies the cache once when the longest request crosses a power of two; cutting
        a `max_length` cache to the span in each decode call instead cost a copy per call (17m,
        16 slots at span 1024: 41 ms a call, half of an 8-step decode)."""
        if span != self.span:
            with sharding.activate(self.mesh):
                self.slots = _resize_program(self.slots, sizes=slot_counts(self.config, span))
            self.span = span

    def _end(self, slot: int, reason: str) -> None:
        self.requests[slot]._finish(reason)
        self.requests[slot] = None

    def _release(self, slot: int, reason: str) -> None:
        """Ends the request of a slot that the device still decodes (cancelled, or at a stop
        string), and stops the device decoding it."""
        self.slots = self.slots.replace(active=self.slots.active.at[slot].set(False))
        self._end(slot, reason)

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self.requests):
            if request is not None and request._cancelled:
                self._release(slot, "cancelled")
        for request in [r for r in self.queue if r._cancelled]:
            self.queue.remove(request)
            request._finish("cancelled")
        if self.prefilling is not None and self.prefilling.request._cancelled:
            self.prefilling.request._finish("cancelled")
            self.prefilling = None

    def _top(self, requests: Sequence[Request | None]) -> int:
        """How many top log-probabilities the programs compute (static): 0 when no request wants
        them, else the engine's `max_logprobs` (one program, whatever each request asks)."""
        return self.max_logprobs if any(r is not None and r.logprobs is not None for r in requests) else 0

    def _flags(self) -> tuple[bool, ...]:
        """Which logits processors the live requests use (any of them): part of the program."""
        flags = [False] * 6
        for request in self.requests:
            if request is not None:
                flags = [a or b for a, b in zip(flags, request.config.static(), strict=True)]
        return tuple(flags)

    def _free_slots(self) -> list[int]:
        taken = {self.prefilling.slot} if self.prefilling is not None else set()
        return [s for s, r in enumerate(self.requests) if r is None and s not in taken]

    def _admit(self) -> bool:
        """Prefills queued requests into free slots; True if any was admitted or advanced."""
        started = time.perf_counter()
        moved = False
        if self.prefilling is not None:
            moved = self._advance_chunked()
        while self.queue:
            free = self._free_slots()
            if not free:
                break
            long = next((r for r in self.queue if len(r.prompt) > self.prefill_chunk), None)
            if long is not None and self.prefilling is None:  # one long prompt at a time, a chunk per round
                self.queue.remove(long)
                self._start_chunked(long, free[0])
                moved = True
                continue
            # Short prompts in queue order, as many as there are free slots; a long one waiting
            # for its turn does not hold them up.
            admitted = [r for r in self.queue if len(r.prompt) <= self.prefill_chunk][: len(free)]
            if not admitted:
                break
            for request in admitted:
                self.queue.remove(request)
            for group in self._groups(admitted):
                self._prefill(group, free[: len(group)])
                free = free[len(group) :]
            moved = True
        with self._room:
            self._room.notify_all()
        self.stats["prefill_s"] += time.perf_counter() - started
        return moved

    def _groups(self, requests: list[Request]) -> list[list[Request]]:
        """The prefill calls for `requests` (each call at most `prefill_batch` prompts, padded to
        the longest of them): runs of the prompts sorted by length, chosen to cost the least
        (`PREFILL_CALL` and `PREFILL_ROW`, and a token for each token of padded width). Prompts of
        mixed lengths padded to the longest of them would mostly prefill padding (a prompt of 20
        tokens beside one of 200: 400 tokens for 220), and one call per prompt pays the call's
        cost each time."""
        requests = sorted(requests, key=lambda r: len(r.prompt))

        def cost(run: list[Request]) -> int:
            rows = min(self.prefill_batch, bucket(len(run), 1))  # as `_prefill` pads them
            return PREFILL_CALL + rows * (PREFILL_ROW + bucket(len(run[-1].prompt), maximum=self.prefill_chunk))

        best: list[tuple[int, int]] = [(0, 0)]  # best[j]: (cost of the first j prompts, where their last run starts)
        for j in range(1, len(requests) + 1):
            starts = range(max(0, j - self.prefill_batch), j)
            best.append(min((best[i][0] + cost(requests[i:j]), i) for i in starts))
        groups, j = [], len(requests)
        while j:
            i = best[j][1]
            groups.append(requests[i:j])
            j = i
        return groups[::-1]

    def _params(self, requests: Sequence[Request | None]) -> Params:
        """The `Params` rows of `requests` (None: a filler row)."""
        rows = []
        for r in requests:
            c = r.config if r is not None else GenerationConfig()
            limits = r.limits if r is not None else None
            stop = list(limits.eos if limits else ())
            rows.append((
                limits.max_new if limits else 1, c.min_new_tokens, c.do_sample, c.temperature, c.top_k or 0,
                1.0 if c.top_p is None else c.top_p, c.min_p or 0.0, c.repetition_penalty or 1.0,
                np.asarray(jax.random.key_data(jax.random.key(c.seed))), stop + [-1] * (MAX_STOP_TOKENS - len(stop)),
            ))  # fmt: skip
        columns = list(zip(*rows, strict=True))
        dtypes = (
            np.int32,
            np.int32,
            bool,
            np.float32,
            np.int32,
            np.float32,
            np.float32,
            np.float32,
            np.uint32,
            np.int32,
        )
        return Params(*(np.asarray(col, dtype) for col, dtype in zip(columns, dtypes, strict=True)))

    def _after_prefill(self, requests: Sequence[Request], slots: Sequence[int], new: Slots, logprobs) -> None:
        """Writes the `_prefilled` requests into their slots, the cache first resized to hold
        them, and hands each its first token."""
        targets = np.full(new.tokens.shape, self.batch, np.int32)  # out of range (filler rows): dropped
        targets[: len(slots)] = slots
        self._resize(max(self.span, self._span(max(len(r.prompt) for r in requests))))
        with sharding.activate(self.mesh):
            self.slots = _insert_program(self.slots, targets, new)
        first, stopped = sharding.to_host(new.tokens), ~sharding.to_host(new.active)
        logprobs = None if logprobs is None else jax.tree.map(sharding.to_host, logprobs)
        for i, (request, slot) in enumerate(zip(requests, slots, strict=False)):
            token = int(first[i])
            request._emit([token], _entries(logprobs, ([i],)) if request.logprobs is not None else ())
            self.stats["tokens"] += 1
            if stopped[i]:
                request._finish("stop" if token in request.limits.eos or request.stop_string_seen else "length")
            else:
                self.requests[slot] = request
                if request.stop_string_seen:  # the first token already completes a stop string
                    self._release(slot, "stop")

    def _prefill(self, group: list[Request], slots: list[int]) -> None:
        width = bucket(max(len(r.prompt) for r in group), maximum=self.prefill_chunk)
        # As many rows as prompts, bucketed (a program per bucket): a server's slots free up one
        # or two at a time, and a fixed `prefill_batch` rows would mostly prefill filler.
        rows = min(self.prefill_batch, bucket(len(group), 1))
        ids, valid = _left_padded([r.prompt for r in group], width, rows)
        valid[len(group) :, -1] = True  # filler rows: one token, written nowhere
        params = self._params([*group, *([None] * (rows - len(group)))])
        flags = tuple(any(f) for f in zip(*(r.config.static() for r in group), strict=True))
        with sharding.activate(self.mesh):
            new, logprobs = _prefill_program(
                self.graphdef, self.state, self.kernel, ids, valid, params, size=self.prefill_chunk, flags=flags,
                top=self._top(group),
            )  # fmt: skip
        self._after_prefill(group, slots, new, logprobs)

    def _start_chunked(self, request: Request, slot: int) -> None:
        """Starts prefilling a long prompt a chunk per round. Its whole chunks come last, and the
        rest comes first, left-padded to a power of two: 300 tokens in chunks of 256 are 64 + 256
        columns, not 512."""
        chunk, length = self.prefill_chunk, len(request.prompt)
        rest = length - (length - 1) // chunk * chunk  # 1 .. chunk tokens before the whole chunks
        lead = bucket(rest, maximum=chunk)
        width = lead + length - rest
        ids, valid = _left_padded([request.prompt], width)
        positions = np.where(valid, np.cumsum(valid, axis=-1) - 1, 0).astype(np.int32)
        size = min(bucket(width), self.max_length)
        cache = init_cache(self.config, 1, size, self.slots.cache.layers[0].dtype)
        cuts = [0, *range(lead, width + 1, chunk)]
        self.prefilling = _Prefilling(request, slot, cache, ids, valid, positions, cuts)
        self._advance_chunked()

    def _advance_chunked(self) -> bool:
        """The next chunk of the long prompt being prefilled; its last one writes it into its slot."""
        p = self.prefilling
        part = slice(p.cuts[p.done_chunks], p.cuts[p.done_chunks + 1])
        ids, valid, positions = p.ids[:, part], p.valid[:, part], p.positions[:, part]
        with sharding.activate(self.mesh):
            if part.stop < p.ids.shape[1]:
                p.cache = _chunk_program(self.graphdef, self.state, p.cache, ids, valid, positions)
                p.done_chunks += 1
                return True
            # The whole prompt (for its seen tokens) at the cache's size: a program per size, not per width.
            prompt, prompt_valid = _left_padded([p.request.prompt], max(layer.slots for layer in p.cache.layers))
            new, logprobs = _chunk_finish_program(
                self.graphdef, self.state, self.kernel, p.cache, prompt, prompt_valid, ids, valid, positions,
                self._params([p.request]), flags=p.request.config.static(), top=self._top([p.request]),
            )  # fmt: skip
        self.prefilling = None
        self._after_prefill([p.request], [p.slot], new, logprobs)
        return True

    # ---- running --------------------------------------------------------------------------
    def run(self) -> None:
        """Rounds until every submitted request has ended."""
        while self.step():
            pass

    def start(self) -> None:
        """Runs the rounds in a background thread (a server's), until `stop()`."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ettin-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()  # a submit from here on wakes the wait below
            try:
                idle = not self.step()
            except Exception as e:  # a bug of ours: fail every request rather than leave them waiting
                logging.getLogger(__name__).exception("the engine's round failed")
                self._fail(f"{type(e).__name__}: {e}")
                return
            if idle:
                self._wake.wait(timeout=0.05)

    def _fail(self, error: str) -> None:
        """Ends every request, queued or in a slot, with `error`; later submits fail at once."""
        with self._lock:
            self.error = error
            while self._inbox:
                self.queue.append(self._inbox.popleft())
            waiting = [*self.queue, *(r for r in self.requests if r is not None)]
            if self.prefilling is not None:
                waiting.append(self.prefilling.request)
            self.queue.clear()
            self.requests = [None] * self.batch
            self.prefilling = None
            for request in waiting:
                request._finish(None, f"the engine failed: {error}")

    def stop(self) -> None:
        """Stops the thread after its round; requests still queued or in slots stay there."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def utilisation(self) -> float:
        """Slot-steps that made a token of a request, over all slot-steps decoded."""
        return self.stats["useful_steps"] / max(self.stats["slot_steps"], 1)


def _entries(logprobs: Logprobs, where: tuple) -> list[tuple[float, list[tuple[int, float]]]]:
    """(chosen logprob, [(token, logprob), ...]) of the tokens that `where` picks from host
    `Logprobs` arrays ((steps, slot) of a decode, or ([row],) of a prefill)."""
    chosen, values, ids = logprobs.chosen[where], logprobs.top_values[where], logprobs.top_ids[where]
    top = values.shape[-1]
    rows = zip(chosen.reshape(-1), values.reshape(-1, top), ids.reshape(-1, top), strict=True)
    return [(float(c), list(zip(map(int, i), map(float, v), strict=True))) for c, v, i in rows]


def _left_padded(prompts: Sequence[list[int]], width: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`prompts` left-padded with 0 to `width` columns, in `rows` rows (default: one each; the
    rest all padding): ids (rows, width) int32 and valid (rows, width) bool."""
    ids = np.zeros((rows or len(prompts), width), np.int32)
    valid = np.zeros(ids.shape, bool)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = prompt
        valid[i, width - len(prompt) :] = True
    return ids, valid


def _empty_slots(config, batch: int, length: int, dtype) -> Slots:
    """Every slot free. Each field its own buffer: the programs donate (reuse) them all."""
    cache = init_cache(config, batch, length, dtype)

    def full(value, dtype, shape=(batch,)) -> Array:
        return jnp.full(shape, value, dtype)

    params = Params(
        max_new=full(0, jnp.int32), min_new=full(0, jnp.int32), sample=full(False, bool),
        temperature=full(1, jnp.float32), top_k=full(0, jnp.int32), top_p=full(1, jnp.float32),
        min_p=full(0, jnp.float32), penalty=full(1, jnp.float32), key=full(0, jnp.uint32, (batch, 2)),
        stop=full(-1, jnp.int32, (batch, MAX_STOP_TOKENS)),
    )  # fmt: skip
    return Slots(
        cache=Cache(cache.layers, full(0, jnp.int32)), tokens=full(0, jnp.int32), positions=full(0, jnp.int32),
        generated=full(0, jnp.int32), active=full(False, bool), seen=full(False, bool, (batch, config.vocab_size)),
        params=params,
    )  # fmt: skip


def _slot_bytes(config, length: int, dtype) -> int:
    """KV-cache bytes of one slot: a region of `length` tokens on global layers, a window's ring
    on sliding ones, keys and values (and their scales with an int8 cache), counted abstractly."""
    cache = jax.eval_shape(lambda: init_cache(config, 1, length, dtype))
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache.layers))


def default_batch_size(slot_bytes: int) -> int:
    """As many slots as a quarter of the device's memory holds, at least 1, at most 64; on CPU
    at most 16: there a decode step costs in proportion to its slots, and more slots only wait
    longer for the slowest (benchmarks/throughput.py, 17m, 2026-11-30: 16 slots made 1168
    tokens/s with 75% of slot-steps useful, 64 slots 695 and 30%)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    budget = stats.get("bytes_limit", 4 * DEFAULT_MEMORY) // 4
    most = 16 if on_cpu() else 64
    return int(max(1, min(most, budget // max(slot_bytes, 1))))


def generate_batch(
    model: Any, inputs: Sequence[Sequence[int]], *, tokenizer: Any = None, **kwargs: Any
) -> list[list[int]]:
    """Each request's new tokens, in input order, through its stop token, the token that
    completes one of its `stop_strings` (read with `tokenizer`, as in `generate`), or
    `max_new_tokens`. `kwargs` are `generate`'s; `max_new_tokens`, `temperature`, `top_k`,
    `top_p`, `min_p` and `seed` may each be a list with one value per request, and
    `stop_strings` a list with one list of strings (or None) per request (a list of strings is
    every request's). Engine settings (`max_batch_size`, `steps_per_call`, ...) may be given
    too. Requests that cannot run are an error that names each, before any work."""
    engine_args = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENGINE_ARGS}
    per_request = {k: kwargs.pop(k) for k in list(kwargs) if k in _PER_REQUEST and _one_per_request(k, kwargs[k])}
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (Sequence, np.ndarray)):
        raise GenerationTypeError(f"inputs must be a list of prompts (token-id lists), got {describe(inputs)}")
    if not len(inputs):
        raise GenerationError("inputs is empty: no prompts given")
    for name, values in per_request.items():
        if len(values) != len(inputs):
            raise GenerationError(f"{name} has {len(values)} values for {len(inputs)} requests")
    prompts, configs, bad, longest = [], [], [], 1
    for i in range(len(inputs)):
        try:
            prompt = token_list(inputs[i], f"inputs[{i}]", errors=ERRORS)
            config = GenerationConfig().replace(**kwargs, **{k: v[i] for k, v in per_request.items()})
            limits = _limits(model.config, config, prompt, f"inputs[{i}]", tokenizer=tokenizer)
            longest = max(longest, len(prompt) + limits.max_new)
            prompts.append(prompt)
            configs.append(config)
        except GenerationError as e:
            bad.append((i, e))
    if bad:  # a TypeError when every request's problem is a wrong type
        error = GenerationTypeError if all(isinstance(e, TypeError) for _, e in bad) else GenerationError
        raise error("; ".join(f"request {i}: {e}" for i, e in bad))
    engine_args.setdefault("max_length", min(model.config.max_position_embeddings, bucket(longest)))
    engine_args.setdefault("max_queue", len(inputs))
    if engine_args.get("max_batch_size") is None:  # no more slots than requests (a power of two)
        dtype = model.model.embeddings.tok_embeddings.dtype
        slot_bytes = _slot_bytes(model.config, engine_args["max_length"], dtype)
        engine_args["max_batch_size"] = min(default_batch_size(slot_bytes), bucket(len(inputs), 1))
    engine = Engine(model, **engine_args)
    requests = [engine.submit(p, c, tokenizer=tokenizer) for p, c in zip(prompts, configs, strict=True)]
    engine.run()
    errors = [f"request {i}: {r.error}" for i, r in enumerate(requests) if r.error]
    if errors:
        raise GenerationError("; ".join(errors))
    return [r.tokens for r in requests]


def _limits(
    config: Any, c: GenerationConfig, prompt: list[int], name: str, context: int | None = None, tokenizer: Any = None
) -> Limits:
    """A request's `Limits`, or the `GenerationError` that names why it cannot run: its prompt
    (`name`), its arguments (stop strings without a `tokenizer`, scores the engine does not
    return), or more stop ids than a slot holds. What `submit` and `generate_batch` check,
    before any work."""
    check_tokenizer(c, tokenizer)
    tokens_only(c, "the engine (generate_batch)")
    try:
        check_prompts([prompt], config.vocab_size, [name])
    except GenerationError as e:
        raise GenerationError(str(e).replace("prompt 0 ", "the prompt ", 1)) from None
    limits = resolve(config, c, len(prompt), context)
    if len(limits.eos) > MAX_STOP_TOKENS:
        raise GenerationError(f"eos_token_id has {len(limits.eos)} ids; at most {MAX_STOP_TOKENS} stop token ids fit")
    return limits


_ENGINE_ARGS = ("max_batch_size", "max_length", "steps_per_call", "prefill_batch", "prefill_chunk", "max_queue")
_PER_REQUEST = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop_strings")


def _one_per_request(name: str, value: Any) -> bool:
    """Whether a `generate_batch` argument gives one value per request: a list does, except
    that a list of strings is every request's `stop_strings`, and only a list whose items are
    lists (or None) gives each request its own."""
    if not isinstance(value, (list, tuple)):
        return False
    if name == "stop_strings":
        return bool(value) and all(v is None or isinstance(v, (list, tuple)) for v in value)
    return True
