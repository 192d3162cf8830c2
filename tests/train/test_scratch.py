"""`ettin-jax train lm --config SHAPE --tokenizer DIR`: causal-LM training from random weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import transformers
from helpers import TINY, exported_params, run_records
from textdata import FILLER, word_tokenizer, write_rows, xor_rows

import ettin_jax as ej
from ettin_jax.train import TrainArgs, TrainingError, train
from ettin_jax.train.trainer import prepare


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A word-level tokenizer directory, a tiny config.json and a text file."""
    root = tmp_path_factory.mktemp("scratch-inputs")
    word_tokenizer().save_pretrained(root / "tokenizer")
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps({"model_type": "modernbert-decoder", **TINY}))
    texts = [{"text": r["text"]} for r in xor_rows(256, seed=0)]
    return {
        "tokenizer": str(root / "tokenizer"),
        "config": str(root / "config" / "config.json"),
        "train_file": write_rows(root / "train.csv", texts),
    }


def _args(inputs, tmp_path, **changes) -> TrainArgs:
    defaults = dict(
        task="lm", output_dir=str(tmp_path / "out"), max_steps=24, batch_size=8, block_size=16,
        learning_rate=3e-3, warmup_ratio=0.1, schedule="cosine", save_steps=8, log_steps=4, progress=False,
        **inputs,
    )  # fmt: skip
    return TrainArgs(**{**defaults, **changes})


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted run from scratch: (args, final params)."""
    args = _args(inputs, tmp_path_factory.mktemp("scratch-reference"))
    summary = train(args)
    assert summary["status"] == "finished" and summary["step"] == 24
    return args, exported_params(os.path.join(args.output_dir, "final"))


def test_learns_from_random_weights_and_exports_a_transformers_model(reference):
    args, _ = reference
    losses = [r["loss"] for r in run_records(args.output_dir)]
    # From about uniform over the 128 rows to below uniform over the 40 filler words (most tokens).
    assert losses[0] > 0.9 * np.log(TINY["vocab_size"]) and losses[-1] < np.log(len(FILLER))
    final = os.path.join(args.output_dir, "final")
    with open(os.path.join(final, "config.json")) as f:
        config = json.load(f)
    assert (config["vocab_size"], config["hidden_size"], config["bos_token_id"]) == (TINY["vocab_size"], 64, 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)  # the --tokenizer, saved beside it
    assert tokenizer.get_vocab() == word_tokenizer().get_vocab()
    ids = np.array([[1, *tokenizer("alpha w3 w7 red", add_special_tokens=False)["input_ids"]]])
    reference_model = transformers.ModernBertDecoderForCausalLM.from_pretrained(final).eval()
    ours = ej.ModernBertDecoderForCausalLM.from_pretrained(final)
    import torch

    with torch.no_grad():
        expected = reference_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids).logits), expected, atol=1e-4)


def test_the_seed_decides_the_initial_weights(inputs, tmp_path):
    first = prepare(_args(inputs, tmp_path / "a")).model
    again = prepare(_args(inputs, tmp_path / "b")).model
    other = prepare(_args(inputs, tmp_path / "c", seed=1)).model
    weight = [np.asarray(m.model.embeddings.tok_embeddings.embedding[...]) for m in (first, again, other)]
    assert np.array_equal(weight[0], weight[1]) and not np.allclose(weight[0], weight[2])


def test_a_stopped_run_resumes_to_identical_params(inputs, tmp_path, reference):
    _, expected = reference

    def crash(step, _metrics):
        if step == 13:
            raise KeyboardInterrupt

    args = _args(inputs, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(args, on_step=crash)
    with open(os.path.join(args.output_dir, "run.json")) as f:
        saved = json.load(f)
    assert saved["config"] == inputs["config"] and saved["tokenizer"] == inputs["tokenizer"]
    args.resume = True
    assert train(args)["step"] == 24
    params = exported_params(os.path.join(args.output_dir, "final"))
    assert params.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(params[name], expected[name], err_msg=name)
    changed = _args(inputs, tmp_path, resume=True, seed=1)
    with pytest.raises(TrainingError, match=r"different run.*seed: 0 -> 1"):
        train(changed)


def test_an_ettin_size_takes_its_vocabulary_and_special_ids_from_the_tokenizer(inputs, tmp_path):
    config = prepare(_args(inputs, tmp_path, config="17m")).model.config
    assert (config.num_hidden_layers, config.hidden_size) == (7, 256)
    assert config.vocab_size == 64  # len(WORDS) rounded up to a multiple of 64
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer": None}, r"--config \(training from scratch\) needs --tokenizer"),
        ({"model": "some/model"}, "--config trains from scratch and --model starts from a checkpoint"),
        ({"task": "classify"}, "--config .* belongs to `train lm`"),
        ({"config": "5m"}, "--config 5m is neither an Ettin size .* nor a config.json"),
        ({"tokenizer": "no-such-dir"}, "--tokenizer no-such-dir is not a directory"),
        ({"small_vocab": True}, r"--config .* has vocab_size 32, smaller than the 56 tokens of --tokenizer"),
        ({"bad_bos": True}, r"--config .* has bos_token_id 200, outside its vocabulary of 128"),
    ],
)
def test_mistakes_name_the_flag_and_write_nothing(inputs, tmp_path, changes, message):
    changes = dict(changes)
    for key, field, value in (("small_vocab", "vocab_size", 32), ("bad_bos", "bos_token_id", 200)):
        if changes.pop(key, False):
            path = tmp_path / "config.json"
            path.write_text(json.dumps({"model_type": "modernbert-decoder", **TINY, field: value}))
            changes["config"] = str(path)
    with pytest.raises(TrainingError, match=message):
        train(_args(inputs, tmp_path, **changes))
    assert not os.path.exists(tmp_path / "out")


def test_cli_trains_from_scratch(inputs, tmp_path, capsys):
    from ettin_jax.cli import main

    out = str(tmp_path / "cli")
    argv = ["train", "lm", "--config", inputs["config"], "--tokenizer", inputs["tokenizer"], "--train-file"]
    argv += [inputs["train_file"], "--output-dir", out, "--max-steps", "2", "--block-size", "16", "--no-progress"]
    assert main(argv) == 0
    assert os.path.isfile(os.path.join(out, "final", "tokenizer.json"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["train", "classify", "--config", "17m", "--train-file", "f", "--output-dir", "o", "--max-steps", "1"])
    assert exit.value.code == 2 and "--config" in capsys.readouterr().err  # not a flag of classify
