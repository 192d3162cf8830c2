"""Tiny random ModernBERT decoders built with transformers; shared by the tests."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import transformers

VOCAB = 128
WINDOW = 4  # sliding_window = local_attention // 2

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
    local_attention=2 * WINDOW,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    cls_token_id=1,
    sep_token_id=2,
)


def tiny_config(**overrides) -> transformers.ModernBertDecoderConfig:
    return transformers.ModernBertDecoderConfig(**{**TINY, **overrides})


def torch_model(kind: str = "causal", seed: int = 0, **overrides) -> torch.nn.Module:
    """A transformers model in float32 eval mode, every param perturbed so that norm scales and
    biases are not their trivial init (a swapped or dropped one must change the output)."""
    cls = {
        "causal": transformers.ModernBertDecoderForCausalLM,
        "classify": transformers.ModernBertDecoderForSequenceClassification,
        "base": transformers.ModernBertDecoderModel,
    }[kind]
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    # ids >= 3 so that no pad/bos/eos appears by accident.
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length)).astype(np.int32)


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    return np.asarray(x, dtype=np.float32)


def attention_inputs(t: int, n: int, h: int, dtype, *, left: int, right: int, split: int):
    """Two rows of attention inputs: q, k, v (2, t, n, h) standard normal in `dtype`, a MaskSpec
    in which row 0 has `left` padding tokens on the left, row 1 `right` on the right and packs two
    sequences split at `split`, and the (2, t) bool mask of real tokens."""
    import jax.numpy as jnp

    from ettin_jax.attention import MaskSpec

    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(2, t, n, h)), dtype) for _ in range(3))
    valid = np.ones((2, t), bool)
    valid[0, :left] = False
    valid[1, t - right :] = False
    segments = np.zeros((2, t), np.int32)
    segments[1, split:] = 1
    spec = MaskSpec(jnp.broadcast_to(jnp.arange(t), (2, t)), jnp.asarray(valid), jnp.asarray(segments))
    return q, k, v, spec, valid


def run_records(out: str) -> list[dict]:
    """A training run's metrics.jsonl records."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def exported_params(directory: str) -> dict[str, np.ndarray]:
    """The tensors of a transformers-format model directory."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(directory, "model.safetensors"))
