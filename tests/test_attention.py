"""Every attention backend against the dense "xla" reference: outputs and gradients, with
padding on either side, packed segments and windows that do and do not divide the length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, attention_inputs, random_ids

from ettin_jax import ModernBertDecoderConfig, ModernBertDecoderForCausalLM
from ettin_jax.attention import AttentionError, attend, resolve
from ettin_jax.config import ConfigError

B, T, N, H = 2, 40, 4, 16


def _inputs():
    return attention_inputs(T, N, H, jnp.float32, left=5, right=7, split=20)


@pytest.mark.parametrize("impl", ["xla_blocked", "splash"])
@pytest.mark.parametrize("window", [None, 4, 7])
def test_backend_matches_dense_outputs_and_gradients(impl, window):
    q, k, v, spec, valid = _inputs()
    real = jnp.asarray(valid)[:, :, None, None]  # padding queries' outputs are unused

    def loss(impl, q, k, v):
        out = attend(q, k, v, spec, window, impl)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("xla", q, k, v)
    (_, out), grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(impl, q, k, v)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=2e-6)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, atol=2e-5, err_msg=f"d{name}")


def test_segments_and_padding_really_mask():
    """Changing a key in another segment, or a padding key, changes no real output."""
    q, k, v, spec, _ = _inputs()
    for impl in ("xla", "xla_blocked"):
        base = attend(q, k, v, spec, None, impl)
        v2 = v.at[1, 5].add(100.0).at[0, 2].add(100.0)  # row 1 segment 0, row 0 padding
        out = attend(q, k, v2, spec, None, impl)
        np.testing.assert_allclose(out[1, 20:], base[1, 20:], atol=1e-6)  # segment 1 does not see segment 0
        np.testing.assert_allclose(out[0, 5:], base[0, 5:], atol=1e-6)  # real tokens do not see padding
        assert float(jnp.max(jnp.abs(out[1, 5:20] - base[1, 5:20]))) > 1.0  # the same segment does


def test_model_backends_agree_and_segments_equal_separate_sequences():
    model = ModernBertDecoderForCausalLM(ModernBertDecoderConfig.from_dict(TINY))
    a, b = random_ids(1, 13, seed=1), random_ids(1, 9, seed=2)
    packed = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(13), np.arange(9)])[None]
    segments = np.array([[0] * 13 + [1] * 9])
    results = {}
    for impl in ("xla", "xla_blocked", "splash"):
        model.set_attention_impl(impl)
        assert model.config.attention_impl == model.model.config.attention_impl == impl
        results[impl] = model(packed, position_ids=positions, segment_ids=segments).logits
    for impl in ("xla_blocked", "splash"):
        np.testing.assert_allclose(results[impl], results["xla"], atol=1e-5, err_msg=impl)
    model.set_attention_impl("xla")
    separate = np.concatenate([model(a).logits, model(b).logits], axis=1)
    np.testing.assert_allclose(results["xla"], separate, atol=1e-5)


def test_auto_and_errors():
    assert resolve("auto", jnp.float32, 4096) == "xla_blocked"  # float32 off TPU
    assert resolve("auto", jnp.float32, 512) == "xla"  # short: dense was faster
    assert resolve("splash", jnp.float32) == "splash"
    q, k, v, spec, _ = _inputs()
    if jax.default_backend() != "gpu":  # on a GPU, tests/test_gpu.py checks cuDNN's own errors
        with pytest.raises(AttentionError, match=f'"cudnn" needs a GPU; this is {jax.default_backend()}'):
            attend(q, k, v, spec, 4, "cudnn")
    with pytest.raises(ConfigError, match="is not one of auto, xla, xla_blocked, cudnn, splash"):
        attend(q, k, v, spec, 4, "flash")
    with pytest.raises(ConfigError, match="attention_impl 'flash'"):
        ModernBertDecoderForCausalLM(ModernBertDecoderConfig(**TINY)).set_attention_impl("flash")
    with pytest.raises(ConfigError, match="attention_impl 'flash'"):
        ModernBertDecoderConfig(attention_impl="flash")
    dropout_config = ModernBertDecoderConfig.from_dict({**TINY, "attention_dropout": 0.1, "attention_impl": "splash"})
    model = ModernBertDecoderForCausalLM(dropout_config)
    with pytest.raises(AttentionError, match='"splash" has no attention dropout'):
        model(random_ids(1, 8), deterministic=False)
    assert "attention_impl" not in ModernBertDecoderConfig().to_dict()  # a runtime choice


def test_chunked_causal_global_attention_matches_dense():
    """The global path of "xla_blocked" for long sequences, with chunks of 16 over 40 tokens
    (a chunk that does not divide the length): outputs and gradients."""
    from ettin_jax.attention import chunked_causal_attention, xla_attention

    q, k, v, spec, valid = _inputs()
    real = jnp.asarray(valid)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    chunked = lambda q, k, v: chunked_causal_attention(q, k, v, spec, chunk=16)  # noqa: E731
    dense = lambda q, k, v: xla_attention(q, k, v, spec, None)[0]  # noqa: E731
    np.testing.assert_allclose(np.where(real, chunked(q, k, v), 0), np.where(real, dense(q, k, v), 0), atol=2e-6)
    grads = jax.grad(loss, argnums=(1, 2, 3))(chunked, q, k, v)
    for g, r in zip(grads, jax.grad(loss, argnums=(1, 2, 3))(dense, q, k, v), strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5)


def test_auto_follows_the_platform_of_the_mesh_being_compiled_for():
    """Compiling for a TPU topology on a CPU host (benchmarks/tpu_aot.py), `auto` resolves by
    the mesh's devices, not by the host: splash, and the kernel compiled, not interpreted."""
    from ettin_jax import sharding
    from ettin_jax.platforms import compile_platform

    try:
        from jax._src.mesh import AbstractDevice  # what the mesh of a TPU topology carries

        tpu = jax.sharding.AbstractMesh((1, 2, 2), sharding.AXES, abstract_device=AbstractDevice("TPU v5", 1, "tpu"))
    except (ImportError, TypeError) as e:  # a private JAX type: skip rather than fail if it moves
        pytest.skip(f"this JAX has no AbstractDevice as expected: {e}")
    assert compile_platform() == jax.default_backend()
    with jax.sharding.use_abstract_mesh(tpu):
        assert compile_platform() == "tpu"
        assert resolve("auto", jnp.bfloat16, 512) == "splash"
        with pytest.raises(AttentionError, match='"cudnn" needs a GPU; this is tpu'):
            q, k, v, spec, _ = _inputs()
            attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), spec, 4, "cudnn")
