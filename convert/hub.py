"""From a local directory or a Hub repo id to a local directory."""

from __future__ import annotations

import os

# What a model needs: config, weights (safetensors preferred) and tokenizer files.
_BASE_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def resolve(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> str:
    """A local directory as it is; otherwise a Hub repo id, downloaded (and cached) with
    huggingface_hub. `.bin` weights are fetched only when the repo has no safetensors."""
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"{name} is a file; pass the directory that holds config.json")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise FileNotFoundError(f"no such directory: {name!r}")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(name, revision=revision, allow_patterns=_BASE_PATTERNS)
        if not any(os.path.exists(os.path.join(local, w)) for w in _WEIGHTS):
            local = snapshot_download(name, revision=revision, allow_patterns=[*_BASE_PATTERNS, "*.bin"])
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth)
        raise OSError(
            f"{name!r} is not a local directory, and downloading it from the Hugging Face Hub failed: {e}"
        ) from e
    return local
