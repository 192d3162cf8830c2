"""Log-probabilities of given tokens, in batched, bucketed forward passes: what an OpenAI
server's `echo` with `logprobs` returns for a prompt, and what an evaluation harness asks for.

- `token_logprobs(model, sequences)`: for every token after the first, its log-probability given
  the tokens before it, and the most likely tokens at that place (the server's `echo`).
- `loglikelihood(model, requests)`: for (context, continuation) token lists, the continuation's
  summed log-probability given the context, and whether greedy decoding would have produced it:
  lm-evaluation-harness's `loglikelihood` pair.
- `loglikelihood_rolling(model, documents)`: a whole document's log-likelihood, in windows of
  the model's context, as lm-evaluation-harness's `loglikelihood_rolling` defines it (the
  perplexity of a text).

Each sorts its inputs by length and groups them into batches of at most `max_batch_tokens`
tokens, right-padded to a bucketed width, so that a few compiled programs serve any stream.
Log-probabilities are the float32 log-softmax of the model's logits over its whole vocabulary,
as `generate` and transformers compute them. `loglikelihood` computes the last layer and the
logits only at the continuation's places: the vocabulary projection is most of a small model's
work, and a harness's contexts are longer than its continuations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import compilation, sharding
from ettin_jax.cache import Cache
from ettin_jax.generation import ERRORS, GenerationError, GenerationTypeError, _place
from ettin_jax.inputs import describe, integer, token_list
from ettin_jax.padding import bucket

DEFAULT_BATCH_TOKENS = 4096  # per forward pass of `token_logprobs`, which keeps every token's logits
LOGLIKELIHOOD_BATCH_TOKENS = 16384  # per batch of `loglikelihood`, which keeps the scored tokens' only
HEAD_CHUNK = 1024  # scored tokens whose logits `loglikelihood` holds at once


@dataclasses.dataclass(frozen=True)
class SequenceLogprobs:
    """Token t's log-probability given tokens < t, for t = 1..T-1 (the first token has none)."""

    chosen: np.ndarray  # (T-1,) float32
    top_ids: np.ndarray  # (T-1, top) int32, most likely first
    top_values: np.ndarray  # (T-1, top) float32


def _rows(n: int, ways: int) -> int:
    """Rows for a batch of n: a power of two, then whole rows for each of the mesh's `ways`
    batch shards."""
    return -(-bucket(n, 1) // ways) * ways


def _batches(
    lengths: Sequence[int], max_batch_tokens: int, ways: int, context: int
) -> Iterator[tuple[list[int], int, int]]:
    """Groups of input indices, shortest first, with their bucketed width (at most `context`)
    and batch rows: as many as `max_batch_tokens` tokens hold (at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = 0
    while start < len(order):
        width = bucket(lengths[order[start]], maximum=context)
        rows = max(1, max_batch_tokens // width)
        group = [i for i in order[start : start + rows] if lengths[i] <= width] or [order[start]]
        width = bucket(max(lengths[i] for i in group), maximum=context)
        yield group, width, _rows(len(group), ways)
        start += len(group)


def _split(model: Any) -> tuple[Any, Any, Any]:
    """(graphdef, state, mesh or None): the model taken apart once for all of a call's batches."""
    graphdef, state = nnx.split(model)
    return graphdef, state, sharding.mesh_of(state)


def _run(program: Any, split: tuple[Any, Any, Any], rows: dict[str, np.ndarray],
         shared: dict[str, np.ndarray] | None = None, **static: Any) -> tuple[np.ndarray, ...]:  # fmt: skip
    """`program(graphdef, state, *rows, *shared, **static)` for a `_split` model, on its mesh (if
    any): `rows` split over its batch axes and `shared` replicated; host results."""
    graphdef, state, mesh = split
    with sharding.activate(mesh):
        rows, shared = _place(mesh, rows, shared or {})
        return tuple(map(sharding.to_host, program(graphdef, state, *rows.values(), *shared.values(), **static)))


def _token_lists(model: Any, lists: Any, name: str, *, fit: bool = True, empty: bool = False) -> list[list[int]]:
    """`lists[i]` as lists of ints in the vocabulary (and, with `fit`, at most the model's
    context; with `empty`, possibly empty), or an error naming `name[i]` and the place."""
    if isinstance(lists, (str, bytes)) or not isinstance(lists, (Sequence, np.ndarray)):
        raise GenerationTypeError(f"{name} must be a list of token-id lists, got {describe(lists)}")
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    out = []
    for i, values in enumerate(lists):
        tokens = token_list(values, f"{name}[{i}]", errors=ERRORS)
        bad = next((j for j, t in enumerate(tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise GenerationError(f"{name}[{i}][{bad}] is {tokens[bad]}, outside the vocabulary [0, {vocab})")
        if not tokens and not empty:
            raise GenerationError(f"{name}[{i}] is empty")
        if fit and len(tokens) > context:
            raise GenerationError(f"{name}[{i}] has {len(tokens)} tokens; the model's context is {context}")
        out.append(tokens)
    if not out:
        raise GenerationError(f"{name} is empty")
    return out


# ---- every token's log-probability (the server's echo) --------------------------------------
@functools.partial(compilation.jit, static_argnames=("graphdef", "top"))
def _token_program(graphdef, state, ids, valid, *, top: int):
    """ids, valid (B, T), right-padded: (B, T-1) log-probabilities of ids[:, 1:], and the top
    (B, T-1, top) ids and values."""
    model = nnx.merge(graphdef, state)
    logits = model(jnp.where(valid, ids, 0), valid).logits[:, :-1].astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]
    values, top_ids = jax.lax.top_k(logprobs, top) if top else (logprobs[..., :0], jnp.zeros((*chosen.shape, 0)))
    return chosen, top_ids.astype(jnp.int32), values


def token_logprobs(
    model: Any, sequences: Sequence[Sequence[int]], top: int = 0, *, max_batch_tokens: int = DEFAULT_BATCH_TOKENS
) -> list[SequenceLogprobs]:
    """Each sequence's `SequenceLogprobs`, in input order. `top`: how many most likely tokens to
    return at each place. A sequence must hold at most `max_position_embeddings` tokens."""
    sequences = _token_lists(model, sequences, "sequences")
    max_batch_tokens = integer(max_batch_tokens, "max_batch_tokens", 1, errors=ERRORS)
    split = _split(model)
    ways = sharding.batch_ways(split[2])
    results: list[SequenceLogprobs | None] = [None] * len(sequences)
    context = model.config.max_position_embeddings
    for group, width, batch in _batches([len(s) for s in sequences], max_batch_tokens, ways, context):
        ids = np.zeros((batch, width), np.int32)
        valid = np.zeros((batch, width), bool)
        for row, i in enumerate(group):
            ids[row, : len(sequences[i])] = sequences[i]
            valid[row, : len(sequences[i])] = True
        chosen, top_ids, values = _run(_token_program, split, {"ids": ids, "valid": valid}, top=top)
        for row, i in enumerate(group):
            n = len(sequences[i]) - 1
            results[i] = SequenceLogprobs(chosen[row, :n], top_ids[row, :n], values[row, :n])
    return results


def _max_length(model: Any, max_length: int | None) -> int:
    context = model.config.max_position_embeddings
    if max_length is None:
        return context
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= context:
        raise GenerationError(
            f"max_length must be an integer in [1, {context}] (the model's context), got {max_length!r}"
        )
    return max_length


# ---- continuations given contexts (lm-evaluation-harness) -----------------------------------
@functools.partial(compilation.jit, static_argnames=("graphdef", "chunk"))
def _loglikelihood_program(
    graphdef, state, contexts, context_valid, tails, tail_valid, parents, picks, targets, *, chunk: int
):
    """One batch of requests that share their contexts.

    contexts, context_valid (C, S): the distinct contexts, left-padded. tails, tail_valid
    (R, T): each request's continuation without its last token, right-padded, read after its
    context's row `parents` (R,) from that row's KV cache, so that a context shared by several
    continuations (a multiple-choice question's) is read once. The states that predict the
    scored tokens are the contexts' last ones (each continuation's first token) and the tails'
    (the rest): picks (P,) indexes them, [C context ends; R * T tail places], for each scored
    token, targets (P,) the token. The vocabulary projection, most of a small model's work, runs
    on those P states alone.

    Returns each target's (P,) log-probability and (P,) whether it is its distribution's most
    likely token (`_target_logprobs`)."""
    model = nnx.merge(graphdef, state)
    count, width = contexts.shape
    positions = jnp.where(context_valid, jnp.cumsum(context_valid, axis=-1) - 1, 0).astype(jnp.int32)
    out = model.model(
        jnp.where(context_valid, contexts, 0), context_valid, positions, use_cache=True,
        rows=jnp.full((count, 1), width - 1, jnp.int32),  # the last layer's queries: the last token's only
    )  # fmt: skip
    ends = out.last_hidden_state[:, 0]  # (C, D)
    cache = out.past_key_values
    cache = Cache(
        tuple(c.map_kv(lambda a: a[parents]).replace(index=c.index[parents]) for c in cache.layers), cache.length
    )
    tail_positions = positions[parents, -1:] + 1 + jnp.arange(tails.shape[1])  # (R, T)
    hidden = model.model(jnp.where(tail_valid, tails, 0), tail_valid, tail_positions, past_key_values=cache)
    states = jnp.concatenate([ends, hidden.last_hidden_state.reshape(-1, ends.shape[-1])])[picks]  # (P, D)
    # The vocabulary's logits are made `chunk` states at a time: memory stays bounded however
    # many tokens a batch scores (a rolling window of 8k tokens would need 1.6 GB at once).
    return jax.lax.map(
        lambda c: _target_logprobs(model.logits(c[0][None])[0].astype(jnp.float32), c[1]),
        (states.reshape(-1, chunk, states.shape[-1]), targets.reshape(-1, chunk)),
    )  # (P / chunk, chunk) each; the caller flattens them


def _target_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (P, V), targets (P,): each target's log-probability, and whether it is the most
    likely token (ties count as such). The log-softmax is never materialized: the normalizer
    sums the exponentials with a matrix-vector product, which XLA:CPU runs 2.5x faster than the
    reduction of `jax.nn.log_softmax` (whose exp dominated the 17m model's scoring)."""
    top = jnp.max(logits, axis=-1)
    total = jnp.dot(jnp.exp(logits - top[:, None]), jnp.ones(logits.shape[-1], logits.dtype), precision="highest")
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - top - jnp.log(total), picked >= top


def _widths(context_length: int, tail_length: int, context: int) -> tuple[int, int]:
    """The bucketed widths of a batch's contexts and tails, which together fit in `context`
    (the longest context and the longest tail do)."""
    tail = bucket(tail_length, minimum=1, maximum=context - context_length)
    return bucket(context_length, maximum=context - tail), tail


def _context_batches(
    contexts: list[list[int]], tails: list[list[list[int]]], max_batch_tokens: int, batch_size: int | None,
    context: int,
) -> Iterator[list[int]]:  # fmt: skip
    """Groups of context indices, shortest first: as many as keep the batch's tokens (each
    context's bucketed width, and each of its requests' tail over the context's width plus its
    own) within `max_batch_tokens`, or its requests within `batch_size`; and the longest context
    and the longest tail within the model's `context`. At least one context each."""
    order = sorted(range(len(contexts)), key=lambda c: len(contexts[c]))
    group: list[int] = []
    requests = width = tail = 0
    for c in order:
        more = requests + len(tails[c])
        wider, longer = max(width, len(contexts[c])), max([tail, *map(len, tails[c])])
        fits = wider + longer <= context
        if fits:
            s, t = _widths(wider, longer, context)
            cost = _rows(len(group) + 1, 1) * s + _rows(more, 1) * (s + t)
            fits = (more <= batch_size) if batch_size else cost <= max_batch_tokens
        if group and not fits:
            yield group
            group, more, wider, longer = [], len(tails[c]), len(contexts[c]), max(map(len, tails[c]))
        group.append(c)
        requests, width, tail = more, wider, longer
    if group:
        yield group


def loglikelihood(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int | None = None,
    max_batch_tokens: int = LOGLIKELIHOOD_BATCH_TOKENS,
    batch_size: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation) pair of token lists, in input order: the continuation's
    summed log-probability given the context, and whether each of its tokens is the most
    likely one at its place (greedy decoding would have produced it).

    The model reads (context + continuation)[:-1]; a pair longer than `max_length` + 1 tokens
    (default: the model's context) loses its context's first tokens, as lm-evaluation-harness
    truncates. The context must hold at least one token (BOS, when there is nothing else), and
    the continuation at least one and at most `max_length`. Requests with the same context (a
    multiple-choice question's choices) read it once. A batch holds about `max_batch_tokens`
    tokens, or `batch_size` requests if given (more when one context has more). With
    `kv_cache_dtype="int8"` the continuations read the context's cache in int8, as generation
    does (a difference of about 1e-5 in the tiny test model's log-likelihoods)."""
    max_length = _max_length(model, max_length)
    max_batch_tokens = integer(max_batch_tokens, "max_batch_tokens", 1, errors=ERRORS)
    if batch_size is not None:
        batch_size = integer(batch_size, "batch_size", 1, errors=ERRORS)
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
        raise GenerationTypeError(
            f"requests must be a non-empty list of (context, continuation) pairs, got {describe(requests)}"
        )
    # Each request as (the context it is read after, truncated; its continuation), the
    # requests grouped by that context.
    contexts: dict[tuple[int, ...], list[int]] = {}
    continuations = []
    for i, pair in enumerate(requests):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise GenerationTypeError(
                f"requests[{i}] must be a (context, continuation) pair of token lists, got {describe(pair)}"
            )
        ctx, cont = _token_lists(model, pair, f"requests[{i}]", fit=False)
        if len(cont) > max_length:
            raise GenerationError(
                f"requests[{i}][1], the continuation, has {len(cont)} tokens; at most max_length={max_length} are scored"
            )
        contexts.setdefault(tuple((ctx + cont)[-(max_length + 1) : -len(cont)]), []).append(i)
        continuations.append(cont)
    keys = list(contexts)
    members = [contexts[k] for k in keys]
    tails = [[continuations[i][:-1] for i in m] for m in members]
    split = _split(model)
    ways = sharding.batch_ways(split[2])
    context = model.config.max_position_embeddings
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for group in _context_batches([list(k) for k in keys], tails, max_batch_tokens, batch_size, context):
        batch = [i for c in group for i in members[c]]
        width, tail = _widths(max(len(keys[c]) for c in group), max(len(continuations[i]) - 1 for i in batch), context)
        rows, count, scored = (
            _rows(len(batch), ways),
            _rows(len(group), ways),
            bucket(sum(len(continuations[i]) for i in batch)),
        )
        owners = np.full(scored, rows, np.int32)  # each scored token's request (rows: padding)
        arrays = {
            "contexts": np.zeros((count, width), np.int32), "context_valid": np.zeros((count, width), bool),
            "tails": np.zeros((rows, tail), np.int32), "tail_valid": np.zeros((rows, tail), bool),
            "parents": np.zeros(rows, np.int32),
        }  # fmt: skip
        indices = {"picks": np.zeros(scored, np.int32), "targets": np.zeros(scored, np.int32)}  # replicated
        row = at = 0
        for parent, c in enumerate(group):
            arrays["contexts"][parent, width - len(keys[c]) :] = keys[c]
            arrays["context_valid"][parent, width - len(keys[c]) :] = True
            for i in members[c]:
                cont = continuations[i]
                k = len(cont)
                arrays["tails"][row, : k - 1] = cont[:-1]
                arrays["tail_valid"][row, : k - 1] = True
                arrays["parents"][row] = parent
                # The first token is predicted by the context's end, the others by the tail.
                indices["picks"][at : at + k] = [parent, *(count + row * tail + np.arange(k - 1))]
                indices["targets"][at : at + k] = cont
                owners[at : at + k] = row
                row, at = row + 1, at + k
        chunk = min(HEAD_CHUNK, scored)  # both powers of two
        chosen, greedy = (x.reshape(-1) for x in _run(_loglikelihood_program, split, arrays, indices, chunk=chunk))
        # Summed on the host in float64: a long document's thousands of terms would otherwise
        # carry float32's rounding.
        sums = np.bincount(owners, weights=chosen.astype(np.float64), minlength=rows + 1)
        misses = np.bincount(owners, weights=~greedy, minlength=rows + 1)
        for r, i in enumerate(batch):
            results[i] = (float(sums[r]), bool(misses[r] == 0))
    return results


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """A document's (context, continuation) windows that together score every token once, each
    read with as much of the text before it as fits in `max_length` tokens: the first window
    predicts the first `max_length` tokens from `prefix_token` (BOS) on, and each next one the
    following tokens, with the preceding text as context. lm-evaluation-harness's
    `get_rolling_token_windows` with a context of 1, made disjoint."""
    tokens = list(tokens)
    windows, done = [], 0
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        context = [prefix_token, *tokens[: end - 1]] if done == 0 else tokens[max(0, end - max_length - 1) : end - 1]
        windows.append((context[: len(context) - (end - done - 1)], tokens[done:end]))
        done = end
    return windows


def loglikelihood_rolling(
    model: Any,
    documents: Sequence[Sequence[int]],
    prefix_token: int,
    *,
    max_length: int | None = None,
    max_batch_tokens: int = LOGLIKELIHOOD_BATCH_TOKENS,
    batch_size: int | None = None,
) -> list[float]:
    """Each document's total log-probability (token lists, in input order): every token given
    `prefix_token` (BOS) and the tokens before it, in `rolling_windows` of the model's context
    (or `max_length`). An empty document scores 0."""
    max_length = _max_length(model, max_length)
    documents = _token_lists(model, documents, "documents", fit=False, empty=True)
    prefix_token = integer(prefix_token, "prefix_token", 0, model.config.vocab_size, errors=ERRORS)
    windows = [
        (d, w) for d, document in enumerate(documents) for w in rolling_windows(document, prefix_token, max_length)
    ]
    scores = loglikelihood(
        model, [w for _, w in windows], max_length=max_length, max_batch_tokens=max_batch_tokens, batch_size=batch_size
    )
    totals = [0.0] * len(documents)
    for (d, _), (score, _) in zip(windows, scores, strict=True):
        totals[d] += score
    return totals
