"""ModernBERT Decoder (the Ettin decoders) in Flax NNX.

One file, read top to bottom: outputs, building blocks (init, RoPE, masks, attention), the
decoder layer, the base model, then the two heads. Module and parameter names follow the
transformers checkpoint (`attn_norm`, `q_proj`, `Wi`, `Wo`, `final_norm`, `lm_head`, `decoder`,
`head`, `classifier`), so the key map in `ettin_jax.convert.keys` is nearly the identity:
PyTorch `weight` becomes `kernel` (transposed), `scale` (LayerNorm) or `embedding`.

Shape letters: B batch, T query length, S key length, D hidden, N heads, H head_dim,
F intermediate, V vocab, L labels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ettin_jax import config as config_module
from ettin_jax.attention import MaskSpec, attend, softmax_attend, take_rows, xla_attention
from ettin_jax.compilation import gradient_fence
from ettin_jax.config import ATTENTION_IMPLS, ModernBertDecoderConfig
from ettin_jax.sharding import constrain

Array = jax.Array
DType = Any

# Added to masked attention logits. Finite, so a row with every key masked (a pad query under
# left padding) gives a uniform distribution instead of NaN.


# ---- outputs ------------------------------------------------------------------------------
@flax.struct.dataclass
class BaseModelOutput:
    last_hidden_state: Array  # (B, T, D), after final_norm
    # Embedding output, then the output of each layer; the last entry is after final_norm,
    # as in transformers.
    hidden_states: tuple[Array, ...] | None = None


@flax.struct.dataclass
class CausalLMOutput:
    logits: Array  # (B, T, V)
    loss: Array | None = None
    hidden_states: tuple[Array, ...] | None = None


@flax.struct.dataclass
class SequenceClassifierOutput:
    logits: Array  # (B, L), pooled at the rightmost token that is not padding
    loss: Array | None = None
    hidden_states: tuple[Array, ...] | None = None


class InputError(ValueError):
    """Inputs the model cannot run, named in the message."""


# ---- building blocks ----------------------------------------------------------------------
def trunc_normal(std: float, cutoff: float) -> Callable[..., Array]:
    """torch.nn.init.trunc_normal_(std=std, a=-cutoff*std, b=cutoff*std), as transformers inits."""

    def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        return (std * jax.random.truncated_normal(key, -cutoff, cutoff, shape, jnp.float32)).astype(dtype)

    return init


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # transformers' "gelu" is the exact erf form; JAX's default is the tanh approximation.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
# The config validates names against its own list; both lists must name the same functions.
assert set(ACTIVATIONS) == set(config_module.ACTIVATIONS), "modeling and config disagree on activations"


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin, (B, T, H) float32, for integer `positions` (B, T); rotate-half layout."""
    # inv_freq in float32 exactly as transformers builds it, so large positions agree to the bit.
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, T, N, H) rotated in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def make_attention_mask(q_positions: Array, kv_positions: Array, kv_valid: Array, window: int | None) -> Array:
    """(B, 1, T, S) bool: query i sees key j iff j is valid, j <= i and, on sliding layers,
    i - j < window. Built from absolute positions, not array indices: a decode step's mask over
    a cache whose ring slots hold tokens in any order."""
    q = q_positions[:, None, :, None]
    k = kv_positions[:, None, None, :]
    mask = (k <= q) & kv_valid[:, None, None, :]
    if window is not None:
        mask &= q - k < window
    return mask


@flax.struct.dataclass
class DecodeWeights:
    """Weights laid out for generation, derived from the parameters once per generation (on CPU,
    once while they stay unchanged; see `ettin_jax.generation`):
    - `kernel`, the (D, V) vocabulary projection (`ModernBertDecoderForCausalLM.output_kernel`);
      on CPU a (V, D) operand costs XLA a transposed copy of the whole matrix at every step;
    - `qkv`, each layer's query, key and value projections as one (D, 3, N, H) kernel, with its
      (3, N, H) bias or None: one matmul instead of three for each layer of each decode step.
      None off CPU, where the stack would be a copy of 3/8 of the weights in every program."""

    kernel: Array
    qkv: tuple[tuple[Array, Array | None], ...] | None


@flax.struct.dataclass
class LayerCache:
    """One layer's keys and values for decoding. A global layer holds a slot for every position
    up to the cache length; a sliding layer holds a ring of `sliding_window` slots, a third of
    the memory at long context. `positions` is the absolute position of the token in each slot
    (-1: empty or padding); masks are built from it, never from slot indices.

    Keys and values are stored heads-first, (B, N, S, H): the layout both attention products
    read directly. A (B, S, N, H) cache costs XLA a transposed copy of it at every step."""

    k: Array  # (B, N, S, H)
    v: Array  # (B, N, S, H)
    positions: Array  # (B, S) int32

    @classmethod
    def empty(cls, batch: int, slots: int, num_heads: int, head_dim: int, dtype: DType) -> LayerCache:
        shape = (batch, num_heads, slots, head_dim)
        # Separate buffers: aliased k and v would make XLA copy them to update either in place.
        return cls(
            k=constrain(jnp.zeros(shape, dtype), "cache"),
            v=constrain(jnp.zeros(shape, dtype), "cache"),
            positions=constrain(jnp.full((batch, slots), -1, jnp.int32), "cache_positions"),
        )

    def write(self, k: Array, v: Array, positions: Array, index: Array | int) -> LayerCache:
        """Stores T new tokens (k, v: (B, T, N, H)) that sit at sequence indices
        index .. index + T - 1: slot index % S, so a ring keeps the newest S tokens."""
        slots, length = self.k.shape[2], k.shape[1]
        k, v = k.transpose(0, 2, 1, 3).astype(self.k.dtype), v.transpose(0, 2, 1, 3).astype(self.v.dtype)
        if length == 1:
            slot = jnp.asarray(index, jnp.int32) % slots
            return LayerCache(
                jax.lax.dynamic_update_slice_in_dim(self.k, k, slot, axis=2),
                jax.lax.dynamic_update_slice_in_dim(self.v, v, slot, axis=2),
                jax.lax.dynamic_update_slice_in_dim(self.positions, positions, slot, axis=1),
            )
        if length > slots:  # only the newest `slots` tokens survive in a ring
            k, v, positions = k[:, :, -slots:], v[:, :, -slots:], positions[:, -slots:]
            index, length = index + length - slots, slots
        where = (index + jnp.arange(length)) % slots
        return LayerCache(
            self.k.at[:, :, where].set(k), self.v.at[:, :, where].set(v), self.positions.at[:, where].set(positions)
        )

    def mask(self, q_positions: Array, window: int | None) -> Array:
        """(B, 1, T, S): what queries at `q_positions` (B, T) may see in this cache."""
        return make_attention_mask(q_positions, self.positions, self.positions >= 0, window)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


def _drop(dropout: nnx.Dropout | None, x: Array, deterministic: bool) -> Array:
    return x if dropout is None else dropout(x, deterministic=deterministic)


class _Factory:
    """Builds Linear/LayerNorm layers with the model's dtypes and transformers' initialisation."""

    def __init__(self, config: ModernBertDecoderConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config, self.dtype, self.param_dtype, self.rngs = config, dtype, param_dtype, rngs
        r = config.initializer_range
        self.std = {
            "in": r,
            "out": r / np.sqrt(2.0 * config.num_hidden_layers),
            "final_out": config.hidden_size**-0.5,
        }

    def linear(self, d_in: int, d_out: int, bias: bool, std: str) -> nnx.Linear:
        return nnx.Linear(
            d_in, d_out, use_bias=bias,
            kernel_init=trunc_normal(self.std[std], self.config.initializer_cutoff_factor),
            dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs,
        )  # fmt: skip

    def norm(self) -> nnx.LayerNorm:
        return nnx.LayerNorm(
            self.config.hidden_size, epsilon=self.config.norm_eps, use_bias=self.config.norm_bias,
            use_fast_variance=False, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs,
        )  # fmt: skip


# ---- modules ------------------------------------------------------------------------------
class Embeddings(nnx.Module):
    def __init__(self, make: _Factory):
        c = make.config
        self.tok_embeddings = nnx.Embed(
            c.vocab_size, c.hidden_size, dtype=make.dtype, param_dtype=make.param_dtype,
            embedding_init=trunc_normal(c.initializer_range, c.initializer_cutoff_factor), rngs=make.rngs,
        )  # fmt: skip
        self.norm = make.norm()
        self.drop = _dropout(c.embedding_dropout, make.rngs)

    def __call__(self, input_ids: Array | None, inputs_embeds: Array | None, deterministic: bool) -> Array:
        if inputs_embeds is None:
            table = constrain(self.tok_embeddings.embedding[...], "embedding_lookup")
            # Out-of-range ids give NaN rather than a silently clamped row (ids that are not
            # concrete, under jit, cannot be checked in Python).
            inputs_embeds = jnp.take(table, input_ids, axis=0, mode="fill", fill_value=jnp.nan)
            inputs_embeds = inputs_embeds.astype(self.tok_embeddings.dtype)
        return constrain(_drop(self.drop, self.norm(inputs_embeds), deterministic), "hidden")


class Attention(nnx.Module):
    def __init__(self, make: _Factory, layer: int):
        c = make.config
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.window = c.sliding_window if c.is_sliding(layer) else None
        inner = c.num_attention_heads * c.head_dim
        self.q_proj = make.linear(c.hidden_size, inner, c.attention_bias, "in")
        self.k_proj = make.linear(c.hidden_size, inner, c.attention_bias, "in")
        self.v_proj = make.linear(c.hidden_size, inner, c.attention_bias, "in")
        self.Wo = make.linear(inner, c.hidden_size, c.attention_bias, "out")
        self.attn_drop = _dropout(c.attention_dropout, make.rngs)
        self.out_drop = _dropout(c.attention_dropout, make.rngs)
        self.impl = c.attention_impl  # static; `set_attention_impl` changes it

    def fused_qkv(self) -> tuple[Array, Array | None]:
        """The q, k and v projections stacked: kernel (D, 3, N, H) and bias (3, N, H) or None.
        Stacked on a new axis, so that each keeps its heads axis (and that axis's sharding)."""
        shape = (self.num_heads, self.head_dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        kernel = jnp.stack([p.kernel[...].reshape(-1, *shape) for p in projections], axis=1)
        if self.q_proj.bias is None:
            return kernel, None
        return kernel, jnp.stack([p.bias[...].reshape(shape) for p in projections])

    def qkv(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        rows: Array | None = None,
        fused: tuple[Array, Array | None] | None = None,
    ) -> tuple[Array, Array, Array]:
        """x (B, T, D) -> q, k, v (B, T, N, H), with RoPE applied to q and k. With `rows` (B, Q),
        queries only for the tokens at those sequence indices: q (B, Q, N, H). With `fused`
        (from `fused_qkv`, ignored with `rows`), one matmul computes all three."""

        def project(proj: nnx.Linear, x: Array) -> Array:
            return constrain(proj(x).reshape(*x.shape[:2], self.num_heads, self.head_dim), "heads")

        if fused is not None and rows is None:
            kernel, bias = fused
            dtype = self.q_proj.dtype or jnp.result_type(x, kernel)  # as nnx.Linear computes
            qkv = jnp.einsum("BTD,DKNH->BTKNH", x.astype(dtype), kernel.astype(dtype))
            if bias is not None:
                qkv = qkv + bias.astype(dtype)
            q, k, v = (constrain(qkv[:, :, i], "heads") for i in range(3))
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

        k, v = project(self.k_proj, x), project(self.v_proj, x)
        if rows is None:
            q = apply_rope(project(self.q_proj, x), cos, sin)
        else:
            q = apply_rope(project(self.q_proj, take_rows(x, rows)), take_rows(cos, rows), take_rows(sin, rows))
        return q, apply_rope(k, cos, sin), v

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: MaskSpec | None,
        deterministic: bool,
        cache: LayerCache | None = None,
        positions: Array | None = None,
        index: Array | int = 0,
        rows: Array | None = None,
        fused: tuple[Array, Array | None] | None = None,
    ) -> tuple[Array, LayerCache | None]:
        """Without a cache: attention over x itself under the `MaskSpec`, by this layer's backend;
        with `rows` (B, Q), the output (B, Q, D) of the tokens at those sequence indices only.
        With a cache, the new keys are stored at sequence `index`. Several tokens (a prefill into
        an empty cache, with a `MaskSpec`) attend over themselves by this layer's backend; a single
        token (mask None) attends over the cache."""
        q, k, v = self.qkv(x, cos, sin, rows, fused)
        if cache is not None:
            cache = cache.write(k, v, positions, index)
        if isinstance(mask, MaskSpec):
            if rows is None:
                out = attend(q, k, v, mask, self.window, self.impl, self.attn_drop, deterministic)
            else:
                out = xla_attention(q, k, v, mask, self.window, self.attn_drop, deterministic, rows)  # every backend
            out = self.Wo(out.reshape(*q.shape[:2], -1))
            return _drop(self.out_drop, out, deterministic), cache
        if cache is None:
            raise ValueError("attention without a MaskSpec needs a cache to decode against")
        # A decode step: the new token attends over the cache, heads-first (B, N, S, H).
        mask = cache.mask(positions, self.window)
        out = softmax_attend(
            q, cache.k, cache.v, mask, self.attn_drop, deterministic, "BTNH,BNSH->BNTS|BNTS,BNSH->BTNH"
        )
        out = self.Wo(out.reshape(*x.shape[:2], -1))
        return _drop(self.out_drop, out, deterministic), cache


class MLP(nnx.Module):
    """GeGLU: Wo(act(first half of Wi x) * second half)."""

    def __init__(self, make: _Factory):
        c = make.config
        self.Wi = make.linear(c.hidden_size, 2 * c.intermediate_size, c.mlp_bias, "in")
        self.Wo = make.linear(c.intermediate_size, c.hidden_size, c.mlp_bias, "out")
        self.act = ACTIVATIONS[c.hidden_activation]
        self.drop = _dropout(c.mlp_dropout, make.rngs)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        inputs, gate = jnp.split(self.Wi(x), 2, axis=-1)  # (B, T, F) each
        h = constrain(self.act(inputs) * gate, "mlp")
        return self.Wo(_drop(self.drop, h, deterministic))


class DecoderLayer(nnx.Module):
    def __init__(self, make: _Factory, layer: int):
        # Layer 0 has no attention norm: the embeddings were just normalised.
        self.attn_norm = nnx.data(make.norm() if layer != 0 else None)
        self.attn = Attention(make, layer)
        self.mlp_norm = make.norm()
        self.mlp = MLP(make)

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: MaskSpec | None,
        deterministic: bool,
        cache: LayerCache | None = None,
        positions: Array | None = None,
        index: Array | int = 0,
        rows: Array | None = None,
        fused: tuple[Array, Array | None] | None = None,
    ) -> tuple[Array, LayerCache | None]:
        """x (B, T, D) -> (B, T, D); with `rows` (B, Q), the output of the tokens at those
        sequence indices only, (B, Q, D), every token still a key and value of the attention.
        `fused`: this layer's `Attention.fused_qkv()`, for generation."""
        x = gradient_fence(x)  # the identity; see its docstring
        h = x if self.attn_norm is None else self.attn_norm(x)
        attn, cache = self.attn(h, cos, sin, mask, deterministic, cache, positions, index, rows, fused)
        if rows is not None:
            x = take_rows(x, rows)
        x = gradient_fence(x + attn)
        return constrain(x + self.mlp(self.mlp_norm(x), deterministic), "hidden"), cache


class PredictionHead(nnx.Module):
    """dense -> activation -> LayerNorm; `lm_head` of the causal LM and `head` of the classifier."""

    def __init__(self, make: _Factory):
        c = make.config
        self.dense = make.linear(c.hidden_size, c.hidden_size, c.classifier_bias, "out")
        self.act = ACTIVATIONS[c.classifier_activation]
        self.norm = make.norm()

    def __call__(self, x: Array) -> Array:
        return self.norm(self.act(self.dense(x)))


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained`, as in transformers. The work is in
    `ettin_jax.convert`, which imports this module, so it is imported at call time."""

    config: ModernBertDecoderConfig

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        revision: str | None = None,
        mesh: Any = None,
        **config_overrides: Any,
    ) -> Any:
        """Loads a transformers checkpoint (safetensors, sharded or not, or pytorch_model.bin),
        a Hub repo id, or a directory written by `save_pretrained(format="flax")`.
        Keyword arguments such as `num_labels`, `problem_type` or `id2label` override the config.
        With a `mesh` (`ettin_jax.sharding.make_mesh`), params are sharded over it as they load."""
        from ettin_jax.convert import load_pretrained

        return load_pretrained(
            cls, path_or_repo_id, dtype=dtype, param_dtype=param_dtype, revision=revision, mesh=mesh,
            **config_overrides,
        )  # fmt: skip

    def save_pretrained(self, directory: str | os.PathLike, format: str = "transformers") -> None:
        """`format="transformers"`: config.json + model.safetensors that transformers loads.
        `format="flax"`: config.json + an orbax checkpoint of the params."""
        from ettin_jax.convert import save_pretrained

        save_pretrained(self, directory, format=format)

    def set_attention_impl(self, impl: str) -> None:
        """Switches every layer to the attention backend `impl` (see `ettin_jax.attention`),
        without reloading; the next call compiles with it."""
        if impl not in ATTENTION_IMPLS:
            raise InputError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        for _, node in nnx.iter_graph(self):
            if isinstance(node, Attention):
                node.impl = impl
            if hasattr(node, "config") and isinstance(node.config, ModernBertDecoderConfig):
                node.config = node.config.replace(attention_impl=impl)

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


class ModernBertDecoderModel(nnx.Module, PretrainedMixin):
    """Embeddings -> layers -> final_norm. `__call__` follows transformers' signature."""

    def __init__(
        self,
        config: ModernBertDecoderConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.config = config
        make = _Factory(config, dtype, param_dtype, rngs if rngs is not None else nnx.Rngs(0))
        self.embeddings = Embeddings(make)
        self.layers = nnx.List([DecoderLayer(make, i) for i in range(config.num_hidden_layers)])
        self.final_norm = make.norm()
        # Recompute each layer's activations in the backward pass instead of storing them
        # (training only; see `ettin_jax.train`). A static attribute: part of the graphdef.
        self.remat = False

    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        inputs_embeds: Array | None = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        *,
        rows: Array | None = None,
    ) -> BaseModelOutput:
        """`segment_ids` (B, T), ints >= 0, packs several sequences in a row: a token attends
        only to tokens of its own segment (give each its own position_ids, from 0).

        `rows` (B, Q) sequence indices: `last_hidden_state` (B, Q, D) holds the tokens at those
        indices only, and the last layer computes queries, attention output and MLP for them
        alone (a classifier pools one token per row). Not with `output_hidden_states`."""
        c = self.config
        input_ids, attention_mask, position_ids, inputs_embeds, segment_ids = check_inputs(
            c, input_ids, attention_mask, position_ids, inputs_embeds, segment_ids
        )
        if rows is not None and output_hidden_states:
            raise InputError("rows and output_hidden_states exclude each other: hidden states need every token")
        h = self.embeddings(input_ids, inputs_embeds, deterministic)  # (B, T, D)
        batch, length = h.shape[:2]
        index = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if position_ids is None:
            position_ids = index
        valid = jnp.ones((batch, length), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        # As in transformers, masks come from token indices and RoPE from position_ids. Each
        # layer builds its own mask from this, as its backend needs it.
        spec = MaskSpec(index=index, valid=valid, segment_ids=segment_ids)
        ropes = {
            "full_attention": rope_tables(position_ids, c.head_dim, c.global_rope_theta),
            "sliding_attention": rope_tables(position_ids, c.head_dim, c.local_rope_theta),
        }

        def run(layer: DecoderLayer, h: Array, cos: Array, sin: Array, mask: MaskSpec, rows: Array | None) -> Array:
            return layer(h, cos, sin, mask, deterministic, rows=rows)[0]

        if self.remat:
            run = nnx.remat(run)
        hidden = [h]
        last = len(self.layers) - 1
        for i, (kind, layer) in enumerate(zip(c.layer_types, self.layers, strict=True)):
            h = run(layer, h, *ropes[kind], spec, rows if i == last else None)
            hidden.append(h)
        h = self.final_norm(h)
        return BaseModelOutput(
            last_hidden_state=h,
            hidden_states=(*hidden[:-1], h) if output_hidden_states else None,
        )

    def init_cache(self, batch: int, length: int, dtype: DType | None = None) -> tuple[LayerCache, ...]:
        """Empty caches: `length` slots for global layers, `sliding_window` for sliding ones."""
        c = self.config
        dtype = dtype or self.embeddings.tok_embeddings.dtype
        slots = {"full_attention": length, "sliding_attention": min(length, c.sliding_window)}
        return tuple(
            LayerCache.empty(batch, slots[kind], c.num_attention_heads, c.head_dim, dtype) for kind in c.layer_types
        )

    def forward_cached(
        self,
        input_ids: Array,
        positions: Array,
        caches: tuple[LayerCache, ...],
        index: Array | int,
        last_only: bool = False,
        qkv: tuple[tuple[Array, Array | None], ...] | None = None,
    ) -> tuple[Array, tuple[LayerCache, ...]]:
        """The incremental forward pass for generation. input_ids (B, T) sit at sequence
        indices index .. index + T - 1 of a left-padded batch; `positions` (B, T) are their
        positions, -1 for padding. T > 1 is a prefill into empty caches; T == 1 a decode step.
        Returns final hidden states (B, T, D), or with `last_only` those of the last column alone,
        (B, 1, D), whose last layer then runs its queries and MLP on that column only (every
        token is still cached); and the updated caches. `qkv`: `DecodeWeights.qkv`, optional."""
        c = self.config
        h = self.embeddings(input_ids, None, True)
        rope_positions = jnp.maximum(positions, 0)
        spec, rows = None, None
        if last_only:
            rows = jnp.full((input_ids.shape[0], 1), input_ids.shape[1] - 1, jnp.int32)
        if input_ids.shape[1] > 1:
            # A prefill runs each layer's attention backend, as a forward pass does: masks from
            # column indices, as in transformers; with left padding a row's real tokens are
            # contiguous, so columns and positions differ by a per-row constant.
            batch, length = input_ids.shape
            spec = MaskSpec(index=jnp.broadcast_to(jnp.arange(length), (batch, length)), valid=positions >= 0)
        ropes = {
            "full_attention": rope_tables(rope_positions, c.head_dim, c.global_rope_theta),
            "sliding_attention": rope_tables(rope_positions, c.head_dim, c.local_rope_theta),
        }
        new_caches = []
        last = len(self.layers) - 1
        for i, (kind, layer, cache) in enumerate(zip(c.layer_types, self.layers, caches, strict=True)):
            fused = None if qkv is None else qkv[i]
            h, cache = layer(h, *ropes[kind], spec, True, cache, positions, index, rows if i == last else None, fused)
            new_caches.append(cache)
        return self.final_norm(h), tuple(new_caches)


class LMDecoder(nnx.Module):
    """The vocabulary projection, `decoder` in the checkpoint. With tied embeddings it has no
    kernel of its own and uses the embedding matrix, but its bias is still its own."""

    def __init__(self, make: _Factory):
        c = make.config
        self.dtype = make.dtype
        init = trunc_normal(make.std["out"], c.initializer_cutoff_factor)
        self.kernel = nnx.data(
            None if c.tie_word_embeddings
            else nnx.Param(init(make.rngs.params(), (c.hidden_size, c.vocab_size), make.param_dtype))
        )  # fmt: skip
        self.bias = nnx.data(nnx.Param(jnp.zeros((c.vocab_size,), make.param_dtype)) if c.decoder_bias else None)

    def __call__(self, x: Array, kernel: Array) -> Array:
        """x (B, T, D) and the (D, V) kernel from `ModernBertDecoderForCausalLM.output_kernel`."""
        logits = jnp.einsum("BTD,DV->BTV", x, kernel.astype(self.dtype))
        if self.bias is not None:
            logits = logits + self.bias[...].astype(self.dtype)
        return constrain(logits, "logits")


class ModernBertDecoderForCausalLM(nnx.Module, PretrainedMixin):
    def __init__(
        self,
        config: ModernBertDecoderConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.config = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        make = _Factory(config, dtype, param_dtype, rngs)
        self.model = ModernBertDecoderModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = PredictionHead(make)
        self.decoder = LMDecoder(make)

    def generate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> np.ndarray:
        """Sampling with transformers' semantics; see `ettin_jax.generation.generate`."""
        from ettin_jax.generation import generate  # generation imports this module

        return generate(self, input_ids, attention_mask, **kwargs)

    def generate_stream(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        """Yields each step's new tokens; see `ettin_jax.generation.generate_stream`."""
        from ettin_jax.generation import generate_stream

        return generate_stream(self, input_ids, attention_mask, **kwargs)

    def output_kernel(self) -> Array:
        """The (D, V) vocabulary projection: the decoder's own kernel, or the transposed
        embedding when tied. Generation takes it once, before its decode loop: on CPU a
        (V, D) operand costs XLA a transpose of the whole matrix at every step."""
        if self.decoder.kernel is not None:
            return self.decoder.kernel[...]
        return self.model.embeddings.tok_embeddings.embedding[...].T

    def decode_weights(self, fuse_qkv: bool = True) -> DecodeWeights:
        """The weights generation uses, laid out for its decode loop; see `DecodeWeights`."""
        qkv = tuple(layer.attn.fused_qkv() for layer in self.model.layers) if fuse_qkv else None
        return DecodeWeights(kernel=self.output_kernel(), qkv=qkv)

    def logits(self, hidden: Array, kernel: Array | None = None) -> Array:
        """(B, T, D) final hidden states -> (B, T, V) logits."""
        return self.decoder(self.lm_head(hidden), self.output_kernel() if kernel is None else kernel)

    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        inputs_embeds: Array | None = None,
        labels: Array | None = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> CausalLMOutput:
        out = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, deterministic, segment_ids
        )
        logits = self.logits(out.last_hidden_state)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=out.hidden_states)


class ModernBertDecoderForSequenceClassification(nnx.Module, PretrainedMixin):
    def __init__(
        self,
        config: ModernBertDecoderConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.config = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        make = _Factory(config, dtype, param_dtype, rngs)
        self.model = ModernBertDecoderModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = PredictionHead(make)
        self.drop = _dropout(config.classifier_dropout, rngs)
        self.classifier = make.linear(config.hidden_size, config.num_labels, config.classifier_bias, "final_out")

    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        inputs_embeds: Array | None = None,
        labels: Array | None = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> SequenceClassifierOutput:
        input_ids, attention_mask, position_ids, inputs_embeds, segment_ids = check_inputs(
            self.config, input_ids, attention_mask, position_ids, inputs_embeds, segment_ids
        )
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        pad = self.config.pad_token_id
        if pad is None and batch > 1:
            raise InputError("pad_token_id is not set in the config, so padded rows cannot be pooled; use batch size 1")
        if input_ids is None or pad is None:
            last = jnp.full((batch,), length - 1)
        else:
            # The rightmost token that is not padding: right for left and right padding alike.
            last = jnp.argmax(jnp.arange(length) * (input_ids != pad), axis=-1)
        # The head runs on every position in transformers; only the pooled one is needed, so
        # without hidden states to return, the last layer computes that token alone.
        rows = None if output_hidden_states else last[:, None]
        out = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, deterministic, segment_ids,
            rows=rows,
        )  # fmt: skip
        h = out.last_hidden_state if rows is not None else take_rows(out.last_hidden_state, last[:, None])
        pooled = self.classifier(_drop(self.drop, self.head(h), deterministic))[:, 0]  # (B, L)
        loss = None if labels is None else classification_loss(self.config, pooled, labels)
        return SequenceClassifierOutput(logits=pooled, loss=loss, hidden_states=out.hidden_states)


# ---- losses -------------------------------------------------------------------------------
IGNORE_INDEX = -100


def causal_lm_loss(logits: Array, labels: Array) -> Array:
    """Next-token cross-entropy, mean over labels that are not -100, as transformers computes it:
    position t predicts labels[t + 1]. With every label ignored the loss is 0 (PyTorch: NaN)."""
    labels = _as_array(labels)
    if labels.shape != logits.shape[:2] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputError(
            f"labels must be integers of shape {tuple(logits.shape[:2])} like input_ids, "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    _check_label_range(labels, logits.shape[-1], "token id")
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
    return jnp.sum(losses * keep) / jnp.maximum(jnp.sum(keep), 1)


def _check_label_range(labels: Array, limit: int, what: str) -> None:
    values = _concrete(labels)
    if values is not None:
        bad = (values != IGNORE_INDEX) & ((values < 0) | (values >= limit))
        if bad.any():
            raise InputError(f"label {values[bad][0]} is not a valid {what} in [0, {limit}) (nor -100, ignored)")


def problem_type(config: ModernBertDecoderConfig, labels: Array) -> str:
    """config.problem_type, or transformers' guess from num_labels and the labels' dtype."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(config: ModernBertDecoderConfig, logits: Array, labels: Array) -> Array:
    """MSE, cross-entropy (labels -100 ignored) or BCE-with-logits by problem type; logits (B, L)."""
    labels = _as_array(labels)
    logits = logits.astype(jnp.float32)
    batch, num_labels = logits.shape
    kind = problem_type(config, labels)
    if kind == "regression":
        expected = {(batch,), (batch, 1)} if num_labels == 1 else {(batch, num_labels)}
        _check_label_shape(labels, expected, kind)
        return jnp.mean((logits.reshape(-1) - labels.reshape(-1).astype(jnp.float32)) ** 2)
    if kind == "single_label_classification":
        _check_label_shape(labels, {(batch,), (batch, 1)}, kind)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise InputError(f"{kind} needs integer labels, got {labels.dtype}")
        _check_label_range(labels, num_labels, "class")
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
        return jnp.sum(losses * keep) / jnp.maximum(jnp.sum(keep), 1)  # all ignored: 0 (PyTorch: NaN)
    _check_label_shape(labels, {(batch, num_labels)}, kind)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))


def _check_label_shape(labels: Array, expected: set[tuple[int, ...]], kind: str) -> None:
    if tuple(labels.shape) not in expected:
        raise InputError(
            f"{kind} labels must have shape {' or '.join(str(e) for e in sorted(expected))}, got {tuple(labels.shape)}"
        )


# ---- input checks -------------------------------------------------------------------------
def _as_array(x: Any) -> Array:
    """Lists and numpy arrays become jax arrays; jax arrays and tracers pass through."""
    return x if isinstance(x, jax.Array) else jnp.asarray(np.asarray(x))


def _concrete(x: Any) -> np.ndarray | None:
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
) -> tuple[Array | None, ...]:
    """Clear errors for inputs that would otherwise fail deep inside JAX or give wrong numbers.
    Returns the inputs as arrays."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids and inputs_embeds")
    input_ids, attention_mask, position_ids, inputs_embeds, segment_ids = (
        None if x is None else _as_array(x)
        for x in (input_ids, attention_mask, position_ids, inputs_embeds, segment_ids)
    )
    if input_ids is not None:
        if jnp.ndim(input_ids) != 2:
            raise InputError(f"input_ids must have shape (batch, length), got {jnp.shape(input_ids)}")
        if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
            raise InputError(f"input_ids must be integers, got {jnp.result_type(input_ids)}")
        shape = tuple(jnp.shape(input_ids))
        ids = _concrete(input_ids)
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
    if shape[1] > config.max_position_embeddings:
        raise InputError(
            f"sequence length {shape[1]} is longer than max_position_embeddings ({config.max_position_embeddings})"
        )
    for name, value in (
        ("attention_mask", attention_mask),
        ("position_ids", position_ids),
        ("segment_ids", segment_ids),
    ):
        if value is not None and tuple(jnp.shape(value)) != shape:
            raise InputError(f"{name} has shape {tuple(jnp.shape(value))}; expected {shape} like the inputs")
    if position_ids is not None:
        pos = _concrete(position_ids)
        if pos is not None and (pos.min() < 0 or pos.max() >= config.max_position_embeddings):
            raise InputError(
                f"position_ids must lie in [0, {config.max_position_embeddings}) "
                f"(max_position_embeddings), got values from {pos.min()} to {pos.max()}"
            )
    if segment_ids is not None and not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise InputError(f"segment_ids must be integers, got {segment_ids.dtype}")
    return input_ids, attention_mask, position_ids, inputs_embeds, segment_ids
