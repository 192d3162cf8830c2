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
from ettin_jax.sharding import constrain

Array = jax.Array


@flax.struct.dataclass
class LayerCache:
    """One layer's keys and values, heads first, (B, N, S, H): the layout both attention
    products read directly (a (B, S, N, H) cache costs XLA a transposed copy at every step)."""

    k: Array  # (B, N, S, H)
    v: Array  # (B, N, S, H)
    index: Array  # (B, S) int32: the sequence index of each slot's token; -1 empty or padding
    static: bool = flax.struct.field(pytree_node=False, default=False)  # preallocated, not grown

    @classmethod
    def empty(
        cls, batch: int, slots: int, num_heads: int, head_dim: int, dtype: Any, static: bool = False
    ) -> LayerCache:
        shape = (batch, num_heads, slots, head_dim)
        # Separate buffers: aliased k and v would make XLA copy them to update either in place.
        return cls(
            k=constrain(jnp.zeros(shape, dtype), "cache"),
            v=constrain(jnp.zeros(shape, dtype), "cache"),
            index=constrain(jnp.full((batch, slots), -1, jnp.int32), "cache_positions"),
            static=static,
        )

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def grow(self, slots: int) -> LayerCache:
        """The same tokens in `slots` >= self.slots slots; the new ones empty. A cache that never
        wrapped keeps every token at slot = index, which is also its slot in the larger ring."""
        extra = slots - self.slots
        if extra <= 0:
            return self
        pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
        return self.replace(
            k=jnp.pad(self.k, pad),
            v=jnp.pad(self.v, pad),
            index=jnp.pad(self.index, [(0, 0), (0, extra)], constant_values=-1),
        )

    def extended(self, k: Array, v: Array, index: Array) -> LayerCache:
        """The cached tokens followed by T new ones, k, v (B, T, N, H), not stored: what several
        new tokens attend over before `update` stores them (a ring may have no room for all)."""
        heads_first = lambda a: a.transpose(0, 2, 1, 3).astype(self.k.dtype)  # noqa: E731
        return self.replace(
            k=jnp.concatenate([self.k, heads_first(k)], axis=2),  # (B, N, S + T, H)
            v=jnp.concatenate([self.v, heads_first(v)], axis=2),
            index=jnp.concatenate([self.index, index.astype(jnp.int32)], axis=1),
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
        k, v = k.transpose(0, 2, 1, 3).astype(self.k.dtype), v.transpose(0, 2, 1, 3).astype(self.v.dtype)
        start = jnp.asarray(start, jnp.int32)
        if start.ndim == 1:
            if length != 1:
                raise ValueError("a cache written at a different index per row takes one token at a time")
            rows, slot = jnp.arange(k.shape[0]), start % slots
            return self.replace(
                k=self.k.at[rows, :, slot].set(k[:, :, 0]),
                v=self.v.at[rows, :, slot].set(v[:, :, 0]),
                index=self.index.at[rows, slot].set(index[:, 0].astype(jnp.int32)),
            )
        if length == 1:
            slot = start % slots
            return self.replace(
                k=jax.lax.dynamic_update_slice_in_dim(self.k, k, slot, axis=2),
                v=jax.lax.dynamic_update_slice_in_dim(self.v, v, slot, axis=2),
                index=jax.lax.dynamic_update_slice_in_dim(self.index, index.astype(jnp.int32), slot, axis=1),
            )
        if length > slots:  # only the newest `slots` tokens survive in a ring
            k, v, index = k[:, :, -slots:], v[:, :, -slots:], index[:, -slots:]
            start, length = start + length - slots, slots
        where = (start + jnp.arange(length)) % slots
        return self.replace(
            k=self.k.at[:, :, where].set(k), v=self.v.at[:, :, where].set(v), index=self.index.at[:, where].set(index)
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


def init_cache(config: ModernBertDecoderConfig, batch: int, length: int, dtype: Any = jnp.float32) -> Cache:
    """An empty preallocated cache for `batch` rows of up to `length` tokens."""
    layers = tuple(
        LayerCache.empty(batch, s, config.num_attention_heads, config.head_dim, dtype, static=True)
        for s in slot_counts(config, length)
    )
    return Cache(layers, jnp.zeros((), jnp.int32))
