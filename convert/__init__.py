"""Checkpoint conversion: transformers (safetensors or .bin) and orbax in, both formats out.

Installed as `ettin_jax.convert` (see `[tool.setuptools.package-dir]` in pyproject.toml). It
takes the model class as an argument and never imports `ettin_jax.modeling`, which imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx, traverse_util

from ettin_jax import distributed, sharding
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.convert.checkpoint import (
    CheckpointError,
    CheckpointFormatError,
    Tensor,
    architecture,
    build_model,
    checkpoint_fingerprint,
    checkpoint_format,
    read_checkpoint,
    save_pretrained,
    save_transformers,
    transformers_state_dict,
    write_transformers,
)
from ettin_jax.convert.hub import resolve
from ettin_jax.quantization import QuantizationError

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "architecture",
    "checkpoint_format",
    "load_pretrained",
    "quantize_model",
    "resolve",
    "save_pretrained",
    "save_transformers",
    "transformers_state_dict",
    "write_transformers",
]


def load_pretrained(
    cls: type,
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    revision: str | None = None,
    legacy_rope: bool = False,
    progress: bool = False,
    seed: int = 0,
    mesh: Any = None,
    allow_nonfinite: bool = False,
    **config_overrides: Any,
) -> Any:
    """`cls` (one of the three model classes) with the weights at `path_or_repo_id`. With a
    `mesh` (`ettin_jax.sharding.make_mesh`) the params are sharded over it and each process
    reads only the slices its own devices hold; with several processes, they must all load the
    same config and checkpoint (checked). A tensor holding NaN or inf is a `CheckpointError`
    naming it, unless `allow_nonfinite` (then a warning)."""
    directory = resolve(path_or_repo_id, revision)
    if config_overrides.pop("load_in_8bit", False):  # transformers' spelling
        config_overrides["quantization"] = "int8"
    # Overrides go through replace(), which rejects misspelt fields instead of dropping them.
    stored = ModernBertDecoderConfig.from_pretrained(directory, legacy_rope=legacy_rope)
    config = stored.replace(**config_overrides)
    if stored.quantization is not None and config.quantization != stored.quantization:
        raise QuantizationError(
            f"{directory} holds {stored.quantization} weights (its config.json's quantization_config), which "
            f"cannot be loaded with quantization={config.quantization!r}; load the float checkpoint instead"
        )
    distributed.agree("config", distributed.fingerprint(json.dumps(config.to_dict(), sort_keys=True), cls.__name__))
    distributed.agree("checkpoint", checkpoint_fingerprint(directory))
    checkpoint = read_checkpoint(directory, mesh)
    return build_model(
        cls, config, checkpoint, dtype=dtype, param_dtype=param_dtype, seed=seed, progress=progress, mesh=mesh,
        allow_nonfinite=allow_nonfinite,
    )  # fmt: skip


def quantize_model(model: Any, quantization: str = "int8") -> Any:
    """A copy of a float `model` with `quantization` weights (see `ettin_jax.quantization`), of
    the same class, compute dtype and mesh."""
    config = model.config
    if config.quantization is not None:
        raise QuantizationError(f"the model is already quantized ({config.quantization})")
    state = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpoint = {
        path: Tensor("/".join(map(str, path)), tuple(value.shape), value.nbytes, value.__getitem__)
        for path, value in state.items()
    }
    # The model's own params, checked when they were loaded: NaN or inf here were let in then.
    linear = next(node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear))
    return build_model(
        type(model), config.replace(quantization=quantization), checkpoint, dtype=linear.dtype,
        param_dtype=linear.param_dtype, mesh=sharding.mesh_of(state), allow_nonfinite=True,
    )  # fmt: skip
