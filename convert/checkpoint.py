"""Checkpoints in, checkpoints out.

Reading: a directory holds one of
- transformers safetensors: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- transformers PyTorch: `pytorch_model.bin` (or its sharded index), read only through
  `torch.load(..., weights_only=True)`;
- ettin-jax flax: `flax_params/`, an orbax checkpoint of the params in our own layout.
Each becomes a `Checkpoint`: param path -> `Tensor` (its name in the file, its shape in our
layout, and a way to read any part of it). The model is built abstractly (`nnx.eval_shape`)
and filled from it, so no random init is spent on weights the checkpoint provides, and with a
mesh each process reads only the parts its own devices hold.

Writing: `save_pretrained(model, dir, format="transformers" | "flax")`, through
`ettin_jax.files`, so that a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from ettin_jax import distributed, files, quantization, sharding
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.convert.keys import Path, to_key, to_path
from ettin_jax.errors import EttinError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
FLAX_PARAMS = "flax_params"
CONFIG = "config.json"
# Every transformers weight file: single, sharded, and their indexes.
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
DEFAULT_ARCHITECTURE = "ModernBertDecoderForCausalLM"

# Top-level modules of the task heads; what a checkpoint holds for another head is skipped.
HEADS = {"ModernBertDecoderForCausalLM": ("lm_head", "decoder"),
         "ModernBertDecoderForSequenceClassification": ("head", "classifier"),
         "ModernBertDecoderModel": ()}  # fmt: skip
ALL_HEAD_ROOTS = frozenset(root for roots in HEADS.values() for root in roots)
SCALE = "_scale"  # an int8 weight's scales sit beside it: `kernel_scale`, `embedding_scale`
_MAX_HEADER = 100_000_000  # bytes: the largest header the safetensors library accepts
# Bytes per element of the safetensors dtypes numpy can hold (the header's sizes are checked against them).
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


log = logging.getLogger("ettin_jax.convert")


class CheckpointError(EttinError, ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


class CheckpointFormatError(EttinError, ValueError):
    """A checkpoint file that is corrupt, truncated or not what it claims to be."""


Index = tuple[slice, ...]  # a part of an array, as `jax.make_array_from_callback` asks for it


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # as the file names it, for messages
    shape: tuple[int, ...]  # in our layout
    nbytes: int  # as stored
    reader: Callable[[Index], Any]  # index in our layout -> numpy or jax array
    file: str = ""  # the file (or directory) that holds it, for messages

    def read(self, index: Index = ()) -> Any:
        """The part `index` of the tensor in our layout (all of it by default). Every read of
        checkpoint data goes through here: from safetensors it reads that part's bytes only."""
        return self.reader(index)


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


def architecture(directory: str) -> str:
    """The model class that a directory's config.json names in `architectures`, one of the
    three ettin-jax has (the causal LM when it names none)."""
    file = os.path.join(directory, CONFIG)
    with open(file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{file} is not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise CheckpointFormatError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(data), "null")
        raise CheckpointFormatError(f"{file} holds a JSON {kind}, not an object of config fields")
    names = data.get("architectures") or [DEFAULT_ARCHITECTURE]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointFormatError(f"{file}: architectures must be a list of class names, got {names!r}")
    for name in names:
        if name in HEADS:
            return name
    raise CheckpointError(f"{file} names architectures {names}; ettin-jax knows {sorted(HEADS)}")


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
    names = sorted(set(weight_map.values()))
    absent = [name for name in names if not os.path.isfile(os.path.join(directory, name))]
    if absent:
        raise FileNotFoundError(f"{index_path} lists shard(s) that are not in {directory}: {', '.join(absent)}")
    return [os.path.join(directory, name) for name in names]


def _from_torch_layout(
    key: str, shape: tuple[int, ...], nbytes: int, read: Callable[[Index], Any], file: str
) -> tuple[Path, Tensor]:
    """`read` takes an index in the file's layout. A PyTorch (out, in) weight is our (in, out)
    kernel: its parts are read at the transposed index, then transposed."""
    path, transpose = to_path(key)
    if transpose and len(shape) == 2:
        return path, Tensor(key, shape[::-1], nbytes, lambda index: read(index[::-1]).T, file)
    return path, Tensor(key, shape, nbytes, read, file)


def read_transformers(directory: str) -> Checkpoint:
    """The tensors of a transformers checkpoint, keyed by our param paths, read lazily."""
    checkpoint: Checkpoint = {}
    if checkpoint_format(directory) == "safetensors":
        for file in _shard_files(directory, SAFETENSORS, SAFETENSORS_INDEX):
            checkpoint.update(_read_safetensors(file))
        return checkpoint
    for file in _shard_files(directory, PYTORCH, PYTORCH_INDEX):
        for key, array in _torch_load(file).items():
            path, tensor = _from_torch_layout(key, array.shape, array.nbytes, array.__getitem__, file)
            checkpoint[path] = tensor
    return checkpoint


def _safetensors_header(file: str) -> dict[str, dict[str, Any]]:
    """The header of a safetensors file, once it is known to be whole: the library reports a
    truncated or damaged file without naming the file or the tensor, this names both."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{file}: too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointFormatError(
                f"{file}: header length {length} does not fit in a file of {size} bytes "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{file}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{file}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{file}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if not 0 <= begin <= end or any(d < 0 for d in shape):
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} has an impossible header entry (data_offsets {[begin, end]}, shape {shape})"
            )
        if end > data_size:
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} ends at byte {8 + length + end} but the file has {size} bytes (truncated)"
            )
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if itemsize is None:
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} has dtype {dtype!r}, which ettin-jax cannot read "
                f"(expected one of {', '.join(_SAFETENSORS_ITEMSIZE)})"
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} has shape {tuple(shape)} of {dtype} ({int(np.prod(shape)) * itemsize} "
                f"bytes) but the header gives it {end - begin} bytes (data_offsets {[begin, end]})"
            )
        entry.update(shape=shape, nbytes=end - begin)
    return header


def _read_safetensors(file: str) -> Checkpoint:
    header = _safetensors_header(file)
    try:
        handle = safetensors.safe_open(file, framework="numpy")  # memory-mapped: reads nothing yet
    except safetensors.SafetensorError as e:
        raise CheckpointFormatError(f"{file}: {e}") from None

    def read(key: str, index: Index) -> np.ndarray:
        try:
            return handle.get_slice(key)[index]
        except safetensors.SafetensorError as e:
            raise CheckpointFormatError(f"{file}: tensor {key!r}: {e}") from None

    checkpoint: Checkpoint = {}
    for key, entry in header.items():
        path, tensor = _from_torch_layout(
            key, tuple(entry["shape"]), entry["nbytes"], functools.partial(read, key), file
        )
        checkpoint[path] = tensor
    return checkpoint


def _torch_load(file: str) -> dict[str, np.ndarray]:
    """A PyTorch checkpoint, read with weights_only=True: tensors only, never arbitrary pickles."""
    try:
        import torch  # optional: only .bin checkpoints need it
    except ImportError:
        raise ImportError(
            f"{file} is a PyTorch checkpoint; reading it needs torch (pip install torch), "
            "or convert it to safetensors first"
        ) from None
    try:
        # weights_only: the unpickler builds tensors and containers and refuses every other
        # object, so a pickle cannot run code here.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            f"{file}: cannot read the PyTorch checkpoint safely: it holds something other than tensors, or is "
            f"damaged ({_torch_reason(e)}); ettin-jax reads .bin files only with torch.load(weights_only=True)"
        ) from None
    except Exception as e:  # torch raises several types for corrupt or truncated files
        raise CheckpointFormatError(
            f"{file}: cannot read the PyTorch checkpoint: the file is damaged or truncated ({_torch_reason(e)})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointFormatError(f"{file}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        try:
            if tensor.dtype == torch.bfloat16:
                # numpy has no bfloat16 of its own: reinterpret the bits as ml_dtypes' bfloat16.
                out[key] = tensor.contiguous().view(torch.int16).numpy().view(jnp.bfloat16)
            else:
                out[key] = tensor.contiguous().numpy()
        except (TypeError, RuntimeError) as e:  # sparse, quantized or meta tensors have no numpy form
            raise CheckpointFormatError(
                f"{file}: tensor {key!r} ({tensor.dtype}, {tensor.layout}) cannot be read: {e}"
            ) from None
    return out


def _torch_reason(error: Exception) -> str:
    """The line of torch's (long, multi-line) load error that says what was wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load", "Unsupported")):  # what the weights-only unpickler refused
            return line
    return lines[0].split(". ")[0] if lines else type(error).__name__


def read_flax(directory: str, mesh: Any = None) -> Checkpoint:
    """The params of a checkpoint written by `save_pretrained(format="flax")`. Nothing is read
    until the first tensor is; then orbax restores the whole tree, with a `mesh` into the
    shardings `ettin_jax.sharding` gives (each process reading only its own devices' parts),
    without one onto this process's first device."""
    location = os.path.abspath(os.path.join(directory, FLAX_PARAMS))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = traverse_util.flatten_dict(checkpointer.metadata(location).item_metadata.tree)
    except Exception as e:  # orbax raises many types for unreadable directories
        raise CheckpointFormatError(f"{location}: cannot restore the orbax checkpoint ({e})") from None
    # orbax stores layer indices as strings; our param paths have ints.
    paths = {raw: tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in raw) for raw in stored}

    @functools.cache
    def restore() -> dict[Path, jax.Array]:
        target = {}
        for raw, meta in stored.items():
            if mesh is None:
                where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            else:
                where = sharding.param_sharding(paths[raw], meta.shape, mesh)
            target[raw] = jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=where)
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                tree = checkpointer.restore(location, traverse_util.unflatten_dict(target))
        except Exception as e:  # orbax raises many types for damaged checkpoints
            raise CheckpointFormatError(f"{location}: cannot restore the orbax checkpoint ({e})") from None
        return {paths[raw]: value for raw, value in traverse_util.flatten_dict(tree).items()}

    def read(path: Path, index: Index) -> jax.Array:
        array = restore()[path]
        # A part that a local device holds is taken from it: the other processes' parts are
        # neither here nor needed.
        for shard in array.addressable_shards:
            if shard.index == index:
                return shard.data
        return array[index]

    checkpoint: Checkpoint = {}
    for raw, path in paths.items():
        shape, dtype = tuple(stored[raw].shape), np.dtype(stored[raw].dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        checkpoint[path] = Tensor("/".join(map(str, path)), shape, nbytes, functools.partial(read, path), location)
    return checkpoint


def checkpoint_fingerprint(directory: str) -> str:
    """A digest of a checkpoint's weight files: names, sizes, and their first and last 64 KiB
    (the safetensors header, and tensor bytes from both ends). Cheap at any model size, and
    two different fine-tunes of one shape differ in it."""
    parts: list[Any] = []
    for root, _, names in sorted(os.walk(directory)):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if not (WEIGHT_FILE.fullmatch(rel) or rel.startswith(FLAX_PARAMS + os.sep)):
                continue
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(65536)
                f.seek(max(0, size - 65536))
                tail = f.read()
            parts += [rel, size, head, tail]
    return distributed.fingerprint(*parts)


def read_checkpoint(directory: str, mesh: Any = None) -> Checkpoint:
    """Every tensor of the checkpoint in `directory`, read lazily; `mesh`: the one the model
    will be built on, where a format needs it to read only this process's parts."""
    return read_flax(directory, mesh) if checkpoint_format(directory) == "flax" else read_transformers(directory)


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
    allow_nonfinite: bool = False,
) -> Any:
    """An instance of `cls` whose params come from `checkpoint`. With a `mesh`, every param is
    placed by `ettin_jax.sharding` and each process reads only the slices its devices hold.
    With `config.quantization` and a float checkpoint, each weight is quantized as it loads
    (read whole: a channel's scale needs all of it).

    Every float tensor is checked for NaN and inf as it is read (with a mesh, the parts this
    process reads): the first one that holds any is a `CheckpointError` naming its key, unless
    `allow_nonfinite`, which loads them with a warning."""

    def construct() -> Any:
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    model = nnx.eval_shape(construct)
    state = nnx.state(model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    # value path -> scale path, for the int8 weights this float checkpoint gives as floats
    quantize = {}
    if config.quantization is not None and not any(str(p[-1]).endswith(SCALE) for p in checkpoint):
        quantize = {(*p[:-1], p[-1].removesuffix(SCALE)): p for p in params if str(p[-1]).endswith(SCALE)}
    expected = {
        p: jax.ShapeDtypeStruct(v.shape, param_dtype) if p in quantize else v
        for p, v in params.items()
        if p not in quantize.values()
    }
    plan = plan_load(cls.__name__, expected, checkpoint, config.tie_word_embeddings)
    if plan.skipped and cls.__name__ != "ModernBertDecoderModel":  # the base model drops heads by design
        warnings.warn(
            f"{cls.__name__} does not use these checkpoint tensors: {', '.join(plan.skipped)}",
            stacklevel=4,
        )
    if plan.new and config.quantization is not None:
        raise quantization.QuantizationError(
            f"{cls.__name__} with {config.quantization} weights needs its head in the checkpoint, which lacks "
            f"{', '.join(_names(plan.new))}: a new head must be trained, and int8 models cannot be; fine-tune the "
            "float model, then quantize it"
        )
    if plan.new:
        warnings.warn(
            f"{cls.__name__}: these params are not in the checkpoint and were newly initialised; "
            f"train the model before using it: {', '.join(_names(plan.new))}",
            stacklevel=4,
        )
    # Values the checkpoint cannot give (RNG streams of dropout layers, a new head) come from
    # the constructor itself, jitted so that XLA drops the initialisers whose output is unused.
    fresh = [p for p in flat if p not in plan.source and p not in quantize.values()]
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
        from tqdm.auto import tqdm  # only when asked: it is slow to import

        items = tqdm(items, desc="loading", unit="tensor")
    if mesh is not None:
        sharding.check_config(config, mesh)
        values = {p: sharding.put(v, sharding.param_sharding(p, np.shape(v), mesh)) for p, v in values.items()}
    read = 0
    nonfinite: dict[str, str] = {}  # checkpoint key -> what was found, in the order read
    for path, tensor in items:
        if path in quantize:
            # The embedding table (V, D) has a scale per row; a kernel (D_in, D_out) per column.
            axis = 0 if path[-1] == "embedding" else -1
            q, scale = quantization.quantize(_checked(tensor, tensor.read(), param_dtype, nonfinite), axis)
            values[path], values[quantize[path]] = q, scale.astype(param_dtype)
            if mesh is not None:
                for p in (path, quantize[path]):
                    values[p] = sharding.put(values[p], sharding.param_sharding(p, values[p].shape, mesh))
            read += tensor.nbytes
        elif mesh is None:
            values[path] = jnp.asarray(_checked(tensor, tensor.read(), params[path].dtype, nonfinite))
        else:
            target = sharding.param_sharding(path, tensor.shape, mesh)
            values[path], nbytes = _read_sharded(tensor, params[path].dtype, target, nonfinite)
            read += nbytes
        if nonfinite and not allow_nonfinite and mesh is None:
            break  # one process reads everything: stop at the first, the error follows
    _report_nonfinite(nonfinite, allow_nonfinite, together=mesh is not None)
    if mesh is not None:
        total = sum(t.nbytes for t in plan.source.values())
        log.info(
            "process %d read %d of the checkpoint's %d bytes (%.0f%%) for its own devices",
            jax.process_index(), read, total, 100 * read / max(total, 1),
        )  # fmt: skip
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(model, state)
    return model


def _is_integer(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _checked(tensor: Tensor, array: Any, dtype: Any, nonfinite: dict[str, str]) -> Any:
    """`array`, a part of `tensor`, in `dtype`; integers where floats belong are an error (they
    would load as numbers: an int8 tensor read into a float model is off by its scales). A
    float part that holds NaN or inf is recorded in `nonfinite` (key -> what), checked in the
    dtype the model gets (a value too large for it is inf there)."""
    if _is_integer(array.dtype) != _is_integer(dtype):
        where = f" (in {tensor.file})" if tensor.file else ""
        raise CheckpointError(
            f"{tensor.name}{where} is stored as {array.dtype} but the model expects {jnp.dtype(dtype)}"
        )
    array = array.astype(dtype, copy=False)
    if not _is_integer(dtype) and tensor.name not in nonfinite:
        xp = jnp if isinstance(array, jax.Array) else np
        if not bool(xp.isfinite(array).all()):
            host = np.asarray(array)
            nan, inf = int(np.isnan(host).sum()), int(np.isinf(host).sum())
            where = f" in {tensor.file}" if tensor.file else ""
            part = "" if tuple(host.shape) == tuple(tensor.shape) else f" (in the part {tuple(host.shape)} read)"
            nonfinite[tensor.name] = f"{nan} NaN and {inf} inf of its {host.size} values{part}{where}"
    return array


def _report_nonfinite(nonfinite: dict[str, str], allowed: bool, together: bool) -> None:
    """A `CheckpointError` naming the first tensor that held NaN or inf, or with `allowed` a
    warning naming them all. `together` (a mesh): each process read only its own parts, so
    the processes first agree whether any of them found one (a collective)."""
    found = bool(nonfinite)
    if together and jax.process_count() > 1:
        every = np.asarray(multihost_utils.process_allgather(np.array([found], np.int32))).reshape(-1)
        others = [str(p) for p in np.flatnonzero(every) if p != jax.process_index()]
        if others and not found and not allowed:
            raise CheckpointError(
                f"process(es) {', '.join(others)} found NaN or inf in the checkpoint tensors they read (see their "
                "errors); pass allow_nonfinite=True (--allow-nonfinite) to load them anyway"
            )
    if not found:
        return
    if not allowed:
        name, what = next(iter(nonfinite.items()))
        raise CheckpointError(
            f"{name} holds non-finite values ({what}): the checkpoint is damaged or comes from a run that "
            "diverged; pass allow_nonfinite=True (--allow-nonfinite) to load it anyway"
        )
    warnings.warn(
        f"loaded {len(nonfinite)} checkpoint tensor(s) holding NaN or inf (allow_nonfinite=True): "
        + "; ".join(f"{name}: {what}" for name, what in nonfinite.items()),
        stacklevel=5,
    )


def _read_sharded(tensor: Tensor, dtype: Any, target: Any, nonfinite: dict[str, str]) -> tuple[jax.Array, int]:
    """A global array with `target` sharding, and the bytes read for it: each process reads only
    its devices' slices, and each distinct slice once (replicas on several local devices share
    one read)."""
    parts: dict[tuple, Any] = {}
    read = 0

    def fetch(index: Index) -> Any:
        nonlocal read
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in parts:
            part = tensor.read(index)
            read += part.nbytes
            parts[key] = _checked(tensor, part, dtype, nonfinite)
        return parts[key]

    return jax.make_array_from_callback(tuple(tensor.shape), target, fetch), read


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


def _remove_other_weights(directory: str, keep: str) -> None:
    """After a successful save, weights of another layout would shadow or contradict the new
    ones on the next load (e.g. old shards beside a new model.safetensors): remove them."""
    names = set(os.listdir(directory))
    stale = {n for n in names if WEIGHT_FILE.fullmatch(n)} | ({FLAX_PARAMS} & names)
    for name in stale - {keep}:
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _save_config(model: Any, directory: str) -> None:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    dtypes = {str(np.dtype(x.dtype)) for x in leaves if not jnp.issubdtype(x.dtype, jnp.integer)}  # not int8 weights
    model.config.save(directory, type(model).__name__, dtype=dtypes.pop() if len(dtypes) == 1 else "float32")


def save_transformers(model: Any, directory: str, tensors: dict[str, np.ndarray] | None = None) -> None:
    """config.json and model.safetensors. With several processes, all of them gather the params
    and process 0 writes (`tensors`: already gathered ones)."""
    if model.config.quantization is not None:
        raise quantization.QuantizationError(
            f"an {model.config.quantization} model saves only with format='flax' (transformers cannot read its "
            "weights); save the float model for transformers"
        )
    if tensors is None:
        tensors = transformers_state_dict(model)
    if distributed.is_primary():
        write_transformers(model, directory, tensors)


def write_transformers(model: Any, directory: str, tensors: dict[str, np.ndarray]) -> None:
    """config.json and model.safetensors of `tensors` (`transformers_state_dict`), written by this
    process whichever it is: for files each process keeps for itself."""
    os.makedirs(directory, exist_ok=True)
    _save_config(model, directory)
    files.write_atomically(
        os.path.join(directory, SAFETENSORS),
        lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    _remove_other_weights(directory, SAFETENSORS)


def save_flax(model: Any, directory: str) -> None:
    """config.json and an orbax checkpoint of the params in our layout, `flax_params/`."""
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, FLAX_PARAMS)
    staging = files.staging_dir_for(target)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(staging, FLAX_PARAMS), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            checkpointer.wait_until_finished()
        files.publish(os.path.join(staging, FLAX_PARAMS), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _save_config(model, directory)
    _remove_other_weights(directory, FLAX_PARAMS)


def save_pretrained(model: Any, directory: str | os.PathLike, format: str = "transformers") -> None:
    directory = os.fspath(directory)
    if format == "transformers":
        save_transformers(model, directory)
    elif format == "flax":
        save_flax(model, directory)
    else:
        raise ValueError(f"format must be 'transformers' or 'flax', got {format!r}")
