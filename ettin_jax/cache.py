"""The KV cache: what a forward pass with `use_cache=True` returns and a later call continues
from (transformers' `past_key_values`), and what generation decodes against.

Each layer keeps the keys and values of the tokens seen so far, with the sequence index of the
token in each slot (-1: empty or padding). Masks are built from those indices, never from slot
numbers, so a slot may hold any token: a sliding layer keeps a ring of `sliding_window` slots
(slot = index % slots, the newest tokens win), a third of a global layer's memory at long
context. A global layer keeps a slot for every token.

Two ways to hold it (`LayerCache.static`):
- grown (`static=False`, what `use_cache=True` makes): each call adds slots for its new tokens,
  as transformers' DynamicCache does; shapes change from call to call, so under `jit` each new
  length compiles again. For eager use.
- preallocated (`static=True`, `Cache.preallocate`): a fixed number of slots written in place,
  for a jitted decode loop (generation).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.quantization import quantize_heads
from ettin_jax.sharding import constrain

Array = jax.Array


@flax.struct.dataclass
class LayerCache:
    """One layer's keys and values, heads first, (B, N, S, H): the layout both attention
    products read directly (a (B, S, N, H) cache costs XLA a transposed copy at every step).

    Quantized (`kv_cache_dtype="int8"`, global layers only): k and v hold int8 values and
    `k_scale`, `v_scale` (B, N, S, 1) one scale per token and head, in the compute dtype; the
    trailing 1 lets every slot operation treat values and scales alike (`map_kv`)."""

    k: Array  # (B, N, S, H)
    v: Array  # (B, N, S, H)
    index: Array  # (B, S) int32: the sequence index of each slot's token; -1 empty or padding
    k_scale: Array | None = None  # (B, N, S, 1) when quantized
    v_scale: Array | None = None
    static: bool = flax.struct.field(pytree_node=False, default=False)  # preallocated, not grown

    @classmethod
    def empty(
        cls, batch: int, slots: int, num_heads: int, head_dim: int, dtype: Any, static: bool = False,
        quantized: bool = False,
    ) -> LayerCache:  # fmt: skip
        shape = (batch, num_heads, slots, head_dim)
        stored = jnp.int8 if quantized else dtype
        # Separate buffers: aliased k and v would make XLA copy them to update either in place.
        scale = (lambda: constrain(jnp.zeros((*shape[:3], 1), dtype), "cache")) if quantized else (lambda: None)
        return cls(
            k=constrain(jnp.zeros(shape, stored), "cache"),
            v=constrain(jnp.zeros(shape, stored), "cache"),
            index=constrain(jnp.full((batch, slots), -1, jnp.int32), "cache_positions"),
            k_scale=scale(),
            v_scale=scale(),
            static=static,
        )

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def dtype(self) -> Any:
        """The compute dtype of the keys and values (what `keys()` returns)."""
        return self.k_scale.dtype if self.quantized else self.k.dtype

    def keys(self) -> Array:
        """k (B, N, S, H) in the compute dtype."""
        return self.k.astype(self.dtype) * self.k_scale if self.quantized else self.k

    def values(self) -> Array:
        return self.v.astype(self.dtype) * self.v_scale if self.quantized else self.v

    def map_kv(self, fn: Any, *others: LayerCache) -> LayerCache:
        """`fn` applied to k, v and their scales (each (B, N, S, ...)), with the same field of
        each of `others` as further arguments; the index is left as it is."""
        names = ("k", "v", "k_scale", "v_scale") if self.quantized else ("k", "v")
        return self.replace(**{n: fn(getattr(self, n), *(getattr(o, n) for o in others)) for n in names})

    def grow(self, slots: int) -> LayerCache:
        """The same tokens in `slots` >= self.slots slots; the new ones empty. A cache that never
        wrapped keeps every token at slot = index, which is also its slot in the larger ring."""
        extra = slots - self.slots
        if extra <= 0:
            return self
        return self.map_kv(lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, extra), (0, 0)])).replace(
            index=jnp.pad(self.index, [(0, 0), (0, extra)], constant_values=-1)
        )

    def extended(self, k: Array, v: Array, index: Array) -> LayerCache:
        """The cached tokens followed by T new ones, k, v (B, T, N, H), not stored: what several
        new tokens attend over before `update` stores them (a ring may have no room for all).
        Always in the compute dtype."""
        heads_first = lambda a: a.transpose(0, 2, 1, 3).astype(self.dtype)  # noqa: E731
        return LayerCache(
            k=jnp.concatenate([self.keys(), heads_first(k)], axis=2),  # (B, N, S + T, H)
            v=jnp.concatenate([self.values(), heads_first(v)], axis=2),
            index=jnp.concatenate([self.index, index.astype(jnp.int32)], axis=1),
            static=self.static,
        )

    def update(self, k: Array, v: Array, index: Array, start: Array | int, window: int | None) -> LayerCache:
        """Stores T new tokens (see `write`); a grown cache first adds slots for them, a sliding
        layer's up to its `window`."""
        if self.static:
            return self.write(k, v, index, start)
        slots = self.slots + k.shape[1]
        return self.grow(slots if window is None else min(slots, window)).write(k, v, index, start)

    def write(self, k: Array, v: Array, index: Array, start: Array | int) -> LayerCache:
        """Stores T new tokens, k, v (B, T, N, H) with sequence indices `index` (B, T) (-1 for
        padding), which sit at sequence indices start .. start + T - 1: slot (start + t) % S, so a
        ring keeps the newest S tokens. `start` is one index for every row, or one per row, (B,),
        for a single token (the engine's slots each at their own length)."""
        slots, length = self.slots, k.shape[1]
        k, v = k.transpose(0, 2, 1, 3).astype(self.dtype), v.transpose(0, 2, 1, 3).astype(self.dtype)
        new = LayerCache(k=k, v=v, index=index.astype(jnp.int32))  # (B, N, T, H)
        if self.quantized:
            (kq, ks), (vq, vs) = quantize_heads(k), quantize_heads(v)
            new = new.replace(k=kq, v=vq, k_scale=ks[..., None], v_scale=vs[..., None])
        start = jnp.asarray(start, jnp.int32)
        if start.ndim == 1:
            if length != 1:
                raise ValueError("a cache written at a different index per row takes one token at a time")
            rows, slot = jnp.arange(k.shape[0]), start % slots
            return self.map_kv(lambda a, b: a.at[rows, :, slot].set(b[:, :, 0]), new).replace(
                index=self.index.at[rows, slot].set(new.index[:, 0])
            )
        if length == 1:
            slot = start % slots
            return self.map_kv(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, slot, axis=2), new).replace(
                index=jax.lax.dynamic_update_slice_in_dim(self.index, new.index, slot, axis=1)
            )
        if length > slots:  # only the newest `slots` tokens survive in a ring
            new = new.map_kv(lambda b: b[:, :, -slots:]).replace(index=new.index[:, -slots:])
            start, length = start + length - slots, slots
        where = (start + jnp.arange(length)) % slots
        return self.map_kv(lambda a, b: a.at[:, :, where].set(b), new).replace(
            index=self.index.at[:, where].set(new.index)
        )


@flax.struct.dataclass
class Cache:
    """Every layer's `LayerCache`, and how many sequence indices have been written (the next
    token's index)."""

    layers: tuple[LayerCache, ...]
    length: Array  # () int32, or (B,) int32 where each row is at its own length (the engine)

    def preallocate(self, config: ModernBertDecoderConfig, length: int) -> Cache:
        """This cache with room for `length` tokens in all, written in place from now on: global
        layers get `length` slots, sliding ones min(length, sliding_window)."""
        slots = slot_counts(config, length)
        layers = tuple(c.grow(s).replace(static=True) for c, s in zip(self.layers, slots, strict=True))
        return Cache(layers, self.length)


def slot_counts(config: ModernBertDecoderConfig, length: int) -> tuple[int, ...]:
    """Slots each layer needs to hold `length` tokens: all of them, or a sliding window's worth."""
    return tuple(
        min(length, config.sliding_window) if config.is_sliding(i) else length for i in range(len(config.layer_types))
    )


def init_cache(
    config: ModernBertDecoderConfig, batch: int, length: int, dtype: Any = jnp.float32, *, static: bool = True
) -> Cache:
    """An empty cache for `batch` rows of up to `length` tokens, preallocated (`static`) or
    grown; the global layers' in int8 when `config.kv_cache_dtype` says so."""
    heads, head_dim, int8 = config.num_attention_heads, config.head_dim, config.kv_cache_dtype == "int8"
    layers = tuple(
        LayerCache.empty(batch, s, heads, head_dim, dtype, static=static, quantized=int8 and not config.is_sliding(i))
        for i, s in enumerate(slot_counts(config, length))
    )
    return Cache(layers, jnp.zeros((), jnp.int32))
