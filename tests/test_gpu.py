"""What only a GPU can check: cuDNN attention against the dense reference, a whole model and a
train step on it, and greedy generation on the GPU against transformers. Skipped where JAX sees
no GPU (CI); run on a GPU host with `python -m pytest -q tests/test_gpu.py`.

bfloat16 results are compared with a float32 reference computed from the same bfloat16 inputs,
by relative error ||out - ref|| / ||ref||: cuDNN must be as close to it as our own dense path in
bfloat16 is (bf16 rounding of probabilities alone gives errors near 4e-3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import TINY, attention_inputs, random_ids

from ettin_jax import ModernBertDecoderConfig, ModernBertDecoderForCausalLM, generation
from ettin_jax.attention import AttentionError, attend, resolve
from ettin_jax.padding import left_pad

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX sees none)")

B, T, N, H = 2, 200, 4, 64  # 200: not a multiple of cuDNN's tiles


def _relative(out, ref, where) -> float:
    out, ref = np.where(where, np.asarray(out, np.float32), 0), np.where(where, np.asarray(ref, np.float32), 0)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _inputs():
    return attention_inputs(T, N, H, jnp.bfloat16, left=13, right=21, split=90)


@pytest.mark.parametrize("window", [None, 16, 64])
def test_cudnn_matches_dense_outputs_and_gradients(window):
    q, k, v, spec, valid = _inputs()
    real = jnp.asarray(valid)[:, :, None, None]  # padding queries' outputs are unused
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)

    def run(impl, q, k, v):
        def loss(q, k, v):
            out = attend(q, k, v, spec, window, impl)
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * cotangent, 0.0)), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_grads = run("xla", f32(q), f32(k), f32(v))
    ours, ours_grads = run("xla", q, k, v)
    out, grads = run("cudnn", q, k, v)
    assert out.dtype == jnp.bfloat16
    bound = max(2 * _relative(ours, ref, real), 1e-2)
    assert _relative(out, ref, real) < bound
    for name, g, o, r in zip("qkv", grads, ours_grads, ref_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert _relative(g, r, True) < max(2 * _relative(o, r, True), 2e-2), f"d{name}"


def test_cudnn_masks_padding_and_segments():
    """Changing a padding key, or a key of another segment, changes no real output."""
    q, k, v, spec, _ = _inputs()
    base = attend(q, k, v, spec, None, "cudnn")
    v2 = v.at[1, 5].add(50.0).at[0, 2].add(50.0)  # row 1 segment 0, row 0 padding
    out = attend(q, k, v2, spec, None, "cudnn")
    np.testing.assert_array_equal(np.asarray(out[1, 90:-21], np.float32), np.asarray(base[1, 90:-21], np.float32))
    np.testing.assert_array_equal(np.asarray(out[0, 13:], np.float32), np.asarray(base[0, 13:], np.float32))
    assert float(jnp.max(jnp.abs(out[1, 5:90] - base[1, 5:90]).astype(jnp.float32))) > 0.1  # its own segment does


def test_auto_takes_cudnn_in_half_precision_only():
    assert resolve("auto", jnp.bfloat16, 4096) == "cudnn"
    assert resolve("auto", jnp.float16, 16) == "cudnn"
    assert resolve("auto", jnp.float32, 16) == "xla"
    q, k, v, spec, _ = _inputs()
    with pytest.raises(AttentionError, match="computes in bfloat16 or float16, got float32"):
        attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), spec, None, "cudnn")


def _model(dtype, impl: str = "auto", **overrides) -> ModernBertDecoderForCausalLM:
    config = ModernBertDecoderConfig.from_dict({**TINY, **overrides}).replace(attention_impl=impl)
    return ModernBertDecoderForCausalLM(config, dtype=dtype)


def test_model_cudnn_matches_dense_in_bfloat16_with_padding():
    ids = random_ids(2, 40)
    mask = np.ones((2, 40), np.int32)
    mask[0, :7] = 0
    model = _model(jnp.bfloat16, "xla")
    ref = np.asarray(model(ids, attention_mask=mask).logits, np.float32)
    model.set_attention_impl("auto")
    out = np.asarray(model(ids, attention_mask=mask).logits, np.float32)
    real = mask.astype(bool)[:, :, None]
    assert _relative(out, ref, real) < 2e-2


def test_train_step_with_cudnn_matches_dense():
    """bf16 compute on float32 master weights: the gradients through cuDNN agree with the dense
    path's to bf16 accuracy, and a jitted train step with cuDNN gives a finite loss that agrees
    too."""
    from ettin_jax.train.optim import OptimizerConfig, make_optimizer
    from ettin_jax.train.steps import create_train_state, gradients, train_step

    ids = random_ids(2, 64)
    mask = np.ones((1, 2, 64), np.int32)
    mask[0, 1, 50:] = 0  # right padding, as the data pipeline pads
    batch = {"input_ids": ids[None], "attention_mask": mask, "labels": np.where(mask, ids[None], -100)}
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant", max_grad_norm=None))
    grads, losses = {}, {}
    for impl in ("xla", "cudnn"):
        state = create_train_state(_model(jnp.bfloat16, impl), tx, seed=0)
        grads[impl] = gradients(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(0))[2]
        _, metrics = train_step(state, batch, jax.random.PRNGKey(0))
        losses[impl] = float(metrics["loss"])
    assert np.isfinite(losses["cudnn"])
    assert abs(losses["cudnn"] - losses["xla"]) < 1e-2 * abs(losses["xla"])
    flat = {impl: np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads[impl])]) for impl in grads}
    assert np.linalg.norm(flat["cudnn"] - flat["xla"]) / np.linalg.norm(flat["xla"]) < 3e-2


def test_greedy_generation_on_gpu_matches_transformers(saved):
    """float32 on the GPU (XLA's dense path, not cuDNN; conftest.py sets the matmul precision to
    highest, so no TF32 rounding enters), ragged batch, prompt longer than the window, against
    transformers on the CPU."""
    reference, directory = saved("causal")
    prompts = [random_ids(1, 11, seed=3)[0].tolist(), random_ids(1, 5, seed=4)[0].tolist()]
    model = ModernBertDecoderForCausalLM.from_pretrained(directory)
    ours = model.generate(prompts, max_new_tokens=24, eos_token_id=[])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = reference.generate(
            ids, attention_mask=attention, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_bfloat16_prefill_runs_cudnn_and_matches_dense():
    """A ragged left-padded batch longer than the window: the prefill compiles to cuDNN's fused
    attention, and its first logits and the keys it caches match the dense prefill's to bf16
    accuracy."""
    model = _model(jnp.bfloat16, "xla", max_position_embeddings=512)
    prompts = [random_ids(1, 300, seed=5)[0].tolist(), random_ids(1, 77, seed=6)[0].tolist()]
    batch = left_pad(prompts, pad_id=0, batch_bucket=False)
    ids, valid = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
    runs = {}
    for impl in ("xla", "cudnn"):
        model.set_attention_impl(impl)
        graphdef, state = nnx.split(model)

        def prefill(state, ids, valid, graphdef=graphdef):
            m = nnx.merge(graphdef, state)
            return generation._prefill(m, ids, valid, 320, m.output_kernel())

        compiled = jax.jit(prefill).lower(state, ids, valid).compile()
        runs[impl] = (compiled(state, ids, valid), "__cudnn$fmha" in compiled.as_text())
    (ref_logits, _, ref_cache), dense_has_cudnn = runs["xla"]
    (logits, _, cache), has_cudnn = runs["cudnn"]
    assert has_cudnn and not dense_has_cudnn
    assert _relative(logits, ref_logits, True) < 2e-2
    for ref, got in zip(ref_cache.layers, cache.layers, strict=True):
        real = np.asarray(ref.index >= 0)[:, None, :, None]
        assert _relative(got.k, ref.k, real) < 2e-2
