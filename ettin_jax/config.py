"""`ModernBertDecoderConfig`: every field of the transformers config, frozen and hashable.

The config is hashable so that it can be a static argument of jitted functions. Fields that
transformers stores as dicts are kept here as tuples (`label_names` for `id2label`, two floats for
`rope_parameters`) and shown as dicts through properties and `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from ettin_jax import files
from ettin_jax.errors import EttinError
from ettin_jax.quantization import QuantizationError, check_kv_cache_dtype, check_quantization

MODEL_TYPE = "modernbert-decoder"
LAYER_TYPES = ("full_attention", "sliding_attention")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
ATTENTION_IMPLS = ("auto", "xla", "xla_blocked", "cudnn", "splash")  # see ettin_jax/attention.py
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
DEFAULT_GLOBAL_ROPE_THETA = 160_000.0
DEFAULT_LOCAL_ROPE_THETA = 10_000.0
QUANT_METHOD = "ettin-jax"  # quantization_config.quant_method of our int8 checkpoints


class ConfigError(EttinError, ValueError):
    """A config that this port cannot run, with the field that is wrong in the message."""


def check_attention_impl(impl: str) -> None:
    """The one check of an attention backend's name (see ettin_jax/attention.py)."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")


@dataclasses.dataclass(frozen=True)
class ModernBertDecoderConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int | None = 50283
    eos_token_id: int | tuple[int, ...] | None = 50282
    bos_token_id: int | None = 50281
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    use_cache: bool = True
    local_attention: int = 128
    # None means the default pattern: full attention on every third layer, starting at 0.
    layer_types: tuple[str, ...] | None = None
    tie_word_embeddings: bool = True
    global_rope_theta: float = DEFAULT_GLOBAL_ROPE_THETA
    local_rope_theta: float = DEFAULT_LOCAL_ROPE_THETA
    # Sequence classification: the label names by id (transformers' id2label), and the loss.
    label_names: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None
    # Transformers lets a query see itself and the `sliding_window - 1` keys before it (64 for
    # Ettin). The flash-attn training code saw one more; True reproduces training instead.
    training_window: bool = False
    # The attention backend (ettin_jax.attention): a runtime choice, not written to config.json.
    attention_impl: str = "auto"
    # Weight quantization (ettin_jax.quantization): None (float) or "int8". Written to config.json
    # as `quantization_config`, so that an int8 checkpoint is never read as a float one.
    quantization: str | None = None
    # The global layers' KV cache in generation: "auto" (the compute dtype) or "int8". A runtime
    # choice, not written to config.json.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.layer_types is None:
            pattern = tuple(
                "full_attention" if i % 3 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", pattern)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "local_attention",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.local_attention < 2:
            raise ConfigError(
                f"local_attention must be at least 2 (the window is local_attention // 2), got {self.local_attention}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(f"head_dim ({self.hidden_size // self.num_attention_heads}) must be even for RoPE")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] is {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not supported; expected one of {', '.join(ACTIVATIONS)}"
                )
        for name in ("attention_dropout", "embedding_dropout", "mlp_dropout", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("global_rope_theta", "local_rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        if not self.label_names:
            raise ConfigError("num_labels must be at least 1")
        check_attention_impl(self.attention_impl)
        check_quantization(self.quantization)
        check_kv_cache_dtype(self.kv_cache_dtype)

    # ---- derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sliding_window(self) -> int:
        """How many keys a sliding-layer query sees, itself included."""
        return self.local_attention // 2 + (1 if self.training_window else 0)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.label_names)}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def rope_parameters(self) -> dict[str, dict[str, Any]]:
        return {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def rope_theta(self, layer: int) -> float:
        return self.local_rope_theta if self.is_sliding(layer) else self.global_rope_theta

    def replace(self, **changes: Any) -> ModernBertDecoderConfig:
        """A copy with `changes`; also takes transformers' `num_labels`, `id2label`, `label2id`."""
        label_keys = {"num_labels", "id2label", "label2id"} & set(changes)
        if label_keys:
            label_changes = {k: changes.pop(k) for k in label_keys}
            changes["label_names"] = _read_labels(label_changes)
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - fields
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    # ---- serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, legacy_rope: bool = False) -> ModernBertDecoderConfig:
        """Reads every config.json spelling found on the Hub.

        `legacy_rope=True` uses the global theta on every layer, as transformers 4.54 to 4.57 did.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config is a JSON object of fields, got a JSON {_json_type(data)}")
        data = dict(data)
        _check_types(cls, data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type is {model_type!r}; ettin-jax runs {MODEL_TYPE!r} checkpoints "
                "(ModernBertDecoderForCausalLM and its classifier)"
            )
        kwargs: dict[str, Any] = {}
        every_n = data.pop("global_attn_every_n_layers", 3)
        if data.get("layer_types") is None:
            data.pop("layer_types", None)
            n = data.get("num_hidden_layers", cls.num_hidden_layers)
            if not isinstance(every_n, int) or every_n <= 0:
                raise ConfigError(f"global_attn_every_n_layers must be a positive integer, got {every_n!r}")
            kwargs["layer_types"] = tuple(
                "full_attention" if i % every_n == 0 else "sliding_attention" for i in range(n)
            )
        kwargs["global_rope_theta"], kwargs["local_rope_theta"] = _read_rope(data)
        if legacy_rope:
            kwargs["local_rope_theta"] = kwargs["global_rope_theta"]
        kwargs["label_names"] = _read_labels(data)
        kwargs["quantization"] = _read_quantization(data)
        if data.get("local_attention") is None and "local_attention" in data:
            raise ConfigError("local_attention is null; ettin-jax needs a sliding window size")
        # Keys the dataclass does not know (transformers bookkeeping, generation settings) change
        # nothing this port computes, so they are dropped.
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs.update({k: v for k, v in data.items() if k in fields and k not in kwargs})
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ModernBertDecoderConfig:
        """Reads `config.json` from a local directory or file."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {file}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file} holds a JSON {_json_type(data)}, not an object of config fields")
        legacy_rope = overrides.pop("legacy_rope", False)
        try:
            return cls.from_dict({**data, **overrides}, legacy_rope=legacy_rope)
        except (ConfigError, QuantizationError) as e:  # named with the file it came from
            raise type(e)(f"{file}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json that transformers' ModernBertDecoderConfig reads back unchanged."""
        out: dict[str, Any] = {"model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name in (
                "global_rope_theta", "local_rope_theta", "label_names", "training_window", "attention_impl",
                "quantization", "kv_cache_dtype",
            ):  # fmt: skip
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["rope_parameters"] = self.rope_parameters
        out["sliding_window"] = self.local_attention // 2
        out["id2label"] = {str(i): label for i, label in enumerate(self.label_names)}
        out["label2id"] = self.label2id
        if self.training_window:
            out["training_window"] = True
        if self.quantization is not None:
            out["quantization_config"] = {"quant_method": QUANT_METHOD, "weights": self.quantization}
        return out

    def save(self, directory: str | os.PathLike, architecture: str | None = None, dtype: str | None = None) -> None:
        """`directory/config.json`, written atomically; `architecture` names the model class and
        `dtype` the params' dtype, as transformers records them."""
        data = self.to_dict()
        if architecture:
            data["architectures"] = [architecture]
        if dtype:
            data["dtype"] = dtype
        files.write_json(os.path.join(directory, "config.json"), data)

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def ettin(cls, size: str, **overrides: Any) -> ModernBertDecoderConfig:
        """The shape of an Ettin decoder: "17m", "32m", "68m", "150m", "400m" or "1b"."""
        if size not in ETTIN_SIZES:
            raise ConfigError(f"unknown Ettin size {size!r}; expected one of {', '.join(ETTIN_SIZES)}")
        layers, hidden, intermediate, heads = ETTIN_SIZES[size]
        shape = cls(
            num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads
        )
        return shape.replace(**overrides)


# size: (layers, hidden, intermediate, heads); the paper's table, arXiv 2507.11412, whose
# parameter counts are those of the base model (embeddings and layers).
ETTIN_SIZES: dict[str, tuple[int, int, int, int]] = {
    "17m": (7, 256, 384, 4),
    "32m": (10, 384, 576, 6),
    "68m": (19, 512, 768, 8),
    "150m": (22, 768, 1152, 12),
    "400m": (28, 1024, 2624, 16),
    "1b": (28, 1792, 3840, 28),
}


# ---- from_dict's type checks ------------------------------------------------------------------
def _json_type(value: Any) -> str:
    """A value's type as JSON names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    return "object" if isinstance(value, Mapping) else type(value).__name__


def _accepts(kind: Any, value: Any) -> bool:
    """Whether a JSON value fits the annotation `kind` of a config field."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(k, value) for k in typing.get_args(kind))
    if origin is tuple:  # tuple[X, ...]: a list of X
        item = typing.get_args(kind)[0]
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True


def _describe(kind: Any) -> str:
    """What `_accepts(kind, ...)` takes, in words."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(kind)[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(kind, str(kind))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_types(cls: type, data: dict[str, Any]) -> None:
    """A `ConfigError` naming the first field whose JSON type is wrong ("hidden_size": "64"),
    before anything reads it; the values themselves are checked by the config."""
    kinds = dict(_field_types(cls))
    # The legacy thetas are read only when present (null: absent); the label and RoPE fields
    # are transformers' spellings, read below.
    kinds.update(global_rope_theta=float | None, local_rope_theta=float | None, num_labels=int | None)
    kinds.update(global_attn_every_n_layers=int | None, model_type=str, rope_theta=float | None)
    for name, value in data.items():
        if name in kinds and not _accepts(kinds[name], value):
            raise ConfigError(f"{name} must be {_describe(kinds[name])}, got {value!r} (a JSON {_json_type(value)})")
    for name in ("rope_parameters", "rope_scaling", "quantization_config", "id2label", "label2id"):
        if data.get(name) is not None and not isinstance(data[name], Mapping):
            raise ConfigError(f"{name} must be an object, got {data[name]!r} (a JSON {_json_type(data[name])})")
    for name in ("rope_parameters", "rope_scaling"):
        params = data.get(name) or {}
        nested = {f"{name}[{k!r}]": v for k, v in params.items() if k in LAYER_TYPES}
        for where, value in nested.items():
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{where} must be an object, got {value!r} (a JSON {_json_type(value)})")
        for where, value in [(name, params), *nested.items()]:
            theta = (value or {}).get("rope_theta")
            if theta is not None and not _accepts(float, theta):
                raise ConfigError(f"{where}['rope_theta'] must be a number, got {theta!r}")
    for key, label in (data.get("id2label") or {}).items():
        if not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())):
            raise ConfigError(f"id2label keys must be label ids (0, 1, ...), got {key!r}")
        if not isinstance(label, (str, int, float)) or isinstance(label, bool):
            raise ConfigError(f"id2label[{key!r}] must be a label name, got {label!r}")


def _read_rope(data: dict[str, Any]) -> tuple[float, float]:
    """(global theta, local theta) from any of the spellings, resolved as transformers does:
    `rope_parameters` (per layer type, or one dict for both), updated by `rope_scaling`, and
    the legacy `global_rope_theta` / `local_rope_theta` only where neither gave a theta. A bare
    `rope_theta` is ignored, as transformers ignores it for this model."""
    scaling = data.pop("rope_scaling", None)
    params = data.pop("rope_parameters", None) or {}
    legacy = {
        "full_attention": data.pop("global_rope_theta", None),
        "sliding_attention": data.pop("local_rope_theta", None),
    }
    data.pop("rope_theta", None)
    if params and not set(params) & set(LAYER_TYPES):
        params = {"full_attention": params, "sliding_attention": params}  # one dict for every type
    for kind in params:
        if kind not in LAYER_TYPES:
            raise ConfigError(f"rope_parameters has an unknown layer type {kind!r}")
    thetas = {}
    for kind, default in (
        ("full_attention", DEFAULT_GLOBAL_ROPE_THETA),
        ("sliding_attention", DEFAULT_LOCAL_ROPE_THETA),
    ):
        merged = {**(params.get(kind) or {}), **(scaling or {})}
        _check_rope_type(merged, "rope_scaling" if scaling else f"rope_parameters[{kind!r}]")
        theta = merged.get("rope_theta")
        if theta is None:
            theta = legacy[kind] if legacy[kind] is not None else default
        thetas[kind] = float(theta)
    return thetas["full_attention"], thetas["sliding_attention"]


def _check_rope_type(params: Mapping[str, Any], where: str) -> None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{where} asks for rope_type {rope_type!r}; ettin-jax supports only 'default' RoPE "
            "(the only kind Ettin checkpoints use)"
        )
    unknown = set(params) - {"rope_type", "type", "rope_theta"}
    if unknown:
        raise ConfigError(f"{where} has RoPE scaling options {sorted(unknown)} that ettin-jax does not support")


def _read_quantization(data: dict[str, Any]) -> str | None:
    """The weight quantization a config.json records: ours, or an error for another library's
    (a bitsandbytes or GPTQ checkpoint holds tensors this port would misread)."""
    config = data.pop("quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, Mapping) else None
    if method != QUANT_METHOD:
        raise QuantizationError(
            f"config.json has a quantization_config of quant_method {method!r}: ettin-jax reads float checkpoints "
            f"and its own int8 ones; load the float checkpoint with quantization='int8' instead"
        )
    return check_quantization(config.get("weights"), "quantization_config.weights")


def _read_labels(data: dict[str, Any]) -> tuple[str, ...]:
    id2label = data.pop("id2label", None)
    num_labels = data.pop("num_labels", None)
    data.pop("label2id", None)
    if id2label:
        ids = sorted(int(i) for i in id2label)
        if ids != list(range(len(ids))):
            raise ConfigError(f"id2label ids must be 0..{len(ids) - 1}, got {ids}")
        by_int = {int(k): v for k, v in id2label.items()}
        labels = tuple(str(by_int[i]) for i in ids)
        if num_labels is not None and num_labels != len(labels):
            labels = tuple(f"LABEL_{i}" for i in range(num_labels))
        return labels
    n = 2 if num_labels is None else num_labels
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_labels must be a positive integer, got {n!r}")
    return tuple(f"LABEL_{i}" for i in range(n))
