"""Checks on what users pass to the model and to generation: clear errors, naming the argument
(and the row and position of a bad item), for inputs that would otherwise fail deep inside JAX
or give wrong numbers. Values are checked where they are concrete; under jit only shapes and
dtypes can be.

The small checkers here (`integer`, `number`, `flag`, `token_list`, `to_array`) serve every
entry point: the model's forward, `GenerationConfig`, the engine and the pipelines. Each takes
the pair of error classes to raise, (for a bad value, for a bad type), so that each caller
raises its own (`InputError` here, `GenerationError` in generation); the one for a bad type is
also a `TypeError`, as the error the wrong type would otherwise have caused."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.errors import EttinError

Array = jax.Array
FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputError(EttinError, ValueError):
    """Inputs the model cannot run, named in the message."""


class InputTypeError(InputError, TypeError):
    """An input of the wrong type (a string, or a float where token ids belong): also a `TypeError`."""


Errors = tuple[type[Exception], type[Exception]]  # (for a bad value, for a bad type)
INPUT_ERRORS: Errors = (InputError, InputTypeError)


# ---- scalars ------------------------------------------------------------------------------------
def describe(value: Any) -> str:
    """A value for an error message: its repr (cut short) and its type."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def is_integer(value: Any) -> bool:
    """A Python or numpy integer; not a bool, not a float even when whole (3.0)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A Python or numpy real number, integers included; not a bool, not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def integer(
    value: Any,
    name: str,
    low: int | None = None,
    high: int | None = None,
    *,
    bits: int = 32,
    must: str | None = None,
    errors: Errors = INPUT_ERRORS,
) -> int:
    """`value` as a Python int, or an error naming `name`: not an integer (a bool, a float, a
    string), beyond what a signed `bits`-bit integer holds (what it is stored as), or outside
    [low, high). `must`: the words for what is expected (default: from low and high)."""
    if must is None:
        must = {
            (False, False): "an integer",
            (True, False): f"an integer >= {low}",
            (False, True): f"an integer < {high}",
            (True, True): f"an integer in [{low}, {high})",
        }[low is not None, high is not None]
    if not is_integer(value):
        raise errors[1](f"{name} must be {must}, got {describe(value)}")
    value = int(value)
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise errors[0](f"{name} {value} is out of range: it must be {must} that fits in {bits} bits")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise errors[0](f"{name} must be {must}, got {value}")
    return value


def number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    note: str = "",
    errors: Errors = INPUT_ERRORS,
) -> float:
    """`value` as a Python float, or an error naming `name`: not a number (a bool, a string,
    None), not finite (NaN, inf, or beyond float32, what it is stored as), or outside [low, high]
    ((low, high] with `low_open`). `note` ends the message (e.g. " when sampling")."""
    if low is not None and high is not None:
        where = f" in {'(' if low_open else '['}{low}, {high}]"
    elif low is not None:
        where = f" {'>' if low_open else '>='} {low}"
    else:
        where = "" if high is None else f" <= {high}"
    if not is_number(value):
        raise errors[1](f"{name} must be a number{where}{note}, got {describe(value)}")
    value = float(value)
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise errors[0](f"{name} must be a finite number{where}{note}, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        raise errors[0](f"{name} must be{where}{note}, got {value}")
    return value


def flag(value: Any, name: str, *, errors: Errors = INPUT_ERRORS) -> bool:
    """`value` as a bool, or an error naming `name` if it is not one (the string "no" is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise errors[1](f"{name} must be True or False, got {describe(value)}")
    return bool(value)


def token_list(values: Any, name: str, *, errors: Errors = INPUT_ERRORS) -> list[int]:
    """A 1-D sequence of token ids (a list, a tuple, a 1-D numpy or jax integer array) as a list
    of Python ints, or an error naming `name` and the position of the first item that is not an
    integer (a float, even 3.0, a bool, a string, a nested list). The vocabulary's range is the
    caller's to check."""
    if isinstance(values, (np.ndarray, jax.Array)):
        if values.ndim != 1 or not jnp.issubdtype(values.dtype, jnp.integer):
            raise errors[1](
                f"{name} must be a 1-D array of integer token ids, got {values.dtype} of shape {values.shape}"
            )
        return np.asarray(values).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise errors[1](f"{name} must be a list of integer token ids, got {describe(values)}")
    out = []
    for i, value in enumerate(values):
        if not is_integer(value):
            raise errors[1](f"{name}[{i}] must be an integer token id, got {describe(value)}")
        out.append(int(value))
    return out


# ---- arrays -------------------------------------------------------------------------------------
def _bad_item(values: Sequence, ok: Callable[[Any], bool], index: tuple[int, ...] = ()) -> tuple | None:
    """(index, value) of the first item of nested lists that `ok` refuses (arrays inside the
    lists are left to the dtype check), or None."""
    for i, item in enumerate(values):
        if isinstance(item, (list, tuple)):
            found = _bad_item(item, ok, (*index, i))
            if found is not None:
                return found
        elif not isinstance(item, (np.ndarray, jax.Array)) and not ok(item):
            return (*index, i), item
    return None


def _at(name: str, index: Sequence[int]) -> str:
    return f"{name}[{', '.join(str(int(i)) for i in index)}]"


def _numeric(dtype: Any) -> bool:
    return dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


# What an array argument may hold: (check of a list's item, words for one, check of the dtype, words for it)
_KINDS: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], bool], str]] = {
    "integers": (is_integer, "an integer", lambda d: jnp.issubdtype(d, jnp.integer), "integers"),
    "mask": (lambda x: is_number(x) or isinstance(x, (bool, np.bool_)), "0 or 1", _numeric, "0s and 1s"),
    "floats": (is_number, "a number", lambda d: jnp.issubdtype(d, jnp.floating), "floating-point numbers"),
    "numbers": (lambda x: is_number(x) or isinstance(x, (bool, np.bool_)), "a number", _numeric, "numbers"),
}


def to_array(x: Any, name: str, kind: str = "numbers", *, errors: Errors = INPUT_ERRORS) -> Any:
    """`x` checked to hold `kind` ("integers", "mask", "floats" or "numbers"): a jax array (or
    tracer) as it is, anything else (nested lists, a numpy array) as a numpy array; or an error
    naming `name`, and in a list the position of the first item of the wrong type (a float,
    even 3.0, among token ids; a string; None). Not made a jax array here: the caller checks
    the values a conversion to int32 would change first (an id beyond int32 would wrap)."""
    item_ok, item_words, dtype_ok, words = _KINDS[kind]
    if isinstance(x, jax.Array):
        array = x
    else:
        listed = isinstance(x, (list, tuple))
        if listed:
            bad = _bad_item(x, item_ok)
            if bad is not None:
                raise errors[1](f"{_at(name, bad[0])} must be {item_words}, got {describe(bad[1])}")
        try:
            array = np.asarray(x)
        except (ValueError, TypeError) as e:  # ragged lists
            raise errors[0](f"{name} is not a rectangular array ({e}); pad its rows to one length") from None
        if listed and array.dtype == object and kind == "integers":
            raise errors[0](f"{name} holds an integer beyond 64 bits")
        if listed and not array.size and kind == "integers":  # np.asarray([[]]) is float64
            array = array.astype(np.int32)
        if listed and kind == "floats" and array.dtype.kind in "iu":  # whole numbers written without a point
            array = array.astype(np.float32)
    if not dtype_ok(array.dtype):
        raise errors[1](f"{name} must hold {words}, got {array.dtype}")
    return array


def as_array(x: Any, name: str = "input") -> Array:
    """Numbers (lists, numpy arrays) as a jax array, checked (`to_array`); jax arrays and tracers
    pass through."""
    array = to_array(x, name)
    return array if isinstance(array, jax.Array) else jnp.asarray(array)


def concrete(x: Any) -> np.ndarray | None:
    """x as a numpy array, or None under jit where its values are not known."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _nonfinite(x: Any) -> tuple[int, ...] | None:
    """The index of the first NaN or infinite value of a concrete array, else (or under jit) None.
    A jax array is reduced where it lives; only a bad one is copied to the host."""
    if isinstance(x, jax.core.Tracer):
        return None
    fine = bool(np.isfinite(x).all()) if isinstance(x, np.ndarray) else bool(jnp.isfinite(x).all())
    return None if fine else tuple(np.argwhere(~np.isfinite(np.asarray(x)))[0])


# ---- the model's inputs -------------------------------------------------------------------------
def check_inputs(
    config: ModernBertDecoderConfig,
    input_ids: Any,
    attention_mask: Any,
    position_ids: Any,
    inputs_embeds: Any,
    segment_ids: Any = None,
    past_length: int | None = 0,
) -> tuple[Array | None, ...]:
    """The inputs as arrays, or an `InputError` that names the one that is wrong (an
    `InputTypeError` for a wrong type). `past_length`: the tokens a cache already holds (the
    attention mask may cover them too); None when unknown (a traced cache length), which skips
    the checks that need it."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        input_ids = to_array(input_ids, "input_ids", "integers")
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        shape, name = tuple(input_ids.shape), "input_ids"
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
        inputs_embeds = to_array(inputs_embeds, "inputs_embeds", "floats")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape (batch, length, {config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        shape, name = tuple(inputs_embeds.shape)[:2], "inputs_embeds"
        bad = _nonfinite(inputs_embeds)
        if bad is not None:
            raise InputError(f"{_at(name, bad)} is {np.asarray(inputs_embeds)[bad]}: inputs_embeds must be finite")
    if shape[0] == 0:
        raise InputError(f"the batch is empty: {name} has shape {shape}")
    if shape[1] == 0:
        raise InputError("the input sequence is empty (length 0)")
    past = past_length or 0
    if past + shape[1] > config.max_position_embeddings:
        what = f"sequence length {shape[1]}" + (f" after {past} cached tokens" if past else "")
        raise InputError(f"{what} is longer than max_position_embeddings ({config.max_position_embeddings})")
    if attention_mask is not None:
        attention_mask = to_array(attention_mask, "attention_mask", "mask")
        got = tuple(attention_mask.shape)
        fits = got in {shape, (shape[0], past + shape[1])}
        if past_length is None:  # the cached part's width is unknown: any mask that ends with the new tokens
            fits = len(got) == 2 and got[0] == shape[0] and got[1] >= shape[1]
        if not fits:
            expected = f"{shape} like the inputs" + (
                f", or {(shape[0], past + shape[1])} with the cached tokens" if past else ""
            )
            raise InputError(f"attention_mask has shape {got}; expected {expected}")
        mask = concrete(attention_mask)
        if mask is not None and mask.dtype != np.bool_:
            bad = ~np.isin(mask, (0, 1))
            if bad.any():
                where = np.argwhere(bad)[0]
                raise InputError(
                    f"{_at('attention_mask', where)} = {mask[tuple(where)]}: attention_mask must hold 1 for the "
                    "tokens to attend to and 0 for padding, nothing else"
                )
    if position_ids is not None:
        position_ids = _same_shape(to_array(position_ids, "position_ids", "integers"), "position_ids", shape)
        pos = concrete(position_ids)
        if pos is not None and (pos.min() < 0 or pos.max() >= config.max_position_embeddings):
            raise InputError(
                f"position_ids must lie in [0, {config.max_position_embeddings}) "
                f"(max_position_embeddings), got values from {pos.min()} to {pos.max()}"
            )
    if segment_ids is not None:
        segment_ids = _same_shape(to_array(segment_ids, "segment_ids", "integers"), "segment_ids", shape)
        seg = concrete(segment_ids)
        if seg is not None and (seg.min() < 0 or seg.max() >= 2**31):
            raise InputError(f"segment_ids must lie in [0, 2**31), got values from {seg.min()} to {seg.max()}")
    return tuple(
        x if x is None or isinstance(x, jax.Array) else jnp.asarray(x)
        for x in (input_ids, attention_mask, position_ids, inputs_embeds, segment_ids)
    )


def _same_shape(value: Any, name: str, shape: tuple[int, ...]) -> Any:
    if tuple(value.shape) != shape:
        raise InputError(f"{name} has shape {tuple(value.shape)}; expected {shape} like the inputs")
    return value
