"""Checkpoint conversion: transformers (safetensors or .bin) and orbax in, both formats out.

Installed as `ettin_jax.convert` (see `[tool.setuptools.package-dir]` in pyproject.toml). It
takes the model class as an argument and never imports `ettin_jax.modeling`, which imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from ettin_jax import distributed
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.convert.checkpoint import (
    CheckpointError,
    CheckpointFormatError,
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

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "architecture",
    "checkpoint_format",
    "load_pretrained",
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
    **config_overrides: Any,
) -> Any:
    """`cls` (one of the three model classes) with the weights at `path_or_repo_id`. With a
    `mesh` (`ettin_jax.sharding.make_mesh`) the params are sharded over it and each process
    reads only the slices its own devices hold; with several processes, they must all load the
    same config and checkpoint (checked)."""
    directory = resolve(path_or_repo_id, revision)
    # Overrides go through replace(), which rejects misspelt fields instead of dropping them.
    config = ModernBertDecoderConfig.from_pretrained(directory, legacy_rope=legacy_rope).replace(**config_overrides)
    distributed.agree("config", distributed.fingerprint(json.dumps(config.to_dict(), sort_keys=True), cls.__name__))
    distributed.agree("checkpoint", checkpoint_fingerprint(directory))
    checkpoint = read_checkpoint(directory, mesh)
    return build_model(
        cls, config, checkpoint, dtype=dtype, param_dtype=param_dtype, seed=seed, progress=progress, mesh=mesh
    )
