"""Hostile input to the command line, in process: every mistake is one line on stderr that
starts with `error:` and names the flag, file or line, exit status 2, no traceback; nothing
the user has is lost (an output that is the input, however spelt, is refused and the input
stays byte-identical; `convert` never writes over or inside its source); and the checks come
before any model is loaded (loading one here fails the test). A bug of ours is the opposite:
its traceback, a line saying it is a bug, exit status 1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import sys

import pytest
from helpers import torch_model

from ettin_jax import cli, jobs

PROMPTS_JSONL = b'{"prompt": "one"}\n{"prompt": "two"}\n'
PROMPTS_TXT = b"one\ntwo\n"


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the working directory, with prompt files, and no model loading allowed."""
    (tmp_path / "p.jsonl").write_bytes(PROMPTS_JSONL)
    (tmp_path / "p.txt").write_bytes(PROMPTS_TXT)
    (tmp_path / "dir").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "pipeline", _no_model)
    monkeypatch.setattr(cli, "load_pretrained", _no_model)
    return tmp_path


def run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) -> (status, the one error line), checking the shape of a user error."""
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return status, lines[0]


# ---- generate: prompt files, outputs, flags ------------------------------------------------
def _write(name: str, data: bytes):
    def setup(root):
        (root / name).write_bytes(data)

    return setup


def _symlink(root):
    os.symlink(root / "p.jsonl", root / "link.jsonl")


def _hardlink(root):
    os.link(root / "p.jsonl", root / "hard.jsonl")


def _existing_output(root):
    (root / "out.jsonl").write_bytes(b'{"prompt": "mine"}\n')


def _foreign_output(root):
    (root / "out.jsonl").write_bytes(b"notes of mine, no newline at the end")


GENERATE = ["generate", "--max-new-tokens", "2"]
# fmt: off
CASES = {
    # the output is the input, however spelt: refused, the prompts untouched
    "output_is_input": ("--input-file p.jsonl --output-file p.jsonl", None, "--output-file p.jsonl is the input file"),
    "output_is_input_dot": ("--input-file p.jsonl --output-file ./p.jsonl", None, "is the input file"),
    "output_is_input_absolute": ("--input-file p.jsonl --output-file {root}/p.jsonl", None, "is the input file"),
    "output_is_input_dotdot": ("--input-file p.jsonl --output-file dir/../p.jsonl", None, "is the input file"),
    "output_is_input_symlink": ("--input-file p.jsonl --output-file link.jsonl", _symlink, "is the input file"),
    "output_is_input_hardlink": ("--input-file p.jsonl --output-file hard.jsonl", _hardlink, "is the input file"),
    "output_is_input_resume": ("--input-file p.jsonl --output-file ./p.jsonl --resume", None, "is the input file"),
    "output_is_a_directory": ("--input-file p.jsonl --output-file dir", None, "--output-file dir is a directory"),
    "output_exists": ("--input-file p.jsonl --output-file out.jsonl", _existing_output, "out.jsonl already exists"),
    "resume_foreign_output": ("--input-file p.jsonl --output-file out.jsonl --resume", _foreign_output, "out.jsonl:1 is neither a result nor the start of one"),
    "output_dir_missing": ("--input-file p.jsonl --output-file nowhere/o.jsonl", None, "does not exist"),
    "output_without_input": ("--output-file o.jsonl p", None, "--output-file needs --input-file"),
    "resume_without_output": ("--input-file p.jsonl --resume", None, "--resume needs --output-file"),
    # prompt files
    "input_missing": ("--input-file absent.jsonl", None, "--input-file absent.jsonl: No such file or directory"),
    "input_is_a_directory": ("--input-file dir", None, "--input-file dir: Is a directory"),
    "input_binary_txt": ("--input-file bin.txt", _write("bin.txt", b"fine\n\xff\xfe\x00\x81\n"), "bin.txt:2: not UTF-8"),
    "input_binary_jsonl": ("--input-file bin.jsonl", _write("bin.jsonl", PROMPTS_JSONL + b"\x80\x81"), "bin.jsonl:3: not UTF-8"),
    "input_empty": ("--input-file e.jsonl", _write("e.jsonl", b"\n\n"), "e.jsonl holds no prompts"),
    "jsonl_not_json": ("--input-file j.jsonl", _write("j.jsonl", PROMPTS_JSONL + b"{oops\n"), "j.jsonl:3: not valid JSON"),
    "jsonl_list": ("--input-file j.jsonl", _write("j.jsonl", b'{"prompt": "a"}\n["a", "b"]\n'), 'j.jsonl:2: expected a string or an object with "prompt"'),
    "jsonl_number": ("--input-file j.jsonl", _write("j.jsonl", b"42\n"), "j.jsonl:1: expected a string or an object"),
    "jsonl_no_prompt": ("--input-file j.jsonl", _write("j.jsonl", b'{"promt": "typo"}\n'), "j.jsonl:1: expected"),
    "jsonl_prompt_not_text": ("--input-file j.jsonl", _write("j.jsonl", b'{"prompt": ["a"]}\n'), "j.jsonl:1: expected"),
    "jsonl_null": ("--input-file j.jsonl", _write("j.jsonl", b'{"prompt": "a"}\n\nnull\n'), "j.jsonl:3: expected"),
    # numbers
    "batch_size_zero": ("--input-file p.jsonl --output-file o.jsonl --batch-size 0", None, "--max-batch-size must be >= 1, got 0"),
    "batch_size_negative": ("--input-file p.jsonl --output-file o.jsonl --batch-size -2", None, "--max-batch-size must be >= 1, got -2"),
    "max_batch_size_negative": ("--input-file p.jsonl --max-batch-size -1", None, "--max-batch-size must be >= 1"),
    "max_new_tokens_negative": ("p --max-new-tokens -1", None, "--max-new-tokens must be >= 0, got -1"),
    "num_return_sequences_zero": ("p --num-return-sequences 0", None, "--num-return-sequences must be >= 1"),
    "num_return_sequences_greedy": ("p --num-return-sequences 2", None, "--num-return-sequences 2 needs --do-sample"),
    "top_k_negative": ("p --do-sample --top-k -1", None, "--top-k must be >= 0"),
    "top_p_above_one": ("p --do-sample --top-p 1.5", None, "--top-p must be in (0, 1]"),
    "min_p_negative": ("p --do-sample --min-p -0.1", None, "--min-p must be in [0, 1]"),
    "temperature_zero": ("p --do-sample --temperature 0", None, "--temperature must be > 0 with --do-sample"),
    "temperature_nan": ("p --do-sample --temperature nan", None, "--temperature must be a finite number"),
    "repetition_penalty_zero": ("p --repetition-penalty 0", None, "--repetition-penalty must be > 0"),
    "seed_negative": ("p --seed -1", None, "--seed must be in [0, 2**32)"),
    # devices
    "mesh_garbage": ("p --mesh garbage", None, "--mesh 'garbage': 'garbage' is not AXIS=SIZE"),
    "mesh_not_a_number": ("p --mesh data=two", None, "--mesh 'data=two': the size of data must be an integer"),
    "mesh_zero": ("p --mesh data=0", None, "--mesh data=0: mesh"),
    "mesh_too_many_devices": ("p --mesh data=1000", None, "--mesh data=1000: mesh data=1000,fsdp=1,tensor=1 needs 1000"),
}
# fmt: on


@pytest.mark.parametrize(("args", "setup", "message"), list(CASES.values()), ids=list(CASES))
def test_generate_mistakes(work, capsys, args, setup, message):
    if setup is not None:
        setup(work)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    _, line = run([*GENERATE, *args.replace("{root}", str(work)).split()], capsys)
    assert message in line, line
    # Nothing written, nothing changed: the prompt files (and an existing output) are as they were.
    after = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert after == before
    assert not (work / "o.jsonl").exists()


def test_unreadable_input_file(work, capsys, monkeypatch):
    (work / "secret.jsonl").write_bytes(PROMPTS_JSONL)
    os.chmod(work / "secret.jsonl", 0)
    if os.geteuid() == 0:  # root reads it anyway: make the open fail as it would for a user

        def denied(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(jobs, "open", denied, raising=False)
    _, line = run([*GENERATE, "--input-file", "secret.jsonl"], capsys)
    assert line == "error: --input-file secret.jsonl: Permission denied"


def test_binary_stdin_names_the_line(work, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"first\nsecond\n\xc3\x28\n")))
    _, line = run(GENERATE, capsys)
    assert line.startswith("error: stdin line 3: not UTF-8 text"), line


def test_run_negative_max_new_tokens(work, capsys):
    _, line = run(["run", "--task", "text-generation", "--max-new-tokens", "-5"], capsys)
    assert line == "error: --max-new-tokens must be >= 0, got -5"


# ---- serve ---------------------------------------------------------------------------------
# fmt: off
SERVE = {
    "port_too_large": ("--port 70000", None, "--port must be in [0, 65535], got 70000"),
    "port_negative": ("--port -1", None, "--port must be in [0, 65535], got -1"),
    "chat_template_missing": ("--chat-template absent.jinja", None, "--chat-template absent.jinja: No such file or directory"),
    "chat_template_directory": ("--chat-template dir", None, "--chat-template dir: Is a directory"),
    "chat_template_binary": ("--chat-template t.jinja", _write("t.jinja", b"{{ bos }}\n\xff"), "--chat-template t.jinja:2: not UTF-8"),
    "max_batch_size_zero": ("--max-batch-size 0", None, "--max-batch-size must be >= 1, got 0"),
    "max_length_negative": ("--max-length -4", None, "--max-length must be >= 1"),
    "max_logprobs_negative": ("--max-logprobs -1", None, "--max-logprobs must be >= 0"),
    "shutdown_timeout_negative": ("--shutdown-timeout -1", None, "--shutdown-timeout must be >= 0"),
    "mesh_garbage": ("--mesh tensor", None, "--mesh 'tensor'"),
}
# fmt: on


@pytest.mark.parametrize(("args", "setup", "message"), list(SERVE.values()), ids=list(SERVE))
def test_serve_mistakes(work, capsys, args, setup, message):
    if setup is not None:
        setup(work)
    _, line = run(["serve", "--port", "0", *args.split()], capsys)
    assert message in line, line


def test_serve_port_in_use(work, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _, line = run(["serve", "--host", "127.0.0.1", "--port", str(port)], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line, line


# ---- convert: never over or inside its source ----------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "src"
    torch_model("causal", num_hidden_layers=1).save_pretrained(directory)
    return directory


def _digest(directory) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(root, name), directory): hashlib.sha256(
            open(os.path.join(root, name), "rb").read()
        ).hexdigest()
        for root, _, names in os.walk(directory)
        for name in names
    }


CONVERT = {
    "same": ("src src", "DST src is the source src"),
    "same_overwrite": ("src src --overwrite", "is the source"),
    "same_dot": ("src ./src/ --overwrite", "is the source"),
    "same_absolute": ("src {root}/src --overwrite", "is the source"),
    "same_symlink": ("src alias --overwrite", "is the source"),
    "dst_inside_src": ("src src/flax", "DST src/flax is inside the source src"),
    "dst_inside_src_overwrite": ("src src/flax --overwrite", "is inside the source"),
    "src_inside_dst": ("src . --overwrite", "the source src is inside DST ."),
    "src_inside_dst_symlink": ("alias/../src {root} --overwrite", "is inside DST"),
    "missing_source": ("./absent out", "no such directory: './absent'"),
    "source_is_a_file": ("src/config.json out", "is a file; pass the directory"),
}


@pytest.mark.parametrize(("args", "message"), list(CONVERT.values()), ids=list(CONVERT))
def test_convert_never_touches_its_source(work, capsys, checkpoint, args, message):
    shutil.copytree(checkpoint, work / "src")
    os.symlink(work / "src", work / "alias")
    before = _digest(work / "src")
    _, line = run(["convert", *args.replace("{root}", str(work)).split()], capsys)
    assert message in line, line
    assert _digest(work / "src") == before
    assert sorted(os.listdir(work / "src")) == sorted(before)  # no staging directory left in it
    assert not (work / "out").exists()


def test_convert_bad_config_is_named_before_loading(work, capsys, checkpoint):
    shutil.copytree(checkpoint, work / "bad")
    (work / "bad" / "config.json").write_text("[1, 2]")
    _, line = run(["convert", "bad", "out"], capsys)
    assert "bad/config.json holds a JSON list, not an object" in line


# ---- a bug of ours -------------------------------------------------------------------------
def test_a_bug_shows_its_traceback_and_says_so(work, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("an internal mistake")

    monkeypatch.setattr(cli, "pipeline", broken)
    assert cli.main(["generate", "p", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: an internal mistake" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in ettin-jax")


def test_a_multi_line_error_is_one_line(work, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise cli.CommandError("the checkpoint does not fit the model:\n  missing: a\n  unexpected: b")

    monkeypatch.setattr(cli, "pipeline", fails)
    _, line = run(["generate", "p"], capsys)
    assert line == "error: the checkpoint does not fit the model: missing: a; unexpected: b"


def test_the_checks_need_no_model_and_load_none(work, capsys):
    """The prompt file and output are read and checked before the model: a bad output next to
    a good input fails, and a good job gets as far as loading (here refused: no model)."""
    assert cli.main([*GENERATE, "--input-file", "p.jsonl", "--output-file", "o.jsonl"]) == 1
    assert "a model was loaded before the arguments were checked" in capsys.readouterr().err
    assert json.loads((work / "p.jsonl").read_text().splitlines()[0]) == {"prompt": "one"}


# ---- eval and perplexity --------------------------------------------------------------------
# fmt: off
EVAL_CASES = {
    "no_task": ("eval --tasks ,", None, "--tasks names no task: ','"),
    "samples_without_output": ("eval --tasks t --log-samples", None, "--log-samples needs --output-path"),
    "output_exists": ("eval --tasks t --output-path p.txt", None, "--output-path p.txt exists; ettin-jax never overwrites"),
    "output_dir_missing": ("eval --tasks t --output-path nowhere/r.json", None, "its directory does not exist"),
    "include_path_missing": ("eval --tasks t --include-path absent", None, "--include-path absent: not a directory"),
    "batch_size_zero": ("eval --tasks t --batch-size 0", None, "--batch-size must be >= 1, got 0"),
    "limit_zero": ("eval --tasks t --limit 0", None, "--limit must be > 0"),
    "limit_nan": ("eval --tasks t --limit nan", None, "--limit must be > 0"),
    "fewshot_negative": ("eval --tasks t --num-fewshot -1", None, "--num-fewshot must be >= 0, got -1"),
    "no_room_for_prompts": ("eval --tasks t --max-length 64 --max-gen-toks 64", None, "--max-gen-toks 64 leaves no room"),
    "unknown_task": ("eval --tasks no_such_task --include-path dir", None, "--tasks: no task 'no_such_task' in lm-eval or in --include-path dir"),
    "ppl_file_missing": ("perplexity --file absent.txt", None, "absent.txt: No such file or directory"),
    "ppl_binary": ("perplexity --file bin.txt", _write("bin.txt", b"fine\n\xff\xfe\n"), "bin.txt:2: not UTF-8"),
    "ppl_not_json": ("perplexity --file j.jsonl", _write("j.jsonl", b'{"text": "a"}\n{oops\n'), "j.jsonl:2: not JSON"),
    "ppl_no_field": ("perplexity --file j.jsonl", _write("j.jsonl", b'{"txt": "a"}\n'), 'j.jsonl:1: expected an object with a string "text" field'),
    "ppl_other_field": ("perplexity --file p.jsonl --text-column body", None, 'p.jsonl:1: expected an object with a string "body" field'),
    "ppl_batch_size_zero": ("perplexity --file p.txt --batch-size 0", None, "--batch-size must be >= 1, got 0"),
}
# fmt: on


@pytest.mark.parametrize(("args", "setup", "message"), list(EVAL_CASES.values()), ids=list(EVAL_CASES))
def test_eval_and_perplexity_mistakes(work, capsys, args, setup, message, monkeypatch):
    from ettin_jax import harness

    monkeypatch.setattr(harness, "EttinLM", _no_model)
    if setup is not None:
        setup(work)
    _, line = run(args.split(), capsys)
    assert message in line, line


def test_perplexity_of_empty_texts_is_named(work, capsys, monkeypatch):
    """Empty texts are found once the tokenizer is there (the model loads first)."""
    (work / "e.jsonl").write_text('{"text": " "}\n')
    monkeypatch.setattr(cli, "pipeline", lambda *a, **k: type("P", (), {"model": None, "tokenizer": None})())
    _, line = run(["perplexity", "--file", "e.jsonl"], capsys)
    assert line == "error: no text to score: every text is empty"
