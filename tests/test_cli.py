"""`ettin-jax convert`: formats, dtype, atomic writes, verification and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from helpers import random_ids, to_numpy

from ettin_jax.cli import main
from ettin_jax.convert.safetensors_io import SafetensorsFile


@pytest.fixture
def work(tmp_path):
    """An empty directory for outputs (the checkpoints live beside it in tmp_path)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_transformers_to_flax_and_back(work, saved, capsys):
    torch_model, directory = saved("causal")
    assert main(["convert", directory, str(work / "flax")]) == 0
    summary = capsys.readouterr().out
    assert "(flax)" in summary and "152,320" in summary and "float32" in summary
    assert "4 (2 global, 2 sliding)" in summary and "4 keys on sliding layers" in summary
    assert os.path.isdir(work / "flax" / "flax_params")
    assert os.path.isfile(work / "flax" / "generation_config.json")  # companions travel along
    assert main(["convert", str(work / "flax"), str(work / "back")]) == 0
    assert "(transformers)" in capsys.readouterr().out
    reloaded = transformers.ModernBertDecoderForCausalLM.from_pretrained(work / "back").eval()
    ids = torch.tensor(random_ids(1, 9), dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_array_equal(to_numpy(reloaded(ids).logits), to_numpy(torch_model(ids).logits))
    assert sorted(os.listdir(work)) == ["back", "flax"]  # no staging directories left


def test_bfloat16_target(work, saved, capsys):
    _, directory = saved("classify", num_labels=3)
    assert main(["convert", directory, str(work / "bf16"), "--to", "transformers", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "ModernBertDecoderForSequenceClassification" in out and "bfloat16" in out
    tensors = SafetensorsFile(work / "bf16" / "model.safetensors")
    assert {tensors.dtype(k).name for k in tensors} == {"bfloat16"}
    assert "classifier.weight" in tensors
    loaded = transformers.ModernBertDecoderForSequenceClassification.from_pretrained(work / "bf16")
    assert loaded.config.num_labels == 3


def test_legacy_rope_option(work, saved):
    _, directory = saved("causal")
    assert main(["convert", directory, str(work / "legacy"), "--to", "transformers", "--legacy-rope"]) == 0
    with open(work / "legacy" / "config.json") as f:
        rope = json.load(f)["rope_parameters"]
    assert rope["sliding_attention"]["rope_theta"] == rope["full_attention"]["rope_theta"] == 160_000.0


def test_existing_destination_needs_overwrite(work, saved, capsys):
    _, directory = saved("causal")
    (work / "dst").mkdir()
    (work / "dst" / "keep.txt").write_text("mine")
    assert main(["convert", directory, str(work / "dst")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (work / "dst" / "keep.txt").read_text() == "mine"
    assert main(["convert", directory, str(work / "dst"), "--overwrite"]) == 0
    assert sorted(os.listdir(work)) == ["dst"]
    assert os.path.isdir(work / "dst" / "flax_params")


def test_failed_conversion_leaves_nothing_behind(work, saved, capsys):
    _, directory = saved("causal")
    with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    out = work / "out"
    assert main(["convert", directory, str(out)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not os.listdir(work)


def test_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("ettin-jax") or os.path.join(os.path.dirname(sys.executable), "ettin-jax")
    result = subprocess.run([script, "convert", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--dtype" in result.stdout


@pytest.mark.parametrize("argv", [[], ["convert"], ["convert", "a", "b", "--dtype", "int8"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


# ---- generate and run ---------------------------------------------------------------------
def run_cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    script = shutil.which("ettin-jax") or os.path.join(os.path.dirname(sys.executable), "ettin-jax")
    return subprocess.run([script, *args], input=stdin, capture_output=True, text=True, check=False)


def test_generate_one_prompt_streams_to_stdout(default_home, capsys):
    assert main(["generate", "Hello", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and out.endswith("\n")


def test_generate_reads_stdin(default_home):
    result = run_cli(["generate", "--max-new-tokens", "4"], stdin="first\nsecond line\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("first") and lines[-1].startswith("second line")
    assert "2 prompts," in result.stderr and "tokens/s" in result.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_generate_batch_file(default_home, work, capsys, suffix):
    prompts = ["a long prompt goes first", "b", "medium one", "c"]
    source = work / f"prompts{suffix}"
    if suffix == ".jsonl":
        source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    else:
        source.write_text("\n".join(prompts) + "\n")
    target = work / "out.jsonl"
    args = ["generate", "--input-file", str(source), "--output-file", str(target), "--max-new-tokens", "5"]
    assert main([*args, "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts  # input order, though batched by length
    assert all(r["generated_text"].startswith(r["prompt"]) for r in records)
    assert "4 prompts, 20 new tokens" in capsys.readouterr().err
    # The same prompts one batch at a time give the same greedy text.
    assert main([*args, "--batch-size", "4", "--output-file", str(work / "again.jsonl")]) == 0
    assert (work / "again.jsonl").read_text() == target.read_text()


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        (["--output-file", "x.jsonl", "p"], None, "--output-file needs --input-file"),
        (["--input-file", "{file}"], "", "holds no prompts"),
        (["--input-file", "{file}"], '{"prompt": "ok"}\nnot json\n', ":2: not valid JSON"),
        (["--input-file", "{file}"], '{"other": 1}\n', 'expected a string or an object with "prompt"'),
        (["p", "--temperature", "0", "--do-sample"], None, "temperature must be > 0"),
    ],
)
def test_generate_errors(default_home, work, capsys, args, content, message):
    file = work / "in.jsonl"
    if content is not None:
        file.write_text(content)
    assert main(["generate", *[a.replace("{file}", str(file)) for a in args]]) == 2
    assert message in capsys.readouterr().err


def test_run_text_generation_and_classification(default_home):
    result = run_cli(["run", "--task", "text-generation", "--max-new-tokens", "3"], stdin="one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert [line[:3] for line in result.stdout.splitlines()] == ["one", "two"]
    result = run_cli(["run", "--task", "text-classification"], stdin="good\n")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["label"] in ("LABEL_0", "LABEL_1") and 0.5 <= record["score"] <= 1.0


def test_run_unknown_task(default_home):
    result = run_cli(["run", "--task", "summarization"])
    assert result.returncode == 2 and "invalid choice: 'summarization'" in result.stderr
