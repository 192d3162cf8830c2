"""Checkpoints in, checkpoints out.

Reading: a directory holds one of
- transformers safetensors: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- transformers PyTorch: `pytorch_model.bin` (or its sharded index), read only through
  `torch.load(..., weights_only=True)`;
- ettin-jax flax: `flax_params/`, an orbax checkpoint of the params in our own layout.
Each becomes a `Checkpoint`: param path -> `Tensor` (its name in the file, its shape in our
layout, and a function that reads it). The model is built abstractly (`nnx.eval_shape`) and
filled from it, so no random init is spent on weights the checkpoint provides.

Writing: `save_pretrained(model, dir, format="transformers" | "flax")`, every file written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from ettin_jax import sharding
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.convert.keys import Path, to_key, to_path
from ettin_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsFile, save_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
FLAX_PARAMS = "flax_params"
CONFIG = "config.json"

# Top-level modules of the task heads; what a checkpoint holds for another head is skipped.
HEADS = {"ModernBertDecoderForCausalLM": ("lm_head", "decoder"),
         "ModernBertDecoderForSequenceClassification": ("head", "classifier"),
         "ModernBertDecoderModel": ()}  # fmt: skip
ALL_HEAD_ROOTS = frozenset(root for roots in HEADS.values() for root in roots)


log = logging.getLogger("ettin_jax.convert")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # as the file names it, for messages
    shape: tuple[int, ...]  # in our layout
    # Returns the array in our layout. For safetensors it is a memory-mapped view: nothing is
    # read until it is copied, so a slice of it reads only that slice's bytes.
    read: Callable[[], np.ndarray]


# Bytes this process has read from checkpoint tensors through sharded loading (tests and the
# log report it; a host that reads only its own slices reads a fraction of the model).
LOAD_STATS = {"bytes_read": 0}


Checkpoint = dict[Path, Tensor]


# ---- reading ------------------------------------------------------------------------------
def checkpoint_format(directory: str) -> str:
    """ "safetensors", "pytorch" or "flax"; safetensors first when a directory has several."""
    if os.path.isfile(os.path.join(directory, SAFETENSORS)) or os.path.isfile(
        os.path.join(directory, SAFETENSORS_INDEX)
    ):
        return "safetensors"
    if os.path.isdir(os.path.join(directory, FLAX_PARAMS)):
        return "flax"
    if os.path.isfile(os.path.join(directory, PYTORCH)) or os.path.isfile(os.path.join(directory, PYTORCH_INDEX)):
        return "pytorch"
    raise FileNotFoundError(
        f"{directory} holds no checkpoint: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH}, "
        f"{PYTORCH_INDEX} or {FLAX_PARAMS}/"
    )


def _shard_files(directory: str, single: str, index: str) -> list[str]:
    """The single file when it exists (transformers' order), else the shards of the index."""
    index_path = os.path.join(directory, index)
    if os.path.isfile(os.path.join(directory, single)) or not os.path.isfile(index_path):
        return [os.path.join(directory, single)]
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{index_path} is not a valid shard index ({e!r})") from None
    files = sorted(set(weight_map.values()))
    absent = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if absent:
        raise FileNotFoundError(f"{index_path} lists shard(s) that are not in {directory}: {', '.join(absent)}")
    return [os.path.join(directory, name) for name in files]


def _from_torch_layout(key: str, shape: tuple[int, ...], read: Callable[[], np.ndarray]) -> tuple[Path, Tensor]:
    path, transpose = to_path(key)
    if transpose and len(shape) == 2:
        return path, Tensor(key, shape[::-1], lambda: read().T)
    return path, Tensor(key, shape, read)


def read_transformers(directory: str) -> Checkpoint:
    """The tensors of a transformers checkpoint, keyed by our param paths, read lazily."""
    checkpoint: Checkpoint = {}
    if checkpoint_format(directory) == "safetensors":
        for file in _shard_files(directory, SAFETENSORS, SAFETENSORS_INDEX):
            tensors = SafetensorsFile(file)
            for key in tensors:
                path, tensor = _from_torch_layout(key, tensors.shape(key), functools.partial(tensors.__getitem__, key))
                checkpoint[path] = tensor
        return checkpoint
    for file in _shard_files(directory, PYTORCH, PYTORCH_INDEX):
        for key, array in _torch_load(file).items():
            path, tensor = _from_torch_layout(key, array.shape, functools.partial(_identity, array))
            checkpoint[path] = tensor
    return checkpoint


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _torch_load(file: str) -> dict[str, np.ndarray]:
    """A PyTorch checkpoint, read with weights_only=True: tensors only, never arbitrary pickles."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{file} is a PyTorch checkpoint; reading it needs torch (pip install torch), "
            "or convert it to safetensors first"
        ) from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise CheckpointFormatError(f"{file}: cannot read the PyTorch checkpoint safely ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointFormatError(f"{file}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype == torch.bfloat16:
            # numpy has no bfloat16 of its own: reinterpret the bits as ml_dtypes' bfloat16.
            out[key] = tensor.contiguous().view(torch.int16).numpy().view(jnp.bfloat16)
        else:
            out[key] = tensor.contiguous().numpy()
    return out


def read_flax(directory: str) -> Checkpoint:
    """The params of a checkpoint written by `save_pretrained(format="flax")`."""
    import orbax.checkpoint as ocp

    location = os.path.abspath(os.path.join(directory, FLAX_PARAMS))
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(location).item_metadata
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
        tree = checkpointer.restore(location, restore_args=as_numpy)
    except Exception as e:  # orbax raises many types for unreadable directories
        raise CheckpointFormatError(f"{location}: cannot restore the orbax checkpoint ({e})") from None
    checkpoint: Checkpoint = {}
    for raw_path, value in traverse_util.flatten_dict(tree).items():
        path = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in raw_path)
        array = np.asarray(value)
        checkpoint[path] = Tensor("/".join(map(str, path)), array.shape, functools.partial(_identity, array))
    return checkpoint


def checkpoint_fingerprint(directory: str) -> str:
    """A digest of a checkpoint's weight files: names, sizes, and their first and last 64 KiB
    (the safetensors header, and tensor bytes from both ends). Cheap at any model size, and
    two different fine-tunes of one shape differ in it."""
    from ettin_jax.distributed import fingerprint

    parts: list[Any] = []
    weights = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if not (weights.match(rel) or rel.startswith(FLAX_PARAMS + os.sep)):
                continue
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(65536)
                f.seek(max(0, size - 65536))
                tail = f.read()
            parts += [rel, size, head, tail]
    return fingerprint(*parts)


def read_checkpoint(directory: str) -> Checkpoint:
    return read_flax(directory) if checkpoint_format(directory) == "flax" else read_transformers(directory)


# ---- matching a checkpoint to a model -----------------------------------------------------
@dataclasses.dataclass
class LoadPlan:
    source: dict[Path, Tensor]  # our param path -> tensor
    new: list[Path]  # params the checkpoint lacks: a new head, initialised as transformers does
    skipped: list[str]  # checkpoint tensors that this class does not use (another head)


def _names(paths: Iterator[Path] | list[Path]) -> list[str]:
    return sorted(to_key(p)[0] for p in paths)


def plan_load(
    cls_name: str, expected: dict[Path, jax.ShapeDtypeStruct], checkpoint: Checkpoint, tied: bool
) -> LoadPlan:
    """Decides where every tensor goes, or raises a `CheckpointError` that names the keys."""
    if cls_name == "ModernBertDecoderModel":
        # The base model's params have no "model." prefix; head checkpoints do.
        if any(p[0] == "model" for p in checkpoint):
            checkpoint = {p[1:]: t for p, t in checkpoint.items() if p[0] == "model"} | {
                p: t for p, t in checkpoint.items() if p[0] in ALL_HEAD_ROOTS
            }
    elif not any(p[0] == "model" for p in checkpoint):
        # A checkpoint of the base model: everything belongs under "model.".
        checkpoint = {("model", *p): t for p, t in checkpoint.items()}
    if tied:
        checkpoint.pop(("decoder", "kernel"), None)  # the tied copy of the embeddings
    missing = [p for p in expected if p not in checkpoint]
    unexpected = [p for p in checkpoint if p not in expected]
    heads = HEADS[cls_name]
    skipped = [p for p in unexpected if p[0] in ALL_HEAD_ROOTS and p[0] not in heads]
    unexpected = [p for p in unexpected if p not in skipped]
    head_params = [p for p in expected if p[0] in heads]
    new: list[Path] = []
    if missing and sorted(missing) == sorted(head_params):
        new, missing = missing, []  # the whole head is new: start fine-tuning from the body
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(_names(missing))}")
    if unexpected:
        problems.append(
            f"in the checkpoint but not in {cls_name} with this config: "
            f"{', '.join(sorted(checkpoint[p].name for p in unexpected))}"
        )
    for path, spec in expected.items():
        if path in checkpoint and tuple(checkpoint[path].shape) != tuple(spec.shape):
            tensor = checkpoint[path]
            key, transpose = to_key(path)
            want = spec.shape[::-1] if transpose and tensor.name == key else spec.shape
            got = tensor.shape[::-1] if transpose and tensor.name == key else tensor.shape
            problems.append(f"{tensor.name} has shape {tuple(got)} but the config expects {tuple(want)}")
    if problems:
        raise CheckpointError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return LoadPlan(
        source={p: checkpoint[p] for p in expected if p in checkpoint},
        new=new,
        skipped=sorted(checkpoint[p].name for p in skipped),
    )


def build_model(
    cls: type,
    config: ModernBertDecoderConfig,
    checkpoint: Checkpoint,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    progress: bool = False,
    mesh: Any = None,
) -> Any:
    """An instance of `cls` whose params come from `checkpoint`. With a `mesh`, every param is
    placed by `ettin_jax.sharding` and each process reads only the slices its devices hold."""

    def construct() -> Any:
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    model = nnx.eval_shape(construct)
    state = nnx.state(model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    params = {p: s for p, s in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    plan = plan_load(cls.__name__, params, checkpoint, config.tie_word_embeddings)
    if plan.skipped and cls.__name__ != "ModernBertDecoderModel":  # the base model drops heads by design
        warnings.warn(
            f"{cls.__name__} does not use these checkpoint tensors: {', '.join(plan.skipped)}",
            stacklevel=4,
        )
    if plan.new:
        warnings.warn(
            f"{cls.__name__}: these params are not in the checkpoint and were newly initialised; "
            f"train the model before using it: {', '.join(_names(plan.new))}",
            stacklevel=4,
        )
    # Values the checkpoint cannot give (RNG streams of dropout layers, a new head) come from
    # the constructor itself, jitted so that XLA drops the initialisers whose output is unused.
    fresh = [p for p in flat if p not in plan.source]
    values: dict[Path, Any] = {}
    if fresh:
        wanted = set(fresh)
        values.update(
            jax.jit(
                lambda: {
                    p: v
                    for p, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(construct()))).items()
                    if p in wanted
                }
            )()
        )
    items = plan.source.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="loading", unit="tensor")
    if mesh is not None:
        sharding.check_config(config, mesh)
        values = {p: sharding.put(v, sharding.param_sharding(p, np.shape(v), mesh)) for p, v in values.items()}
        read_before = LOAD_STATS["bytes_read"]
    for path, tensor in items:
        if mesh is None:
            array = np.asarray(tensor.read())
            values[path] = jnp.asarray(array.astype(params[path].dtype, copy=False))
        else:
            target = sharding.param_sharding(path, tensor.shape, mesh)
            values[path] = _read_sharded(tensor, params[path].dtype, target)
    if mesh is not None:
        total = sum(int(np.prod(t.shape)) * t.read().dtype.itemsize for t in plan.source.values())
        read = LOAD_STATS["bytes_read"] - read_before
        log.info(
            "process %d read %d of the checkpoint's %d bytes (%.0f%%) for its own devices",
            jax.process_index(), read, total, 100 * read / max(total, 1),
        )  # fmt: skip
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(model, state)
    return model


def _read_sharded(tensor: Tensor, dtype: Any, target: Any) -> jax.Array:
    """A global array with `target` sharding, each process reading only its devices' slices,
    and each distinct slice once (replicas on several local devices share one read)."""
    parts: dict[tuple, np.ndarray] = {}

    def fetch(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in parts:
            source = np.asarray(tensor.read()[index])  # a memory-mapped file reads these bytes only
            LOAD_STATS["bytes_read"] += source.nbytes
            parts[key] = source.astype(dtype, copy=False)
        return parts[key]

    return jax.make_array_from_callback(tuple(tensor.shape), target, fetch)


# ---- writing ------------------------------------------------------------------------------
def transformers_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The model's params as transformers names and lays them out."""
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = {}
    for path, value in params.items():
        key, transpose = to_key(path)
        array = sharding.to_host(value)  # gathered from every process when the params span several
        out[key] = np.ascontiguousarray(array.T) if transpose else array
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(parent: str, prefix: str) -> str:
    """A temporary directory beside its destination (so a rename publishes it), with the
    permissions a plain mkdir would give rather than mkdtemp's 0700."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o777 & ~_umask())
    return path


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename tmp to path, so a crash never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _remove_other_weights(directory: str, keep: str) -> None:
    """After a successful save, weights of another layout would shadow or contradict the new
    ones on the next load (e.g. old shards beside a new model.safetensors): remove them."""
    names = set(os.listdir(directory))
    stale = {
        n for n in names if re.fullmatch(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?", n)
    }
    stale |= {FLAX_PARAMS} & names
    for name in stale - {keep}:
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save_transformers(model: Any, directory: str, tensors: dict[str, np.ndarray] | None = None) -> None:
    """config.json and model.safetensors. With several processes, all of them gather the params
    and process 0 writes (`tensors`: already gathered ones)."""
    from ettin_jax import distributed

    if tensors is None:
        tensors = transformers_state_dict(model)
    if not distributed.is_primary():
        return
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, CONFIG), lambda tmp: _save_config(model, tmp))
    write_atomically(os.path.join(directory, SAFETENSORS), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    _remove_other_weights(directory, SAFETENSORS)


def _save_config(model: Any, file: str) -> None:
    data = model.config.to_dict()
    data["architectures"] = [type(model).__name__]
    dtypes = {str(np.dtype(x.dtype)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    data["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def save_flax(model: Any, directory: str) -> None:
    import orbax.checkpoint as ocp

    os.makedirs(directory, exist_ok=True)
    target = os.path.abspath(os.path.join(directory, FLAX_PARAMS))
    staging = make_staging_dir(directory, ".tmp-")
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, FLAX_PARAMS), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()
        if os.path.exists(target):
            old = make_staging_dir(directory, ".old-")
            os.replace(target, os.path.join(old, FLAX_PARAMS))
            os.replace(os.path.join(staging, FLAX_PARAMS), target)
            shutil.rmtree(old)
        else:
            os.replace(os.path.join(staging, FLAX_PARAMS), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomically(os.path.join(directory, CONFIG), lambda tmp: _save_config(model, tmp))
    _remove_other_weights(directory, FLAX_PARAMS)


def save_pretrained(model: Any, directory: str | os.PathLike, format: str = "transformers") -> None:
    directory = os.fspath(directory)
    if format == "transformers":
        save_transformers(model, directory)
    elif format == "flax":
        save_flax(model, directory)
    else:
        raise ValueError(f"format must be 'transformers' or 'flax', got {format!r}")
