"""LoRA against PEFT on the same weights: our adapter in PEFT, our merged export in
transformers, PEFT's adapter in ours, all in float32; and what LoRA costs the optimizer."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx, traverse_util
from helpers import exported_params, random_ids, to_numpy, torch_model

from ettin_jax import ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification, sharding
from ettin_jax.config import ModernBertDecoderConfig
from ettin_jax.train.lora import TRAINABLE, LoraConfig, LoraError, apply_lora, load_adapter, merged, save_adapter

KINDS = {
    "causal": (ModernBertDecoderForCausalLM, transformers.AutoModelForCausalLM, {}),
    "classify": (ModernBertDecoderForSequenceClassification, transformers.AutoModelForSequenceClassification,
                 {"num_labels": 3}),
}  # fmt: skip
# alpha / rank = 2, so a missing scale shows; the dropout is off when deterministic, as in PEFT's eval mode.
CONFIG = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
IDS = random_ids(2, 10, seed=1)


@dataclasses.dataclass
class Adapted:
    kind: str
    base: str  # the base checkpoint (transformers layout)
    model: nnx.Module  # ours with LoRA, every A, B (and head) random
    adapter: str  # save_adapter's directory

    def fresh(self) -> nnx.Module:
        return KINDS[self.kind][0].from_pretrained(self.base)

    def torch_base(self) -> torch.nn.Module:
        return KINDS[self.kind][1].from_pretrained(self.base).eval()


def logits(model: nnx.Module, ids: np.ndarray = IDS) -> np.ndarray:
    return to_numpy(model(ids).logits)


def torch_logits(model: torch.nn.Module, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(model(torch.tensor(ids, dtype=torch.long)).logits)


def randomize(model: nnx.Module, seed: int = 0) -> None:
    """Every trained param (A, B and a classifier's head) moved by noise, so B is not zero and the
    head not the base checkpoint's: an adapter part that is lost or misplaced changes the logits."""
    state = nnx.state(model, TRAINABLE)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))


@pytest.fixture(scope="module", params=list(KINDS))
def adapted(request, tmp_path_factory) -> Adapted:
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    base, adapter = str(root / "base"), str(root / "adapter")
    torch_model(kind, **KINDS[kind][2]).save_pretrained(base)
    model = apply_lora(KINDS[kind][0].from_pretrained(base), CONFIG, seed=0)
    randomize(model)
    save_adapter(model, adapter, base_model=base)
    return Adapted(kind, base, model, adapter)


def test_peft_loads_the_adapter(adapted):
    reference = peft.PeftModel.from_pretrained(adapted.torch_base(), adapted.adapter).eval()
    ours = logits(adapted.model)
    np.testing.assert_allclose(ours, torch_logits(reference), atol=1e-5, rtol=0)
    assert np.abs(ours - torch_logits(adapted.torch_base())).max() > 1e-2  # the adapter does change the model


def test_merged_export_loads_in_transformers(adapted, tmp_path):
    merged(adapted.model).save_pretrained(tmp_path)
    assert exported_params(str(tmp_path)).keys() == exported_params(adapted.base).keys()  # no LoRA tensors
    reference = torch_logits(KINDS[adapted.kind][1].from_pretrained(tmp_path).eval())
    ours = logits(adapted.model)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def test_load_adapter_reads_ours_and_peft(adapted, tmp_path):
    expected = logits(adapted.model)
    np.testing.assert_allclose(logits(load_adapter(adapted.fresh(), adapted.adapter)), expected, atol=1e-6, rtol=0)
    # PEFT's own save: its full adapter_config.json, modules_to_save with "score" added.
    peft.PeftModel.from_pretrained(adapted.torch_base(), adapted.adapter).save_pretrained(tmp_path)
    np.testing.assert_allclose(logits(load_adapter(adapted.fresh(), tmp_path)), expected, atol=1e-5, rtol=0)


def test_only_the_adapter_and_a_classifiers_head_train(adapted):
    """jax.grad over the trainable part alone: LoRA's A and B, plus `head` and `classifier`."""
    graphdef, trainable, frozen, rest = nnx.split(adapted.model, TRAINABLE, nnx.Param, ...)
    paths = traverse_util.flatten_dict(nnx.to_pure_dict(trainable))
    heads = {p[0] for p in paths} - {"model"}
    assert heads == ({"head", "classifier"} if adapted.kind == "classify" else set())
    assert all(p[-2] == "lora" for p in paths if p[0] == "model")
    assert len([p for p in paths if p[-1] == "lora_b"]) == 6 * 4  # six Linears in each of four layers
    assert not any(p[-2] == "lora" for p in traverse_util.flatten_dict(nnx.to_pure_dict(frozen)))

    def loss(trainable):
        return jnp.sum(nnx.merge(graphdef, trainable, frozen, rest)(IDS).logits ** 2)

    grads = traverse_util.flatten_dict(nnx.to_pure_dict(jax.jit(jax.grad(loss))(trainable)))
    assert grads.keys() == paths.keys()
    assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())


def test_dropout_only_in_training(adapted):
    model = apply_lora(adapted.fresh(), dataclasses.replace(CONFIG, dropout=0.5))
    randomize(model)
    expected = logits(merged(model))  # W x + (alpha / r) B A x
    np.testing.assert_allclose(logits(model), expected, atol=1e-5, rtol=0)
    training = nnx.view(model, deterministic=False, raise_if_not_found=False)
    assert np.abs(to_numpy(training(IDS, deterministic=False).logits) - expected).max() > 1e-3
    np.testing.assert_allclose(logits(model), expected, atol=1e-5, rtol=0)  # the view left the model as it was


def test_targets_that_match_nothing_name_what_could_match(adapted):
    with pytest.raises(LoraError, match=r"matches no Linear layer") as e:
        apply_lora(adapted.fresh(), LoraConfig(rank=4, targets=r"model\.layers\.\d+\.attn\.Wqkv"))
    assert r"model\.layers\.\d+\.attn\.Wqkv" in str(e.value)
    assert "model.layers.0.attn.q_proj" in str(e.value) and "model.layers.0.mlp.Wi" in str(e.value)


def test_save_adapter_replaces_a_directory_only_when_asked(adapted, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LoraError, match="not empty"):
        save_adapter(adapted.model, tmp_path, base_model=adapted.base)
    assert os.listdir(tmp_path) == ["notes.txt"]
    save_adapter(adapted.model, tmp_path, base_model=adapted.base, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_adapter_on_a_sharded_model(adapted):
    mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    model = load_adapter(sharding.shard_model(adapted.fresh(), mesh), adapted.adapter)
    for path, x in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
        assert x.sharding == sharding.param_sharding(path, x.shape, mesh)  # LoRA's A and B: replicated
    with sharding.activate(mesh):
        sharded = jax.jit(lambda m, b: m(**b).logits)(model, sharding.put_batch({"input_ids": IDS}, mesh))
    np.testing.assert_allclose(np.asarray(sharded), logits(adapted.model), atol=1e-5, rtol=0)


def test_lora_optimizer_state_is_a_small_part_of_full_fine_tuning():
    """Ettin-150m, counted abstractly: AdamW's moments over LoRA rank 8 on the default targets,
    against AdamW's over every base param (the LoRA model's base params are the plain model's)."""
    config = ModernBertDecoderConfig.ettin("150m")
    model = nnx.eval_shape(lambda: apply_lora(ModernBertDecoderForCausalLM(config), LoraConfig(rank=8)))

    def adamw_elements(trained: nnx.filterlib.Filter) -> int:
        params = nnx.to_pure_dict(nnx.state(model, trained))
        return sum(x.size for x in jax.tree.leaves(jax.eval_shape(optax.adamw(1e-4).init, params)))

    fraction = adamw_elements(TRAINABLE) / adamw_elements(nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    print(f"AdamW state of LoRA r=8 / of full fine-tuning, Ettin-150m: {fraction:.2%}")
    assert fraction < 0.05
