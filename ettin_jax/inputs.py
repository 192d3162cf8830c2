"""Checks on what users pass to the model: clear errors for inputs that would otherwise fail
deep inside JAX or give wrong numbers. Values are checked where they are concrete; under jit
only shapes and dtypes can be."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.errors import EttinError

Array = jax.Array


class InputError(EttinError, ValueError):
    """Inputs the model cannot run, named in the message."""


def as_array(x: Any) -> Array:
    """Lists and numpy arrays become jax arrays; jax arrays and tracers pass through."""
    return x if isinstance(x, jax.Array) else jnp.asarray(np.asarray(x))


def concrete(x: Any) -> np.ndarray | None:
    """x as a numpy array, or None under jit where its values are not known."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_inputs(
    config: ModernBertDecoderConfig,
    input_ids: Any,
    attention_mask: Any,
    position_ids: Any,
    inputs_embeds: Any,
    segment_ids: Any = None,
    past_length: int | None = 0,
) -> tuple[Array | None, ...]:
    """The inputs as arrays, or an `InputError` that names the one that is wrong. `past_length`:
    the tokens a cache already holds (the attention mask may cover them too); None when unknown
    (a traced cache length), which skips the checks that need it."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids and inputs_embeds")
    input_ids, attention_mask, position_ids, inputs_embeds, segment_ids = (
        None if x is None else as_array(x)
        for x in (input_ids, attention_mask, position_ids, inputs_embeds, segment_ids)
    )
    if input_ids is not None:
        if jnp.ndim(input_ids) != 2:
            raise InputError(f"input_ids must have shape (batch, length), got {jnp.shape(input_ids)}")
        if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
            raise InputError(f"input_ids must be integers, got {jnp.result_type(input_ids)}")
        shape = tuple(jnp.shape(input_ids))
        ids = concrete(input_ids)
        if ids is not None and ids.size:
            bad = (ids < 0) | (ids >= config.vocab_size)
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise InputError(
                    f"input_ids[{row}, {col}] = {ids[row, col]} is outside the vocabulary "
                    f"[0, {config.vocab_size}) (vocab_size {config.vocab_size})"
                )
    else:
        if jnp.ndim(inputs_embeds) != 3 or jnp.shape(inputs_embeds)[-1] != config.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape (batch, length, {config.hidden_size}), got {jnp.shape(inputs_embeds)}"
            )
        shape = tuple(jnp.shape(inputs_embeds))[:2]
    if shape[1] == 0:
        raise InputError("the input sequence is empty (length 0)")
    past = past_length or 0
    if past + shape[1] > config.max_position_embeddings:
        what = f"sequence length {shape[1]}" + (f" after {past} cached tokens" if past else "")
        raise InputError(f"{what} is longer than max_position_embeddings ({config.max_position_embeddings})")
    if attention_mask is not None:
        got = tuple(jnp.shape(attention_mask))
        fits = got in {shape, (shape[0], past + shape[1])}
        if past_length is None:  # the cached part's width is unknown: any mask that ends with the new tokens
            fits = len(got) == 2 and got[0] == shape[0] and got[1] >= shape[1]
        if not fits:
            expected = f"{shape} like the inputs" + (
                f", or {(shape[0], past + shape[1])} with the cached tokens" if past else ""
            )
            raise InputError(f"attention_mask has shape {got}; expected {expected}")
    for name, value in (("position_ids", position_ids), ("segment_ids", segment_ids)):
        if value is not None and tuple(jnp.shape(value)) != shape:
            raise InputError(f"{name} has shape {tuple(jnp.shape(value))}; expected {shape} like the inputs")
    if position_ids is not None:
        pos = concrete(position_ids)
        if pos is not None and (pos.min() < 0 or pos.max() >= config.max_position_embeddings):
            raise InputError(
                f"position_ids must lie in [0, {config.max_position_embeddings}) "
                f"(max_position_embeddings), got values from {pos.min()} to {pos.max()}"
            )
    if segment_ids is not None and not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise InputError(f"segment_ids must be integers, got {segment_ids.dtype}")
    return input_ids, attention_mask, position_ids, inputs_embeds, segment_ids
