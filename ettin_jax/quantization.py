"""8-bit weights: what `quantization="int8"` stores and how the model computes with it.

Weight-only, symmetric, one scale per output channel: a float matrix W becomes int8 values q and
float scales s with W ~ q * s, s = max|W| / 127.5 over each output channel (qwix's absmax
calibration; q stays in [-127, 127]). Every linear kernel is stored so, and so is the embedding
table, one scale per vocabulary row: a row is an output channel of the tied vocabulary
projection, so the same scales serve the lookup and the projection. Norms and biases stay in
the compute dtype.

A quantized matrix travels as an `Int8Kernel`. Products dequantize in the compute dtype and apply
the scales to the output, (x @ q) * s: one multiply per output instead of per weight, and XLA
on GPU fuses the int8-to-bf16 conversion into the matmul, so each step reads a quarter of the
float32 bytes. qwix computes the quantization (`qwix.quantize`). Its model-level PTQ, which
intercepts the ops of one model method while that method runs, is not used: generation and the
engine call the body and the heads separately inside their own jitted programs, and the tied
table is used as a lookup and, transposed, as a projection; neither is an op qwix intercepts.

The KV cache: `kv_cache_dtype="int8"` stores the global layers' keys and values as int8 with one
scale per token and head (`quantize_heads`); see `ettin_jax.cache`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ettin_jax.errors import EttinError

Array = jax.Array

QUANTIZATIONS = ("int8",)  # weight quantizations; None is float
KV_CACHE_DTYPES = ("auto", "int8")  # "auto": the compute dtype


class QuantizationError(EttinError, ValueError):
    """A quantization this port cannot do, or a quantized model asked for what it cannot give."""


def check_quantization(name: Any, what: str = "quantization") -> str | None:
    """`name` if it is a known quantization (None: float), else a `QuantizationError`."""
    if name is None or name in QUANTIZATIONS:
        return name
    raise QuantizationError(f"{what} {name!r} is not supported; use one of {', '.join(QUANTIZATIONS)} or None (float)")


def check_kv_cache_dtype(name: Any) -> str:
    if name not in KV_CACHE_DTYPES:
        raise QuantizationError(f"kv_cache_dtype {name!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)}")
    return name


@flax.struct.dataclass
class Int8Kernel:
    """A (D_in, D_out) matrix as int8 values and one scale per output column."""

    q: Array  # (D_in, D_out) int8
    scale: Array  # (D_out,) float


def quantize(w: Array, axis: int) -> tuple[Array, Array]:
    """Float `w` -> (int8 values of w's shape, float32 scales along `axis`, the output channels)."""
    import qwix  # on first use: it imports flax.linen

    axis = axis % w.ndim
    qarray = qwix.quantize(jnp.asarray(w, jnp.float32), jnp.int8, channelwise_axes=(axis,))
    return qarray.qvalue, qarray.scale.reshape(w.shape[axis])


def matmul(x: Array, kernel: Array | Int8Kernel, dtype: Any) -> Array:
    """x (..., D_in) @ kernel (D_in, D_out) in `dtype`, float or int8 kernel alike."""
    if isinstance(kernel, Int8Kernel):
        out = jnp.einsum("...i,io->...o", x.astype(dtype), kernel.q.astype(dtype))
        return out * kernel.scale.astype(dtype)
    return jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype))


def quantize_heads(x: Array) -> tuple[Array, Array]:
    """Keys or values (..., H) -> int8 (..., H) and float32 scales (...,): one per token and head."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale
