"""ettin-jax: the ModernBERT Decoder (Ettin decoders) in JAX and Flax NNX."""

from ettin_jax import sharding
from ettin_jax.cache import Cache
from ettin_jax.compile_cache import enable_compilation_cache
from ettin_jax.config import ETTIN_SIZES, ConfigError, ModernBertDecoderConfig
from ettin_jax.errors import EttinError
from ettin_jax.generation import GenerateDecoderOnlyOutput, GenerationConfig
from ettin_jax.inputs import InputError
from ettin_jax.modeling import (
    BaseModelOutput,
    CausalLMOutput,
    ModernBertDecoderForCausalLM,
    ModernBertDecoderForSequenceClassification,
    ModernBertDecoderModel,
    SequenceClassifierOutput,
)
from ettin_jax.pipelines import pipeline

__version__ = "0.1.0"

__all__ = [
    "ETTIN_SIZES",
    "BaseModelOutput",
    "Cache",
    "CausalLMOutput",
    "ConfigError",
    "EttinError",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "InputError",
    "ModernBertDecoderConfig",
    "ModernBertDecoderForCausalLM",
    "ModernBertDecoderForSequenceClassification",
    "ModernBertDecoderModel",
    "SequenceClassifierOutput",
    "enable_compilation_cache",
    "pipeline",
    "sharding",
]
