"""lm-evaluation-harness on ettin-jax, against its own `hf` backend on the same transformers
checkpoint, in float32, on local tasks of each kind (tests/lm_eval_tasks):
- `ettin-jax eval` (our `EttinLM`, on the checkpoint converted to ettin-jax's format): a
  multiple-choice task, a rolling-perplexity task and a `generate_until` task with stop strings.
  Every per-sample log-likelihood within 1e-4, `is_greedy` identical, the same accuracy, the
  same greedy generations.
- `ettin-jax serve` through the harness's `local-completions` backend, sending token ids to our
  OpenAI-compatible /v1/completions: the multiple-choice task's pairs and accuracy.

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
TEXT_TASK, UNTIL_TASK = "ettin_tiny_text", "ettin_tiny_until"
HEALTH_DEADLINE_S = 120
TOLERANCE = 1e-4


def make_checkpoint(directory: Path, template: str) -> str:
    """A random transformers causal LM saved with a byte-level tokenizer (every byte a token, the
    first default model's) whose template is `template`. The logits are sharpened and given a
    unigram prior, so that choices score apart, and the prior favours " " then "o", so that the
    continuation " o" is greedy (the top_logprobs path)."""
    from tokenizers import processors

    tokenizer = default_model.byte_tokenizer()
    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("[CLS]", bos), ("[SEP]", eos)]
    )
    # The model's vocabulary is larger than the tokenizer's (264 > 261), as Ettin's is.
    model = torch_model(
        "causal", 0, vocab_size=264, pad_token_id=pad, bos_token_id=bos,
        eos_token_id=eos, cls_token_id=bos, sep_token_id=eos, max_position_embeddings=256, local_attention=16,
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.norm.weight.mul_(2.0)
        model.decoder.bias.add_(torch.randn_like(model.decoder.bias))
        model.decoder.bias[tokenizer.convert_tokens_to_ids("Ġ")] += 4.0
        model.decoder.bias[tokenizer.convert_tokens_to_ids("o")] += 3.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """BOS ([CLS]) first, as Ettin's samples start."""
    return make_checkpoint(tmp_path_factory.mktemp("lm-eval") / "tiny-ettin", "[CLS] $A")


@pytest.fixture(scope="module")
def ettin_checkpoint(tmp_path_factory) -> str:
    """Ettin's own template, [CLS] first and [SEP] last: `add_bos_token=True` must reload it as
    [CLS] alone, as the harness's `hf` backend does."""
    return make_checkpoint(tmp_path_factory.mktemp("lm-eval") / "tiny-ettin", "[CLS] $A [SEP]")


@pytest.fixture
def tasks_dir(tmp_path) -> str:
    """The tasks' YAMLs with their data files' absolute paths (lm-eval resolves them against the
    working directory) and a datasets cache in tmp_path, not in the home directory."""
    import yaml

    directory = tmp_path / "tasks"
    directory.mkdir()
    for path in TASKS.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        kwargs = config["dataset_kwargs"]
        kwargs["data_files"] = {split: str(TASKS / name) for split, name in kwargs["data_files"].items()}
        kwargs["cache_dir"] = str(tmp_path / "datasets")
        (directory / path.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return str(directory)


def run_harness(model: str, model_args: dict, tasks_dir: str, tasks: list[str]) -> dict:
    """lm-eval's results, with the samples of each task sorted by document."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        batch_size=8,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    out["samples"] = {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}
    return out


def choice_scores(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    """Per document, the (log-likelihood, is_greedy) of each choice."""
    return [[(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]] for sample in samples]


def evaluate(model: str, model_args: dict, tasks_dir: str) -> tuple[float, list[list[tuple[float, bool]]]]:
    """lm-eval's accuracy on the multiple-choice task and, per document, each choice's pair."""
    out = run_harness(model, model_args, tasks_dir, [TASK])
    return out["results"][TASK]["acc,none"], choice_scores(out["samples"][TASK])


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


def test_ettin_jax_eval_matches_hf_on_every_kind_of_task(ettin_checkpoint, tasks_dir, tmp_path):
    import json

    import ettin_jax as ej
    from ettin_jax import cli

    tasks = [TASK, TEXT_TASK, UNTIL_TASK]
    reference = run_harness(
        "hf", {"pretrained": ettin_checkpoint, "dtype": "float32", "add_bos_token": True}, tasks_dir, tasks
    )
    converted = tmp_path / "converted"  # ettin-jax's own format, with the tokenizer beside it
    ej.ModernBertDecoderForCausalLM.from_pretrained(ettin_checkpoint).save_pretrained(converted, format="flax")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(ettin_checkpoint) / name).exists():
            (converted / name).write_bytes((Path(ettin_checkpoint) / name).read_bytes())
    output = tmp_path / "results.json"
    status = cli.main([
        "eval", "--model", str(converted), "--tasks", ",".join(tasks), "--include-path", tasks_dir,
        "--batch-size", "8", "--add-bos-token", "--output-path", str(output), "--log-samples",
    ])  # fmt: skip
    assert status == 0
    ours = json.loads(output.read_text())
    samples = {
        task: sorted(
            (json.loads(line) for line in (tmp_path / f"results_samples_{task}.jsonl").read_text().splitlines()),
            key=lambda s: s["doc_id"],
        )
        for task in tasks
    }

    # Multiple choice: every pair, and the accuracy.
    got, want = choice_scores(samples[TASK]), choice_scores(reference["samples"][TASK])
    assert [len(c) for c in got] == [len(c) for c in want] == [4, 3, 4, 3, 4, 2, 4, 3, 3, 3, 3]
    np.testing.assert_allclose([ll for c in got for ll, _ in c], [ll for c in want for ll, _ in c], atol=TOLERANCE)
    assert [[g for _, g in c] for c in got] == [[g for _, g in c] for c in want]
    assert any(g for c in got for _, g in c)
    assert ours["results"][TASK]["acc,none"] == reference["results"][TASK]["acc,none"]

    # Rolling perplexity: each document's log-likelihood (the long one over several windows).
    got, want = ([s["filtered_resps"][0] for s in x] for x in (samples[TEXT_TASK], reference["samples"][TEXT_TASK]))
    assert len(got) == len(want) == 5
    np.testing.assert_allclose(got, want, atol=TOLERANCE * 4, rtol=0)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"][TEXT_TASK][metric] == pytest.approx(reference["results"][TEXT_TASK][metric], rel=1e-4)

    # generate_until: the same greedy texts, each cut before its first stop string.
    got, want = ([s["filtered_resps"][0] for s in x] for x in (samples[UNTIL_TASK], reference["samples"][UNTIL_TASK]))
    assert got == want
    assert all("o" not in text for text in got)
    assert sum(len(text) <= 2 for text in got) >= 4  # most greedy texts reach " o" at once: stopped


def test_the_default_model_scores_above_chance_on_its_corpus(tasks_dir):
    """The embedded default model, trained on Python's documentation, tells a held-out
    sentence's real ending from its words shuffled (chance: 0.5)."""
    from ettin_jax.harness import EttinLM

    out = run_harness(EttinLM(add_bos_token=True), {}, tasks_dir, ["ettin_docs_cloze"])
    assert len(out["samples"]["ettin_docs_cloze"]) == 24
    assert out["results"]["ettin_docs_cloze"]["acc,none"] >= 0.9
