"""`scoring.loglikelihood` and `scoring.loglikelihood_rolling` against transformers PyTorch on the
same weights (float32): every (log-likelihood, is_greedy) pair, in batches of mixed lengths,
with truncation; the rolling windows against lm-evaluation-harness's own."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from ettin_jax import scoring
from ettin_jax.generation import GenerationError

TOLERANCE = 1e-4


def reference_loglikelihood(reference, context, continuation, max_length) -> tuple[float, bool]:
    """What lm-evaluation-harness's `hf` backend computes for one request."""
    inputs = (context + continuation)[-(max_length + 1) :][:-1]
    with torch.no_grad():
        logits = reference(torch.tensor([inputs])).logits[0, -len(continuation) :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(continuation)
    chosen = logprobs.gather(1, target[:, None])[:, 0]
    return float(chosen.sum()), bool((logprobs.argmax(-1) == target).all())


def greedy_continuation(reference, context, n) -> list[int]:
    tokens = list(context)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(context) :]


def test_pairs_match_transformers_in_mixed_batches(causal_pair):
    reference, model = causal_pair
    rng = np.random.default_rng(0)
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    requests = []
    for ctx_len, cont_len in [(1, 1), (3, 5), (17, 2), (40, 1), (9, 30), (120, 20), (2, 127), (64, 64)]:
        ctx, cont = rng.integers(3, vocab, ctx_len).tolist(), rng.integers(3, vocab, cont_len).tolist()
        requests.append((ctx, cont))
    # Greedy continuations, one of them past the context's end (truncated from the left).
    for ctx_len in (5, 121):
        ctx = rng.integers(3, vocab, ctx_len).tolist()
        requests.append((ctx, greedy_continuation(reference, ctx[-context:], 6)))
    expected = [reference_loglikelihood(reference, c, k, context) for c, k in requests]
    got = scoring.loglikelihood(model, requests, max_batch_tokens=256)  # several batches
    assert [g for _, g in got] == [g for _, g in expected]
    assert sum(g for _, g in got) >= 2  # both greedy requests, whatever the random ones do
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected], atol=TOLERANCE, rtol=0)
    # A smaller max_length truncates contexts further, as the harness's max_length does.
    short = scoring.loglikelihood(model, requests[:3], max_length=8)
    np.testing.assert_allclose(
        [s for s, _ in short], [reference_loglikelihood(reference, c, k, 8)[0] for c, k in requests[:3]],
        atol=TOLERANCE, rtol=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "batching", [{}, {"batch_size": 1}, {"batch_size": 5}, {"max_batch_tokens": 64}, {"head_chunk": 16}]
)
def test_choices_that_share_a_context_read_it_once_and_score_alike(causal_pair, batching, monkeypatch):
    """Multiple-choice requests: each question's choices (1 to 12 tokens) share its context,
    which is read once and its KV cache shared; the pairs are those of separate passes (also
    with the logits made 16 scored tokens at a time)."""
    if "head_chunk" in batching:
        monkeypatch.setattr(scoring, "HEAD_CHUNK", batching.pop("head_chunk"))
    reference, model = causal_pair
    rng = np.random.default_rng(2)
    requests = []
    for ctx_len in (1, 7, 30, 100):
        ctx = rng.integers(3, model.config.vocab_size, ctx_len).tolist()
        requests += [(ctx, rng.integers(3, model.config.vocab_size, n).tolist()) for n in (1, 3, 12, 2)]
    requests.append((requests[4][0], greedy_continuation(reference, requests[4][0], 4)))
    rng.shuffle(requests)
    got = scoring.loglikelihood(model, requests, **batching)
    expected = [reference_loglikelihood(reference, c, k, model.config.max_position_embeddings) for c, k in requests]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected], atol=TOLERANCE, rtol=0)
    assert [g for _, g in got] == [g for _, g in expected]
    assert any(g for _, g in got)


@pytest.mark.parametrize("length", [1, 5, 8, 9, 16, 17, 25])
@pytest.mark.parametrize("max_length", [1, 2, 8])
def test_rolling_windows_are_lm_evals(length, max_length):
    from lm_eval import utils

    tokens = list(range(100, 100 + length))
    expected = [
        utils.make_disjoint_window(w)
        for w in utils.get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=max_length, context_len=1)
    ]
    assert scoring.rolling_windows(tokens, 7, max_length) == [tuple(map(list, w)) for w in expected]


def test_rolling_loglikelihood_is_every_token_given_the_text_before_it(causal_pair):
    reference, model = causal_pair
    rng = np.random.default_rng(1)
    documents = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (300, 5, 0)]
    got = scoring.loglikelihood_rolling(model, documents, prefix_token=1, max_length=64)
    for document, total in zip(documents, got, strict=True):
        windows = scoring.rolling_windows(document, 1, 64)
        expected = sum(reference_loglikelihood(reference, c, k, 64)[0] for c, k in windows)
        assert total == pytest.approx(expected, abs=TOLERANCE * len(windows))
    assert got[2] == 0.0  # an empty document has no token to score
    # One window over a short document: each token given BOS and the tokens before it.
    with torch.no_grad():
        logits = reference(torch.tensor([[1, *documents[1][:-1]]])).logits[0]
    chosen = torch.log_softmax(logits, -1).gather(1, torch.tensor(documents[1])[:, None])
    assert got[1] == pytest.approx(float(chosen.sum()), abs=TOLERANCE)


@pytest.mark.parametrize(
    ("requests", "kwargs", "message"),
    [
        ([([1, 2], [])], {}, r"requests\[0\]\[1\] is empty"),
        ([([], [3])], {}, r"requests\[0\]\[0\] is empty"),
        ([([1, 2], [3, 999])], {}, r"requests\[0\]\[1\]\[1\] is 999, outside the vocabulary"),
        ([([1.0], [3])], {}, r"requests\[0\]\[0\]\[0\] must be an integer token id"),
        ([([1], [3], [4])], {}, r"requests\[0\] must be a \(context, continuation\) pair"),
        ([], {}, "requests must be a non-empty list"),
        ([([1], [3] * 9)], {"max_length": 8}, r"continuation, has 9 tokens; at most max_length=8"),
        ([([1], [3])], {"max_length": 0}, "max_length"),
        ([([1], [3])], {"max_batch_tokens": 0}, "max_batch_tokens"),
    ],
)
def test_bad_requests_are_named(causal_pair, requests, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        scoring.loglikelihood(causal_pair[1], requests, **kwargs)


def test_bad_rolling_arguments_are_named(causal_pair):
    model = causal_pair[1]
    with pytest.raises(GenerationError, match="prefix_token"):
        scoring.loglikelihood_rolling(model, [[3, 4]], prefix_token=model.config.vocab_size)
    with pytest.raises(GenerationError, match=r"documents\[1\]\[0\] is -1"):
        scoring.loglikelihood_rolling(model, [[3], [-1]], prefix_token=1)


def test_perplexity_command_scores_each_text_from_bos(tmp_path, capsys):
    import json
    import math

    from helpers import torch_model

    from ettin_jax import cli, default_model

    tokenizer = default_model.byte_tokenizer()  # every byte a token
    bos = tokenizer.convert_tokens_to_ids("[CLS]")
    reference = torch_model("causal", 3, vocab_size=264, bos_token_id=bos, cls_token_id=bos, max_position_embeddings=64)
    reference.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    texts = ["Short text.", "A longer text, of more bytes than the context holds: " * 3, "   "]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    capsys.readouterr()
    assert cli.main(["perplexity", "--model", str(tmp_path / "model"), "--file", str(tmp_path / "texts.jsonl")]) == 0
    got = json.loads(capsys.readouterr().out)

    scored = texts[:2]  # a blank text is skipped
    documents = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in scored]
    windows = [w for d in documents for w in scoring.rolling_windows(d, bos, 64)]
    assert len(windows) == 1 + 3  # 11 tokens in one window, 159 in three
    total = sum(reference_loglikelihood(reference, c, k, 64)[0] for c, k in windows)
    assert got["texts"] == 2 and got["tokens"] == sum(map(len, documents)) == 11 + 159
    assert got["words"] == sum(len(t.split()) for t in scored) and got["bytes"] == 11 + 159
    assert got["loglikelihood"] == pytest.approx(total, abs=1e-3)
    assert got["token_perplexity"] == pytest.approx(math.exp(-total / got["tokens"]), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / got["words"]), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-total / got["bytes"] / math.log(2), rel=1e-5)


def test_a_context_that_is_not_a_power_of_two_is_never_padded_past_it(tmp_path):
    """max_position_embeddings 100: a 70-token context with a 25-token continuation, rolling
    windows of the whole context, and token_logprobs of 90 tokens all fit (buckets stop at 100)."""
    from helpers import torch_model

    import ettin_jax as ej

    reference = torch_model("causal", 4, max_position_embeddings=100)
    reference.save_pretrained(tmp_path)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path)
    rng = np.random.default_rng(5)
    ctx, cont = rng.integers(3, 128, 70).tolist(), rng.integers(3, 128, 25).tolist()
    requests = [(ctx, cont), (ctx[:5], rng.integers(3, 128, 90).tolist()), (ctx, cont[:3])]
    got = scoring.loglikelihood(model, requests)
    expected = [reference_loglikelihood(reference, c, k, 100)[0] for c, k in requests]
    np.testing.assert_allclose([s for s, _ in got], expected, atol=TOLERANCE, rtol=0)
    document = rng.integers(3, 128, 250).tolist()
    total = sum(reference_loglikelihood(reference, c, k, 100)[0] for c, k in scoring.rolling_windows(document, 1, 100))
    assert scoring.loglikelihood_rolling(model, [document], 1)[0] == pytest.approx(total, abs=1e-3)
    assert len(scoring.token_logprobs(model, [ctx + cont[:20]])[0].chosen) == 89


@pytest.mark.parametrize("data", [2, 3])
def test_a_sharded_model_scores_alike(causal_pair, data):
    """Over a data mesh, 3 ways included (batches of a power of two rows do not split 3 ways:
    rows are rounded up, and the scored tokens' indices are replicated)."""
    import ettin_jax as ej
    from ettin_jax import sharding

    model = causal_pair[1]
    mesh = sharding.make_mesh(data, 1, 1, devices=jax.devices()[:data])
    sharded = ej.ModernBertDecoderForCausalLM(model.config, rngs=nnx.Rngs(0))
    nnx.update(sharded, jax.device_get(nnx.state(model)))  # the same weights, then sharded
    sharded = sharding.shard_model(sharded, mesh)
    rng = np.random.default_rng(6)
    requests = [
        (rng.integers(3, 128, n).tolist(), rng.integers(3, 128, k).tolist()) for n, k in ((5, 3), (20, 1), (7, 9))
    ]
    requests.append((requests[0][0], [4, 5]))
    np.testing.assert_allclose(
        [s for s, _ in scoring.loglikelihood(sharded, requests)],
        [s for s, _ in scoring.loglikelihood(model, requests)], atol=1e-5, rtol=0,
    )  # fmt: skip
