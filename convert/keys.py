"""The map between transformers checkpoint keys and ettin-jax param paths.

Module names are the same on both sides, so a key maps by its last component alone:

| checkpoint        | ettin-jax    | transform                         |
| ----------------- | ------------ | --------------------------------- |
| `*norm.weight`    | `*norm.scale`| none                              |
| `*.weight` (2-D)  | `*.kernel`   | transpose: PyTorch (out, in) -> (in, out) |
| `tok_embeddings.weight` | `tok_embeddings.embedding` | none          |
| `*.bias`          | `*.bias`     | none                              |

A param path is a tuple such as `("model", "layers", 3, "attn", "q_proj", "kernel")`.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_NORM = re.compile(r"(^|\.)(attn_norm|mlp_norm|final_norm|norm)$")


def to_path(key: str) -> tuple[Path, bool]:
    """Checkpoint key -> (param path, transpose?)."""
    *modules, leaf = key.split(".")
    path: list[str | int] = [int(m) if m.isdigit() else m for m in modules]
    owner = ".".join(modules)
    if leaf == "bias":
        return (*path, "bias"), False
    if leaf != "weight":
        return (*path, leaf), False  # not a parameter we know; reported as unexpected
    if owner.endswith("tok_embeddings"):
        return (*path, "embedding"), False
    if _NORM.search(owner):
        return (*path, "scale"), False
    return (*path, "kernel"), True


def to_key(path: Path) -> tuple[str, bool]:
    """Param path -> (checkpoint key, transpose?)."""
    *modules, leaf = (str(p) for p in path)
    prefix = ".".join(modules)
    if leaf == "kernel":
        return f"{prefix}.weight", True
    if leaf in ("scale", "embedding"):
        return f"{prefix}.weight", False
    return f"{prefix}.{leaf}", False
