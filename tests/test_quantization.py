"""8-bit inference: int8 weights (`quantization="int8"`) and an int8 KV cache
(`kv_cache_dtype="int8"`): their size, their error against float32 under a bound derived below,
exact round trips, sharding, every path that runs a model (generate, the engine, the pipeline,
the classifier), the CLI, and a clear error for each thing that cannot work.

The error bounds. Weights: each output channel (a kernel column, an embedding row) of n values
is scaled by s = max|w| / 127.5 and rounded, so each weight moves by at most s/2 = max|w| / 255
and, rounding errors being uniform on [-s/2, s/2], by s / sqrt(12) = max|w| / 441.7 in rms. For
near-Gaussian weights (these are: a truncated normal plus Gaussian noise) max|w| / rms(w) over n
values is m(n), the expected largest |z| of n standard normals (m(64) = 2.60), so one matrix
product's output moves by a relative rms of
    eps_w = m(n) / (127.5 sqrt(12))        (n = 64: 0.59%).
The logits sit behind M quantized matrices in series: the embedding, six per layer (q, k, v, Wo,
Wi, Wo), the head's dense and the tied vocabulary projection, M = 6L + 3; with LayerNorms keeping
each stage's gain near 1, independent errors add in quadrature, so the logits move by a relative
sqrt(M) eps_w: 3.1% for the 4-layer model. The largest |logit| and the largest error are both
about the same number of standard deviations out, so the bound is
    max |logit_int8 - logit_f32| <= sqrt(M) eps_w max |logit_f32|.
It is an upper estimate (softmax damps the errors of q and k, and the unquantized residual path
dilutes each layer's); measured: 1.2%, for the classifier 1.6%.

KV cache: keys and values are rounded per token and head, over H = head_dim values with scale
max|k| / 127: each value moves by at most half a step (checked exactly), a relative rms of
eps_kv = m(H) / (127 sqrt(12)) (H = 16: 0.47%, also checked). Two tensors (k, v) of each of the
G global layers are rounded, and a step's attention output averages the values of its S keys,
so their independent errors shrink by sqrt(S) against the residual stream:
    max |dlogit| <= sqrt(2 G / S) eps_kv max |logit|       (G = 2, S = 17: 0.23%);
measured 0.03%: the attention branch of one layer is a fraction of the residual stream.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from flax import nnx, traverse_util
from helpers import TINY, random_ids, torch_model

import ettin_jax as ej
from ettin_jax import convert, default_model, sharding
from ettin_jax.cli import main
from ettin_jax.convert import CheckpointError
from ettin_jax.engine import Engine
from ettin_jax.quantization import QuantizationError
from ettin_jax.train.steps import create_train_state

PEAK = 10.0  # the head's norm is scaled by this: logits with std ~4 instead of ~0.4 (peaked softmax)
PROMPT, NEW = 8, 200
LENGTH = 256  # max_position_embeddings: room for PROMPT + NEW
CLASSIFY_IDS = random_ids(8, 12, seed=7)


def expected_max_abs(n: int) -> float:
    """E max(|z_1|, ..., |z_n|) for standard normals: the integral of P(max > x) over x >= 0."""
    x = np.linspace(0.0, 10.0, 20001)
    below = np.array([math.erf(v / math.sqrt(2)) for v in x]) ** n  # P(max <= x)
    return float(np.sum((1 - below[1:]) + (1 - below[:-1])) / 2 * (x[1] - x[0]))


def rounding_eps(n: int, levels: float) -> float:
    """Relative rms error of n near-Gaussian values rounded with scale max|w| / levels."""
    return expected_max_abs(n) / (levels * math.sqrt(12))


def weight_bound(num_layers: int, n: int) -> float:
    """max |dlogit| / max |logit| for int8 weights; see the module docstring."""
    return math.sqrt(6 * num_layers + 3) * rounding_eps(n, 127.5)


def kv_bound(config: ej.ModernBertDecoderConfig, keys: int) -> float:
    """max |dlogit| / max |logit| for the int8 KV cache after a step over `keys` keys."""
    globals_ = config.layer_types.count("full_attention")
    return math.sqrt(2 * globals_ / keys) * rounding_eps(config.head_dim, 127.0)


WEIGHT_BOUND = weight_bound(TINY["num_hidden_layers"], TINY["hidden_size"])


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@jax.jit
def forward(model, ids):
    return model(ids).logits


def params(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype, path
        np.testing.assert_array_equal(np.asarray(pa[path]), np.asarray(pb[path]), err_msg=str(path))


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaked(tmp_path_factory) -> str:
    """A tiny causal LM whose head's LayerNorm is scaled by PEAK, saved by transformers."""
    model = torch_model("causal", max_position_embeddings=LENGTH)
    with torch.no_grad():
        model.lm_head.norm.weight.mul_(PEAK)
        if model.lm_head.norm.bias is not None:
            model.lm_head.norm.bias.mul_(PEAK)
    directory = str(tmp_path_factory.mktemp("peaked"))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def f32(peaked):
    return ej.ModernBertDecoderForCausalLM.from_pretrained(peaked)


@pytest.fixture(scope="module")
def int8(peaked):
    return ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, quantization="int8")


@pytest.fixture(scope="module")
def int8_dir(int8, tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("int8"))
    int8.save_pretrained(directory, format="flax")
    return directory


@pytest.fixture(scope="module")
def ids():
    return random_ids(4, 16, seed=5)


@pytest.fixture(scope="module")
def int8_logits(int8, ids):
    return np.asarray(forward(int8, ids))


@pytest.fixture(scope="module")
def greedy(f32, int8):
    """200 greedy tokens from each model on 4 prompts, and both models' logits on the float
    model's sequences (teacher forcing: every position sees the same prefix in both)."""
    prompts = random_ids(4, PROMPT, seed=6)
    tokens = {name: m.generate(prompts, max_new_tokens=NEW, do_sample=False, eos_token_id=[]) for name, m in
              (("f32", f32), ("int8", int8))}  # fmt: skip
    sequence = tokens["f32"]
    return tokens, np.asarray(forward(f32, sequence)), np.asarray(forward(int8, sequence))


# ---- 1. bytes -------------------------------------------------------------------------------
def test_int8_params_take_about_half_the_bfloat16_bytes():
    """The 1b shape, counted abstractly: int8 matrices (a byte a weight) and their bfloat16
    scales (one per output channel) against bfloat16 everywhere."""
    config = ej.ModernBertDecoderConfig.ettin("1b")

    def nbytes(quantization):
        model = nnx.eval_shape(
            lambda: ej.ModernBertDecoderForCausalLM(
                config.replace(quantization=quantization), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
            )
        )
        return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    int8_bytes, bf16_bytes = nbytes("int8"), nbytes(None)
    ratio = int8_bytes / bf16_bytes
    print(f"1b params: int8 {int8_bytes / 2**30:.3f} GiB, bfloat16 {bf16_bytes / 2**30:.3f} GiB, ratio {ratio:.4f}")
    assert bf16_bytes > 1.9e9  # really the 1b shape (about a billion params)
    assert 0.45 < ratio <= 0.55


# ---- 2. error -------------------------------------------------------------------------------
def test_the_bound_has_the_value_the_docstring_derives():
    assert expected_max_abs(1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-4)  # E|z|
    assert expected_max_abs(64) == pytest.approx(2.596, rel=1e-3)
    assert rounding_eps(64, 127.5) == pytest.approx(0.00588, rel=1e-2)
    assert weight_bound(4, 64) == WEIGHT_BOUND == pytest.approx(0.0306, rel=1e-2)
    config = ej.ModernBertDecoderConfig(**TINY)
    assert kv_bound(config, 17) == pytest.approx(0.00229, rel=1e-2)


def test_int8_logits_within_the_bound(f32, int8, greedy):
    _, want, got = greedy
    assert want.std() > 3  # peaked: the softmax is far from flat
    error = relative_error(got, want)
    print(f"int8 weights: max |dlogit| / max |logit| = {error:.4f} (bound {WEIGHT_BOUND:.4f}), max |logit| "
          f"{np.abs(want).max():.2f}, logit std {want.std():.2f}")  # fmt: skip
    assert error <= WEIGHT_BOUND
    assert error >= WEIGHT_BOUND / 10  # the bound is not loose by more than 10x (and int8 really is used)
    for kernel in (int8.model.layers[0].attn.q_proj.kernel, int8.model.embeddings.tok_embeddings.embedding):
        assert kernel[...].dtype == jnp.int8


def test_greedy_tokens_agree_with_float32(greedy):
    """Teacher-forced, position by position: at each of the 200 steps of the float model's
    greedy sequence, does the int8 model pick the same next token? Free-running, the two
    sequences agree until a near-tie, where a 1% logit error may flip the choice (after which
    they are different texts): every divergence must be at a float top-2 margin the error can
    flip, i.e. <= 2 * the bound."""
    tokens, want, got = greedy
    steps = slice(PROMPT - 1, PROMPT - 1 + NEW)  # logits that predict the 200 new tokens
    chosen = tokens["f32"][:, PROMPT:]
    agreement = float((got[:, steps].argmax(-1) == chosen).mean())
    assert (want[:, steps].argmax(-1) == chosen).all()  # the forward pass reproduces generate
    same = tokens["int8"][:, PROMPT:] == chosen
    prefix = [int(np.argmin(row)) if not row.all() else NEW for row in same]
    print(f"int8 weights, 200 greedy steps x 4 prompts: teacher-forced agreement {agreement:.4f}; free-running "
          f"positions equal {same.mean():.4f}, first divergence at steps {prefix}")  # fmt: skip
    assert agreement >= 0.95
    scale = np.abs(want).max()
    for row, step in enumerate(prefix):
        if step < NEW:
            logits = want[row, PROMPT - 1 + step]
            margin = logits.max() - logits[tokens["int8"][row, PROMPT + step]]
            assert margin <= 2 * WEIGHT_BOUND * scale, (row, step, margin)


# ---- 3. round trips -------------------------------------------------------------------------
def test_flax_round_trip_is_exact(int8, int8_dir, ids, int8_logits):
    with open(os.path.join(int8_dir, "config.json")) as f:
        assert json.load(f)["quantization_config"] == {"quant_method": "ettin-jax", "weights": "int8"}
    loaded = ej.ModernBertDecoderForCausalLM.from_pretrained(int8_dir)
    assert loaded.config.quantization == "int8"
    assert_same_params(loaded, int8)
    assert np.array_equal(np.asarray(forward(loaded, ids)), int8_logits)


def test_load_in_8bit_is_quantization_int8(peaked, int8):
    assert_same_params(ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, load_in_8bit=True), int8)


def test_quantize_model_equals_quantizing_on_load(f32, int8, ids, int8_logits):
    quantized = convert.quantize_model(f32)
    assert quantized.config.quantization == "int8" and f32.config.quantization is None
    assert_same_params(quantized, int8)
    assert np.array_equal(np.asarray(forward(quantized, ids)), int8_logits)
    with pytest.raises(QuantizationError, match="already quantized"):
        convert.quantize_model(int8)


# ---- 4. sharded ------------------------------------------------------------------------------
def test_int8_under_a_mesh_equals_one_device(peaked, int8_dir, ids, int8_logits):
    mesh = sharding.make_mesh(2, 2, 2)
    sharded = ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, quantization="int8", mesh=mesh)
    float_sharded = ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, mesh=mesh)
    with sharding.activate(mesh):
        logits = forward(sharded, sharding.put_batch({"ids": ids}, mesh)["ids"])
    assert logits.addressable_shards[0].data.shape[0] == ids.shape[0] // 4  # the batch is split
    np.testing.assert_allclose(np.asarray(logits), int8_logits, atol=1e-5, rtol=0)

    ours, floats = params(sharded), params(float_sharded)
    scales = [p for p in ours if str(p[-1]).endswith("_scale")]
    assert len(scales) == 6 * TINY["num_hidden_layers"] + 2  # every Linear, the lm_head's dense, the table
    for scale_path in scales:
        value_path = (*scale_path[:-1], scale_path[-1].removesuffix("_scale"))
        value, scale = ours[value_path], ours[scale_path]
        assert value.dtype == jnp.int8 and floats[value_path].dtype == jnp.float32
        spec = tuple(value.sharding.spec) + (None,) * (2 - len(value.sharding.spec))
        assert spec == tuple(floats[value_path].sharding.spec) + (None,) * (2 - len(floats[value_path].sharding.spec))
        output = spec[0] if value_path[-1] == "embedding" else spec[1]  # a table row, a kernel column
        assert (tuple(scale.sharding.spec) or (None,)) == (output,), scale_path
    q = ("model", "layers", 0, "attn", "q_proj")
    assert ours[(*q, "kernel")].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert ours[(*q, "kernel_scale")].sharding.spec == jax.sharding.PartitionSpec("tensor")
    # An int8 flax checkpoint restores onto the mesh with the same placement.
    restored = ej.ModernBertDecoderForCausalLM.from_pretrained(int8_dir, mesh=mesh)
    for path, value in params(restored).items():
        assert value.sharding.spec == ours[path].sharding.spec, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ours[path]))


# ---- 5. every path ----------------------------------------------------------------------------
def test_engine_equals_generate_with_int8_weights(int8):
    prompts = [random_ids(1, n, seed=40 + n)[0].tolist() for n in (3, 9, 6)]
    kwargs = dict(max_new_tokens=12, eos_token_id=[])
    batch = int8.generate_batch(prompts, **kwargs)
    together = int8.generate(prompts, **kwargs)  # left-padded to the longest prompt
    assert batch == together[:, -12:].tolist()
    assert all(len(t) == 12 for t in batch)


def test_pipeline_with_int8_weights(default_home):
    directory = default_model.path()
    pipe = ej.pipeline("text-generation", model=directory, quantization="int8")
    assert pipe.model.config.quantization == "int8"
    assert pipe.model.model.layers[1].mlp.Wi.kernel[...].dtype == jnp.int8
    record = pipe("The cat", max_new_tokens=6, return_tensors=True)[0]
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory, quantization="int8")
    prompt = pipe.encode("The cat")
    expected = model.generate([prompt], max_new_tokens=6)[0, len(prompt) :]
    assert record["generated_token_ids"] == pipe.new_tokens(expected)
    assert len(record["generated_token_ids"]) > 0


def test_classifier_with_int8_weights(tmp_path):
    reference = torch_model("classify", num_labels=3)
    reference.save_pretrained(tmp_path)
    cls = ej.ModernBertDecoderForSequenceClassification
    f32, int8 = cls.from_pretrained(tmp_path), cls.from_pretrained(tmp_path, quantization="int8")
    assert int8.classifier.kernel[...].dtype == jnp.int8 and int8.head.dense.kernel[...].dtype == jnp.int8
    batch = CLASSIFY_IDS
    want, got = np.asarray(f32(batch).logits), np.asarray(int8(batch).logits)
    error = relative_error(got, want)
    print(f"int8 classifier: max |dlogit| / max |logit| = {error:.4f} (bound {WEIGHT_BOUND:.4f})")
    assert WEIGHT_BOUND / 10 <= error <= WEIGHT_BOUND


# ---- 6. the int8 KV cache -------------------------------------------------------------------
@pytest.fixture(scope="module")
def kv8(peaked):
    return ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, kv_cache_dtype="int8")


@jax.jit
def cached_steps(model, ids, step):
    """A 10-token prefill with a cache, six tokens continuing it (attending over the cache and
    themselves), then one token over all 17: (prefill logits, its cache), (six tokens' logits),
    (the last token's logits)."""
    first = model(ids[:, :10], use_cache=True)
    several = model(ids[:, 10:], past_key_values=first.past_key_values, use_cache=True)
    one = model(step, past_key_values=several.past_key_values)
    return (first.logits, first.past_key_values), several.logits, one.logits


@pytest.fixture(scope="module")
def cached(kv8, f32, ids):
    step = random_ids(ids.shape[0], 1, seed=8)
    return {name: cached_steps(model, ids, step) for name, model in (("f32", f32), ("int8", kv8))}


def test_int8_cache_on_global_layers_within_half_a_step(kv8, cached):
    """Global layers keep int8 keys and values and a scale per token and head; sliding layers
    keep floats. Each stored value is within half a step (scale / 2) of the float cache's, the
    rounding's guarantee, and reaches nearly that (so it is no looser rounding); the relative rms
    error is eps_kv."""
    (logits, cache), (want_logits, want) = cached["int8"][0], cached["f32"][0]
    eps = rounding_eps(kv8.config.head_dim, 127.0)
    for kind, layer, ref in zip(kv8.config.layer_types, cache.layers, want.layers, strict=True):
        int8 = kind == "full_attention"
        assert (layer.k.dtype, layer.v.dtype) == ((jnp.int8,) * 2 if int8 else (jnp.float32,) * 2), kind
        assert layer.quantized == int8
        if not int8:
            np.testing.assert_array_equal(np.asarray(layer.k), np.asarray(ref.k))
            continue
        assert layer.k_scale.shape == (*layer.k.shape[:3], 1) and layer.k_scale.dtype == jnp.float32
        for got, value, scale in ((layer.keys(), ref.k, layer.k_scale), (layer.values(), ref.v, layer.v_scale)):
            value, error = np.asarray(value), np.abs(np.asarray(got) - np.asarray(value))
            steps = error / (np.asarray(scale) / 2)
            rms = float(np.sqrt((error**2).mean() / (value**2).mean()))
            assert 0.9 < steps.max() <= 1 + 1e-5, steps.max()
            assert 0.8 * eps < rms < 1.2 * eps, (rms, eps)
    assert set(kv8.config.layer_types) == {"full_attention", "sliding_attention"}
    # The prefill attends over the new keys themselves: the cache's dtype does not change it.
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want_logits))


def test_cached_steps_within_the_kv_bound(kv8, cached, ids):
    """The six continuing tokens (11 keys at the fewest) and the last one (17 keys), each within
    the bound for its number of keys."""
    for i, keys in ((1, 11), (2, ids.shape[1] + 1)):
        bound, error = kv_bound(kv8.config, keys), relative_error(cached["int8"][i], cached["f32"][i])
        print(f"int8 KV cache, step over {keys} keys: max |dlogit| / max |logit| = {error:.5f} (bound {bound:.5f})")
        assert bound / 20 <= error <= bound


def test_greedy_with_the_int8_cache_agrees_with_the_float_cache(kv8, f32):
    prompts = random_ids(4, PROMPT, seed=9)
    kwargs = dict(max_new_tokens=40, do_sample=False, eos_token_id=[])
    want, got = f32.generate(prompts, **kwargs), kv8.generate(prompts, **kwargs)
    agreement = float((got[:, PROMPT:] == want[:, PROMPT:]).mean())
    print(f"int8 KV cache, 40 greedy steps x 4 prompts: positions equal {agreement:.4f}")
    assert agreement >= 0.9


def test_engine_equals_generate_with_the_int8_cache(kv8):
    """The engine's slots hold the int8 cache on global layers, and its tokens are `generate`'s."""
    prompts = [random_ids(1, n, seed=50 + n)[0].tolist() for n in (5, 21, 2)]
    kwargs = dict(max_new_tokens=16, eos_token_id=[])
    engine = Engine(kv8, max_batch_size=4, max_length=64)
    requests = [engine.submit(p, **kwargs) for p in prompts]
    engine.run()
    for kind, layer in zip(kv8.config.layer_types, engine.slots.cache.layers, strict=True):
        assert layer.k.dtype == (jnp.int8 if kind == "full_attention" else jnp.float32), kind
    together = kv8.generate(prompts, **kwargs)  # left-padded to the longest prompt
    assert [r.result() for r in requests] == together[:, -16:].tolist()


# ---- 7. bad input ---------------------------------------------------------------------------
def test_unknown_quantization_and_kv_cache_dtype_are_named(peaked):
    with pytest.raises(QuantizationError, match="quantization 'int4' is not supported"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, quantization="int4")
    with pytest.raises(QuantizationError, match="kv_cache_dtype 'fp8' is not supported"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(peaked, kv_cache_dtype="fp8")


def test_int8_cannot_train(int8):
    with pytest.raises(QuantizationError, match="int8 weights, which are for inference"):
        create_train_state(int8, optax.sgd(0.1))


def test_a_quantized_checkpoint_cannot_load_as_float(int8_dir):
    with pytest.raises(QuantizationError, match=re.escape(int8_dir) + " holds int8 weights.*quantization=None"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(int8_dir, quantization=None)


def test_int8_cannot_save_for_transformers(int8, tmp_path):
    with pytest.raises(QuantizationError, match="int8 model saves only with format='flax'"):
        int8.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_foreign_quantization_config_is_named(peaked, tmp_path):
    shutil.copytree(peaked, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "config.json") as f:
        data = json.load(f)
    data["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(data, f)
    with pytest.raises(QuantizationError, match="quant_method 'bitsandbytes'"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_an_int8_tensor_in_a_float_checkpoint_is_named(peaked, tmp_path, quantization):
    shutil.copytree(peaked, tmp_path, dirs_exist_ok=True)
    key = "model.layers.1.mlp.Wo.weight"
    tensors = safetensors.numpy.load_file(os.path.join(peaked, "model.safetensors"))
    assert key in tensors
    tensors[key] = np.clip(np.round(tensors[key] * 1000), -127, 127).astype(np.int8)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(key)} \(in .*model\.safetensors\) is stored as int8 but the model expects float32",
    ):
        ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path, quantization=quantization)


@pytest.mark.parametrize("source", ["float", "int8"])
def test_a_new_head_on_an_int8_model_is_refused(source, peaked, int8_dir):
    """A causal LM's checkpoint loaded as an int8 classifier: its head is not in the checkpoint,
    and an int8 model cannot be trained to fill it, so loading says so and names the head."""
    directory, kwargs = (peaked, {"quantization": "int8"}) if source == "float" else (int8_dir, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused lm_head's warning
        with pytest.raises(QuantizationError, match=r"lacks .*classifier\.weight.*int8 models cannot be"):
            ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory, **kwargs)


# ---- 8. the command line --------------------------------------------------------------------
def test_cli_convert_quantize(peaked, int8, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["convert", peaked, str(dst), "--quantize", "int8"]) == 0
    assert "(weights int8)" in capsys.readouterr().out
    with open(dst / "config.json") as f:
        assert json.load(f)["quantization_config"] == {"quant_method": "ettin-jax", "weights": "int8"}
    loaded = ej.ModernBertDecoderForCausalLM.from_pretrained(dst)
    assert loaded.config.quantization == "int8"
    assert_same_params(loaded, int8)

    assert main(["convert", peaked, str(tmp_path / "t"), "--quantize", "int8", "--to", "transformers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --quantize writes an ettin-jax flax checkpoint")
    assert sum(line.startswith("error:") for line in err) == 1
    assert not os.path.exists(tmp_path / "t")
