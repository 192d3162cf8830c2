"""Continuous batching: a fixed number of decode slots, each serving its own request, refilled
from a queue the moment a request ends.

Per slot, on the device (`Slots`): the slot's rows of one preallocated KV cache (global layers a
region of `max_length` tokens, sliding layers a ring of `sliding_window`), its own sequence
length and RoPE position, the token to feed next, and its request's sampling values, limits
and stop tokens. A slot's cache takes 2 * N * H * (globals * max_length + slidings * window)
values: 6.8 MB for 17m in float32 at max_length 1024, 595 MB for 1b in bfloat16 at 8192
(`Engine.slot_bytes`). One round of `Engine.step()`:
1. admit: queued requests with short prompts are prefilled several at a time (bucketed width
   and rows), each row's first token chosen and its cache rows written into a free slot, moved
   down so that its tokens sit at the slot's first cache slots (sequence indices from 0), in one
   program; a long prompt is prefilled `prefill_chunk` tokens per round into a cache
   row of its own, so that decoding is never stalled for a whole prefill;
2. decode: `steps_per_call` decode steps in one program (a `lax.scan`), so that the host's work
   (reading tokens, refilling slots) is paid once per several steps. It runs only the slots that
   hold requests (a power of two of them, `_width`) and attends over only the sequence indices
   they hold (a power of two, at least `MIN_SPAN`, `_span`): a server's `max_length` is the whole
   context, and a step that read all of it would cost 4x more at 17m (8192 against 1024);
3. the host hands each request its new tokens and frees the slots of those that ended.

Stop strings are text, read on the host: a request with `stop_strings` (and a `tokenizer`) keeps
a `detokenize.TextStream`, and takes its new tokens only through the one that completes a stop
string (tokens the same decode call made after it are dropped); its slot is freed at once, so
it decodes at most `steps_per_call` steps past its stop.

A request's tokens do not depend on its neighbours: every computation is per row, and a
sampled token's randomness is `fold_in(key(seed), token index)`. Greedy tokens equal
`model.generate` on the prompt alone.

The programs: one prefill per prompt-width and row bucket, one chunk step and one chunk finish
per chunked-cache size, and one decode per width, span and set of logits processors in use; a
stream of any length reuses them.
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
from ettin_jax.cache import Cache, LayerCache, init_cache
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
MIN_SPAN = 256  # the fewest sequence indices a decode step attends over (see Engine._span)
DEFAULT_MEMORY = 2 << 30  # bytes for the KV cache when the device does not say how much it has


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
def _cut(slots: Slots, width: int, span: int) -> Slots:
    """The first `width` slots, and of the layers that hold a region of `max_length` tokens
    (never a ring that wraps), the first `span` cache slots only: every live request's tokens lie
    there, so attention reads `span` keys instead of `max_length`."""
    longest = max(layer.slots for layer in slots.cache.layers)

    def layer(c: LayerCache) -> LayerCache:
        if c.slots == longest and span < longest:
            return c.map_kv(lambda a: a[:width, :, :span]).replace(index=c.index[:width, :span])
        return jax.tree.map(lambda x: x[:width], c)

    rest = jax.tree.map(lambda x: x[:width], slots.replace(cache=None))
    return rest.replace(cache=Cache(tuple(map(layer, slots.cache.layers)), slots.cache.length[:width]))


@functools.partial(
    compilation.jit, static_argnames=("graphdef", "steps", "flags", "width", "span", "top"), donate_argnames=("slots",)
)
def _decode_program(graphdef, state, kernel, slots: Slots, *, steps: int, flags: tuple[bool, ...], width: int,
                    span: int, top: int):  # fmt: skip
    """`steps` decode steps for the first `width` slots (the others are free), attending over
    the first `span` sequence indices (`_cut`); returns the slots, the tokens (steps, width),
    which of them belong to a request (steps, width), and their `Logprobs` (steps, width, ...)
    when `top` > 0."""
    model = nnx.merge(graphdef, state)
    everything, slots = slots, _cut(slots, width, span)
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
    """Moves the requests in slots `source` (K,) to the free slots `target` (K,)."""
    return jax.tree.map(lambda x: x.at[target].set(x[source]), slots)


def _compact(layer: LayerCache, pad: Array) -> LayerCache:
    """A prefilled layer cache (P rows) with each row's tokens moved down by its `pad` (P,)
    leading padding tokens: sequence indices from 0, slot = index % slots. A row then holds its
    request's tokens at the first slots, which is what lets a decode attend over a span."""
    src = (jnp.arange(layer.slots)[None, :] + pad[:, None]) % layer.slots  # (P, S): old slot of new slot j
    index = jnp.take_along_axis(layer.index, src, axis=1)
    take = lambda a: jnp.take_along_axis(a, src[:, None, :, None], axis=2)  # noqa: E731
    return layer.map_kv(take).replace(index=jnp.where(index >= 0, index - pad[:, None], -1))


def _insert(slots: Slots, rows: Array, cache: Cache, first, lengths, seen, params: Params, stopped) -> Slots:
    """Writes prefilled requests into the slots `rows` (P,) (B for none: dropped): their cache
    rows, compacted (`_compact`) into the slots' first cache slots (the rest marked empty),
    first token, length (`lengths` (P,): prompt tokens, also the next RoPE position), seen
    tokens and params."""

    def put(target: Array, value: Array) -> Array:
        return target.at[rows].set(value.astype(target.dtype), mode="drop")

    def put_layer(target: LayerCache, new: LayerCache) -> LayerCache:
        new = _compact(new, jnp.broadcast_to(cache.length, lengths.shape) - lengths)
        n = min(new.slots, target.slots)  # slots past a prompt hold nothing once compacted
        index = jnp.pad(new.index[:, :n], [(0, 0), (0, target.slots - n)], constant_values=-1)

        def put_kv(t: Array, value: Array) -> Array:
            return t.at[rows, :, :n].set(value[:, :, :n].astype(t.dtype), mode="drop")

        return target.map_kv(put_kv, new).replace(index=put(target.index, index))

    layers = tuple(put_layer(t, n) for t, n in zip(slots.cache.layers, cache.layers, strict=True))
    return slots.replace(
        cache=Cache(layers, put(slots.cache.length, lengths)),
        tokens=put(slots.tokens, first),
        positions=put(slots.positions, lengths),
        generated=put(slots.generated, jnp.ones_like(first)),
        active=put(slots.active, ~stopped),
        seen=put(slots.seen, seen),
        params=jax.tree.map(put, slots.params, params),
    )


def _first_tokens(logits, ids, valid, params: Params, flags, top: int):
    """The first new token of each prefilled row (logits (P, V) float32), its `seen` row,
    whether it ends the request, and its `Logprobs` (when `top` > 0)."""
    seen = _prompt_tokens(ids, valid, logits.shape[-1])
    first = _choose(logits, seen, jnp.zeros(ids.shape[:1], jnp.int32), params, flags)
    _, stopped = _after(first, jnp.zeros_like(first), params)
    return first, seen.at[jnp.arange(ids.shape[0]), first].set(True), stopped, _logprobs(logits, first, top)


@functools.partial(compilation.jit, static_argnames=("graphdef", "flags", "top"), donate_argnames=("slots",))
def _prefill_program(graphdef, state, kernel, slots: Slots, rows, ids, valid, params: Params, *, flags, top):
    """Prefills P left-padded prompts (P, T) and writes them into the slots `rows` (P,);
    returns the slots, the first tokens (P,), which requests they ended, and their `Logprobs`."""
    model = nnx.merge(graphdef, state)
    logits, positions, cache = _prefill(model, ids, valid, ids.shape[1], kernel)
    first, seen, stopped, logprobs = _first_tokens(logits, ids, valid, params, flags, top)
    slots = _insert(slots, rows, cache, first, positions, seen, params, stopped)
    return slots, first, stopped, logprobs


@functools.partial(compilation.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _chunk_program(graphdef, state, cache: Cache, ids, valid, positions):
    """One chunk (1, C) of a long prompt into its own one-row preallocated cache."""
    model = nnx.merge(graphdef, state)
    out = model.model(jnp.where(valid, ids, 0), valid, positions, past_key_values=cache)
    return out.past_key_values


@functools.partial(compilation.jit, static_argnames=("graphdef", "flags", "top"), donate_argnames=("slots",))
def _chunk_finish_program(graphdef, state, kernel, slots, rows, cache, prompt, prompt_valid, ids, valid, positions,
                          params, *, flags, top):  # fmt: skip
    """The last chunk of a long prompt, its first token, and the request written into its slot."""
    model = nnx.merge(graphdef, state)
    out = model.model(
        jnp.where(valid, ids, 0), valid, positions, past_key_values=cache,
        rows=jnp.full((1, 1), ids.shape[1] - 1, jnp.int32),
    )  # fmt: skip
    logits = model.logits(out.last_hidden_state, kernel)[:, 0].astype(jnp.float32)
    first, seen, stopped, logprobs = _first_tokens(logits, prompt, prompt_valid, params, flags, top)
    slots = _insert(slots, rows, out.past_key_values, first, positions[:, -1] + 1, seen, params, stopped)
    return slots, first, stopped, logprobs


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
    ids: np.ndarray  # (1, T) left-padded to a multiple of the chunk
    valid: np.ndarray
    positions: np.ndarray
    done_chunks: int = 0


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    """Continuous batching over a model's causal LM; see the module docstring.

    `max_batch_size`: decode slots (default: as many as fit in a quarter of the device's memory,
    at most 64). `max_length`: the most tokens (prompt + new) a request may hold (default:
    max_position_embeddings). `steps_per_call`: decode steps per host round trip.
    `prefill_batch`: prompts prefilled together. `prefill_chunk`: longer prompts are prefilled
    this many tokens per round. `max_queue`: requests waiting before `submit` blocks.
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
        self.slots = self._place(_empty_slots(config, self.batch, self.max_length, dtype))
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
            top, span = self._top(self.requests[:width]), self._span()
            before = time.perf_counter()
            with sharding.activate(self.mesh):
                self.slots, tokens, emitted, logprobs = _decode_program(
                    self.graphdef, self.state, self.kernel, self.slots, steps=self.steps_per_call, flags=flags,
                    width=width, span=span, top=top,
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
            with sharding.activate(self.mesh):
                self.slots = _move_program(self.slots, np.asarray(source, np.int32), np.asarray(target, np.int32))
            for a, b in zip(source, target, strict=True):
                self.requests[b], self.requests[a] = self.requests[a], None
            live = list(range(len(live)))
        ways = sharding.batch_ways(self.mesh)
        return min(self.batch, max(ways, bucket(live[-1] + 1, 1)))

    def _span(self) -> int:
        """The sequence indices the next decode reads: a power of two (at least `MIN_SPAN`) that
        holds every live request's tokens and the `steps_per_call` it may add, so that a decode
        step's attention costs what the requests hold, not `max_length` (a program per span)."""
        held = max(len(r.prompt) + len(r.tokens) for r in self.requests if r is not None)
        return min(self.max_length, bucket(held + self.steps_per_call, MIN_SPAN))

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
            # Short prompts in queue order; a long one waiting for its turn does not hold them up.
            group = [r for r in self.queue if len(r.prompt) <= self.prefill_chunk][: min(self.prefill_batch, len(free))]
            if not group:
                break
            for request in group:
                self.queue.remove(request)
            self._prefill(group, free[: len(group)])
            moved = True
        with self._room:
            self._room.notify_all()
        self.stats["prefill_s"] += time.perf_counter() - started
        return moved

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

    def _after_prefill(self, requests: Sequence[Request], slots: Sequence[int], first, stopped, logprobs) -> None:
        first, stopped = sharding.to_host(first), sharding.to_host(stopped)
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
        ids = np.zeros((rows, width), np.int32)
        valid = np.zeros((rows, width), bool)
        for i, request in enumerate(group):
            ids[i, width - len(request.prompt) :] = request.prompt
            valid[i, width - len(request.prompt) :] = True
        valid[len(group) :, -1] = True  # filler rows: one token, written nowhere
        targets = np.full((rows,), self.batch, np.int32)  # out of range: dropped
        targets[: len(group)] = slots
        params = self._params([*group, *([None] * (rows - len(group)))])
        flags = tuple(any(f) for f in zip(*(r.config.static() for r in group), strict=True))
        top = self._top(group)
        with sharding.activate(self.mesh):
            self.slots, first, stopped, logprobs = _prefill_program(
                self.graphdef, self.state, self.kernel, self.slots, targets, ids, valid, params, flags=flags, top=top
            )
        self._after_prefill(group, slots, first, stopped, logprobs)

    def _start_chunked(self, request: Request, slot: int) -> None:
        chunk = self.prefill_chunk
        width = -(-len(request.prompt) // chunk) * chunk
        ids = np.zeros((1, width), np.int32)
        valid = np.zeros((1, width), bool)
        ids[0, width - len(request.prompt) :] = request.prompt
        valid[0, width - len(request.prompt) :] = True
        positions = np.where(valid, np.cumsum(valid, axis=-1) - 1, 0).astype(np.int32)
        dtype = self.slots.cache.layers[0].dtype
        cache = init_cache(self.config, 1, min(bucket(width), self.max_length), dtype)
        self.prefilling = _Prefilling(request, slot, cache, ids, valid, positions)
        self._advance_chunked()

    def _advance_chunked(self) -> bool:
        """The next chunk of the long prompt being prefilled; its last one writes it into its slot."""
        p, chunk = self.prefilling, self.prefill_chunk
        part = slice(p.done_chunks * chunk, (p.done_chunks + 1) * chunk)
        ids, valid, positions = p.ids[:, part], p.valid[:, part], p.positions[:, part]
        with sharding.activate(self.mesh):
            if part.stop < p.ids.shape[1]:
                p.cache = _chunk_program(self.graphdef, self.state, p.cache, ids, valid, positions)
                p.done_chunks += 1
                return True
            flags = p.request.config.static()
            self.slots, first, stopped, logprobs = _chunk_finish_program(
                self.graphdef, self.state, self.kernel, self.slots, np.asarray([p.slot], np.int32), p.cache, p.ids,
                p.valid, ids, valid, positions, self._params([p.request]), flags=flags, top=self._top([p.request]),
            )  # fmt: skip
        self.prefilling = None
        self._after_prefill([p.request], [p.slot], first, stopped, logprobs)
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
