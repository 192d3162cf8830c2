"""ModernBERT Decoder (the Ettin decoders) in Flax NNX.

The model, read top to bottom: outputs, building blocks (init, RoPE), attention, MLP, the
decoder layer, the base model, then the two heads. Module and parameter names follow the
transformers checkpoint (`attn_norm`, `q_proj`, `Wi`, `Wo`, `final_norm`, `lm_head`, `decoder`,
`head`, `classifier`), so the key map in `ettin_jax.convert.keys` is nearly the identity:
PyTorch `weight` becomes `kernel` (transposed), `scale` (LayerNorm) or `embedding`.

What lives elsewhere: attention backends and masks (`attention`), the KV cache (`cache`), input
checks (`inputs`), losses (`losses`), sampling (`generation`, a mixin of the causal LM), and
`from_pretrained`/`save_pretrained` (`pretrained`, a mixin of every class, over `convert`).

Shape letters: B batch, T query length, S key length, D hidden, N heads, H head_dim,
F intermediate, V vocab, L labels, Q selected rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax import engine
from ettin_jax.attention import AttentionError, MaskSpec, attend, cached_attention, take_rows, xla_attention
from ettin_jax.cache import Cache, LayerCache, init_cache
from ettin_jax.compilation import gradient_fence
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.generation import GenerationMixin
from ettin_jax.inputs import InputError, check_inputs, concrete
from ettin_jax.losses import causal_lm_loss, classification_loss
from ettin_jax.pretrained import PretrainedMixin
from ettin_jax.quantization import Int8Kernel, matmul
from ettin_jax.sharding import constrain

Array = jax.Array
DType = Any


# ---- outputs ------------------------------------------------------------------------------
@flax.struct.dataclass
class BaseModelOutput:
    last_hidden_state: Array  # (B, T, D), after final_norm
    past_key_values: Cache | None = None  # with use_cache, or when continuing from a cache
    # Embedding output, then the output of each layer; the last entry is after final_norm,
    # as in transformers.
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None  # each layer's probabilities, (B, N, T, S)


@flax.struct.dataclass
class CausalLMOutput:
    logits: Array  # (B, T, V)
    loss: Array | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None


@flax.struct.dataclass
class SequenceClassifierOutput:
    logits: Array  # (B, L), pooled at the rightmost token that is not padding; (B, S, L) with pool_positions
    loss: Array | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None


# ---- building blocks ----------------------------------------------------------------------
def trunc_normal(std: float, cutoff: float) -> Callable[..., Array]:
    """torch.nn.init.trunc_normal_(std=std, a=-cutoff*std, b=cutoff*std), as transformers inits."""

    def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        return (std * jax.random.truncated_normal(key, -cutoff, cutoff, shape, jnp.float32)).astype(dtype)

    return init


# The config validates the names (config.ACTIVATIONS); these are the functions they stand for.
# transformers' "gelu" is the exact erf form; JAX's default is the tanh approximation.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


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


@flax.struct.dataclass
class LayerInputs:
    """What a decoder layer needs for one call besides its input and its cache: one value, so
    that a new path adds a field here instead of a parameter at three levels."""

    cos: Array  # (B, T, H) float32, the RoPE table of this layer's kind
    sin: Array  # (B, T, H)
    mask: MaskSpec  # sequence indices, padding and segments of the T new tokens
    start: Array | None = None  # () int32: the first new token's sequence index in the cache
    rows: Array | None = None  # (B, Q): output only the tokens at these sequence indices
    deterministic: bool = flax.struct.field(pytree_node=False, default=True)
    output_attentions: bool = flax.struct.field(pytree_node=False, default=False)


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

    def linear(self, d_in: int, d_out: int, bias: bool, std: str) -> nnx.Linear | Int8Linear:
        if self.config.quantization == "int8":
            return Int8Linear(d_in, d_out, bias, self.dtype, self.param_dtype)
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


# ---- int8 weights (see ettin_jax.quantization) ---------------------------------------------
class Int8Linear(nnx.Module):
    """nnx.Linear with an int8 kernel and one scale per output channel (`kernel_scale`); built
    in place of every Linear when `config.quantization == "int8"`. Inference only."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype: DType, param_dtype: DType):
        self.kernel = nnx.Param(jnp.zeros((d_in, d_out), jnp.int8))
        self.kernel_scale = nnx.Param(jnp.ones((d_out,), param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:  # (..., D_in) -> (..., D_out)
        y = matmul(x, Int8Kernel(self.kernel[...], self.kernel_scale[...]), self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Int8Embed(nnx.Module):
    """nnx.Embed's table as int8 rows with one scale per row (`embedding_scale`)."""

    def __init__(self, vocab: int, features: int, dtype: DType, param_dtype: DType):
        self.embedding = nnx.Param(jnp.zeros((vocab, features), jnp.int8))
        self.embedding_scale = nnx.Param(jnp.ones((vocab,), param_dtype))
        self.dtype = dtype


# ---- modules ------------------------------------------------------------------------------
class Embeddings(nnx.Module):
    def __init__(self, make: _Factory):
        c = make.config
        if c.quantization == "int8":
            self.tok_embeddings = Int8Embed(c.vocab_size, c.hidden_size, make.dtype, make.param_dtype)
        else:
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
            if isinstance(self.tok_embeddings, Int8Embed):
                scale = self.tok_embeddings.embedding_scale[...]
                rows = jnp.take(table, input_ids, axis=0, mode="fill", fill_value=0)
                scales = jnp.take(scale, input_ids, axis=0, mode="fill", fill_value=jnp.nan)
                inputs_embeds = rows.astype(jnp.float32) * scales[..., None].astype(jnp.float32)
            else:
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

    def _heads(self, proj: nnx.Linear, x: Array) -> Array:  # (B, T, D) -> (B, T, N, H)
        return constrain(proj(x).reshape(*x.shape[:2], self.num_heads, self.head_dim), "heads")

    def __call__(
        self, x: Array, inputs: LayerInputs, cache: LayerCache | None
    ) -> tuple[Array, LayerCache | None, Array | None]:
        """x (B, T, D) -> (B, T, D), or (B, Q, D) with `inputs.rows`; the cache with the new keys
        stored; the probabilities (B, N, T, S) with `inputs.output_attentions`, else None.

        Without past tokens (no cache, or one with no slots yet), attention over x itself by this
        layer's backend. With past tokens, a single token is stored first and attends over the
        cache; several attend over the cache and themselves, then are stored."""
        rows, mask, start = inputs.rows, inputs.mask, inputs.start
        cos, sin = inputs.cos, inputs.sin
        k, v = apply_rope(self._heads(self.k_proj, x), cos, sin), self._heads(self.v_proj, x)
        if rows is not None:  # queries only for the selected tokens; every token stays a key
            x, cos, sin = take_rows(x, rows), take_rows(cos, rows), take_rows(sin, rows)
        q = apply_rope(self._heads(self.q_proj, x), cos, sin)
        q_index = mask.index if rows is None else take_rows(mask.index, rows)
        stored = jnp.where(mask.valid, mask.index, -1)  # padding is never a key
        drop, deterministic = self.attn_drop, inputs.deterministic
        if cache is None or cache.slots == 0:
            if inputs.output_attentions and self.impl not in ("auto", "xla"):
                raise AttentionError(
                    f'attention_impl "{self.impl}" cannot return attention probabilities; use "xla" or "auto"'
                )
            if rows is not None or inputs.output_attentions:  # dense: O(Q * T), any backend
                out, probs = xla_attention(q, k, v, mask, self.window, drop, deterministic, rows)
            else:
                out, probs = attend(q, k, v, mask, self.window, self.impl, drop, deterministic), None
            if cache is not None:
                cache = cache.update(k, v, stored, start, self.window)
        elif x.shape[1] == 1:
            cache = cache.update(k, v, stored, start, self.window)
            out, probs = cached_attention(
                q, cache.keys(), cache.values(), q_index, cache.index, self.window, drop, deterministic
            )
        else:
            seen = cache.extended(k, v, stored)
            out, probs = cached_attention(q, seen.k, seen.v, q_index, seen.index, self.window, drop, deterministic)
            cache = cache.update(k, v, stored, start, self.window)
        out = _drop(self.out_drop, self.Wo(out.reshape(*q.shape[:2], -1)), deterministic)
        return out, cache, probs if inputs.output_attentions else None


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
        self, x: Array, inputs: LayerInputs, cache: LayerCache | None
    ) -> tuple[Array, LayerCache | None, Array | None]:
        """x (B, T, D) -> (B, T, D), or with `inputs.rows` (B, Q) the tokens at those sequence
        indices only, (B, Q, D); the updated cache and the attention probabilities."""
        x = gradient_fence(x)  # the identity; see its docstring
        h = x if self.attn_norm is None else self.attn_norm(x)
        attn, cache, probs = self.attn(h, inputs, cache)
        if inputs.rows is not None:
            x = take_rows(x, inputs.rows)
        x = gradient_fence(x + attn)
        return constrain(x + self.mlp(self.mlp_norm(x), inputs.deterministic), "hidden"), cache, probs


class PredictionHead(nnx.Module):
    """dense -> activation -> LayerNorm; `lm_head` of the causal LM and `head` of the classifier."""

    def __init__(self, make: _Factory):
        c = make.config
        self.dense = make.linear(c.hidden_size, c.hidden_size, c.classifier_bias, "out")
        self.act = ACTIVATIONS[c.classifier_activation]
        self.norm = make.norm()

    def __call__(self, x: Array) -> Array:
        return self.norm(self.act(self.dense(x)))


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
        past_key_values: Cache | None = None,
        inputs_embeds: Array | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        *,
        rows: Array | None = None,
    ) -> BaseModelOutput:
        """As transformers' forward. With `past_key_values` (a `Cache` from an earlier call's
        output) the new tokens continue those sequences: their sequence indices and default
        positions start at the cache's length, and `attention_mask` may cover the cached tokens
        too (its last T columns are the new tokens'). `use_cache=True` returns the cache.

        `segment_ids` (B, T), ints >= 0, packs several sequences in a row: a token attends only
        to tokens of its own segment (give each its own position_ids, from 0).

        `rows` (B, Q) sequence indices: `last_hidden_state` (B, Q, D) holds the tokens at those
        indices only, and the last layer computes queries, attention output and MLP for them
        alone (a classifier pools one token per row; the causal LM's `logits_to_keep`). Not with
        `output_hidden_states`."""
        c = self.config
        past = past_key_values
        past_length = 0 if past is None else concrete(past.length)
        input_ids, attention_mask, position_ids, inputs_embeds, segment_ids = check_inputs(
            c, input_ids, attention_mask, position_ids, inputs_embeds, segment_ids,
            past_length=None if past_length is None else int(np.max(past_length)),
        )  # fmt: skip
        if rows is not None and output_hidden_states:
            raise InputError("rows and output_hidden_states exclude each other: hidden states need every token")
        if segment_ids is not None and (past is not None or use_cache):
            raise InputError("segment_ids (packed sequences) cannot be combined with a KV cache")
        h = self.embeddings(input_ids, inputs_embeds, deterministic)  # (B, T, D)
        batch, length = h.shape[:2]
        if past is None and use_cache:  # a cache with no slots yet: each layer adds its own
            past = init_cache(c, batch, 0, h.dtype, static=False)
        start = None if past is None else past.length
        index = jnp.broadcast_to(jnp.arange(length), (batch, length))  # (B, T) sequence indices
        if start is not None:  # the cache's length: one for every row, or one per row
            index = index + jnp.reshape(start, (-1, 1))
        if position_ids is None:
            position_ids = index
        valid = jnp.ones((batch, length), bool)
        if attention_mask is not None:
            valid = jnp.asarray(attention_mask)[:, -length:].astype(bool)
        # As in transformers, masks come from sequence indices and RoPE from position_ids. Each
        # layer builds its own mask from the spec, as its backend needs it.
        spec = MaskSpec(index=index, valid=valid, segment_ids=segment_ids)
        tables = {
            "full_attention": rope_tables(position_ids, c.head_dim, c.global_rope_theta),
            "sliding_attention": rope_tables(position_ids, c.head_dim, c.local_rope_theta),
        }

        def run(layer: DecoderLayer, h: Array, inputs: LayerInputs, cache: LayerCache | None) -> tuple:
            return layer(h, inputs, cache)

        if self.remat:
            run = nnx.remat(run)
        hidden, attentions, caches = [h], [], []
        last = len(self.layers) - 1
        for i, (kind, layer) in enumerate(zip(c.layer_types, self.layers, strict=True)):
            inputs = LayerInputs(
                *tables[kind], spec, start, rows if i == last else None, deterministic, output_attentions
            )
            h, cache, probs = run(layer, h, inputs, None if past is None else past.layers[i])
            hidden.append(h)
            attentions.append(probs)
            caches.append(cache)
        h = self.final_norm(h)
        return BaseModelOutput(
            last_hidden_state=h,
            past_key_values=None if past is None else Cache(tuple(caches), past.length + length),
            hidden_states=(*hidden[:-1], h) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class LMDecoder(nnx.Module):
    """The vocabulary projection, `decoder` in the checkpoint. With tied embeddings it has no
    kernel of its own and uses the embedding matrix, but its bias is still its own."""

    def __init__(self, make: _Factory):
        c = make.config
        self.dtype = make.dtype
        init = trunc_normal(make.std["out"], c.initializer_cutoff_factor)
        self.kernel = nnx.data(
            None if c.tie_word_embeddings
            else nnx.Param(jnp.zeros((c.hidden_size, c.vocab_size), jnp.int8)) if c.quantization == "int8"
            else nnx.Param(init(make.rngs.params(), (c.hidden_size, c.vocab_size), make.param_dtype))
        )  # fmt: skip
        quantized = not c.tie_word_embeddings and c.quantization == "int8"
        self.kernel_scale = nnx.data(nnx.Param(jnp.ones((c.vocab_size,), make.param_dtype)) if quantized else None)
        self.bias = nnx.data(nnx.Param(jnp.zeros((c.vocab_size,), make.param_dtype)) if c.decoder_bias else None)

    def __call__(self, x: Array, kernel: Array | Int8Kernel) -> Array:
        """x (B, T, D) and the (D, V) kernel from `ModernBertDecoderForCausalLM.output_kernel`."""
        logits = matmul(x, kernel, self.dtype)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(self.dtype)
        return constrain(logits, "logits")


class ModernBertDecoderForCausalLM(nnx.Module, PretrainedMixin, GenerationMixin):
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

    def generate_batch(self, inputs: Any, **kwargs: Any) -> list[list[int]]:
        """Continuous batching over a list of token-id lists; see `ettin_jax.engine.generate_batch`."""
        return engine.generate_batch(self, inputs, **kwargs)

    def output_kernel(self) -> Array | Int8Kernel:
        """The (D, V) vocabulary projection: the decoder's own kernel, or the transposed
        embedding when tied; an `Int8Kernel` when quantized. Generation takes it once, before its
        decode loop: on CPU a (V, D) operand costs XLA a transpose of the whole matrix at every step."""
        decoder, table = self.decoder, self.model.embeddings.tok_embeddings
        if decoder.kernel is not None:
            kernel = decoder.kernel[...]
            return kernel if decoder.kernel_scale is None else Int8Kernel(kernel, decoder.kernel_scale[...])
        if isinstance(table, Int8Embed):  # a row's scale is its vocabulary column's scale
            return Int8Kernel(table.embedding[...].T, table.embedding_scale[...])
        return table.embedding[...].T

    def logits(self, hidden: Array, kernel: Array | None = None) -> Array:
        """(B, T, D) final hidden states -> (B, T, V) logits."""
        return self.decoder(self.lm_head(hidden), self.output_kernel() if kernel is None else kernel)

    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Array | None = None,
        labels: Array | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> CausalLMOutput:
        """As transformers' forward; see `ModernBertDecoderModel.__call__`. `logits_to_keep` > 0:
        logits for the last that many tokens only, whose last layer then computes queries and
        MLP for them alone (0: every token)."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise InputError(f"logits_to_keep must be an integer >= 0, got {logits_to_keep!r}")
        shape = np.shape(input_ids if input_ids is not None else inputs_embeds)
        keep = min(logits_to_keep, shape[1]) if logits_to_keep and len(shape) >= 2 else 0
        rows = None
        if keep and not output_hidden_states:  # (B, keep): the last `keep` sequence indices
            rows = jnp.broadcast_to(jnp.arange(shape[1] - keep, shape[1], dtype=jnp.int32), (shape[0], keep))
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, output_attentions,
            output_hidden_states, deterministic, segment_ids, rows=rows,
        )  # fmt: skip
        hidden = out.last_hidden_state
        if keep and rows is None:
            hidden = hidden[:, -keep:]
        logits = self.logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states, out.attentions)


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
        past_key_values: Cache | None = None,
        inputs_embeds: Array | None = None,
        labels: Array | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        pool_positions: Array | None = None,
    ) -> SequenceClassifierOutput:
        """As transformers' forward: logits pooled at each row's rightmost token that is not
        `pad_token_id` (right for left and right padding alike).

        `pool_positions` (B, S) sequence indices, for rows that pack S examples (`segment_ids`
        and `position_ids` tell them apart): each example is pooled at its own last token, and
        the logits are (B, S, L). Not with `labels`: which slots hold an example is the caller's."""
        input_ids, attention_mask, position_ids, inputs_embeds, segment_ids = check_inputs(
            self.config, input_ids, attention_mask, position_ids, inputs_embeds, segment_ids, past_length=None
        )
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        pad = self.config.pad_token_id
        if pool_positions is not None:
            last = _pool_positions(pool_positions, batch, length)  # (B, S)
            if labels is not None:
                raise InputError("labels cannot be combined with pool_positions; compute the loss from the logits")
        elif pad is None and batch > 1:
            raise InputError("pad_token_id is not set in the config, so padded rows cannot be pooled; use batch size 1")
        elif input_ids is None or pad is None:
            last = jnp.full((batch, 1), length - 1)
        else:
            last = jnp.argmax(jnp.arange(length) * (input_ids != pad), axis=-1)[:, None]
        # The head runs on every position in transformers; only the pooled ones are needed, so
        # unless every token's state is asked for, the last layer computes those tokens alone.
        rows = None if output_hidden_states or output_attentions else last
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, output_attentions,
            output_hidden_states, deterministic, segment_ids, rows=rows,
        )  # fmt: skip
        h = out.last_hidden_state if rows is not None else take_rows(out.last_hidden_state, last)
        pooled = self.classifier(_drop(self.drop, self.head(h), deterministic))  # (B, S, L)
        if pool_positions is None:
            pooled = pooled[:, 0]  # (B, L)
        loss = None if labels is None else classification_loss(self.config, pooled, labels)
        return SequenceClassifierOutput(pooled, loss, out.past_key_values, out.hidden_states, out.attentions)


def _pool_positions(positions: Any, batch: int, length: int) -> Array:
    """`pool_positions` checked: integers of shape (B, S) inside the row."""
    positions = jnp.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != batch or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise InputError(
            f"pool_positions must be integers of shape (batch={batch}, S), got {positions.dtype} of shape "
            f"{tuple(positions.shape)}"
        )
    values = concrete(positions)
    if values is not None and values.size and (values.min() < 0 or values.max() >= length):
        raise InputError(f"pool_positions must lie in [0, {length}), got values from {values.min()} to {values.max()}")
    return positions.astype(jnp.int32)
