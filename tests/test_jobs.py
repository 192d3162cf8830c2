"""Prompt-file jobs (`ettin-jax generate --input-file ... --output-file ...`): results in input
order, a request that cannot run on its own line, resuming after a kill (SIGTERM, SIGKILL, a
torn last line) to the bytes of an uninterrupted run, and the checks made before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import torch_model
from textdata import FILLER, FIRST, LAST, word_tokenizer

import ettin_jax as ej
from ettin_jax import cli, jobs

TIMEOUT = 300


def _write_prompts(path, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = FIRST + LAST + FILLER
    prompts = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(count)]
    path.write_text("\n".join(prompts) + "\n")
    return prompts


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A word-level tiny causal LM (a context of 128 tokens) and a file of 24 prompts."""
    root = tmp_path_factory.mktemp("job")
    torch_model("causal", seed=5, num_hidden_layers=2).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    return root, _write_prompts(root / "prompts.txt", 24, seed=0)


def main(argv: list) -> int:
    return cli.main([str(a) for a in argv])


def generate(model, source, *extra, tokens: int = 6, slots: int = 4) -> list[str]:
    return ["generate", "--model", str(model), "--input-file", str(source), "--max-new-tokens", str(tokens),
            "--max-batch-size", str(slots), *map(str, extra)]  # fmt: skip


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_come_in_input_order_and_equal_generate(job, tmp_path, capsys):
    root, prompts = job
    out = tmp_path / "out.jsonl"
    assert main([*generate(root / "model", root / "prompts.txt"), "--output-file", out]) == 0
    assert [r["prompt"] for r in records(out)] == prompts
    generator = ej.pipeline("text-generation", model=str(root / "model"))
    alone = [generator(p, max_new_tokens=6)[0]["generated_text"] for p in prompts]  # `generate`, a prompt a call
    assert [r["generated_text"] for r in records(out)] == alone
    assert f"wrote 24 results to {out}" in capsys.readouterr().err


def test_a_prompt_that_cannot_run_gets_its_error_on_its_line(job, tmp_path, capsys):
    root, prompts = job
    too_long = " ".join(["w1"] * 200)  # 201 tokens with BOS; the context holds 128
    texts = [prompts[0], too_long, "w2"]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    assert main([*generate(root / "model", source), "--output-file", out]) == 0
    first, failed, last = records(out)
    error = "a 201-token prompt plus 6 new tokens exceeds max_position_embeddings (128)"
    assert failed == {"prompt": too_long, "error": error}
    assert first["generated_text"].startswith(prompts[0]) and last["generated_text"].startswith("w2")
    err = capsys.readouterr().err
    assert "3 prompts, " in err and "; 1 failed (their lines hold the error)" in err


@pytest.mark.parametrize("sampling", [(), ("--do-sample", "--num-return-sequences", 2, "--seed", 7)],
                         ids=["greedy", "sampled"])  # fmt: skip
def test_resuming_after_a_torn_line_gives_the_bytes_of_one_run(job, tmp_path, capsys, sampling):
    root, _ = job
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    assert main([*generate(root / "model", root / "prompts.txt", *sampling), "--output-file", whole]) == 0
    lines = whole.read_bytes().splitlines(keepends=True)
    assert all(isinstance(r["generated_text"], list if sampling else str) for r in records(whole))
    out.write_bytes(b"".join(lines[:9]) + lines[9][:20])  # killed while it wrote line 10
    capsys.readouterr()
    # Other slots too: a request's tokens do not depend on its neighbours.
    args = generate(root / "model", root / "prompts.txt", *sampling, "--output-file", out, "--resume", slots=3)
    assert main(args) == 0
    assert out.read_bytes() == whole.read_bytes()
    err = capsys.readouterr().err
    assert "cut off a partial last line (20 bytes)" in err and f"resuming {out}: 9 of 24 results are there" in err
    assert "15 prompts" in err
    # A finished job resumed: nothing to do, nothing changed.
    assert main(args) == 0
    assert out.read_bytes() == whole.read_bytes()
    assert "already holds the results of all 24 prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("exists", "out.jsonl already exists; pass --resume to continue the job that wrote it, or choose another"),
        ("input", "is the input file; choose another name"),
        ("other prompts", "out.jsonl:2 is not the result of prompt 2 of"),
        ("more results", "holds more results than its share of the 24 prompts"),
        ("no output", "--resume needs --output-file"),
    ],
)
def test_the_output_is_checked_before_any_work(job, tmp_path, capsys, case, message):
    root, prompts = job
    source, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    shutil.copy(root / "prompts.txt", source)
    lines = [json.dumps({"prompt": p, "generated_text": p}) + "\n" for p in prompts]
    content = {"exists": lines[0], "other prompts": lines[0] + lines[2], "more results": "".join(lines) + lines[0]}
    if case in content:
        out.write_text(content[case])
    target = {"input": source, "no output": None}.get(case, out)
    flags = ([] if case == "exists" else ["--resume"]) + ([] if target is None else ["--output-file", target])
    # No model there: the checks come before it is loaded.
    assert main([*generate(tmp_path / "no-model", source), *flags]) == 2
    assert message in capsys.readouterr().err
    assert source.read_text() == (root / "prompts.txt").read_text()
    assert not out.exists() or out.read_text() == content[case]


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "in.txt").write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(jobs.JobError, match=r"in.txt:2: not UTF-8 text \(invalid start byte at byte 0\)"):
        jobs.read_prompts(str(tmp_path / "in.txt"))


def test_results_wait_for_those_before_them():
    written = []
    out = jobs.InOrder(written.append, start=2)
    for position in (4, 3, 6, 2, 5):
        out.put(position, position)
    assert written == [2, 3, 4, 5, 6]


# ---- killed jobs --------------------------------------------------------------------------
def _command(root, out, *extra) -> list[str]:
    script = shutil.which("ettin-jax") or os.path.join(os.path.dirname(sys.executable), "ettin-jax")
    # Enough work (ragged prompts, one slot) that a signal lands part-way.
    return [script, *generate(root / "model", root / "many.txt", "--output-file", out, *extra, tokens=32, slots=1)]


@pytest.fixture(scope="module")
def uninterrupted(job):
    """The bytes of an uninterrupted run over 150 prompts, in a process of its own as the killed ones."""
    root, _ = job
    _write_prompts(root / "many.txt", 150, seed=1)
    out = root / "uninterrupted.jsonl"
    result = subprocess.run(_command(root, out), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_job_resumes_to_the_bytes_of_an_uninterrupted_run(job, uninterrupted, tmp_path, sig):
    root, _ = job
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(_command(root, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no results within the timeout"
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    killed = out.read_bytes()
    assert killed.count(b"\n") < 150, "the job ended before the signal came"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]
        assert killed.endswith(b"\n") and "run again with --resume to finish" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(_command(root, out, "--resume"), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert out.read_bytes() == uninterrupted
