"""`from_pretrained`, `save_pretrained` and the other methods every model class shares, as
transformers' `PreTrainedModel` gives them; the reading and writing is `ettin_jax.convert`'s."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ettin_jax import convert
from ettin_jax.config import ModernBertDecoderConfig

DType = Any


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained`, as in transformers; the work is in `ettin_jax.convert`."""

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
        allow_nonfinite: bool = False,
        **config_overrides: Any,
    ) -> Any:
        """Loads a transformers checkpoint (safetensors, sharded or not, or pytorch_model.bin),
        a Hub repo id, or a directory written by `save_pretrained(format="flax")`.
        Keyword arguments such as `num_labels`, `problem_type` or `id2label` override the config.
        With a `mesh` (`ettin_jax.sharding.make_mesh`), params are sharded over it as they load.

        `quantization="int8"` (or transformers' `load_in_8bit=True`) quantizes the weights as they
        load, for inference (`ettin_jax.quantization`); a checkpoint saved so loads as int8 without
        it. `kv_cache_dtype="int8"` keeps generation's global-layer KV cache in int8.

        Every float tensor is checked for NaN and inf as it is read: one that holds any is a
        `CheckpointError` naming its checkpoint key. `allow_nonfinite=True` loads such a
        checkpoint anyway, with a warning naming the tensors."""
        return convert.load_pretrained(
            cls, path_or_repo_id, dtype=dtype, param_dtype=param_dtype, revision=revision, mesh=mesh,
            allow_nonfinite=allow_nonfinite, **config_overrides,
        )  # fmt: skip

    def save_pretrained(self, directory: str | os.PathLike, format: str = "transformers") -> None:
        """`format="transformers"`: config.json + model.safetensors that transformers loads.
        `format="flax"`: config.json + an orbax checkpoint of the params."""
        convert.save_pretrained(self, directory, format=format)

    def set_attention_impl(self, impl: str) -> None:
        """Switches every layer to the attention backend `impl` (see `ettin_jax.attention`),
        without reloading; the next call compiles with it."""
        config = self.config.replace(attention_impl=impl)  # checks the name
        for _, node in nnx.iter_graph(self):
            if hasattr(node, "impl"):  # each layer's attention
                node.impl = impl
            if hasattr(node, "config") and isinstance(node.config, ModernBertDecoderConfig):
                node.config = config

    def set_kv_cache_dtype(self, kv_cache_dtype: str) -> None:
        """Switches the KV cache of later generation to `kv_cache_dtype` ("auto" or "int8")."""
        config = self.config.replace(kv_cache_dtype=kv_cache_dtype)  # checks the name
        for _, node in nnx.iter_graph(self):
            if hasattr(node, "config") and isinstance(node.config, ModernBertDecoderConfig):
                node.config = config

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
