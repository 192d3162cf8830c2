"""Log-probabilities of given tokens: what an OpenAI server's `echo` with `logprobs` returns for
the prompt, and what an evaluation harness sums into a log-likelihood.

`token_logprobs(model, sequences)` runs one forward pass per batch of sequences (sorted by
length, right-padded to a bucketed width, as many rows as `max_batch_tokens` allows) and gives,
for every token after the first, its raw log-probability given the tokens before it, and the
most likely tokens at that place. Float32 log-softmax of the model's logits, as `generate`
computes them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import compilation, sharding
from ettin_jax.generation import GenerationError, check_prompts
from ettin_jax.padding import bucket


@dataclasses.dataclass(frozen=True)
class SequenceLogprobs:
    """Token t's log-probability given tokens < t, for t = 1..T-1 (the first token has none)."""

    chosen: np.ndarray  # (T-1,) float32
    top_ids: np.ndarray  # (T-1, top) int32, most likely first
    top_values: np.ndarray  # (T-1, top) float32


@functools.partial(compilation.jit, static_argnames=("graphdef", "top"))
def _program(graphdef, state, ids, valid, *, top: int):
    """ids, valid (B, T), right-padded: (B, T-1) log-probabilities of ids[:, 1:], and the top
    (B, T-1, top) ids and values."""
    model = nnx.merge(graphdef, state)
    logits = model(jnp.where(valid, ids, 0), valid).logits[:, :-1].astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]
    values, top_ids = jax.lax.top_k(logprobs, top) if top else (logprobs[..., :0], jnp.zeros((*chosen.shape, 0)))
    return chosen, top_ids.astype(jnp.int32), values


def token_logprobs(
    model: Any, sequences: Sequence[Sequence[int]], top: int = 0, *, max_batch_tokens: int = 4096
) -> list[SequenceLogprobs]:
    """Each sequence's `SequenceLogprobs`, in input order. `top`: how many most likely tokens to
    return at each place. A sequence must hold at most `max_position_embeddings` tokens."""
    sequences = [[int(t) for t in s] for s in sequences]
    check_prompts(sequences, model.config.vocab_size)
    context = model.config.max_position_embeddings
    for i, s in enumerate(sequences):
        if len(s) > context:
            raise GenerationError(f"sequence {i} has {len(s)} tokens; the model's context is {context}")
    graphdef, state = nnx.split(model)
    mesh = sharding.mesh_of(state)
    ways = sharding.batch_ways(mesh)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: list[SequenceLogprobs | None] = [None] * len(sequences)
    start = 0
    while start < len(order):
        width = bucket(len(sequences[order[start]]))
        rows = max(1, max_batch_tokens // width)
        group = [i for i in order[start : start + rows] if len(sequences[i]) <= width] or [order[start]]
        width = bucket(max(len(sequences[i]) for i in group))
        batch = -(-bucket(len(group), 1) // ways) * ways
        ids = np.zeros((batch, width), np.int32)
        valid = np.zeros((batch, width), bool)
        for row, i in enumerate(group):
            ids[row, : len(sequences[i])] = sequences[i]
            valid[row, : len(sequences[i])] = True
        with sharding.activate(mesh):
            placed = sharding.put_batch({"ids": ids, "valid": valid}, mesh) if mesh is not None else None
            args = (placed["ids"], placed["valid"]) if placed else (ids, valid)
            chosen, top_ids, values = map(sharding.to_host, _program(graphdef, state, *args, top=top))
        for row, i in enumerate(group):
            n = len(sequences[i]) - 1
            results[i] = SequenceLogprobs(chosen[row, :n], top_ids[row, :n], values[row, :n])
        start += len(group)
    return results
