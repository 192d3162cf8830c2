"""Pipelines: text generation and classification with tokenizers from the model directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from helpers import TINY

import ettin_jax as ej
from ettin_jax import default_model, pipelines


@pytest.fixture(scope="module")
def generator(default_home):
    return ej.pipeline("text-generation")


def test_prompts_start_with_bos(generator):
    bos = generator.model.config.bos_token_id
    assert generator.encode("hello")[0] == bos
    assert generator.encode("hello")[1:] == generator.tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_generation_shapes_and_text(generator):
    single = generator("The cat", max_new_tokens=6)
    assert len(single) == 1 and single[0]["generated_text"].startswith("The cat")
    batch = generator(["a", "longer prompt"], max_new_tokens=4, do_sample=True, num_return_sequences=2, top_k=20)
    assert [len(rows) for rows in batch] == [2, 2]
    assert all(r["generated_text"].startswith("longer prompt") for r in batch[1])


def test_generated_text_decodes_the_generated_tokens(generator):
    ids = generator.encode("Once")
    tokens = generator.model.generate([ids], max_new_tokens=8)[0, len(ids) :]
    expected = "Once" + generator.tokenizer.decode(generator.new_tokens(tokens), skip_special_tokens=True)
    record = generator("Once", max_new_tokens=8, return_tensors=True)[0]
    assert record["generated_text"] == expected
    assert record["generated_token_ids"] == generator.new_tokens(tokens)
    assert generator("Once", max_new_tokens=8, return_full_text=False)[0]["generated_text"] == expected[4:]


def test_a_list_runs_on_the_engine_and_each_sample_keeps_its_seed(generator):
    texts = ["The cat", "a", "dogs"]
    greedy = generator(texts, max_new_tokens=6, return_tensors=True, batch_size=2)
    assert [rows[0] for rows in greedy] == [generator(t, max_new_tokens=6, return_tensors=True)[0] for t in texts]
    kwargs = dict(max_new_tokens=6, do_sample=True, return_tensors=True)
    sampled = generator(texts, num_return_sequences=2, seed=3, batch_size=2, **kwargs)
    for i, text in enumerate(texts):
        for j, record in enumerate(sampled[i]):
            alone = generator([text], seed=pipelines.sample_seed(3, i, j, 2), batch_size=2, **kwargs)[0][0]
            assert record == alone  # the same request, run without the others
    assert sampled[1][0] != sampled[1][1]


def test_stream_pieces_add_up_to_the_completion(generator):
    full = generator("Hi there", max_new_tokens=10)[0]["generated_text"]
    pieces = list(generator.stream("Hi there", max_new_tokens=10))
    streamed = "Hi there" + "".join(pieces)
    # Only a trailing incomplete UTF-8 character (random bytes from the tiny model) is held back.
    assert len(pieces) > 1 and full.startswith(streamed)
    assert set(full[len(streamed) :]) <= {"\ufffd"}


@pytest.fixture(scope="module")
def classifier_dir(default_home, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clf")
    config = transformers.ModernBertDecoderConfig(
        **{
            k: v for k, v in default_model.config().to_dict().items() if k not in ("model_type", "id2label", "label2id")
        },
        id2label={0: "neg", 1: "pos", 2: "mixed"},
    )
    torch.manual_seed(0)
    model = transformers.ModernBertDecoderForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(default_model.path()).save_pretrained(directory)
    return model, str(directory)


def test_text_classification_matches_torch(classifier_dir):
    reference, directory = classifier_dir
    pipe = ej.pipeline("text-classification", model=directory)
    texts = ["good", "a much longer sentence here", "ok then"]  # three rows: a filler row pads the batch to 4
    out = pipe(texts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    for text, result in zip(texts, out, strict=True):
        ids = [reference.config.bos_token_id, *tokenizer(text)["input_ids"]]
        with torch.no_grad():
            probs = torch.softmax(reference(torch.tensor([ids])).logits[0], -1).numpy()
        assert result["label"] == reference.config.id2label[int(np.argmax(probs))]
        assert abs(result["score"] - float(probs.max())) < 1e-5
    alone = pipe("good")  # in a batch of its own: the same label, the score within float32 noise
    assert alone[0]["label"] == out[0]["label"] and abs(alone[0]["score"] - out[0]["score"]) < 1e-6
    # Other texts of lengths in the same buckets run the compiled program again.
    compiled = pipelines._probabilities._cache_size()
    pipe(["bad", "a rather longer text here", "so so"])
    assert pipelines._probabilities._cache_size() == compiled


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'summarization'; ettin-jax pipelines: text-generation"):
        ej.pipeline("summarization")


def test_loaded_model_needs_matching_task(generator):
    with pytest.raises(TypeError, match="needs a ModernBertDecoderForSequenceClassification"):
        ej.pipeline("text-classification", model=generator.model, tokenizer=generator.tokenizer)


def test_a_tokenizer_with_ids_outside_the_vocabulary_is_named(generator):
    # The byte-level default tokenizer makes ids up to 50283; this classifier knows 128.
    model = ej.ModernBertDecoderForSequenceClassification(ej.ModernBertDecoderConfig(**TINY))
    pipe = ej.pipeline("text-classification", model=model, tokenizer=generator.tokenizer)
    with pytest.raises(ej.InputError, match=r"input_ids\[0, \d+\] = \d+ is outside the vocabulary \[0, 128\)"):
        pipe(["hello there"])
