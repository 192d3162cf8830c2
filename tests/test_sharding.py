"""Sharded runs equal single-device runs, on the 8 CPU devices conftest.py asks for."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from helpers import TINY, random_ids
from jax.sharding import PartitionSpec as P

from ettin_jax import (
    ModernBertDecoderConfig,
    ModernBertDecoderForCausalLM,
    ModernBertDecoderForSequenceClassification,
    sharding,
)
from ettin_jax.convert.checkpoint import Tensor
from ettin_jax.train.optim import OptimizerConfig, make_optimizer
from ettin_jax.train.steps import create_train_state, train_step

# (data, fsdp, tensor): data and fsdp alone, tensor with each, and all three.
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Two layers, one global and one sliding: both kinds, and half the compile time of four.
CONFIG = ModernBertDecoderConfig(**{**TINY, "num_hidden_layers": 2})


def _mesh(data: int, fsdp: int, tensor: int) -> jax.sharding.Mesh:
    return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])


def _model(cls=ModernBertDecoderForCausalLM, mesh=None, **overrides):
    config = CONFIG.replace(**overrides)
    model = cls(config, rngs=nnx.Rngs(3))
    return model if mesh is None else sharding.shard_model(model, mesh)


def _batch(rows: int = 8, length: int = 12) -> dict[str, np.ndarray]:
    ids = random_ids(rows, length, seed=4)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    ids[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---- the mesh -----------------------------------------------------------------------------
def test_parse_mesh():
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.parse_mesh("tensor=4, data=-1") == {"data": -1, "fsdp": 1, "tensor": 4}
    assert dict(sharding.mesh_from_arg("data=-1,tensor=2").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert sharding.mesh_from_arg(None) is None
    with pytest.raises(sharding.ShardingError, match="'model=2' is not AXIS=SIZE"):
        sharding.parse_mesh("data=4,model=2")
    with pytest.raises(sharding.ShardingError, match="must be an integer"):
        sharding.parse_mesh("data=two")


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((4, 2, 2), "needs 16 devices but there are 8"),
        ((2, 1, 2), "uses 4 of the 8 devices"),
        ((-1, -1, 1), "at most one of them -1"),
        ((-1, 3, 1), "8 devices do not divide by 3"),
    ],
)
def test_bad_mesh_is_a_clear_error(sizes, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.make_mesh(*sizes)


def test_every_param_has_a_rule():
    for cls in (ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification):
        for tied in (True, False):
            model = nnx.eval_shape(lambda cls=cls, tied=tied: _model(cls, tie_word_embeddings=tied, decoder_bias=True))
            params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            for path, value in params.items():
                axes = sharding.param_axes(path)
                assert axes is not None and len(axes) == value.ndim, (path, axes)


def test_shard_model_places_params_by_the_table():
    model = _model(mesh=_mesh(2, 2, 2))
    attn = model.model.layers[1].attn
    assert attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert attn.Wo.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert model.model.layers[1].mlp.Wi.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.model.embeddings.tok_embeddings.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert model.model.final_norm.scale[...].sharding.spec == P(
        None,
    )
    # Each device holds an eighth of a (64, 64) kernel split 2 x 2 (and replicated over data).
    assert attn.q_proj.kernel[...].addressable_shards[0].data.shape == (32, 32)


def test_a_size_that_does_not_divide_names_it():
    with pytest.raises(
        sharding.ShardingError, match="num_attention_heads 4 does not divide over mesh axis tensor of size 8"
    ):
        _model(mesh=_mesh(1, 1, 8))
    with pytest.raises(
        sharding.ShardingError,
        match=r"has shape \(100.*\): its 'vocab' dimension \(100\) does not divide over mesh axis tensor of size 8",
    ):
        _model(mesh=_mesh(1, 1, 8), vocab_size=100, num_attention_heads=8, intermediate_size=96)


def test_a_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(sharding.ShardingError, match="input_ids: a batch of 6 rows does not divide over the data"):
        sharding.put_batch({"input_ids": np.zeros((6, 4), np.int32)}, _mesh(4, 1, 2))


# ---- sharded equals single-device ---------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    """Single-device logits, greedy tokens and one train step, for both heads."""
    batch = _batch()
    lm, clf = _model(), _model(ModernBertDecoderForSequenceClassification, num_labels=3)
    return {
        "lm_logits": np.asarray(lm(**batch).logits),
        "clf_logits": np.asarray(clf(**batch).logits),
        "tokens": lm.generate([[5, 6, 7], list(range(3, 20)), [9]], max_new_tokens=10),
        "step": _one_step(lm, batch),
    }


def _one_step(model, batch, mesh=None):
    state = create_train_state(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.1)), seed=1)
    stacked = {
        "input_ids": batch["input_ids"][None],
        "attention_mask": batch["attention_mask"][None],
        "labels": np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)[None],
    }
    if mesh is not None:
        stacked = sharding.put_batch(stacked, mesh, axis=1)
    state, metrics = train_step(state, stacked, jax.random.PRNGKey(0))
    params = {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(state.params).items()}
    return params, float(metrics["loss"]), float(metrics["grad_norm"])


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "data={},fsdp={},tensor={}".format(*s))
def test_sharded_runs_equal_the_single_device_run(shape, reference):
    mesh = _mesh(*shape)
    batch = _batch()
    lm = _model(mesh=mesh)
    clf = _model(ModernBertDecoderForSequenceClassification, mesh=mesh, num_labels=3)
    placed = sharding.put_batch(batch, mesh)
    with sharding.activate(mesh):
        logits = jax.jit(lambda m, b: m(**b).logits)(lm, placed)
        pooled = jax.jit(lambda m, b: m(**b).logits)(clf, placed)
    # The batch really is split: each device holds 8 / (data * fsdp) rows.
    assert logits.addressable_shards[0].data.shape[0] == 8 // (shape[0] * shape[1])
    np.testing.assert_allclose(np.asarray(logits), reference["lm_logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), reference["clf_logits"], atol=1e-5, rtol=1e-5)

    tokens = lm.generate([[5, 6, 7], list(range(3, 20)), [9]], max_new_tokens=10)
    np.testing.assert_array_equal(tokens, reference["tokens"])

    params, loss, grad_norm = _one_step(lm, batch, mesh)
    ref_params, ref_loss, ref_norm = reference["step"]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grad_norm == pytest.approx(ref_norm, rel=1e-5)
    for name, value in ref_params.items():
        np.testing.assert_allclose(params[name], value, atol=1e-5, rtol=1e-5, err_msg=name)


def test_splash_runs_per_device_under_a_mesh(reference):
    """Splash is a Pallas kernel, one device's program: under a mesh it runs inside shard_map on
    each device's rows (data x fsdp) and heads (tensor). Forward and generation (whose prefill
    uses the backend too) equal the single-device dense run."""
    mesh = _mesh(2, 2, 2)
    lm = _model(mesh=mesh, attention_impl="splash")
    placed = sharding.put_batch(_batch(), mesh)
    with sharding.activate(mesh):
        logits = jax.jit(lambda m, b: m(**b).logits)(lm, placed)
        text = str(jax.jit(lambda m, b: m(**b).logits).lower(lm, placed).as_text())
    assert "shard_map" in text or "manual" in text.lower()  # the kernel really runs per device
    real = _batch()["attention_mask"].astype(bool)  # padding tokens' outputs differ by backend, unused
    np.testing.assert_allclose(np.asarray(logits)[real], reference["lm_logits"][real], atol=1e-5, rtol=1e-5)
    tokens = lm.generate([[5, 6, 7], list(range(3, 20)), [9]], max_new_tokens=10)
    np.testing.assert_array_equal(tokens, reference["tokens"])


def test_sharded_stream_equals_generate():
    mesh = _mesh(2, 2, 2)
    lm = _model(mesh=mesh)
    prompts = [[5, 6, 7], list(range(3, 20))]
    tokens = lm.generate(prompts, max_new_tokens=6)
    streamed = np.stack(list(lm.generate_stream(prompts, max_new_tokens=6)), axis=1)
    np.testing.assert_array_equal(streamed, tokens[:, -6:])


def test_the_optimizer_state_is_sharded_like_the_params():
    mesh = _mesh(2, 2, 2)
    state = create_train_state(_model(mesh=mesh), make_optimizer(OptimizerConfig(learning_rate=1e-3)))
    kernel = state.params["model"]["layers"][0]["attn"]["q_proj"]["kernel"]
    where = "['model']['layers'][0]['attn']['q_proj']['kernel']"
    moments = [
        x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if where in jax.tree_util.keystr(path)
    ]
    assert len(moments) == 2  # Adam's mu and nu
    assert all(m.sharding.spec == kernel.sharding.spec == P("fsdp", "tensor") for m in moments)
    assert state.step.sharding.is_fully_replicated and state.rng.sharding.is_fully_replicated


def test_loading_with_a_mesh_reads_each_slice_once(saved, monkeypatch):
    _, directory = saved("causal")
    plain = ModernBertDecoderForCausalLM.from_pretrained(directory)
    parts, read = [], Tensor.read  # every read of checkpoint bytes goes through Tensor.read
    monkeypatch.setattr(Tensor, "read", lambda self, index=(): parts.append(read(self, index)) or parts[-1])
    model = ModernBertDecoderForCausalLM.from_pretrained(directory, mesh=_mesh(2, 2, 2))
    ours = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    theirs = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    # One process holds all 8 devices, so it reads the whole model, but each distinct slice
    # once: replicas over `data` share a read.
    assert sum(p.nbytes for p in parts) == sum(x.nbytes for x in theirs.values())
    kernel = ours[("model", "layers", 0, "mlp", "Wi", "kernel")]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    for path, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(value), err_msg=str(path))
