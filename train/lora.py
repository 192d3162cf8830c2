"""LoRA fine-tuning, in PEFT's definitions, so that what trains here loads in PEFT and back.

`apply_lora(model, LoraConfig(rank=8))` replaces every `nnx.Linear` whose transformers module
name (`model.layers.3.attn.q_proj`) fully matches `LoraConfig.targets` (`re.fullmatch`, as PEFT
matches a string `target_modules`) with a `LoraLinear`:

    y = x W + b + (alpha / rank) * dropout(x) A B        A (D_in, r), B (r, D_out)

A starts as PEFT's kaiming-uniform, U(+-1/sqrt(D_in)), and B at zero, so the adapted model
starts as the base model. `TRAINABLE` selects what trains: every A and B, and a classifier's
`head` and `classifier` in full (PEFT's `modules_to_save` for SEQ_CLS). `merged(model)` folds
each update into its kernel (a plain model for `save_pretrained`); `save_adapter` writes a PEFT
adapter directory and `load_adapter` reads one.

`LoraLinear` is flax's `nnx.LoRALinear` plus the alpha/rank scale and the input dropout that
LoRALinear lacks; not qwix's LoRA, which adds its weights while it intercepts one model method
(generation calls the body and the heads separately; see `ettin_jax.quantization`), swaps the
model's class, and drops out whether or not the model runs deterministically. Being an
`nnx.Linear`, a `LoraLinear` keeps its kernel and bias at the Linear's own paths: the frozen
state is the plain model's, so the sharding table and the checkpoint key map apply unchanged.

Dropout: the model's Linear calls carry no `deterministic` flag, so the LoRA dropout follows
flax's own switch, the `deterministic` attribute of its `nnx.Dropout`: True (off) after
`apply_lora`; a training step runs `nnx.view(model, deterministic=False,
raise_if_not_found=False)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx, traverse_util

from ettin_jax import distributed, files, sharding
from ettin_jax.convert.keys import Path, to_key
from ettin_jax.errors import EttinError
from ettin_jax.modeling import ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification

Array = jax.Array
Model = TypeVar("Model", bound=nnx.Module)

# Every Linear inside the decoder layers: the attention projections and the MLP.
DEFAULT_TARGETS = r"model\.layers\.\d+\.(attn\.(q_proj|k_proj|v_proj|Wo)|mlp\.(Wi|Wo))"
# A classifier's head, new for the task, trains in full: PEFT's modules_to_save for SEQ_CLS.
HEADS = ("head", "classifier")
TASK_TYPES = {ModernBertDecoderForCausalLM: "CAUSAL_LM", ModernBertDecoderForSequenceClassification: "SEQ_CLS"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every key in an adapter file
_PEFT_LORA = {"lora_a": "lora_A", "lora_b": "lora_B"}
# PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A: U(+-1/sqrt(fan_in)), fan_in = D_in.
A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# adapter_config.json fields that would change the computation, with the only value this port
# implements; a missing field has that value. Then the fields that must be absent or empty.
_PEFT_FIXED = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False,
               "lora_bias": False}  # fmt: skip
_PEFT_EMPTY = ("rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules", "target_parameters",
               "trainable_token_indices", "layer_replication")  # fmt: skip


class LoraError(EttinError, ValueError):
    """A LoRA setting or adapter this model cannot use; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r; alpha, whose ratio alpha / r scales the update (default r: scale 1, which PEFT's
    defaults r=8, lora_alpha=8 also give); targets, a regex fully matched against transformers
    module names; dropout on each adapted layer's input, in training only."""

    rank: int
    alpha: float | None = None
    targets: str = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise LoraError(f"LoRA targets {self.targets!r} is not a regular expression: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _rebuild(linear: nnx.Linear, kernel: Array) -> dict[str, Any]:
    """nnx.Linear's arguments for a layer like `linear` with `kernel` and `linear`'s own bias;
    the initialisers return those arrays, so no weight is drawn or copied."""
    return dict(
        in_features=linear.in_features, out_features=linear.out_features, use_bias=linear.use_bias,
        dtype=linear.dtype, param_dtype=linear.param_dtype, precision=linear.precision,
        dot_general=linear.dot_general, promote_dtype=linear.promote_dtype,
        preferred_element_type=linear.preferred_element_type,
        kernel_init=lambda *_: kernel, bias_init=lambda *_: linear.bias[...],
    )  # fmt: skip


class LoraLinear(nnx.LoRALinear):
    """`linear` plus PEFT's LoRA: its kernel and bias where they were, A at `lora.lora_a`
    (D_in, r) and B at `lora.lora_b` (r, D_out), both `nnx.LoRAParam`."""

    def __init__(self, linear: nnx.Linear, config: LoraConfig, rngs: nnx.Rngs):
        super().__init__(
            **_rebuild(linear, linear.kernel[...]), lora_rank=config.rank, lora_dtype=linear.dtype,
            lora_param_dtype=linear.param_dtype, a_initializer=A_INIT, rngs=rngs,
        )  # fmt: skip
        self.config = config
        self.drop = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs) if config.dropout > 0 else None

    def __call__(self, x: Array, out_sharding: Any = None) -> Array:  # (..., D_in) -> (..., D_out)
        h = x if self.drop is None else self.drop(x)
        return nnx.Linear.__call__(self, x, out_sharding) + self.config.scale * self.lora(h)

    def merged_kernel(self) -> Array:
        """W + (alpha / r) A B, (D_in, D_out), computed in float32 at full precision."""
        a, b = (p[...].astype(jnp.float32) for p in (self.lora.lora_a, self.lora.lora_b))
        update = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        return (self.kernel[...].astype(jnp.float32) + self.config.scale * update).astype(self.kernel.dtype)


def _is_head(path: tuple, _: Any) -> bool:
    return path[0] in HEADS


# What LoRA trains: every A and B, and a classifier's head. With the rest frozen:
#     graphdef, trainable, frozen, rest = nnx.split(model, TRAINABLE, nnx.Param, ...)
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, _is_head))


def _name(path: tuple) -> str:
    """A module path as transformers names the module: ("model", "layers", 3) -> model.layers.3."""
    return ".".join(str(p) for p in path)


def _module(root: nnx.Module, path: tuple) -> Any:
    for part in path:
        root = root[part] if isinstance(part, int) else getattr(root, part)
    return root


def _set_module(root: nnx.Module, path: tuple, module: nnx.Module) -> None:
    setattr(_module(root, path[:-1]), path[-1], module)


def _lora_layers(model: nnx.Module) -> dict[tuple, LoraLinear]:
    return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)}


def has_lora(model: nnx.Module) -> bool:
    """Whether `apply_lora` has given `model` LoRA layers."""
    return bool(_lora_layers(model))


def apply_lora(model: Model, config: LoraConfig, seed: int = 0) -> Model:
    """Adds LoRA to every Linear that `config.targets` matches, in place; returns `model`.
    A classifier's `head` and `classifier` are never targets (they train in full, as PEFT
    excludes its modules_to_save). On a sharded model the new params are replicated."""
    if model.config.quantization is not None:
        raise LoraError(
            f"LoRA needs float weights; this model has {model.config.quantization} weights: load it without quantization"
        )
    if _lora_layers(model):
        raise LoraError("the model already has LoRA layers; apply LoRA to the base model once")
    linears = {
        _name(path): path
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.Linear) and path and path[0] not in HEADS
    }
    targets = [path for name, path in linears.items() if re.fullmatch(config.targets, name)]
    if not targets:
        examples = [name for name in linears if not re.search(r"\.[1-9]\d*\.", name)]  # layer 0's and the heads'
        raise LoraError(
            f'the LoRA targets regex "{config.targets}" matches no Linear layer of {type(model).__name__}; it is '
            f"matched in full (re.fullmatch) against names such as {', '.join(examples)} (and the same in every layer)"
        )
    mesh = sharding.mesh_of(nnx.state(model))
    rngs = nnx.Rngs(seed)
    for path in targets:
        _set_module(model, path, LoraLinear(_module(model, path), config, rngs))
    if mesh is not None:  # placed by the sharding table, which replicates them
        lora = nnx.state(model, nnx.LoRAParam)
        nnx.update(model, jax.tree.map(sharding.put, lora, sharding.state_shardings(lora, mesh)))
    return model


def merged(model: Model) -> Model:
    """A copy of `model` without LoRA: each LoRA layer becomes a plain `nnx.Linear` whose kernel
    is W + (alpha / r) A B. `model` itself is unchanged; the copy shares every other array."""
    out = nnx.clone(model)
    for path, layer in _lora_layers(out).items():
        _set_module(out, path, nnx.Linear(**_rebuild(layer, layer.merged_kernel()), rngs=nnx.Rngs(0)))
    return out


# ---- PEFT adapter directories ---------------------------------------------------------------
def _peft_keys(paths: list[Path]) -> dict[Path, tuple[str, bool]]:
    """Trainable param path -> (its key in a PEFT adapter file, transpose?). A (D_in, r) is
    lora_A.weight (r, D_in), B (r, D_out) lora_B.weight (D_out, r); head params as in a
    transformers checkpoint."""
    keys = {}
    for path in paths:
        if path[-2] == "lora":
            keys[path] = (f"{PREFIX}{_name(path[:-2])}.{_PEFT_LORA[path[-1]]}.weight", True)
        else:
            key, transpose = to_key(path)
            keys[path] = (PREFIX + key, transpose)
    return keys


def _task_type(model: nnx.Module) -> str:
    for cls, task in TASK_TYPES.items():
        if isinstance(model, cls):
            return task
    raise LoraError(
        f"PEFT adapters are written for {' and '.join(c.__name__ for c in TASK_TYPES)}, not {type(model).__name__}"
    )


def _config_of(model: nnx.Module) -> LoraConfig:
    configs = {layer.config for layer in _lora_layers(model).values()}
    if not configs:
        raise LoraError(f"{type(model).__name__} has no LoRA layers; call apply_lora first")
    return configs.pop()  # apply_lora runs once per model: one config


def save_adapter(model: nnx.Module, directory: str | os.PathLike, base_model: str, *, overwrite: bool = False) -> None:
    """A PEFT adapter directory: adapter_config.json and adapter_model.safetensors (the LoRA
    weights, and a classifier's head as modules_to_save), which
    `peft.PeftModel.from_pretrained(transformers_model, directory)` loads. `base_model` is the
    base checkpoint's Hub id or path. Built in a staging directory and published by one rename;
    an existing non-empty `directory` is replaced only with `overwrite`. Every process calls
    this (the params are gathered from all of them); process 0 writes."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)) and not overwrite:
        raise LoraError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
    config, task = _config_of(model), _task_type(model)
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, TRAINABLE)))
    tensors = {}
    for path, (key, transpose) in _peft_keys(list(params)).items():
        array = sharding.to_host(params[path])
        tensors[key] = np.ascontiguousarray(array.T) if transpose else array
    heads = [h for h in HEADS if hasattr(model, h)]
    adapter_config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": config.targets, "modules_to_save": heads or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
    if not distributed.is_primary():
        return
    staging = files.staging_dir_for(directory)
    try:
        files.write_json(os.path.join(staging, ADAPTER_CONFIG), adapter_config)
        safetensors.numpy.save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        files.publish(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _config_from_peft(peft: dict[str, Any], where: str) -> LoraConfig:
    for field, value in _PEFT_FIXED.items():
        if peft.get(field, value) != value:
            raise LoraError(f"{where}: {field} = {peft[field]!r} is not supported (only {value!r})")
    for field in _PEFT_EMPTY:
        if peft.get(field):
            raise LoraError(f"{where}: {field} is not supported (got {peft[field]!r})")
    targets = peft.get("target_modules")
    if isinstance(targets, list):  # PEFT: a name matches itself or any name ending in "." + it
        targets = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
    if not isinstance(targets, str):
        raise LoraError(f"{where}: target_modules must be a regex or a list of names, got {targets!r}")
    # PEFT's defaults where a field is missing: r 8, lora_alpha 8, lora_dropout 0.
    return LoraConfig(peft.get("r", 8), float(peft.get("lora_alpha", 8)), targets, float(peft.get("lora_dropout", 0)))


def load_adapter(model: Model, directory: str | os.PathLike, seed: int = 0) -> Model:
    """Applies the PEFT LoRA adapter in `directory` (ours or PEFT's) to the base `model`, in
    place; returns it. A classifier head listed in its modules_to_save is loaded too; one not
    listed keeps the base model's values, as in PEFT."""
    directory = os.fspath(directory)
    where = os.path.join(directory, ADAPTER_CONFIG)
    peft = json.loads(files.read_text(where))
    if peft.get("task_type") != _task_type(model):
        raise LoraError(f"{where}: task_type {peft.get('task_type')!r} does not fit {type(model).__name__}")
    apply_lora(model, _config_from_peft(peft, where), seed)
    saved = set(peft.get("modules_to_save") or ())
    state = nnx.state(model, TRAINABLE)
    params = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    keys = _peft_keys([p for p in params if p[0] not in HEADS or p[0] in saved])
    mesh = sharding.mesh_of(params)
    tensors = safetensors.numpy.load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    missing = sorted(key for key, _ in keys.values() if key not in tensors)
    unexpected = sorted(set(tensors) - {key for key, _ in keys.values()})
    if missing or unexpected:
        raise LoraError(
            f"{directory}: the adapter does not fit the model; missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(unexpected) or 'none'}"
        )
    for path, (key, transpose) in keys.items():
        array = tensors[key].T if transpose else tensors[key]
        if array.shape != params[path].shape:
            raise LoraError(f"{directory}: {key} has shape {tensors[key].shape}, which does not fit the model")
        array = np.asarray(array, params[path].dtype)
        if mesh is None:
            params[path] = jnp.asarray(array)
        else:  # where the sharding table puts it: LoRA's A and B replicated, a head like the base model's
            params[path] = sharding.put(array, sharding.param_sharding(path, array.shape, mesh))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params))
    nnx.update(model, state)
    return model
