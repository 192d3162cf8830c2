"""lm-evaluation-harness against `ettin-jax serve`: its `local-completions` backend, sending token ids
to our OpenAI-compatible /v1/completions, scores a small multiple-choice task (tests/lm_eval_tasks)
exactly as its `hf` backend scores it on the same transformers checkpoint: every (log-likelihood,
is_greedy) pair within 1e-4, and the same accuracy.

For a log-likelihood lm-eval posts {"prompt": [[ids...], ...], "echo": true, "max_tokens": 1,
"logprobs": 1, "temperature": 0} and reads, per choice, `logprobs.token_logprobs[ctxlen:-1]` (the
continuation's tokens, the last entry being the one generated token) and `top_logprobs[ctxlen:-1]`
(greedy when each token's logprob equals the largest value of its position's dict)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torch_model

from ettin_jax import default_model

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "lm_eval_tasks"
TASK = "ettin_tiny_qa"
HEALTH_DEADLINE_S = 120
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random transformers causal LM saved with a byte-level tokenizer (every byte a token, the
    default model's) whose template puts BOS ([CLS]) first, as Ettin's samples start. The
    logits are sharpened and given a unigram prior, so that choices score apart, and the prior
    favours " " then "o", so that the continuation " o" is greedy (the top_logprobs path)."""
    from tokenizers import processors

    tokenizer = default_model.byte_tokenizer()
    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", bos)]
    )
    # The model's vocabulary is larger than the tokenizer's (264 > 261), as Ettin's is.
    model = torch_model(
        "causal", 0, vocab_size=default_model.config().vocab_size, pad_token_id=pad, bos_token_id=bos,
        eos_token_id=eos, cls_token_id=bos, sep_token_id=eos, max_position_embeddings=256, local_attention=16,
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.norm.weight.mul_(2.0)
        model.decoder.bias.add_(torch.randn_like(model.decoder.bias))
        model.decoder.bias[tokenizer.convert_tokens_to_ids("Ġ")] += 4.0
        model.decoder.bias[tokenizer.convert_tokens_to_ids("o")] += 3.0
    directory = tmp_path_factory.mktemp("lm-eval") / "tiny-ettin"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def tasks_dir(tmp_path) -> str:
    """The task's YAML with the data file's absolute path (lm-eval resolves it against the working
    directory) and a datasets cache in tmp_path, not in the home directory."""
    import yaml

    config = yaml.safe_load((TASKS / "tiny_qa.yaml").read_text())
    kwargs = config["dataset_kwargs"]
    kwargs["data_files"] = {split: str(TASKS / name) for split, name in kwargs["data_files"].items()}
    kwargs["cache_dir"] = str(tmp_path / "datasets")
    directory = tmp_path / "tasks"
    directory.mkdir()
    (directory / "tiny_qa.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(directory)


def evaluate(model: str, model_args: dict, tasks_dir: str) -> tuple[float, list[list[tuple[float, bool]]]]:
    """lm-eval's accuracy on the task and, per document, the (log-likelihood, is_greedy) of each choice."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        batch_size=8,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][TASK], key=lambda sample: sample["doc_id"])
    scores = [[(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]] for sample in samples]
    return out["results"][TASK]["acc,none"], scores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, workdir: Path):
    """`ettin-jax serve` in a subprocess; yields its base URL once GET /health answers 200, and
    checks that SIGTERM stops it with status 0."""
    port = free_port()
    log = workdir / "server.log"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    args = ["serve", "--model", model, "--port", str(port), "--dtype", "float32"]
    command = [sys.executable, "-m", "ettin_jax.cli", *args]
    with open(log, "w") as output:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} before it was healthy:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no 200 from /health after {HEALTH_DEADLINE_S} s:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, f"the server exited with {proc.returncode} on SIGTERM:\n{log.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_local_completions_matches_hf(checkpoint, tasks_dir, tmp_path):
    reference_acc, reference = evaluate(
        "hf", {"pretrained": checkpoint, "dtype": "float32", "add_bos_token": True}, tasks_dir
    )
    assert [len(choices) for choices in reference] == [4, 3, 4, 3, 4, 2, 4, 3, 3, 3, 3]
    assert all(len({round(ll, 3) for ll, _ in choices}) == len(choices) for choices in reference)
    assert any(greedy for choices in reference for _, greedy in choices)  # " o" on the last question

    with serve(checkpoint, tmp_path) as url:
        acc, served = evaluate(
            "local-completions",
            {
                "model": checkpoint,  # the served name: --model's string
                "base_url": f"{url}/v1/completions",
                "tokenizer": checkpoint,
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "add_bos_token": True,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks_dir,
        )

    assert [len(choices) for choices in served] == [len(choices) for choices in reference]
    got, want = (np.array([ll for choices in s for ll, _ in choices]) for s in (served, reference))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    assert [[g for _, g in choices] for choices in served] == [[g for _, g in choices] for choices in reference]
    assert acc == reference_acc
