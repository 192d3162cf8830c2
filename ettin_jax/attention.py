"""Attention backends behind one switch, `attention_impl`.

| value           | what                                                                          |
| --------------- | ----------------------------------------------------------------------------- |
| `"xla"`         | dense masked attention: every (query, key) pair, then the mask; the reference |
| `"xla_blocked"` | sliding layers see only the two key blocks that can hold their window, O(T·W) |
|                 | instead of O(T²); global layers skip the key blocks after each query chunk    |
| `"cudnn"`       | `jax.nn.dot_product_attention(implementation="cudnn")`: GPU, bf16/fp16         |
| `"splash"`      | Pallas TPU splash attention with a causal-and-local mask; `interpret` on CPU   |
| `"auto"`        | splash on TPU, cuDNN on GPU for half precision, else xla_blocked for more     |
|                 | than 1024 tokens and xla for fewer (the blocks cost more than they save there) |

Every backend takes the same `MaskSpec`: token indices (masks come from indices, RoPE from
position ids, as in transformers), which keys are real (padding), and optional segment ids
(packed sequences: a query sees only keys of its own segment). The blocked paths and splash
take a token's index to be its column, as in every forward pass this library makes.
Attention against a KV cache (`cached_attention`) is always the dense path, with the mask built
from the sequence index stored with each cached key. One function, `visible`, says which keys
a query sees, for every path.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax import sharding
from ettin_jax.config import check_attention_impl
from ettin_jax.errors import EttinError
from ettin_jax.platforms import compile_platform

Array = jax.Array
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: an all-masked row stays finite


class AttentionError(EttinError, ValueError):
    """A backend asked to do what it cannot; the message names the backend and the way out."""


@flax.struct.dataclass
class MaskSpec:
    """What decides which keys a query sees: index (B, T) token indices, valid (B, T) bool
    (False for padding), segment_ids (B, T) int or None."""

    index: Array
    valid: Array
    segment_ids: Array | None = None


def take_rows(x: Array, rows: Array) -> Array:
    """x (B, T, ...) -> (B, Q, ...): the entries of each row at its sequence indices rows (B, Q)."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


def visible(
    q_index: Array, k_index: Array, k_valid: Array, window: int | None,
    q_segment: Array | None = None, k_segment: Array | None = None,
) -> Array:  # fmt: skip
    """Whether each query sees each key, from sequence indices that broadcast against each other
    (queries along the second-to-last axis, keys along the last): key j is real, j <= i, in the
    query's segment and, on sliding layers, i - j < window."""
    mask = (k_index <= q_index) & k_valid
    if window is not None:
        mask &= q_index - k_index < window
    if q_segment is not None:
        mask &= q_segment == k_segment
    return mask


def dense_mask(spec: MaskSpec, window: int | None, rows: Array | None = None) -> Array:
    """(B, 1, T, T) bool: which keys each query sees (`visible`). With `rows` (B, Q), only the
    queries at those sequence indices: (B, 1, Q, T)."""
    pick = (lambda x: x) if rows is None else (lambda x: take_rows(x, rows))
    segments = spec.segment_ids
    return visible(
        pick(spec.index)[:, None, :, None], spec.index[:, None, None, :], spec.valid[:, None, None, :], window,
        None if segments is None else pick(segments)[:, None, :, None],
        None if segments is None else segments[:, None, None, :],
    )  # fmt: skip


BLOCKED_FROM = 1024  # "auto" on CPU: below this many tokens dense attention was faster (RESULTS.md)


def resolve(impl: str, dtype: Any, length: int | None = None) -> str:
    """The concrete backend for `impl` on this platform, compute dtype and sequence length."""
    check_attention_impl(impl)
    if impl != "auto":
        return impl
    platform = compile_platform()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla_blocked" if length is None or length > BLOCKED_FROM else "xla"


def softmax_attend(
    q: Array, k: Array, v: Array, mask: Array, dropout: Any, deterministic: bool, spec: str
) -> tuple[Array, Array]:
    """softmax(q k^T / sqrt(H) masked) v with scores in float32; `spec` names the einsum axes.
    Returns the output and the attention probabilities (which XLA drops when unused)."""
    scores_spec, out_spec = spec.split("|")
    scores = jnp.einsum(scores_spec, q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    return jnp.einsum(out_spec, probs, v), probs


def xla_attention(
    q: Array, k: Array, v: Array, spec: MaskSpec, window: int | None, dropout: Any = None, deterministic: bool = True,
    rows: Array | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """Dense: q, k, v (B, T, N, H) -> (B, T, N, H), and the probabilities (B, N, T, T). With
    `rows` (B, Q), q (B, Q, N, H) holds only the queries of the tokens at those sequence
    indices -> (B, Q, N, H), O(Q * T) work."""
    mask = dense_mask(spec, window, rows)
    return softmax_attend(q, k, v, mask, dropout, deterministic, "BTNH,BSNH->BNTS|BNTS,BSNH->BTNH")


def cached_attention(
    q: Array, k: Array, v: Array, q_index: Array, k_index: Array, window: int | None, dropout: Any = None,
    deterministic: bool = True,
) -> tuple[Array, Array]:  # fmt: skip
    """Queries q (B, T, N, H) at sequence indices q_index (B, T) over cached keys and values,
    heads first, k, v (B, N, S, H), whose indices are k_index (B, S) (-1: empty) -> the output
    (B, T, N, H) and the probabilities (B, N, T, S)."""
    mask = visible(q_index[:, None, :, None], k_index[:, None, None, :], k_index[:, None, None, :] >= 0, window)
    return softmax_attend(q, k, v, mask, dropout, deterministic, "BTNH,BNSH->BNTS|BNTS,BNSH->BTNH")


def blocked_local_attention(
    q: Array, k: Array, v: Array, spec: MaskSpec, window: int, dropout: Any = None, deterministic: bool = True
) -> Array:
    """Sliding-window attention in blocks of `window` queries: a query at index i sees keys
    i - window + 1 .. i, which lie in its own block and the one before, so each block attends
    over 2 * window keys. The same result as `xla_attention`, for O(T * window) work."""
    batch, length, heads, dim = q.shape
    size = window
    blocks = -(-length // size)
    pad = blocks * size - length

    def split(x: Array, fill: Any = 0) -> Array:  # (B, T, ...) -> (B, blocks, size, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(batch, blocks, size, *x.shape[2:])

    def with_previous(x: Array, fill: Any) -> Array:  # (B, n, C, ...) -> (B, n, 2C, ...)
        before = jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
        return jnp.concatenate([before, x], axis=2)

    qb = split(q)
    kb, vb = with_previous(split(k), 0), with_previous(split(v), 0)
    q_index = split(spec.index, -1)  # (B, n, C)
    k_index = with_previous(q_index, -1)  # (B, n, 2C)
    k_valid = with_previous(split(spec.valid, False), False)
    q_seg = k_seg = None
    if spec.segment_ids is not None:
        q_seg = split(spec.segment_ids, -1)
        q_seg, k_seg = q_seg[:, :, None, :, None], with_previous(q_seg, -1)[:, :, None, None, :]
    mask = visible(
        q_index[:, :, None, :, None], k_index[:, :, None, None, :], k_valid[:, :, None, None, :], window, q_seg, k_seg
    )  # (B, n, 1, C, 2C)
    out, _ = softmax_attend(qb, kb, vb, mask, dropout, deterministic, "BnCNH,BnSNH->BnNCS|BnNCS,BnSNH->BnCNH")
    return out.reshape(batch, blocks * size, heads, dim)[:, :length]


CAUSAL_CHUNK = 512  # query chunk of the causal-blocked global path


def chunked_causal_attention(
    q: Array, k: Array, v: Array, spec: MaskSpec, chunk: int = CAUSAL_CHUNK, dropout: Any = None,
    deterministic: bool = True,
) -> Array:  # fmt: skip
    """Global (causal) attention by chunks of queries: chunk i attends over keys 0 .. the end
    of chunk i only, skipping the key blocks that the causal mask would zero, about half of the
    T^2 pairs for long sequences. The same result as `xla_attention`."""
    length = q.shape[1]
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        part = MaskSpec(
            index=spec.index[:, :end],
            valid=spec.valid[:, :end],
            segment_ids=None if spec.segment_ids is None else spec.segment_ids[:, :end],
        )
        mask = dense_mask(part, None)[:, :, start:end]  # (B, 1, chunk, end)
        out, _ = softmax_attend(
            q[:, start:end], k[:, :end], v[:, :end], mask, dropout, deterministic, "BTNH,BSNH->BNTS|BNTS,BSNH->BTNH"
        )
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def cudnn_attention(q: Array, k: Array, v: Array, spec: MaskSpec, window: int | None) -> Array:
    """cuDNN's fused attention through `jax.nn.dot_product_attention`. Padding and segments go
    in as a mask; the causal and sliding structure as `is_causal` and `local_window_size`, which
    let cuDNN skip blocks."""
    if compile_platform() != "gpu":
        raise AttentionError(f'attention_impl "cudnn" needs a GPU; this is {compile_platform()}. Use "xla_blocked"')
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionError(f'attention_impl "cudnn" computes in bfloat16 or float16, got {q.dtype}; use "xla"')
    itself = spec.index[:, None, :, None] == spec.index[:, None, None, :]  # no empty row for padding queries
    mask = dense_mask(spec, window) | itself
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )  # fmt: skip


SPLASH_BLOCK = 128  # splash works on whole blocks: sequences are padded up to a multiple


def _splash_kernel(length: int, heads: int, window: int | None, interpret: bool, block: int) -> Any:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    if window is None:
        one = masks.CausalMask((length, length))
    else:
        one = masks.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(
        block_q=block, block_kv_compute=block, block_kv=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return splash.make_splash_mha(
        masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def per_device(fn: Any, q: Array, k: Array, v: Array, segments: Array) -> Array:
    """fn(q, k, v, segments) on each device's shard under the active mesh: rows split as the
    batch is (data and fsdp), heads as they are (tensor); q, k, v (B, T, N, H), segments (B, S).
    A Pallas kernel is one device's program, which GSPMD cannot partition, so it runs inside
    shard_map. Without a mesh of several devices, fn itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.AXES) <= set(mesh.axis_names) or mesh.size == 1:
        return fn(q, k, v, segments)
    heads = sharding.logical_spec(("batch", None, "heads", None), q.shape, mesh, strict=False)
    batch = sharding.logical_spec(("batch", None), segments.shape, mesh, strict=False)
    return jax.shard_map(fn, in_specs=(heads, heads, heads, batch), out_specs=heads, check_vma=False)(q, k, v, segments)


def splash_attention(
    q: Array, k: Array, v: Array, spec: MaskSpec, window: int | None, interpret: bool | None = None
) -> Array:
    """Pallas splash attention (TPU): a causal or causal-and-local mask that skips empty blocks.
    Padding and packed sequences travel as segment ids. Runs in the Pallas interpreter off TPU,
    for tests. Masks come from array indices, so with splash the index of a token must be its
    column, as in every batch this library makes. Under a mesh, each device runs the kernel on
    its own rows and heads (`per_device`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    if interpret is None:
        interpret = compile_platform() != "tpu"
    length, dim = q.shape[1], q.shape[3]
    padded = math.ceil(length / SPLASH_BLOCK) * SPLASH_BLOCK
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    seg = spec.segment_ids if spec.segment_ids is not None else jnp.zeros(spec.valid.shape, jnp.int32)
    # Padding (and the block padding) is segment -1 on both sides: real tokens never see it, and
    # a padding query sees at least itself, so no row is empty (an empty row would give NaN).
    seg = jnp.pad(jnp.where(spec.valid, seg, -1).astype(jnp.int32), [(0, 0), (0, padded - length)], constant_values=-1)
    scale = dim**-0.5

    def local(q: Array, k: Array, v: Array, seg: Array) -> Array:  # this device's rows and heads
        # Built in each trace, not cached: its mask arrays are staged into the trace that builds
        # them (a cached kernel would leak them into the next trace).
        kernel = _splash_kernel(padded, q.shape[2], window, interpret, SPLASH_BLOCK)

        def one(q: Array, k: Array, v: Array, seg: Array) -> Array:  # (N, T, H)
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

        heads_first = lambda x: jnp.pad(x, pad).transpose(0, 2, 1, 3)  # noqa: E731
        out = jax.vmap(one)(heads_first(q * scale), heads_first(k), heads_first(v), seg)
        return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)

    return per_device(local, q, k, v, seg)


def attend(
    q: Array,
    k: Array,
    v: Array,
    spec: MaskSpec,
    window: int | None,
    impl: str,
    dropout: Any = None,
    deterministic: bool = True,
) -> Array:
    """Attention of q over k, v (all (B, T, N, H)) under `spec`, by backend `impl`."""
    impl = resolve(impl, q.dtype, q.shape[1])
    uses_dropout = dropout is not None and not deterministic
    if impl in ("cudnn", "splash") and uses_dropout:
        raise AttentionError(f'attention_impl "{impl}" has no attention dropout; use "xla" or "xla_blocked"')
    if impl == "xla" or (impl == "xla_blocked" and window is None and q.shape[1] <= 2 * CAUSAL_CHUNK):
        return xla_attention(q, k, v, spec, window, dropout, deterministic)[0]
    if impl == "xla_blocked":
        if window is None:
            return chunked_causal_attention(q, k, v, spec, CAUSAL_CHUNK, dropout, deterministic)
        return blocked_local_attention(q, k, v, spec, window, dropout, deterministic)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, spec, window)
    return splash_attention(q, k, v, spec, window)
