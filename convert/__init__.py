"""Checkpoint conversion: transformers (safetensors or .bin) and orbax in, both formats out.

Installed as `ettin_jax.convert` (see `[tool.setuptools.package-dir]` in pyproject.toml).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.convert.checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_fingerprint,
    checkpoint_format,
    read_checkpoint,
    save_pretrained,
)
from ettin_jax.convert.hub import resolve
from ettin_jax.convert.safetensors_io import CheckpointFormatError

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "checkpoint_format",
    "load_pretrained",
    "model_class",
    "save_pretrained",
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
    reads only the slices of the safetensors its own devices hold; with several processes,
    they must all load the same config and checkpoint (checked)."""
    from ettin_jax import distributed

    directory = resolve(path_or_repo_id, revision)
    # Overrides go through replace(), which rejects misspelt fields instead of dropping them.
    config = ModernBertDecoderConfig.from_pretrained(directory, legacy_rope=legacy_rope).replace(**config_overrides)
    distributed.agree("config", distributed.fingerprint(json.dumps(config.to_dict(), sort_keys=True), cls.__name__))
    distributed.agree("checkpoint", checkpoint_fingerprint(directory))
    checkpoint = read_checkpoint(directory)
    return build_model(
        cls, config, checkpoint, dtype=dtype, param_dtype=param_dtype, seed=seed, progress=progress, mesh=mesh
    )


ARCHITECTURES = ("ModernBertDecoderForCausalLM", "ModernBertDecoderForSequenceClassification", "ModernBertDecoderModel")


def model_class(directory: str) -> type:
    """The ettin-jax class for the `architectures` named in a directory's config.json
    (the causal LM when it names none)."""
    import json

    import ettin_jax.modeling as modeling

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        names = json.load(f).get("architectures") or ["ModernBertDecoderForCausalLM"]
    for name in names:
        if name in ARCHITECTURES:
            return getattr(modeling, name)
    raise CheckpointError(
        f"{directory}/config.json names architectures {names}; ettin-jax knows {sorted(ARCHITECTURES)}"
    )
