"""Loading every checkpoint layout, saving both formats, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import TINY, random_ids, to_numpy
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import ettin_jax as ej
from ettin_jax.convert import CheckpointError, CheckpointFormatError, architecture
from ettin_jax.convert.checkpoint import read_flax

TOL = 1e-4


def logits_of(model, ids) -> np.ndarray:
    return np.asarray(model(ids).logits)


def reference_logits(torch_model, ids) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(torch_model(torch.tensor(ids, dtype=torch.long)).logits)


def params_equal(a, b) -> bool:
    left, right = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    return len(left) == len(right) and all(
        x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(left, right, strict=True)
    )


# ---- layouts ------------------------------------------------------------------------------
def as_sharded(torch_model, directory):
    torch_model.save_pretrained(directory, max_shard_size="100KB")
    assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))


def as_bin(torch_model, directory):
    os.makedirs(directory)
    torch_model.config.save_pretrained(directory)
    torch.save(torch_model.state_dict(), os.path.join(directory, "pytorch_model.bin"))


def as_bf16(torch_model, directory):
    torch_model.to(torch.bfloat16).save_pretrained(directory)
    torch_model.to(torch.float32)


@pytest.mark.parametrize("layout", [as_sharded, as_bin], ids=["sharded_safetensors", "pytorch_bin"])
def test_loads_every_layout(tmp_path, saved, layout):
    torch_model, _ = saved("causal", tie_word_embeddings=False)
    directory = str(tmp_path / "ckpt")
    layout(torch_model, directory)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids = random_ids(2, 9)
    np.testing.assert_allclose(logits_of(model, ids), reference_logits(torch_model, ids), atol=TOL)


def test_bfloat16_checkpoint_loads_exactly(tmp_path, saved):
    torch_model, _ = saved("causal")
    directory = str(tmp_path / "bf16")
    as_bf16(torch_model, directory)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory, param_dtype=jnp.bfloat16)
    want = torch_model.to(torch.bfloat16).model.layers[1].attn.q_proj.weight.detach().float().numpy().T
    got = np.asarray(model.model.layers[1].attn.q_proj.kernel[...]).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_safetensors_read_without_torch(saved, monkeypatch):
    _, directory = saved("causal")
    monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch now fails
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    assert model.num_parameters() > 0


def test_hub_repo_id_is_downloaded_with_huggingface_hub(saved):
    _, directory = saved("causal")
    with mock.patch("huggingface_hub.snapshot_download", return_value=directory) as download:
        model = ej.ModernBertDecoderForCausalLM.from_pretrained("jhu-clsp/ettin-decoder-17m", revision="v1")
    assert download.call_args.args == ("jhu-clsp/ettin-decoder-17m",)
    assert download.call_args.kwargs["revision"] == "v1"
    assert "*.safetensors" in download.call_args.kwargs["allow_patterns"]
    assert model.config.num_hidden_layers == 4


def test_hub_failure_is_a_clear_error():
    with (
        mock.patch("huggingface_hub.snapshot_download", side_effect=RuntimeError("offline")),
        pytest.raises(OSError, match=r"'someone/missing' is not a local directory.*offline"),
    ):
        ej.ModernBertDecoderForCausalLM.from_pretrained("someone/missing")


def test_config_overrides_reach_the_model(saved):
    _, directory = saved("causal")
    model = ej.ModernBertDecoderForSequenceClassification.from_pretrained(
        directory, num_labels=3, problem_type="multi_label_classification", id2label={0: "a", 1: "b", 2: "c"}
    )
    assert model.config.num_labels == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.classifier.kernel.shape == (64, 3)


# ---- saving -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal", "classify"])
@pytest.mark.parametrize("tied", [True, False])
def test_saved_transformers_checkpoint_loads_in_transformers(tmp_path, saved, kind, tied):
    cls = {"causal": ej.ModernBertDecoderForCausalLM, "classify": ej.ModernBertDecoderForSequenceClassification}[kind]
    torch_model, directory = saved(kind, tie_word_embeddings=tied, num_labels=3)
    model = cls.from_pretrained(directory)
    out = tmp_path / "out"
    model.save_pretrained(out)
    reloaded, info = type(torch_model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = random_ids(2, 9)
    with torch.no_grad():
        theirs = to_numpy(reloaded.eval()(torch.tensor(ids, dtype=torch.long)).logits)
    np.testing.assert_allclose(logits_of(model, ids), theirs, atol=TOL)
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary files left


def test_flax_format_round_trip_without_transposes(tmp_path, saved):
    _, directory = saved("causal", tie_word_embeddings=False)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "flax", format="flax")
    assert os.path.isdir(tmp_path / "flax" / "flax_params")
    stored = read_flax(str(tmp_path / "flax"))
    kernel = stored[("model", "layers", 0, "mlp", "Wi", "kernel")]
    assert kernel.shape == (64, 2 * 96)  # (in, out): our layout, not PyTorch's
    reloaded = ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path / "flax")
    assert params_equal(model, reloaded)


def test_transformers_to_flax_to_transformers_is_bit_identical(tmp_path, saved):
    _, directory = saved("causal", attention_bias=True, norm_bias=True)
    ej.ModernBertDecoderForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "flax", format="flax")
    ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path / "flax").save_pretrained(tmp_path / "back")
    with (
        safe_open(os.path.join(directory, "model.safetensors"), framework="numpy") as original,
        safe_open(tmp_path / "back" / "model.safetensors", framework="numpy") as final,
    ):
        keys = set(original.keys())
        assert keys == set(final.keys())
        for key in keys:
            assert original.get_slice(key).get_dtype() == final.get_slice(key).get_dtype()
            np.testing.assert_array_equal(original.get_tensor(key), final.get_tensor(key), err_msg=key)


def test_flax_checkpoint_restores_into_the_mesh_shardings(tmp_path, saved):
    _, directory = saved("causal", tie_word_embeddings=False)
    plain = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    plain.save_pretrained(tmp_path / "flax", format="flax")
    mesh = ej.sharding.make_mesh(data=2, fsdp=2, tensor=2)
    # One device's part of the (64, 192) kernel, split over fsdp x tensor: orbax restored it
    # onto that device, and the read hands over the shard as it is.
    kernel = read_flax(str(tmp_path / "flax"), mesh)[("model", "layers", 0, "mlp", "Wi", "kernel")]
    part = kernel.read((slice(32, 64), slice(0, 96)))
    assert len(part.devices()) == 1
    np.testing.assert_array_equal(np.asarray(part), np.asarray(plain.model.layers[0].mlp.Wi.kernel[...])[32:, :96])
    sharded = ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path / "flax", mesh=mesh)
    assert sharded.model.layers[0].mlp.Wi.kernel.sharding.spec == P("fsdp", "tensor")
    assert params_equal(sharded, plain)


@pytest.mark.parametrize("target", ["causal", "base"])
def test_base_model_checkpoint_loads(saved, target):
    torch_base, directory = saved("base")
    ids = random_ids(2, 9)
    with torch.no_grad():
        hidden = to_numpy(torch_base(torch.tensor(ids, dtype=torch.long)).last_hidden_state)
    if target == "base":
        model = ej.ModernBertDecoderModel.from_pretrained(directory)
        np.testing.assert_allclose(np.asarray(model(ids).last_hidden_state), hidden, atol=TOL)
    else:
        with pytest.warns(UserWarning, match=r"newly initialised.*decoder\.bias.*lm_head\.dense\.weight"):
            model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
        np.testing.assert_allclose(np.asarray(model.model(ids).last_hidden_state), hidden, atol=TOL)


@pytest.mark.parametrize("first", ["sharded", "flax", "transformers"])
@pytest.mark.parametrize("second", ["flax", "transformers"])
def test_saving_over_another_checkpoint_replaces_it(tmp_path, saved, first, second):
    old, _ = saved("causal", seed=0)
    _, new_directory = saved("causal", seed=1)
    target = tmp_path / "target"
    if first == "sharded":
        as_sharded(old, target)
    else:
        old.save_pretrained(target)
        if first == "flax":
            ej.ModernBertDecoderForCausalLM.from_pretrained(target).save_pretrained(target, format="flax")
    new = ej.ModernBertDecoderForCausalLM.from_pretrained(new_directory)
    new.save_pretrained(target, format=second)
    assert params_equal(ej.ModernBertDecoderForCausalLM.from_pretrained(target), new)
    assert not any(name.startswith("model-0") for name in os.listdir(target))


def test_misspelt_override_is_an_error(saved):
    _, directory = saved("causal")
    with pytest.raises(ej.ConfigError, match=r"unknown config field.*num_labes"):
        ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory, num_labes=3)


def test_unknown_save_format_is_an_error(tmp_path):
    model = ej.ModernBertDecoderForCausalLM(ej.ModernBertDecoderConfig(**TINY))
    with pytest.raises(ValueError, match="format must be 'transformers' or 'flax'"):
        model.save_pretrained(tmp_path, format="onnx")


# ---- new heads ----------------------------------------------------------------------------
def test_classifier_from_causal_lm_checkpoint_gets_a_new_head(saved):
    torch_model, directory = saved("causal")
    with pytest.warns(UserWarning, match=r"newly initialised.*classifier\.weight.*head\.dense\.weight"):
        model = ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory, num_labels=5)
    np.testing.assert_array_equal(
        np.asarray(model.model.layers[2].mlp.Wo.kernel[...]),
        torch_model.model.layers[2].mlp.Wo.weight.detach().numpy().T,
    )
    # As transformers initialises it: classifier std hidden**-0.5, head.dense std
    # initializer_range / sqrt(2 * layers), both truncated at 2 std; norm scale 1.
    classifier = np.asarray(model.classifier.kernel[...])
    assert classifier.shape == (64, 5)
    assert 0.6 * 64**-0.5 < classifier.std() < 1.1 * 64**-0.5
    assert np.abs(classifier).max() <= 2 * 64**-0.5
    dense = np.asarray(model.head.dense.kernel[...])
    assert 0.6 * 0.02 / np.sqrt(8) < dense.std() < 1.1 * 0.02 / np.sqrt(8)
    np.testing.assert_array_equal(np.asarray(model.head.norm.scale[...]), np.ones(64, np.float32))
    assert model(random_ids(2, 9)).logits.shape == (2, 5)


def test_partial_head_is_an_error_not_a_new_head(tmp_path, saved):
    torch_model, _ = saved("classify")
    state = {k: v for k, v in torch_model.state_dict().items() if k != "classifier.weight"}
    directory = tmp_path / "partial"
    torch_model.save_pretrained(directory, state_dict=state)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: classifier\.weight"):
        ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory)


# ---- bad checkpoints ----------------------------------------------------------------------
def rewrite(directory: str, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    _, directory = saved("causal")
    rewrite(directory, lambda t: t.pop("model.layers.2.attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.layers\.2\.attn\.k_proj\.weight"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


def test_unexpected_key_is_named(saved):
    _, directory = saved("causal")
    rewrite(directory, lambda t: t.update({"model.layers.0.attn_norm.weight": np.ones(64, np.float32)}))
    with pytest.raises(
        CheckpointError, match=r"not in ModernBertDecoderForCausalLM.*model\.layers\.0\.attn_norm\.weight"
    ):
        ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


def test_wrong_shape_is_named_in_checkpoint_layout(saved):
    _, directory = saved("causal")
    rewrite(directory, lambda t: t.update({"model.layers.1.mlp.Wi.weight": np.zeros((100, 64), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.1\.mlp\.Wi\.weight has shape \(100, 64\) but the config expects \(192, 64\)",
    ):
        ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


def test_wrong_model_type(saved):
    _, directory = saved("causal")
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model_type"] = "llama"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ej.ConfigError, match="model_type is 'llama'"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data[:5], "too short"),
        (lambda data: b"\xff" * 16 + data[16:], "header length"),
        (lambda data: data[:8] + b"{not json" + data[17:], "not valid JSON"),
    ],
    ids=["truncated", "tiny", "bad_length", "bad_header"],
)
def test_corrupt_safetensors_is_a_clear_error(saved, damage, message):
    _, directory = saved("causal")
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(CheckpointFormatError, match=message) as error:
        ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    assert "model.safetensors" in str(error.value)


def test_missing_shard_is_named(tmp_path, saved):
    torch_model, _ = saved("causal")
    as_sharded(torch_model, tmp_path / "s")
    os.remove(tmp_path / "s" / "model-00003-of-00007.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00007\.safetensors"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path / "s")


class NotATensor:
    pass


def test_pickled_objects_in_bin_are_refused(tmp_path, saved):
    torch_model, _ = saved("causal")
    as_bin(torch_model, str(tmp_path / "bin"))
    torch.save({"payload": NotATensor()}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="cannot read the PyTorch checkpoint safely"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path / "bin")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (None, "ModernBertDecoderForCausalLM"),
        (["ModernBertDecoderForSequenceClassification"], "ModernBertDecoderForSequenceClassification"),
        (["LlamaForCausalLM"], CheckpointError),
    ],
    ids=["default", "named", "unknown"],
)
def test_architecture_names_one_of_our_classes(tmp_path, names, expected):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": names} if names else {}))
    if expected is CheckpointError:
        with pytest.raises(CheckpointError, match=r"names architectures \['LlamaForCausalLM'\]"):
            architecture(str(tmp_path))
    else:
        assert architecture(str(tmp_path)) == expected


def test_directory_without_weights(tmp_path):
    transformers.ModernBertDecoderConfig().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path)
