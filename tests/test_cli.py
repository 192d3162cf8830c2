"""The `ettin-jax` command line: convert (formats, dtype, atomic writes, verification, errors),
generate, run, and the train flags generated from `TrainArgs`."""

from __future__ import annotations

import argparse
import dataclasses
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
from safetensors import safe_open

from ettin_jax import distributed
from ettin_jax.cli import add_dataclass_flags, main


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
    with safe_open(work / "bf16" / "model.safetensors", framework="numpy") as tensors:
        keys = tensors.keys()
        assert {tensors.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        assert "classifier.weight" in keys
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


def test_generate_streams_from_the_primary_process_only(default_home, capsys, monkeypatch):
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    assert main(["generate", "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == ""


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


def test_generate_stop_ends_each_completion_before_it(default_home, work, capsys):
    """--stop, on one streamed prompt and on a prompt file (the engine): the greedy text of a
    run without it, cut before the first stop string."""
    prompts = ["The function returns", "A list is"]
    completions = []
    for prompt in prompts:
        assert main(["generate", prompt, "--max-new-tokens", "24"]) == 0
        completions.append(capsys.readouterr().out[len(prompt) : -1])
    stop = completions[0][4:7]  # some text well inside the first completion
    assert stop in completions[0] and len(stop) == 3
    assert main(["generate", prompts[0], "--max-new-tokens", "24", "--stop", stop, "--stop", "no such text"]) == 0
    assert capsys.readouterr().out == prompts[0] + completions[0][: completions[0].find(stop)] + "\n"
    (work / "p.txt").write_text("\n".join(prompts) + "\n")
    args = ["--input-file", str(work / "p.txt"), "--output-file", str(work / "o.jsonl"), "--max-new-tokens", "24"]
    args += ["--stop", stop]
    assert main(["generate", *args]) == 0
    records = [json.loads(line) for line in (work / "o.jsonl").read_text().splitlines()]
    expected = [c[: c.find(stop)] if stop in c else c for c in completions]
    assert [r["generated_text"] for r in records] == [p + e for p, e in zip(prompts, expected, strict=True)]


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


# ---- train flags --------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class Args:
    """A stand-in for TrainArgs, one field of each kind the flag generator reads."""

    task: str = dataclasses.field(default="a", metadata={"cli": False})
    data: str = dataclasses.field(metadata={"help": "required"})
    epochs: int | None = dataclasses.field(default=None, metadata={"group": "length"})
    steps: int | None = dataclasses.field(default=None, metadata={"group": "length"})
    rate: float = 0.5
    kind: str = dataclasses.field(default="x", metadata={"choices": ("x", "y")})
    only_b: int = dataclasses.field(default=3, metadata={"tasks": ("b",)})
    remat: bool = False
    progress: bool = dataclasses.field(default=True, metadata={"flag": "--no-progress"})


def parse(task: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Args, task)
    return parser.parse_args(argv)


def test_flags_come_from_the_dataclass():
    args = parse("b", ["--data", "d", "--steps", "4", "--rate", "0.25", "--kind", "y", "--only-b", "5", "--remat",
                       "--no-progress"])  # fmt: skip
    assert Args(**vars(args)) == Args(data="d", steps=4, rate=0.25, kind="y", only_b=5, remat=True, progress=False)
    assert Args(**vars(parse("a", ["--data", "d", "--epochs", "2"]))) == Args(data="d", epochs=2)
    assert "task" not in vars(parse("a", ["--data", "d", "--epochs", "2"]))


@pytest.mark.parametrize(
    ("task", "argv"),
    [
        ("a", ["--epochs", "1"]),  # --data is required
        ("a", ["--data", "d"]),  # one of --epochs and --steps is required
        ("a", ["--data", "d", "--epochs", "1", "--steps", "1"]),  # but not both
        ("a", ["--data", "d", "--epochs", "1", "--only-b", "1"]),  # a flag of the other task
        ("a", ["--data", "d", "--epochs", "1", "--kind", "z"]),
        ("a", ["--data", "d", "--epochs", "one"]),
    ],
)
def test_flag_usage_errors(task, argv):
    with pytest.raises(SystemExit):
        parse(task, argv)


@pytest.mark.parametrize(("task", "has", "lacks"), [("classify", "--max-length", "--block-size"),
                                                    ("lm", "--block-size", "--max-length")])  # fmt: skip
def test_train_help_lists_the_train_args(capsys, task, has, lacks):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", task, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (has, "--train-file", "--max-grad-norm", "--no-progress", "--release-host-memory", "--mesh"):
        assert flag in out
    assert lacks not in out and "--task" not in out


def test_train_arguments_are_checked_before_training(tmp_path, capsys):
    argv = ["train", "lm", "--train-file", "x.csv", "--output-dir", str(tmp_path / "run"), "--epochs", "0"]
    assert main(argv) == 2
    assert "error: --epochs must be >= 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
