"""Sharding over a device mesh: one table of rules, and the helpers that apply it.

The mesh has three axes, always in this order (the last varies fastest, so `tensor` stays
inside a host and `data` spans hosts):

    data    copies of the model, each on its own slice of the batch
    fsdp    params split along the embedding dimension, gathered layer by layer; also splits the batch
    tensor  heads and the MLP dimension split (Megatron style)

Every param and the main activations name their dimensions with logical axes; `RULES` maps
those to mesh axes. The same model code runs on one CPU (no mesh: every constraint is a
no-op), on 8 CPU devices and on a pod; only the mesh differs. Params are placed by
`shard_model` or, reading only each host's slices, by `from_pretrained(..., mesh=mesh)`.

A param dimension that a mesh axis does not divide is an error (`ShardingError`) that names
the param, its shape and the axis; activations fall back to replication on such a dimension
(a batch of 1 on a data axis of 8 is replicated, not an error).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ettin_jax.errors import EttinError

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. None: replicated.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}

# Param path (joined with ".") -> logical axes of each dimension; the first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"tok_embeddings\.embedding$", ("vocab", "embed")),
    (r"attn\.[qkv]_proj\.kernel$", ("embed", "heads")),  # (D, N*H)
    (r"attn\.[qkv]_proj\.bias$", ("heads",)),
    (r"attn\.Wo\.kernel$", ("heads", "embed")),  # (N*H, D)
    (r"mlp\.Wi\.kernel$", ("embed", "mlp")),  # (D, 2F)
    (r"mlp\.Wi\.bias$", ("mlp",)),
    (r"mlp\.Wo\.kernel$", ("mlp", "embed")),  # (F, D)
    (r"decoder\.kernel$", ("embed", "vocab")),  # (D, V)
    (r"decoder\.bias$", ("vocab",)),
    (r"(lm_head|head)\.dense\.kernel$", ("embed", None)),  # (D, D)
    (r"classifier\.kernel$", ("embed", None)),  # (D, L)
    # int8 weights' scales: one per output channel, split like that dimension of their weight
    (r"tok_embeddings\.embedding_scale$", ("vocab",)),
    (r"attn\.[qkv]_proj\.kernel_scale$", ("heads",)),
    (r"(attn|mlp)\.Wo\.kernel_scale$", ("embed",)),
    (r"mlp\.Wi\.kernel_scale$", ("mlp",)),
    (r"decoder\.kernel_scale$", ("vocab",)),
    (r"\.(scale|bias)$", (None,)),  # norms and the remaining biases: small, replicated
)

# The main activations, by name: what `constrain` pins inside the model.
ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    # The embedding table as the lookup reads it: gathered over fsdp, still split by vocabulary,
    # so the gather partitions cleanly instead of replicating its (B, T, D) output.
    "embedding_lookup": ("vocab", None),  # (V, D)
    "hidden": ("batch", None, None),  # (B, T, D)
    "heads": ("batch", None, "heads", None),  # q, k, v (B, T, N, H)
    "mlp": ("batch", None, "mlp"),  # (B, T, F)
    "logits": ("batch", None, "vocab"),  # (B, T, V)
    "cache": ("batch", "heads", None, None),  # (B, N, S, H)
    "cache_positions": ("batch", None),  # (B, S)
}


class ShardingError(EttinError, ValueError):
    """A mesh or a sharding that cannot work, named in the message."""


# ---- the mesh -----------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
    """ "data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; missing axes are 1,
    and one axis may be -1: all the devices the others leave."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in AXES:
            raise ShardingError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(AXES)}")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ShardingError(f"--mesh {text!r}: the size of {name.strip()} must be an integer") from None
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).
    One size may be -1 to take the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ShardingError(f"mesh {sizes}: sizes must be >= 1, and at most one of them -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if unknown:
        if len(devices) % known:
            raise ShardingError(f"mesh {sizes}: {len(devices)} devices do not divide by {known}")
        sizes[unknown[0]] = len(devices) // known
    wanted = int(np.prod(list(sizes.values())))
    if wanted > len(devices):
        raise ShardingError(
            f"mesh data={sizes['data']},fsdp={sizes['fsdp']},tensor={sizes['tensor']} needs {wanted} devices "
            f"but there are {len(devices)} ({devices[0].platform})"
        )
    if wanted < len(devices):
        raise ShardingError(
            f"mesh data={sizes['data']},fsdp={sizes['fsdp']},tensor={sizes['tensor']} uses {wanted} of the "
            f"{len(devices)} devices; give sizes whose product is {len(devices)} (or one size -1)"
        )
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_from_arg(text: str | None) -> Mesh | None:
    """The mesh a `--mesh` flag asks for; None without the flag."""
    if text is None:
        return None
    return make_mesh(**parse_mesh(text))


# ---- logical axes to specs ----------------------------------------------------------------
def _mesh_axes(logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in RULES:
        raise KeyError(f"no sharding rule for logical axis {logical!r}")
    return RULES[logical] or ()


def logical_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Any, *, strict: bool, what: str = "array"
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have these logical axes. A mesh axis of
    size 1 is dropped; one that does not divide its dimension is an error when `strict`, else
    that dimension is replicated."""
    if len(logical) != len(shape):
        raise ShardingError(f"{what}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}")
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axes = tuple(a for a in _mesh_axes(name) if mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in axes]))
        if axes and size % ways:
            if strict:
                raise ShardingError(
                    f"{what} has shape {tuple(shape)}: its {name!r} dimension ({size}) does not divide over "
                    f"mesh axis {'x'.join(axes)} of size {ways}; choose a mesh whose "
                    f"{'x'.join(axes)} size divides {size}"
                )
            axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_axes(path: Sequence[Any]) -> tuple[str | None, ...] | None:
    name = ".".join(str(p) for p in path)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            return axes
    return None


def param_sharding(path: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Where one param lives on `mesh`, by the table above; anything not in it is replicated."""
    axes = param_axes(path)
    if axes is None or len(axes) != len(shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_spec(axes, shape, mesh, strict=True, what=".".join(map(str, path))))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree of NamedShardings matching an nnx State, pure dict or ShapeDtypeStruct tree."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_sharding(_keys(path), np.shape(x), mesh), state)


def _keys(path: Sequence[Any]) -> tuple[Any, ...]:
    """A tree path as plain keys, without the `.value` of an nnx Variable."""
    out = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(getattr(entry, attr))
                break
    return tuple(out)


def batch_sharding(mesh: Mesh, ndim: int, *, axis: int = 0, size: int | None = None) -> NamedSharding:
    """Rows (dimension `axis`) over the batch axes; the rest replicated. With `size` given, a
    batch the axes do not divide is an error."""
    spec: list[Any] = [None] * ndim
    axes = tuple(a for a in RULES["batch"] or () if mesh.shape[a] > 1)
    if axes:
        ways = batch_ways(mesh)
        if size is not None and size % ways:
            raise ShardingError(
                f"a batch of {size} rows does not divide over the {'x'.join(axes)} mesh axes ({ways} ways); "
                f"use a batch size that is a multiple of {ways}"
            )
        spec[axis] = axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_ways(mesh: Mesh | None) -> int:
    """How many ways the mesh splits a batch (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in RULES["batch"] or ()]))


# ---- inside the model ---------------------------------------------------------------------
def constrain(x: jax.Array, kind: str) -> jax.Array:
    """Pins activation `x` to the sharding `ACTIVATION_AXES[kind]` prescribes, when a mesh
    with our axes is active (see `activate`); otherwise returns x unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    spec = logical_spec(ACTIVATION_AXES[kind], x.shape, mesh, strict=False)
    return jax.lax.with_sharding_constraint(x, spec)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a tree of arrays is placed on (its first NamedSharding leaf), or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and not isinstance(sharding.mesh, jax.sharding.AbstractMesh):
            return sharding.mesh
    return None


@contextlib.contextmanager
def activate(mesh: Mesh | None) -> Iterator[None]:
    """Traces under `mesh`, so `constrain` applies; no-op for None."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield


# ---- placing and fetching -----------------------------------------------------------------
def put(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds in full (numpy, a scalar,
    a jax array): each process fills only the shards of its own devices."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        return jax.random.wrap_key_data(put(jax.random.key_data(value), sharding), impl=impl)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_batch(batch: Mapping[str, Any], mesh: Mesh, *, axis: int = 0) -> dict[str, jax.Array]:
    """Host arrays whose dimension `axis` is the batch, split over the mesh's batch axes."""
    out = {}
    for name, value in batch.items():
        host = np.asarray(value)
        try:
            sharding = batch_sharding(mesh, host.ndim, axis=axis, size=host.shape[axis])
        except ShardingError as e:
            raise ShardingError(f"{name}: {e}") from None
        out[name] = put(host, sharding)
    return out


def check_config(config: Any, mesh: Mesh) -> None:
    """Heads and the MLP halves must split whole over `tensor`: a flat (D, N*H) kernel that
    divides could still cut a head in two."""
    tensor = mesh.shape["tensor"]
    for name, size in (
        ("num_attention_heads", config.num_attention_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if size % tensor:
            raise ShardingError(
                f"{name} {size} does not divide over mesh axis tensor of size {tensor}; "
                f"choose a tensor size that divides {size}"
            )


def shard_model(model: Any, mesh: Mesh) -> Any:
    """Places every param of an NNX model on `mesh` by `PARAM_AXES` (in place; returns it)."""
    check_config(model.config, mesh)
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.tree.map(put, state, shardings))
    return model


def to_host(x: Any) -> np.ndarray:
    """A global array as one numpy array on every process (gathered across hosts if needed)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def snapshot(x: jax.Array) -> jax.Array:
    """A copy of `x` in fresh buffers, made now through the host: safe to read in the
    background while the original is donated to the next step."""
    shards = [jax.device_put(np.array(s.data, copy=True), s.device) for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)
