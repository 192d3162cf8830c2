"""Hostile checkpoints: corrupt, truncated or lying safetensors, pickles that are not weights,
NaN and inf weights, integers where floats belong, misshapen and missing tensors, and
config.json files that are not what they claim. Each is an error of the right type whose
message names the file and the tensor or field; none loads as something else, and none runs
code. `allow_nonfinite=True` (`--allow-nonfinite`) loads NaN weights on purpose, with a warning."""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
import torch
from helpers import torch_model
from safetensors.numpy import load_file, save_file

import ettin_jax as ej
from ettin_jax import cli
from ettin_jax.convert import CheckpointError, CheckpointFormatError

LM = ej.ModernBertDecoderForCausalLM
WO = "model.layers.1.mlp.Wo.weight"  # (64, 96) in the file; our kernel is (96, 64)
WI = "model.layers.0.mlp.Wi.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny causal LM in transformers' safetensors layout (and its state dict), saved once."""
    model = torch_model("causal", num_hidden_layers=2)
    directory = tmp_path_factory.mktemp("pristine") / "lm"
    model.save_pretrained(directory)
    return directory, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A fresh copy of the pristine checkpoint, to damage."""
    directory = tmp_path / "lm"
    shutil.copytree(pristine[0], directory)
    return directory


def rewrite(directory, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def poke(key: str, value: float, where=(3, 5)):
    def edit(tensors):
        tensors[key] = tensors[key].copy()
        tensors[key][where] = value

    return edit


def split(directory):
    """(header dict, the bytes after it) of model.safetensors."""
    data = (directory / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(directory, header, body) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)


# ---- damaged safetensors -------------------------------------------------------------------
def _garbage(d):
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _empty(d):
    (d / "model.safetensors").write_bytes(b"")


def _header_shape_lie(d):
    header, body = split(d)
    header[WI]["shape"] = [192, 32]  # half the bytes its offsets span
    join(d, header, body)


def _header_dtype_unknown(d):
    header, body = split(d)
    header[WI]["dtype"] = "Q7"
    join(d, header, body)


def _header_offsets_past_end(d):
    header, body = split(d)
    begin, end = header[WI]["data_offsets"]
    header[WI]["data_offsets"] = [begin + len(body), end + len(body)]
    join(d, header, body)


def _header_offsets_backwards(d):
    header, body = split(d)
    begin, end = header[WI]["data_offsets"]
    header[WI]["data_offsets"] = [end, begin]
    join(d, header, body)


def _header_not_an_object(d):
    text = b"[1, 2, 3]     "
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_garbage, "model.safetensors: header length"),
        (_truncated, "(truncated)"),
        (_empty, "too short to be a safetensors file (0 bytes)"),
        (_header_shape_lie, f"tensor '{WI}' has shape (192, 32) of F32 (24576 bytes) but the header gives it 49152"),
        (_header_dtype_unknown, f"tensor '{WI}' has dtype 'Q7', which ettin-jax cannot read"),
        (_header_offsets_past_end, f"tensor '{WI}' ends at byte"),
        (_header_offsets_backwards, f"tensor '{WI}' has an impossible header entry"),
        (_header_not_an_object, "the safetensors header is not a JSON object"),
    ],
    ids=["garbage", "truncated", "empty", "shape_lie", "dtype_unknown", "past_end", "backwards", "header_list"],
)
def test_damaged_safetensors(ckpt, damage, message):
    damage(ckpt)
    with pytest.raises(CheckpointFormatError) as error:
        LM.from_pretrained(ckpt)
    assert message in str(error.value)
    assert str(ckpt / "model.safetensors") in str(error.value)


# ---- values --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "counts"),
    [(np.nan, "1 NaN and 0 inf of its 6144 values"), (-np.inf, "0 NaN and 1 inf")],
    ids=["nan", "inf"],
)
def test_nonfinite_weight_is_named(ckpt, value, counts):
    rewrite(ckpt, poke(WO, value))
    with pytest.raises(CheckpointError) as error:
        LM.from_pretrained(ckpt)
    message = str(error.value)
    assert message.startswith(f"{WO} holds non-finite values ({counts}")
    assert str(ckpt / "model.safetensors") in message and "allow_nonfinite=True" in message


def test_first_nonfinite_tensor_is_the_one_named(ckpt):
    def edit(tensors):
        for key in (WO, "model.final_norm.weight"):
            tensors[key] = np.full_like(tensors[key], np.nan)

    rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"^model\.final_norm\.weight holds non-finite values"):
        LM.from_pretrained(ckpt)  # final_norm comes first in the order tensors are read


def test_too_large_for_bfloat16_is_inf_there(ckpt):
    """Finite in the file (float32's largest), inf once in bfloat16: the check is on what the model gets."""
    rewrite(ckpt, poke(WO, np.finfo(np.float32).max))
    assert LM.from_pretrained(ckpt).num_parameters() > 0
    with pytest.raises(CheckpointError, match=rf"^{WO} holds non-finite values \(0 NaN and 1 inf"):
        LM.from_pretrained(ckpt, param_dtype=jax.numpy.bfloat16)


def test_allow_nonfinite_loads_with_a_warning(ckpt):
    rewrite(ckpt, poke(WO, np.nan))
    with pytest.warns(UserWarning, match=rf"loaded 1 checkpoint tensor\(s\) holding NaN or inf.*{WO}: 1 NaN"):
        model = LM.from_pretrained(ckpt, allow_nonfinite=True)
    kernel = np.asarray(model.model.layers[1].mlp.Wo.kernel[...])
    assert np.isnan(kernel[5, 3]) and np.isfinite(np.delete(kernel.ravel(), 5 * 64 + 3)).all()


def test_nonfinite_in_a_sharded_load_is_named(ckpt):
    rewrite(ckpt, poke(WI, np.inf))
    mesh = ej.sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(CheckpointError, match=rf"^{WI} holds non-finite values \(0 NaN and 1 inf of its \d+ values"):
        LM.from_pretrained(ckpt, mesh=mesh)


def test_nonfinite_in_a_flax_checkpoint_is_named(ckpt, tmp_path):
    rewrite(ckpt, poke(WO, np.nan))
    with pytest.warns(UserWarning, match="holding NaN or inf"):
        LM.from_pretrained(ckpt, allow_nonfinite=True).save_pretrained(tmp_path / "flax", format="flax")
    with pytest.raises(CheckpointError) as error:
        LM.from_pretrained(tmp_path / "flax")
    assert str(error.value).startswith("model/layers/1/mlp/Wo/kernel holds non-finite values (1 NaN")
    assert "flax_params" in str(error.value)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.bool_])
def test_integers_where_floats_belong(ckpt, dtype):
    rewrite(ckpt, lambda t: t.update({WO: np.ones((64, 96), dtype)}))
    with pytest.raises(CheckpointError) as error:
        LM.from_pretrained(ckpt)
    assert f"{WO} (in {ckpt / 'model.safetensors'}) is stored as {np.dtype(dtype).name}" in str(error.value)
    assert "the model expects float32" in str(error.value)


def test_header_dtype_lie_int32_is_refused(ckpt):
    header, body = split(ckpt)
    header[WI]["dtype"] = "I32"  # same size as F32: the bytes read, as integers
    join(ckpt, header, body)
    with pytest.raises(CheckpointError, match=rf"{WI} .*is stored as int32 but the model expects float32"):
        LM.from_pretrained(ckpt)


# ---- shapes and keys -----------------------------------------------------------------------
def test_misshapen_tensor_names_key_and_shapes(ckpt):
    rewrite(ckpt, lambda t: t.update({WO: np.zeros((64, 95), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{WO} has shape \(64, 95\) but the config expects \(64, 96\)"):
        LM.from_pretrained(ckpt)


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.layers\.1\.attn\.q_proj\.weight"):
        LM.from_pretrained(ckpt)


# ---- PyTorch .bin: weights only, never code ------------------------------------------------
class Payload:
    """Unpickled with weights_only=False, this would create a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_bin(ckpt, content) -> None:
    os.remove(ckpt / "model.safetensors")
    if isinstance(content, bytes):
        (ckpt / "pytorch_model.bin").write_bytes(content)
    else:
        torch.save(content, ckpt / "pytorch_model.bin")


def test_malicious_pickle_does_not_run(ckpt, pristine, tmp_path):
    Payload.marker = str(tmp_path / "pwned")
    _as_bin(ckpt, {**pristine[1], "lm_head.dense.weight": Payload()})
    with pytest.raises(CheckpointFormatError) as error:
        LM.from_pretrained(ckpt)
    message = str(error.value)
    assert message.startswith(f"{ckpt / 'pytorch_model.bin'}: cannot read the PyTorch checkpoint safely")
    assert "GLOBAL posix.system" in message and "weights_only=True" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x02not really a pickle" + bytes(range(256)), "cannot read the PyTorch checkpoint"),
        ("truncated", "the file is damaged or truncated"),
        ([torch.zeros(3)], "expected a dict of tensors, found list"),
        ({"model.final_norm.weight": "not a tensor"}, "entry 'model.final_norm.weight' is a str, not a tensor"),
    ],
    ids=["garbage", "truncated", "list", "string_entry"],
)
def test_bad_bin(ckpt, pristine, content, message):
    if content == "truncated":
        torch.save(pristine[1], ckpt / "whole.bin")
        content = (ckpt / "whole.bin").read_bytes()[:5000]
    _as_bin(ckpt, content)
    with pytest.raises(CheckpointFormatError) as error:
        LM.from_pretrained(ckpt)
    assert message in str(error.value) and "pytorch_model.bin" in str(error.value)


def test_bin_with_nan_is_named(ckpt, pristine):
    state = dict(pristine[1])
    state[WI] = state[WI].clone()
    state[WI][7, 1] = float("nan")
    _as_bin(ckpt, state)
    with pytest.raises(CheckpointError, match=rf"^{WI} holds non-finite values \(1 NaN and 0 inf.*pytorch_model\.bin"):
        LM.from_pretrained(ckpt)


# ---- config.json ---------------------------------------------------------------------------
def _config(ckpt, edit) -> None:
    path = ckpt / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda d: [d], ej.ConfigError, "config.json holds a JSON list, not an object of config fields"),
        (lambda d: "config", ej.ConfigError, "config.json holds a JSON string, not an object"),
        (lambda d: {**d, "hidden_size": "64"}, ej.ConfigError, "config.json: hidden_size must be an integer, got '64'"),
        (lambda d: {**d, "num_hidden_layers": 2.5}, ej.ConfigError, "num_hidden_layers must be an integer, got 2.5"),
        (lambda d: {**d, "norm_eps": "1e-5"}, ej.ConfigError, "config.json: norm_eps must be a number, got '1e-5'"),
        (lambda d: {**d, "tie_word_embeddings": "yes"}, ej.ConfigError, "tie_word_embeddings must be true or false"),
        (lambda d: {**d, "layer_types": "full_attention"}, ej.ConfigError, "layer_types must be a list of strings"),
        (lambda d: {**d, "eos_token_id": [2, "eos"]}, ej.ConfigError, "eos_token_id must be an integer or a list"),
        (lambda d: {**d, "rope_parameters": [160000]}, ej.ConfigError, "rope_parameters must be an object, got [160000]"),
        (lambda d: {**d, "rope_parameters": {"full_attention": {"rope_theta": "big"}}}, ej.ConfigError,
         "rope_parameters['full_attention']['rope_theta'] must be a number, got 'big'"),
        (lambda d: {**d, "id2label": {"zero": "a"}}, ej.ConfigError, "id2label keys must be label ids"),
        (lambda d: {**d, "hidden_size": -64}, ej.ConfigError, "config.json: hidden_size must be a positive integer"),
    ],
    ids=["list", "string", "hidden_size_string", "layers_float", "norm_eps_string", "bool_string", "layer_types_string",
         "eos_mixed", "rope_list", "rope_theta_string", "id2label_keys", "hidden_size_negative"],
)  # fmt: skip
def test_bad_config_json(ckpt, edit, error, message):
    _config(ckpt, edit)
    with pytest.raises(error) as raised:
        LM.from_pretrained(ckpt)
    assert message in str(raised.value)
    assert str(ckpt / "config.json") in str(raised.value)


def test_config_json_missing(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no config\.json at .*lm/config\.json"):
        LM.from_pretrained(ckpt)


def test_config_json_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(ej.ConfigError, match=r"config\.json is not UTF-8 text"):
        LM.from_pretrained(ckpt)


def test_config_json_architectures_not_a_list(ckpt):
    _config(ckpt, lambda d: {**d, "architectures": "ModernBertDecoderForCausalLM"})
    with pytest.raises(CheckpointFormatError, match=r"config\.json: architectures must be a list of class names"):
        ej.convert.architecture(str(ckpt))


# ---- the command line ----------------------------------------------------------------------
def test_convert_refuses_nan_and_allow_nonfinite_converts(ckpt, tmp_path, capsys):
    rewrite(ckpt, poke(WO, np.nan))
    assert cli.main(["convert", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {WO} holds non-finite values (1 NaN")
    assert "--allow-nonfinite" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    with pytest.warns(UserWarning, match=rf"{WO}: 1 NaN"):
        assert cli.main(["convert", str(ckpt), str(tmp_path / "out"), "--allow-nonfinite"]) == 0
    with pytest.warns(UserWarning, match="holding NaN or inf"):
        model = LM.from_pretrained(tmp_path / "out", allow_nonfinite=True)
    assert np.isnan(np.asarray(model.model.layers[1].mlp.Wo.kernel[...])).sum() == 1


def test_cli_bad_config_is_one_line(ckpt, tmp_path, capsys):
    _config(ckpt, lambda d: {**d, "hidden_size": "64"})
    assert cli.main(["convert", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {ckpt / 'config.json'}: hidden_size must be an integer, got '64' (a JSON string)"
    assert [line for line in err if line.startswith("error")] == err[-1:] and err[0].startswith("reading ")
